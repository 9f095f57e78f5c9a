"""Model registry: ``create_model(name, embed_dim=..., in_chans=..., image_size=...)`` and ``list_models()``.

The registry itself lives in :mod:`hvs.models._registry`; this module registers the built-in
architectures (and imports :mod:`hvs.models.ofa`, which registers ``ofa-mbv3``). Every model is
an :class:`EmbeddingModel`: a backbone giving pooled features, a linear embedding layer with
BatchNorm, and L2 normalisation, so gallery and query models of any architecture produce vectors
on the same unit sphere and can be compared by inner product.

``create_model("timm:NAME")`` / ``"torchvision:NAME"`` builds any timm / torchvision architecture
the same way, and :func:`hvs.models.pretrained.load_pretrained` loads a local weights file (timm
or torchvision key layout) into a model's backbone. Registered architectures pick their stem from
the input size (the stem rule in :mod:`hvs.models._registry`).
"""

from __future__ import annotations

from . import backbones as bb
from ._registry import (
    STANDARD_STEM_MIN_SIZE,
    ModelEntry,
    build_backbone,
    create_model,
    list_models,
    model_entry,
    register_model,
    resolve_model_kwargs,
    stem_for,
)
from .embedding import EmbeddingModel

# Gallery backbones: the ResNet family. Resolution-aware registrations take stem="small" |
# "standard"; the stem rule (STANDARD_STEM_MIN_SIZE) lives in ._registry.
for _depth in (8, 14, 20, 32):
    register_model(
        f"resnet{_depth}",
        "gallery",
        f"CIFAR-layout ResNet-{_depth}, stage widths 16/32/64 x width (large inputs: ImageNet stem)",
        resolution_aware=True,
    )(lambda in_chans=1, width=1.5, stem="small", _d=_depth: bb.CifarResNet(_d, width, in_chans, stem))
for _arch in ("resnet18", "resnet34", "resnet50"):
    register_model(
        _arch,
        "gallery",
        f"torchvision {_arch} (small inputs: 3x3 stride-1 stem, total stride 16)",
        resolution_aware=True,
        counterpart=f"torchvision:{_arch}",
    )(lambda in_chans=1, stem="small", _a=_arch: bb.TorchvisionResNet(_a, in_chans, stem))

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
    register_model(
        _name,
        "query",
        f"timm {_arch}: {_desc} (small inputs: stride-1 stem)",
        resolution_aware=True,
        counterpart=f"timm:{_arch}",
    )(lambda in_chans=1, stem="small", _a=_arch, **kw: bb.TimmBackbone(_a, in_chans, stem=stem, **kw))
for _w in ("x0_5", "x1_0"):
    register_model(
        f"shufflenetv2_{_w[1:].replace('_', '')}",
        "query",
        f"torchvision ShuffleNetV2 {_w[1:].replace('_', '.')}x (small inputs: stride-1 first conv)",
        resolution_aware=True,
        counterpart=f"torchvision:shufflenet_v2_{_w}",
    )(lambda in_chans=1, stem="small", _w=_w: bb.ShuffleNetV2(_w, in_chans, stem))

# Hand-picked plain CNNs: the cheapest query nets (the baseline CMP-NAS has to beat).
for _name, _widths, _cost in (
    ("cnn-tiny", (16, 32, 64), "~2"),
    ("cnn-small", (32, 64, 128), "~8"),
    ("cnn-nano", (8, 16, 32), "~0.5"),
):
    register_model(
        _name,
        "query",
        f"plain CNN {'/'.join(map(str, _widths))}, {_cost} MFLOPs at 28 px (large inputs: strided stem)",
        resolution_aware=True,
    )(lambda in_chans=1, stem="small", _wd=_widths: bb.PlainCNN(_wd, in_chans, stem))
from . import fastcnn, ofa  # noqa: E402,F401  register ofa-mbv3 and fast-cnn (models and supernets)

__all__ = [
    "STANDARD_STEM_MIN_SIZE",
    "EmbeddingModel",
    "ModelEntry",
    "build_backbone",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "resolve_model_kwargs",
    "stem_for",
]
