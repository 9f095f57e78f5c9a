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

**Several gallery models in one index** (upgrading the gallery model without re-indexing first).
Every vector of an index records the fingerprint of the gallery model that embedded it, and the
sidecar keeps a registry of the gallery models it knows, ``meta["gallery_models"]`` =
``{fingerprint: {"model", "embed_dim", "path", "preprocessing", "compatible_with"}}``, where
``compatible_with`` is the fingerprint of the gallery model it was trained backward-compatible
with (``hvs train --role gallery --gallery-model OLD --compat bct``), or None. An index written
before the registry knows one model, its ``gallery_model``; vectors that record no model are
that model's (``legacy_vectors_model`` pins it once another model is registered). The primary
``gallery_model`` stays the old one until a backfill (:mod:`hvs.index.backfill`) leaves no vector
of any other model. :class:`GallerySide` built by :meth:`GallerySide.of_index` carries the
registry (``models``) and the live vectors per model (``live``); one built by
:meth:`GallerySide.of_card` knows its model and the model's own ``compatible_with`` (which an
index it builds records in its registry). Rule 3 then reads:

4. *searching* (any ``check_pair`` call without ``same_model``): every gallery model with
   live vectors (a card: the model itself) must be the query side's gallery model (its ``compatible_with``) or the query
   side itself, or a descendant of one of them through recorded ``compatible_with`` links. A
   backward-compatible gallery model maps into its parent's space, so the query models of the
   old gallery model keep searching a half-backfilled index; a query model made for the new
   gallery model is refused while old vectors remain (the refusal says how many, and to run
   ``hvs index backfill``). ``force=True`` turns this refusal, too, into a warning. With a
   single live model this is rule 3 exactly, plus its descendants.
5. *writing* an index (``same_model=True, upgrade=True``: ``hvs index add``, ``POST /gallery``,
   the backfill): the writer is a gallery model the index knows, or a gallery model (card role
   ``gallery``) trained compatible with one it knows; the caller then registers it
   (:func:`register_patch`). Anything else is refused, never forceable, naming both sides. A
   resumed build keeps ``same_model=True`` alone: its shards are one model's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HVSError, SearchError

GALLERY_MODEL, INDEX = "gallery model", "index"  # the kinds of gallery side
REGISTRY, LEGACY = "gallery_models", "legacy_vectors_model"  # the sidecar keys of rules 4 and 5


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
    # rules 4 and 5 (an index): the gallery models it knows (fingerprint -> registry entry) and its
    # live vectors per model fingerprint (None: not counted, every vector is ``fingerprint``'s)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)
    live: Mapping[str, int] | None = field(default=None, compare=False)
    spec: str | None = None  # the index's spec, for the backfill command a refusal suggests

    @classmethod
    def of_card(cls, card: Any, folder: str | os.PathLike | None = None) -> GallerySide:
        """The gallery model folder itself (its card; ``folder`` is where it lives)."""
        path = None if folder is None else str(Path(folder).resolve())
        pre = Preprocessing.of_card(card)
        made_for = (getattr(card, "compatible_with", None) or {}).get("fingerprint")
        models = {}
        if card.fingerprint:  # its lineage, for the registry of an index it builds (rule 4)
            entry = {"model": card.model, "embed_dim": int(card.embed_dim), "path": path}
            models[card.fingerprint] = {**entry, "preprocessing": pre.as_dict(), "compatible_with": made_for}
        return cls(
            fingerprint=card.fingerprint or None,
            embed_dim=int(card.embed_dim),
            preprocessing=pre,
            model=card.model,
            path=path,
            kind=GALLERY_MODEL,
            models=models,
        )

    @classmethod
    def of_index_meta(
        cls, meta: Mapping[str, Any], counts: Mapping[str | None, int] | None = None, spec: str | None = None
    ) -> GallerySide:
        """An index sidecar (``GalleryIndex.meta``: ``dim``, ``gallery_model``, ``preprocessing``,
        ``gallery_models``); ``counts``: its live vectors per gallery-model fingerprint (None for
        vectors that record none), as ``GalleryIndex.model_counts()`` gives them."""
        g = meta.get("gallery_model") or {}
        dim = meta.get("dim", g.get("embed_dim"))
        live = None
        if counts is not None:
            legacy = meta.get(LEGACY) or g.get("fingerprint") or None
            live = {}
            for fp, n in counts.items():
                key = fp or legacy
                if n and key:
                    live[key] = live.get(key, 0) + int(n)
        return cls(
            fingerprint=g.get("fingerprint") or None,
            embed_dim=None if dim is None else int(dim),
            preprocessing=Preprocessing.from_dict(meta.get("preprocessing")),
            model=g.get("model"),
            path=g.get("path"),
            kind=INDEX,
            models=gallery_models(meta),
            live=live,
            spec=spec,
        )

    @classmethod
    def of_index(cls, index: Any) -> GallerySide:
        """An open :class:`~hvs.index.GalleryIndex`: its sidecar and its live vectors per model
        (``model_counts()``, where the backend records a model per vector)."""
        try:
            counts = index.model_counts()
        except (AttributeError, HVSError):  # a backend that records no model per vector
            counts = None
        return cls.of_index_meta(index.meta, counts, getattr(index, "spec", None))

    def index_meta(self) -> dict[str, Any]:
        """What an index sidecar records about this gallery model (read back by :meth:`of_index_meta`)."""
        pre = self.preprocessing
        out = {
            "gallery_model": {
                "model": self.model,
                "fingerprint": self.fingerprint,
                "embed_dim": self.embed_dim,
                "path": self.path,
            },
            "preprocessing": pre.as_dict() if pre is not None else {},
        }
        if self.models:
            out[REGISTRY] = {fp: dict(entry) for fp, entry in self.models.items()}
        return out

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
    upgrade: bool = False,
) -> str | None:
    """Refuse a query side that may not search (or, ``same_model``, write) the gallery side's vectors.

    Returns None for a compatible pair, or a one-line warning when the pair is let through: with
    ``force`` (a query model made for another gallery, or a gallery without a fingerprint), or
    with ``allow_independent`` for a query model trained without any gallery (evaluation
    measures exactly how incompatible it is). Raises :class:`CompatError` otherwise, its message
    ending with ``remedy`` (default: "pass --force to ACTION anyway"; none for ``same_model``).

    ``same_model=True`` is for writing vectors into the gallery (adding to an index, resuming a
    build): only the very model that made them will do, a compatible query model will not. With
    ``upgrade=True`` too (adding to an index, backfilling it), rule 5 of the module docstring:
    any gallery model the index knows, or a gallery model trained compatible with one it knows.

    A gallery side with a registry (:meth:`GallerySide.of_index`) is judged by rules 4 and 5.
    """
    q_dim, g_dim = query.embed_dim, gallery.embed_dim
    if q_dim is not None and g_dim is not None and int(q_dim) != int(g_dim):
        verb = "holds" if gallery.kind == INDEX else "uses"
        raise CompatError(f"{query.label} embeds {q_dim}-d vectors but {gallery.label} {verb} {g_dim}-d vectors")
    q_pre, g_pre = query.preprocessing, gallery.preprocessing
    # writing with the index's own model: the same size; an upgrade writer (rule 5) reads images at
    # its own size (a new gallery model may take larger images), as every query side does
    upgrade_writer = same_model and upgrade and bool(gallery.models) and query.role == "gallery"
    size_must_match = same_model and not upgrade_writer
    if (
        q_pre is not None
        and g_pre is not None
        and (q_pre.channels != g_pre.channels or (size_must_match and q_pre.image_size != g_pre.image_size))
    ):
        verb = "was built from" if gallery.kind == INDEX else "reads"
        raise CompatError(f"{query.label} reads {q_pre} images but {gallery.label} {verb} {g_pre} images")

    if upgrade_writer:
        return _check_writer(query, gallery)
    if not same_model and gallery.models:
        mixed = _check_lineage(query, gallery, force=force, action=action, remedy=remedy)
        if mixed is not False:
            return mixed
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


# ------------------------------------------------------------------------------------------------
# Rules 4 and 5: several gallery models in one index.
def registry_entry(side: QuerySide) -> dict[str, Any]:
    """What ``meta["gallery_models"]`` records of a gallery model (a writer's side)."""
    pre = side.preprocessing
    return {
        "model": side.name or None,
        "embed_dim": side.embed_dim,
        "path": side.path,
        "preprocessing": pre.as_dict() if pre is not None else {},
        "compatible_with": side.compatible_with,
    }


def gallery_models(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The gallery models an index sidecar knows: its ``gallery_models`` registry, plus its primary
    ``gallery_model`` (all a sidecar written before the registry knows). {} without a fingerprint."""
    out: dict[str, dict[str, Any]] = {}
    registry = meta.get(REGISTRY)
    if isinstance(registry, Mapping):
        for fp, entry in registry.items():
            if isinstance(fp, str) and fp and isinstance(entry, Mapping):
                out[fp] = dict(entry)
    g = meta.get("gallery_model") or {}
    fp = g.get("fingerprint") if isinstance(g, Mapping) else None
    if fp and fp not in out:
        out[fp] = {
            "model": g.get("model"),
            "embed_dim": g.get("embed_dim", meta.get("dim")),
            "path": g.get("path"),
            "preprocessing": dict(meta.get("preprocessing") or {}),
            "compatible_with": None,  # not recorded before the registry
        }
    return out


def register_patch(meta: Mapping[str, Any], writer: QuerySide) -> dict[str, Any] | None:
    """The sidecar update (``GalleryIndex.update_meta``) that registers ``writer``, a gallery model
    :func:`check_pair` let write (rule 5); None if the index knows it already. It pins the model of
    the vectors that record none (``legacy_vectors_model``) to the primary gallery model."""
    known = gallery_models(meta)
    if writer.fingerprint in known:
        return None
    known[writer.fingerprint] = registry_entry(writer)
    patch: dict[str, Any] = {REGISTRY: known}
    primary = (meta.get("gallery_model") or {}).get("fingerprint")
    if not meta.get(LEGACY) and primary:
        patch[LEGACY] = primary
    return patch


def primary_patch(meta: Mapping[str, Any], fingerprint: str) -> dict[str, Any]:
    """The sidecar update that makes the registered model ``fingerprint`` the index's primary
    ``gallery_model`` (and ``preprocessing``): once no vector of another model remains."""
    entry = gallery_models(meta)[fingerprint]
    return {
        "gallery_model": {
            "model": entry.get("model"),
            "fingerprint": fingerprint,
            "embed_dim": entry.get("embed_dim"),
            "path": entry.get("path"),
        },
        "preprocessing": dict(entry.get("preprocessing") or {}),
    }


def descendants(models: Mapping[str, Mapping[str, Any]], roots: set[str]) -> set[str]:
    """``roots`` and every model whose ``compatible_with`` chain (in ``models``) reaches one of them."""
    out = {r for r in roots if r}
    for fp in models:
        seen, cur = set(), fp
        while cur and cur not in out and cur not in seen:
            seen.add(cur)
            cur = (models.get(cur) or {}).get("compatible_with")
        if cur in out:
            out |= seen
    return out


def _name(models: Mapping[str, Mapping[str, Any]], fp: str) -> str:
    name = (models.get(fp) or {}).get("model")
    return f"gallery model {name} ({fp})" if name else f"gallery model {fp}"


def _check_writer(query: QuerySide, gallery: GallerySide) -> None:
    """Rule 5 for a gallery model: one the index knows, or one trained compatible with a known one."""
    known = gallery.models
    if query.fingerprint in known or query.compatible_with in known:
        return None  # the latter is an upgrade: the caller registers it (register_patch)
    made_for = (
        f"was trained compatible with {query.compatible_with}" if query.compatible_with else "was trained independently"
    )
    raise CompatError(
        f"{query.path or query.long_label} (fingerprint {query.fingerprint or 'none'}) is not a gallery model "
        f"{gallery.label} knows ({', '.join(sorted(known))}) and {made_for}: its vectors would live in another "
        "embedding space (train it with hvs train --role gallery --gallery-model KNOWN --compat bct)"
    )


def _check_lineage(
    query: QuerySide, gallery: GallerySide, *, force: bool, action: str, remedy: str | None
) -> str | None | bool:
    """Rule 4. None: accepted; a warning (forced); False: a one-model index refused (rule 3 words it)."""
    live = {fp: n for fp, n in (gallery.live or {}).items() if fp and n}
    if not live:  # not counted, or an empty index: judged by its primary gallery model
        live = {gallery.fingerprint: 1} if gallery.fingerprint else {}
    ok = descendants(gallery.models, {query.fingerprint, query.compatible_with} - {None, ""})
    bad = {fp: n for fp, n in live.items() if fp not in ok}
    if not bad:
        return None
    if len(live) == 1 and gallery.fingerprint in live:
        return False  # the single-model refusal of rule 3, in its own words
    total, n_bad = sum(live.values()), sum(bad.values())
    worst = max(bad, key=lambda fp: bad[fp])
    others = f" and {len(bad) - 1} other model(s)" if len(bad) > 1 else ""
    msg = (
        f"{query.long_label} was trained for gallery fingerprint {query.compatible_with or 'none (independent)'}, "
        f"but {n_bad} of {gallery.label}'s {total} vectors come from {_name(gallery.models, worst)}{others}, "
        "which it is not compatible with"
    )
    if force:
        return msg
    spec = gallery.spec or "INDEX"
    target = query.compatible_with if query.compatible_with in gallery.models else None
    backfill = (
        f"run hvs index backfill {spec} --gallery-model {(gallery.models[target] or {}).get('path') or 'DIR'} "
        "to re-embed them"
        if target
        else "re-embed them with hvs index backfill"
    )
    raise CompatError(f"{msg}; {remedy or f'{backfill}, or pass --force to {action} anyway'}")


def index_meta(card: Any, folder: str | os.PathLike) -> dict[str, Any]:
    """What an index sidecar records about the gallery model (card at ``folder``) that made its vectors."""
    return GallerySide.of_card(card, folder).index_meta()


__all__ = [
    "CompatError",
    "GallerySide",
    "Preprocessing",
    "QuerySide",
    "check_pair",
    "descendants",
    "gallery_models",
    "index_meta",
    "primary_patch",
    "register_patch",
    "registry_entry",
]
