"""Adding images to a gallery index: the one flow behind ``hvs index add`` and ``POST /gallery``.

    from hvs.gallery import add_images
    from hvs.index import open_index

    with open_index("faiss:runs/index") as index:
        ids = add_images(index, ["new_bag.png"], ["Bag"])   # embedded by the index's gallery model

Every vector of an index lives in the embedding space of the gallery model that built it (its
weights fingerprint is in the sidecar). A new item is therefore embedded by that same model,
decoded at its input size and channels, and refused if the embedding is NaN or infinite; a model
with any other fingerprint is refused, since its vectors would sit in another space. The search
service keeps its own decoding (size limits, decompression bombs) and locking, and calls
:func:`load_gallery_encoder` and :func:`embed_gallery_images` for the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .compat import GallerySide, QuerySide, check_pair
from .data.images import load_image
from .encoders import QueryEncoder, load_query_encoder
from .index import GalleryIndex, IndexStoreError


def load_gallery_encoder(index: GalleryIndex, gallery_model: str | os.PathLike | None = None) -> QueryEncoder:
    """The encoder that embeds new items of ``index``: ``gallery_model`` (a model folder or
    ``.onnx`` file), else the path the sidecar records; refused unless its weights fingerprint is
    the one recorded by the index's build."""
    recorded = index.meta.get("gallery_model") or {}
    path = gallery_model if gallery_model is not None else recorded.get("path")
    if not path:
        raise IndexStoreError(
            f"{index.spec} records no gallery model path (meta gallery_model.path); cannot embed new gallery images"
        )
    encoder = load_query_encoder(path)
    check_pair(
        QuerySide.of_encoder(encoder, path, label="gallery model"),
        GallerySide.of_index_meta(index.meta),
        same_model=True,
    )
    return encoder


def embed_gallery_images(encoder: QueryEncoder, images: torch.Tensor, names: Sequence[str] | None = None) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` images at the encoder's size -> ``(N, D)`` float32 embeddings.

    A NaN or infinite embedding (broken weights) is an error naming the image, not a vector
    silently added to the index."""
    emb = np.asarray(encoder.embed(images), dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(emb).reshape(len(emb), -1).all(axis=1))
    if bad.size:
        name = names[int(bad[0])] if names is not None else f"image {int(bad[0])}"
        raise IndexStoreError(
            f"the gallery model {encoder.name} returned a NaN or inf embedding for {name!r} (broken model weights?)"
        )
    return emb


def broadcast_labels(labels: Sequence[str], n: int) -> list[str]:
    """One label for every image, or one per image."""
    labels = list(labels)
    if len(labels) == 1:
        return labels * n
    if len(labels) != n:
        raise IndexStoreError(f"{n} images but {len(labels)} labels: give one label, or one per image")
    return labels


def add_images(
    index: GalleryIndex,
    sources: Sequence[str | os.PathLike],
    labels: Sequence[str],
    *,
    gallery_model: str | os.PathLike | None = None,
) -> np.ndarray:
    """Embed image files with the index's gallery model and add them; returns their new ids.

    ``labels``: one for all images or one per image. ``gallery_model`` defaults to the path the
    sidecar records (see :func:`load_gallery_encoder`). Each item's source is its path."""
    labels = broadcast_labels(labels, len(sources))
    encoder = load_gallery_encoder(index, gallery_model)
    pre = encoder.preprocessing
    images = torch.stack([load_image(s, pre["image_size"], pre["channels"]) for s in sources])
    names = [str(s) for s in sources]
    return index.add(embed_gallery_images(encoder, images, names), labels=labels, sources=names)


__all__ = ["add_images", "broadcast_labels", "embed_gallery_images", "load_gallery_encoder"]
