"""Resumable gallery indexing: embed in shards, survive a kill, write the index in one step.

Embedding a large gallery with the big ``gallery_model`` is the slow part of indexing (hours on
a CPU), so ``build_index`` never loses finished work:

1. The gallery is cut into shards of ``shard_size`` items (item ``i`` gets id ``i``: its position
   in the gallery, so search results map straight back to the dataset).
2. Each finished shard is saved atomically (temp file, fsync, ``os.replace``) as
   ``WORK/shards/shard_00000.npy`` (raw float32 embeddings) and ``shard_00000.ids.npy`` (their
   int64 ids), then ``WORK/checksums/shard_00000.json`` records both files' SHA-256: written
   last, its presence marks the shard complete, and a shard is reused only if both files still
   match it (a damaged shard is embedded again, never indexed).
3. A build killed midway (or failed) and started again finds the finished shards and does not
   embed them again. ``WORK/build.json`` keys the shards by what the embeddings depend on and
   nothing else: item count, shard size, the items' sources, the ``gallery_model`` and
   ``preprocessing`` entries of ``meta`` and the data's spec/split/protocol. Not the factory nor
   the output spec, so a build that failed at training ``IVF256,Flat`` is finished with ``Flat``
   from the same shards. A different model or data refuses to reuse them rather than mix two
   models' vectors, unless no shard was finished yet (nothing to protect: the build starts over).
   The factory is checked against the gallery size (FAISS' training minimum) before anything is
   embedded.
4. When every shard is done the index is created and filled in one atomic step (for
   ``faiss:DIR`` a single version commit), the sidecar gets a ``build_report`` and the work
   folder is deleted.

The helper is model-agnostic: ``embed_fn`` maps a uint8 (B, C, H, W) batch to a float32 (B, dim)
array, so the CLI passes any gallery model (and its preprocessing) in a closure.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..compat import GallerySide, QuerySide, check_pair
from ..fileio import atomic_save_npy, atomic_write_json
from .base import GalleryIndex, IndexStoreError, backend_class, parse_spec, sha256_file

MANIFEST = "build.json"
MANIFEST_FORMAT = "hvs-build-shards/2"  # /1 keyed shards by spec and factory too, and had no checksums
MAX_LISTED_SKIPS = 20


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    atomic_save_npy(path, array)


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_json(path, manifest, indent=2, sort_keys=True)  # unique temp names: ranks may write at once


def default_work_dir(prefix: str, location: str) -> Path:
    """``DIR.build`` beside a FAISS folder, ``FILE.db.build`` beside a Milvus Lite file, and for a
    Milvus server a folder under the user cache (``$XDG_CACHE_HOME/hvs/index-builds``)."""
    target = location.partition("#")[0] if prefix == "milvus" else location
    if "://" in target:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "hvs" / "index-builds" / hashlib.sha256(f"{prefix}:{location}".encode()).hexdigest()[:16]
    suffix = "" if "#" not in location else "-" + location.partition("#")[2]
    return Path(target.rstrip("/") + suffix + ".build")


def _first(item: Any) -> Any:
    """The image part of a ``(image(s), label(s), ...)`` tuple, or the item itself."""
    return item[0] if isinstance(item, (tuple, list)) else item


class _Images:
    """Uniform batched access to a uint8 tensor, an image store (decoded on demand by DataLoader
    workers), a sequence of (C, H, W) items, or a loader."""

    def __init__(self, images: Any, n: int, batch_size: int):
        self.n, self.batch_size, self.images = n, batch_size, images
        if hasattr(images, "iter_chunks") and hasattr(images, "subset"):
            # an hvs.data ImageStore: files decoded on demand by its DataLoader workers
            self.mode = "store"
        elif hasattr(images, "shape"):  # one (N, C, H, W) tensor
            if len(images.shape) != 4 or str(getattr(images, "dtype", "")) not in ("torch.uint8", "uint8"):
                raise IndexStoreError(
                    f"images must be a uint8 (N, C, H, W) tensor, got "
                    f"{getattr(images, 'dtype', '?')} {tuple(images.shape)}"
                )
            self.mode = "tensor"
        elif hasattr(images, "__len__") and hasattr(images, "__getitem__"):
            # A Dataset-like sequence of (C, H, W) items (or (item, label) pairs), unless its
            # elements are themselves (B, C, H, W) batches: then it is a pre-batched loader.
            first = _first(images[0]) if len(images) else None
            self.mode = "stream" if first is not None and len(first.shape) == 4 else "items"
        else:
            self.mode = "stream"
        self.random_access = self.mode != "stream"
        if self.random_access and len(images) != n:
            raise IndexStoreError(f"{len(images)} images but {n} labels")
        self._stream = None if self.random_access else iter(images)
        self._buffer: Any = None  # leftover items of a loader batch that straddles two shards
        self._pos = 0

    def _slice(self, start: int, stop: int):
        if self.mode == "tensor":
            return self.images[start:stop]
        import torch

        return torch.stack([torch.as_tensor(_first(self.images[i])) for i in range(start, stop)])

    def _pull(self, m: int):
        """Next ``m`` items of a loader as one tensor (batches may straddle the boundary)."""
        import torch

        parts, have = [], 0
        while have < m:
            if self._buffer is None:
                try:
                    batch = next(self._stream)
                except StopIteration:
                    raise IndexStoreError(f"images ran out after {self._pos + have} of {self.n} items") from None
                self._buffer = _first(batch)
            take = min(m - have, len(self._buffer))
            parts.append(self._buffer[:take])
            self._buffer = self._buffer[take:] if take < len(self._buffer) else None
            have += take
        self._pos += m
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def skip(self, start: int, stop: int) -> None:
        """Pass over items whose shard is already embedded (a loader still has to yield them)."""
        if not self.random_access:
            for s in range(start, stop, self.batch_size):
                self._pull(min(self.batch_size, stop - s))

    def batches(self, start: int, stop: int) -> Iterable[tuple[int, Any]]:
        if self.mode == "store":  # one loader per shard: its workers decode the shard's batches in order
            chunks = self.images.subset(slice(start, stop)).iter_chunks(self.batch_size)
            yield from zip(range(start, stop, self.batch_size), chunks)
            return
        for s in range(start, stop, self.batch_size):
            e = min(stop, s + self.batch_size)
            yield s, (self._slice(s, e) if self.random_access else self._pull(e - s))


def _shard_paths(work: Path, i: int) -> tuple[Path, Path]:
    return work / "shards" / f"shard_{i:05d}.npy", work / "shards" / f"shard_{i:05d}.ids.npy"


def _sums_path(work: Path, i: int) -> Path:
    return work / "checksums" / f"shard_{i:05d}.json"


def _seal_shard(work: Path, i: int) -> None:
    """Record the shard's files' SHA-256 (read back from disk); the record marks it finished."""
    vec_path, ids_path = _shard_paths(work, i)
    atomic_write_json(
        _sums_path(work, i), {"algorithm": "sha256", "vectors": sha256_file(vec_path), "ids": sha256_file(ids_path)}
    )


def _load_shard(work: Path, i: int, start: int, stop: int, dim: int | None):
    """A finished shard's (embeddings, ids), or None if it is missing, unsealed or damaged."""
    vec_path, ids_path = _shard_paths(work, i)
    sums_path = _sums_path(work, i)
    if not ids_path.exists() or not vec_path.exists() or not sums_path.exists():
        return None
    try:
        sums = json.loads(sums_path.read_text())
        if sums.get("vectors") != sha256_file(vec_path) or sums.get("ids") != sha256_file(ids_path):
            return None  # damaged since it was written: embed it again
    except (OSError, ValueError, AttributeError):
        return None
    try:
        ids = np.load(ids_path, allow_pickle=False)
        vectors = np.load(vec_path, mmap_mode="r", allow_pickle=False)
    except Exception:
        return None
    ok = (
        ids.dtype == np.int64
        and ids.ndim == 1
        and vectors.dtype == np.float32
        and vectors.ndim == 2
        and vectors.shape[0] == ids.shape[0]
        and (dim is None or vectors.shape[1] == dim)
        and (ids.size == 0 or (ids.min() >= start and ids.max() < stop))
    )
    if ok and vectors.size and not np.isfinite(vectors).all():
        ok = False
    return (vectors, ids) if ok else None


def _finished_shards(work: Path) -> int:
    folder = work / "checksums"
    return sum(1 for _ in folder.glob("shard_*.json")) if folder.is_dir() else 0


def _dim_hint(meta: dict) -> int | None:
    """The embedding dimension the sidecar meta promises (``gallery_model.embed_dim``), if any."""
    dim = (meta.get("gallery_model") or {}).get("embed_dim") if isinstance(meta.get("gallery_model"), dict) else None
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _check_inputs(
    cls: type[GalleryIndex],
    location: str,
    images: Any,
    labels: Sequence[str],
    sources: Sequence[str] | None,
    meta: dict,
    batch_size: int,
    shard_size: int,
) -> tuple[list, _Images]:
    """Refuse bad arguments before anything is embedded; the sources as a list and the images."""
    cls.check_creatable(location)  # fail before hours of embedding, not after
    n = len(labels)
    sources = [None] * n if sources is None else list(sources)
    if len(sources) != n:
        raise IndexStoreError(f"{n} labels but {len(sources)} sources")
    if shard_size < 1 or batch_size < 1:
        raise IndexStoreError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    if meta is None or not isinstance(meta, dict):
        raise IndexStoreError("build_index needs meta= (a dict; record gallery_model and preprocessing in it)")
    return sources, _Images(images, n, batch_size)


def _manifest(n: int, shard_size: int, sources: list, meta: dict) -> tuple[dict, dict]:
    """What the shards depend on (``build.json``'s keys) and the ``made_by`` record of the model."""
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    manifest = {
        "format": MANIFEST_FORMAT,
        "n": n,
        "shard_size": shard_size,
        "sources": _sha(sources),
        "model": _sha([meta.get("gallery_model"), meta.get("preprocessing")]),
        "data": _sha([data.get(key) for key in ("spec", "split", "protocol")]),
    }
    made_by = {"gallery_model": meta.get("gallery_model"), "preprocessing": meta.get("preprocessing")}
    return manifest, made_by


def _refuse_other_build(work: Path, old: dict, diff: list[str], made_by: dict) -> None:
    """Raise: the finished shards in ``work`` were embedded for another build (named by ``diff``)."""
    recorded = old.get("made_by") if isinstance(old.get("made_by"), dict) else {}
    if "model" in diff and (recorded.get("gallery_model") or {}).get("fingerprint"):
        # shards embedded by one gallery model never mix with another's (hvs.compat's rule)
        check_pair(
            QuerySide.writer_of(GallerySide.of_index_meta(made_by)),
            GallerySide.of_index_meta(recorded),
            same_model=True,
            remedy=f"delete {work} to start over",
        )
    what = {
        "n": "item count",
        "shard_size": "shard size",
        "sources": "gallery items",
        "model": "gallery model or preprocessing",
        "data": "data spec/split/protocol",
    }[diff[0]]
    raise IndexStoreError(
        f"the shards in {work} belong to a different build (another {what}); delete {work} to start over"
    )


def _open_work_folder(work: Path, manifest: dict, made_by: dict) -> int | None:
    """Reuse, refuse or reset the work folder against ``manifest``; the recorded dim, if any.

    A matching ``build.json`` keeps the shards (and gives their dim); a different one with finished
    shards is refused; anything else (no finished shard, an older format) starts over.
    """
    manifest_path = work / MANIFEST
    dim = None
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        old = old if isinstance(old, dict) else {}
        diff = [key for key in manifest if old.get(key) != manifest[key]]
        if not diff:
            dim = old.get("dim")
        elif _finished_shards(work) and old.get("format") == MANIFEST_FORMAT:
            _refuse_other_build(work, old, diff, made_by)
        else:  # nothing reusable there (no finished shard, or an older format without checksums)
            shutil.rmtree(work / "shards", ignore_errors=True)
            shutil.rmtree(work / "checksums", ignore_errors=True)
    if dim is None:
        (work / "shards").mkdir(parents=True, exist_ok=True)
        _write_manifest(manifest_path, dict(manifest, made_by=made_by))
    (work / "shards").mkdir(parents=True, exist_ok=True)
    (work / "checksums").mkdir(parents=True, exist_ok=True)
    return dim


@dataclass
class _Build:
    """What the embedding and writing steps of one ``build_index`` call share."""

    spec: str
    cls: type[GalleryIndex]
    location: str
    factory: str
    labels: Sequence[str]
    sources: list
    shard_size: int
    work: Path
    manifest: dict
    made_by: dict
    dim: int | None  # from build.json, else set by the first embedded batch

    @property
    def n(self) -> int:
        return len(self.labels)

    def bounds(self, i: int) -> tuple[int, int]:
        """Shard ``i``'s items: ``start:stop``."""
        return i * self.shard_size, min(self.n, (i + 1) * self.shard_size)


def _embed_batches(
    b: _Build, source: _Images, embed_fn: Callable, start: int, stop: int, on_batch: Callable
) -> np.ndarray:
    """Items ``start:stop`` embedded batch by batch, each checked for shape and dim.

    The first batch of a build whose dim is not yet known fixes ``b.dim``: the factory is checked
    against it and ``build.json`` records it. ``on_batch`` gets each batch's size (progress).
    """
    parts = []
    for _, batch in source.batches(start, stop):
        out = embed_fn(batch)
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise IndexStoreError(f"embed_fn returned shape {out.shape} for a batch of {len(batch)} images")
        if b.dim is None:
            b.dim = int(out.shape[1])
            b.cls.check_factory(b.dim, b.factory, b.n)  # after one batch when meta gave no dim
            _write_manifest(b.work / MANIFEST, dict(b.manifest, made_by=b.made_by, dim=b.dim))
        elif out.shape[1] != b.dim:
            raise IndexStoreError(f"dimension mismatch: embed_fn returned dim {out.shape[1]}, earlier dim {b.dim}")
        parts.append(out)
        on_batch(len(out))
    return np.concatenate(parts) if parts else np.zeros((0, b.dim or 0), np.float32)


def _embed_shard(
    b: _Build, source: _Images, embed_fn: Callable, i: int, skip_bad: bool, on_batch: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """Embed shard ``i``, refuse (or with ``skip_bad`` drop) NaN/inf/zero rows, save it atomically
    and seal it; its (vectors, ids)."""
    start, stop = b.bounds(i)
    vectors = _embed_batches(b, source, embed_fn, start, stop, on_batch)
    ids = np.arange(start, stop, dtype=np.int64)
    good = np.isfinite(vectors).all(axis=1) & (np.abs(vectors).sum(axis=1) > 0)
    if not good.all():
        first = int(ids[~good][0])
        if not skip_bad:
            raise IndexStoreError(
                f"embedding of item {first} ({b.sources[first] or b.labels[first]}) is NaN, "
                "inf or zero: is the gallery model broken, or this image? (fix or "
                "drop it from the data, then rerun: finished shards are kept)"
            )
        vectors, ids = vectors[good], ids[good]
    vec_path, ids_path = _shard_paths(b.work, i)
    _save_atomic(vec_path, vectors)
    _save_atomic(ids_path, ids)
    _seal_shard(b.work, i)  # last: the checksum record marks the shard finished
    return vectors, ids


def _embed_shards(
    b: _Build, source: _Images, embed_fn: Callable, wanted: set | None, skip_bad: bool, report: dict, progress: bool
) -> list:
    """Every shard's (vectors, ids): reused when finished, embedded when ``wanted``, else None."""
    from tqdm.auto import tqdm

    n_shards = report["n_shards"]
    done = [_load_shard(b.work, i, *b.bounds(i), b.dim) for i in range(n_shards)]
    size = {i: b.bounds(i)[1] - b.bounds(i)[0] for i in range(n_shards) if wanted is None or i in wanted}
    reused_items = sum(m for i, m in size.items() if done[i] is not None)
    bar = tqdm(
        total=sum(size.values()),
        initial=reused_items,
        disable=not progress,
        desc=f"embed gallery -> {b.spec}",
        unit="img",
    )

    def on_batch(m: int) -> None:
        report["n_embedded"] += m
        bar.update(m)

    try:
        for i in range(n_shards):
            start, stop = b.bounds(i)
            if done[i] is not None or (wanted is not None and i not in wanted):
                source.skip(start, stop)
                if done[i] is not None:
                    report["n_reused_shards"] += 1
                    report["n_reused_items"] += stop - start
                continue
            done[i] = _embed_shard(b, source, embed_fn, i, skip_bad, on_batch)
    finally:
        bar.close()
    return done


def _write_index(b: _Build, meta: dict, report: dict, done: list) -> GalleryIndex:
    """Fill in the report's skips and create the index from every shard in one atomic step."""
    ids = np.concatenate([d[1] for d in done]) if done else np.zeros(0, np.int64)
    present = np.zeros(b.n, bool)
    present[ids] = True
    missing = np.flatnonzero(~present)
    report["n_skipped"] = int(missing.size)
    report["skipped"] = [f"{int(j)}: {b.sources[j] or b.labels[j]}" for j in missing[:MAX_LISTED_SKIPS]]
    if b.dim is None:
        raise IndexStoreError(f"no images to index for {b.spec}")
    vectors = np.concatenate([np.asarray(d[0], dtype=np.float32) for d in done])
    index_labels = [b.labels[j] for j in ids.tolist()]
    index_sources = [b.sources[j] for j in ids.tolist()]
    initial = (vectors, ids, index_labels, index_sources)
    return b.cls.create(b.location, b.dim, b.factory, dict(meta, build_report=report), initial=initial)


def build_index(
    spec: str,
    images: Any,
    labels: Sequence[str],
    sources: Sequence[str] | None,
    embed_fn: Callable[[Any], np.ndarray],
    *,
    factory: str = "Flat",
    meta: dict,
    batch_size: int = 256,
    shard_size: int = 4096,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    only_shards: Iterable[int] | None = None,
) -> GalleryIndex | None:
    """Embed a gallery with ``embed_fn`` and write it as a new index at ``spec``; resumable.

    ``images``: a uint8 (N, C, H, W) tensor, an :class:`hvs.data.store.ImageStore` (decoded
    shard by shard in its DataLoader workers), a sequence of (C, H, W) uint8 tensors, or an iterable
    (DataLoader) of uint8 batches (or tuples whose first element is the batch); ``labels`` and
    ``sources`` have one entry per image, and item ``i`` gets id ``i``. ``embed_fn`` is called on
    batches of at most ``batch_size`` and must return (B, dim) floats. ``meta`` goes into the
    sidecar (``gallery_model``, ``preprocessing``) together with ``build_report``: items embedded
    by this call, shards and items reused from an interrupted run, and items skipped.

    An embedding with NaN/inf is an error naming the item, unless ``skip_bad=True``, which leaves
    such items out (listed in the report). ``work_dir`` defaults to ``DIR.build`` beside a FAISS
    folder (``FILE.db.build`` for Milvus Lite); rerun to resume, with the same or another
    ``factory`` (see the module docstring for what the shards are keyed by). The factory is
    checked against ``len(labels)`` before the first image is embedded when ``meta`` records
    ``gallery_model.embed_dim``, else right after the first batch.

    ``only_shards`` (the hook for :mod:`hvs.index.distributed_build`): embed just these shard
    numbers into the work folder and return None without writing the index; a later call
    without it finds them finished and writes the index.
    """
    prefix, location = parse_spec(spec)
    cls = backend_class(prefix)
    sources, source = _check_inputs(cls, location, images, labels, sources, meta, batch_size, shard_size)
    n = len(labels)
    dim_hint = _dim_hint(meta)
    if dim_hint is not None:
        cls.check_factory(dim_hint, factory, n)  # before hours of embedding, not after
    work = Path(work_dir) if work_dir is not None else default_work_dir(prefix, location)
    manifest, made_by = _manifest(n, shard_size, sources, meta)
    dim = _open_work_folder(work, manifest, made_by)
    if dim is not None and dim_hint is None:
        cls.check_factory(dim, factory, n)

    b = _Build(spec, cls, location, factory, labels, sources, shard_size, work, manifest, made_by, dim)
    report = {
        "n_items": n,
        "n_shards": math.ceil(n / shard_size),
        "shard_size": shard_size,
        "n_embedded": 0,
        "n_reused_shards": 0,
        "n_reused_items": 0,
        "n_skipped": 0,
        "skipped": [],
    }
    wanted = None if only_shards is None else set(only_shards)
    done = _embed_shards(b, source, embed_fn, wanted, skip_bad, report, progress)
    if wanted is not None:
        return None
    index = _write_index(b, meta, report, done)
    shutil.rmtree(work, ignore_errors=True)
    return index
