"""Data mode ``cache``: a file source decoded once into a memory-mapped ``uint8`` file.

Decoding JPEGs is most of what reading a large file source costs; a model trained for many
epochs, or several models of one size, can pay it once. :func:`cached_store` turns an
:class:`~hvs.data.store.ImageStore` (the listing of a source) into a :class:`CachedStore` over
``CACHE_DIR/<source>-<C>x<S>px-<key>/``:

* ``images.u8``: the decoded images, (N, C, S, S) ``uint8`` in listing order, memory-mapped
  (read by the page cache: resident memory stays what the batches touch);
* ``chunks/NNNNN.json``: the SHA-256 of chunk ``NNNNN`` (about 64 MiB of images), written
  atomically after the chunk's bytes are flushed to disk: its presence marks the chunk done, so
  a build that is killed resumes at the first missing chunk;
* ``cache.json``: written last, when every chunk is done: the key, shape and chunk checksums.

The key is the SHA-256 of what the pixels depend on: image size and channels, and the listing
(paths, crop boxes, JPEG draft sizes, and the bytes of every file, hashed when the source was
listed): a second run, or a second model of the same input size, finds the same folder; a changed
file or another size makes another. Every chunk is checked against its checksum when the cache is
opened (SHA-256 runs at about 1 GB/s per core, in threads); a damaged chunk is decoded again from
the files, with one warning line, never used.

``CACHE_DIR`` is ``cache_dir``, else ``$HVS_CACHE``, else ``~/.cache/hvs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write_json, remove_stale_temps
from .base import DataError, data_warning
from .store import ImageStore

CACHE_ENV = "HVS_CACHE"
CHUNK_BYTES = 64 << 20
FORMAT = "hvs-image-cache/1"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$HVS_CACHE``, else ``~/.cache/hvs``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hvs"


def listing_key(store: ImageStore) -> str:
    """SHA-256 of everything the decoded pixels of ``store`` depend on."""
    h = hashlib.sha256(f"{FORMAT} {store.channels}x{store.size}".encode())
    rows = store._index
    for arr in (store._paths[rows], store._boxes[rows], store._draft[rows]):
        h.update(np.ascontiguousarray(arr).tobytes())
    if store._digests is None:
        raise DataError("a cache needs an image store with file digests (made by list_images)")
    h.update(np.ascontiguousarray(store._digests[rows]).tobytes())
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] or "data"


class CachedStore(ImageStore):
    """An :class:`ImageStore` whose pixels are read from a memory-mapped cache file."""

    exact_stats = True  # reading every image is cheap: channel statistics over all of them

    def _open(self) -> np.ndarray:
        mm = self.__dict__.get("_mm")
        if mm is None:  # opened per process (a spawned worker gets the path, not the mapping)
            mm = np.memmap(self._file, dtype=np.uint8, mode="r", shape=self._pool_shape)
            self.__dict__["_mm"] = mm
        return mm

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_mm"}

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        mm = self._open()
        if len(rows) and np.all(np.diff(rows) == 1):  # a run: one slice, no fancy-index copy
            return torch.from_numpy(np.array(mm[rows[0] : rows[-1] + 1]))
        return torch.from_numpy(mm[rows])


def cached_store(
    store: ImageStore, name: str, *, cache_dir: str | os.PathLike | None = None, strict: bool = False
) -> CachedStore:
    """The cache of ``store`` (built now where missing or unfinished, resumably; see the module
    docstring), as a :class:`CachedStore` with the same items, digests and workers."""
    key = listing_key(store)
    folder = cache_root(cache_dir) / f"{_slug(name)}-{store.channels}x{store.size}px-{key[:16]}"
    n = len(store)
    item = store.channels * store.size * store.size
    chunk = max(1, CHUNK_BYTES // max(1, item))
    n_chunks = (n + chunk - 1) // chunk
    try:
        (folder / "chunks").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{name}: cannot create the image cache {folder} ({err})") from None
    remove_stale_temps(folder / "chunks")
    remove_stale_temps(folder)
    file = folder / "images.u8"
    meta = folder / "cache.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("key") != key or info.get("shape") != [n, store.channels, store.size, store.size]:
            raise DataError(f"{name}: the image cache {folder} belongs to other data; delete it to rebuild")
    size = n * item
    if not file.exists() or file.stat().st_size != size:
        if file.exists():  # a size we did not write: nothing in it can be trusted
            for marker in (folder / "chunks").glob("*.json"):
                marker.unlink()
            meta.unlink(missing_ok=True)
        with open(file, "wb") as f:
            f.truncate(size)
    mm = np.memmap(file, dtype=np.uint8, mode="r+", shape=(n, store.channels, store.size, store.size)) if n else None
    bounds = [(i * chunk, min(n, (i + 1) * chunk)) for i in range(n_chunks)]
    done = _verified_chunks(folder, mm, bounds, name)
    todo = [i for i in range(n_chunks) if i not in done]
    if todo:
        _build_chunks(store, mm, folder, bounds, todo, name)
    if todo or not meta.is_file():
        sums = [json.loads((folder / "chunks" / f"{i:05d}.json").read_text())["sha256"] for i in range(n_chunks)]
        atomic_write_json(
            meta,
            {
                "format": FORMAT,
                "key": key,
                "source": name,
                "shape": [n, store.channels, store.size, store.size],
                "chunk": chunk,
                "chunks": sums,
            },
        )
    del mm
    out = object.__new__(CachedStore)
    out.__dict__.update(store.__dict__)
    out._file = str(file)
    out._pool_shape = (n, store.channels, store.size, store.size)
    # the cache file is in listing order of this view: remap its rows to 0..n-1
    rows = store._index
    out._paths, out._boxes, out._draft = store._paths[rows], store._boxes[rows], store._draft[rows]
    out._names = None if store._names is None else store._names[store._index]
    out._digests = None if store._digests is None else store._digests[store._index]
    out._index = np.arange(n, dtype=np.int64)
    out.__dict__.pop("_mm", None)
    return out


def _sha(mm: np.ndarray, start: int, stop: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(mm[start:stop])).cast("B")).hexdigest()


def _verified_chunks(folder: Path, mm, bounds: list[tuple[int, int]], name: str) -> set[int]:
    """Chunks whose marker exists and whose bytes still match it; damaged ones lose their marker."""
    marked = []
    for i in range(len(bounds)):
        path = folder / "chunks" / f"{i:05d}.json"
        if path.is_file():
            try:
                marked.append((i, json.loads(path.read_text())["sha256"]))
            except (ValueError, KeyError):
                path.unlink()
    if not marked:
        return set()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        actual = list(pool.map(lambda m: _sha(mm, *bounds[m[0]]), marked))
    bad = [i for (i, want), got in zip(marked, actual) if want != got]
    if bad:
        data_warning(
            f"{name}: image cache {folder}: {len(bad)} damaged chunk(s) (checksum mismatch, e.g. "
            f"chunk {bad[0]}) are decoded again from the files"
        )
        for i in bad:
            (folder / "chunks" / f"{i:05d}.json").unlink()
        (folder / "cache.json").unlink(missing_ok=True)
    return {i for i, _ in marked} - set(bad)


class _Hooks:
    """Test seam: called after each chunk is sealed (a test raises here to simulate a kill)."""

    after_chunk = staticmethod(lambda i: None)


hooks = _Hooks()


def _build_chunks(store: ImageStore, mm, folder: Path, bounds, todo: list[int], name: str) -> None:
    from .images import decode_progress

    total = sum(bounds[i][1] - bounds[i][0] for i in todo)
    sub = 256
    with decode_progress(total, f"cache {name}") as bar:
        for i in todo:
            start, stop = bounds[i]
            pieces = [range(s, min(stop, s + sub)) for s in range(start, stop, sub)]
            for piece, x in zip(pieces, store.batches(pieces)):
                mm[piece.start : piece.stop] = x.numpy()
                bar.update(len(piece))
            mm.flush()  # msync: the bytes are on disk before the marker says so
            atomic_write_json(folder / "chunks" / f"{i:05d}.json", {"sha256": _sha(mm, start, stop)})
            hooks.after_chunk(i)
