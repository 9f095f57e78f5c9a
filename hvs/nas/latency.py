"""CPU latency of sub-networks: a per-layer lookup table, or direct measurement.

On CPUs FLOPs predict latency poorly (depthwise convs run ~10 GFLOP/s here, dense ones ~100),
so a latency budget needs latencies measured on the target. Once-for-All (Cai et al. 2020)
predicts a sub-network's latency as the sum of per-layer latencies from a lookup table measured
once on the device; this module does the same:

* a **unit** is one piece of the network with everything that fixes its cost: the input resize,
  the stem, each MBConv layer (in/out width, kernel, expand ratio, stride, activation, SE,
  input resolution), and the head (final 1x1 conv, pooling, feature mix, embedding neck);
* :class:`LatencyTable` measures a unit the first time it is needed (static modules with random
  weights, ``hvs.models.cost.measure_latency``, channels-last, eval mode) and keeps it, as JSON
  in the supernet folder (``latency_table_b<batch>_t<threads>.json``: the batch size and the
  thread count change every number), so later searches reuse it;
* :func:`measure_subnet_latency` times the extracted sub-network itself (the ground truth the
  table approximates; the sum of units ignores the calls' fixed overhead, so it runs high for
  tiny networks). :func:`compare_latency` reports both for a few archs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..models.cost import measure_latency
from ..models.ofa import MBConv, OFAMobileNetV3Supernet, _conv_bn_act, _layer_plan, make_divisible


class _Resize(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class _Head(nn.Module):
    def __init__(self, cin: int, final: int, feature: int, embed_dim: int) -> None:
        super().__init__()
        self.final_expand = _conv_bn_act(cin, final, 1, 1, "h_swish")
        self.feature_mix = _conv_bn_act(final, feature, 1, 1, "h_swish", bn=False)
        self.neck = nn.Linear(feature, embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_mix(F.adaptive_avg_pool2d(self.final_expand(x), 1)).flatten(1)
        return F.normalize(self.bn(self.neck(x)), dim=-1)


Unit = tuple[str, Callable[[], nn.Module], tuple[int, int, int]]


def latency_units(supernet: OFAMobileNetV3Supernet, arch: dict[str, Any], image_size: int) -> list[Unit]:
    """(key, module factory, input shape) of every unit of ``arch``, in order."""
    shape, space = supernet.shape, supernet.space
    arch = space.validate(arch)
    plan = _layer_plan(shape, space, arch)
    in_chans, units = supernet.in_chans, []
    res = image_size
    r = arch.get("r")
    if r and r != image_size:
        units.append((f"resize:c{in_chans},{image_size}->{r}", lambda: _Resize(r), (in_chans, image_size, image_size)))
        res = r
    stem, stride = plan[0]["cin"], shape["stem_stride"]
    units.append(
        (
            f"stem:c{in_chans}->{stem},s{stride},res{res}",
            lambda: _conv_bn_act(in_chans, stem, 3, stride, "h_swish"),
            (in_chans, res, res),
        )
    )
    res = -(-res // stride)
    for p in plan:
        key = (
            f"mb:{p['cin']}->{p['cout']},k{p['k']},e{p['e']},s{p['stride']},{p['act']},se{int(p['se'])},"
            f"skip{int(p['residual'])},res{res}"
        )
        units.append(
            (
                key,
                lambda p=p: MBConv(
                    p["cin"], p["cout"], p["k"], p["e"], p["stride"], p["act"], p["se"], p["residual"], shape["divisor"]
                ),
                (p["cin"], res, res),
            )
        )
        res = -(-res // p["stride"])
    final = make_divisible(shape["final_width"] * arch["w"], shape["divisor"])
    cin, feature, dim = plan[-1]["cout"], shape["feature_width"], supernet.embed_dim
    units.append(
        (f"head:{cin}->{final}->{feature}->{dim},res{res}", lambda: _Head(cin, final, feature, dim), (cin, res, res))
    )
    return units


class LatencyTable:
    """Per-unit latencies (ms) measured on this CPU, filled lazily and saved as JSON."""

    def __init__(
        self,
        supernet: OFAMobileNetV3Supernet,
        image_size: int,
        folder: str | os.PathLike | None = None,
        batch_size: int = 1,
        min_seconds: float = 0.05,
        repeats: int = 10,
    ) -> None:
        self.supernet, self.image_size, self.batch_size = supernet, image_size, batch_size
        self.min_seconds, self.repeats = min_seconds, repeats
        self.meta = {"batch_size": batch_size, "threads": torch.get_num_threads(), "torch": torch.__version__}
        self.path = (
            None if folder is None else (Path(folder) / f"latency_table_b{batch_size}_t{self.meta['threads']}.json")
        )
        self.entries: dict[str, float] = {}
        self.measured = 0  # units measured by this instance (the rest came from the file)
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("meta") == self.meta:
                self.entries = {k: float(v) for k, v in saved.get("entries", {}).items()}
        self._dirty = False

    def unit_latency(self, unit: Unit) -> float:
        key, factory, input_shape = unit
        if key not in self.entries:
            torch.manual_seed(0)
            module = factory().eval().to(memory_format=torch.channels_last)
            self.entries[key] = measure_latency(
                module, input_shape, self.batch_size, warmup=3, repeats=self.repeats, min_seconds=self.min_seconds
            )
            self.measured += 1
            self._dirty = True
        return self.entries[key]

    def predict(self, arch: dict[str, Any]) -> float:
        """Predicted latency (ms) of ``arch``: the sum over its units."""
        return float(sum(self.unit_latency(u) for u in latency_units(self.supernet, arch, self.image_size)))

    def save(self) -> None:
        if self.path is not None and self._dirty:
            ckpt.atomic_write_json(self.path, {"meta": self.meta, "entries": dict(sorted(self.entries.items()))})
            self._dirty = False


def measure_subnet_latency(
    supernet: OFAMobileNetV3Supernet,
    arch: dict[str, Any],
    image_size: int,
    batch_size: int = 1,
    min_seconds: float = 0.3,
) -> float:
    """Median latency (ms) of the extracted sub-network, channels-last, eval mode."""
    supernet.set_active_subnet(arch)
    sub = supernet.get_active_subnet().eval().to(memory_format=torch.channels_last)
    return measure_latency(sub, (supernet.in_chans, image_size, image_size), batch_size, min_seconds=min_seconds)


def compare_latency(
    supernet: OFAMobileNetV3Supernet, table: LatencyTable, archs: list[dict[str, Any]], min_seconds: float = 0.3
) -> list[dict[str, Any]]:
    """Predicted (table) vs measured (extracted sub-network) latency for each arch."""
    rows = []
    for arch in archs:
        predicted = table.predict(arch)
        measured = measure_subnet_latency(supernet, arch, table.image_size, table.batch_size, min_seconds)
        rows.append(
            {
                "key": supernet.space.key(arch),
                "predicted_ms": round(predicted, 4),
                "measured_ms": round(measured, 4),
                "ratio": round(predicted / measured, 3),
            }
        )
    return rows
