"""The supernet registry: ``register_supernet`` / ``list_supernets`` / ``supernet_entry`` / ``create_supernet``.

A *search space* is a weight-sharing supernet class plus the registered static model its
sub-networks are extracted as. Every supernet has the interface the NAS pipeline
(:mod:`hvs.nas`) relies on -- ``space`` (sample / mutate / crossover / validate / key / canonical /
max_arch / min_arch / describe), ``set_active_subnet``, ``get_active_subnet``, ``subnet_kwargs``,
``flops``, ``config()`` and ``model_name`` -- so the training, search, export and latency code
never names a space. Registered spaces:

* ``ofa-mbv3`` (:mod:`hvs.models.ofa`): Once-for-All MobileNetV3 (depthwise MBConv, fixed SE and
  h-swish placement), the CMP-NAS paper's space. A supernet folder whose card names no space is one.
* ``fast-cnn`` (:mod:`hvs.models.fastcnn`): a space for the device: per stage a dense 3x3 block,
  a fused-MBConv or a depthwise MBConv, with depth, width, SE and activation chosen per stage.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class SupernetEntry:
    name: str
    builder: Callable[..., nn.Module]  # (embed_dim=..., in_chans=..., **config) -> supernet
    model: str  # the registered static model of its sub-networks
    elastic_dims: dict[str, str]  # progressive-shrinking dimension -> arch gene
    description: str


_SUPERNETS: dict[str, SupernetEntry] = {}
DEFAULT_SPACE = "ofa-mbv3"


def register_supernet(
    name: str, builder: Callable[..., nn.Module], *, model: str, elastic_dims: dict[str, str], description: str
) -> None:
    if name in _SUPERNETS:
        raise ValueError(f"supernet {name!r} registered twice")
    _SUPERNETS[name] = SupernetEntry(name, builder, model, dict(elastic_dims), description)


def list_supernets() -> list[str]:
    return sorted(_SUPERNETS)


def supernet_entry(name: str) -> SupernetEntry:
    if name not in _SUPERNETS:
        close = difflib.get_close_matches(name, list(_SUPERNETS), n=2, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown search space {name!r}; registered: {', '.join(list_supernets())}{hint}")
    return _SUPERNETS[name]


def create_supernet(name: str, embed_dim: int = 128, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """The supernet of space ``name`` with random weights; ``kwargs``: its ``config()`` minus the
    embedding size and channels (shape and choice lists)."""
    entry = supernet_entry(name)
    try:
        return entry.builder(embed_dim=embed_dim, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise ConfigError(f"supernet {name!r}: bad argument ({e})") from None


__all__ = [
    "DEFAULT_SPACE",
    "SupernetEntry",
    "create_supernet",
    "list_supernets",
    "register_supernet",
    "supernet_entry",
]
