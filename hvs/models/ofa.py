"""Once-for-All MobileNetV3 for small inputs: the elastic supernet and its static sub-networks.

Once-for-All (Cai et al., "Once-for-All: Train One Network and Specialize it for Efficient
Deployment", ICLR 2020) trains one weight-sharing network whose sub-networks -- any kernel size
per layer, any expand ratio per layer, any depth per stage -- work without retraining. CMP-NAS
("Compatibility-aware Heterogeneous Visual Search", Duggal et al., CVPR 2021) searches such a
space for the query model of a heterogeneous search system, so this module holds the search
space; the training, search and export live in :mod:`hvs.nas`.

The decomposition follows OFA's code, with guard rails:

* **dynamic ops** hold the largest weights and slice them at forward time:
  :class:`DynamicConv2d` (leading input/output channels: the expand ratio and width),
  :class:`DynamicDepthwiseConv2d` (the *centre* k x k of the largest kernel, optionally through
  OFA's learned kernel-transformation matrices), :class:`DynamicBatchNorm2d` (leading channels
  of the affine parameters and running statistics) and :class:`DynamicSE`;
* :class:`OFAMobileNetV3Supernet` (an :class:`~hvs.models.EmbeddingModel`) has
  ``set_active_subnet(arch)``, ``sample_active_subnet(rng)``, ``get_active_subnet()`` (a
  standalone static model with *copied* weights), ``max_arch()`` / ``min_arch()`` and
  ``flops(arch)``, an analytic count that equals ``FlopCounterMode`` on the extracted model
  without building it;
* an **arch** is a plain dict that round-trips through JSON::

      {"ks": [3, 5, ...], "e": [4, 6, ...], "d": [2, 3, 4], "w": 1.0, "r": null}

  ``ks`` and ``e`` hold one entry per layer slot (``num_stages * max(depth_list)``, inactive
  slots included, as in OFA, so a mutation of ``d`` revives a layer with a defined choice),
  ``d`` one depth per stage, ``w`` the width multiplier, ``r`` the input resolution (``None``:
  the images' own size; otherwise the model resizes its input first);
* the static sub-network is the registered model ``ofa-mbv3`` whose keyword arguments are the
  arch plus the supernet's shape arguments, so an exported model folder is rebuilt by
  :func:`hvs.checkpoint.load_model` like any other model.

Adapted to 28-64 px inputs: a stride-1 stem (OFA's is stride 2) keeps the total stride at 16;
from :data:`hvs.models.STANDARD_STEM_MIN_SIZE` px on, the stem rule gives OFA's own stride-2 stem
(total stride 32), for the supernet (``hvs nas train-supernet``) and the ``ofa-mbv3`` model alike.
At those sizes the supernet's input resolution is elastic by default, as in OFA
(:func:`default_resolution_list`): trained over, and searched under the budget with, the other genes.
The defaults are OFA-MobileNetV3's widths (16 | 16 | 24, 40, 80, 112, 160 | 960 | 1280), SE
placement and activations; narrow test supernets pass their own.
"""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HVSError
from ._registry import register_model
from .supernets import ElasticSupernet, register_supernet

DEFAULT_SHAPE: dict[str, Any] = {
    "stem_width": 16,
    "first_width": 16,
    "stage_widths": [24, 40, 80, 112, 160],
    "stage_strides": [2, 2, 2, 1, 2],
    "stage_acts": ["relu", "relu", "h_swish", "h_swish", "h_swish"],
    "stage_se": [False, True, False, True, True],
    "final_width": 960,
    "feature_width": 1280,
    "stem_stride": 1,
    "divisor": 8,
}
SHAPE_KEYS = tuple(DEFAULT_SHAPE)
DEFAULT_CHOICES: dict[str, Any] = {
    "ks_list": [3, 5, 7],
    "expand_list": [3, 4, 6],
    "depth_list": [2, 3, 4],
    "width_mult_list": [1.0],
    "resolution_list": [],  # empty: the images' own size only
}
ARCH_KEYS = ("ks", "e", "d", "w", "r")


class ArchError(HVSError):
    """An arch dict that does not fit the search space (one-line message)."""


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never below 90% of ``v`` (OFA / TF-slim)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "h_swish":
        return nn.Hardswish(inplace=True)
    raise ArchError(f"unknown activation {name!r}; use relu or h_swish")


def _norm_shape(shape: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, lists as lists (JSON), stage lists checked for one length."""
    unknown = sorted(set(shape) - set(SHAPE_KEYS))
    if unknown:
        raise ArchError(f"unknown ofa-mbv3 shape argument(s) {', '.join(unknown)}; valid: {', '.join(SHAPE_KEYS)}")
    out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in {**DEFAULT_SHAPE, **shape}.items()}
    n = len(out["stage_widths"])
    for key in ("stage_strides", "stage_acts", "stage_se"):
        if len(out[key]) != n:
            raise ArchError(f"ofa-mbv3: {key} has {len(out[key])} entries but stage_widths has {n}")
    out["stage_se"] = [bool(s) for s in out["stage_se"]]
    return out


def _mid_channels(cin: int, expand: float, divisor: int) -> int:
    return cin if expand == 1 else make_divisible(round(cin * expand), divisor)


def _se_channels(channels: int, divisor: int, reduction: int = 4) -> int:
    return make_divisible(channels // reduction, divisor)


# --------------------------------------------------------------------------------------------
# The search space: sampling, mutation, crossover, keys (pure Python, no weights)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpace:
    """Choice lists of one supernet; every arch operation that needs no weights."""

    num_stages: int
    ks_list: tuple[int, ...] = (3, 5, 7)
    expand_list: tuple[float, ...] = (3, 4, 6)
    depth_list: tuple[int, ...] = (2, 3, 4)
    width_mult_list: tuple[float, ...] = (1.0,)
    resolution_list: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("ks_list", "expand_list", "depth_list", "width_mult_list"):
            values = getattr(self, name)
            if not values:
                raise ArchError(f"ofa-mbv3: {name} must not be empty")
            object.__setattr__(self, name, tuple(sorted(values)))
        object.__setattr__(self, "resolution_list", tuple(sorted(self.resolution_list)))
        if any(k % 2 == 0 or k < 1 for k in self.ks_list):
            raise ArchError(f"ofa-mbv3: kernel sizes must be odd, got {list(self.ks_list)}")
        if min(self.depth_list) < 1:
            raise ArchError(f"ofa-mbv3: depths must be >= 1, got {list(self.depth_list)}")

    @property
    def max_depth(self) -> int:
        return max(self.depth_list)

    @property
    def num_layers(self) -> int:
        return self.num_stages * self.max_depth

    def _r(self, pick) -> int | None:
        return pick(self.resolution_list) if self.resolution_list else None

    def max_arch(self) -> dict[str, Any]:
        return {
            "ks": [max(self.ks_list)] * self.num_layers,
            "e": [max(self.expand_list)] * self.num_layers,
            "d": [self.max_depth] * self.num_stages,
            "w": max(self.width_mult_list),
            "r": self._r(max),
        }

    def min_arch(self) -> dict[str, Any]:
        return {
            "ks": [min(self.ks_list)] * self.num_layers,
            "e": [min(self.expand_list)] * self.num_layers,
            "d": [min(self.depth_list)] * self.num_stages,
            "w": min(self.width_mult_list),
            "r": self._r(min),
        }

    def choices(self, gene: str) -> tuple:
        return {
            "ks": self.ks_list,
            "e": self.expand_list,
            "d": self.depth_list,
            "w": self.width_mult_list,
            "r": self.resolution_list or (None,),
        }[gene]

    def sample(self, rng: random.Random, elastic: Sequence[str] | None = None) -> dict[str, Any]:
        """A uniformly random arch. ``elastic`` (for progressive shrinking) names the dimensions
        that vary -- kernel, expand, depth, width, resolution; the others stay at their maximum."""
        dims = set(ELASTIC_DIMS if elastic is None else elastic)
        unknown = dims - set(ELASTIC_DIMS)
        if unknown:
            raise ArchError(f"unknown elastic dimension(s) {sorted(unknown)}; valid: {', '.join(ELASTIC_DIMS)}")
        arch = self.max_arch()
        for dim, gene in ELASTIC_DIMS.items():
            if dim not in dims:
                continue
            values = self.choices(gene)
            if gene in ("ks", "e", "d"):
                arch[gene] = [rng.choice(values) for _ in arch[gene]]
            else:
                arch[gene] = rng.choice(values)
        return arch

    def mutate(self, arch: dict[str, Any], rng: random.Random, prob: float) -> dict[str, Any]:
        """Each gene (per-layer kernel and expand, per-stage depth, width, resolution) is
        resampled with probability ``prob`` (OFA's evolution)."""
        out = json.loads(json.dumps(arch))
        for gene in ARCH_KEYS:
            values = self.choices(gene)
            if isinstance(out[gene], list):
                out[gene] = [rng.choice(values) if rng.random() < prob else v for v in out[gene]]
            elif rng.random() < prob:
                out[gene] = rng.choice(values)
        return out

    def crossover(self, a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Each gene from either parent with probability 1/2."""
        out = {}
        for gene in ARCH_KEYS:
            if isinstance(a[gene], list):
                out[gene] = [x if rng.random() < 0.5 else y for x, y in zip(a[gene], b[gene])]
            else:
                out[gene] = a[gene] if rng.random() < 0.5 else b[gene]
        return out

    def validate(self, arch: dict[str, Any]) -> dict[str, Any]:
        """The arch with JSON-normal types; a one-line :class:`ArchError` when it does not fit."""
        if not isinstance(arch, dict):
            raise ArchError(f"an arch must be a dict with keys {', '.join(ARCH_KEYS)}, got {type(arch).__name__}")
        missing = [k for k in ("ks", "e", "d") if k not in arch]
        extra = sorted(set(arch) - set(ARCH_KEYS))
        if missing or extra:
            raise ArchError(
                f"arch keys must be {', '.join(ARCH_KEYS)}; missing {missing or 'none'}, unknown {extra or 'none'}"
            )
        out = {
            "ks": list(arch["ks"]),
            "e": list(arch["e"]),
            "d": list(arch["d"]),
            "w": arch.get("w", max(self.width_mult_list)),
            "r": arch.get("r", self._r(max)),
        }
        for gene, n in (("ks", self.num_layers), ("e", self.num_layers), ("d", self.num_stages)):
            if len(out[gene]) != n:
                raise ArchError(f"arch {gene} has {len(out[gene])} entries; this supernet needs {n}")
        for gene in ARCH_KEYS:
            values = self.choices(gene)
            for i, v in enumerate(out[gene] if isinstance(out[gene], list) else [out[gene]]):
                if v not in values:
                    where = f"{gene}[{i}]" if isinstance(out[gene], list) else gene
                    raise ArchError(f"arch {where}={v} is not a choice of this supernet {list(values)}")
        return out

    def active_layers(self, arch: dict[str, Any]) -> list[tuple[int, int, int]]:
        """(stage, index in stage, layer slot) of each active layer, in order."""
        return [(s, i, s * self.max_depth + i) for s in range(self.num_stages) for i in range(arch["d"][s])]

    def canonical(self, arch: dict[str, Any]) -> dict[str, Any]:
        """Inactive layer slots set to the maximum choice: equal networks get equal dicts."""
        out = json.loads(json.dumps(arch))
        active = {slot for _, _, slot in self.active_layers(arch)}
        for slot in range(self.num_layers):
            if slot not in active:
                out["ks"][slot], out["e"][slot] = max(self.ks_list), max(self.expand_list)
        return out

    def key(self, arch: dict[str, Any]) -> str:
        """A readable string naming the network (active layers only): the cache key of a score."""
        stages = []
        for s in range(self.num_stages):
            slots = range(s * self.max_depth, s * self.max_depth + arch["d"][s])
            stages.append(" ".join(f"k{arch['ks'][j]}e{_fmt(arch['e'][j])}" for j in slots))
        return f"r{arch.get('r') or '-'} w{_fmt(arch.get('w', 1.0))} | " + " | ".join(stages)

    def describe(self) -> str:
        """The choice lists in one line (``hvs nas info``)."""
        return (
            f"kernel {list(self.ks_list)}, expand {list(self.expand_list)}, depth {list(self.depth_list)} "
            f"x {self.num_stages} stages, width {list(self.width_mult_list)}, "
            f"resolution {list(self.resolution_list) or 'native'}"
        )


ELASTIC_DIMS = {"kernel": "ks", "expand": "e", "depth": "d", "width": "w", "resolution": "r"}


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# --------------------------------------------------------------------------------------------
# Static layers: the deployed sub-network
# --------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: pool -> 1x1 reduce -> ReLU -> 1x1 expand -> hard sigmoid -> scale."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1, bias=True)
        self.expand = nn.Conv2d(mid, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(y))))


def _conv_bn_act(
    cin: int, cout: int, k: int, stride: int, act: str | None, groups: int = 1, bn: bool = True
) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))]
    if bn:
        layers.append(("bn", nn.BatchNorm2d(cout)))
    if act:
        layers.append(("act", _act(act)))
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Inverted bottleneck (MobileNetV2/V3): 1x1 expand, k x k depthwise, [SE], 1x1 project."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        expand: float,
        stride: int,
        act: str,
        se: bool,
        residual: bool,
        divisor: int,
    ) -> None:
        super().__init__()
        mid = _mid_channels(cin, expand, divisor)
        self.inverted_bottleneck = None if expand == 1 else _conv_bn_act(cin, mid, 1, 1, act)
        self.depth_conv = _conv_bn_act(mid, mid, kernel, stride, act, groups=mid)
        self.se = SqueezeExcite(mid, _se_channels(mid, divisor)) if se else None
        self.point_linear = _conv_bn_act(mid, cout, 1, 1, None)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.inverted_bottleneck is None else self.inverted_bottleneck(x)
        y = self.depth_conv(y)
        if self.se is not None:
            y = self.se(y)
        y = self.point_linear(y)
        return y + x if self.residual else y


def _resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution and (x.shape[-1] != resolution or x.shape[-2] != resolution):
        return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x


def _layer_plan(shape: dict[str, Any], space: ArchSpace, arch: dict[str, Any]) -> list[dict[str, Any]]:
    """Every MBConv layer of ``arch``: the one description both the static builder and the
    analytic FLOPs formula read, so they cannot drift apart."""
    w, div = arch["w"], shape["divisor"]
    stem = make_divisible(shape["stem_width"] * w, div)
    first = make_divisible(shape["first_width"] * w, div)
    plan = [
        {
            "name": "blocks.0",
            "cin": stem,
            "cout": first,
            "k": 3,
            "e": 1,
            "stride": 1,
            "act": "relu",
            "se": False,
            "residual": shape["stem_width"] == shape["first_width"],
        }
    ]
    cin = first
    for s, i, slot in space.active_layers(arch):
        cout = make_divisible(shape["stage_widths"][s] * w, div)
        plan.append(
            {
                "name": f"blocks.{1 + slot}",
                "cin": cin,
                "cout": cout,
                "k": arch["ks"][slot],
                "e": arch["e"][slot],
                "stride": shape["stage_strides"][s] if i == 0 else 1,
                "act": shape["stage_acts"][s],
                "se": shape["stage_se"][s],
                "residual": i > 0,
            }
        )
        cin = cout
    return plan


class OFAMobileNetV3(nn.Module):
    """A static sub-network of the OFA MobileNetV3 supernet (the ``ofa-mbv3`` backbone).

    Module names equal the supernet's (``blocks.<1 + layer slot>``), so the weights of a
    sub-network are the supernet's under the same keys, sliced."""

    def __init__(self, in_chans: int = 1, arch: dict[str, Any] | None = None, **shape: Any) -> None:
        super().__init__()
        shape = _norm_shape(shape)
        n_stages = len(shape["stage_widths"])
        if arch is None:  # the largest sub-network of the default choices
            arch = ArchSpace(n_stages, **{k: tuple(v) for k, v in DEFAULT_CHOICES.items()}).max_arch()
        self.arch = {
            "ks": list(arch["ks"]),
            "e": list(arch["e"]),
            "d": list(arch["d"]),
            "w": arch.get("w", 1.0),
            "r": arch.get("r"),
        }
        slots = len(self.arch["ks"])
        if len(self.arch["d"]) != n_stages or len(self.arch["e"]) != slots or slots % n_stages:
            raise ArchError(
                f"ofa-mbv3: arch has {len(self.arch['d'])} stage depths, {slots} kernel and "
                f"{len(self.arch['e'])} expand entries for {n_stages} stages"
            )
        space = ArchSpace(n_stages, depth_list=(slots // n_stages,))
        if max(self.arch["d"]) > space.max_depth or min(self.arch["d"]) < 1:
            raise ArchError(
                f"ofa-mbv3: arch depths {self.arch['d']} do not fit {space.max_depth} layer slots per stage"
            )
        self.shape = shape
        self.resolution = self.arch["r"]
        plan = _layer_plan(shape, space, self.arch)
        self.stem = _conv_bn_act(in_chans, plan[0]["cin"], 3, shape["stem_stride"], "h_swish")
        # nn.ModuleDict keeps the supernet's layer-slot numbering (inactive slots are absent)
        self.blocks = nn.ModuleDict(
            OrderedDict(
                (
                    p["name"].split(".")[1],
                    MBConv(
                        p["cin"],
                        p["cout"],
                        p["k"],
                        p["e"],
                        p["stride"],
                        p["act"],
                        p["se"],
                        p["residual"],
                        shape["divisor"],
                    ),
                )
                for p in plan
            )
        )
        final = make_divisible(shape["final_width"] * self.arch["w"], shape["divisor"])
        self.final_expand = _conv_bn_act(plan[-1]["cout"], final, 1, 1, "h_swish")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_mix = _conv_bn_act(final, shape["feature_width"], 1, 1, "h_swish", bn=False)
        self.num_features = shape["feature_width"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(_resize(x, self.resolution))
        for block in self.blocks.values():
            x = block(x)
        return self.feature_mix(self.pool(self.final_expand(x))).flatten(1)


OFA_RESOLUTIONS_224 = (160, 176, 192, 208, 224)  # OFA's searched input sizes for 224 px images


def default_resolution_list(image_size: int | None) -> list[int]:
    """The elastic input resolutions a supernet gets by default for ``image_size`` px images:
    OFA's (160-224 for 224 px, scaled to the image size, multiples of 4) at the sizes the stem
    rule calls standard; none below (a 28 px image is not worth shrinking: the images' own size)."""
    from ._registry import stem_for

    if stem_for(image_size) != "standard":
        return []
    assert image_size is not None
    return sorted({max(4, round(image_size * r / 224 / 4) * 4) for r in OFA_RESOLUTIONS_224})


def stem_stride(stem: str) -> int:
    """The stem stride of the stem rule's choice: 2 (OFA's own layout, total stride 32) for
    ``"standard"``, 1 (total stride 16) for ``"small"``."""
    return 2 if stem == "standard" else 1


@register_model(
    "ofa-mbv3",
    "query",
    "Once-for-All MobileNetV3 sub-network from a JSON arch (model arg arch=...); default = the largest "
    "(small inputs: stride-1 stem)",
    resolution_aware=True,
)
def _ofa_mbv3(
    in_chans: int = 1, arch: dict[str, Any] | None = None, stem: str | None = None, **shape: Any
) -> OFAMobileNetV3:
    # An explicit stem_stride (every exported sub-network records its supernet's) wins over the stem.
    if stem is not None and "stem_stride" not in shape:
        shape["stem_stride"] = stem_stride(stem)
    return OFAMobileNetV3(in_chans=in_chans, arch=arch, **shape)


# --------------------------------------------------------------------------------------------
# Dynamic ops: the largest weights, sliced at forward time
# --------------------------------------------------------------------------------------------


class DynamicConv2d(nn.Conv2d):
    """A dense conv whose active input channels are the input's, output channels ``active_out``.

    Leading channels are kept (OFA): the expand-ratio and width choices share the first
    filters, which progressive shrinking makes the most important ones."""

    def __init__(self, max_in: int, max_out: int, kernel_size: int = 1, stride: int = 1, bias: bool = False) -> None:
        super().__init__(max_in, max_out, kernel_size, stride, kernel_size // 2, bias=bias)
        self.active_out = max_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias[: self.active_out]
        return F.conv2d(x, self.weight[: self.active_out, : x.size(1)], b, self.stride, self.padding)

    @torch.no_grad()
    def copy_to(self, static: nn.Conv2d) -> None:
        static.weight.copy_(self.weight[: static.out_channels, : static.in_channels])
        if self.bias is not None:
            static.bias.copy_(self.bias[: static.out_channels])


class DynamicDepthwiseConv2d(nn.Conv2d):
    """Depthwise conv with elastic kernel: the centre ``k x k`` of the largest kernel.

    With ``kernel_transform`` (OFA sec. 3.2) a smaller kernel is the centre of the next larger
    one passed through a learned ``k^2 x k^2`` matrix (shared by all channels, initialised to the
    identity), so a weight can serve two kernel sizes with different roles."""

    def __init__(
        self, max_channels: int, ks_list: Sequence[int], stride: int = 1, kernel_transform: bool = False
    ) -> None:
        self.ks_list = sorted(ks_list)
        k = self.ks_list[-1]
        super().__init__(max_channels, max_channels, k, stride, k // 2, groups=max_channels, bias=False)
        self.active_ks = k
        self.kernel_transform = kernel_transform
        if kernel_transform:
            for big, small in zip(self.ks_list[:0:-1], self.ks_list[-2::-1]):
                self.register_parameter(f"matrix_{big}to{small}", nn.Parameter(torch.eye(small * small)))

    def active_filter(self, channels: int, ks: int) -> torch.Tensor:
        max_ks = self.ks_list[-1]
        if not self.kernel_transform or ks == max_ks:
            start = (max_ks - ks) // 2
            return self.weight[:channels, :, start : start + ks, start : start + ks]
        filt = self.weight[:channels]
        for big, small in zip(self.ks_list[:0:-1], self.ks_list[-2::-1]):
            start = (big - small) // 2
            centre = filt[:, :, start : start + small, start : start + small].reshape(-1, small * small)
            filt = F.linear(centre, getattr(self, f"matrix_{big}to{small}")).reshape(channels, 1, small, small)
            if small == ks:
                break
        return filt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        return F.conv2d(x, self.active_filter(c, self.active_ks), None, self.stride, self.active_ks // 2, groups=c)

    @torch.no_grad()
    def copy_to(self, static: nn.Conv2d) -> None:
        static.weight.copy_(self.active_filter(static.in_channels, static.kernel_size[0]))


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading channels of the input; running statistics updated in place
    in the slices (they are views), as OFA's DynamicBatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        if c == self.num_features:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(
            x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c], use_batch, factor, self.eps
        )

    @torch.no_grad()
    def copy_to(self, static: nn.BatchNorm2d) -> None:
        c = static.num_features
        static.weight.copy_(self.weight[:c])
        static.bias.copy_(self.bias[:c])
        static.running_mean.copy_(self.running_mean[:c])
        static.running_var.copy_(self.running_var[:c])
        static.num_batches_tracked.copy_(self.num_batches_tracked)


class DynamicSE(nn.Module):
    """SE on the leading channels; its hidden width follows the active channel count."""

    def __init__(self, max_channels: int, divisor: int) -> None:
        super().__init__()
        self.divisor = divisor
        mid = _se_channels(max_channels, divisor)
        self.reduce = DynamicConv2d(max_channels, mid, bias=True)
        self.expand = DynamicConv2d(mid, max_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        self.reduce.active_out, self.expand.active_out = _se_channels(c, self.divisor), c
        y = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(y))))


def _dyn_conv_bn_act(cin: int, cout: int, k: int, stride: int, act: str | None, bn: bool = True) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = [("conv", DynamicConv2d(cin, cout, k, stride))]
    if bn:
        layers.append(("bn", DynamicBatchNorm2d(cout)))
    if act:
        layers.append(("act", _act(act)))
    return nn.Sequential(OrderedDict(layers))


class DynamicMBConv(nn.Module):
    """MBConv at its largest; ``active_ks``, ``active_expand`` and ``active_out`` pick the
    sub-layer. The expanded width is computed from the *actual* input width at forward time."""

    def __init__(
        self,
        max_in: int,
        max_out: int,
        ks_list: Sequence[int],
        expand_list: Sequence[float],
        stride: int,
        act: str,
        se: bool,
        residual: bool,
        divisor: int,
        kernel_transform: bool = False,
    ) -> None:
        super().__init__()
        self.divisor = divisor
        self.expand_list = sorted(expand_list)
        max_mid = _mid_channels(max_in, self.expand_list[-1], divisor)
        self.inverted_bottleneck = None if self.expand_list == [1] else _dyn_conv_bn_act(max_in, max_mid, 1, 1, act)
        self.depth_conv = nn.Sequential(
            OrderedDict(
                [
                    ("conv", DynamicDepthwiseConv2d(max_mid, ks_list, stride, kernel_transform)),
                    ("bn", DynamicBatchNorm2d(max_mid)),
                    ("act", _act(act)),
                ]
            )
        )
        self.se = DynamicSE(max_mid, divisor) if se else None
        self.point_linear = _dyn_conv_bn_act(max_mid, max_out, 1, 1, None)
        self.residual = residual
        self.active_expand = self.expand_list[-1]

    @property
    def active_ks(self) -> int:
        return self.depth_conv.conv.active_ks

    @active_ks.setter
    def active_ks(self, k: int) -> None:
        self.depth_conv.conv.active_ks = k

    @property
    def active_out(self) -> int:
        return self.point_linear.conv.active_out

    @active_out.setter
    def active_out(self, c: int) -> None:
        self.point_linear.conv.active_out = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.inverted_bottleneck is not None:
            self.inverted_bottleneck.conv.active_out = _mid_channels(x.size(1), self.active_expand, self.divisor)
            y = self.inverted_bottleneck(x)
        y = self.depth_conv(y)
        if self.se is not None:
            y = self.se(y)
        y = self.point_linear(y)
        return y + x if self.residual else y


class DynamicMobileNetV3(nn.Module):
    """The elastic backbone: every layer slot at its largest, depth chosen per stage."""

    def __init__(
        self,
        in_chans: int = 1,
        *,
        ks_list: Sequence[int] = (3, 5, 7),
        expand_list: Sequence[float] = (3, 4, 6),
        depth_list: Sequence[int] = (2, 3, 4),
        width_mult_list: Sequence[float] = (1.0,),
        resolution_list: Sequence[int] = (),
        kernel_transform: bool = False,
        **shape: Any,
    ) -> None:
        super().__init__()
        self.shape = _norm_shape(shape)
        self.in_chans = in_chans
        self.kernel_transform = kernel_transform
        self.space = ArchSpace(
            len(self.shape["stage_widths"]),
            tuple(ks_list),
            tuple(expand_list),
            tuple(depth_list),
            tuple(width_mult_list),
            tuple(resolution_list),
        )
        sp, div = self.shape, self.shape["divisor"]
        plan = _layer_plan(sp, self.space, self.space.max_arch())  # the largest: sets every max width
        self.stem = _dyn_conv_bn_act(in_chans, plan[0]["cin"], 3, sp["stem_stride"], "h_swish")
        blocks = {
            "0": DynamicMBConv(plan[0]["cin"], plan[0]["cout"], [3], [1], 1, "relu", False, plan[0]["residual"], div)
        }
        for p in plan[1:]:
            blocks[p["name"].split(".")[1]] = DynamicMBConv(
                p["cin"],
                p["cout"],
                self.space.ks_list,
                self.space.expand_list,
                p["stride"],
                p["act"],
                p["se"],
                p["residual"],
                div,
                kernel_transform,
            )
        self.blocks = nn.ModuleDict(blocks)
        final = make_divisible(sp["final_width"] * max(self.space.width_mult_list), div)
        self.final_expand = _dyn_conv_bn_act(plan[-1]["cout"], final, 1, 1, "h_swish")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_mix = _dyn_conv_bn_act(final, sp["feature_width"], 1, 1, "h_swish", bn=False)
        self.num_features = sp["feature_width"]
        self.active_arch: dict[str, Any] = {}
        self.set_active_subnet(self.space.max_arch())

    def set_active_subnet(self, arch: dict[str, Any]) -> None:
        arch = self.space.validate(arch)
        plan = _layer_plan(self.shape, self.space, arch)
        self.stem.conv.active_out = plan[0]["cin"]
        for p in plan:
            block = self.blocks[p["name"].split(".")[1]]
            block.active_ks, block.active_expand, block.active_out = p["k"], p["e"], p["cout"]
        self.final_expand.conv.active_out = make_divisible(self.shape["final_width"] * arch["w"], self.shape["divisor"])
        self._active_slots = [p["name"].split(".")[1] for p in plan]
        self.active_arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(_resize(x, self.active_arch["r"]))
        for slot in self._active_slots:
            x = self.blocks[slot](x)
        return self.feature_mix(self.pool(self.final_expand(x))).flatten(1)


class OFAMobileNetV3Supernet(ElasticSupernet):
    """The elastic query supernet: a dynamic MobileNetV3 backbone with the shared embedding neck.

    ``config()`` is a JSON dict from which ``OFAMobileNetV3Supernet(**config)`` rebuilds it."""

    space_name = "ofa-mbv3"  # in the supernet registry (hvs.models.supernets)
    model_name = "ofa-mbv3"  # the registered static model of its sub-networks
    dynamic_ops = (DynamicConv2d, DynamicDepthwiseConv2d, DynamicBatchNorm2d)

    def __init__(
        self,
        embed_dim: int = 128,
        in_chans: int = 1,
        *,
        ks_list: Sequence[int] = (3, 5, 7),
        expand_list: Sequence[float] = (3, 4, 6),
        depth_list: Sequence[int] = (2, 3, 4),
        width_mult_list: Sequence[float] = (1.0,),
        resolution_list: Sequence[int] = (),
        kernel_transform: bool = False,
        **shape: Any,
    ) -> None:
        super().__init__(
            DynamicMobileNetV3(
                in_chans,
                ks_list=ks_list,
                expand_list=expand_list,
                depth_list=depth_list,
                width_mult_list=width_mult_list,
                resolution_list=resolution_list,
                kernel_transform=kernel_transform,
                **shape,
            ),
            embed_dim,
        )
        self.in_chans = in_chans

    def config(self) -> dict[str, Any]:
        sp = self.space
        return {
            "embed_dim": self.embed_dim,
            "in_chans": self.in_chans,
            "ks_list": list(sp.ks_list),
            "expand_list": list(sp.expand_list),
            "depth_list": list(sp.depth_list),
            "width_mult_list": list(sp.width_mult_list),
            "resolution_list": list(sp.resolution_list),
            "kernel_transform": self.backbone.kernel_transform,
            **self.shape,
        }

    def flops(self, arch: dict[str, Any] | None = None, image_size: int = 28) -> int:
        """FLOPs (2 x MACs of convs and matmuls, as ``FlopCounterMode`` counts them) of one
        ``image_size`` image through the sub-network ``arch``, computed without building it."""
        arch = self.space.validate(self.active_arch if arch is None else arch)
        return subnet_flops(self.shape, self.space, arch, self.in_chans, image_size, self.embed_dim)


def subnet_flops(
    shape: dict[str, Any], space: ArchSpace, arch: dict[str, Any], in_chans: int, image_size: int, embed_dim: int
) -> int:
    """The analytic FLOPs formula behind :meth:`OFAMobileNetV3Supernet.flops`."""
    div = shape["divisor"]
    size = arch.get("r") or image_size
    total = 0

    def conv(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> None:
        nonlocal size, total
        size = math.ceil(size / stride)  # padding k // 2, odd k: out = ceil(in / stride)
        total += 2 * cout * (cin // groups) * k * k * size * size

    plan = _layer_plan(shape, space, arch)
    conv(in_chans, plan[0]["cin"], 3, shape["stem_stride"])
    for p in plan:
        mid = _mid_channels(p["cin"], p["e"], div)
        if p["e"] != 1:
            conv(p["cin"], mid, 1, 1)
        conv(mid, mid, p["k"], p["stride"], groups=mid)
        if p["se"]:
            total += 2 * 2 * mid * _se_channels(mid, div)  # two 1x1 convs on the pooled vector
        conv(mid, p["cout"], 1, 1)
    final = make_divisible(shape["final_width"] * arch["w"], div)
    conv(plan[-1]["cout"], final, 1, 1)
    total += 2 * final * shape["feature_width"] + 2 * shape["feature_width"] * embed_dim  # after pooling
    return int(total)


register_supernet(
    "ofa-mbv3",
    OFAMobileNetV3Supernet,
    model="ofa-mbv3",
    elastic_dims=ELASTIC_DIMS,
    description="Once-for-All MobileNetV3: depthwise MBConv, elastic kernel/expand/depth/width/resolution",
)


def load_arch(text_or_path: str) -> dict[str, Any]:
    """An arch from inline JSON or a JSON file; a search's ``best.json`` (arch under "arch") works."""
    from pathlib import Path

    s = text_or_path.strip()
    try:
        obj = json.loads(s) if s.startswith("{") else json.loads(Path(s).read_text())
    except FileNotFoundError:
        raise ArchError(f"arch file {s} does not exist") from None
    except json.JSONDecodeError as e:
        raise ArchError(f"arch is not valid JSON ({e})") from None
    if isinstance(obj, dict) and "arch" in obj and isinstance(obj["arch"], dict):
        obj = obj["arch"]
    return obj
