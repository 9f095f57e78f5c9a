"""Fashion-MNIST (Xiao et al. 2017) from its four gzipped IDX files: ``fashion-mnist[:DIR]``.

The files are read with a small IDX parser (LeCun's MNIST format: a 4-byte big-endian magic
``0x00 0x00 <dtype> <ndim>``, ``ndim`` big-endian uint32 sizes, then the raw array) rather than
torchvision's downloader: this machine has no network, and the Debian package
``dataset-fashion-mnist`` ships the files under ``/usr/share/datasets/fashion-mnist``.

Protocols: ``closed`` trains on the 60k training images and splits the 10k test images per class
50/50 into query and gallery (seeded); ``open`` trains on classes 0–4 (T-shirt … Coat) and
searches classes 5–9 (Sandal … Ankle boot) of the test set, unseen in training.
"""

from __future__ import annotations

import functools
import gzip
import os
import subprocess
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import SPLITS, DataError, RetrievalData, Split
from .images import channel_stats
from .registry import register_source
from .splits import check_nonempty, query_gallery_split

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Published statistics of the 60k training images ([0, 1] scale); the loader computes its own.
MEAN, STD = (0.2860,), (0.3530,)
OPEN_TRAIN_CLASSES = range(0, 5)

# IDX type byte → big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into a numpy array in native byte order.

    Raises :class:`DataError` naming the file when it is missing, not gzip/IDX, or truncated.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; EOF = truncated
        raise DataError(f"{path}: corrupt gzip data ({type(err).__name__}: {err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: dims {dims} need {expected} data bytes, found {len(raw) - header}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as a gzipped IDX file (used by tests to build tiny fixtures)."""
    code = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data)


@functools.lru_cache(maxsize=1)
def default_dir() -> str:
    """Folder of the Debian package's files (``dpkg -L dataset-fashion-mnist``)."""
    try:
        out = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().endswith(FILES["train_images"]):
            return os.path.dirname(line.strip())
    if os.path.exists(os.path.join(DEBIAN_DIR, FILES["train_images"])):
        return DEBIAN_DIR
    raise DataError(
        f"Fashion-MNIST not found: install it with `apt-get install {DEBIAN_PACKAGE}` "
        f"or pass the folder of the four IDX .gz files as fashion-mnist:DIR"
    )


def _find(folder: str, fname: str) -> str:
    path = os.path.join(folder, fname)
    if not os.path.exists(path) and os.path.exists(path[:-3]):  # also accept gunzipped files
        return path[:-3]
    return path


@functools.lru_cache(maxsize=2)
def _read_all(folder: str, stamp: tuple) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) as uint8 / int64 tensors; cached per folder + mtimes."""
    out = []
    for split in ("train", "test"):
        x_path = _find(folder, FILES[f"{split}_images"])
        y_path = _find(folder, FILES[f"{split}_labels"])
        x, y = read_idx(x_path), read_idx(y_path)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{x_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{y_path}: expected a 1-d label array, got shape {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{y_path}: {len(y)} labels for {len(x)} images in {x_path}")
        if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
            raise DataError(f"{y_path}: labels must be 0..{len(CLASSES) - 1}, found {y.min()}..{y.max()}")
        out += [torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


def load_arrays(folder: str | None = None) -> tuple[torch.Tensor, ...]:
    """``(train_x, train_y, test_x, test_y)``: uint8 (N, 1, 28, 28) images and int64 labels.

    Parsed once per process (cached; the cache key includes the files' mtimes). The returned
    tensors are shared with the cache: do not modify them in place.
    """
    folder = os.path.abspath(folder if folder is not None else default_dir())
    if not os.path.isdir(folder):
        raise DataError(f"fashion-mnist:{folder}: no such directory")
    stamp = []
    for fname in FILES.values():
        path = _find(folder, fname)
        if not os.path.exists(path):
            raise DataError(f"{path}: file not found (fashion-mnist needs {', '.join(FILES.values())})")
        st = os.stat(path)
        stamp.append((path, st.st_mtime_ns, st.st_size))
    return _read_all(folder, tuple(stamp))


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 (N, C, H, W) images, in chunks to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _prepare(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    images = resize(images, size)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


@register_source(
    "fashion-mnist", arg="DIR", help="Fashion-MNIST from its IDX .gz files (Debian dataset-fashion-mnist or DIR)"
)
def fashion_mnist(
    arg: str | None,
    *,
    protocol: str = "closed",
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    seed: int = 0,
    splits: Sequence[str] | None = None,
) -> RetrievalData:
    """Fashion-MNIST, 10 classes, 1x28x28 by default (``channels=3`` repeats the gray plane)."""
    name = "fashion-mnist" if arg is None else f"fashion-mnist:{arg}"
    if arg is not None and not os.path.isdir(arg):
        raise DataError(f"{name}: no such directory")
    train_x, train_y, test_x, test_y = load_arrays(arg)
    size, channels = image_size or 28, channels or 1
    wanted = set(SPLITS if splits is None else splits)
    train_idx = torch.arange(len(train_y))
    test_idx = torch.arange(len(test_y))
    if protocol == "open":
        train_idx = train_idx[torch.isin(train_y, torch.tensor(list(OPEN_TRAIN_CLASSES)))]
        test_idx = test_idx[~torch.isin(test_y, torch.tensor(list(OPEN_TRAIN_CLASSES)))]
    q, g = query_gallery_split(test_y[test_idx], seed)
    q_idx, g_idx = test_idx[q], test_idx[g]

    def split(x, y, idx, role, file_split):
        if role not in wanted:
            return None  # not resized or copied: create_dataset(..., splits=) left it out
        # indexing copies, so the cached arrays are never handed out (and never mutated)
        return Split(
            _prepare(x[idx], size, channels),
            y[idx].clone(),
            [f"fashion-mnist:{file_split}:{i}" for i in idx.tolist()],
            role,
        )

    train = split(train_x, train_y, train_idx, "train", "train")
    query = split(test_x, test_y, q_idx, "query", "test")
    gallery = split(test_x, test_y, g_idx, "gallery", "test")
    check_nonempty(name, train=train, query=query, gallery=gallery)
    # exact statistics of the training images actually used (the published full-set values
    # MEAN/STD do not hold for the open-set half, resized images or a custom DIR)
    mean, std = channel_stats(train.images) if train is not None else ((), ())
    return RetrievalData(name, train, query, gallery, list(CLASSES), protocol, mean, std)
