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
from ..embed import embed_images, resize_images
from ..errors import HVSError
from ..losses import CompatContext, CompatLoss, compat_loss_class


def check_gallery_card(
    card: ckpt.ModelCard,
    embed_dim: int,
    data: RetrievalData,
    *,
    force: bool,
    error: type[HVSError],
    image_size: int | None = None,
) -> None:
    """A model trained against this gallery model must share its embedding space and read its
    channels; the data must be decoded at least at each side's size (the gallery's, and the query
    model's ``image_size``), since each side's images are resized down to its own size."""
    if card.embed_dim != embed_dim:
        raise error(
            f"embed_dim {embed_dim} differs from the gallery model's {card.embed_dim}: compatible "
            "embeddings must share one space"
        )
    if card.in_chans != data.channels and not force:
        raise error(
            f"gallery model expects {card.in_chans}x{card.image_size}px input, the data is "
            f"{data.channels}x{data.image_size}px (pass --force to ignore)"
        )
    need = max(card.image_size, image_size or 0)
    if data.image_size < need and not force:
        raise error(
            f"the data is decoded at {data.image_size}px but the gallery model reads {card.image_size}px"
            + (f" and the query model {image_size}px" if image_size else "")
            + f" images: decode it at {need}px or more (pass --force to upscale)"
        )


def renormalizer(data: RetrievalData, g_card: ckpt.ModelCard) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps a batch normalised with the data's mean/std to the gallery model's (its card's), and
    resizes it to the gallery model's input size when the data is decoded larger
    (:func:`hvs.embed.resize_images`), so the frozen model sees its own preprocessing; the
    identity when they agree. Built once."""
    size = getattr(g_card, "image_size", None)
    if list(g_card.mean) == list(data.mean) and list(g_card.std) == list(data.std):
        return lambda x: resize_images(x, size)
    shape = (1, -1, 1, 1)
    dm, ds = torch.tensor(data.mean).view(shape), torch.tensor(data.std).view(shape)
    gm, gs = torch.tensor(g_card.mean).view(shape), torch.tensor(g_card.std).view(shape)
    return lambda x: resize_images((x * ds.to(x) + dm.to(x) - gm.to(x)) / gs.to(x), size)


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
        """What a compatibility loss may need to be built (BCT: the classifier and class means).

        ``images`` may be larger than the gallery model's input: each class's images are resized
        to it (:func:`hvs.embed.resize_images`) before they are embedded.

        A gallery model without a classifier (an adopted one, :mod:`hvs.adopt`) offers an empty
        classifier with no classes: BCT then synthesises *every* row as the L2-normalised mean
        gallery embedding of that class's training images. This is what BCT (Shen et al.,
        "Towards Backward-Compatible Representation Learning", CVPR 2020, sec. 3.2) does for
        the new classes of a training set the old model never saw: the old classifier has no
        row for them, so the old model's mean embedding of the class stands in as its
        "synthesised classifier" row; with no old classifier at all, every class is new."""
        size = self.card.image_size

        def class_mean(row: int) -> torch.Tensor:
            return embed_images(
                self.model, images[targets == row], self.card.mean, self.card.std, image_size=size
            ).mean(0)

        if self.has_classifier:
            gallery_classes, classifier = self.card.classes, lambda: ckpt.load_classifier(self.path)
        else:
            gallery_classes, classifier = [], lambda: torch.zeros(0, self.card.embed_dim)
        return CompatContext(classes, gallery_classes, classifier, class_mean, kind, scale, margin, log)

    @property
    def has_classifier(self) -> bool:
        """False for an adopted gallery model (no ``classifier.safetensors``)."""
        return not self.card.adopted or (Path(self.path) / ckpt.CLASSIFIER).is_file()


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
        """The gallery embeddings of the batch (one forward pass), or None when no term needs them.
        ``to_gallery`` maps the batch to the gallery model's input (its normalisation and size)."""
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
