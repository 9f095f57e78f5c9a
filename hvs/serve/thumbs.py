"""Thumbnails of gallery items, from whatever their ``source`` string names.

A gallery record's ``source`` is a file path for file-based datasets (``imagefolder:``, ``csv:``,
uploads), ``REL#ITEM`` relative to the dataset folder for DeepFashion2 crops, or ``NAME:SPLIT:I``
for in-memory datasets (``fashion-mnist:test:17``, ``synthetic:test:3``) whose images exist only
when the dataset is generated. The latter are rendered by re-creating the dataset the index was
built from (its spec and protocol are in the index sidecar, ``meta["data"]``), cached so that only
the first thumbnail pays for it.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data import create_dataset
from ..data.base import SPLITS, DataError
from ..data.images import ImageError, open_image
from ..data.registry import list_sources, parse_spec

THUMB_SIZE = 256  # longest side of a thumbnail made from a file


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> a Pillow image ("L" for one channel, "RGB" for three)."""
    arr = x.detach().cpu().numpy().astype(np.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), mode="RGB")


class _DatasetCache:
    """A small LRU of in-memory datasets: ``(spec, protocol)`` -> (dataset, {source: (split, row)})."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], tuple[Any, dict[str, tuple[str, int]]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str, protocol: str) -> tuple[Any, dict[str, tuple[str, int]]]:
        key = (spec, protocol)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped items were reported when the index was built
            data = create_dataset(spec, protocol=protocol)
        where: dict[str, tuple[str, int]] = {}
        for role in SPLITS:
            for row, src in enumerate(data.split(role).sources or []):
                where.setdefault(src, (role, row))
        with self._lock:
            self._items[key] = (data, where)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data, where


class ThumbnailResolver:
    """Turns a gallery ``source`` into PNG bytes, or ``None`` when it cannot be resolved."""

    def __init__(self, index_meta: dict, cache_size: int = 2) -> None:
        data = index_meta.get("data") or {}
        self.spec: str | None = data.get("spec")
        self.protocol: str = data.get("protocol") or "closed"
        self._datasets = _DatasetCache(cache_size)

    def png(self, source: str | None) -> bytes | None:
        if not source:
            return None
        path = self._file_for(source)
        if path is not None:
            try:
                img, _ = open_image(path, channels=3)
            except ImageError:
                return None
            img.thumbnail((THUMB_SIZE, THUMB_SIZE))
            return encode_png(img)
        x = self._tensor_for(source)
        return None if x is None else encode_png(tensor_to_image(x))

    def _file_for(self, source: str) -> str | None:
        if os.path.isfile(source):
            return source
        # DeepFashion2 (and any folder dataset) records "REL#ITEM" relative to the dataset folder
        rel = source.split("#", 1)[0]
        if self.spec and not os.path.isabs(rel):
            try:
                _, arg = parse_spec(self.spec)
            except DataError:
                return None
            if arg and os.path.isdir(arg):
                candidate = os.path.normpath(os.path.join(arg, rel))
                if os.path.commonpath([os.path.abspath(arg), os.path.abspath(candidate)]) == os.path.abspath(
                    arg
                ) and os.path.isfile(candidate):
                    return candidate
        return None

    def _tensor_for(self, source: str) -> torch.Tensor | None:
        head, sep, tail = source.rpartition(":")
        prefix = source.split(":", 1)[0]
        if not sep or not tail.isdigit():
            return None  # in-memory sources end in ":INDEX"
        spec = self.spec
        if spec is None:
            if prefix not in list_sources():
                return None
            spec = prefix
        elif parse_spec(spec)[0] != prefix and not source.startswith(spec + ":"):
            return None
        try:
            data, where = self._datasets.get(spec, self.protocol)
        except (DataError, OSError, ValueError):
            return None
        if source in where:
            role, row = where[source]
            return data.split(role).images[row]
        # build_gallery_index's fallback for sources-less splits: f"{spec}:{split}:{row}"
        spec_part, _, role = head.rpartition(":")
        if spec_part == spec and role in SPLITS:
            images = data.split(role).images
            row = int(tail)
            return images[row] if row < len(images) else None
        return None


__all__ = ["ThumbnailResolver", "encode_png", "tensor_to_image"]
