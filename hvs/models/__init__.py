"""Model registry: ``create_model(name, embed_dim=..., in_chans=...)`` and ``list_models()``.

Every model is an :class:`EmbeddingModel`: a backbone giving pooled features, a linear embedding
layer with BatchNorm, and L2 normalisation, so gallery and query models of any architecture produce
vectors on the same unit sphere and can be compared by inner product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import backbones as bb


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


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]  # (in_chans=..., **kwargs) -> backbone
    role: str  # "gallery" or "query": what the model is meant for (both can be used either way)
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, role: str, description: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, role, description)
        return fn

    return deco


def list_models(role: str | None = None) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if role is None or e.role == role)


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, embed_dim: int = 128, in_chans: int = 1, **kwargs) -> EmbeddingModel:
    """Build a registered model with random weights (nothing is ever downloaded)."""
    entry = model_entry(name)
    try:
        backbone = entry.builder(in_chans=in_chans, **kwargs)
    except TypeError as e:  # an argument the architecture does not take
        raise ConfigError(f"model {name!r} does not accept {', '.join(map(repr, kwargs)) or 'these'} "
                         f"argument(s): {e}") from None
    return EmbeddingModel(backbone, embed_dim=embed_dim)


# Gallery backbones: the ResNet family.
for _depth in (8, 14, 20, 32):
    register_model(f"resnet{_depth}", "gallery", f"CIFAR-layout ResNet-{_depth}, stage widths 16/32/64 x width")(
        lambda in_chans=1, width=1.5, _d=_depth: bb.CifarResNet(_d, width, in_chans))
for _arch in ("resnet18", "resnet34", "resnet50"):
    register_model(_arch, "gallery", f"torchvision {_arch}, 3x3 stride-1 stem (total stride 16)")(
        lambda in_chans=1, _a=_arch: bb.TorchvisionResNet(_a, in_chans))

# Off-the-shelf query backbones compared in the CMP-NAS paper (timm / torchvision architectures).
_TIMM_QUERY = {
    "mobilenetv1": ("mobilenetv1_100", "MobileNetV1 1.0x"),
    "mobilenetv2_050": ("mobilenetv2_050", "MobileNetV2 0.5x"),
    "mobilenetv2_100": ("mobilenetv2_100", "MobileNetV2 1.0x"),
    "mobilenetv3_small": ("mobilenetv3_small_100", "MobileNetV3-Small 1.0x"),
    "mobilenetv3_large": ("mobilenetv3_large_100", "MobileNetV3-Large 1.0x"),
    "mnasnet": ("mnasnet_100", "MnasNet-A1 1.0x (ProxylessNAS-style mobile search space)"),
    "mnasnet_small": ("mnasnet_small", "MnasNet small"),
}
for _name, (_arch, _desc) in _TIMM_QUERY.items():
    register_model(_name, "query", f"timm {_arch}: {_desc}, stride-1 stem")(
        lambda in_chans=1, _a=_arch, **kw: bb.TimmBackbone(_a, in_chans, **kw))
for _w in ("x0_5", "x1_0"):
    register_model(f"shufflenetv2_{_w[1:].replace('_', '')}", "query",
                   f"torchvision ShuffleNetV2 {_w[1:].replace('_', '.')}x, stride-1 first conv")(
        lambda in_chans=1, _w=_w: bb.ShuffleNetV2(_w, in_chans))

# Hand-picked plain CNNs: the cheapest query nets (the baseline CMP-NAS has to beat).
register_model("cnn-tiny", "query", "plain CNN 16/32/64, ~2 MFLOPs at 28 px")(
    lambda in_chans=1: bb.PlainCNN((16, 32, 64), in_chans))
register_model("cnn-small", "query", "plain CNN 32/64/128, ~8 MFLOPs at 28 px")(
    lambda in_chans=1: bb.PlainCNN((32, 64, 128), in_chans))
register_model("cnn-nano", "query", "plain CNN 8/16/32, ~0.5 MFLOPs at 28 px")(
    lambda in_chans=1: bb.PlainCNN((8, 16, 32), in_chans))
from . import ofa  # noqa: E402,F401
