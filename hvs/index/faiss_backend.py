"""``faiss:DIR`` — a gallery index kept in a folder, searched in-process with FAISS.

Layout: an immutable *base version* plus an append-only *write-ahead log* beside it::

    DIR/
      CURRENT            "v000007": the base version readers open (replaced with os.replace)
      writer.lock        fcntl.flock'ed by the one writer; holds its pid for the error message
      v000007/
        index.faiss      faiss.write_index of an IndexIDMap2 around the factory index
        meta.json        the base sidecar (dim, metric "ip", normalised, factory, count, next_id,
                         the table of gallery-model fingerprints, ...)
        ids.jsonl        one {"id", "label", "source", "model"} per item, in row order (by id)
        offsets.npy      int64 byte offset of each line of ids.jsonl (+ the end): records by row
        models.npy       int32 row -> index into meta.json "models" (the item's gallery model)
        vectors.npy      the L2-normalised float32 vectors, (count, dim), memory-mapped
        vector_ids.npy   their int64 ids, (count,), ascending
        trained.faiss    the trained, empty index (IVF/PQ factories only): what compaction fills
        checksums.json   size and SHA-256 of each file above, written last; verified at open
        wal.log          the writes since this base: add, remove, replace, meta records
      v000006/           the previous base, kept so a reader that has just read CURRENT can
                         still open it; older ones are deleted by the next compaction

Why these choices:

* **Writes cost what they write.** ``add``/``remove``/``replace``/``update_meta`` append one
  record to ``wal.log`` and fsync it: O(k) bytes for k items, whatever the gallery size. A
  record is ``magic, payload length, sequence number, crc32`` then the payload (a JSON header
  and the raw float32 vectors), so a torn or corrupt record is detected. In memory the log is a
  *delta*: added vectors in an exact (flat) FAISS index beside the base, removed base ids as
  tombstones. A search asks the base for ``k + tombstones`` neighbours, drops the tombstoned,
  merges with the delta's top-k by score. ``compact()`` (automatic once the log holds more than
  ``compact_ratio`` of the base, or ``hvs index compact``) folds both into a new base version.
* **Durability.** A write returns once its record is fsync'ed (the folder too when the log file
  is created); the in-memory snapshot is updated after that, under a short exclusive lock, so a
  concurrent search sees the state before or after the write, never half of it. A log tail that
  fails its length or checksum (a write killed mid-way: never acknowledged) is dropped with a
  warning at open, never served, and cut off by the next writer; a bad record *followed by good
  ones* is damage to acknowledged writes and refuses to open with a one-line error.
* **IndexIDMap2** maps FAISS' internal row numbers to our stable int64 ids. Every factory index
  (``"Flat"``, ``"HNSW32"``, ``"IVF64,Flat"``, ``"IVF16,PQ8"``, ...) is wrapped in one, with
  METRIC_INNER_PRODUCT: on L2-normalised vectors that is cosine similarity. The base is never
  modified in place (removal is a tombstone until compaction), so HNSW, which cannot remove, needs
  no special case, and the base can be memory-mapped.
* **The raw vectors are kept** (``vectors.npy``, memory-mapped: no RAM until read) because
  compaction rebuilds the FAISS index and PQ codes are lossy; ``rebuild()`` retrains from them,
  and the search param ``rerank`` (``meta={"search_params": {"nprobe": 32, "rerank": 8}}`` at
  creation) re-scores ``rerank * k`` compressed candidates with them, exactly. Compaction of a
  trained IVF base with no removals keeps its inverted lists and encodes only the log's vectors;
  otherwise it re-adds every vector to the trained (empty) index kept in ``trained.faiss``.
* **Past RAM.** ``mmap=True`` at creation (sidecar ``"mmap": true``, or ``open_index(spec,
  mmap=True)``) opens ``index.faiss`` memory-mapped read-only (FAISS ``IO_FLAG_MMAP`` for IVF
  inverted lists, ``IO_FLAG_MMAP_IFC`` for flat codes), and item records are read by offset from
  ``ids.jsonl``, so resident memory is the id map plus what searches touch. With a compressed
  factory (``IVF4096,PQ16``) compaction adds vectors in chunks; raw vectors are streamed.
* **Atomic compaction.** The new base is written into ``DIR/.tmp-*``, fsync'ed, renamed to
  ``vNNNNNN`` and only then ``CURRENT`` replaced. A kill at any point leaves ``CURRENT`` naming a
  complete base whose log holds every acknowledged write; the debris is removed next time.
* **Checksums.** Every base records the SHA-256 of each file in ``checksums.json``, verified at
  open (a base written before checksums existed opens with a warning after a value check).
* **One writer, any number of readers.** A writer takes an ``fcntl.flock`` on ``writer.lock`` at
  its first write and keeps it until ``close()``/``release_writer()``; a second writer waits for
  it up to ``$HVS_INDEX_LOCK_WAIT`` seconds (default 5) and then gets "index DIR is locked by
  another writer (pid N)" (:class:`~hvs.index.base.IndexLockedError`). In one process, writes through one
  handle are serialised by a mutex. Readers never lock: ``stale()`` (two ``stat`` calls) says
  whether another process appended to the log or compacted; ``refresh()`` reads just the new log
  records, or the new base after a compaction. A writer catches up the same way when it takes
  the lock, so it never overwrites another writer's commit.
* **Older formats.** A ``hvs-faiss-index/1`` base (no log, no model per item) opens as is: its
  items have ``model`` None, and the first compaction writes the current format.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import HVSWarning
from .base import (
    GalleryIndex,
    IndexLockedError,
    IndexStoreError,
    RWLock,
    as_ids,
    as_matrix,
    as_texts,
    check_known_model,
    check_meta,
    check_meta_patch,
    check_model,
    check_new_ids,
    default_model,
    new_sidecar,
    now_iso,
    one_line,
    sha256_file,
)
from .base import fsync_path as _fsync_path

FORMAT = "hvs-faiss-index/2"
FORMAT_V1 = "hvs-faiss-index/1"  # no log, no model per item: still opened
FILES_V1 = ("index.faiss", "meta.json", "ids.jsonl", "vectors.npy", "vector_ids.npy")
FILES = (*FILES_V1, "offsets.npy", "models.npy")
TRAINED = "trained.faiss"  # present when the factory needs training and the base is trained
CHECKSUMS = "checksums.json"  # {"algorithm": "sha256", "files": {name: hex}}; absent in versions before it
WAL_NAME = "wal.log"
WAL_MAGIC = b"HVSWAL/1"  # + the 8-byte base version name: the 16-byte header of wal.log
WAL_HEADER = 16
REC = struct.Struct("<4sIQI")  # record magic, payload bytes, sequence number, crc32(seq + payload)
REC_MAGIC = b"hvsR"
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored (L2-normalised float32) vector
LOCK_NAME = "writer.lock"
# sidecar keys whose dict value a meta record merges into (not replaces): the gallery-model registry
MERGED_META = ("gallery_models",)
_VERSION_RE = re.compile(r"^v\d{6}$")
FACTORY_EXAMPLES = "Flat, HNSW32, IVF64,Flat, IVF16,PQ8"
CHUNK_ROWS = 65536  # rows per step when compaction streams vectors (bounded memory)
COMPACT_RATIO = 0.25  # auto-compact once the log holds more items than this share of the base...
COMPACT_MIN = 4096  # ... and more than this many (small galleries are cheap to search flat)
TRAIN_SAMPLE = 256  # training points per centroid / code passed to FAISS (its own cap)


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
        elif key == "rerank":  # hvs' own: re-score rerank * k candidates with the raw vectors
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise IndexStoreError(f"search param rerank must be an integer from 1 to 1000, got {value!r}")
        else:
            raise IndexStoreError(f"unknown FAISS search param {key!r}; known: nprobe, efSearch, rerank")


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


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_records(path: Path, chunks: Iterator[bytes]) -> None:
    """ids.jsonl from already-encoded lines (one or several per chunk)."""
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _record_line(i: int, label, source, model) -> bytes:
    rec = {"id": int(i), "label": label, "source": source, "model": model}
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def _write_checksums(vdir: Path, names: Sequence[str]) -> None:
    """Record size and SHA-256 of every file of a version (read back from disk: what was written)."""
    _write_json(
        vdir / CHECKSUMS,
        {
            "algorithm": "sha256",
            "files": {
                name: {"sha256": sha256_file(vdir / name), "bytes": (vdir / name).stat().st_size} for name in names
            },
        },
    )


def _read_checksums(vdir: Path, where: str, required: Sequence[str]) -> dict | None:
    """``{name: {"sha256", "bytes"}}`` of a version, or None for a version written before them."""
    path = vdir / CHECKSUMS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        sums = record["files"]
        if record.get("algorithm") != "sha256" or not all(
            isinstance(sums[name]["sha256"], str) and isinstance(sums[name]["bytes"], int) for name in required
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
    if name not in sums:
        raise IndexStoreError(f"{where}: {vdir.name}/{name} is not listed in {CHECKSUMS} (file from elsewhere?)")
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
    for start in range(0, len(vectors), CHUNK_ROWS):  # chunked: vectors.npy is memory-mapped
        norms = np.linalg.norm(np.asarray(vectors[start : start + CHUNK_ROWS], dtype=np.float64), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1.0) <= UNIT_TOLERANCE))  # NaN compares False
        if bad.size:
            row = start + int(bad[0])
            raise IndexStoreError(
                f"{where}: {version}/vectors.npy row {row} (id {int(vec_ids[row])}) is not a "
                f"finite unit vector (norm {norms[bad[0]]:.4g}): the file is corrupt"
            )


_WARNED: set[tuple[str, ...]] = set()
_WARNED_LEGACY = _WARNED  # the name tests clear


def _warn_once(key: tuple[str, ...], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, HVSWarning, stacklevel=4)


def _warn_legacy(root: Path, version: str) -> None:
    _warn_once(
        (str(root), version),
        f"index {root} {version} has no {CHECKSUMS} (written by an older hvs): its files are "
        "value-checked only; the next compaction records checksums",
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
# The write-ahead log.
def _wal_header(version: str) -> bytes:
    return WAL_MAGIC + version.encode("ascii").ljust(8)


def _encode_record(seq: int, op: dict, vectors: np.ndarray | None) -> bytes:
    head = json.dumps(op, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    body = struct.pack("<I", len(head)) + head
    if vectors is not None:
        body += np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    crc = zlib.crc32(struct.pack("<Q", seq) + body)
    return REC.pack(REC_MAGIC, len(body), seq, crc) + body


def _append_wal(path: Path, data: bytes) -> None:
    """Append one encoded record and fsync it (creating the log, and fsync'ing its folder, if new).

    A write that fails (a short write, a failed fsync) is not acknowledged, so it must not land
    later either: the log is cut back to where it was and fsync'ed before the error is raised."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.fstat(fd).st_size
    try:
        if created:
            os.write(fd, _wal_header(path.parent.name))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            pass  # the torn tail is detected (length / crc) and cut off at the next open or write
        raise
    finally:
        os.close(fd)
    if created:
        _fsync_path(path.parent)


class _WalTail:
    """Records parsed from a log, where the good part ends, and what (if anything) followed it."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict, np.ndarray | None]] = []
        self.end = WAL_HEADER  # byte offset just past the last good record
        self.size = WAL_HEADER  # bytes in the file when read
        self.torn = 0  # bytes after ``end`` that are not a complete, valid record


def _parse_record(data: bytes, pos: int, dim: int, seq: int) -> tuple[int, dict, np.ndarray | None] | None:
    """The record at ``pos`` if it is complete and valid with sequence number ``seq``, else None."""
    if len(data) - pos < REC.size:
        return None
    magic, length, got_seq, crc = REC.unpack_from(data, pos)
    start, stop = pos + REC.size, pos + REC.size + length
    if magic != REC_MAGIC or got_seq != seq or stop > len(data) or length < 4:
        return None
    body = data[start:stop]
    if zlib.crc32(struct.pack("<Q", seq) + body) != crc:
        return None
    (head_len,) = struct.unpack_from("<I", body, 0)
    try:
        op = json.loads(body[4 : 4 + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    raw = body[4 + head_len :]
    vectors = None
    if raw:
        if len(raw) % (4 * dim):
            return None
        vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dim).astype(np.float32)
    return stop, op, vectors


def _read_wal(path: Path, version: str, dim: int, offset: int, seq: int, where: str) -> _WalTail:
    """Parse the log from byte ``offset`` (just past record ``seq``). A bad record is a torn tail
    when nothing valid follows it; otherwise the log is corrupt (acknowledged writes damaged)."""
    tail = _WalTail()
    tail.end = offset
    try:
        with open(path, "rb") as f:
            if offset <= WAL_HEADER:
                header = f.read(WAL_HEADER)
                if len(header) < WAL_HEADER:  # killed while creating the log: nothing was in it
                    tail.end, tail.size, tail.torn = 0, len(header), len(header)
                    return tail
                if header != _wal_header(version):
                    raise IndexStoreError(
                        f"{where}: {version}/{WAL_NAME} does not start with the header of a log of "
                        f"{version} (file from elsewhere or corrupt)"
                    )
                offset = tail.end = WAL_HEADER
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        tail.size = tail.end = offset if offset > WAL_HEADER else 0
        return tail
    tail.size = offset + len(data)
    pos = 0
    while pos < len(data):
        got = _parse_record(data, pos, dim, seq + 1)
        if got is None:
            break
        pos, op, vectors = got
        seq += 1
        tail.records.append((seq, op, vectors))
    tail.end = offset + pos
    rest = len(data) - pos
    if rest:
        # Anything valid further on means this bad record is not the tail a kill leaves behind.
        probe = data.find(REC_MAGIC, pos + 1)
        while 0 <= probe <= len(data) - REC.size:
            later_seq = REC.unpack_from(data, probe)[2]
            if later_seq > seq and _parse_record(data, probe, dim, later_seq) is not None:
                raise IndexStoreError(
                    f"{where}: {version}/{WAL_NAME} is corrupt at byte {offset + pos} (record {seq + 1}) "
                    "with valid records after it: acknowledged writes are damaged; restore the folder "
                    "from a backup"
                )
            probe = data.find(REC_MAGIC, probe + 1)
        tail.torn = rest
    return tail


# ----------------------------------------------------------------------------------------------
# The base version: immutable once committed.
class _Records:
    """Label, source and gallery model of each base row: read by byte offset from ids.jsonl
    (memory-mapped) or, for a version written before offsets.npy, parsed into lists at open."""

    def __init__(self, path: Path | None, offsets: np.ndarray | None, lists: tuple[list, list] | None):
        self._path, self._offsets, self._lists = path, offsets, lists
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def _mapped(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                with open(self._path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._map

    def spans(self) -> bool:
        """True when lines can be copied by byte range (format 2), False for in-memory lists."""
        return self._lists is None

    def offsets(self) -> np.ndarray:
        return self._offsets

    def span(self, first: int, last: int) -> bytes:
        """The ids.jsonl lines of rows first..last, as stored."""
        return bytes(self._mapped()[int(self._offsets[first]) : int(self._offsets[last + 1])])

    def line(self, row: int, item_id: int, model) -> bytes:
        """ids.jsonl line of a row, as compaction copies it into the next base."""
        if self._lists is not None:
            return _record_line(item_id, self._lists[0][row], self._lists[1][row], model)
        return bytes(self._mapped()[int(self._offsets[row]) : int(self._offsets[row + 1])])

    def get(self, row: int) -> tuple:
        if self._lists is not None:
            return self._lists[0][row], self._lists[1][row]
        try:
            rec = json.loads(self.line(row, 0, None))
            return rec.get("label"), rec.get("source")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError):
            raise IndexStoreError(
                f"{self._path} is corrupt at line {row + 1} (changed on disk after it was verified)"
            ) from None

    def rows_with_source(self, source: str) -> Iterator[int]:
        """Rows whose source is ``source``: a byte search of the mapped ids.jsonl (no parsing)."""
        if self._lists is not None:
            yield from (r for r, s in enumerate(self._lists[1]) if s == source)
            return
        if len(self._offsets) < 2:
            return
        needle = ('"source": ' + json.dumps(source, ensure_ascii=False) + ",").encode("utf-8")
        data, pos = self._mapped(), 0
        while (pos := data.find(needle, pos)) >= 0:
            row = int(np.searchsorted(self._offsets, pos, side="right")) - 1
            label_source = self.get(row)
            if label_source[1] == source:
                yield row
            pos += len(needle)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass


class _Base:
    """One committed base version: the FAISS index, raw vectors, ids and per-row records."""

    def __init__(self, version: str, index, meta: dict, vectors, vec_ids, records: _Records, codes, models: list):
        self.version, self.index, self.meta = version, index, meta
        self.vectors, self.vec_ids, self.records = vectors, vec_ids, records
        self.codes, self.models = codes, models  # row -> models[code]
        self.count = len(vec_ids)
        if self.count < 2 or bool(np.all(vec_ids[1:] > vec_ids[:-1])):
            self._sorted, self._order = np.asarray(vec_ids), None
        else:  # bases of format 1 keep insertion order
            self._order = np.argsort(vec_ids, kind="stable")
            self._sorted = np.asarray(vec_ids)[self._order]

    @classmethod
    def empty(cls, dim: int, meta: dict, index) -> _Base:
        return cls(
            "",
            index,
            meta,
            np.zeros((0, dim), np.float32),
            np.zeros(0, np.int64),
            _Records(None, None, ([], [])),
            np.zeros(0, np.int32),
            [],
        )

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the base does not hold it."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.count:
            return np.full(ids.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, ids), self.count - 1)
        found = self._sorted[pos] == ids
        rows = pos if self._order is None else self._order[pos]
        return np.where(found, rows, -1).astype(np.int64)

    def model(self, row: int):
        return self.models[int(self.codes[row])]

    def trained(self) -> bool:
        return bool(self.index.is_trained)


class _Delta:
    """What the log adds to a base: new rows in an exact flat index, tombstones on base rows,
    sidecar changes. Changed only under the handle's exclusive lock."""

    def __init__(self, base: _Base, dim: int):
        self.index = _faiss().IndexFlatIP(dim)
        self.ids = np.zeros(0, np.int64)  # row -> item id (capacity grows by doubling)
        self.alive = np.zeros(0, bool)
        self.m = 0  # rows used
        self.labels: list = []
        self.sources: list = []
        self.models: list = []
        self.live: dict[int, int] = {}  # item id -> delta row
        self.dead = 0  # delta rows removed or replaced since
        self.base_dead = np.zeros(base.count, bool)
        self.tombstones = 0
        self.patch: dict = {}
        self.next_id = int(base.meta["next_id"])
        self.seq = 0  # last log record applied
        self.offset = WAL_HEADER  # bytes of the log consumed
        self.records = 0  # log records applied

    def pending(self) -> int:
        return self.m + self.tombstones + self.records

    def _grow(self, n: int) -> None:
        if self.m + n > len(self.ids):
            cap = max(64, 2 * len(self.ids), self.m + n)
            ids, alive = np.zeros(cap, np.int64), np.zeros(cap, bool)
            ids[: self.m], alive[: self.m] = self.ids[: self.m], self.alive[: self.m]
            self.ids, self.alive = ids, alive

    def kill(self, base: _Base, item_ids: list[int]) -> int:
        n = 0
        base_rows = base.rows(np.asarray(item_ids, dtype=np.int64))
        for i, row in zip(item_ids, base_rows.tolist()):
            if i in self.live:
                r = self.live.pop(i)
                self.alive[r] = False
                self.dead += 1
                n += 1
            elif row >= 0 and not self.base_dead[row]:
                self.base_dead[row] = True
                self.tombstones += 1
                n += 1
        return n

    def put(self, item_ids: list[int], vectors: np.ndarray, labels: list, sources: list, model) -> None:
        n = len(item_ids)
        self._grow(n)
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.ids[self.m : self.m + n] = item_ids
        self.alive[self.m : self.m + n] = True
        for j, i in enumerate(item_ids):
            self.live[i] = self.m + j
        self.m += n
        self.labels += labels
        self.sources += sources
        self.models += [model] * n
        if n:
            self.next_id = max(self.next_id, max(item_ids) + 1)

    def apply(self, base: _Base, op: dict, vectors: np.ndarray | None) -> None:
        kind = op["op"]
        if kind == "add":
            self.put(op["ids"], vectors, op["labels"], op["sources"], op.get("model"))
        elif kind == "remove":
            self.kill(base, op["ids"])
        elif kind == "replace":
            self.kill(base, op["ids"])
            self.put(op["ids"], vectors, op["labels"], op["sources"], op.get("model"))
        elif kind == "meta":
            for key, value in op["patch"].items():
                if key in MERGED_META and isinstance(value, dict):  # entries add up: two writers
                    current = self.patch.get(key, base.meta.get(key))  # registering two models keep both
                    value = {**current, **value} if isinstance(current, dict) else value
                self.patch[key] = value
        else:
            raise IndexStoreError(f"log record of unknown kind {kind!r} (written by a newer hvs?)")
        self.next_id = max(self.next_id, int(op.get("next_id", 0)))
        self.records += 1

    def vectors(self) -> np.ndarray:
        """(m, dim) view of the delta's flat index storage."""
        faiss = _faiss()
        if not self.m:
            return np.zeros((0, self.index.d), np.float32)
        return faiss.rev_swig_ptr(self.index.get_xb(), self.m * self.index.d).reshape(self.m, self.index.d)


def _read_index(path: Path, mmap_mode: bool, ivf: bool):
    """faiss.read_index, memory-mapped read-only with ``mmap_mode``: IVF inverted lists with
    IO_FLAG_MMAP, flat codes (Flat, HNSW storage, PQ) with IO_FLAG_MMAP_IFC."""
    faiss = _faiss()
    if not mmap_mode:
        return faiss.read_index(str(path))
    flag = faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC
    return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)


def _is_ivf(dim: int, factory: str) -> bool:
    try:
        _faiss().extract_index_ivf(make_index(dim, factory))
        return True
    except (RuntimeError, IndexStoreError):
        return False


def _load_base(root: Path, version: str, mmap_mode: bool | None = None) -> _Base:
    faiss = _faiss()
    vdir = root / version
    where = f"index {root}"
    if not vdir.is_dir():
        raise IndexStoreError(f"{where}: CURRENT names {version} but that folder is missing")
    for name in FILES_V1:
        if not (vdir / name).is_file():
            raise IndexStoreError(f"{where} is incomplete: {version}/{name} is missing")
    try:
        meta = json.loads((vdir / "meta.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexStoreError(f"{where}: meta.json is not valid JSON ({one_line(e)})") from None
    check_meta(meta, where)
    fmt = meta.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        raise IndexStoreError(
            f"{where}: meta.json format {fmt!r} is not {FORMAT!r} (nor {FORMAT_V1!r}): written by a newer hvs?"
        )
    v2 = fmt == FORMAT
    if v2:
        for name in FILES[len(FILES_V1) :]:
            if not (vdir / name).is_file():
                raise IndexStoreError(f"{where} is incomplete: {version}/{name} is missing")
    # Each binary file is verified before it is parsed (a damaged one is named, never mis-read);
    # meta.json last, so an edited sidecar gets the more precise consistency message below.
    sums = _read_checksums(vdir, where, FILES if v2 else FILES_V1)
    dim, count = meta["dim"], meta["count"]
    use_mmap = bool(meta.get("mmap")) if mmap_mode is None else bool(mmap_mode)
    _verify(vdir, "index.faiss", sums, where)
    try:
        index = _read_index(vdir / "index.faiss", use_mmap, use_mmap and _is_ivf(dim, meta["factory"]))
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
    _verify(vdir, "ids.jsonl", sums, where)
    if v2:
        records, codes, models = _load_records_v2(vdir, meta, vec_ids, sums, where)
    else:
        records, codes, models = _load_records_v1(vdir, count, vec_ids, where)
    if vec_ids.size and int(vec_ids.max()) >= meta["next_id"]:
        raise IndexStoreError(f"{where}: meta.json next_id {meta['next_id']} is not above the largest id")
    _verify(vdir, "meta.json", sums, where)
    if sums is None:
        _check_unit_rows(vectors, vec_ids, where, version)
        _warn_legacy(root, version)
    elif TRAINED in sums:
        _verify(vdir, TRAINED, sums, where)
    apply_search_params(index, meta.get("search_params") or {})
    return _Base(version, index, meta, vectors, vec_ids, records, codes, models)


def _load_records_v1(vdir: Path, count: int, vec_ids: np.ndarray, where: str):
    labels, sources, fingerprints = [], [], []
    try:
        with open(vdir / "ids.jsonl", encoding="utf-8") as f:
            for row, line in enumerate(f):
                rec = json.loads(line)
                if row >= count or rec["id"] != int(vec_ids[row]):
                    raise IndexStoreError(f"{where}: ids.jsonl line {row + 1} does not match vector_ids.npy")
                labels.append(rec.get("label"))
                sources.append(rec.get("source"))
                fingerprints.append(rec.get("model"))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IndexStoreError(f"{where}: ids.jsonl is corrupt ({one_line(e)})") from None
    if len(labels) != count:
        raise IndexStoreError(f"{where}: ids.jsonl has {len(labels)} records but meta.json says count {count}")
    models = list(dict.fromkeys(fingerprints)) or [None]
    code_of = {m: c for c, m in enumerate(models)}
    codes = np.asarray([code_of[m] for m in fingerprints], dtype=np.int32)
    return _Records(None, None, (labels, sources)), codes, models


def _load_records_v2(vdir: Path, meta: dict, vec_ids: np.ndarray, sums: dict | None, where: str):
    count = meta["count"]
    _verify(vdir, "offsets.npy", sums, where)
    _verify(vdir, "models.npy", sums, where)
    try:
        offsets = np.load(vdir / "offsets.npy", mmap_mode="r", allow_pickle=False)
        codes = np.load(vdir / "models.npy", mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise IndexStoreError(f"{where}: offsets.npy/models.npy unreadable ({one_line(e)})") from None
    models = meta.get("models")
    size = (vdir / "ids.jsonl").stat().st_size
    if offsets.shape != (count + 1,) or offsets.dtype != np.int64 or int(offsets[0]) != 0 or int(offsets[-1]) != size:
        raise IndexStoreError(f"{where}: offsets.npy does not index the {count} lines of ids.jsonl")
    if not isinstance(models, list) or codes.shape != (count,) or codes.dtype != np.int32:
        raise IndexStoreError(f"{where}: models.npy / meta.json models do not describe {count} items")
    if count and (int(codes.min()) < 0 or int(codes.max()) >= len(models)):
        raise IndexStoreError(f"{where}: models.npy refers to a model meta.json does not list")
    records = _Records(vdir / "ids.jsonl", offsets, None)
    for row in {0, count - 1} if count else ():  # the ends must line up with vector_ids.npy
        try:
            rec = json.loads(records.line(row, 0, None))
            ok = rec["id"] == int(vec_ids[row])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise IndexStoreError(f"{where}: ids.jsonl is corrupt (line {row + 1} does not match vector_ids.npy)")
    return records, codes, models


# ----------------------------------------------------------------------------------------------
LOCK_WAIT_ENV = "HVS_INDEX_LOCK_WAIT"
DEFAULT_LOCK_WAIT_S = 5.0


def lock_wait() -> float:
    """Seconds a writer waits for another writer's lock (``$HVS_INDEX_LOCK_WAIT``, default 5; 0: fail at once)."""
    raw = os.environ.get(LOCK_WAIT_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LOCK_WAIT_S
    except ValueError:
        raise IndexStoreError(f"{LOCK_WAIT_ENV}={raw!r} is not a number of seconds") from None


class FaissGalleryIndex(GalleryIndex):
    """``faiss:DIR``: see the module docstring for the folder layout and its guarantees."""

    prefix = "faiss"
    compact_ratio = COMPACT_RATIO  # per handle: auto-compaction threshold (pending / base items)
    compact_min = COMPACT_MIN
    auto_compact = True  # False: only compact() folds the log (a service may run it in a thread)

    def __init__(self, root: Path, base: _Base, mmap_mode: bool | None = None):
        self.root, self.spec = root, f"faiss:{root}"
        self.dim = int(base.meta["dim"])
        self._mmap = mmap_mode
        self._base, self._delta = base, _Delta(base, self.dim)
        self._lock_fd: int | None = None
        self._closed = False
        self._current_key: tuple | None = None  # stat of CURRENT when the snapshot was taken
        self._wal_seen = WAL_HEADER  # size of the log when last read
        self._rw = RWLock()  # snapshot: searches share it, applying a durable write takes it
        self._writing = threading.RLock()  # writers of this handle, one at a time

    @property
    def _version(self) -> str:
        return self._base.version

    def _wal_path(self, base: _Base | None = None) -> Path:
        return self.root / (base or self._base).version / WAL_NAME

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
    def _load_current(root: Path, mmap_mode: bool | None) -> tuple[_Base, _Delta, _WalTail, tuple | None]:
        """The newest committed base with its log replayed, and the stat key of CURRENT."""
        for _ in range(3):  # a compaction may replace CURRENT and delete old versions while we read
            key = _current_key(root)  # before reading: a later commit then shows as a new key
            version = _read_current(root)
            if version is None:
                raise IndexStoreError(f"{root} is not an hvs index (no CURRENT file)")
            try:
                base = _load_base(root, version, mmap_mode)
                delta = _Delta(base, int(base.meta["dim"]))
                tail = _read_wal(root / version / WAL_NAME, version, delta.index.d, WAL_HEADER, 0, f"index {root}")
                for _, op, vectors in tail.records:
                    delta.apply(base, op, vectors)
                delta.seq, delta.offset = len(tail.records), max(tail.end, WAL_HEADER)
                return base, delta, tail, key
            except (IndexStoreError, FileNotFoundError):
                if _read_current(root) == version:
                    raise
        raise IndexStoreError(f"index {root} kept changing while being opened; try again")

    @classmethod
    def open(cls, location: str, mmap: bool | None = None) -> FaissGalleryIndex:
        root = Path(location)
        if not root.is_dir():
            raise IndexStoreError(
                f"no index at {root} (missing folder); build one first (hvs index build --out faiss:{root})"
            )
        base, delta, tail, key = cls._load_current(root, mmap)
        if tail.torn:
            _warn_once(
                (str(root), base.version, "torn", str(tail.end)),
                f"index {root}: {base.version}/{WAL_NAME} ends in {tail.torn} byte(s) that are not a "
                "complete record (a write killed before it was acknowledged, or one still being written): "
                "ignored",
            )
        self = cls(root, base, mmap)
        self._delta, self._current_key, self._wal_seen = delta, key, tail.size
        return self

    # -- snapshots ----------------------------------------------------------------------------------
    def _wal_size(self) -> int | None:
        try:
            return os.stat(self._wal_path()).st_size
        except FileNotFoundError:
            return None

    def stale(self) -> bool:
        if self._closed or self._lock_fd is not None:  # a lock holder's snapshot is the newest
            return False
        key = _current_key(self.root)
        if key is not None and key != self._current_key:
            if _read_current(self.root) != self._version:
                return True
            self._current_key = key  # touched, same version
        size = self._wal_size()
        return size is not None and size != self._wal_seen

    def refresh(self) -> bool:
        # A write or compaction running in this handle brings the snapshot up to date itself:
        # do not queue a request behind it.
        if not self._writing.acquire(blocking=False):
            return False
        try:
            return self.stale() and self._catch_up()
        finally:
            self._writing.release()

    def _catch_up(self) -> bool:
        """Load what other processes committed since this snapshot: new log records, or a new
        base after a compaction. Applied under the exclusive lock (a search sees before or after)."""
        current = _read_current(self.root)
        if current is not None and current != self._version:
            base, delta, tail, key = self._load_current(self.root, self._mmap)
            if int(base.meta["dim"]) != self.dim:
                raise IndexStoreError(
                    f"index {self.root} was replaced by one of dim {base.meta['dim']} "
                    f"(this one has dim {self.dim}); reopen it"
                )
            with self._rw.write():
                old, self._base, self._delta = self._base, base, delta
                self._current_key, self._wal_seen = key, tail.size
            old.records.close()
            return True
        d = self._delta
        tail = _read_wal(self._wal_path(), self._version, self.dim, d.offset, d.seq, f"index {self.root}")
        if tail.records:
            with self._rw.write():
                for seq, op, vectors in tail.records:
                    d.apply(self._base, op, vectors)
                    d.seq = seq
                d.offset = tail.end
        self._wal_seen = tail.size
        return bool(tail.records)

    def default_uploads_dir(self) -> Path:
        return self.root / "uploads"  # travels with the index folder

    # -- creating -----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, location: str, dim: int, factory: str = "Flat", meta: dict | None = None, initial=None, mmap=None
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
        mmap_mode = bool(user.pop("mmap", False) if mmap is None else mmap)
        user.pop("mmap", None)
        apply_search_params(index, search_params)
        sidecar = new_sidecar(
            FORMAT, "faiss", dim, factory, user, search_params=search_params, mmap=mmap_mode, models=[]
        )
        self = cls(root, _Base.empty(dim, sidecar, index), mmap_mode)
        # The first version is a compaction of an in-memory delta holding the initial items.
        if initial is not None:
            vectors, ids, labels, sources = initial[:4]
            model = initial[4] if len(initial) > 4 else None
            x = as_matrix(vectors, dim, "embeddings")
            n = x.shape[0]
            labels, sources = as_texts(labels, n, "labels"), as_texts(sources, n, "sources")
            new = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n)
            check_new_ids(new)
            model = check_model(model) if model is not None else default_model(sidecar)
            if n:
                training_need(dim, factory, n)
            self._delta.put(new.tolist(), x, labels, sources, model)
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._acquire_lock()
            cls.check_creatable(location)  # again, now that we hold the lock
            self._compact_locked()
        except BaseException:
            self.close()
            raise
        return self

    # -- locking ----------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        """The writer lock; a lock held by another writer is waited for up to ``lock_wait()`` seconds
        (writers in several processes are serialised), then :class:`IndexLockedError`."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + lock_wait()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise IndexLockedError(f"index {self.root} is locked by another writer (pid {holder})") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _begin_write(self) -> None:
        """Take the writer lock, load what others committed, cut off a torn log tail."""
        self._check_open()
        self._acquire_lock()
        self._catch_up()
        size, path = self._wal_size(), self._wal_path()
        if size is None:
            return
        if size < WAL_HEADER:  # killed while creating the log: it held nothing
            path.unlink()
            _fsync_path(path.parent)
        elif size > self._delta.offset:
            _warn_once(
                (str(self.root), self._version, "cut", str(self._delta.offset)),
                f"index {self.root}: cut {size - self._delta.offset} byte(s) of an unacknowledged write "
                f"off the end of {self._version}/{WAL_NAME}",
            )
            with open(path, "r+b") as f:
                f.truncate(self._delta.offset)
                f.flush()
                os.fsync(f.fileno())
        self._wal_seen = self._delta.offset

    def _log(self, op: dict, vectors: np.ndarray | None = None) -> None:
        """Make one write durable (append + fsync), then apply it to the in-memory snapshot."""
        d = self._delta
        op["next_id"] = max(d.next_id, int(op.get("next_id", 0)))
        data = _encode_record(d.seq + 1, op, vectors)
        _append_wal(self._wal_path(), data)
        with self._rw.write():
            d.apply(self._base, op, vectors)
            d.seq += 1
            d.offset += len(data)
        self._wal_seen = d.offset

    def _after_write(self) -> None:
        if self.auto_compact and self.needs_compaction():
            try:
                with self._writing:
                    self._begin_write()
                    if self.needs_compaction():  # another thread may have compacted meanwhile
                        self._compact_locked()
            except (IndexStoreError, OSError) as e:  # the write itself is durable: say so, go on
                _warn_once(
                    (str(self.root), "auto-compact", str(e)),
                    f"index {self.root}: automatic compaction failed ({one_line(e)}); writes go on in the log",
                )

    def needs_compaction(self) -> bool:
        d = self._delta
        if not self._base.trained():
            return d.m - d.dead >= self._train_need()  # train as soon as there is enough
        return d.pending() > max(self.compact_min, self.compact_ratio * self._base.count)

    def _train_need(self) -> int:
        index = make_index(self.dim, self._base.meta["factory"])
        return 0 if index.is_trained else min_train_size(index)

    # -- the interface ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        with self._rw.read():
            return json.loads(json.dumps(self._meta_now(), default=str))

    def _meta_now(self) -> dict:
        b, d = self._base, self._delta
        meta = dict(b.meta, **d.patch)
        meta["count"] = b.count - d.tombstones + len(d.live)
        meta["next_id"] = d.next_id
        meta.pop("models", None)  # the base's table of fingerprints: see model_counts()
        meta.pop("trained", None)
        meta.setdefault("mmap", False)
        if self._mmap is not None:
            meta["mmap"] = self._mmap
        return meta

    def __len__(self) -> int:
        d = self._delta
        return self._base.count - d.tombstones + len(d.live)

    def _live_rows(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(base row or -1, delta row or -1) of each id, over live items only."""
        b, d = self._base, self._delta
        base_rows = b.rows(want)
        if base_rows.size:
            dead = base_rows >= 0
            dead[dead] = d.base_dead[base_rows[dead]]
            base_rows[dead] = -1
        delta_rows = np.asarray([d.live.get(i, -1) for i in want.tolist()], dtype=np.int64)
        return base_rows, delta_rows

    def add(self, embeddings, ids=None, labels=None, sources=None, model=None) -> np.ndarray:
        self._check_open()
        x = as_matrix(embeddings, self.dim, "embeddings")
        n = x.shape[0]
        labels, sources = as_texts(labels, n, "labels"), as_texts(sources, n, "sources")
        model = check_model(model)
        given = None if ids is None else as_ids(ids, n)
        if given is not None:
            check_new_ids(given)
        with self._writing:
            self._begin_write()
            d = self._delta
            new = given if given is not None else np.arange(d.next_id, d.next_id + n, dtype=np.int64)
            if n == 0:
                return new
            base_rows, delta_rows = self._live_rows(new)
            clash = new[(base_rows >= 0) | (delta_rows >= 0)]
            if clash.size:
                raise IndexStoreError(
                    f"id {int(clash[0])} is already in index {self.root} ({clash.size} duplicate(s)); remove it first"
                )
            if not self._base.trained():
                need, have = self._train_need(), len(self)
                if have + n < need:
                    factory = self._base.meta["factory"]
                    raise IndexStoreError(
                        f"FAISS factory {factory!r} needs at least {need} vectors to train, got "
                        f"{have + n}: add at least {need} in the first write, or use 'Flat'"
                    )
            meta = self._meta_now()
            item_model = model if model is not None else default_model(meta)
            check_known_model(meta, item_model, self.root)
            op = {"op": "add", "ids": new.tolist(), "labels": labels, "sources": sources, "model": item_model}
            self._log(op, x)
        self._after_write()
        return new

    def remove(self, ids) -> int:
        self._check_open()
        drop = np.unique(as_ids(ids, what="ids"))
        with self._writing:
            self._begin_write()
            base_rows, delta_rows = self._live_rows(drop)
            present = drop[(base_rows >= 0) | (delta_rows >= 0)]
            if not present.size:
                return 0
            self._log({"op": "remove", "ids": present.tolist()})
        self._after_write()
        return int(present.size)

    def replace(self, ids, embeddings, model) -> int:
        self._check_open()
        want = as_ids(ids, what="ids")
        x = as_matrix(embeddings, self.dim, "embeddings")
        if x.shape[0] != want.shape[0]:
            raise IndexStoreError(f"{x.shape[0]} embeddings but {want.shape[0]} ids")
        check_new_ids(want)
        model = check_model(model)
        with self._writing:
            self._begin_write()
            base_rows, delta_rows = self._live_rows(want)
            missing = want[(base_rows < 0) & (delta_rows < 0)]
            if missing.size:
                raise IndexStoreError(
                    f"cannot replace id {int(missing[0])}: not in index {self.root} ({missing.size} unknown id(s))"
                )
            if not len(want):
                return 0
            check_known_model(self._meta_now(), model, self.root)
            labels, sources = [], []
            d = self._delta
            for br, dr in zip(base_rows.tolist(), delta_rows.tolist()):
                label, source = (d.labels[dr], d.sources[dr]) if dr >= 0 else self._base.records.get(br)
                labels.append(label)
                sources.append(source)
            op = {"op": "replace", "ids": want.tolist(), "labels": labels, "sources": sources, "model": model}
            self._log(op, x)
        self._after_write()
        return len(want)

    def update_meta(self, patch) -> dict:
        self._check_open()
        patch = check_meta_patch(patch)
        with self._writing:
            self._begin_write()
            self._log({"op": "meta", "patch": patch})
        self._after_write()
        return self.meta

    def model_counts(self) -> dict:
        self._check_open()
        with self._rw.read():
            b, d = self._base, self._delta
            counts: dict = {}
            if b.count:
                alive = ~d.base_dead if d.tombstones else slice(None)
                per_code = np.bincount(np.asarray(b.codes)[alive], minlength=len(b.models))
                counts = {b.models[c]: int(k) for c, k in enumerate(per_code.tolist()) if k}
            for r in d.live.values():
                m = d.models[r]
                counts[m] = counts.get(m, 0) + 1
            return counts

    def ids(self, exclude_model=None) -> np.ndarray:
        self._check_open()
        with self._rw.read():
            b, d = self._base, self._delta
            keep = ~d.base_dead
            if exclude_model is not None and b.count:
                codes = [c for c, m in enumerate(b.models) if m == exclude_model]
                keep &= ~np.isin(np.asarray(b.codes), codes)
            out = [np.asarray(b.vec_ids)[keep]]
            out.append(
                np.asarray(
                    [i for i, r in d.live.items() if exclude_model is None or d.models[r] != exclude_model],
                    dtype=np.int64,
                )
            )
            return np.sort(np.concatenate(out))

    def snapshot(self):
        return self._rw.read()

    def search(self, queries, k):
        with self._rw.read():  # one snapshot for the count and the search
            return super().search(queries, k)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        b, d = self._base, self._delta
        parts_s, parts_i = [], []
        rerank = 1
        if b.count:
            rerank = int((b.meta.get("search_params") or {}).get("rerank", 1))
            kb = min(b.count, k * rerank + d.tombstones)
            s, i = b.index.search(queries, kb)
            if d.tombstones or rerank > 1:
                rows = b.rows(i)
                hit = rows >= 0
                if d.tombstones:
                    hit[hit] = ~d.base_dead[rows[hit]]
                    i[~hit] = -1
                if rerank > 1:  # exact scores from the (memory-mapped) raw vectors
                    flat = rows[hit]
                    order = np.argsort(flat, kind="stable")  # ascending rows: a sequential read
                    exact = np.empty(len(flat), np.float32)
                    exact[order] = np.einsum(
                        "ij,ij->i",
                        np.asarray(b.vectors[flat[order]], np.float32),
                        np.repeat(queries, hit.sum(1), 0)[order],
                    )
                    s = np.full(i.shape, -np.inf, np.float32)
                    s[hit] = exact
            parts_s.append(s)
            parts_i.append(i)
        if d.m:
            kd = min(d.m, k + d.dead)
            s, r = d.index.search(queries, kd)
            ok = r >= 0
            i = np.full(r.shape, -1, np.int64)
            i[ok] = d.ids[r[ok]]
            ok[ok] = d.alive[r[ok]]
            i[~ok] = -1
            parts_s.append(s)
            parts_i.append(i)
        scores, ids = np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1)
        scores[ids < 0] = -np.inf  # FAISS pads inner-product results with -FLT_MAX
        if len(parts_s) > 1 or d.tombstones or d.dead or (b.count and rerank > 1):
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        scores, ids = scores[:, :k], ids[:, :k]
        if ids.shape[1] < k:  # fewer candidates than asked (cannot happen unless ntotal < count)
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores[ids < 0] = -np.inf
        return scores, ids

    def records(self, ids, *, skip_missing: bool = False) -> list[dict]:
        self._check_open()
        want = as_ids(ids, what="ids")
        with self._rw.read():
            b, d = self._base, self._delta
            base_rows, delta_rows = self._live_rows(want)
            present = (base_rows >= 0) | (delta_rows >= 0)
            if not skip_missing and not present.all():
                missing = want[~present]
                raise IndexStoreError(f"{missing.size} id(s) not in index {self.root}, e.g. {int(missing[0])}")
            out = []
            for i, br, dr in zip(want.tolist(), base_rows.tolist(), delta_rows.tolist()):
                if dr >= 0:
                    out.append({"id": i, "label": d.labels[dr], "source": d.sources[dr], "model": d.models[dr]})
                elif br >= 0:
                    label, source = b.records.get(br)
                    out.append({"id": i, "label": label, "source": source, "model": b.model(br)})
            return out

    def referenced(self, sources) -> set[str]:
        wanted = set(sources)
        with self._rw.read():
            b, d = self._base, self._delta
            found = {d.sources[r] for r in d.live.values()} & wanted
            for src in wanted - found:
                if src is not None and any(not d.base_dead[r] for r in b.records.rows_with_source(src)):
                    found.add(src)
            return found

    def vectors(self, ids) -> np.ndarray:
        """The stored (normalised) vectors of these ids, (n, dim) float32."""
        want = as_ids(ids, what="ids")
        with self._rw.read():
            base_rows, delta_rows = self._live_rows(want)
            missing = want[(base_rows < 0) & (delta_rows < 0)]
            if missing.size:
                raise IndexStoreError(f"{missing.size} id(s) not in index {self.root}, e.g. {int(missing[0])}")
            out = np.zeros((len(want), self.dim), np.float32)
            dv = self._delta.vectors()
            for j, (br, dr) in enumerate(zip(base_rows.tolist(), delta_rows.tolist())):
                out[j] = dv[dr] if dr >= 0 else self._base.vectors[br]
            return out

    # -- compaction ---------------------------------------------------------------------------------
    def compact(self) -> dict:
        """Fold the log (new rows, tombstones, sidecar changes) into a new base version, atomically."""
        self._check_open()
        with self._writing:
            self._begin_write()
            d = self._delta
            if not d.pending():
                return {"compacted": False, "reason": "no pending writes", "count": len(self), "version": self._version}
            if not self._base.trained() and len(self) < self._train_need():
                need = self._train_need()
                raise IndexStoreError(
                    f"cannot compact index {self.root}: FAISS factory {self._base.meta['factory']!r} needs "
                    f"at least {need} vectors to train, the index holds {len(self)}"
                )
            return self._compact_locked()

    def rebuild(self, factory: str | None = None) -> None:
        """Re-create the FAISS index from the kept vectors, retraining it (after a gallery has
        grown well past what an IVF/PQ index was trained on), optionally with a new factory."""
        self._check_open()
        with self._writing:
            self._begin_write()
            if factory is not None:
                make_index(self.dim, factory)
            self._compact_locked(factory=factory or self._base.meta["factory"], retrain=True)

    def _compact_locked(self, factory: str | None = None, retrain: bool = False) -> dict:
        """Write base + log as a new base version and make it current (writer lock held)."""
        faiss = _faiss()
        b, d = self._base, self._delta
        folded = {"log_records": d.records, "tombstones": d.tombstones, "added_rows": d.m}
        meta = dict(b.meta, **d.patch)
        old_factory = meta["factory"]
        factory = factory or old_factory
        # Live items in id order: (id, 0 = base / 1 = delta, row).
        base_rows = np.flatnonzero(~d.base_dead) if b.count else np.zeros(0, np.int64)
        delta_rows = np.flatnonzero(d.alive[: d.m])
        all_ids = np.concatenate([np.asarray(b.vec_ids)[base_rows], d.ids[delta_rows]])
        from_delta = np.concatenate([np.zeros(len(base_rows), bool), np.ones(len(delta_rows), bool)])
        rows = np.concatenate([base_rows, delta_rows]).astype(np.int64)
        order = np.argsort(all_ids, kind="stable")
        all_ids, from_delta, rows = all_ids[order], from_delta[order], rows[order]
        n = len(all_ids)
        number = int(b.version[1:]) + 1 if b.version else 1
        version = f"v{number:06d}"
        tmp = self.root / f".tmp-{version}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        dv = d.vectors()

        def chunks() -> Iterator[tuple[slice, np.ndarray]]:
            for start in range(0, n, CHUNK_ROWS):
                sl = slice(start, min(n, start + CHUNK_ROWS))
                out = np.empty((sl.stop - start, self.dim), np.float32)
                fd, r = from_delta[sl], rows[sl]
                if (~fd).any():
                    out[~fd] = b.vectors[r[~fd]]  # ascending rows in a base of this format: a sequential read
                if fd.any():
                    out[fd] = dv[r[fd]]
                yield sl, out

        # Raw vectors, streamed into a memory-mapped file.
        vec_path = tmp / "vectors.npy"
        out = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float32, shape=(n, self.dim))
        for sl, block in chunks():
            out[sl] = block
        out.flush()
        del out
        fd = os.open(vec_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        vectors = np.load(vec_path, mmap_mode="r", allow_pickle=False)
        _write_npy(tmp / "vector_ids.npy", all_ids)
        # Records and the gallery model of each item, vectorised over base rows: a compaction
        # spends its time in numpy, FAISS and file I/O (which release the GIL), not in a Python
        # loop over the gallery that would stall the searches of other threads.
        table = list(b.models)
        code_of = {m: c for c, m in enumerate(table)}
        for m in d.models:
            if m not in code_of:
                code_of[m] = len(table)
                table.append(m)
        in_base = ~from_delta
        codes = np.empty(n, np.int32)
        codes[in_base] = np.asarray(b.codes)[rows[in_base]]
        codes[from_delta] = [code_of[d.models[r]] for r in rows[from_delta].tolist()]
        used, codes = np.unique(codes, return_inverse=True)
        codes = codes.astype(np.int32).reshape(n)
        models = [table[c] for c in used.tolist()]
        delta_lines = {
            r: _record_line(int(d.ids[r]), d.labels[r], d.sources[r], d.models[r]) for r in rows[from_delta].tolist()
        }
        lengths = np.zeros(n, np.int64)
        lengths[from_delta] = [len(delta_lines[r]) for r in rows[from_delta].tolist()]
        if b.records.spans():
            lengths[in_base] = np.diff(np.asarray(b.records.offsets()))[rows[in_base]]
            # runs of consecutive base rows are copied as one byte range each
            starts = np.ones(n, bool)
            starts[1:] = from_delta[1:] | from_delta[:-1] | (rows[1:] != rows[:-1] + 1)
            bounds = np.append(np.flatnonzero(starts), n).tolist()

            def chunks_of_lines() -> Iterator[bytes]:
                for s0, e0 in zip(bounds[:-1], bounds[1:]):
                    if from_delta[s0]:
                        yield delta_lines[int(rows[s0])]
                    else:
                        yield b.records.span(int(rows[s0]), int(rows[e0 - 1]))

        else:  # a base of format 1: its records are in lists
            legacy = [
                delta_lines[r] if fdl else b.records.line(r, i, b.model(r))
                for i, fdl, r in zip(all_ids.tolist(), from_delta.tolist(), rows.tolist())
            ]
            lengths[:] = [len(line) for line in legacy]

            def chunks_of_lines() -> Iterator[bytes]:
                yield from legacy

        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
        _write_records(tmp / "ids.jsonl", chunks_of_lines())
        _write_npy(tmp / "offsets.npy", offsets)
        _write_npy(tmp / "models.npy", codes)
        # The FAISS index: fresh for factories that need no training, else the trained template.
        names = list(FILES)
        index = make_index(self.dim, factory)
        incremental = False
        if not index.is_trained:
            template = b.meta.get("trained") and (self.root / b.version / TRAINED)
            if not retrain and factory == old_factory and template and template.is_file():
                if b.count and not d.tombstones and _is_ivf(self.dim, factory):
                    # Inverted lists of a trained IVF index take additions in place: keep the
                    # base's codes and encode only the log's vectors. Not with removals:
                    # IndexIDMap2.remove_ids renumbers its id map, which IVF lists (unlike Flat)
                    # do not follow, so ids would shift; then everything is re-added below.
                    index = faiss.read_index(str(self.root / b.version / "index.faiss"))
                    incremental = True
                    _write_faiss(tmp / TRAINED, faiss.read_index(str(template)))
                else:
                    index = faiss.read_index(str(template))
            elif n:
                train_if_needed(index, _train_sample(vectors, min_train_size(index)), factory)
            if index.is_trained and not incremental:
                _write_faiss(tmp / TRAINED, index)
            if index.is_trained:
                names.append(TRAINED)
        params = meta.get("search_params") if factory == old_factory else None
        params = default_search_params(index) if params is None else params
        apply_search_params(index, params)
        if incremental:
            if len(delta_rows):
                index.add_with_ids(np.ascontiguousarray(dv[delta_rows]), d.ids[delta_rows])
        elif n:
            for sl, block in chunks():
                index.add_with_ids(block, all_ids[sl])
        if index.ntotal != n:
            raise IndexStoreError(f"compaction of {self.root}: the new FAISS index holds {index.ntotal} of {n} items")
        _write_faiss(tmp / "index.faiss", index)
        meta.update(
            format=FORMAT,
            factory=factory,
            search_params=params,
            count=n,
            next_id=d.next_id,
            updated=now_iso(),
            models=models,
            trained=TRAINED in names,
        )
        if self._mmap is not None:
            meta["mmap"] = self._mmap
        _write_json(tmp / "meta.json", meta)
        _write_checksums(tmp, names)
        with open(tmp / WAL_NAME, "wb") as f:
            f.write(_wal_header(version))
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        final = self.root / version
        if final.exists():  # debris of a compaction killed after its rename; CURRENT never named it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(self.root)
        _write_current(self.root, version)
        self._current_key = None  # our own commit: the next stale() re-reads CURRENT once
        # The new snapshot maps its files back from disk: no second in-RAM copy of the gallery.
        use_mmap = bool(meta.get("mmap"))
        if use_mmap:
            index = _read_index(final / "index.faiss", True, _is_ivf(self.dim, factory))
            apply_search_params(index, params)
        records = _Records(final / "ids.jsonl", np.load(final / "offsets.npy", mmap_mode="r"), None)
        new_base = _Base(
            version,
            index,
            meta,
            np.load(final / "vectors.npy", mmap_mode="r", allow_pickle=False),
            np.load(final / "vector_ids.npy", allow_pickle=False),
            records,
            np.load(final / "models.npy", mmap_mode="r", allow_pickle=False),
            models,
        )
        with self._rw.write():
            old, self._base, self._delta = self._base, new_base, _Delta(new_base, self.dim)
            self._wal_seen = WAL_HEADER
        old.records.close()
        self._collect_garbage(keep={version, old.version})
        return {"compacted": True, "version": version, "count": n, **folded}

    def _collect_garbage(self, keep: set[str]) -> None:
        for p in self.root.iterdir():
            if (p.name.startswith(".tmp-") or _VERSION_RE.match(p.name)) and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".CURRENT.") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    # -- the rest ----------------------------------------------------------------------------------
    def info(self) -> dict:
        out = super().info()
        d = self._delta
        out.update(
            version=self._version,
            writer=self._lock_fd is not None,
            log={"records": d.records, "added_rows": d.m, "tombstones": d.tombstones, "bytes": d.offset},
        )
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


def _train_sample(vectors: np.ndarray, need: int) -> np.ndarray:
    """What FAISS trains on: every vector, or an evenly spaced sample of TRAIN_SAMPLE per
    centroid (FAISS' own cap) for a large gallery, read in one go (bounded memory)."""
    n = len(vectors)
    cap = max(need, TRAIN_SAMPLE * need)
    if n <= cap:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.linspace(0, n - 1, cap).astype(np.int64)
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)
