"""Margin-softmax classifier heads and the compatibility losses.

Margin softmax (cosine logits of L2-normalised embeddings and class weights, scaled by ``s``):
- NormFace (Wang et al. 2017): no margin;
- CosFace (Wang et al. 2018): cos(theta_y) - m on the target logit;
- ArcFace (Deng et al. 2019): cos(theta_y + m) on the target logit.

Compatibility losses, each a small callable applied as
``loss(query_emb, labels, ref_emb=gallery_emb, ref_labels=...)`` (pytorch-metric-learning's
``ref_emb`` pattern), composable with weights:
- ``bct``: the influence loss of Backward-Compatible Training (Shen et al. 2020): the query
  embedding is classified by the *frozen* gallery classifier W_g with the same margin softmax, so
  it must land where the gallery model puts that class. Classes the gallery never saw get rows
  synthesised as their mean gallery embedding (done once, before training: see
  :func:`synthesize_gallery_classifier`).
- ``l2``: feature regression of the query embedding onto the gallery embedding of the same image
  (weak but non-zero compatibility in the BCT paper).
- ``contrastive``: cross-model InfoNCE, query anchors against the batch's gallery embeddings;
  every gallery embedding of the anchor's class is a positive (AML-style asymmetric contrastive).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
MARGIN_LOSSES = ("normface", "cosface", "arcface")


def margin_logits(cosine: torch.Tensor, labels: torch.Tensor, kind: str, scale: float,
                  margin: float) -> torch.Tensor:
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
        new_target = torch.where(theta + margin < math.pi, torch.cos(theta + margin),
                                 target - margin * math.sin(margin))
    return scale * cosine.scatter(1, labels[:, None], new_target)


class MarginHead(nn.Module):
    """A cosine classifier: one weight row per training class."""

    def __init__(self, embed_dim: int, num_classes: int, kind: str = "cosface", scale: float = 16.0,
                 margin: float = 0.2) -> None:
        super().__init__()
        if kind not in MARGIN_LOSSES:
            raise ConfigError(f"unknown margin loss {kind!r}; expected one of {', '.join(MARGIN_LOSSES)}")
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) / math.sqrt(embed_dim))
        self.kind, self.scale, self.margin = kind, scale, margin

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the margin-softmax logits."""
        return F.cross_entropy(margin_logits(self.cosine(emb), labels, self.kind, self.scale, self.margin),
                               labels)


class BCTLoss:
    """Influence loss through a frozen gallery classifier (rows already aligned to our labels)."""

    needs_ref = False

    def __init__(self, gallery_weight: torch.Tensor, kind: str, scale: float, margin: float) -> None:
        self.weight = F.normalize(gallery_weight.detach(), dim=-1)
        self.kind, self.scale, self.margin = kind, scale, margin

    def __call__(self, query_emb: torch.Tensor, labels: torch.Tensor, ref_emb=None, ref_labels=None) -> torch.Tensor:
        cosine = F.normalize(query_emb, dim=-1) @ self.weight.t()
        return F.cross_entropy(margin_logits(cosine, labels, self.kind, self.scale, self.margin), labels)


class L2Regression:
    """Mean squared distance between query and gallery embeddings of the same images."""

    needs_ref = True

    def __call__(self, query_emb, labels, ref_emb=None, ref_labels=None) -> torch.Tensor:
        if ref_emb is None:
            raise ValueError("l2 compatibility loss needs the gallery embeddings (ref_emb)")
        return (query_emb - ref_emb.detach()).pow(2).sum(-1).mean()


class CrossModelContrastive:
    """Supervised InfoNCE: query anchors against gallery references, positives = same label."""

    needs_ref = True

    def __init__(self, temperature: float = 0.07) -> None:
        self.temperature = temperature

    def __call__(self, query_emb, labels, ref_emb=None, ref_labels=None) -> torch.Tensor:
        if ref_emb is None:
            raise ValueError("contrastive compatibility loss needs the gallery embeddings (ref_emb)")
        ref_labels = labels if ref_labels is None else ref_labels
        logits = F.normalize(query_emb, dim=-1) @ F.normalize(ref_emb.detach(), dim=-1).t() / self.temperature
        positives = (labels[:, None] == ref_labels[None, :]).float()
        log_prob = logits.log_softmax(dim=1)
        per_anchor = -(log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
        return per_anchor[positives.sum(1) > 0].mean()


COMPAT_LOSSES = ("none", "bct", "l2", "contrastive")


def parse_compat(specs: list[str] | str | None) -> list[tuple[str, float]]:
    """``["bct", "l2=0.5"]`` or ``"bct,l2=0.5"`` -> [("bct", 1.0), ("l2", 0.5)]; "none" -> []."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out: list[tuple[str, float]] = []
    for spec in specs:
        name, _, weight = spec.strip().partition("=")
        if name not in COMPAT_LOSSES:
            raise ConfigError(f"unknown compatibility loss {name!r}; expected one of {', '.join(COMPAT_LOSSES)}")
        if name == "none":
            continue
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"compatibility loss weight must be a number: {spec!r}") from None
        out.append((name, w))
    return out


@torch.no_grad()
def synthesize_gallery_classifier(gallery_weight: torch.Tensor, gallery_classes: list[str],
                                  classes: list[str], class_mean_embedding: Callable[[int], torch.Tensor]
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
