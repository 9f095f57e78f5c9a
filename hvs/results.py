"""Reading evaluation results back: typed blocks of one metric, costs, and paired differences of two models.

:func:`hvs.evaluate.evaluate` returns (and ``save_json`` writes) one nested dict per gallery/query
pair. Reports that compare many pairs need the same few views of it: one metric on the three
sides with its intervals (:func:`metric_block`), the cost of one side (:func:`cost_block`), and
the difference between two query models evaluated on the same queries and gallery with a paired
bootstrap CI (:func:`paired_difference`, from the per-query arrays ``save_per_query`` writes).
The bootstrap itself is :mod:`hvs.metrics`'s; this module only picks the right arrays.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from .evaluate import load_per_query
from .metrics import paired_bootstrap_ci, percentile_interval, resample_weights, tpir_bootstrap

SIDES = (("q->g", "query->gallery"), ("q->q", "query->query"), ("g->g", "gallery->gallery"))


# One metric of one evaluation: the three sides with their 95% CIs, the gap to the paragon
# (M(g->g) - M(q->g), paired CI) and the compatibility criterion (M(q->g) > M(q->q)). The keys
# name who embedded which side, so the functional form of TypedDict.
MetricBlock = TypedDict(
    "MetricBlock",
    {
        "q->g": float | None,
        "q->g_ci95": list[float] | None,
        "q->q": float | None,
        "q->q_ci95": list[float] | None,
        "g->g": float | None,
        "g->g_ci95": list[float] | None,
        "gap": float | None,
        "gap_ci95": list[float] | None,
        "criterion": dict | None,
    },
)


class CostBlock(TypedDict):
    """Cost of one side's model: FLOPs and parameters, CPU latency at batch 1 and batched (ms)."""

    flops: int
    params: int
    latency_ms_batch1: float | None
    latency_batch: int | None
    latency_ms_batched: float | None


def metric_block(result: dict, metric: str) -> MetricBlock:
    """The :class:`MetricBlock` of ``metric`` in an evaluation result (None where not measured)."""
    m = result["metrics"]
    out: dict[str, Any] = {}
    for side, key in SIDES:
        out[side] = m[key].get(metric)
        out[f"{side}_ci95"] = m[key].get(f"{metric}_ci95")
    gap = result["gap_to_paragon"].get(metric)
    out["gap"] = None if gap is None else gap["gap"]
    out["gap_ci95"] = None if gap is None else gap.get("ci95")
    out["criterion"] = result["compatibility_criterion"].get(metric)
    return out  # type: ignore[return-value]


def cost_block(result: dict, side: str) -> CostBlock:
    """The :class:`CostBlock` of ``side`` (``"query"`` or ``"gallery"``) in an evaluation result."""
    c = result["cost"][side]
    b = c.get("latency_batch")
    return {
        "flops": c["flops"],
        "params": c["params"],
        "latency_ms_batch1": c.get("latency_ms_batch1"),
        "latency_batch": b,
        "latency_ms_batched": c.get(f"latency_ms_batch{b}") if b else None,
    }


def per_query_array(metric: str) -> str | None:
    """The per-query array whose mean is ``metric`` (``hit@K`` for recall@K, ``ap`` for mAP); None
    for threshold metrics, which are not means of per-query values."""
    if metric == "map":
        return "ap"
    return f"hit@{metric.split('@')[1]}" if metric.startswith("recall@") else None


def load_q2g(npz: str | Path | None) -> dict[str, np.ndarray] | None:
    """The query->gallery per-query arrays of an evaluation (``eval-*.npz``), None when absent."""
    if not npz or not Path(npz).is_file():
        return None
    return load_per_query(npz)["query->gallery"]


def paired_difference(
    a: dict | None, b: dict | None, metric: str, n_boot: int = 1000, seed: int = 0
) -> tuple[float, list[float] | None] | None:
    """``M_a(q->g) - M_b(q->g)`` for two query models on the same queries and gallery, from their
    per-query q->g arrays (:func:`load_q2g`), with a paired bootstrap 95% CI over queries.

    Recall@K and mAP resample the per-query differences (:func:`hvs.metrics.paired_bootstrap_ci`);
    TPIR@FPIR recomputes both thresholds under the same resamples of the queries
    (:func:`hvs.metrics.tpir_bootstrap`). None for other metrics or missing arrays."""
    if a is None or b is None:
        return None
    arr = per_query_array(metric)
    if arr is not None and arr in a and arr in b:
        d, lo, hi = paired_bootstrap_ci(a[arr], b[arr], n_boot=n_boot, seed=seed)
        return d, [lo, hi]
    if metric.startswith("tpir@fpir="):
        rate = float(metric.split("=", 1)[1])
        pa, pb = ({k.removeprefix("probe_"): v for k, v in x.items() if k.startswith("probe_")} for x in (a, b))
        n_q = int(max(pa["mated_query"].max(initial=-1), pa["nonmated_query"].max(initial=-1))) + 1
        ones = np.ones((1, n_q), np.int32)
        d = float(tpir_bootstrap(pa, rate, ones)[0] - tpir_bootstrap(pb, rate, ones)[0])
        w = resample_weights(n_q, n_boot, seed)
        return d, percentile_interval(tpir_bootstrap(pa, rate, w) - tpir_bootstrap(pb, rate, w))
    return None


# -- markdown cells: points, with signs for differences ------------------------------------------


def pct(x: float | None, sign: bool = False) -> str:
    """A rate as points (``0.8123`` -> ``81.23``), ``-`` for a missing or NaN value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def ci_cell(ci: list | None, sign: bool = False) -> str:
    """`` [lo,hi]`` in points, empty without an interval."""
    if not ci:
        return ""
    return f" [{pct(ci[0], sign)},{pct(ci[1], sign)}]"


def diff_cell(d: tuple | None) -> str:
    """A paired difference with its CI, ``*`` when the CI excludes 0."""
    if d is None:
        return "-"
    return f"{pct(d[0], True)}{ci_cell(d[1], True)}" + (" *" if d[1] and (d[1][0] > 0 or d[1][1] < 0) else "")


__all__ = [
    "CostBlock",
    "MetricBlock",
    "ci_cell",
    "cost_block",
    "diff_cell",
    "load_q2g",
    "metric_block",
    "paired_difference",
    "pct",
    "per_query_array",
]
