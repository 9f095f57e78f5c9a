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
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._registry import create_model
from .embedding import EmbeddingModel


class ElasticSupernet(EmbeddingModel):
    """What every supernet does the same way over its ``space`` and its elastic ``backbone``
    (which keeps the active arch and its shape): the extreme archs, activating a given or a random
    sub-network, the ``model_kwargs`` of the static model ``model_name`` an arch is extracted as,
    and the extraction itself. A space adds its dynamic layers (``dynamic_ops``: the modules that
    slice their largest weights and copy the active slice out), ``flops`` and ``config``."""

    space_name = ""  # in this registry
    model_name = ""  # the registered static model of its sub-networks
    dynamic_ops: tuple[type[nn.Module], ...] = ()

    @property
    def space(self) -> Any:
        return self.backbone.space

    @property
    def shape(self) -> dict[str, Any]:
        return dict(self.backbone.shape)

    def max_arch(self) -> dict[str, Any]:
        return self.space.max_arch()

    def min_arch(self) -> dict[str, Any]:
        return self.space.min_arch()

    @property
    def active_arch(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.backbone.active_arch))

    def set_active_subnet(self, arch: dict[str, Any]) -> None:
        self.backbone.set_active_subnet(arch)

    def sample_active_subnet(
        self, rng: random.Random | int | None = None, elastic: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Activate a random sub-network (seeded by ``rng``: a ``random.Random`` or an int)."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        arch = self.space.sample(rng, elastic)
        self.set_active_subnet(arch)
        return arch

    def subnet_kwargs(self, arch: dict[str, Any] | None = None) -> dict[str, Any]:
        """``model_kwargs`` of the static model of ``arch`` (default: the active one)."""
        arch = self.space.canonical(self.space.validate(self.active_arch if arch is None else arch))
        return {"arch": arch, **self.shape}

    @torch.no_grad()
    def get_active_subnet(self) -> EmbeddingModel:
        """A standalone :class:`EmbeddingModel` (the registered ``model_name``) of the active arch with
        its weights copied: each dynamic op copies its active slice (an OFA kernel transform applied,
        running statistics included), every other leaf with weights (neck, embedding BatchNorm) as
        it is shared; in the supernet's mode."""
        sub = create_model(self.model_name, embed_dim=self.embed_dim, in_chans=self.in_chans, **self.subnet_kwargs())
        own = dict(self.named_modules())
        for name, module in sub.named_modules():
            src = own[name]
            if isinstance(src, self.dynamic_ops):
                src.copy_to(module)
            elif not list(module.children()) and (
                list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))
            ):
                module.load_state_dict(src.state_dict())
        return sub.train(self.training)


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
