"""The model registry: ``register_model`` / ``list_models`` / ``model_entry`` / ``create_model``.

Kept apart from the architectures (as timm's ``_registry.py``), so a module that registers a
model (:mod:`hvs.models.ofa`) imports the registry without importing the package that imports
it back. Every created model is an :class:`~hvs.models.EmbeddingModel` around the registered
backbone.

Besides the registered names, ``create_model`` builds any timm or torchvision architecture as
``timm:NAME`` / ``torchvision:NAME`` (:func:`build_backbone`): the library's own architecture at
any input size, with random weights; :func:`hvs.models.pretrained.load_pretrained` loads a local
weights file into it.

**The stem rule** (one place: :data:`STANDARD_STEM_MIN_SIZE`). A registered architecture that is
*resolution-aware* takes ``stem="small"`` or ``stem="standard"``. ``"standard"`` is the library's
own stem and strides (torchvision's ResNets downsample 32x, a timm MobileNet's ``conv_stem`` has
stride 2); ``"small"`` removes one stride-2 step at the stem (total stride 16), so a 28 px image
still has a 2x2 map at the end. :func:`resolve_model_kwargs` picks ``"standard"`` for inputs of
:data:`STANDARD_STEM_MIN_SIZE` px and above, ``"small"`` below, and the trainer records the
choice in the model folder's ``model_kwargs``, so :func:`hvs.checkpoint.load_model` rebuilds the
same net whatever this rule becomes. A card without a ``stem`` (written before hvs had the rule,
at any size) rebuilds the small stem, as the hvs that trained it did: the builders' default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from .embedding import EmbeddingModel

STANDARD_STEM_MIN_SIZE = 96  # px: from here on, registry models use their library's stem and strides
STEMS = ("small", "standard")
FOREIGN_PREFIXES = ("timm:", "torchvision:")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]  # (in_chans=..., **kwargs) -> backbone
    role: str  # "gallery" or "query": what the model is meant for (both can be used either way)
    description: str
    resolution_aware: bool = False  # the builder takes stem="small" | "standard"
    # The library architecture the standard stem reproduces ("timm:NAME" / "torchvision:NAME"),
    # None for hvs's own architectures (CIFAR ResNets, plain CNNs, the OFA space).
    counterpart: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, role: str, description: str, *, resolution_aware: bool = False, counterpart: str | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a backbone builder ``(in_chans=..., **kwargs) -> nn.Module`` by name."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, role, description, resolution_aware, counterpart)
        return fn

    return deco


def list_models(role: str | None = None) -> list[str]:
    """Registered model names (all, or those meant for ``role`` "gallery" / "query")."""
    return sorted(n for n, e in _REGISTRY.items() if role is None or e.role == role)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name fails with the list of valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}; registered: {', '.join(list_models())} (or timm:NAME, torchvision:NAME)"
        )
    return _REGISTRY[name]


def stem_for(image_size: int | None) -> str:
    """The stem a resolution-aware model gets for ``image_size`` px inputs (None: a small input)."""
    return "standard" if image_size is not None and image_size >= STANDARD_STEM_MIN_SIZE else "small"


def resolve_model_kwargs(name: str, image_size: int | None, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model arguments that build ``name`` for ``image_size`` px inputs: ``kwargs`` plus the
    stem of the rule for a resolution-aware model (an explicit ``stem`` is kept). What a model
    folder records, so it rebuilds without knowing the rule."""
    out = dict(kwargs or {})
    if is_foreign(name):
        return out
    entry = model_entry(name)
    if entry.resolution_aware and "stem" not in out:
        out["stem"] = stem_for(image_size)
    return out


def is_foreign(name: str) -> bool:
    return name.startswith(FOREIGN_PREFIXES)


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def check_foreign_name(name: str) -> tuple[str, str]:
    """``("timm" | "torchvision", architecture)`` of ``timm:NAME`` / ``torchvision:NAME``, the name
    checked against the library's list (a one-line error suggesting close names)."""
    lib, _, arch = name.partition(":")
    if lib == "timm":
        import timm

        base = arch.split(".", 1)[0]  # a pretrained tag (resnet50.a1_in1k) names the same architecture
        if not timm.is_model(base):
            raise ConfigError(f"unknown timm architecture {arch!r}{_close(base, timm.list_models())}")
        return lib, base
    if lib == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if arch not in names:
            raise ConfigError(f"unknown torchvision architecture {arch!r}{_close(arch, names)}")
        return lib, arch
    raise ConfigError(f"unknown model library {lib!r} in {name!r}; use timm:NAME or torchvision:NAME")


def build_backbone(name: str, in_chans: int = 1, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """The backbone (pooled features, ``num_features`` wide) of a registered name, ``timm:NAME`` or
    ``torchvision:NAME``, with random weights; ``image_size`` picks the stem of a resolution-aware
    registered model (see :func:`resolve_model_kwargs`). Nothing is ever downloaded."""
    if is_foreign(name):
        from . import backbones as bb

        lib, arch = check_foreign_name(name)
        cls = bb.TimmBackbone if lib == "timm" else bb.TorchvisionBackbone
        try:
            return cls(arch, in_chans, **kwargs)
        except TypeError as e:
            raise ConfigError(f"model {name!r} does not accept {', '.join(map(repr, kwargs))}: {e}") from None
    entry = model_entry(name)
    kwargs = resolve_model_kwargs(name, image_size, kwargs)
    if "stem" in kwargs and kwargs["stem"] not in STEMS:
        raise ConfigError(f"model {name!r}: stem must be one of {', '.join(STEMS)}, got {kwargs['stem']!r}")
    if "stem" in kwargs and not entry.resolution_aware:
        raise ConfigError(f"model {name!r} has one stem at every size: it does not take a stem argument")
    try:
        return entry.builder(in_chans=in_chans, **kwargs)
    except TypeError as e:  # an argument the architecture does not take
        raise ConfigError(
            f"model {name!r} does not accept {', '.join(map(repr, kwargs)) or 'these'} argument(s): {e}"
        ) from None


def create_model(
    name: str, embed_dim: int = 128, in_chans: int = 1, image_size: int | None = None, **kwargs
) -> EmbeddingModel:
    """Build a registered model (or ``timm:NAME`` / ``torchvision:NAME``) with random weights
    (nothing is ever downloaded). ``image_size``: the input size, which picks the stem of a
    resolution-aware model (None: the small-input stem, as before hvs had the rule)."""
    return EmbeddingModel(build_backbone(name, in_chans, image_size, **kwargs), embed_dim=embed_dim)


__all__ = [
    "STANDARD_STEM_MIN_SIZE",
    "ModelEntry",
    "build_backbone",
    "check_foreign_name",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "resolve_model_kwargs",
    "stem_for",
]
