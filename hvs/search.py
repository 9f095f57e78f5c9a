"""Heterogeneous search end to end: gallery model -> index, query model -> top-k.

    from hvs.search import build_gallery_index, Searcher

    build_gallery_index("runs/gallery", "fashion-mnist", "faiss:runs/index")
    searcher = Searcher("faiss:runs/index", "runs/query-bct")
    hits = searcher.search_files(["shoe.png"], k=10)   # [[{"id", "label", "source", "score"}, ...]]

The index sidecar records the gallery model's fingerprint and preprocessing; a query encoder is
accepted only if :func:`hvs.compat.check_pair` accepts the pair (it was trained for that
fingerprint or is the gallery model itself, with the same embedding dimension and input channels;
the query model may read smaller images than the gallery model, and files are decoded at the query
encoder's own size). Query
encoders are PyTorch model folders, or exported ONNX files (see :mod:`hvs.export`), loaded by
:mod:`hvs.encoders`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .compat import GallerySide, check_pair, index_meta
from .data import create_dataset
from .data.images import load_image
from .embed import embed_images
from .encoders import QueryEncoder, load_query_encoder
from .errors import SearchError
from .index import GalleryIndex, IndexStoreError, build_index, open_index


def gallery_inputs(
    gallery_model: str | os.PathLike,
    data: str,
    *,
    split: str = "gallery",
    protocol: str = "closed",
    strict: bool = False,
    **data_kwargs,
) -> tuple[torch.nn.Module, ckpt.ModelCard, torch.Tensor, list, list, dict]:
    """What building an index needs: the gallery model and card, the split's images, labels,
    sources, and the sidecar meta (shared by the single- and multi-process builds).
    ``data_kwargs``: ``data_mode``, ``workers``, ``cache_dir`` of :func:`hvs.data.create_dataset`."""
    model, card = ckpt.load_model(gallery_model)
    dataset = create_dataset(
        data,
        protocol=protocol,
        image_size=card.image_size,
        channels=card.in_chans,
        strict=strict,
        splits=(split,),
        **data_kwargs,
    )
    part = dataset.split(split)
    labels = [dataset.classes[i] for i in part.labels.tolist()]
    sources = part.sources or [f"{data}:{split}:{i}" for i in range(len(part))]
    meta = index_meta(card, gallery_model)
    meta["data"] = {"spec": data, "split": split, "protocol": protocol, "skipped": dataset.skipped}
    return model, card, part.images, labels, sources, meta


def build_gallery_index(
    gallery_model: str | os.PathLike,
    data: str,
    out: str,
    *,
    split: str = "gallery",
    factory: str = "Flat",
    protocol: str = "closed",
    batch_size: int = 256,
    shard_size: int = 4096,
    progress: bool = True,
    strict: bool = False,
    **data_kwargs,
) -> GalleryIndex:
    """Embed one split of a dataset with the gallery model into a new index at ``out``; resumable.
    ``data_kwargs``: ``data_mode``, ``workers``, ``cache_dir`` (how the images are read)."""
    model, card, images, labels, sources, meta = gallery_inputs(
        gallery_model, data, split=split, protocol=protocol, strict=strict, **data_kwargs
    )

    def embed_fn(batch: torch.Tensor) -> np.ndarray:
        return embed_images(model, batch, card.mean, card.std, batch_size).numpy()

    return build_index(
        out,
        images,
        labels,
        sources,
        embed_fn,
        factory=factory,
        meta=meta,
        batch_size=batch_size,
        shard_size=shard_size,
        progress=progress,
    )


class Searcher:
    """An index plus a compatible query encoder: images in, ranked gallery records out."""

    def __init__(
        self, index: str | GalleryIndex, query_model: str | os.PathLike | QueryEncoder, *, force: bool = False
    ) -> None:
        self.index = open_index(index) if isinstance(index, str) else index
        try:
            self.encoder = query_model if isinstance(query_model, QueryEncoder) else load_query_encoder(query_model)
            self.force = force
            self.warning = self.check()
        except BaseException:
            if isinstance(index, str):  # opened here: do not leak it
                self.index.close()
            raise

    def check(self) -> str | None:
        """The pairing rule on the index as it is now (:func:`hvs.compat.check_pair`, with its
        gallery models' live vectors): None, a warning when forced, or :class:`CompatError`.
        A long-lived reader calls it again after each refresh (other writers add models)."""
        return check_pair(self.encoder.side, GallerySide.of_index(self.index), force=self.force)

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[dict[str, Any]]]:
        scores, ids = self.index.search(queries, k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            valid = row_ids >= 0
            records = self.index.records(row_ids[valid]) if valid.any() else []
            out.append([{**r, "score": float(s)} for r, s in zip(records, row_scores[valid])])
        return out

    def search_images(self, images: torch.Tensor, k: int = 10) -> list[list[dict[str, Any]]]:
        """uint8 (N, C, H, W) images already at the encoder's size."""
        return self.search_embeddings(self.encoder.embed(images), k)

    def load(self, sources: Sequence[str | os.PathLike | bytes]) -> torch.Tensor:
        """Decode image files (or bytes) as the gallery images were decoded (cropped and resized
        alike), at the query encoder's own size and channels."""
        pre = self.encoder.preprocessing
        return torch.stack([load_image(s, pre["image_size"], pre["channels"]) for s in sources])

    def search_files(self, sources: Sequence[str | os.PathLike | bytes], k: int = 10) -> list[list[dict[str, Any]]]:
        return self.search_images(self.load(sources), k)


# QueryEncoder, load_query_encoder, SearchError and index_meta are re-exported from their homes
# (hvs.encoders, hvs.errors, hvs.compat) for callers that import them from here.
__all__ = [
    "IndexStoreError",
    "QueryEncoder",
    "SearchError",
    "Searcher",
    "build_gallery_index",
    "gallery_inputs",
    "index_meta",
    "load_query_encoder",
]
