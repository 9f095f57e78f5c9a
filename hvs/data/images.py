"""Decode one image into the ``uint8`` (C, H, W) tensor every part of hvs works with.

One helper for every reader (ImageFolder, CSV manifests, DeepFashion2 crops) and for anything
that later receives images from users (an HTTP query endpoint), so that a query photo is decoded,
cropped and resized exactly like the gallery images the models were trained on.

The pipeline is Pillow ``open`` → optional EXIF rotation → ``convert`` ("RGB" or "L") → optional
bounding-box crop → resize of the shorter side to ``size`` followed by a center crop (aspect ratio
preserved, as torchvision's ``Resize(size) + CenterCrop(size)``) → ``uint8`` CHW tensor.

Every decoding failure (unknown format, truncated file, decompression bomb, degenerate box) is
raised as :class:`ImageError`, a :class:`~hvs.data.base.DataError` whose one-line message starts
with the file name, so readers can record it in ``RetrievalData.skipped`` or stop on it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import DataError, is_store

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO
BBox = Sequence[float]  # (x1, y1, x2, y2), pixels, top-left origin, x2/y2 exclusive

# torchvision's ImageFolder list: files with other endings in a class folder are not images.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_MODES = {1: "L", 3: "RGB"}
# Pillow reports broken files through several exception types; all of them mean "cannot decode".
_DECODE_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError)


class ImageError(DataError):
    """An image that cannot be used: the message is ``"<name>: <reason>"``."""


def _name(src: ImageSource) -> str:
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return str(getattr(src, "name", "<stream>"))


def _reason(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or "unknown error"  # keep messages on one line
    return f"{type(err).__name__}: {msg}"


def _mode(channels: int) -> str:
    if channels not in _MODES:
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return _MODES[channels]


def open_image(
    src: ImageSource,
    channels: int = 3,
    *,
    size: int | None = None,
    bboxes: Sequence[BBox] | None = None,
    exif_transpose: bool = True,
) -> tuple[Image.Image, float]:
    """Open and fully decode an image as "RGB" (3 channels) or "L" (1 channel).

    With ``size`` given, JPEGs are decoded at a reduced scale (Pillow ``draft``: the decoder
    skips DCT coefficients, several times faster on large photos) that still leaves every crop in
    ``bboxes`` (or the whole image) at least ``size`` pixels on its shorter side. Returns the
    image and that scale factor: multiply box coordinates by it before cropping.
    """
    name = _name(src)
    mode = _mode(channels)
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
        with Image.open(fp) as opened:  # closes the file handle Pillow opened for a path
            img = opened
            scale = apply_draft(img, mode, size, bboxes, exif_transpose)
            img.load()  # decode now, so a truncated file fails here and not later
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode != mode:
                # palette images with transparency go through RGBA so Pillow does not warn
                if img.mode in ("P", "PA") and mode == "RGB":
                    img = img.convert("RGBA")
                img = img.convert(mode)
            if img is opened:
                img = img.copy()  # detach from the file before the with-block closes it
        return img, scale
    except ImageError:
        raise
    except _DECODE_ERRORS as err:
        raise ImageError(f"{name}: {_reason(err)}") from None


def apply_draft(
    img: Image.Image, mode: str, size: int | None, bboxes: Sequence[BBox] | None, exif_transpose: bool = True
) -> float:
    """Ask Pillow to decode an opened (not yet loaded) JPEG at the reduced scale
    :func:`open_image` uses; returns the scale factor (1.0 when nothing is reduced)."""
    if size is None or img.format != "JPEG" or _exif_rotated(img, exif_transpose):
        return 1.0
    w, h = img.size
    shortest = float(min(w, h))
    for box in bboxes or ():
        bw, bh = float(box[2]) - float(box[0]), float(box[3]) - float(box[1])
        if bw > 0 and bh > 0:
            shortest = min(shortest, bw, bh)
    factor = size / max(shortest, 1.0)
    if factor >= 0.5:  # draft only reduces by 1/2, 1/4, 1/8: nothing to gain otherwise
        return 1.0
    img.draft(mode, (math.ceil(w * factor), math.ceil(h * factor)))
    return img.size[0] / w


def clip_box(bbox: BBox, w: int, h: int, scale: float = 1.0, name: str = "<image>") -> tuple[int, int, int, int]:
    """``bbox`` (pixels of the original image) in pixels of the ``w x h`` image decoded at
    ``scale``, clipped to it, floor/ceil so that a box never loses the pixels it touches; a box
    with no area left raises :class:`ImageError`."""
    box, reason = _clip(bbox, w, h, scale)
    if reason is not None:
        raise ImageError(f"{name}: {reason}")
    return box


def box_problem(bbox: BBox | None, w: int, h: int, scale: float = 1.0) -> str | None:
    """Why :func:`clip_box` would refuse ``bbox`` (the reason, without the name), or None."""
    return None if bbox is None else _clip(bbox, w, h, scale)[1]


def _clip(bbox: BBox, w: int, h: int, scale: float) -> tuple[tuple[int, int, int, int], str | None]:
    if len(bbox) != 4:
        return (0, 0, 0, 0), f"bounding box needs 4 numbers (x1 y1 x2 y2), got {list(bbox)}"
    x1, y1, x2, y2 = (float(v) * scale for v in bbox)
    x1, y1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    x2, y2 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
    if x2 <= x1 or y2 <= y1:
        return (
            x1,
            y1,
            x2,
            y2,
        ), f"degenerate bounding box {list(bbox)} for a {round(w / scale)}x{round(h / scale)} image"
    return (x1, y1, x2, y2), None


def _exif_rotated(img: Image.Image, exif_transpose: bool) -> bool:
    """True when EXIF asks for a rotation (then draft scale and box coordinates would diverge)."""
    if not exif_transpose:
        return False
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)  # 0x0112 = Orientation
    except Exception:  # broken EXIF: decode at full scale, exif_transpose will cope or fail
        return True


def crop_resize(
    img: Image.Image, size: int | None, bbox: BBox | None = None, *, scale: float = 1.0, name: str = "<image>"
) -> torch.Tensor:
    """Crop ``img`` to ``bbox`` (clipped to the image), then shorter-side resize + center crop.

    ``bbox`` is ``(x1, y1, x2, y2)`` in pixels of the original image (top-left origin); ``scale``
    is the factor returned by :func:`open_image`. A box with no area after clipping raises
    :class:`ImageError`. ``size=None`` keeps the (cropped) image at its own size.
    """
    if bbox is not None:
        img = img.crop(clip_box(bbox, *img.size, scale=scale, name=name))
    if size is not None:
        if img.size != (size, size):
            # ImageOps.fit = crop the central region with the target aspect ratio, then resize;
            # the same pixels as "resize shorter side, then center crop", one resampling pass.
            # Pillow's BILINEAR resize widens its kernel when shrinking (antialiased).
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(
    src: ImageSource, size: int | None, channels: int = 3, bbox: BBox | None = None, *, exif_transpose: bool = True
) -> torch.Tensor:
    """Decode ``src`` (path, bytes or binary file) into a ``uint8`` (C, H, W) tensor.

    ``size``: output is ``size x size`` (shorter side resized, then center crop); ``None`` keeps
    the native size. ``channels``: 3 → RGB, 1 → grayscale. ``bbox``: ``(x1, y1, x2, y2)`` crop
    in pixels (top-left origin) of the image as displayed, i.e. after EXIF rotation when
    ``exif_transpose`` is on. Raises :class:`ImageError` for anything that cannot be decoded.
    """
    img, scale = open_image(
        src, channels, size=size, bboxes=None if bbox is None else [bbox], exif_transpose=exif_transpose
    )
    try:
        return crop_resize(img, size, bbox, scale=scale, name=_name(src))
    except ImageError:
        raise
    except _DECODE_ERRORS as err:
        raise ImageError(f"{_name(src)}: {_reason(err)}") from None


# Below this many files decoding takes well under a second: no progress bar.
PROGRESS_MIN_ITEMS = 500


def decode_progress(total: int, desc: str | None):
    """A tqdm bar on stderr for a long decode (``desc`` says what is decoded), shown only on a
    terminal (``disable=None``) so that logs and tests stay clean; a no-op bar otherwise."""
    from tqdm.auto import tqdm

    quiet = desc is None or total < PROGRESS_MIN_ITEMS
    return tqdm(total=total, desc=desc, unit="img", disable=True if quiet else None)


def load_images(
    items: Sequence[tuple[ImageSource, BBox | None]],
    size: int,
    channels: int,
    *,
    strict: bool = False,
    names: Sequence[str] | None = None,
    desc: str | None = None,
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode many images into one (N, C, size, size) ``uint8`` tensor.

    Returns ``(images, kept, skipped)``: ``kept`` are the indices into ``items`` that decoded
    (row i of ``images`` is ``items[kept[i]]``), ``skipped`` the ``"name: reason"`` lines of the
    others. With ``strict=True`` the first failure raises :class:`ImageError` instead. ``desc``
    (e.g. ``"decode csv:m.csv gallery"``) labels a progress bar shown on a terminal.
    """
    out = torch.empty((len(items), channels, size, size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[str] = []
    with decode_progress(len(items), desc) as bar:
        _decode_into(out, items, size, channels, strict, names, kept, skipped, bar)
    return out[: len(kept)].clone() if len(kept) < len(items) else out, kept, skipped


def _decode_into(
    out: torch.Tensor,
    items: Sequence[tuple[ImageSource, BBox | None]],
    size: int,
    channels: int,
    strict: bool,
    names: Sequence[str] | None,
    kept: list[int],
    skipped: list[str],
    bar,
) -> None:
    for i, (src, bbox) in enumerate(items):
        bar.update(1)
        try:
            out[len(kept)] = load_image(src, size, channels, bbox)
        except ImageError as err:
            msg = str(err)
            if names is not None:  # report the name the user knows (e.g. a manifest line)
                msg = f"{names[i]}: {msg.split(': ', 1)[-1]}"
            if strict:
                raise ImageError(msg) from None
            skipped.append(msg)
            continue
        kept.append(i)


def to_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8`` images, (C, H, W) or (N, C, H, W), → float32 ``(x / 255 - mean) / std``.

    ``mean``/``std`` have one value per channel (or one value for all channels), as stored in
    ``RetrievalData.mean``/``.std``.
    """
    if is_store(images):  # a lazy store: decoded whole (callers that stream use its batches)
        images = images[:]
    if images.dim() not in (3, 4):
        raise DataError(f"to_float expects (C, H, W) or (N, C, H, W) images, got {tuple(images.shape)}")
    c = images.shape[-3]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(-1)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise DataError(f"mean/std need 1 or {c} values, got {m.numel()} and {s.numel()}")
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(m.view(-1, 1, 1)).div_(s.view(-1, 1, 1))


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``uint8`` (N, C, H, W) images, on the [0, 1] scale.

    Counts the 256 values per channel with ``bincount`` instead of converting the whole tensor
    to float: exact, and no float copy of e.g. 60k Fashion-MNIST images in memory. An
    :class:`~hvs.data.store.ImageStore` is decoded in chunks (sampled when large, see
    :func:`~hvs.data.store.store_channel_stats`).
    """
    if is_store(images) and len(images):
        return images.channel_stats()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise DataError(
            f"channel_stats needs non-empty uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}"
        )
    return stats_from_counts(channel_stats_counts(images))


def channel_stats_counts(images: torch.Tensor) -> torch.Tensor:
    """(C, 256) float64 counts of each value per channel of uint8 (N, C, H, W) images."""
    return torch.stack(
        [torch.bincount(images[:, ch].reshape(-1), minlength=256).to(torch.float64) for ch in range(images.shape[1])]
    )


def stats_from_counts(counts: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Rounded per-channel (mean, std) on the [0, 1] scale from :func:`channel_stats_counts`."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for ch in range(counts.shape[0]):
        n = counts[ch].sum()
        mean = (counts[ch] * values).sum() / n
        var = (counts[ch] * (values - mean) ** 2).sum() / n
        means.append(round(float(mean), 4))
        stds.append(round(max(float(var.sqrt()), 1e-3), 4))  # a constant channel must not divide by 0
    return tuple(means), tuple(stds)
