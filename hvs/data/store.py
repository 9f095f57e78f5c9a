"""Images on disk, decoded on demand: the streaming path of the file sources.

Every file source (``imagefolder:``, ``csv:``, ``deepfashion2:``) lists its items up front
(paths, labels, boxes, roles). Small sources are then decoded once into one ``uint8`` tensor
(the in-memory path: fastest when it fits); large ones keep the listing in an
:class:`ImageStore` and decode, crop and resize each image when it is asked for, in DataLoader
workers, so memory does not grow with the number of images. Which path a source takes is
``data_mode``:

* ``"memory"``: decode everything now. Refused before decoding, with the size it would take,
  when the decoded images would not fit in the memory available;
* ``"stream"``: an :class:`ImageStore` over the files;
* ``"cache"``: decode once into a memory-mapped ``uint8`` file at the training resolution
  (:mod:`hvs.data.cache`), reused by later runs and other models of the same size;
* ``"auto"`` (default): memory when the decoded images take at most
  :data:`AUTO_MEMORY_MAX_BYTES` (2 GiB: e.g. 14k images at 224 px, 170k at 64 px), else stream.

The environment variable ``HVS_DATA_MODE`` sets the default mode (what ``auto`` means when no
mode is passed).

An :class:`ImageStore` has the indexing surface of the ``uint8`` (N, C, H, W) tensor it stands
for: ``len``, ``.shape``, ``.dtype`` (``torch.uint8``), ``dim()``, and ``store[i]`` /
``store[a:b]`` / ``store[index_tensor]`` / ``store[bool_mask]`` return decoded tensors, exactly
the pixels the in-memory path holds (the same :func:`~hvs.data.images.open_image` +
:func:`~hvs.data.images.crop_resize`, with the same JPEG draft scale). :meth:`ImageStore.subset`
is the lazy view (nothing decoded), :meth:`ImageStore.batches` decodes a list of index batches
in ``workers`` DataLoader processes, in order, optionally applying a (picklable) transform to
each batch inside the worker.

Unreadable files are found when the items are listed, by :func:`probe_files`: the header is
parsed, JPEGs are decoded at 1/8 scale (the entropy decoder still reads every byte, so a
truncated file fails; several times cheaper than a full decode), PNGs are checked by Pillow's
``verify`` (every chunk's CRC), other formats are decoded; boxes are checked against the image
size. What fails is skipped and listed in ``RetrievalData.skipped`` exactly like the in-memory
path lists it (or raises with ``strict``). A file that passes the probe and still fails later
(changed on disk meanwhile) stops the run with a one-line :class:`~hvs.data.images.ImageError`
naming it. The probe runs on every load (in threads; about 1-2 ms per 224 px JPEG on the 2-core
test machine, so a 200k-file source takes a few minutes to list). It also hashes each file's
bytes: the leak checks (:mod:`hvs.data.checks`) of a streamed split compare file contents + crop
box instead of decoded pixels.

Per-channel mean/std of a streamed train split are exact for up to :data:`STATS_SAMPLE` images
(the same numbers as the in-memory path) and estimated from a seeded sample of that many
otherwise (exact again in data mode cache, where reading every image is cheap).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .base import DataError, is_store, take  # noqa: F401  (is_store, take re-exported)
from .images import _DECODE_ERRORS, BBox, ImageError, _reason, apply_draft, box_problem, crop_resize, open_image

DATA_MODES = ("auto", "memory", "stream", "cache")
DATA_MODE_ENV = "HVS_DATA_MODE"
AUTO_MEMORY_MAX_BYTES = 2 << 30
STATS_SAMPLE = 10_000
DEFAULT_WORKERS_MAX = 8


def check_data_mode(mode: str | None) -> str:
    """The mode asked for (``None``: ``$HVS_DATA_MODE`` or ``auto``), checked."""
    if mode is None:
        mode = os.environ.get(DATA_MODE_ENV, "").strip() or "auto"
    if mode not in DATA_MODES:
        raise DataError(f"unknown data mode {mode!r}; expected one of {', '.join(DATA_MODES)}")
    return mode


def default_workers(workers: int | None) -> int:
    """``None`` → one DataLoader worker per CPU core (at most 8); else ``workers`` (>= 0)."""
    if workers is None:
        return min(DEFAULT_WORKERS_MAX, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be a non-negative integer, got {workers!r}")
    return workers


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), or a large number when
    the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def choose_mode(mode: str | None, name: str, n_items: int, channels: int, size: int) -> str:
    """The path a file source takes for ``n_items`` images of ``channels x size x size``:
    ``memory``, ``stream`` or ``cache`` (see the module docstring). Forced ``memory`` that
    would not fit raises :class:`DataError` saying how much it needs, before anything is decoded."""
    mode = check_data_mode(mode)
    need = n_items * channels * size * size
    if mode == "auto":
        return "memory" if need <= AUTO_MEMORY_MAX_BYTES else "stream"
    if mode == "memory":
        have = available_memory()
        if need > have:
            raise DataError(
                f"{name}: decoding {n_items} images of {channels}x{size}x{size} in memory takes "
                f"{_gib(need)}, more than the {_gib(have)} available; use data mode stream or cache"
            )
    return mode


# ------------------------------------------------------------------------------------------
# Listing-time probe
# ------------------------------------------------------------------------------------------


def _orientation_swaps(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def probe_file(path: str, channels: int) -> tuple[str | None, int, int, bytes]:
    """``(reason or None, width, height, digest)`` of one image file, as displayed (EXIF
    rotation applied to the size); ``reason`` is ``"<Type>: message"`` when it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        return _reason(err), 0, 0, b""
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    try:  # opened by path, so that messages name the file as the in-memory path's do
        with Image.open(path) as img:
            w, h = img.size
            if img.format == "PNG":
                img.verify()  # must come straight after open; EXIF is read from a second open
                with Image.open(path) as again:
                    swap = _orientation_swaps(again)
            else:
                swap = _orientation_swaps(img)
                if img.format == "JPEG":
                    img.draft("RGB" if channels == 3 else "L", (max(1, w // 8), max(1, h // 8)))
                img.load()
        if w < 1 or h < 1:
            return "ValueError: image has no pixels", w, h, digest
        return None, (h if swap else w), (w if swap else h), digest
    except (UnidentifiedImageError, *_DECODE_ERRORS) as err:
        return _reason(err), 0, 0, digest


def probe_files(paths: Sequence[str], channels: int, threads: int = 4) -> list[tuple[str | None, int, int, bytes]]:
    """:func:`probe_file` of each path, in order (reading and hashing run in ``threads`` threads)."""
    if len(paths) < 64 or threads <= 1:
        return [probe_file(p, channels) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: probe_file(p, channels), paths, chunksize=64))


def item_box_problem(
    path: str, channels: int, size: int, bbox: BBox | None, draft_bboxes: Sequence[BBox] | None = None
) -> str | None:
    """Why ``bbox`` cannot be cropped from the image at ``path`` as
    :func:`~hvs.data.images.open_image` + :func:`~hvs.data.images.crop_resize` would decode it
    (at the same JPEG draft scale, which moves box edges to that scale's pixel grid), or None.
    Reads the header only. ``draft_bboxes``: the boxes that decide the draft scale (default
    ``[bbox]``)."""
    if bbox is None:
        return None
    with Image.open(path) as img:
        swap = _orientation_swaps(img)
        scale = apply_draft(
            img, "RGB" if channels == 3 else "L", size, [bbox] if draft_bboxes is None else draft_bboxes
        )
        w, h = img.size
    if scale == 1.0 and swap:
        w, h = h, w
    return box_problem(bbox, w, h, scale)


def item_digest(file_digest: bytes, bbox: BBox | None, size: int, channels: int) -> bytes:
    """16 bytes standing for an item's decoded pixels: its file's bytes, crop box and shape."""
    box = b"" if bbox is None else np.asarray(bbox, dtype=np.float64).tobytes()
    return hashlib.blake2b(file_digest + box + f"{size}x{channels}".encode(), digest_size=16).digest()


def list_images(
    items: Sequence[tuple[str, BBox | None]],
    size: int,
    channels: int,
    *,
    strict: bool = False,
    names: Sequence[str] | None = None,
    workers: int | None = None,
) -> tuple[ImageStore, list[int], list[str]]:
    """The streaming counterpart of :func:`~hvs.data.images.load_images`: ``(store, kept,
    skipped)`` with the same ``kept`` and ``skipped`` (``"name: reason"``), found by
    :func:`probe_files` instead of decoding; ``strict`` raises the first failure."""
    paths = [os.fspath(p) for p, _ in items]
    unique = list(dict.fromkeys(paths))
    probed = dict(zip(unique, probe_files(unique, channels)))
    kept: list[int] = []
    skipped: list[str] = []
    for i, (path, bbox) in enumerate(items):
        reason = probed[paths[i]][0] or item_box_problem(path, channels, size, bbox)
        if reason is None:
            kept.append(i)
            continue
        msg = f"{names[i] if names is not None else path}: {reason}"
        if strict:
            raise ImageError(msg)
        skipped.append(msg)
    store = ImageStore(
        [paths[i] for i in kept],
        [items[i][1] for i in kept],
        size,
        channels,
        names=None if names is None else [names[i] for i in kept],
        digests=[item_digest(probed[paths[i]][3], items[i][1], size, channels) for i in kept],
        workers=default_workers(workers),
    )
    return store, kept, skipped


# ------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------


class ImageStore:
    """A lazy stand-in for a ``uint8`` (N, C, size, size) tensor of images decoded from files.

    ``paths``: one file per item; ``boxes``: ``(x1, y1, x2, y2)`` crop or None per item;
    ``draft``: per item the shortest side that decides the JPEG draft scale when it differs from
    the item's own box (DeepFashion2 decodes a photo once for all its items, at the scale the
    smallest of them needs), None for "the item's own box"; ``names``: what errors call each
    item (default its path); ``digests``: 16 bytes per item for the leak checks; ``workers``:
    DataLoader processes used by :meth:`batches` (and so by training, embedding and index builds).

    The listing is held in numpy arrays (no Python object per item), so forked workers do not
    copy it page by page as reference counts change.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self,
        paths: Sequence[str],
        boxes: Sequence[BBox | None] | None,
        size: int,
        channels: int,
        *,
        draft: Sequence[float | None] | None = None,
        names: Sequence[str] | None = None,
        digests: Sequence[bytes] | None = None,
        workers: int = 0,
    ) -> None:
        n = len(paths)
        self.size, self.channels, self.workers = int(size), int(channels), int(workers)
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=bytes) if n else np.zeros(0, "S1")
        self._boxes = np.full((n, 4), np.nan)
        for i, b in enumerate(boxes or ()):
            if b is not None:
                self._boxes[i] = b
        self._draft = np.full(n, np.nan)
        for i, s in enumerate(draft or ()):
            if s is not None:
                self._draft[i] = s
        self._names = None if names is None else np.array([os.fsencode(s) for s in names], dtype=bytes)
        self._digests = None if digests is None else np.frombuffer(b"".join(digests), np.uint8).reshape(n, 16)
        self._index = np.arange(n, dtype=np.int64)

    # --- the tensor surface -------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, self.size, self.size))

    def dim(self) -> int:
        return 4

    def size_bytes(self) -> int:
        return len(self) * self.channels * self.size * self.size

    def __repr__(self) -> str:
        shape = f"{self.channels}x{self.size}x{self.size}"
        return f"{type(self).__name__}({len(self)} images, {shape}, workers={self.workers})"

    def _positions(self, key) -> np.ndarray:
        """Positions (into this view) selected by ``key``: slice, int sequence or bool mask."""
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {key.shape} for {len(self)} images")
            return np.flatnonzero(key)
        if key.ndim == 0:
            key = key.reshape(1)
        key = key.astype(np.int64, copy=False)
        if key.size and (key.max() >= len(self) or key.min() < -len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return np.where(key < 0, key + len(self), key)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (
            isinstance(key, torch.Tensor) and key.dim() == 0 and not key.is_floating_point() and key.dtype != torch.bool
        ):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} images")
            return self.decode(self._index[[i % len(self)]])[0]
        return self.decode(self._index[self._positions(key)])

    def subset(self, index) -> ImageStore:
        """The lazy view of the items at ``index`` (tensor, array, list, slice or bool mask)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._index = self._index[self._positions(index)]
        return view

    # --- decoding ---------------------------------------------------------------------------

    def name(self, row: int) -> str:
        return os.fsdecode((self._names if self._names is not None else self._paths)[row])

    def _box(self, row: int) -> tuple[float, ...] | None:
        b = self._boxes[row]
        return None if np.isnan(b[0]) else tuple(float(v) for v in b)

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """Decode pool rows ``rows`` into a (len(rows), C, size, size) uint8 tensor; a photo shared
        by several rows of the call is decoded once."""
        out = torch.empty((len(rows), self.channels, self.size, self.size), dtype=torch.uint8)
        opened: dict[tuple[bytes, float], tuple[Image.Image, float]] = {}
        for k, row in enumerate(np.asarray(rows, dtype=np.int64).tolist()):
            path = os.fsdecode(self._paths[row])
            box = self._box(row)
            side = self._draft[row]
            key = (self._paths[row], float(side) if not np.isnan(side) else (-1.0 if box is None else -2.0 - k))
            try:
                if key not in opened:
                    bboxes = (
                        [(0.0, 0.0, float(side), float(side))]
                        if not np.isnan(side)
                        else (None if box is None else [box])
                    )
                    opened[key] = open_image(path, self.channels, size=self.size, bboxes=bboxes)
                img, scale = opened[key]
                out[k] = crop_resize(img, self.size, box, scale=scale, name=self.name(row))
            except ImageError as err:
                reason = str(err).split(": ", 1)[-1]
                raise ImageError(
                    f"{self.name(row)}: {reason} (passed the check when the data was listed; "
                    "was it changed on disk since?)"
                ) from None
        return out

    def channel_stats(self, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std (see :func:`store_channel_stats`)."""
        return store_channel_stats(self, seed)

    def digests(self) -> list[bytes]:
        """16 bytes per item standing for its pixels (file bytes + crop box + shape)."""
        if self._digests is None:
            raise DataError("this image store was made without digests")
        return [bytes(d) for d in self._digests[self._index]]

    # --- batched, parallel decoding -------------------------------------------------------

    def batches(
        self,
        index_batches: Iterable[Sequence[int] | torch.Tensor],
        *,
        workers: int | None = None,
        transform: Callable[[torch.Tensor, int], object] | None = None,
        pin_memory: bool = False,
    ) -> Iterator:
        """Decode each batch of positions (into this view) in order; with ``transform``, yield
        ``transform(uint8_batch, batch_number)`` computed in the worker (it must be picklable
        when workers are spawned rather than forked). ``workers`` defaults to ``self.workers``;
        0 decodes in this process."""
        batches = [
            np.asarray(b.cpu().numpy() if isinstance(b, torch.Tensor) else b, dtype=np.int64) for b in index_batches
        ]
        workers = self.workers if workers is None else workers
        job = _BatchJob(self, batches, transform)
        if workers <= 0 or len(batches) <= 1:
            for k in range(len(batches)):
                yield job[k]
            return
        loader = torch.utils.data.DataLoader(
            job,
            batch_size=None,
            shuffle=False,
            num_workers=min(workers, len(batches)),
            pin_memory=pin_memory,
            prefetch_factor=2,
            persistent_workers=False,
        )
        yield from loader

    def iter_chunks(self, batch_size: int, *, workers: int | None = None, transform=None) -> Iterator:
        """Every item in order, ``batch_size`` at a time (see :meth:`batches`)."""
        n = len(self)
        yield from self.batches(
            (range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)), workers=workers, transform=transform
        )


class _BatchJob(torch.utils.data.Dataset):
    """Batch ``k`` of a list of index batches, decoded (and transformed) by whoever asks."""

    def __init__(self, store: ImageStore, batches: list[np.ndarray], transform) -> None:
        self.store, self.batches, self.transform = store, batches, transform

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        x = self.store.decode(self.store._index[self.batches[k]])
        return x if self.transform is None else self.transform(x, k)


def store_channel_stats(store: ImageStore, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std like :func:`~hvs.data.images.channel_stats`: exact over up to
    :data:`STATS_SAMPLE` images (or a store with ``exact_stats``), else over a seeded sample."""
    from .images import stats_from_counts

    n = len(store)
    if n == 0:
        raise DataError("channel_stats needs non-empty images")
    exact = n <= STATS_SAMPLE or getattr(store, "exact_stats", False)
    pos = np.arange(n) if exact else np.sort(np.random.default_rng(seed).choice(n, STATS_SAMPLE, replace=False))
    counts = torch.zeros((store.channels, 256), dtype=torch.float64)
    chunks = [pos[s : s + 256] for s in range(0, len(pos), 256)]
    for c in store.batches(chunks, transform=_Counts()):
        counts += c
    return stats_from_counts(counts)


class _Counts:
    """Per-channel histograms of a uint8 batch (computed in the worker)."""

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        from .images import channel_stats_counts

        return channel_stats_counts(x)
