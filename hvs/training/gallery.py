"""The frozen gallery model a query model (or a supernet) is trained to be compatible with, and
the weighted compatibility losses computed against it.

Both trainers build their compatibility terms here: :func:`build_compat_terms` turns specs such
as ``[("bct", 1.0), ("l2", 0.5)]`` into registered losses (:mod:`hvs.losses`), and
:class:`CompatTerms` runs the gallery model once per batch (only when a term needs its
embeddings) and adds each weighted term to the loss, PML's
``loss(query_emb, labels, ref_emb=gallery_emb, ref_labels=...)`` call."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..data import RetrievalData
from ..embed import embed_images
from ..errors import HVSError
from ..losses import CompatContext, CompatLoss, compat_loss_class


def check_gallery_card(
    card: ckpt.ModelCard, embed_dim: int, data: RetrievalData, *, force: bool, error: type[HVSError]
) -> None:
    """A model trained against this gallery model must share its embedding space and read its input."""
    if card.embed_dim != embed_dim:
        raise error(
            f"embed_dim {embed_dim} differs from the gallery model's {card.embed_dim}: compatible "
            "embeddings must share one space"
        )
    if (card.in_chans, card.image_size) != (data.channels, data.image_size) and not force:
        raise error(
            f"gallery model expects {card.in_chans}x{card.image_size}px input, the data is "
            f"{data.channels}x{data.image_size}px (pass --force to ignore)"
        )


def renormalizer(data: RetrievalData, g_card: ckpt.ModelCard) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps a batch normalised with the data's mean/std to the gallery model's (its card's), so the
    frozen model sees its own preprocessing; the identity when they agree. Built once."""
    if list(g_card.mean) == list(data.mean) and list(g_card.std) == list(data.std):
        return lambda x: x
    shape = (1, -1, 1, 1)
    dm, ds = torch.tensor(data.mean).view(shape), torch.tensor(data.std).view(shape)
    gm, gs = torch.tensor(g_card.mean).view(shape), torch.tensor(g_card.std).view(shape)
    return lambda x: (x * ds.to(x) + dm.to(x) - gm.to(x)) / gs.to(x)


@dataclass
class FrozenGallery:
    """A gallery model folder loaded for training against: weights verified, gradients off."""

    path: str
    model: nn.Module
    card: ckpt.ModelCard

    @classmethod
    def load(cls, path: str | os.PathLike) -> FrozenGallery:
        model, card = ckpt.load_model(path)
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(str(path), model, card)

    def reference(self) -> dict[str, str]:
        """What a card records of the gallery it was trained for."""
        return {"fingerprint": self.card.fingerprint, "model": self.card.model, "path": str(Path(self.path).resolve())}

    def context(
        self,
        classes: list[str],
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        kind: str,
        scale: float,
        margin: float,
        log: Callable[[str], None],
    ) -> CompatContext:
        """What a compatibility loss may need to be built (BCT: the classifier and class means)."""

        def class_mean(row: int) -> torch.Tensor:
            return embed_images(self.model, images[targets == row], self.card.mean, self.card.std).mean(0)

        return CompatContext(
            classes, self.card.classes, lambda: ckpt.load_classifier(self.path), class_mean, kind, scale, margin, log
        )


@dataclass
class CompatTerm:
    key: str  # the name it is logged under
    weight: float
    loss: CompatLoss


class CompatTerms:
    """The weighted compatibility losses of a run and the gallery model they compare with."""

    def __init__(
        self,
        terms: list[CompatTerm],
        gallery: FrozenGallery | None = None,
        to_gallery: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ) -> None:
        self.terms, self.gallery, self.to_gallery = terms, gallery, to_gallery
        self.needs_ref = any(t.loss.needs_ref for t in terms)
        self.keys = [t.key for t in terms]

    def to(self, device: torch.device) -> CompatTerms:
        for t in self.terms:
            t.loss.to(device)
        if self.gallery is not None:
            self.gallery.model.to(device)
        return self

    def __bool__(self) -> bool:
        return bool(self.terms)

    @torch.no_grad()
    def reference(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gallery embeddings of the batch (one forward pass), or None when no term needs them."""
        return self.gallery.model(self.to_gallery(x)) if self.needs_ref and self.gallery is not None else None

    def add(
        self,
        loss: torch.Tensor,
        emb: torch.Tensor,
        y: torch.Tensor,
        ref: torch.Tensor | None,
        sums: dict[str, float],
        divisor: int = 1,
    ) -> torch.Tensor:
        """``loss`` plus every weighted term; each term's value (/ ``divisor``) is added to ``sums``.

        A term comparing with the whole batch (``global_ref``) gets the all-gathered global batch
        on N processes, so its negatives are those of one process."""
        gathered = None
        for t in self.terms:
            if t.loss.global_ref and dist.world_size() > 1:
                if gathered is None:
                    gathered = dist.all_gather(ref), dist.all_gather(y)
                value = t.loss(emb, y, ref_emb=gathered[0], ref_labels=gathered[1])
            else:
                value = t.loss(emb, y, ref_emb=ref, ref_labels=y)
            sums[t.key] += value.item() / divisor
            loss = loss + t.weight * value
        return loss


def build_compat_terms(
    specs: list[tuple[str, float]],
    gallery: FrozenGallery | None,
    context: CompatContext,
    *,
    keys: dict[str, str] | None = None,
    to_gallery: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> CompatTerms:
    """Registered losses for ``[(name, weight)]``, each built from the run's ``context``. ``keys``
    renames a term in the log (the supernet logs ``l2`` as ``regress``)."""
    terms = [
        CompatTerm((keys or {}).get(name, name), weight, compat_loss_class(name).for_training(context))
        for name, weight in specs
    ]
    return CompatTerms(terms, gallery, to_gallery)
