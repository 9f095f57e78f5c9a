"""The one model shape: backbone features -> linear -> BatchNorm1d -> L2 normalisation.

Gallery and query models of any architecture produce vectors on the same unit sphere, so they
can be compared by inner product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingModel(nn.Module):
    """backbone -> linear -> BatchNorm1d -> L2 normalise."""

    def __init__(self, backbone: nn.Module, embed_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.neck = nn.Linear(backbone.num_features, embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.neck(self.backbone(x))), dim=-1)


__all__ = ["EmbeddingModel"]
