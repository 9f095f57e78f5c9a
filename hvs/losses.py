"""Margin-softmax classifier heads and the compatibility losses.

Margin softmax (cosine logits of L2-normalised embeddings and class weights, scaled by ``s``):
- NormFace (Wang et al. 2017): no margin;
- CosFace (Wang et al. 2018): cos(theta_y) - m on the target logit;
- ArcFace (Deng et al. 2019): cos(theta_y + m) on the target logit.

Compatibility losses, each a small ``nn.Module`` applied as
``loss(query_emb, labels, ref_emb=gallery_emb, ref_labels=...)`` (pytorch-metric-learning's
``ref_emb`` pattern), registered by name (``create_compat_loss(name, **kw)``,
``list_compat_losses()``, :func:`register_compat_loss` for new ones) and composable with weights
(``--compat bct=1 --compat l2=0.5``):
- ``bct``: the influence loss of Backward-Compatible Training (Shen et al. 2020): the query
  embedding is classified by the *frozen* gallery classifier W_g with the same margin softmax, so
  it must land where the gallery model puts that class. Classes the gallery never saw get rows
  synthesised as their mean gallery embedding (done once, before training: see
  :func:`synthesize_gallery_classifier`).
- ``l2``: feature regression of the query embedding onto the gallery embedding of the same image
  (weak but non-zero compatibility in the BCT paper).
- ``contrastive``: cross-model InfoNCE, query anchors against the batch's gallery embeddings;
  every gallery embedding of the anchor's class is a positive (AML-style asymmetric contrastive).

Distillation from the frozen gallery model on every training image, comparing *relations* to the
batch rather than each image's own vector (what asymmetric-retrieval work distils, e.g.
Budnik & Avrithis, "Asymmetric metric learning for knowledge transfer", CVPR 2021; Park et al.,
"Relational knowledge distillation", CVPR 2019). With the batch's gallery embeddings g_j as
anchors, the query embedding q_i of image i should see them as the gallery model's g_i does:
- ``relational``: mean squared difference of the cosine matrices, (cos(q_i, g_j) - cos(g_i, g_j))^2
  over all i, j of the batch (the diagonal asks cos(q_i, g_i) = 1: feature regression's
  direction term);
- ``simdist``: similarity-distribution matching, KL(p_i || p'_i) with p_i = softmax_j(cos(g_i, g_j)
  / T) the gallery model's distribution over the anchors and p'_i = softmax_j(cos(q_i, g_j) / T)
  the query's, averaged over anchors i.
Neither needs labels, so both work where classes are few-shot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

MARGIN_LOSSES = ("normface", "cosface", "arcface")


def margin_logits(cosine: torch.Tensor, labels: torch.Tensor, kind: str, scale: float, margin: float) -> torch.Tensor:
    """Apply a margin to the target-class cosine and scale: the logits for cross-entropy."""
    if kind not in MARGIN_LOSSES:
        raise ConfigError(f"unknown margin loss {kind!r}; expected one of {', '.join(MARGIN_LOSSES)}")
    if kind == "normface" or margin == 0:
        return scale * cosine
    target = cosine.gather(1, labels[:, None])
    if kind == "cosface":
        new_target = target - margin
    else:  # arcface; beyond theta + m > pi the angle would wrap, use CosFace's linear penalty instead
        theta = torch.acos(target.clamp(-1 + 1e-6, 1 - 1e-6))
        new_target = torch.where(
            theta + margin < math.pi, torch.cos(theta + margin), target - margin * math.sin(margin)
        )
    return scale * cosine.scatter(1, labels[:, None], new_target)


class MarginHead(nn.Module):
    """A cosine classifier: one weight row per training class."""

    def __init__(
        self, embed_dim: int, num_classes: int, kind: str = "cosface", scale: float = 16.0, margin: float = 0.2
    ) -> None:
        super().__init__()
        if kind not in MARGIN_LOSSES:
            raise ConfigError(f"unknown margin loss {kind!r}; expected one of {', '.join(MARGIN_LOSSES)}")
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) / math.sqrt(embed_dim))
        self.kind, self.scale, self.margin = kind, scale, margin

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the margin-softmax logits."""
        return F.cross_entropy(margin_logits(self.cosine(emb), labels, self.kind, self.scale, self.margin), labels)


@dataclass
class CompatContext:
    """What a trainer knows when it builds a compatibility loss: the query model's training classes
    (its label order), the frozen gallery model's classes and classifier, and the margin softmax
    the run uses. ``class_mean(row)`` is the mean gallery embedding of that class's training images."""

    classes: list[str]
    gallery_classes: list[str]
    gallery_classifier: Callable[[], torch.Tensor]
    class_mean: Callable[[int], torch.Tensor]
    kind: str = "cosface"
    scale: float = 16.0
    margin: float = 0.2
    log: Callable[[str], None] = print


class CompatLoss(nn.Module):
    """A compatibility loss: ``loss(query_emb, labels, ref_emb=gallery_emb, ref_labels=...)``.

    ``needs_ref``: it compares with the gallery model's embeddings of the same images (the trainer
    then runs the frozen gallery model on every batch). ``global_ref``: it compares each anchor
    with the whole batch, so on N processes it is given the all-gathered global batch."""

    name: str = ""
    needs_ref: bool = False
    global_ref: bool = False

    @classmethod
    def for_training(cls, ctx: CompatContext) -> CompatLoss:
        """The loss as a trainer builds it from what it knows (default: no arguments)."""
        return cls()


_COMPAT_REGISTRY: dict[str, type[CompatLoss]] = {}


def register_compat_loss(name: str) -> Callable[[type[CompatLoss]], type[CompatLoss]]:
    """Class decorator: make a :class:`CompatLoss` subclass available as ``name`` (``--compat name``)."""

    def deco(cls: type[CompatLoss]) -> type[CompatLoss]:
        if name in _COMPAT_REGISTRY or name == "none":
            raise ValueError(f"compatibility loss {name!r} registered twice")
        cls.name = name
        _COMPAT_REGISTRY[name] = cls
        return cls

    return deco


def list_compat_losses() -> list[str]:
    """Registered compatibility-loss names, in registration order."""
    return list(_COMPAT_REGISTRY)


def compat_loss_class(name: str) -> type[CompatLoss]:
    if name not in _COMPAT_REGISTRY:
        raise ConfigError(
            f"unknown compatibility loss {name!r}; expected one of {', '.join(['none', *list_compat_losses()])}"
        )
    return _COMPAT_REGISTRY[name]


def create_compat_loss(name: str, **kwargs: Any) -> CompatLoss:
    """Build a registered compatibility loss: ``create_compat_loss("contrastive", temperature=0.1)``."""
    return compat_loss_class(name)(**kwargs)


@register_compat_loss("bct")
class BCTLoss(CompatLoss):
    """Influence loss through a frozen gallery classifier (rows already aligned to our labels)."""

    def __init__(
        self, gallery_weight: torch.Tensor, kind: str = "cosface", scale: float = 16.0, margin: float = 0.2
    ) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(gallery_weight.detach(), dim=-1))
        self.kind, self.scale, self.margin = kind, scale, margin

    @classmethod
    def for_training(cls, ctx: CompatContext) -> BCTLoss:
        """Rows of the gallery classifier for the query's classes; unseen classes get their mean
        gallery embedding (see :func:`synthesize_gallery_classifier`)."""
        rows, synthesized = synthesize_gallery_classifier(
            ctx.gallery_classifier(), ctx.gallery_classes, ctx.classes, ctx.class_mean
        )
        if synthesized and not ctx.gallery_classes:
            ctx.log(
                "bct: the gallery model has no classifier (adopted); every classifier row is the "
                "L2-normalised mean gallery embedding of its class's training images"
            )
        elif synthesized:
            ctx.log(
                f"bct: {len(synthesized)} of {len(ctx.classes)} classes unseen by the gallery model; "
                "their classifier rows are their mean gallery embeddings"
            )
        return cls(rows, ctx.kind, ctx.scale, ctx.margin)

    def forward(
        self,
        query_emb: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cosine = F.normalize(query_emb, dim=-1) @ self.weight.t()
        return F.cross_entropy(margin_logits(cosine, labels, self.kind, self.scale, self.margin), labels)


@register_compat_loss("l2")
class L2Regression(CompatLoss):
    """Mean squared distance between query and gallery embeddings of the same images."""

    needs_ref = True

    def forward(
        self,
        query_emb: torch.Tensor,
        labels: torch.Tensor | None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if ref_emb is None:
            raise ValueError("l2 compatibility loss needs the gallery embeddings (ref_emb)")
        return (query_emb - ref_emb.detach()).pow(2).sum(-1).mean()


@register_compat_loss("contrastive")
class CrossModelContrastive(CompatLoss):
    """Supervised InfoNCE: query anchors against gallery references, positives = same label."""

    needs_ref = True
    global_ref = True  # its negatives are the batch: on N processes, the global batch

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        query_emb: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if ref_emb is None:
            raise ValueError("contrastive compatibility loss needs the gallery embeddings (ref_emb)")
        ref_labels = labels if ref_labels is None else ref_labels
        logits = F.normalize(query_emb, dim=-1) @ F.normalize(ref_emb.detach(), dim=-1).t() / self.temperature
        positives = (labels[:, None] == ref_labels[None, :]).float()
        log_prob = logits.log_softmax(dim=1)
        per_anchor = -(log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
        return per_anchor[positives.sum(1) > 0].mean()


def _cosines(query_emb: torch.Tensor, ref_emb: torch.Tensor | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(q_i, g_j), cos(g_i, g_j)) over the batch: the query's and the gallery model's view of the
    anchors; the gallery side is a target (detached)."""
    if ref_emb is None:
        raise ValueError(f"{what} compatibility loss needs the gallery embeddings (ref_emb)")
    if ref_emb.shape[0] != query_emb.shape[0]:
        raise ValueError(f"{what} needs the gallery embeddings of the same images as the queries")
    g = F.normalize(ref_emb.detach(), dim=-1)
    return F.normalize(query_emb, dim=-1) @ g.t(), g @ g.t()


@register_compat_loss("relational")
class RelationalDistillation(CompatLoss):
    """Squared difference between the query's and the gallery model's cosine to each gallery anchor."""

    needs_ref = True  # anchors: this process's batch (the gallery side of the same images as the queries)

    def forward(
        self,
        query_emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        qg, gg = _cosines(query_emb, ref_emb, "relational")
        return (qg - gg).pow(2).mean()


@register_compat_loss("simdist")
class SimilarityDistributionDistillation(CompatLoss):
    """KL divergence from the gallery model's softmax over the anchors to the query's."""

    needs_ref = True

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"simdist temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        query_emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        qg, gg = _cosines(query_emb, ref_emb, "simdist")
        target = (gg / self.temperature).log_softmax(dim=1)
        return F.kl_div((qg / self.temperature).log_softmax(dim=1), target, log_target=True, reduction="batchmean")


COMPAT_LOSSES = ("none", *list_compat_losses())  # the built-in names (the registry may grow)


def parse_compat(specs: list[str] | str | None) -> list[tuple[str, float]]:
    """``["bct", "l2=0.5"]`` or ``"bct,l2=0.5"`` -> [("bct", 1.0), ("l2", 0.5)]; "none" -> []."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out: list[tuple[str, float]] = []
    for spec in specs:
        name, _, weight = spec.strip().partition("=")
        if name == "none":
            continue
        compat_loss_class(name)  # an unknown name fails with the registered ones
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"compatibility loss weight must be a number: {spec!r}") from None
        out.append((name, w))
    return out


@torch.no_grad()
def synthesize_gallery_classifier(
    gallery_weight: torch.Tensor,
    gallery_classes: list[str],
    classes: list[str],
    class_mean_embedding: Callable[[int], torch.Tensor],
) -> tuple[torch.Tensor, list[str]]:
    """Rows of the gallery classifier for each of ``classes`` (the query training label order).

    A class the gallery model was trained on keeps its row; an unseen class gets the normalised
    mean gallery embedding of its training images (BCT, sec. 3.2). Returns the (C, D) matrix and
    the names of the synthesised classes."""
    index = {name: i for i, name in enumerate(gallery_classes)}
    rows, synthesized = [], []
    for c, name in enumerate(classes):
        if name in index:
            rows.append(F.normalize(gallery_weight[index[name]], dim=-1))
        else:
            rows.append(F.normalize(class_mean_embedding(c), dim=-1))
            synthesized.append(name)
    return torch.stack(rows), synthesized
