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
  table approximates). :func:`compare_latency` reports both for a few archs, and
  :func:`latency_agreement` their rank correlation and ratio.

In ONNX Runtime every unit is timed in a session of its own, so each unit's time holds one
``session.run``'s fixed cost (the Python binding, input and output binding, the thread pool's
wake-up: ~8-13 us here, as much as a whole 3x3 conv at these sizes), which the whole network
pays once. Summed as is, the table ran 1.41x high (median over 14 fast-cnn archs at 28 px, 2
threads, ``benchmarks/bench_latency_table.py``; 2.1x for the smallest), which made every budget
under ~0.06 ms look infeasible. The table therefore measures that cost once
(:class:`_CallProbe`, a graph that does almost nothing, on the network's input; more repeats than
a unit, it is multiplied by the unit count) and predicts ``sum(units) - (n_units - 1) * call``,
never below the slowest unit: median 1.10 on the same archs (ofa-mbv3: 1.35 -> 1.03). It can
over-correct: a kanji-fonts run at 32 px read 0.75x on fused-block networks, where part of each
unit's call cost is not paid separately. Two refinements were measured and dropped
(2026-12-03, 14 fast-cnn archs at 32 px, 2 threads): a call cost per pair of unit input and output
shapes, and a scale fitted to whole sub-networks measured end to end: Spearman 0.82 against this
table's 0.92, mean |log(predicted / measured)| 0.167 against 0.151. Neither beats the noise of the
measurement itself: one network's batch-1 ORT latency moves by up to 1.5x between windows of
0.3 s on this 2-core VM, and a table measured while other jobs run reads high for good (a
kanji-fonts run whose table was measured beside a test suite found a 20x budget infeasible: "the
smallest sub-network needs 0.112 ms"; on the quiet machine the table reads 0.072 ms for it and the
network measures 0.048 ms). Eager PyTorch pays a module call's overhead per unit inside the
network as well, so its table is the plain sum (which runs ~0.8x of the measurement).

Where a query model runs decides its latency, so the **runtime** is part of every number
(``RUNTIMES``): ``torch`` (eager PyTorch), ``ort`` (ONNX Runtime fp32: what ``hvs export``
ships to a device, and the search's default) and ``ort-int8`` (ONNX Runtime after the static
int8 quantization of :func:`hvs.export.quantize_onnx_int8`, calibrated here on random inputs:
latency does not depend on the calibration's values). In ONNX Runtime each unit is exported
alone (TorchScript exporter, fixed shape) and timed in its own session with the table's thread
count (``threads``: the device's; default torch's), as intra-op threads, or torch's for eager
PyTorch; the table file is keyed by runtime, batch size and thread count.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..errors import HVSError
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
    """(key, module factory, input shape) of every unit of ``arch``, in order, for the supernet's space."""
    space_name = getattr(supernet, "space_name", "ofa-mbv3")
    if space_name not in _UNITS:
        raise LatencyError(f"no latency units for the search space {space_name!r}")
    return _UNITS[space_name](supernet, arch, image_size)


def _resize_unit(in_chans: int, image_size: int, r: int | None) -> tuple[list[Unit], int]:
    if r and r != image_size:
        return [(f"resize:c{in_chans},{image_size}->{r}", lambda: _Resize(r), (in_chans, image_size, image_size))], r
    return [], image_size


def _ofa_units(supernet: OFAMobileNetV3Supernet, arch: dict[str, Any], image_size: int) -> list[Unit]:
    shape, space = supernet.shape, supernet.space
    arch = space.validate(arch)
    plan = _layer_plan(shape, space, arch)
    in_chans = supernet.in_chans
    units, res = _resize_unit(in_chans, image_size, arch.get("r"))
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


class _FastHead(nn.Module):
    """fast-cnn's head unit: [1x1 head conv], pooling, the embedding neck."""

    def __init__(self, cin: int, head: int, embed_dim: int) -> None:
        super().__init__()
        self.head = _conv_bn_act(cin, head, 1, 1, "relu") if head else None
        self.neck = nn.Linear(head or cin, embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            x = self.head(x)
        return F.normalize(self.bn(self.neck(F.adaptive_avg_pool2d(x, 1).flatten(1))), dim=-1)


def _fast_units(supernet, arch: dict[str, Any], image_size: int) -> list[Unit]:
    """fast-cnn: resize, stem, one unit per layer (block type, widths, expand, stride, act, SE,
    residual, resolution), head."""
    from ..models import fastcnn

    shape, in_chans = supernet.shape, supernet.in_chans
    arch = supernet.space.validate(arch)
    units, res = _resize_unit(in_chans, image_size, arch.get("r"))
    stem, stride = fastcnn.stem_width(shape, arch), shape["stem_stride"]
    units.append(
        (
            f"fstem:c{in_chans}->{stem},s{stride},res{res}",
            lambda: _conv_bn_act(in_chans, stem, 3, stride, "relu"),
            (in_chans, res, res),
        )
    )
    res = -(-res // stride)
    for p in fastcnn.layer_plan(shape, arch):
        e = "" if p["block"] == "plain" else f",e{p['e']}"
        key = (
            f"{p['block']}:{p['cin']}->{p['cout']}{e},s{p['stride']},{p['act']},se{int(p['se'])},"
            f"skip{int(p['residual'])},res{res}"
        )
        units.append((key, lambda p=p: fastcnn.FastBlock(p, shape["divisor"]), (p["cin"], res, res)))
        res = -(-res // p["stride"])
    cin, head, dim = fastcnn.layer_plan(shape, arch)[-1]["cout"], shape["head_width"], supernet.embed_dim
    units.append((f"fhead:{cin}->{head}->{dim},res{res}", lambda: _FastHead(cin, head, dim), (cin, res, res)))
    return units


_UNITS = {"ofa-mbv3": _ofa_units, "fast-cnn": _fast_units}

RUNTIMES = ("torch", "ort", "ort-int8")


class LatencyError(HVSError):
    """A latency that cannot be measured as asked (unknown runtime, ONNX Runtime missing)."""


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise LatencyError(f"unknown latency runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime.startswith("ort"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise LatencyError(
                f"latency runtime {runtime} needs onnxruntime (pip install 'hvs[export]'), or use the torch runtime"
            ) from None
    return runtime


def _onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """``module`` as an ONNX graph of one fixed input shape (TorchScript exporter: fast, and the
    units are plain conv / BN / activation stacks it handles)."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), buf, input_names=["x"], output_names=["y"], opset_version=18, dynamo=False
        )
    return buf.getvalue()


def _int8_bytes(fp32: bytes, example: torch.Tensor) -> bytes:
    """The graph quantized as ``hvs export onnx --int8`` quantizes (:func:`hvs.export.quantize_qdq`),
    calibrated on random inputs: latency does not depend on the calibration's values."""
    from onnxruntime.quantization import CalibrationDataReader

    from ..export import quantize_qdq

    rng = np.random.default_rng(0)
    batches = iter([{"x": rng.standard_normal(tuple(example.shape)).astype(np.float32)} for _ in range(4)])

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    with tempfile.TemporaryDirectory(prefix="hvs-lat-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_qdq(src, dst, _Reader())
        return dst.read_bytes()


def module_latency(
    module: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    runtime: str = "torch",
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_seconds: float = 0.05,
    threads: int | None = None,
) -> float:
    """Median latency (ms) of one call of ``module`` (eval mode) on a (batch, *input_shape) input in
    ``runtime``: channels-last eager PyTorch, or the module exported to ONNX and run by ONNX Runtime
    (fp32 or int8), on ``threads`` threads (default: torch's count; ORT's intra-op threads)."""
    check_runtime(runtime)
    threads = check_threads(threads)
    module = module.eval()
    if runtime == "torch":
        module = module.to(memory_format=torch.channels_last)
        with torch_threads(threads):
            return measure_latency(
                module, input_shape, batch_size, warmup=warmup, repeats=repeats, min_seconds=min_seconds
            )
    from ..encoders import measure_ort_latency, ort_session

    example = torch.randn(batch_size, *input_shape)
    with torch.no_grad():
        blob = _onnx_bytes(module, example)
    if runtime == "ort-int8":
        blob = _int8_bytes(blob, example)
    session = ort_session(blob, threads=threads)
    return measure_ort_latency(
        session, tuple(input_shape), batch_size, warmup=warmup, repeats=repeats, min_seconds=min_seconds
    )


def check_threads(threads: int | None) -> int:
    """The thread count a latency is measured at: ``threads``, or torch's when None."""
    if threads is None:
        return torch.get_num_threads()
    if int(threads) < 1:
        raise LatencyError(f"a latency thread count must be >= 1, got {threads}")
    return int(threads)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, then put back."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _runtime_meta(runtime: str) -> dict[str, str]:
    if runtime == "torch":
        return {"torch": torch.__version__}
    import onnxruntime

    return {"runtime": runtime, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


class _CallProbe(nn.Module):
    """Next to nothing on the input (one element, times one): timed alone it is the fixed cost
    of one ONNX Runtime call, which every unit's separate session pays and a whole network once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1] * 1.0


class LatencyTable:
    """Per-unit latencies (ms) measured on this CPU in one runtime, filled lazily and saved as JSON;
    in ONNX Runtime also the fixed cost of one call (``call_ms``), counted once per network."""

    def __init__(
        self,
        supernet: OFAMobileNetV3Supernet,
        image_size: int,
        folder: str | os.PathLike | None = None,
        batch_size: int = 1,
        min_seconds: float = 0.05,
        repeats: int = 10,
        runtime: str = "torch",
        threads: int | None = None,
    ) -> None:
        self.supernet, self.image_size, self.batch_size = supernet, image_size, batch_size
        self.min_seconds, self.repeats, self.runtime = min_seconds, repeats, check_runtime(runtime)
        self.threads = check_threads(threads)
        self.meta = {"batch_size": batch_size, "threads": self.threads, **_runtime_meta(runtime)}
        prefix = "latency_table" if runtime == "torch" else f"latency_table_{runtime}"  # torch: the older name
        self.path = None if folder is None else (Path(folder) / f"{prefix}_b{batch_size}_t{self.meta['threads']}.json")
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
            self.entries[key] = module_latency(
                factory(),
                input_shape,
                self.batch_size,
                self.runtime,
                repeats=self.repeats,
                min_seconds=self.min_seconds,
                threads=self.threads,
            )
            self.measured += 1
            self._dirty = True
        return self.entries[key]

    def call_ms(self) -> float:
        """The fixed cost (ms) of one call in this runtime that the sum of units counts once per
        unit: measured (and kept) for ONNX Runtime, 0 for eager PyTorch."""
        if self.runtime == "torch":
            return 0.0
        shape = (self.supernet.in_chans, self.image_size, self.image_size)
        key = "call:" + ",".join(str(v) for v in shape)
        if key not in self.entries:  # timed longer than a unit: the prediction subtracts it once per unit
            self.entries[key] = module_latency(
                _CallProbe(),
                shape,
                self.batch_size,
                self.runtime,
                repeats=max(50, self.repeats),
                min_seconds=max(0.2, self.min_seconds),
                threads=self.threads,
            )
            self.measured += 1
            self._dirty = True
        return self.entries[key]

    def predict(self, arch: dict[str, Any]) -> float:
        """Predicted latency (ms) of ``arch``: the sum over its units less the per-call cost each
        unit's own session added beyond the network's one call, and never below its slowest unit."""
        per = [self.unit_latency(u) for u in latency_units(self.supernet, arch, self.image_size)]
        return float(max(sum(per) - (len(per) - 1) * self.call_ms(), max(per)))

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
    runtime: str = "torch",
    threads: int | None = None,
) -> float:
    """Median latency (ms) of the extracted sub-network in ``runtime`` on ``threads`` threads
    (:func:`module_latency`)."""
    supernet.set_active_subnet(arch)
    sub = supernet.get_active_subnet()
    return module_latency(
        sub,
        (supernet.in_chans, image_size, image_size),
        batch_size,
        runtime,
        warmup=5,
        repeats=20,
        min_seconds=min_seconds,
        threads=threads,
    )


def compare_latency(
    supernet: OFAMobileNetV3Supernet, table: LatencyTable, archs: list[dict[str, Any]], min_seconds: float = 0.3
) -> list[dict[str, Any]]:
    """Predicted (table) vs measured (extracted sub-network, same runtime and threads) latency for each arch."""
    rows = []
    for arch in archs:
        predicted = table.predict(arch)
        measured = measure_subnet_latency(
            supernet,
            arch,
            table.image_size,
            table.batch_size,
            min_seconds,
            runtime=table.runtime,
            threads=table.threads,
        )
        rows.append(
            {
                "key": supernet.space.key(arch),
                "predicted_ms": round(predicted, 4),
                "measured_ms": round(measured, 4),
                "ratio": round(predicted / measured, 3),
            }
        )
    return rows


def latency_agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How well the table predicts the measurement over :func:`compare_latency` rows: Spearman's rank
    correlation (None below 3 rows or when one side is constant) and the median and range of
    predicted / measured. The ranking is what a search under a budget needs; the ratio says by
    how far the table's absolute numbers (units less the per-call cost) are off."""
    pred = np.array([r["predicted_ms"] for r in rows], dtype=float)
    meas = np.array([r["measured_ms"] for r in rows], dtype=float)
    ratio = pred / meas if len(rows) else np.zeros(0)
    rho = None
    if len(rows) >= 3:
        rp, rm = _ranks(pred), _ranks(meas)
        if rp.std() > 0 and rm.std() > 0:
            rho = float(np.corrcoef(rp, rm)[0, 1])
    return {
        "n": len(rows),
        "spearman": None if rho is None else round(rho, 4),
        "ratio_median": None if not len(rows) else round(float(np.median(ratio)), 4),
        "ratio_range": None if not len(rows) else [round(float(ratio.min()), 4), round(float(ratio.max()), 4)],
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's coefficient correlates)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks
