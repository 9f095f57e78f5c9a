"""The pairing rule: may this query encoder search the vectors of that gallery?

Heterogeneous search (Duggal et al., "Compatibility-aware Heterogeneous Visual Search", CVPR
2021) compares the small query model's embeddings with embeddings the large gallery model made
offline. That is only meaningful when the two share one embedding space, and this module is the
one place that decides it. Every path that pairs a query side with a gallery side calls
:func:`check_pair`: ``hvs evaluate``, :class:`~hvs.search.Searcher` (``hvs search`` and the
server's start-up), adding to an index (``hvs index add``, ``POST /gallery``), resuming an index
build (single- or multi-process), the ONNX export's M(q->g) check, and the NAS search and export.

The two sides are typed records of what the artefacts say:

* :class:`GallerySide`: a gallery model's card, or an index sidecar, about the model that made
  (or makes) the gallery vectors: its weights fingerprint, embedding dimension, preprocessing;
* :class:`QuerySide`: a query encoder (model folder, ONNX file, supernet) about itself: its own
  fingerprint, the gallery fingerprint it was trained for, dimension and preprocessing.

The rule, in the order it is checked:

1. the dimensions agree (never forceable: vectors of two sizes cannot be compared);
2. the input channels agree (never forceable: both sides read the same images); the sizes may
   differ (a cheaper query model at a lower resolution: each side reads images at its own
   size), except when the query side is to write gallery vectors (``same_model``);
3. the query side *is* the gallery model (same fingerprint), or was trained for it
   (``compatible_with``); with ``same_model=True`` (writing gallery vectors) only the first
   will do. A gallery side without a recorded fingerprint cannot be checked. This refusal is
   the one ``force=True`` turns into a returned warning.

Each refusal has one wording, with the sides named by their ``label`` ("query model resnet8",
"the supernet"; "the gallery model", "the index").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SearchError

GALLERY_MODEL, INDEX = "gallery model", "index"  # the kinds of gallery side


class CompatError(SearchError):
    """A query encoder refused for a gallery by :func:`check_pair` (one-line message)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model reads images: uint8 (channels, image_size, image_size), then ``(x/255-mean)/std``."""

    channels: int
    image_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def of_card(cls, card: Any) -> Preprocessing:
        """From a model card (or any card with ``in_chans``, ``image_size``, ``mean``, ``std``)."""
        return cls(int(card.in_chans), int(card.image_size), tuple(card.mean), tuple(card.std))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Preprocessing | None:
        """From a sidecar's / ONNX metadata's ``preprocessing`` entry; None if it records none."""
        if not d or "channels" not in d or "image_size" not in d:
            return None
        return cls(int(d["channels"]), int(d["image_size"]), tuple(d.get("mean") or ()), tuple(d.get("std") or ()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __str__(self) -> str:
        return f"{self.channels}x{self.image_size}px"


@dataclass(frozen=True)
class GallerySide:
    """What a gallery model's card or an index sidecar says about the model behind the gallery
    vectors. ``None`` fields are not recorded (a hand-made index has no fingerprint)."""

    fingerprint: str | None
    embed_dim: int | None
    preprocessing: Preprocessing | None
    model: str | None = None
    path: str | None = None
    kind: str = GALLERY_MODEL  # GALLERY_MODEL or INDEX: how refusals name this side

    @classmethod
    def of_card(cls, card: Any, folder: str | os.PathLike | None = None) -> GallerySide:
        """The gallery model folder itself (its card; ``folder`` is where it lives)."""
        return cls(
            fingerprint=card.fingerprint or None,
            embed_dim=int(card.embed_dim),
            preprocessing=Preprocessing.of_card(card),
            model=card.model,
            path=None if folder is None else str(Path(folder).resolve()),
            kind=GALLERY_MODEL,
        )

    @classmethod
    def of_index_meta(cls, meta: Mapping[str, Any]) -> GallerySide:
        """An index sidecar (``GalleryIndex.meta``: ``dim``, ``gallery_model``, ``preprocessing``)."""
        g = meta.get("gallery_model") or {}
        dim = meta.get("dim", g.get("embed_dim"))
        return cls(
            fingerprint=g.get("fingerprint") or None,
            embed_dim=None if dim is None else int(dim),
            preprocessing=Preprocessing.from_dict(meta.get("preprocessing")),
            model=g.get("model"),
            path=g.get("path"),
            kind=INDEX,
        )

    def index_meta(self) -> dict[str, Any]:
        """What an index sidecar records about this gallery model (read back by :meth:`of_index_meta`)."""
        pre = self.preprocessing
        return {
            "gallery_model": {
                "model": self.model,
                "fingerprint": self.fingerprint,
                "embed_dim": self.embed_dim,
                "path": self.path,
            },
            "preprocessing": pre.as_dict() if pre is not None else {},
        }

    # -- how refusals name this side ----------------------------------------------------------------
    @property
    def label(self) -> str:
        return "the index" if self.kind == INDEX else "the gallery model"

    @property
    def long_label(self) -> str:
        owner = "the index's gallery model" if self.kind == INDEX else "gallery model"
        return (
            f"{owner} {self.model}"
            if self.model
            else ("the index's gallery model" if self.kind == INDEX else "the gallery model")
        )


@dataclass(frozen=True)
class QuerySide:
    """What a query encoder (model folder, ONNX export, supernet) says about itself."""

    name: str
    fingerprint: str  # of its own weights
    compatible_with: str | None  # fingerprint of the gallery model it was trained for
    embed_dim: int | None
    preprocessing: Preprocessing | None
    role: str = "query"
    label: str = "query model"  # how refusals name it ("the supernet")
    path: str | None = None

    @classmethod
    def of_card(cls, card: Any, folder: str | os.PathLike | None = None, *, label: str = "query model") -> QuerySide:
        """From a model card (``compatible_with``) or a supernet card (``gallery``): both record
        the gallery model trained against as ``{"fingerprint", "model", "path"}``. ``label``
        names the side in refusals: "gallery model" when it is to write gallery vectors,
        "the supernet" for a supernet card (which has no model name)."""
        made_for = getattr(card, "compatible_with", None) or getattr(card, "gallery", None) or {}
        return cls(
            name=getattr(card, "model", ""),
            fingerprint=card.fingerprint,
            compatible_with=made_for.get("fingerprint"),
            embed_dim=int(card.embed_dim),
            preprocessing=Preprocessing.of_card(card),
            role=getattr(card, "role", "query"),
            label=label,
            path=None if folder is None else str(folder),
        )

    @classmethod
    def of_encoder(
        cls, encoder: Any, path: str | os.PathLike | None = None, *, label: str = "query model"
    ) -> QuerySide:
        """From a :class:`~hvs.encoders.QueryEncoder` (any object with its fields) loaded from ``path``."""
        return cls(
            name=encoder.name,
            fingerprint=encoder.fingerprint,
            compatible_with=encoder.compatible_with,
            embed_dim=int(encoder.embed_dim),
            preprocessing=Preprocessing.from_dict(encoder.preprocessing),
            role=encoder.role,
            label=label,
            path=None if path is None else str(path),
        )

    @classmethod
    def writer_of(cls, gallery: GallerySide) -> QuerySide:
        """The gallery model a sidecar (or a build's manifest) names, as the side about to write
        vectors into another gallery (checked with ``same_model=True``)."""
        return cls(
            name=gallery.model or "",
            fingerprint=gallery.fingerprint or "",
            compatible_with=None,
            embed_dim=gallery.embed_dim,
            preprocessing=gallery.preprocessing,
            role="gallery",
            label="gallery model",
            path=gallery.path,
        )

    @property
    def long_label(self) -> str:
        return f"{self.label} {self.name}" if self.name else self.label


def check_pair(
    query: QuerySide,
    gallery: GallerySide,
    *,
    force: bool = False,
    same_model: bool = False,
    allow_independent: bool = False,
    action: str = "search",
    remedy: str | None = None,
) -> str | None:
    """Refuse a query side that may not search (or, ``same_model``, write) the gallery side's vectors.

    Returns None for a compatible pair, or a one-line warning when the pair is let through: with
    ``force`` (a query model made for another gallery, or a gallery without a fingerprint), or
    with ``allow_independent`` for a query model trained without any gallery (evaluation
    measures exactly how incompatible it is). Raises :class:`CompatError` otherwise, its message
    ending with ``remedy`` (default: "pass --force to ACTION anyway"; none for ``same_model``).

    ``same_model=True`` is for writing vectors into the gallery (adding to an index, resuming a
    build): only the very model that made them will do, a compatible query model will not.
    """
    q_dim, g_dim = query.embed_dim, gallery.embed_dim
    if q_dim is not None and g_dim is not None and int(q_dim) != int(g_dim):
        verb = "holds" if gallery.kind == INDEX else "uses"
        raise CompatError(f"{query.label} embeds {q_dim}-d vectors but {gallery.label} {verb} {g_dim}-d vectors")
    q_pre, g_pre = query.preprocessing, gallery.preprocessing
    if (
        q_pre is not None
        and g_pre is not None
        and (q_pre.channels != g_pre.channels or (same_model and q_pre.image_size != g_pre.image_size))
    ):
        verb = "was built from" if gallery.kind == INDEX else "reads"
        raise CompatError(f"{query.label} reads {q_pre} images but {gallery.label} {verb} {g_pre} images")

    target, made_for = gallery.fingerprint, query.compatible_with
    if not target:
        msg = f"{gallery.label} has no recorded fingerprint, so {query.long_label} cannot be checked for compatibility"
    elif query.fingerprint == target:
        return None
    elif same_model:
        what = "built this index" if gallery.kind == INDEX else "made the gallery vectors"
        msg = (
            f"{query.path or query.long_label} (fingerprint {query.fingerprint or 'none'}) is not the gallery model "
            f"that {what} ({target}): its vectors would live in another embedding space"
        )
    elif made_for == target:
        return None
    elif made_for is None and allow_independent:
        return f"{query.long_label} was trained independently (no compatibility with any gallery model)"
    else:
        msg = (
            f"{query.long_label} was trained for gallery fingerprint {made_for or 'none (independent)'}, "
            f"but {gallery.long_label} has fingerprint {target}"
        )
    if force:
        return msg
    if remedy is None and same_model:
        raise CompatError(msg)  # no forcing a write of another space's vectors: the message is the remedy
    raise CompatError(f"{msg}; {remedy or f'pass --force to {action} anyway'}")


def index_meta(card: Any, folder: str | os.PathLike) -> dict[str, Any]:
    """What an index sidecar records about the gallery model (card at ``folder``) that made its vectors."""
    return GallerySide.of_card(card, folder).index_meta()


__all__ = ["CompatError", "GallerySide", "Preprocessing", "QuerySide", "check_pair", "index_meta"]
