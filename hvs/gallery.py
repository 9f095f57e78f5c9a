"""Adding images to a gallery index: the one flow behind ``hvs index add`` and ``POST /gallery``.

    from hvs.gallery import add_images
    from hvs.index import open_index

    with open_index("faiss:runs/index") as index:
        ids = add_images(index, ["new_bag.png"], ["Bag"])   # embedded by the index's gallery model

Every vector of an index records the fingerprint of the gallery model that embedded it. A new
item is embedded by the index's gallery model (or ``gallery_model``), decoded at its input size
and channels, and refused if the embedding is NaN or infinite. The model must be one the index
knows, or a gallery model trained backward-compatible with one it knows (an upgrade in progress,
then registered in the sidecar: :mod:`hvs.compat` rule 5); any other is refused, since its
vectors would sit in another space. The search
service keeps its own decoding (size limits, decompression bombs) and locking, and calls
:func:`load_gallery_encoder` and :func:`embed_gallery_images` for the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .compat import GallerySide, QuerySide, check_pair, register_patch
from .data.images import load_image
from .encoders import QueryEncoder, load_query_encoder
from .index import GalleryIndex, IndexStoreError


def load_gallery_encoder(index: GalleryIndex, gallery_model: str | os.PathLike | None = None) -> QueryEncoder:
    """The encoder that embeds new items of ``index``: ``gallery_model`` (a model folder or
    ``.onnx`` file), else the path the sidecar records; refused unless :func:`hvs.compat.check_pair`
    lets it write the index: a gallery model the index knows, or one trained compatible with a
    known one (an upgrade, registered by :func:`register_gallery_model` when it first writes)."""
    recorded = index.meta.get("gallery_model") or {}
    path = gallery_model if gallery_model is not None else recorded.get("path")
    if not path:
        raise IndexStoreError(
            f"{index.spec} records no gallery model path (meta gallery_model.path); cannot embed new gallery images"
        )
    encoder = load_query_encoder(path)
    check_pair(writer_side(encoder, path), GallerySide.of_index(index), same_model=True, upgrade=True)
    return encoder


def writer_side(encoder: QueryEncoder, path: str | os.PathLike | None) -> QuerySide:
    """``encoder`` (loaded from ``path``) as the gallery model about to write an index's vectors."""
    where = None if path is None else str(os.path.abspath(path))
    return QuerySide.of_encoder(encoder, where, label="gallery model")


def register_gallery_model(index: GalleryIndex, encoder: QueryEncoder, path: str | os.PathLike | None) -> bool:
    """Record ``encoder`` in the index's registry of gallery models if it is new there (a durable
    sidecar update); True if it was registered. Call after :func:`load_gallery_encoder` accepted it."""
    patch = register_patch(index.meta, writer_side(encoder, path))
    if patch is None:
        return False
    index.update_meta(patch)
    return True


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
    embeddings = embed_gallery_images(encoder, images, names)
    path = gallery_model if gallery_model is not None else (index.meta.get("gallery_model") or {}).get("path")
    register_gallery_model(index, encoder, path)
    return index.add(embeddings, labels=labels, sources=names, model=encoder.fingerprint)


__all__ = [
    "add_images",
    "broadcast_labels",
    "embed_gallery_images",
    "load_gallery_encoder",
    "register_gallery_model",
    "writer_side",
]
