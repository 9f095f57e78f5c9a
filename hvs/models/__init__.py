"""Model registry: ``create_model(name, embed_dim=..., in_chans=...)`` and ``list_models()``.

The registry itself lives in :mod:`hvs.models._registry`; this module registers the built-in
architectures (and imports :mod:`hvs.models.ofa`, which registers ``ofa-mbv3``). Every model is
an :class:`EmbeddingModel`: a backbone giving pooled features, a linear embedding layer with
BatchNorm, and L2 normalisation, so gallery and query models of any architecture produce vectors
on the same unit sphere and can be compared by inner product.
"""

from __future__ import annotations

from . import backbones as bb
from ._registry import ModelEntry, create_model, list_models, model_entry, register_model
from .embedding import EmbeddingModel

# Gallery backbones: the ResNet family.
for _depth in (8, 14, 20, 32):
    register_model(f"resnet{_depth}", "gallery", f"CIFAR-layout ResNet-{_depth}, stage widths 16/32/64 x width")(
        lambda in_chans=1, width=1.5, _d=_depth: bb.CifarResNet(_d, width, in_chans)
    )
for _arch in ("resnet18", "resnet34", "resnet50"):
    register_model(_arch, "gallery", f"torchvision {_arch}, 3x3 stride-1 stem (total stride 16)")(
        lambda in_chans=1, _a=_arch: bb.TorchvisionResNet(_a, in_chans)
    )

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
        lambda in_chans=1, _a=_arch, **kw: bb.TimmBackbone(_a, in_chans, **kw)
    )
for _w in ("x0_5", "x1_0"):
    register_model(
        f"shufflenetv2_{_w[1:].replace('_', '')}",
        "query",
        f"torchvision ShuffleNetV2 {_w[1:].replace('_', '.')}x, stride-1 first conv",
    )(lambda in_chans=1, _w=_w: bb.ShuffleNetV2(_w, in_chans))

# Hand-picked plain CNNs: the cheapest query nets (the baseline CMP-NAS has to beat).
register_model("cnn-tiny", "query", "plain CNN 16/32/64, ~2 MFLOPs at 28 px")(
    lambda in_chans=1: bb.PlainCNN((16, 32, 64), in_chans)
)
register_model("cnn-small", "query", "plain CNN 32/64/128, ~8 MFLOPs at 28 px")(
    lambda in_chans=1: bb.PlainCNN((32, 64, 128), in_chans)
)
register_model("cnn-nano", "query", "plain CNN 8/16/32, ~0.5 MFLOPs at 28 px")(
    lambda in_chans=1: bb.PlainCNN((8, 16, 32), in_chans)
)
from . import ofa  # noqa: E402,F401  registers ofa-mbv3

__all__ = ["EmbeddingModel", "ModelEntry", "create_model", "list_models", "model_entry", "register_model"]
