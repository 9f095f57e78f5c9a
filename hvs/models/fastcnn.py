"""``fast-cnn``: a search space for the device, not for FLOPs.

The OFA-MobileNetV3 space (:mod:`hvs.models.ofa`) is made of depthwise MBConv layers with SE and
h-swish, which cut FLOPs but run at a small fraction of a dense convolution's FLOP/s in CPU
runtimes at 28-32 px (many small, memory-bound ops). This space puts dense blocks next to the
depthwise one and lets the search choose, per stage:

* ``b``  the block type: ``plain`` (3x3 conv-BN-act, a VGG / ``cnn-tiny`` layer), ``fused``
  (fused-MBConv of EfficientNetV2: 3x3 dense expand conv, [SE], 1x1 project) or ``dw``
  (MobileNetV2/V3 MBConv: 1x1 expand, 3x3 depthwise, [SE], 1x1 project);
* ``d``  the depth (down to 1), ``e`` the expand ratio (fused and dw; unused by plain),
  ``w``  the width multiplier, ``se`` squeeze-excite on or off, ``act`` relu or h_swish;

and ``r`` the input resolution (elastic as in OFA: ``None`` is the images' own size). An arch is
a plain JSON dict of per-stage lists::

    {"b": ["plain", "dw", "fused"], "d": [1, 2, 3], "e": [1, 4, 2], "w": [0.5, 1.0, 0.75],
     "se": [false, true, false], "act": ["relu", "h_swish", "relu"], "r": null}

Weight sharing: every layer slot holds one block of each type at its largest (OFA's dynamic ops
slice leading channels), and a stage's block type selects whose weights run, so the extracted
static sub-network (the registered model ``fast-cnn``, rebuilt from ``model_kwargs`` by
:func:`hvs.checkpoint.load_model`) computes exactly what the active supernet computes. The first
layer of a stage has the stage's stride; the others are residual. After the last stage: an
optional 1x1 conv to ``head_width`` (default none), global average pooling and the embedding
neck (whose input width follows the last stage's, as a ``cnn-tiny``'s does). The stem is a 3x3
conv of the first stage's width, stride 1 below :data:`hvs.models.STANDARD_STEM_MIN_SIZE` px
(the stem rule), 2 from there on.
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

from ._registry import register_model
from .ofa import (
    ArchError,
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicSE,
    SqueezeExcite,
    _conv_bn_act,
    _fmt,
    _mid_channels,
    _resize,
    _se_channels,
    make_divisible,
    stem_stride,
)
from .supernets import ElasticSupernet, register_supernet

BLOCKS = ("dw", "plain", "fused")  # in order of cost at equal settings: min_arch takes the first
ACTS = ("relu", "h_swish")
GENES = ("b", "d", "e", "w", "se", "act", "r")
STAGE_GENES = GENES[:-1]
ELASTIC_DIMS = {
    "block": "b",
    "depth": "d",
    "expand": "e",
    "width": "w",
    "se": "se",
    "act": "act",
    "resolution": "r",
}
DEFAULT_SHAPE: dict[str, Any] = {
    "stem_width": 16,
    "stage_widths": [32, 64, 128],
    "stage_strides": [2, 2, 2],
    "head_width": 0,  # 0: no head conv, the neck reads the last stage
    "stem_stride": 1,
    "divisor": 8,
}
SHAPE_KEYS = tuple(DEFAULT_SHAPE)
DEFAULT_CHOICES: dict[str, Any] = {
    "block_list": list(BLOCKS),
    "depth_list": [1, 2, 3],
    "expand_list": [1, 2, 4],
    "width_mult_list": [0.25, 0.5, 0.75, 1.0],
    "se_list": [False, True],
    "act_list": list(ACTS),
    "resolution_list": [],
}


def _norm_shape(shape: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(shape) - set(SHAPE_KEYS))
    if unknown:
        raise ArchError(f"unknown fast-cnn shape argument(s) {', '.join(unknown)}; valid: {', '.join(SHAPE_KEYS)}")
    out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in {**DEFAULT_SHAPE, **shape}.items()}
    if len(out["stage_strides"]) != len(out["stage_widths"]):
        raise ArchError(
            f"fast-cnn: stage_strides has {len(out['stage_strides'])} entries but stage_widths has "
            f"{len(out['stage_widths'])}"
        )
    if not out["stage_widths"]:
        raise ArchError("fast-cnn: stage_widths must not be empty")
    return out


def _ordered(values: Sequence, order: Sequence, what: str) -> tuple:
    bad = [v for v in values if v not in order]
    if bad or not values:
        raise ArchError(f"fast-cnn: {what} must be a non-empty subset of {list(order)}, got {list(values)}")
    return tuple(v for v in order if v in values)


# --------------------------------------------------------------------------------------------
# The search space (no weights)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastSpace:
    """Choice lists of a ``fast-cnn`` supernet; the arch operations the search uses (the same
    interface as :class:`hvs.models.ofa.ArchSpace`). ``min_arch`` / ``max_arch`` take the first /
    last of each list, lists ordered by cost: blocks ``dw`` < ``plain`` < ``fused``, SE off < on,
    relu < h_swish, numbers ascending."""

    num_stages: int
    block_list: tuple[str, ...] = BLOCKS
    depth_list: tuple[int, ...] = (1, 2, 3)
    expand_list: tuple[float, ...] = (1, 2, 4)
    width_mult_list: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    se_list: tuple[bool, ...] = (False, True)
    act_list: tuple[str, ...] = ACTS
    resolution_list: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("depth_list", "expand_list", "width_mult_list"):
            values = getattr(self, name)
            if not values:
                raise ArchError(f"fast-cnn: {name} must not be empty")
            object.__setattr__(self, name, tuple(sorted(values)))
        object.__setattr__(self, "block_list", _ordered(self.block_list, BLOCKS, "block_list"))
        object.__setattr__(self, "act_list", _ordered(self.act_list, ACTS, "act_list"))
        object.__setattr__(self, "se_list", _ordered([bool(v) for v in self.se_list], (False, True), "se_list"))
        object.__setattr__(self, "resolution_list", tuple(sorted(self.resolution_list)))
        if min(self.depth_list) < 1:
            raise ArchError(f"fast-cnn: depths must be >= 1, got {list(self.depth_list)}")
        if min(self.expand_list) < 1:
            raise ArchError(f"fast-cnn: expand ratios must be >= 1, got {list(self.expand_list)}")

    @property
    def max_depth(self) -> int:
        return max(self.depth_list)

    def choices(self, gene: str) -> tuple:
        return {
            "b": self.block_list,
            "d": self.depth_list,
            "e": self.expand_list,
            "w": self.width_mult_list,
            "se": self.se_list,
            "act": self.act_list,
            "r": self.resolution_list or (None,),
        }[gene]

    def _pick(self, index: int) -> dict[str, Any]:
        arch: dict[str, Any] = {g: [self.choices(g)[index]] * self.num_stages for g in STAGE_GENES}
        arch["r"] = self.choices("r")[index]
        return arch

    def max_arch(self) -> dict[str, Any]:
        return self._pick(-1)

    def min_arch(self) -> dict[str, Any]:
        return self._pick(0)

    def sample(self, rng: random.Random, elastic: Sequence[str] | None = None) -> dict[str, Any]:
        """A uniformly random arch; ``elastic`` (progressive shrinking) names the dimensions that
        vary (:data:`ELASTIC_DIMS`), the others stay at their maximum."""
        dims = set(ELASTIC_DIMS if elastic is None else elastic)
        unknown = dims - set(ELASTIC_DIMS)
        if unknown:
            raise ArchError(f"unknown elastic dimension(s) {sorted(unknown)}; valid: {', '.join(ELASTIC_DIMS)}")
        arch = self.max_arch()
        for dim, gene in ELASTIC_DIMS.items():
            if dim in dims:
                values = self.choices(gene)
                arch[gene] = [rng.choice(values) for _ in arch[gene]] if gene != "r" else rng.choice(values)
        return arch

    def mutate(self, arch: dict[str, Any], rng: random.Random, prob: float) -> dict[str, Any]:
        """Each gene of each stage (and the resolution) resampled with probability ``prob``."""
        out = json.loads(json.dumps(arch))
        for gene in GENES:
            values = self.choices(gene)
            if isinstance(out[gene], list):
                out[gene] = [rng.choice(values) if rng.random() < prob else v for v in out[gene]]
            elif rng.random() < prob:
                out[gene] = rng.choice(values)
        return out

    def crossover(self, a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Each gene of each stage from either parent with probability 1/2."""
        out: dict[str, Any] = {}
        for gene in GENES:
            if isinstance(a[gene], list):
                out[gene] = [x if rng.random() < 0.5 else y for x, y in zip(a[gene], b[gene])]
            else:
                out[gene] = a[gene] if rng.random() < 0.5 else b[gene]
        return out

    def validate(self, arch: dict[str, Any]) -> dict[str, Any]:
        """The arch with JSON-normal types; a one-line :class:`ArchError` when it does not fit."""
        if not isinstance(arch, dict):
            raise ArchError(f"a fast-cnn arch must be a dict with keys {', '.join(GENES)}, got {type(arch).__name__}")
        missing = [k for k in STAGE_GENES if k not in arch]
        extra = sorted(set(arch) - set(GENES))
        if missing or extra:
            raise ArchError(
                f"fast-cnn arch keys must be {', '.join(GENES)}; missing {missing or 'none'}, unknown {extra or 'none'}"
            )
        out = {g: list(arch[g]) if isinstance(arch[g], (list, tuple)) else arch[g] for g in STAGE_GENES}
        out["r"] = arch.get("r", self.choices("r")[-1])
        for gene in STAGE_GENES:
            if not isinstance(out[gene], list) or len(out[gene]) != self.num_stages:
                n = len(out[gene]) if isinstance(out[gene], list) else "not a list of"
                raise ArchError(f"arch {gene} has {n} entries; this supernet needs {self.num_stages}")
        for gene in GENES:
            values = self.choices(gene)
            for i, v in enumerate(out[gene] if isinstance(out[gene], list) else [out[gene]]):
                if v not in values or (gene == "se") != isinstance(v, bool):
                    where = f"{gene}[{i}]" if isinstance(out[gene], list) else gene
                    raise ArchError(f"arch {where}={json.dumps(v)} is not a choice of this supernet {list(values)}")
        return out

    def canonical(self, arch: dict[str, Any]) -> dict[str, Any]:
        """A plain stage's expand ratio (unused) set to the maximum: equal networks, equal dicts."""
        out = json.loads(json.dumps(arch))
        out["e"] = [max(self.expand_list) if b == "plain" else e for b, e in zip(out["b"], out["e"])]
        return out

    def key(self, arch: dict[str, Any]) -> str:
        """A readable string naming the network: the cache key of a score."""
        stages = []
        for s in range(self.num_stages):
            b = arch["b"][s]
            parts = [b, f"d{arch['d'][s]}"] + ([] if b == "plain" else [f"e{_fmt(arch['e'][s])}"])
            parts += [f"w{_fmt(arch['w'][s])}", arch["act"][s]] + (["se"] if arch["se"][s] else [])
            stages.append(" ".join(parts))
        return f"r{arch.get('r') or '-'} | " + " | ".join(stages)

    def describe(self) -> str:
        return (
            f"blocks {list(self.block_list)}, depth {list(self.depth_list)} x {self.num_stages} stages, "
            f"expand {list(self.expand_list)}, width {list(self.width_mult_list)}, se {list(self.se_list)}, "
            f"act {list(self.act_list)}, resolution {list(self.resolution_list) or 'native'}"
        )


def layer_plan(shape: dict[str, Any], arch: dict[str, Any]) -> list[dict[str, Any]]:
    """Every layer of ``arch`` (stage, index, block, widths, stride, act, SE, residual): the one
    description the static builder, the analytic FLOPs and the latency units read."""
    div, plan = shape["divisor"], []
    cin = stem_width(shape, arch)
    for s, width in enumerate(shape["stage_widths"]):
        cout = make_divisible(width * arch["w"][s], div)
        for i in range(arch["d"][s]):
            b, e = arch["b"][s], arch["e"][s]
            plan.append(
                {
                    "stage": s,
                    "index": i,
                    "block": b,
                    "cin": cin,
                    "cout": cout,
                    "mid": cout if b == "plain" else _mid_channels(cin, e, div),
                    "e": e,
                    "stride": shape["stage_strides"][s] if i == 0 else 1,
                    "act": arch["act"][s],
                    "se": bool(arch["se"][s]),
                    "residual": i > 0,
                }
            )
            cin = cout
    return plan


def stem_width(shape: dict[str, Any], arch: dict[str, Any]) -> int:
    return make_divisible(shape["stem_width"] * arch["w"][0], shape["divisor"])


# --------------------------------------------------------------------------------------------
# Static blocks and the deployed sub-network
# --------------------------------------------------------------------------------------------


class FastBlock(nn.Module):
    """One static layer: ``plain`` (conv), ``fused`` (expand 3x3, project 1x1) or ``dw``
    (expand 1x1 unless e = 1, depth 3x3 depthwise, project 1x1), SE on the middle width."""

    def __init__(self, p: dict[str, Any], divisor: int) -> None:
        super().__init__()
        b, cin, cout, mid, stride, act = p["block"], p["cin"], p["cout"], p["mid"], p["stride"], p["act"]
        self.kind, self.residual = b, p["residual"]
        self.expand = self.depth = self.project = self.conv = None
        if b == "plain":
            self.conv = _conv_bn_act(cin, cout, 3, stride, act)
        elif b == "fused":
            self.expand = _conv_bn_act(cin, mid, 3, stride, act)
        else:
            self.expand = None if p["e"] == 1 else _conv_bn_act(cin, mid, 1, 1, act)
            self.depth = _conv_bn_act(mid, mid, 3, stride, act, groups=mid)
        self.se = SqueezeExcite(mid, _se_channels(mid, divisor)) if p["se"] else None
        if b != "plain":
            self.project = _conv_bn_act(mid, cout, 1, 1, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            y = self.conv(x)
        else:
            y = x if self.expand is None else self.expand(x)
            if self.depth is not None:
                y = self.depth(y)
        if self.se is not None:
            y = self.se(y)
        if self.project is not None:
            y = self.project(y)
        return y + x if self.residual else y


class _Slot(nn.Module):
    """A layer slot of the static net: the chosen block under its type's name, as in the supernet."""

    def __init__(self, p: dict[str, Any], divisor: int) -> None:
        super().__init__()
        self.kind = p["block"]
        self.add_module(self.kind, FastBlock(p, divisor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.kind)(x)


def check_static_arch(arch: dict[str, Any], n_stages: int) -> dict[str, Any]:
    """The arch of a static ``fast-cnn`` model: every stage gene present with one entry per stage."""
    if not isinstance(arch, dict) or any(g not in arch for g in STAGE_GENES):
        raise ArchError(f"fast-cnn: an arch needs the keys {', '.join(GENES)}")
    out = {g: list(arch[g]) for g in STAGE_GENES}
    out["r"] = arch.get("r")
    for g in STAGE_GENES:
        if len(out[g]) != n_stages:
            raise ArchError(f"fast-cnn: arch {g} has {len(out[g])} entries for {n_stages} stages")
    bad = [b for b in out["b"] if b not in BLOCKS] + [a for a in out["act"] if a not in ACTS]
    if bad or min(out["d"]) < 1:
        raise ArchError(f"fast-cnn: arch has unknown blocks/activations {bad} or a depth below 1: {out}")
    return out


class FastCNN(nn.Module):
    """A static sub-network of the ``fast-cnn`` supernet (the ``fast-cnn`` backbone); module
    names equal the supernet's (``stages.<stage>.<layer>.<block type>``)."""

    def __init__(self, in_chans: int = 1, arch: dict[str, Any] | None = None, **shape: Any) -> None:
        super().__init__()
        shape = _norm_shape(shape)
        n = len(shape["stage_widths"])
        if arch is None:  # the largest sub-network of the default choices
            arch = FastSpace(n, **{k: tuple(v) for k, v in DEFAULT_CHOICES.items()}).max_arch()
        self.arch, self.shape = check_static_arch(arch, n), shape
        self.resolution = self.arch["r"]
        plan, div = layer_plan(shape, self.arch), shape["divisor"]
        self.stem = _conv_bn_act(in_chans, stem_width(shape, self.arch), 3, shape["stem_stride"], "relu")
        self.stages = nn.ModuleList(nn.ModuleList(_Slot(p, div) for p in plan if p["stage"] == s) for s in range(n))
        last = plan[-1]["cout"]
        self.head = _conv_bn_act(last, shape["head_width"], 1, 1, "relu") if shape["head_width"] else None
        self.num_features = shape["head_width"] or last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(_resize(x, self.resolution))
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
        if self.head is not None:
            x = self.head(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register_model(
    "fast-cnn",
    "query",
    "fast-cnn sub-network (dense, fused and depthwise blocks per stage) from a JSON arch (model arg arch=...); "
    "default = the largest (small inputs: stride-1 stem)",
    resolution_aware=True,
)
def _fast_cnn(in_chans: int = 1, arch: dict[str, Any] | None = None, stem: str | None = None, **shape: Any) -> FastCNN:
    if stem is not None and "stem_stride" not in shape:
        shape["stem_stride"] = stem_stride(stem)
    return FastCNN(in_chans=in_chans, arch=arch, **shape)


# --------------------------------------------------------------------------------------------
# The supernet
# --------------------------------------------------------------------------------------------


class _DynAct(nn.Module):
    """relu or h_swish, chosen at run time (no weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.active == "relu" else F.hardswish(x)


def _dyn_cba(cin: int, cout: int, k: int, stride: int, act: bool, depthwise: bool = False) -> nn.Sequential:
    conv = DynamicDepthwiseConv2d(cin, [k], stride) if depthwise else DynamicConv2d(cin, cout, k, stride)
    layers: list[tuple[str, nn.Module]] = [("conv", conv), ("bn", DynamicBatchNorm2d(cout))]
    if act:
        layers.append(("act", _DynAct()))
    return nn.Sequential(OrderedDict(layers))


class DynamicFastBlock(nn.Module):
    """One block type of a layer slot at its largest; ``set(p)`` activates the sub-block of a plan entry."""

    def __init__(self, kind: str, max_in: int, max_out: int, stride: int, max_e: float, se: bool, div: int) -> None:
        super().__init__()
        self.kind, self.div = kind, div
        self.expand = self.depth = self.project = self.conv = None
        if kind == "plain":
            self.conv = _dyn_cba(max_in, max_out, 3, stride, True)
            max_mid = max_out
        else:
            max_mid = _mid_channels(max_in, max_e, div) if max_e != 1 else max_in
            if kind == "fused":
                self.expand = _dyn_cba(max_in, max_mid, 3, stride, True)
            else:
                self.expand = _dyn_cba(max_in, max_mid, 1, 1, True) if max_e != 1 else None
                self.depth = _dyn_cba(max_mid, max_mid, 3, stride, True, depthwise=True)
            self.project = _dyn_cba(max_mid, max_out, 1, 1, False)
        self.se = DynamicSE(max_mid, div) if se else None
        self.active: dict[str, Any] = {}

    def set(self, p: dict[str, Any]) -> None:
        self.active = p
        for seq in (self.conv, self.expand, self.depth):
            if seq is not None:
                seq.act.active = p["act"]
        if self.conv is not None:
            self.conv.conv.active_out = p["cout"]
        if self.expand is not None:
            self.expand.conv.active_out = p["mid"]
        if self.project is not None:
            self.project.conv.active_out = p["cout"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active
        if self.conv is not None:
            y = self.conv(x)
        else:
            skip_expand = self.expand is None or (self.kind == "dw" and p["e"] == 1)
            y = x if skip_expand else self.expand(x)
            if self.depth is not None:
                y = self.depth(y)
        if p["se"]:
            y = self.se(y)
        if self.project is not None:
            y = self.project(y)
        return y + x if p["residual"] else y


class DynamicSlot(nn.Module):
    """A layer slot: one block of every type; the arch's block type runs."""

    def __init__(self, blocks: dict[str, DynamicFastBlock]) -> None:
        super().__init__()
        for kind, block in blocks.items():
            self.add_module(kind, block)
        self.kind = next(iter(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.kind)(x)


class DynamicLinear(nn.Linear):
    """The embedding neck over the leading input features (the last stage's elastic width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.size(1)], None if self.bias is None else self.bias)

    @torch.no_grad()
    def copy_to(self, static: nn.Linear) -> None:
        static.weight.copy_(self.weight[:, : static.in_features])
        if self.bias is not None:
            static.bias.copy_(self.bias)


class DynamicFastCNN(nn.Module):
    """The elastic backbone: every layer slot with each block type at its largest."""

    def __init__(self, in_chans: int = 1, *, space: FastSpace, **shape: Any) -> None:
        super().__init__()
        self.shape, self.space, self.in_chans = _norm_shape(shape), space, in_chans
        sp, div = self.shape, self.shape["divisor"]
        if len(sp["stage_widths"]) != space.num_stages:
            raise ArchError("fast-cnn: the space's stage count differs from stage_widths")
        max_w = max(space.width_mult_list)
        stem = make_divisible(sp["stem_width"] * max_w, div)
        self.stem = _dyn_cba(in_chans, stem, 3, sp["stem_stride"], True)
        self.stem.act.active = "relu"
        max_e, has_se = max(space.expand_list), True in space.se_list
        stages, cin = [], stem
        for s, width in enumerate(sp["stage_widths"]):
            cout = make_divisible(width * max_w, div)
            slots = []
            for i in range(space.max_depth):
                stride = sp["stage_strides"][s] if i == 0 else 1
                slots.append(
                    DynamicSlot(
                        {b: DynamicFastBlock(b, cin, cout, stride, max_e, has_se, div) for b in space.block_list}
                    )
                )
                cin = cout
            stages.append(nn.ModuleList(slots))
        self.stages = nn.ModuleList(stages)
        head = sp["head_width"]
        self.head = _dyn_cba(cin, head, 1, 1, True) if head else None
        if self.head is not None:
            self.head.act.active = "relu"
        self.num_features = head or cin
        self.active_arch: dict[str, Any] = {}
        self.set_active_subnet(space.max_arch())

    def set_active_subnet(self, arch: dict[str, Any]) -> None:
        arch = self.space.validate(arch)
        self.stem.conv.active_out = stem_width(self.shape, arch)
        for p in layer_plan(self.shape, arch):
            slot = self.stages[p["stage"]][p["index"]]
            slot.kind = p["block"]
            getattr(slot, p["block"]).set(p)
        self.active_arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arch = self.active_arch
        x = self.stem(_resize(x, arch["r"]))
        for s, stage in enumerate(self.stages):
            for layer in stage[: arch["d"][s]]:
                x = layer(x)
        if self.head is not None:
            x = self.head(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class FastCNNSupernet(ElasticSupernet):
    """The ``fast-cnn`` supernet; ``config()`` is a JSON dict from which ``FastCNNSupernet(**config)``
    rebuilds it. Same interface as :class:`hvs.models.ofa.OFAMobileNetV3Supernet`."""

    space_name = "fast-cnn"
    model_name = "fast-cnn"
    dynamic_ops = (DynamicConv2d, DynamicDepthwiseConv2d, DynamicBatchNorm2d, DynamicLinear)

    def __init__(
        self,
        embed_dim: int = 128,
        in_chans: int = 1,
        *,
        block_list: Sequence[str] = BLOCKS,
        depth_list: Sequence[int] = (1, 2, 3),
        expand_list: Sequence[float] = (1, 2, 4),
        width_mult_list: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        se_list: Sequence[bool] = (False, True),
        act_list: Sequence[str] = ACTS,
        resolution_list: Sequence[int] = (),
        **shape: Any,
    ) -> None:
        n = len(_norm_shape(shape)["stage_widths"])
        space = FastSpace(
            n,
            tuple(block_list),
            tuple(depth_list),
            tuple(expand_list),
            tuple(width_mult_list),
            tuple(se_list),
            tuple(act_list),
            tuple(resolution_list),
        )
        super().__init__(DynamicFastCNN(in_chans, space=space, **shape), embed_dim)
        self.neck = DynamicLinear(self.backbone.num_features, embed_dim, bias=False)
        self.in_chans = in_chans

    def config(self) -> dict[str, Any]:
        sp = self.space
        return {
            "embed_dim": self.embed_dim,
            "in_chans": self.in_chans,
            "block_list": list(sp.block_list),
            "depth_list": list(sp.depth_list),
            "expand_list": list(sp.expand_list),
            "width_mult_list": list(sp.width_mult_list),
            "se_list": list(sp.se_list),
            "act_list": list(sp.act_list),
            "resolution_list": list(sp.resolution_list),
            **self.shape,
        }

    def flops(self, arch: dict[str, Any] | None = None, image_size: int = 28) -> int:
        """FLOPs (as ``FlopCounterMode`` counts them) of one ``image_size`` image through ``arch``."""
        arch = self.space.validate(self.active_arch if arch is None else arch)
        return subnet_flops(self.shape, arch, self.in_chans, image_size, self.embed_dim)


def subnet_flops(shape: dict[str, Any], arch: dict[str, Any], in_chans: int, image_size: int, embed_dim: int) -> int:
    """The analytic FLOPs formula behind :meth:`FastCNNSupernet.flops`."""
    div, size, total = shape["divisor"], arch.get("r") or image_size, 0

    def conv(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> None:
        nonlocal size, total
        size = math.ceil(size / stride)
        total += 2 * cout * (cin // groups) * k * k * size * size

    conv(in_chans, stem_width(shape, arch), 3, shape["stem_stride"])
    plan = layer_plan(shape, arch)
    for p in plan:
        cin, mid, cout, stride = p["cin"], p["mid"], p["cout"], p["stride"]
        if p["block"] == "plain":
            conv(cin, cout, 3, stride)
        elif p["block"] == "fused":
            conv(cin, mid, 3, stride)
        else:
            if p["e"] != 1:
                conv(cin, mid, 1, 1)
            conv(mid, mid, 3, stride, groups=mid)
        if p["se"]:
            total += 2 * 2 * mid * _se_channels(mid, div)
        if p["block"] != "plain":
            conv(mid, cout, 1, 1)
    feat = plan[-1]["cout"]
    if shape["head_width"]:
        conv(feat, shape["head_width"], 1, 1)
        feat = shape["head_width"]
    return int(total + 2 * feat * embed_dim)


register_supernet(
    "fast-cnn",
    FastCNNSupernet,
    model="fast-cnn",
    elastic_dims=ELASTIC_DIMS,
    description="a space for CPU runtimes: plain / fused / depthwise blocks per stage, depth, width, SE, act",
)
