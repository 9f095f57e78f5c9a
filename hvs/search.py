"""Heterogeneous search end to end: gallery model -> index, query model -> top-k.

    from hvs.search import build_gallery_index, Searcher

    build_gallery_index("runs/gallery", "fashion-mnist", "faiss:runs/index")
    searcher = Searcher("faiss:runs/index", "runs/query-bct")
    hits = searcher.search_files(["shoe.png"], k=10)   # [[{"id", "label", "source", "score"}, ...]]

The index sidecar records the gallery model's fingerprint and preprocessing; a query encoder is
accepted only if it was trained for that fingerprint (or is the gallery model itself), and only if
its embedding dimension matches. Query encoders are PyTorch model folders, or exported ONNX files
(see :mod:`hvs.export`), behind one small interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import HVSError
from . import checkpoint as ckpt
from .data import create_dataset
from .data.images import load_image
from .embed import embed_images
from .index import GalleryIndex, IndexStoreError, build_index, open_index


class SearchError(HVSError):
    """A search that cannot run as asked (one-line message)."""


def index_meta(card: ckpt.ModelCard, folder: str | os.PathLike) -> dict:
    """What an index sidecar records about the gallery model that made its vectors."""
    return {"gallery_model": {"model": card.model, "fingerprint": card.fingerprint, "embed_dim": card.embed_dim,
                              "path": str(Path(folder).resolve())},
            "preprocessing": {"channels": card.in_chans, "image_size": card.image_size,
                              "mean": list(card.mean), "std": list(card.std)}}


def gallery_inputs(gallery_model: str | os.PathLike, data: str, *, split: str = "gallery", protocol: str = "closed",
                   strict: bool = False) -> tuple[torch.nn.Module, ckpt.ModelCard, torch.Tensor, list, list, dict]:
    """What building an index needs: the gallery model and card, the split's images, labels,
    sources, and the sidecar meta (shared by the single- and multi-process builds)."""
    model, card = ckpt.load_model(gallery_model)
    dataset = create_dataset(data, protocol=protocol, image_size=card.image_size, channels=card.in_chans,
                             strict=strict, splits=(split,))
    part = dataset.split(split)
    labels = [dataset.classes[i] for i in part.labels.tolist()]
    sources = part.sources or [f"{data}:{split}:{i}" for i in range(len(part))]
    meta = index_meta(card, gallery_model)
    meta["data"] = {"spec": data, "split": split, "protocol": protocol, "skipped": dataset.skipped}
    return model, card, part.images, labels, sources, meta


def build_gallery_index(gallery_model: str | os.PathLike, data: str, out: str, *, split: str = "gallery",
                        factory: str = "Flat", protocol: str = "closed", batch_size: int = 256,
                        shard_size: int = 4096, progress: bool = True, strict: bool = False) -> GalleryIndex:
    """Embed one split of a dataset with the gallery model into a new index at ``out``; resumable."""
    model, card, images, labels, sources, meta = gallery_inputs(gallery_model, data, split=split,
                                                                protocol=protocol, strict=strict)

    def embed_fn(batch: torch.Tensor) -> np.ndarray:
        return embed_images(model, batch, card.mean, card.std, batch_size).numpy()

    return build_index(out, images, labels, sources, embed_fn, factory=factory, meta=meta,
                       batch_size=batch_size, shard_size=shard_size, progress=progress)


@dataclass
class QueryEncoder:
    """Anything that turns uint8 query images into embeddings, with what it was made for."""

    name: str
    embed_dim: int
    fingerprint: str  # of the encoder's own weights
    compatible_with: str | None  # fingerprint of the gallery model it was trained for
    role: str
    preprocessing: dict  # channels, image_size, mean, std
    embed: Callable[[torch.Tensor], np.ndarray]  # uint8 (N, C, H, W) -> float32 (N, D)


def _torch_encoder(folder: str | os.PathLike) -> QueryEncoder:
    model, card = ckpt.load_model(folder)
    return QueryEncoder(
        name=card.model, embed_dim=card.embed_dim, fingerprint=card.fingerprint,
        compatible_with=(card.compatible_with or {}).get("fingerprint"), role=card.role,
        preprocessing={"channels": card.in_chans, "image_size": card.image_size, "mean": list(card.mean),
                       "std": list(card.std)},
        embed=lambda x: embed_images(model, x, card.mean, card.std).numpy())


# Loaders by file kind: a model folder, or (registered by hvs.export) an ``.onnx`` file.
ENCODER_LOADERS: dict[str, Callable[[str], QueryEncoder]] = {}


def load_query_encoder(path: str | os.PathLike) -> QueryEncoder:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ENCODER_LOADERS:
        return ENCODER_LOADERS[suffix](str(path))
    if suffix == ".onnx":
        from . import export  # noqa: F401  registers the ONNX loader
        if suffix in ENCODER_LOADERS:
            return ENCODER_LOADERS[suffix](str(path))
    return _torch_encoder(path)


def check_encoder(encoder: QueryEncoder, meta: dict, *, force: bool = False) -> str | None:
    """Refuse a query encoder that was not made for the index's gallery model."""
    g = meta.get("gallery_model") or {}
    dim = int(meta.get("dim", g.get("embed_dim", encoder.embed_dim)))
    if encoder.embed_dim != dim:
        raise SearchError(f"query model embeds {encoder.embed_dim}-d vectors but the index holds {dim}-d vectors")
    pre = meta.get("preprocessing") or {}
    for key in ("channels", "image_size"):
        if key in pre and pre[key] != encoder.preprocessing[key]:
            raise SearchError(f"query model reads {key}={encoder.preprocessing[key]} but the index was built "
                              f"with {key}={pre[key]}")
    msg = ckpt.compatibility_issue(encoder.name, encoder.fingerprint, encoder.compatible_with, g.get("fingerprint"),
                                   f"the index was built by gallery model {g.get('model')} with")
    if msg is None:
        return None
    if not force:
        raise SearchError(msg + "; pass --force to search anyway")
    return msg


class Searcher:
    """An index plus a compatible query encoder: images in, ranked gallery records out."""

    def __init__(self, index: str | GalleryIndex, query_model: str | os.PathLike | QueryEncoder, *,
                 force: bool = False) -> None:
        self.index = open_index(index) if isinstance(index, str) else index
        self.encoder = query_model if isinstance(query_model, QueryEncoder) else load_query_encoder(query_model)
        self.warning = check_encoder(self.encoder, self.index.meta, force=force)

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
        """Decode image files (or bytes) exactly as the gallery images were decoded."""
        pre = self.encoder.preprocessing
        return torch.stack([load_image(s, pre["image_size"], pre["channels"]) for s in sources])

    def search_files(self, sources: Sequence[str | os.PathLike | bytes], k: int = 10) -> list[list[dict[str, Any]]]:
        return self.search_images(self.load(sources), k)


__all__ = ["QueryEncoder", "SearchError", "Searcher", "build_gallery_index", "check_encoder", "gallery_inputs",
           "index_meta",
           "load_query_encoder", "IndexStoreError"]
