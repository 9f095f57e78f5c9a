"""The one gallery-index interface every backend implements, plus what they share.

A gallery index answers "which gallery items are nearest to these query embeddings?". In
heterogeneous visual search the two sides come from different models: the big ``gallery_model``
embeds the gallery once, offline, into an index; the small ``query_model`` embeds each query
online. Training makes the two embedding spaces compatible, so search is a plain inner product.

Conventions every backend keeps (and the tests check on each one):

* **Cosine similarity as inner product.** Vectors are L2-normalised on ``add`` *and* on
  ``search``, so the score is the cosine similarity in [-1, 1] whatever scale a model emits.
  The metric stored in the sidecar is therefore always ``"ip"`` with ``normalised: true``.
  Zero, NaN or infinite embeddings are rejected (a zero vector has no direction to rank by).
* **Stable int64 ids.** Each item keeps the id it was added with, across reopen, removal of other
  items and rebuilds. When ``add`` gets no ids it assigns ``next_id, next_id + 1, ...``, where
  ``next_id`` is one past the largest id ever added (a high-water mark kept in the sidecar), so a
  removed id is never handed to a different image. Ids must be non-negative: -1 is the padding id.
* **k is capped, padding is bounded.** ``search`` never asks a backend for more than the index
  holds, so an absurd k (``-k 1000000000``) costs what the index size costs, not k. Results are
  (q, w) arrays with ``w = min(k, max(len(index), MAX_PADDED_K))``: with fewer than k items the
  tail is padded with id -1 and score -inf, so small fixed-k batches keep a fixed shape, but a
  result is never wider than ``max(len(index), MAX_PADDED_K)``. k < 1 is an error.
* **Fresh snapshots on demand.** A handle reads the version that was current when it opened;
  ``stale()`` cheaply says whether a newer one was committed since (by another process: the
  CLI, another service) and ``refresh()`` loads it. A long-lived reader such as the search
  service calls them per request, so a removal from the command line is enforced at once.
* **Real removal.** ``remove`` takes the items out: the count drops and they are never returned.
  (``faiss:DIR`` records a tombstone in its log; the bytes leave its files at the next
  ``compact()``, automatic past a size ratio, or ``hvs index compact``.)
* **Per-item gallery model.** Each item records the fingerprint of the model that embedded it
  (``records()[i]["model"]``; None for items added before this existed); ``model_counts()``,
  ``ids(exclude_model=...)`` and ``replace()`` let a newer gallery model take over item by item.
* **Self-describing sidecar** (``meta``): dim, metric, normalisation, factory string, count,
  next_id, created/updated times, hvs version, plus whatever the caller passes in ``meta`` at
  creation: by convention ``gallery_model`` (name and weights fingerprint of the model that made
  the vectors) and ``preprocessing``, so a search service can refuse a mismatched query model.

Backends register by spec prefix (``faiss:DIR``, ``milvus:URI``): see ``hvs.index.open_index``.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HVSError
from ..fileio import sha256_file  # noqa: F401  (re-exported: index versions and build shards record it)

METRIC = "ip"
# Keys hvs writes into the sidecar itself; a caller's ``meta`` may repeat them only with the
# same value (e.g. a config that records dim), never override them.
RESERVED_META = (
    "format",
    "backend",
    "dim",
    "metric",
    "normalised",
    "factory",
    "count",
    "next_id",
    "created",
    "updated",
    "hvs_version",
    "search_params",
    "mmap",
    "models",
    "trained",
)
MAX_TEXT = 65535  # longest label / source kept (Milvus' VARCHAR limit; same on every backend)
MAX_ID = 2**63 - 1  # ids are int64; -1 is the padding id, so 0 .. MAX_ID
# Columns of -1/-inf padding a search may return beyond what the index holds (see the module
# docstring): enough for any fixed-k batch a caller stacks, small enough that k = 10**9 is free.
MAX_PADDED_K = 1024


class IndexStoreError(HVSError):
    """A gallery-index problem: bad spec, bad input, missing or corrupt files, lock held.

    The message is one line that names the problem (and the index it happened in).
    """


class IndexLockedError(IndexStoreError):
    """Another writer holds the index's writer lock (a caller may wait and retry)."""


def hvs_version() -> str:
    try:
        from importlib.metadata import version

        return version("hvs")
    except Exception:  # not installed (running from a checkout)
        return str(getattr(sys.modules.get("hvs"), "__version__", "0+unknown"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """First meaningful line of an exception message (FAISS errors carry C++ file/line noise)."""
    text = str(getattr(e, "message", None) or e).strip()  # pymilvus keeps the useful part in .message
    # FAISS: "Error in <signature> at <file>:<line>: <the actual message>"
    if text.startswith("Error in ") and ": " in text:
        text = text.rsplit(": ", 1)[-1] if "Error: '" not in text else text.split("Error: ", 1)[-1]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Registry: prefix -> "module:Class", imported on first use so that ``import hvs.index`` stays light
# and optional backends (pymilvus) are only needed by whoever uses them.
_BACKENDS: dict[str, str] = {}


def register_backend(prefix: str, target: str) -> None:
    """Register a backend class (``"package.module:ClassName"``) under a spec prefix."""
    _BACKENDS[prefix] = target


def list_backends() -> list[str]:
    """Registered spec prefixes, e.g. ``["faiss", "milvus"]``."""
    return sorted(_BACKENDS)


def _valid_specs() -> str:
    examples = {"faiss": "faiss:DIR", "milvus": "milvus:URI"}
    return ", ".join(examples.get(p, f"{p}:...") for p in list_backends())


# A spec with no prefix is a folder of this backend: ``runs/index`` means ``faiss:runs/index``.
DEFAULT_BACKEND = "faiss"


def parse_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """Split ``"prefix:location"``. A path with no prefix (no ``:`` before its first ``/``) is a
    folder of the default backend, ``faiss``, the one rule every command and the service share;
    an unknown prefix is an error, never a guess (STYLE 3)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise IndexStoreError(f"index spec must be a non-empty string like {_valid_specs()}, got {spec!r}")
    if ":" not in spec.split("/", 1)[0]:
        return DEFAULT_BACKEND, spec
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in _BACKENDS:
        raise IndexStoreError(f"index spec {spec!r} has no known backend prefix; use one of: {_valid_specs()}")
    if not rest:
        raise IndexStoreError(f"index spec {spec!r} names no location after '{prefix}:'")
    return prefix, rest


def backend_class(prefix: str) -> type[GalleryIndex]:
    module, _, name = _BACKENDS[prefix].partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------------
# Input checks shared by every backend.
def as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """(n, dim) float32 array from a numpy array / torch tensor / nested list, checked, normalised."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise IndexStoreError(f"{what} must be a 2-D (n, dim) array, got shape {x.shape}")
    if x.shape[1] != dim:
        raise IndexStoreError(f"dimension mismatch: index has dim {dim}, {what} have dim {x.shape[1]}")
    if not np.issubdtype(x.dtype, np.floating):
        raise IndexStoreError(f"{what} must be floating point, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise IndexStoreError(f"{what} contain NaN or inf in {len(bad)} row(s), first at row {int(bad[0])}")
    return l2_normalise(x, what)


def l2_normalise(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if x.size and (norms == 0).any():
        row = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise IndexStoreError(f"{what} contain an all-zero row (row {row}), which cannot be L2-normalised")
    return x / norms if x.size else x


def _id_range_error(value: Any, what: str) -> IndexStoreError:
    return IndexStoreError(
        f"{what[:-1] if what.endswith('s') else what} {value} is out of range: "
        f"ids are integers from 0 to {MAX_ID} (int64)"
    )


def as_ids(ids: Any, n: int | None = None, what: str = "ids") -> np.ndarray:
    """A 1-D int64 array of valid ids (0 .. 2**63-1), or a one-line error.

    Python ints beyond int64 (which numpy turns into an object array, or ``OverflowError``) and
    uint64 values above 2**63-1 (which a cast would wrap to negative ids) are refused by value,
    so the CLI, the service and the library all say the same thing about ``99999999999999999999999``.
    """
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise IndexStoreError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype == object:  # Python ints too large for int64, or mixed junk
        for v in arr.tolist():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise IndexStoreError(f"{what} must be integers, got {type(v).__name__} {v!r}"[:300])
            if not 0 <= v <= MAX_ID:
                raise _id_range_error(v, what)
        raise IndexStoreError(f"{what} must be integers, got dtype object")  # not reached for valid ints
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise IndexStoreError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype == np.uint64 and int(arr.max()) > MAX_ID:
        raise _id_range_error(int(arr.max()), what)
    arr = arr.astype(np.int64, copy=False)
    if n is not None and arr.shape[0] != n:
        raise IndexStoreError(f"{n} embeddings but {arr.shape[0]} {what}")
    if arr.size and arr.min() < 0:
        raise IndexStoreError(f"{what} must be non-negative (-1 is the padding id), got {int(arr.min())}")
    return arr


def check_id(value: Any) -> int:
    """One item id (a path parameter, a CLI argument) as an int in 0 .. 2**63-1, or a one-line error."""
    return int(as_ids([value], 1, "ids")[0])


def check_new_ids(ids: np.ndarray) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise IndexStoreError(f"duplicate id {int(uniq[counts > 1][0])} within one add() call")


def as_texts(values: Sequence[str | None] | None, n: int, what: str) -> list[str | None]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise IndexStoreError(f"{n} embeddings but {len(values)} {what}")
    out: list[str | None] = []
    for v in values:
        if v is not None and not isinstance(v, str):
            v = str(v)
        if v is not None and len(v.encode("utf-8")) > MAX_TEXT:
            raise IndexStoreError(f"a {what[:-1]} is longer than {MAX_TEXT} bytes: {v[:40]!r}...")
        out.append(v)
    return out


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexStoreError(f"k must be a positive integer, got {k!r}")
    return int(k)


def result_width(k: int, count: int) -> int:
    """Columns a search returns for ``k`` on an index of ``count`` items (see the module docstring)."""
    return min(k, max(count, MAX_PADDED_K))


def padded(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)


def new_sidecar(fmt: str, backend: str, dim: int, factory: str, user: dict | None, **own: Any) -> dict:
    """A new index's sidecar: the keys every backend keeps (format, backend, dim, metric, normalised,
    factory, zero count and next_id, creation times, hvs version), the backend's ``own`` ones, then
    the caller's (:func:`merge_user_meta`)."""
    stamp = now_iso()
    keys = {
        "format": fmt,
        "backend": backend,
        "dim": dim,
        "metric": METRIC,
        "normalised": True,
        "factory": factory,
        "count": 0,
        "next_id": 0,
        "created": stamp,
        "updated": stamp,
        "hvs_version": hvs_version(),
    }
    return merge_user_meta({**keys, **own}, user)


def merge_user_meta(base: dict, user: dict | None) -> dict:
    """Sidecar = hvs' own keys + the caller's (reserved keys may only repeat the same value)."""
    out = dict(base)
    for key, value in (user or {}).items():
        if key in RESERVED_META and key in base and base[key] != value:
            raise IndexStoreError(f"meta[{key!r}] = {value!r} conflicts with the index's {key} {base[key]!r}")
        if key not in RESERVED_META:
            out[key] = value
    return out


def check_meta_patch(patch: Any) -> dict:
    """A sidecar patch for :meth:`GalleryIndex.update_meta`: a JSON object of user keys only."""
    if not isinstance(patch, dict):
        raise IndexStoreError(f"a sidecar patch must be a dict, got {type(patch).__name__}")
    reserved = sorted(k for k in patch if k in RESERVED_META)
    if reserved:
        raise IndexStoreError(f"meta key {reserved[0]!r} is kept by hvs itself and cannot be updated")
    for key in patch:
        if not isinstance(key, str):
            raise IndexStoreError(f"meta keys must be strings, got {key!r}")
    try:
        json.dumps(patch)
    except (TypeError, ValueError) as e:
        raise IndexStoreError(f"meta patch is not JSON-serialisable ({one_line(e)})") from None
    return dict(patch)


def check_model(model: Any) -> str | None:
    """A gallery model fingerprint as recorded per item: a non-empty string, or None."""
    if model is not None and (not isinstance(model, str) or not model):
        raise IndexStoreError(f"model must be a gallery model fingerprint (a non-empty string) or None, got {model!r}")
    return model


def check_known_model(meta: dict, model: str | None, where: Any) -> None:
    """A vector's gallery model must be one the index knows (:func:`hvs.compat.gallery_models`: its
    registry and its primary model); an index that records no gallery model takes any."""
    from ..compat import gallery_models  # the registry's one reader

    known = gallery_models(meta)
    if model is None or not known or model in known:
        return
    names = ", ".join(f"{fp} ({(e.get('model') or '?')})" for fp, e in sorted(known.items()))
    raise IndexStoreError(
        f"index {where}: gallery model {model} is not one it knows ({names}); add with a gallery model trained "
        "compatible with one of them (hvs index add --gallery-model DIR registers it)"
    )


def default_model(meta: dict) -> str | None:
    """The fingerprint ``add`` records when the caller gives none: the sidecar's gallery model."""
    g = meta.get("gallery_model")
    fp = g.get("fingerprint") if isinstance(g, dict) else None
    return fp if isinstance(fp, str) and fp else None


def check_meta(meta: Any, where: str) -> dict:
    """The sidecar keys every backend relies on are present with sane values."""
    if not isinstance(meta, dict):
        raise IndexStoreError(f"{where}: sidecar is not a JSON object")
    for key in ("dim", "metric", "factory", "count", "next_id"):
        if key not in meta:
            raise IndexStoreError(f"{where}: sidecar has no {key!r}")
    if not isinstance(meta["dim"], int) or meta["dim"] < 1:
        raise IndexStoreError(f"{where}: sidecar dim {meta['dim']!r} is not a positive integer")
    if meta["metric"] != METRIC or meta.get("normalised") is not True:
        raise IndexStoreError(
            f"{where}: sidecar metric {meta['metric']!r}/normalised {meta.get('normalised')!r} is not 'ip'/true"
        )
    if not isinstance(meta["count"], int) or not isinstance(meta["next_id"], int):
        raise IndexStoreError(f"{where}: sidecar count/next_id are not integers")
    return meta


# ----------------------------------------------------------------------------------------------
class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    Reads are reentrant per thread (a search inside a snapshot that is already held does not
    queue behind a waiting writer and deadlock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if not depth:
            with self._cond:
                while self._writer or self._waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if not depth:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class GalleryIndex(abc.ABC):
    """A persistent id -> (vector, label, source) store with inner-product top-k search.

    Open one with ``hvs.index.open_index(spec)``. Usable as a context manager; ``close()`` releases
    locks and connections. Every mutating call is persisted before it returns.
    """

    prefix: str = ""  # registry prefix of the backend
    spec: str
    dim: int

    # -- construction (called by open_index) ------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def check_creatable(cls, location: str) -> None:
        """Raise IndexStoreError if an index (or anything that blocks creating one) is there."""

    @classmethod
    def check_factory(cls, dim: int, factory: str) -> None:
        """Raise IndexStoreError if this backend cannot build ``factory`` at ``dim``."""

    @classmethod
    @abc.abstractmethod
    def open(cls, location: str) -> GalleryIndex:
        """Open an existing index, validating it; raise IndexStoreError if missing or corrupt."""

    @classmethod
    @abc.abstractmethod
    def create(
        cls,
        location: str,
        dim: int,
        factory: str,
        meta: dict | None,
        initial: tuple[np.ndarray, np.ndarray, list, list] | None = None,
    ) -> GalleryIndex:
        """Create a new index; ``initial`` = (vectors, ids, labels, sources) written in one step."""

    # -- the interface ------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def meta(self) -> dict:
        """A copy of the sidecar."""

    @abc.abstractmethod
    def add(
        self,
        embeddings: np.ndarray,
        ids: np.ndarray | None = None,
        labels: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        model: str | None = None,
    ) -> np.ndarray:
        """Add (n, dim) embeddings (L2-normalised here); return their int64 ids.

        Ids are assigned from the sidecar's ``next_id`` when not given; an id already in the
        index (or repeated in ``ids``) is an error, never an overwrite. ``model`` is the
        fingerprint of the gallery model that embedded them, recorded per item (default: the
        sidecar's ``gallery_model.fingerprint``, or None when the sidecar has none).
        """

    def replace(self, ids: Sequence[int] | np.ndarray, embeddings: np.ndarray, model: str | None) -> int:
        """Give existing ids new vectors and a new ``model`` in one durable write, keeping their
        label and source; an unknown id is an error and nothing changes. Returns how many."""
        raise IndexStoreError(f"replace is not supported by the {self.prefix} backend")

    def model_counts(self) -> dict[str | None, int]:
        """How many live items each gallery model fingerprint embedded (None: not recorded)."""
        raise IndexStoreError(f"model_counts is not supported by the {self.prefix} backend")

    def ids(self, exclude_model: str | None = None) -> np.ndarray:
        """Sorted int64 ids of the live items; with ``exclude_model``, only those whose model differs."""
        raise IndexStoreError(f"ids is not supported by the {self.prefix} backend")

    def update_meta(self, patch: dict) -> dict:
        """Durably merge ``patch`` into the user (non-reserved) sidecar keys; returns the new sidecar."""
        raise IndexStoreError(f"update_meta is not supported by the {self.prefix} backend")

    def compact(self) -> dict:
        """Fold pending writes (log, tombstones) into a new base version; returns a summary."""
        return {"compacted": False, "reason": f"the {self.prefix} backend compacts by itself"}

    @abc.abstractmethod
    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete these ids (unknown ids are ignored); return how many were removed."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity: (scores (q, w) float32, ids (q, w) int64), -inf/-1 padded.

        ``w = min(k, max(len(self), MAX_PADDED_K))``; the backend is asked for at most
        ``len(self)`` neighbours, whatever k is. Non-finite or zero queries are an error.
        """
        self._check_open()
        q = as_matrix(queries, self.dim, "queries")
        k = check_k(k)
        count = len(self)
        scores, ids = padded(q.shape[0], result_width(k, count))
        top = min(k, count)
        if top and q.shape[0]:
            got_scores, got_ids = self._search(q, top)
            scores[:, :top], ids[:, :top] = got_scores, got_ids
        return scores, ids

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of checked, normalised queries with 1 <= k <= len(self): (q, k) scores and ids,
        -inf/-1 where the backend found fewer than k."""

    @abc.abstractmethod
    def records(self, ids: Sequence[int] | np.ndarray, *, skip_missing: bool = False) -> list[dict]:
        """``[{"id", "label", "source", "model"}, ...]`` in the order asked; an unknown id is an error
        (or, with ``skip_missing``, left out)."""

    @abc.abstractmethod
    def referenced(self, sources: Sequence[str]) -> set[str]:
        """Which of these ``source`` strings some item of the index still has."""

    def _check_open(self) -> None:
        """Raise IndexStoreError if the index was closed (backends override)."""

    # -- snapshots ----------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Hold one consistent state across several reads (a search, then its records): writes
        by other threads wait until it is released, and then apply in one step. Backends whose
        reads are live (Milvus) hold nothing."""
        yield

    def stale(self) -> bool:
        """Has a newer version been committed since this handle loaded its snapshot? Cheap
        (a ``stat``): meant to be called per request. Backends whose reads are live say False."""
        return False

    def refresh(self) -> bool:
        """Load the newest committed version if :meth:`stale`; True if something was reloaded."""
        return False

    # -- removal with the files it owns ------------------------------------------------------------
    def default_uploads_dir(self) -> Path | None:
        """Where images added through the service are kept for this index (None: no default)."""
        return None

    def remove_with_uploads(
        self, ids: Sequence[int] | np.ndarray, uploads_dir: str | os.PathLike | None = None
    ) -> tuple[int, list[str]]:
        """:meth:`remove`, then delete the uploaded image files those items owned.

        A removed item whose ``source`` is a file inside ``uploads_dir`` (default
        :meth:`default_uploads_dir`) had its image stored by hvs (``POST /gallery``); once the
        removal has committed, that file is deleted unless another item still names it, and the
        folder is fsync'ed, so a takedown leaves no copy of the photo. Files anywhere else (a
        dataset's own images) are never touched. Returns (items removed, files deleted).
        """
        drop = as_ids(ids, what="ids")
        folder = Path(uploads_dir) if uploads_dir is not None else self.default_uploads_dir()
        owned: list[str] = []
        if folder is not None and folder.is_dir():
            root = folder.resolve()
            for rec in self.records(drop, skip_missing=True):
                src = rec.get("source")
                if src and _inside(src, root):
                    owned.append(src)
        n = self.remove(drop)
        if not owned:
            return n, []
        still = self.referenced(owned)
        deleted = []
        for src in dict.fromkeys(owned):
            if src not in still:
                try:
                    os.unlink(src)
                    deleted.append(src)
                except FileNotFoundError:
                    pass
        if deleted:
            fsync_path(folder)
        return n, deleted

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def release_writer(self) -> None:
        """Release whatever a write took that would block other writers (no-op by default)."""

    def info(self) -> dict:
        """A JSON-able summary: spec, backend, count, and the sidecar."""
        return {"spec": self.spec, "backend": self.prefix, "count": len(self), "dim": self.dim, "meta": self.meta}

    def __enter__(self) -> GalleryIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            n = len(self)
        except Exception:
            n = "?"
        return f"{type(self).__name__}({self.spec!r}, dim={self.dim}, count={n})"


def _inside(path: str, root: Path) -> bool:
    """Is ``path`` a file inside ``root`` (after resolving links: an upload may not escape it)?"""
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return p.parent == root or root in p.parents


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's entries: renames and unlinks in it become durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
