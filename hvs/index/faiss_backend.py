"""``faiss:DIR`` — a gallery index kept in a folder, searched in-process with FAISS.

Layout (every write makes a new *version* folder and then atomically repoints ``CURRENT``)::

    DIR/
      CURRENT            "v000007": the version readers open (replaced with os.replace)
      writer.lock        fcntl.flock'ed by the one writer; holds its pid for the error message
      v000007/
        index.faiss      faiss.write_index of an IndexIDMap2 around the factory index
        meta.json        the sidecar (dim, metric "ip", normalised, factory, count, next_id, ...)
        ids.jsonl        one {"id", "label", "source"} per item, in the row order of vectors.npy
        vectors.npy      the L2-normalised float32 vectors, (count, dim)
        vector_ids.npy   their int64 ids, (count,)
        checksums.json   SHA-256 of each file above, written last; verified at open
      v000006/           the previous version, kept so a reader that has just read CURRENT can
                         still open it; older ones are deleted by the next writer

Why these choices:

* **IndexIDMap2** maps FAISS' internal row numbers to our stable int64 ids, so ids survive
  removal of other items (plain FAISS renumbers rows on removal); unlike IndexIDMap it also keeps
  the reverse map (id -> row), so a vector can be reconstructed by id, and keeps both maps
  consistent through ``remove_ids``. Every factory index (``"Flat"``,
  ``"HNSW32"``, ``"IVF64,Flat"``, ``"IVF16,PQ8"``, ...) is wrapped in one, with
  METRIC_INNER_PRODUCT: on L2-normalised vectors that is cosine similarity.
* **The raw vectors are kept** (``vectors.npy``) because not every FAISS index can give them
  back or change in place: HNSW does not implement ``remove_ids`` at all, so removal from an HNSW
  index is a rebuild from the kept vectors; PQ codes are lossy, so retraining an IVF/PQ index on
  a grown gallery (``rebuild()``) needs the originals. Without them both would need the gallery
  model and images again. The cost is ``4 * dim`` bytes per item on disk; ``vectors.npy`` is
  memory-mapped, so it costs no RAM until a write or rebuild reads it.
* **Atomic writes.** All files of a version are written into ``DIR/.tmp-*``, fsync'ed, the folder
  renamed to ``vNNNNNN`` and only then ``CURRENT`` replaced (``os.replace`` is atomic on POSIX). A
  crash at any point leaves ``CURRENT`` naming a complete version; the debris is removed by the
  next writer. Each ``add``/``remove`` is one such commit, so batch adds rather than adding one
  vector at a time (each commit rewrites the folder).
* **Checksums.** Every commit records the SHA-256 of each file of the version in
  ``checksums.json``; opening a version (and reloading one) verifies them first, so flipped bytes
  in ``index.faiss`` or rows edited in ``vectors.npy`` are refused with a one-line error naming
  the file, never searched. A version written before checksums existed still opens, with a
  warning, after a value check of ``vectors.npy`` (finite unit rows); its next commit records
  checksums. Refusing it would strand every existing index for no protection gained: whoever can
  edit the files can equally edit a checksum file (checksums catch damage, not an adversary).
* **One writer, any number of readers.** A writer takes a non-blocking ``fcntl.flock`` on
  ``writer.lock`` at its first write and keeps it until ``close()``; a second writer gets "index
  DIR is locked by another writer (pid N)". Readers never lock: they see the version that was
  current when they opened (``stale()`` / ``refresh()`` move a long-lived reader to the newest
  commit). A writer whose snapshot is older than ``CURRENT`` when it takes the lock reloads first,
  so it never overwrites another writer's commit.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import HVSWarning
from .base import (
    METRIC,
    GalleryIndex,
    IndexStoreError,
    as_ids,
    as_matrix,
    as_texts,
    check_meta,
    check_meta_patch,
    check_model,
    check_new_ids,
    default_model,
    hvs_version,
    merge_user_meta,
    now_iso,
    one_line,
    sha256_file,
)
from .base import fsync_path as _fsync_path

FORMAT = "hvs-faiss-index/1"
FILES = ("index.faiss", "meta.json", "ids.jsonl", "vectors.npy", "vector_ids.npy")
CHECKSUMS = "checksums.json"  # {"algorithm": "sha256", "files": {name: hex}}; absent in versions before it
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored (L2-normalised float32) vector
LOCK_NAME = "writer.lock"
_VERSION_RE = re.compile(r"^v\d{6}$")
FACTORY_EXAMPLES = "Flat, HNSW32, IVF64,Flat, IVF16,PQ8"


def _faiss():
    import faiss  # a core dependency; imported here so that `import hvs.index` stays cheap

    return faiss


# ----------------------------------------------------------------------------------------------
# Building FAISS indexes from factory strings.
def make_index(dim: int, factory: str):
    """IndexIDMap2(index_factory(dim, factory, METRIC_INNER_PRODUCT)), or a one-line error."""
    faiss = _faiss()
    if not isinstance(factory, str) or not factory.strip():
        raise IndexStoreError(f"FAISS factory must be a non-empty string like {FACTORY_EXAMPLES}")
    if "IDMap" in factory:
        raise IndexStoreError(
            f"FAISS factory {factory!r}: drop the IDMap prefix, hvs wraps every index in IndexIDMap2 itself"
        )
    try:
        inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:  # faiss raises RuntimeError with the C++ location in the message
        raise IndexStoreError(
            f"unknown or invalid FAISS factory {factory!r} for dim {dim} ({one_line(e)}); examples: {FACTORY_EXAMPLES}"
        ) from None
    if inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexStoreError(f"FAISS factory {factory!r} does not support the inner-product metric")
    # index_factory turns on polysemous training for PQ codes: a simulated-annealing pass that
    # adds ~15 s to every train() on a 2-core CPU and only helps polysemous (Hamming-filtered)
    # search, which hvs never runs. Same codes and recall without it.
    part = faiss.downcast_index(inner)
    while part is not None:
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
        sub = getattr(part, "index", None)
        part = faiss.downcast_index(sub) if sub is not None else None
    return faiss.IndexIDMap2(inner)


def min_train_size(index) -> int:
    """Fewest vectors FAISS accepts to train ``index`` (k-means needs at least k points)."""
    faiss = _faiss()
    need = 1
    try:
        need = max(need, int(faiss.extract_index_ivf(index).nlist))
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index)
    while inner is not None:
        pq = getattr(inner, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
        sub = getattr(inner, "index", None)  # IndexPreTransform / refine wrappers
        inner = faiss.downcast_index(sub) if sub is not None else None
    return need


def default_search_params(index) -> dict:
    """Search-time knobs worth more than FAISS' defaults (nprobe=1, efSearch=16) for recall."""
    faiss = _faiss()
    params: dict = {}
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
        # ~sqrt(nlist) lists, at least 8: recall@10 above 0.9 on typical embeddings, still
        # touching a small fraction of the gallery for large nlist.
        params["nprobe"] = min(nlist, max(8, int(round(nlist**0.5))))
    except RuntimeError:
        pass
    if _hnsw_of(index) is not None:
        params["efSearch"] = 64
    return params


def _hnsw_of(index):
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    return inner.hnsw if hasattr(inner, "hnsw") else None


def apply_search_params(index, params: dict) -> None:
    faiss = _faiss()
    for key, value in (params or {}).items():
        if key == "nprobe":
            try:
                faiss.extract_index_ivf(index).nprobe = int(value)
            except RuntimeError:
                raise IndexStoreError("search param nprobe needs an IVF index") from None
        elif key == "efSearch":
            hnsw = _hnsw_of(index)
            if hnsw is None:
                raise IndexStoreError("search param efSearch needs an HNSW index")
            hnsw.efSearch = int(value)
        else:
            raise IndexStoreError(f"unknown FAISS search param {key!r}; known: nprobe, efSearch")


def training_need(dim: int, factory: str, n: int) -> None:
    """Raise IndexStoreError if ``factory`` cannot be trained on ``n`` vectors (FAISS' own minimum:
    k-means needs at least as many points as centroids, for IVF lists and PQ codebooks alike)."""
    index = make_index(dim, factory)
    if index.is_trained:
        return
    need = min_train_size(index)
    if n < need:
        raise IndexStoreError(
            f"FAISS factory {factory!r} needs at least {need} vectors to train, got {n}: "
            f"use a factory with fewer lists or codes (Flat, HNSW32, IVF{max(1, n // 39)},Flat) "
            "or index more items"
        )


def train_if_needed(index, vectors: np.ndarray, factory: str) -> None:
    if index.is_trained:
        return
    need = min_train_size(index)
    if len(vectors) < need:
        raise IndexStoreError(
            f"FAISS factory {factory!r} needs at least {need} vectors to train, got "
            f"{len(vectors)}: add at least {need} in the first write, or use 'Flat'"
        )
    try:
        index.train(vectors)
    except RuntimeError as e:
        m = re.search(r"Number of training points \((\d+)\).*clusters \((\d+)\)", str(e))
        if m:
            raise IndexStoreError(
                f"FAISS factory {factory!r} needs at least {m.group(2)} vectors to train, got {m.group(1)}"
            ) from None
        raise IndexStoreError(
            f"training FAISS index {factory!r} on {len(vectors)} vectors failed: {one_line(e)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Durable file writes. Each step is a module-level function so tests can make one fail.
def _write_faiss(path: Path, index) -> None:
    _faiss().write_index(index, str(path))
    _fsync_path(path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_idmap(path: Path, ids: np.ndarray, labels: Sequence, sources: Sequence, models: Sequence) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, label, source, model in zip(ids.tolist(), labels, sources, models):
            rec = {"id": i, "label": label, "source": source, "model": model}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_checksums(vdir: Path) -> None:
    """Record size and SHA-256 of every file of a version (read back from disk: what was written)."""
    _write_json(
        vdir / CHECKSUMS,
        {
            "algorithm": "sha256",
            "files": {
                name: {"sha256": sha256_file(vdir / name), "bytes": (vdir / name).stat().st_size} for name in FILES
            },
        },
    )


def _read_checksums(vdir: Path, where: str) -> dict | None:
    """``{name: {"sha256", "bytes"}}`` of a version, or None for a version written before them."""
    path = vdir / CHECKSUMS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        sums = record["files"]
        if record.get("algorithm") != "sha256" or not all(
            isinstance(sums[name]["sha256"], str) and isinstance(sums[name]["bytes"], int) for name in FILES
        ):
            raise KeyError("algorithm")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise IndexStoreError(
            f"{where}: {vdir.name}/{CHECKSUMS} is corrupt (not a sha256 list of the version's files)"
        ) from None
    return sums


def _verify(vdir: Path, name: str, sums: dict | None, where: str) -> None:
    """One file against its recorded size and SHA-256, before anything parses it: a truncated or
    replaced file is "unreadable", a same-size one with flipped bytes "corrupt"; both name it."""
    if sums is None:
        return
    size, want = (vdir / name).stat().st_size, sums[name]
    if size != want["bytes"]:
        raise IndexStoreError(
            f"{where}: {vdir.name}/{name} is unreadable: {size} bytes where {CHECKSUMS} "
            f"records {want['bytes']} (truncated or replaced file)"
        )
    if sha256_file(vdir / name) != want["sha256"]:
        raise IndexStoreError(
            f"{where}: {vdir.name}/{name} is corrupt: its SHA-256 does not match "
            f"{CHECKSUMS} (restore the folder from a backup or rebuild the index)"
        )


def _check_unit_rows(vectors: np.ndarray, vec_ids: np.ndarray, where: str, version: str) -> None:
    """Every stored vector is finite with norm 1 (they are L2-normalised on add): catches NaN,
    inf and overwritten rows in a version that has no checksums to catch them."""
    for start in range(0, len(vectors), 65536):  # chunked: vectors.npy is memory-mapped
        norms = np.linalg.norm(np.asarray(vectors[start : start + 65536], dtype=np.float64), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1.0) <= UNIT_TOLERANCE))  # NaN compares False
        if bad.size:
            row = start + int(bad[0])
            raise IndexStoreError(
                f"{where}: {version}/vectors.npy row {row} (id {int(vec_ids[row])}) is not a "
                f"finite unit vector (norm {norms[bad[0]]:.4g}): the file is corrupt"
            )


_WARNED_LEGACY: set[tuple[str, str]] = set()


def _warn_legacy(root: Path, version: str) -> None:
    key = (str(root), version)
    if key not in _WARNED_LEGACY:
        _WARNED_LEGACY.add(key)
        warnings.warn(
            f"index {root} {version} has no {CHECKSUMS} (written by an older hvs): its files are "
            "value-checked only; the next write to the index records checksums",
            HVSWarning,
            stacklevel=3,
        )


def _write_current(root: Path, version: str) -> None:
    """Point ``CURRENT`` at ``version`` atomically: the one step that makes a version visible."""
    tmp = root / f".CURRENT.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "CURRENT")
    _fsync_path(root)


def _current_key(root: Path) -> tuple | None:
    """What changes whenever CURRENT is replaced (os.replace gives it a new inode): a stat, no read."""
    try:
        st = os.stat(root / "CURRENT")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_current(root: Path) -> str | None:
    try:
        version = (root / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    if not _VERSION_RE.match(version):
        raise IndexStoreError(f"index {root}: CURRENT holds {version[:40]!r}, not a version name like v000001")
    return version


# ----------------------------------------------------------------------------------------------
class _State:
    """One loaded (or about to be written) version: the FAISS index plus what rebuilds need."""

    def __init__(
        self,
        index,
        meta: dict,
        vectors: np.ndarray,
        vec_ids: np.ndarray,
        labels: list,
        sources: list,
        models: list | None = None,
    ):
        self.index, self.meta = index, meta
        self.vectors, self.vec_ids, self.labels, self.sources = vectors, vec_ids, labels, sources
        self.models = models if models is not None else [None] * len(labels)
        self._row_of: dict[int, int] | None = None

    def row_of(self) -> dict[int, int]:
        if self._row_of is None:
            self._row_of = {i: r for r, i in enumerate(self.vec_ids.tolist())}
        return self._row_of


def _load_version(root: Path, version: str) -> _State:
    faiss = _faiss()
    vdir = root / version
    where = f"index {root}"
    if not vdir.is_dir():
        raise IndexStoreError(f"{where}: CURRENT names {version} but that folder is missing")
    for name in FILES:
        if not (vdir / name).is_file():
            raise IndexStoreError(f"{where} is incomplete: {version}/{name} is missing")
    # Each binary file is verified before it is parsed (a damaged one is named, never mis-read);
    # meta.json last, so an edited sidecar gets the more precise consistency message below.
    sums = _read_checksums(vdir, where)
    try:
        meta = json.loads((vdir / "meta.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexStoreError(f"{where}: meta.json is not valid JSON ({one_line(e)})") from None
    check_meta(meta, where)
    if meta.get("format") != FORMAT:
        raise IndexStoreError(f"{where}: meta.json format {meta.get('format')!r} is not {FORMAT!r}")
    dim, count = meta["dim"], meta["count"]
    _verify(vdir, "index.faiss", sums, where)
    try:
        index = faiss.read_index(str(vdir / "index.faiss"))
    except Exception as e:
        raise IndexStoreError(f"{where}: index.faiss is unreadable ({one_line(e)})") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexStoreError(f"{where}: index.faiss holds a {type(index).__name__}, not an IndexIDMap2")
    if index.d != dim:
        raise IndexStoreError(f"{where}: meta.json says dim {dim} but index.faiss has dim {index.d}")
    if index.ntotal != count:
        raise IndexStoreError(f"{where}: meta.json says count {count} but index.faiss holds {index.ntotal} vectors")
    _verify(vdir, "vector_ids.npy", sums, where)
    _verify(vdir, "vectors.npy", sums, where)
    try:
        vec_ids = np.load(vdir / "vector_ids.npy", allow_pickle=False)
        vectors = np.load(vdir / "vectors.npy", mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise IndexStoreError(f"{where}: vectors.npy/vector_ids.npy unreadable ({one_line(e)})") from None
    if vec_ids.shape != (count,) or vec_ids.dtype != np.int64:
        raise IndexStoreError(f"{where}: vector_ids.npy is {vec_ids.dtype} {vec_ids.shape}, expected int64 ({count},)")
    if vectors.shape != (count, dim) or vectors.dtype != np.float32:
        raise IndexStoreError(
            f"{where}: vectors.npy is {vectors.dtype} {vectors.shape}, expected float32 ({count}, {dim})"
        )
    faiss_ids = faiss.vector_to_array(index.id_map)
    if not np.array_equal(np.sort(faiss_ids), np.sort(vec_ids)):
        raise IndexStoreError(f"{where}: ids in index.faiss and vector_ids.npy differ")
    labels, sources, models = [], [], []
    _verify(vdir, "ids.jsonl", sums, where)
    try:
        with open(vdir / "ids.jsonl", encoding="utf-8") as f:
            for row, line in enumerate(f):
                rec = json.loads(line)
                if row >= count or rec["id"] != int(vec_ids[row]):
                    raise IndexStoreError(f"{where}: ids.jsonl line {row + 1} does not match vector_ids.npy")
                labels.append(rec.get("label"))
                sources.append(rec.get("source"))
                models.append(rec.get("model"))  # absent in indexes written before it: None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IndexStoreError(f"{where}: ids.jsonl is corrupt ({one_line(e)})") from None
    if len(labels) != count:
        raise IndexStoreError(f"{where}: ids.jsonl has {len(labels)} records but meta.json says count {count}")
    if vec_ids.size and int(vec_ids.max()) >= meta["next_id"]:
        raise IndexStoreError(f"{where}: meta.json next_id {meta['next_id']} is not above the largest id")
    _verify(vdir, "meta.json", sums, where)
    if sums is None:
        _check_unit_rows(vectors, vec_ids, where, version)
        _warn_legacy(root, version)
    apply_search_params(index, meta.get("search_params") or {})
    return _State(index, meta, vectors, vec_ids, labels, sources, models)


class FaissGalleryIndex(GalleryIndex):
    """``faiss:DIR``: see the module docstring for the folder layout and its guarantees."""

    prefix = "faiss"

    def __init__(self, root: Path, version: str, state: _State):
        self.root, self.spec = root, f"faiss:{root}"
        self._version, self._state = version, state
        self.dim = int(state.meta["dim"])
        self._lock_fd: int | None = None
        self._closed = self._dirty = False
        self._current_key: tuple | None = None  # stat of CURRENT when the snapshot was taken

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def check_creatable(cls, location: str) -> None:
        root = Path(location)
        if (root / "CURRENT").exists():
            raise IndexStoreError(f"index {root} already exists: delete it first, or write to another location")
        if root.exists() and not root.is_dir():
            raise IndexStoreError(f"cannot create index {root}: it is a file, not a folder")
        if root.is_dir():
            foreign = [
                p.name
                for p in root.iterdir()
                if p.name != LOCK_NAME and not p.name.startswith(".") and not _VERSION_RE.match(p.name)
            ]
            if foreign:
                raise IndexStoreError(f"cannot create index {root}: folder is not empty ({foreign[0]}, ...)")

    @classmethod
    def check_factory(cls, dim: int, factory: str, n: int | None = None) -> None:
        make_index(dim, factory)
        if n is not None:
            training_need(dim, factory, n)

    @staticmethod
    def _load_current(root: Path) -> tuple[str, _State, tuple | None]:
        """(version, state, stat key of CURRENT) of the newest committed version."""
        for _ in range(3):  # a writer may replace CURRENT and delete old versions while we read
            key = _current_key(root)  # before reading: a later commit then shows as a new key
            version = _read_current(root)
            if version is None:
                raise IndexStoreError(f"{root} is not an hvs index (no CURRENT file)")
            try:
                return version, _load_version(root, version), key
            except IndexStoreError:
                if _read_current(root) == version:
                    raise
        raise IndexStoreError(f"index {root} kept changing while being opened; try again")

    @classmethod
    def open(cls, location: str) -> FaissGalleryIndex:
        root = Path(location)
        if not root.is_dir():
            raise IndexStoreError(
                f"no index at {root} (missing folder); build one first (hvs index build --out faiss:{root})"
            )
        version, state, key = cls._load_current(root)
        self = cls(root, version, state)
        self._current_key = key
        return self

    # -- snapshots ----------------------------------------------------------------------------------
    def stale(self) -> bool:
        if self._closed or self._lock_fd is not None:  # a lock holder's snapshot is the newest
            return False
        key = _current_key(self.root)
        if key is None or key == self._current_key:
            return False
        if _read_current(self.root) == self._version:  # touched, same version
            self._current_key = key
            return False
        return True

    def refresh(self) -> bool:
        if not self.stale():
            return False
        version, state, key = self._load_current(self.root)
        if int(state.meta["dim"]) != self.dim:
            raise IndexStoreError(
                f"index {self.root} was replaced by one of dim {state.meta['dim']} "
                f"(this one has dim {self.dim}); reopen it"
            )
        self._version, self._state, self._current_key = version, state, key
        return True

    def default_uploads_dir(self) -> Path:
        return self.root / "uploads"  # travels with the index folder

    @classmethod
    def create(
        cls, location: str, dim: int, factory: str = "Flat", meta: dict | None = None, initial=None
    ) -> FaissGalleryIndex:
        root = Path(location)
        cls.check_creatable(location)
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise IndexStoreError(f"creating an index needs dim, a positive integer, got {dim!r}")
        dim = int(dim)
        index = make_index(dim, factory)
        user = dict(meta or {})
        search_params = user.pop("search_params", None)
        search_params = default_search_params(index) if search_params is None else dict(search_params)
        apply_search_params(index, search_params)
        stamp = now_iso()
        sidecar = merge_user_meta(
            {
                "format": FORMAT,
                "backend": "faiss",
                "dim": dim,
                "metric": METRIC,
                "normalised": True,
                "factory": factory,
                "count": 0,
                "next_id": 0,
                "created": stamp,
                "updated": stamp,
                "hvs_version": hvs_version(),
                "search_params": search_params,
            },
            user,
        )
        root.mkdir(parents=True, exist_ok=True)
        state = _State(index, sidecar, np.zeros((0, dim), np.float32), np.zeros(0, np.int64), [], [])
        self = cls(root, "", state)
        try:
            self._acquire_lock()
            cls.check_creatable(location)  # again, now that we hold the lock
            if initial is None:
                self._commit(state)
            else:
                self.add(*initial)  # (vectors, ids, labels, sources[, model])
        except BaseException:
            self.close()
            raise
        return self

    # -- locking ----------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IndexStoreError(f"index {self.root} is locked by another writer (pid {holder})") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _begin_write(self) -> None:
        self._check_open()
        self._acquire_lock()
        current = _read_current(self.root)
        if current is not None and current != self._version:
            # Another writer committed since we opened: start from its version, not our snapshot.
            self._version, self._state = current, _load_version(self.root, current)

    # -- committing ---------------------------------------------------------------------------------
    def _commit(self, state: _State) -> None:
        """Write ``state`` as a new version and make it current (lock held)."""
        number = int(self._version[1:]) + 1 if self._version else 1
        version = f"v{number:06d}"
        state.meta["count"] = int(state.index.ntotal)
        state.meta["updated"] = now_iso()
        tmp = self.root / f".tmp-{version}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # Order is irrelevant for safety (nothing is visible before CURRENT moves); meta last
        # keeps a half-written temp folder obviously incomplete to a human looking at it.
        _write_faiss(tmp / "index.faiss", state.index)
        _write_npy(tmp / "vectors.npy", np.ascontiguousarray(state.vectors, dtype=np.float32))
        _write_npy(tmp / "vector_ids.npy", state.vec_ids)
        _write_idmap(tmp / "ids.jsonl", state.vec_ids, state.labels, state.sources, state.models)
        _write_json(tmp / "meta.json", state.meta)
        _write_checksums(tmp)
        _fsync_path(tmp)
        final = self.root / version
        if final.exists():  # debris of a writer that crashed after its rename; CURRENT never named it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(self.root)
        _write_current(self.root, version)
        self._current_key = None  # our own commit: the next stale() re-reads CURRENT once
        # Map the vectors back from disk: a writer holds no second in-RAM copy of the gallery.
        state.vectors = np.load(final / "vectors.npy", mmap_mode="r", allow_pickle=False)
        previous, self._version, self._state = self._version, version, state
        self._collect_garbage(keep={version, previous})

    def _collect_garbage(self, keep: set[str]) -> None:
        for p in self.root.iterdir():
            if (p.name.startswith(".tmp-") or _VERSION_RE.match(p.name)) and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".CURRENT.") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    def _mutate(self, fn) -> object:
        """Run a write: if it fails after touching the FAISS index, reload the committed version,
        so memory always matches disk (validation errors raised earlier skip the reload)."""
        self._begin_write()
        self._dirty = False
        try:
            return fn()
        except BaseException:
            if self._dirty and self._version:
                self._state = _load_version(self.root, self._version)
            raise

    # -- the interface ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(self._state.meta, default=str))

    def __len__(self) -> int:
        return int(self._state.index.ntotal)

    def add(self, embeddings, ids=None, labels=None, sources=None, model=None) -> np.ndarray:
        self._check_open()
        x = as_matrix(embeddings, self.dim, "embeddings")
        n = x.shape[0]
        labels, sources = as_texts(labels, n, "labels"), as_texts(sources, n, "sources")
        model = check_model(model)
        given = None if ids is None else as_ids(ids, n)
        if given is not None:
            check_new_ids(given)

        def run() -> np.ndarray:
            s = self._state
            new = given if given is not None else np.arange(s.meta["next_id"], s.meta["next_id"] + n, dtype=np.int64)
            if n == 0:
                return new
            clash = new[np.isin(new, s.vec_ids)]
            if clash.size:
                raise IndexStoreError(
                    f"id {int(clash[0])} is already in index {self.root} ({clash.size} duplicate(s)); remove it first"
                )
            item_model = model if model is not None else default_model(s.meta)
            self._dirty = True
            train_if_needed(s.index, x, s.meta["factory"])
            s.index.add_with_ids(x, new)
            meta = dict(s.meta, next_id=max(int(s.meta["next_id"]), int(new.max()) + 1))
            self._commit(
                _State(
                    s.index,
                    meta,
                    np.concatenate([s.vectors, x]),
                    np.concatenate([s.vec_ids, new]),
                    s.labels + labels,
                    s.sources + sources,
                    s.models + [item_model] * n,
                )
            )
            return new

        return self._mutate(run)

    def remove(self, ids) -> int:
        self._check_open()
        drop = as_ids(ids, what="ids")

        def run() -> int:
            s = self._state
            gone = np.isin(s.vec_ids, drop)
            n = int(gone.sum())
            if n == 0:
                return 0
            keep = ~gone
            vectors = np.ascontiguousarray(s.vectors[keep])
            self._dirty = True
            try:
                removed = s.index.remove_ids(s.vec_ids[gone])
                index = s.index
                if removed != n:
                    raise IndexStoreError(f"FAISS removed {removed} of {n} ids from {self.root}")
            except RuntimeError:  # HNSW (and some others) cannot remove: rebuild from kept vectors
                index = self._fresh_index(vectors)
                index.add_with_ids(vectors, s.vec_ids[keep])
            kept = keep.tolist()
            labels = [v for v, k in zip(s.labels, kept) if k]
            sources = [v for v, k in zip(s.sources, kept) if k]
            models = [v for v, k in zip(s.models, kept) if k]
            self._commit(_State(index, dict(s.meta), vectors, s.vec_ids[keep], labels, sources, models))
            return n

        return self._mutate(run)

    def replace(self, ids, embeddings, model) -> int:
        self._check_open()
        want = as_ids(ids, what="ids")
        x = as_matrix(embeddings, self.dim, "embeddings")
        if x.shape[0] != want.shape[0]:
            raise IndexStoreError(f"{x.shape[0]} embeddings but {want.shape[0]} ids")
        check_new_ids(want)
        model = check_model(model)

        def run() -> int:
            s = self._state
            rows = s.row_of()
            missing = [i for i in want.tolist() if i not in rows]
            if missing:
                raise IndexStoreError(
                    f"cannot replace id {missing[0]}: not in index {self.root} ({len(missing)} unknown id(s))"
                )
            if not len(want):
                return 0
            at = np.asarray([rows[i] for i in want.tolist()], dtype=np.int64)
            vectors = np.array(s.vectors, dtype=np.float32)
            vectors[at] = x
            models = list(s.models)
            for r in at.tolist():
                models[r] = model
            self._dirty = True
            index = s.index
            try:
                if index.remove_ids(want) != len(want):
                    raise RuntimeError("partial removal")
                index.add_with_ids(x, want)
            except RuntimeError:  # HNSW cannot remove: rebuild from the kept vectors
                index = self._fresh_index(vectors)
                index.add_with_ids(vectors, s.vec_ids)
            self._commit(_State(index, dict(s.meta), vectors, s.vec_ids, s.labels, s.sources, models))
            return len(want)

        return self._mutate(run)

    def model_counts(self) -> dict:
        self._check_open()
        counts: dict = {}
        for m in self._state.models:
            counts[m] = counts.get(m, 0) + 1
        return counts

    def ids(self, exclude_model=None) -> np.ndarray:
        self._check_open()
        s = self._state
        if exclude_model is None:
            return np.sort(s.vec_ids)
        keep = np.fromiter((m != exclude_model for m in s.models), dtype=bool, count=len(s.models))
        return np.sort(s.vec_ids[keep])

    def update_meta(self, patch) -> dict:
        self._check_open()
        patch = check_meta_patch(patch)

        def run() -> dict:
            s = self._state
            self._commit(_State(s.index, dict(s.meta, **patch), s.vectors, s.vec_ids, s.labels, s.sources, s.models))
            return self.meta

        return self._mutate(run)

    def compact(self) -> dict:
        """Nothing to fold in this layout: every write already rewrote the whole version."""
        self._check_open()
        return {"compacted": False, "reason": "no pending writes", "count": len(self)}

    def _fresh_index(self, vectors: np.ndarray):
        """An empty index of the sidecar's factory, trained on ``vectors`` if it needs training."""
        meta = self._state.meta
        index = make_index(self.dim, meta["factory"])
        if len(vectors):
            train_if_needed(index, vectors, meta["factory"])
        apply_search_params(index, meta.get("search_params") or {})
        return index

    def rebuild(self, factory: str | None = None) -> None:
        """Re-create the FAISS index from the kept vectors, retraining it (after a gallery has
        grown well past what an IVF/PQ index was trained on), optionally with a new factory."""
        self._check_open()

        def run() -> None:
            s = self._state
            self._dirty = True
            new_factory = factory or s.meta["factory"]
            index = make_index(self.dim, new_factory)
            vectors = np.ascontiguousarray(s.vectors, dtype=np.float32)
            if len(vectors):
                train_if_needed(index, vectors, new_factory)
            params = s.meta.get("search_params") if new_factory == s.meta["factory"] else None
            params = default_search_params(index) if params is None else params
            apply_search_params(index, params)
            index.add_with_ids(vectors, s.vec_ids)
            meta = dict(s.meta, factory=new_factory, search_params=params)
            self._commit(_State(index, meta, vectors, s.vec_ids, s.labels, s.sources, s.models))

        self._mutate(run)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._state.index.search(queries, k)
        missing = ids < 0
        if missing.any():  # FAISS pads inner-product results with -FLT_MAX; make it -inf
            scores[missing] = -np.inf
        return scores, ids

    def records(self, ids, *, skip_missing: bool = False) -> list[dict]:
        self._check_open()
        want = as_ids(ids, what="ids")
        s = self._state
        rows = s.row_of()
        if skip_missing:
            want = np.asarray([i for i in want.tolist() if i in rows], dtype=np.int64)
        missing = [i for i in want.tolist() if i not in rows]
        if missing:
            raise IndexStoreError(f"{len(missing)} id(s) not in index {self.root}, e.g. {missing[0]}")
        return [
            {"id": i, "label": s.labels[rows[i]], "source": s.sources[rows[i]], "model": s.models[rows[i]]}
            for i in want.tolist()
        ]

    def referenced(self, sources) -> set[str]:
        return set(sources) & set(self._state.sources)

    def vectors(self, ids) -> np.ndarray:
        """The stored (normalised) vectors of these ids, (n, dim) float32."""
        s = self._state
        rows = s.row_of()
        want = as_ids(ids, what="ids").tolist()
        missing = [i for i in want if i not in rows]
        if missing:
            raise IndexStoreError(f"{len(missing)} id(s) not in index {self.root}, e.g. {missing[0]}")
        return np.asarray(s.vectors[[rows[i] for i in want]], dtype=np.float32)

    def info(self) -> dict:
        out = super().info()
        out.update(version=self._version, writer=self._lock_fd is not None)
        return out

    def release_writer(self) -> None:
        """Give the writer lock back (the next write takes it again and reloads a newer commit):
        for long-lived writers such as the search service, so other writers are not locked out."""
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def close(self) -> None:
        self.release_writer()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise IndexStoreError(f"index {self.root} is closed")

    def __del__(self) -> None:
        try:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
        except Exception:
            pass
