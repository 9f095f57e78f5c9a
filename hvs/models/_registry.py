"""The model registry: ``register_model`` / ``list_models`` / ``model_entry`` / ``create_model``.

Kept apart from the architectures (as timm's ``_registry.py``), so a module that registers a
model (:mod:`hvs.models.ofa`) imports the registry without importing the package that imports
it back. Every created model is an :class:`~hvs.models.EmbeddingModel` around the registered
backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .embedding import EmbeddingModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]  # (in_chans=..., **kwargs) -> backbone
    role: str  # "gallery" or "query": what the model is meant for (both can be used either way)
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, role: str, description: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a backbone builder ``(in_chans=..., **kwargs) -> nn.Module`` by name."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, role, description)
        return fn

    return deco


def list_models(role: str | None = None) -> list[str]:
    """Registered model names (all, or those meant for ``role`` "gallery" / "query")."""
    return sorted(n for n, e in _REGISTRY.items() if role is None or e.role == role)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name fails with the list of valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, embed_dim: int = 128, in_chans: int = 1, **kwargs) -> EmbeddingModel:
    """Build a registered model with random weights (nothing is ever downloaded)."""
    entry = model_entry(name)
    try:
        backbone = entry.builder(in_chans=in_chans, **kwargs)
    except TypeError as e:  # an argument the architecture does not take
        raise ConfigError(
            f"model {name!r} does not accept {', '.join(map(repr, kwargs)) or 'these'} argument(s): {e}"
        ) from None
    return EmbeddingModel(backbone, embed_dim=embed_dim)


__all__ = ["ModelEntry", "create_model", "list_models", "model_entry", "register_model"]
