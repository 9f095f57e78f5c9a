"""Homogeneous and heterogeneous retrieval evaluation of a gallery/query model pair.

On the query/gallery split of a dataset:
- the paragon M(g->g): both sides embedded by the gallery model;
- homogeneous M(q->q): both sides embedded by the query model;
- heterogeneous M(q->g): queries by the query model, gallery by the gallery model.

Reports Recall@K, mAP, TAR@FAR and TPIR@FPIR for each, the empirical compatibility criterion of
BCT (Shen et al. 2020) M(q->g) > M(q->q) with a paired bootstrap interval of the difference, the gap
to the paragon M(g->g) - M(q->g) (paired bootstrap over queries), and the query-side cost ratios:
FLOPs and measured CPU latency (batch 1 and batched).

Each model reads the images at its own input size: a query model may take a smaller input than
its gallery model (e.g. 112 px against 224 px). The data is decoded once at the larger size and
each side's images are resized to its own (:func:`hvs.embed.resize_images`); FLOPs and latency
are measured at each side's own size, so the ratios are what the deployment pays.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .compat import GallerySide, QuerySide, check_pair
from .data import RetrievalData, create_dataset
from .data.checks import check_duplicates
from .embed import embed_images
from .errors import HVSError
from .metrics import (
    TAR_BOOT_MAX_RANK,
    bootstrap_ci,
    paired_bootstrap_ci,
    percentile_interval,
    resample_weights,
    retrieval_metrics,
    tar_bootstrap,
    tpir_bootstrap,
)
from .models.cost import count_flops, count_params, measure_latency

PAIRS = {
    "gallery->gallery": ("gallery", "gallery"),
    "query->query": ("query", "query"),
    "query->gallery": ("query", "gallery"),
}
# per-query arrays behind each headline metric (for bootstrap intervals)
PER_QUERY = {"recall@1": "hit@1", "recall@5": "hit@5", "recall@10": "hit@10", "map": "ap"}


class EvaluationError(HVSError):
    """An evaluation that cannot run as asked (one-line message)."""


def model_cost(model: torch.nn.Module, card: ckpt.ModelCard, latency: bool = True, batch: int = 256) -> dict:
    """FLOPs, parameters and CPU latency of a model at its own input size (``card.input_shape``:
    a query model reading smaller images than its gallery model is costed at its size)."""
    cost = {
        "model": card.model,
        "image_size": card.image_size,
        "flops": count_flops(model, card.input_shape),
        "params": count_params(model),
    }
    if latency:
        m = model.to(memory_format=torch.channels_last)
        cost["latency_ms_batch1"] = measure_latency(m, card.input_shape, 1)
        cost[f"latency_ms_batch{batch}"] = measure_latency(m, card.input_shape, batch, repeats=5, min_seconds=0.5)
        cost["latency_batch"] = batch
    return cost


def evaluate(
    gallery_model: str | Path,
    query_model: str | Path,
    data: str | RetrievalData = "fashion-mnist",
    *,
    protocol: str = "closed",
    force: bool = False,
    latency: bool = True,
    n_boot: int = 1000,
    batch_size: int = 256,
    data_seed: int = 0,
    per_query: bool = False,
    strict: bool = False,
    **data_kwargs,
) -> dict[str, Any]:
    """Evaluate a gallery/query model pair; returns every number as a JSON-able dict.

    ``data_kwargs`` (``data_mode``, ``workers``, ``cache_dir``) say how a spec's file source
    holds its images (:func:`hvs.data.create_dataset`); streamed splits are embedded batch by
    batch in DataLoader workers.

    A spec ``data`` is loaded like an index build loads it (the gallery model's channels and
    image size; only the query and gallery splits). Leaked items (the same image in query and
    gallery, a row repeated in a split: :mod:`hvs.data.checks`) inflate every number: each kind
    is a warning and a note in the result, and with ``strict`` (which also makes unreadable
    images an error) a :class:`~hvs.data.DataError` instead.

    ``per_query=True`` adds ``"per_query"``: {pair: {array: numpy array}} (hit@K and AP of the queries
    with a mate, the probes' TPIR scores), for paired comparisons between models evaluated on the same
    data; it is not JSON-able (drop it, or save it with :func:`save_per_query`)."""
    g_model, g_card = ckpt.load_model(gallery_model)
    q_model, q_card = ckpt.load_model(query_model)
    notes: list[str] = []
    warning = check_pair(
        QuerySide.of_card(q_card), GallerySide.of_card(g_card), force=force, allow_independent=True, action="evaluate"
    )
    if warning:
        notes.append(warning)
    if isinstance(data, str):
        data = create_dataset(
            data,
            protocol=protocol,
            image_size=max(g_card.image_size, q_card.image_size),  # decoded once, each side resized to its own
            channels=g_card.in_chans,
            seed=data_seed,
            strict=strict,
            splits=("query", "gallery"),
            **data_kwargs,
        )
        leaks = list(data.duplicates)  # create_dataset has warned (or refused, when strict)
    else:
        leaks = [d.message for d in check_duplicates(data, strict=strict)]
    notes += [f"data: {line}" for line in leaks]
    need = max(g_card.image_size, q_card.image_size)
    if data.channels != g_card.in_chans or data.image_size < need:
        sizes = (
            f"{g_card.image_size}px"
            if g_card.image_size == q_card.image_size
            else f"{g_card.image_size}px (gallery) and {q_card.image_size}px (query)"
        )
        raise EvaluationError(
            f"data is {data.channels}x{data.image_size}px but the models read {g_card.in_chans}-channel images "
            f"at {sizes}"
        )

    emb = {}
    for role, model, card in (("gallery", g_model, g_card), ("query", q_model, q_card)):
        emb[role] = {  # each side reads the images at its own size
            split: embed_images(
                model, data.split(split).images, card.mean, card.std, batch_size, image_size=card.image_size
            )
            for split in ("query", "gallery")
        }

    scores = evaluate_embeddings(
        data.query.labels,
        data.gallery.labels,
        query_model_emb=emb["query"],
        gallery_model_emb=emb["gallery"],
        n_boot=n_boot,
        per_query=per_query,
    )
    metrics = scores["metrics"]
    if q_card.compatible_with:  # a query model made for this gallery: the report says when that does not pay
        notes += [f"warning: {line}" for line in scores["verdict"]]
    cost = {"gallery": model_cost(g_model, g_card, latency), "query": model_cost(q_model, q_card, latency)}
    g_flops, q_flops = cost["gallery"]["flops"], cost["query"]["flops"]
    # an adopted ONNX graph whose shapes cannot be inferred has no FLOP count (0): no ratio
    ratios = {"flops": g_flops / max(1, q_flops) if g_flops else None}
    if latency:
        b = cost["gallery"]["latency_batch"]
        ratios["latency_batch1"] = cost["gallery"]["latency_ms_batch1"] / cost["query"]["latency_ms_batch1"]
        ratios[f"latency_batch{b}"] = cost["gallery"][f"latency_ms_batch{b}"] / cost["query"][f"latency_ms_batch{b}"]
    cost["ratio_gallery_over_query"] = ratios

    m_gg = metrics["gallery->gallery"]
    open_set = bool(set(data.query.labels.tolist()) - set(data.gallery.labels.tolist()))
    notes.append(
        f"TAR@FAR down to FAR={m_gg.get('smallest_far_supported')} "
        f"({m_gg['n_impostor_pairs']} impostor pairs); TPIR@FPIR down to "
        f"FPIR={m_gg.get('smallest_fpir_supported')} ({m_gg['n_nonmated_probes']} non-mated probes, "
        + ("held-out identities" if open_set else "leave-identity-out")
        + ")"
    )
    result = {
        "data": data.name,
        "protocol": data.protocol,
        "n_query": len(data.query),
        "n_gallery": len(data.gallery),
        "data_duplicates": leaks,
        "gallery_model": {"path": str(gallery_model), "model": g_card.model, "fingerprint": g_card.fingerprint},
        "query_model": {
            "path": str(query_model),
            "model": q_card.model,
            "fingerprint": q_card.fingerprint,
            "compat": q_card.compat,
            "compatible_with": q_card.compatible_with,
        },
        **scores,
        "cost": cost,
        "notes": notes,
    }
    return result


def quick_verdict(
    gallery_model: str | Path,
    query_model: str | Path,
    data: RetrievalData,
    *,
    max_queries: int = 2000,
    max_gallery: int = 10000,
    n_boot: int = 200,
    seed: int = 0,
) -> list[str]:
    """The verdict lines of :func:`heterogeneous_verdict` on a sample of ``data``'s test splits: the
    cheap check ``hvs train --gallery-model`` runs after training (empty when search pays, or when
    the data has no query and gallery splits to check on).

    At most ``max_queries`` queries and ``max_gallery`` gallery items (a seeded random sample of
    each), ``n_boot`` bootstrap resamples and no latency: seconds, not the minutes of a full
    :func:`evaluate`, whose numbers it does not replace."""
    if data.query is None or data.gallery is None or not len(data.query) or not len(data.gallery):
        return []
    g = torch.Generator().manual_seed(seed)

    def sample(part, n):
        return part if len(part) <= n else part.subset(torch.randperm(len(part), generator=g)[:n].sort().values)

    small = dataclasses.replace(
        data, train=None, query=sample(data.query, max_queries), gallery=sample(data.gallery, max_gallery)
    )
    result = evaluate(gallery_model, query_model, small, latency=False, n_boot=n_boot)
    return list(result["verdict"])


def evaluate_embeddings(
    query_labels: Any,
    gallery_labels: Any,
    *,
    query_model_emb: Mapping[str, Any],
    gallery_model_emb: Mapping[str, Any],
    n_boot: int = 1000,
    per_query: bool = False,
    nonmated_query_mask: Any = None,
) -> dict[str, Any]:
    """Every number of :func:`evaluate` from embeddings you made yourself.

    ``query_model_emb`` and ``gallery_model_emb`` map a split (``"query"``, ``"gallery"``) to the
    (N, D) embeddings that model made of it, in the order of ``query_labels`` / ``gallery_labels``.
    M(q->g) needs the query model's ``"query"`` and the gallery model's ``"gallery"``; the query
    model's ``"gallery"`` adds M(q->q) and the compatibility criterion, the gallery model's
    ``"query"`` adds the paragon M(g->g) and the gap to it. A pair whose embeddings are missing is
    left out. Probes whose identity has no gallery item are non-mated (open-set data); when every
    probe has mates, TPIR falls back to leave-identity-out. Returns ``{"metrics": {pair: ...},
    "compatibility_criterion": ..., "gap_to_paragon": ..., "headroom": M(g->g) - M(q->q),
    "verdict": [...]}`` (``verdict``: :func:`heterogeneous_verdict`, the reasons heterogeneous
    search does not pay here; and ``"per_query"`` arrays when asked, for paired comparisons).

        import hvs
        r = hvs.evaluate_embeddings(q_labels, g_labels, query_model_emb={"query": q, "gallery": qg},
                                    gallery_model_emb={"gallery": g})
        r["metrics"]["query->gallery"]["recall@1"], r["compatibility_criterion"]["map"]["holds"]
    """
    emb = {"query": dict(query_model_emb), "gallery": dict(gallery_model_emb)}
    pairs = {
        key: sides
        for key, sides in PAIRS.items()
        if sides[0] in emb and "query" in emb[sides[0]] and sides[1] in emb and "gallery" in emb[sides[1]]
    }
    if "query->gallery" not in pairs:
        raise EvaluationError(
            "evaluate_embeddings needs the query model's embeddings of the queries "
            "(query_model_emb['query']) and the gallery model's of the gallery "
            "(gallery_model_emb['gallery'])"
        )
    q_labels, g_labels = torch.as_tensor(np.asarray(query_labels)), torch.as_tensor(np.asarray(gallery_labels))
    if nonmated_query_mask is None:
        gallery_ids = set(g_labels.tolist())
        nonmated = torch.tensor([int(x) not in gallery_ids for x in q_labels.tolist()])
        nonmated_query_mask = nonmated if bool(nonmated.any()) else None

    metrics, per_q, per_probe, pair_scores = {}, {}, {}, {}
    for key, (q_side, g_side) in pairs.items():
        m = retrieval_metrics(
            torch.as_tensor(emb[q_side]["query"]),
            q_labels,
            torch.as_tensor(emb[g_side]["gallery"]),
            g_labels,
            nonmated_query_mask=nonmated_query_mask,
            pair_scores=n_boot > 0,
        )
        per_q[key], per_probe[key], pair_scores[key] = (
            m.pop("per_query"),
            m.pop("per_probe"),
            m.pop("pair_scores", None),
        )
        for name, arr_key in PER_QUERY.items():
            _, lo, hi = bootstrap_ci(np.asarray(per_q[key][arr_key]), n_boot=n_boot)
            m[f"{name}_ci95"] = [lo, hi]
        metrics[key] = m
    criterion, gap, headroom = _paired_differences(metrics, per_q, n_boot)
    if n_boot > 0:
        boot = _threshold_replicates(metrics, per_probe, pair_scores, len(q_labels), n_boot)
        _threshold_intervals(metrics, criterion, gap, boot)
    out: dict[str, Any] = {"metrics": metrics, "compatibility_criterion": criterion, "gap_to_paragon": gap}
    if headroom:
        out["headroom"] = headroom
    out["verdict"] = heterogeneous_verdict(out)
    if per_query:
        out["per_query"] = {
            key: {
                **{k: np.asarray(v) for k, v in per_q[key].items()},
                **{f"probe_{k}": np.asarray(v) for k, v in per_probe[key].items() if k != "fpir"},
            }
            for key in pairs
        }
    return out


def _paired_differences(metrics: dict, per_q: dict, n_boot: int) -> tuple[dict, dict, dict]:
    """The criterion M(q->g) - M(q->q), the gap M(g->g) - M(q->g) and the headroom M(g->g) - M(q->q)
    of the per-query metrics, each with a paired bootstrap interval over queries; TAR/TPIR point
    values of the first two (their intervals come from :func:`_threshold_intervals`)."""
    criterion: dict[str, dict] = {}
    gap: dict[str, dict] = {}
    headroom: dict[str, dict] = {}
    het = per_q["query->gallery"]
    for name, arr_key in PER_QUERY.items():
        if "query->query" in per_q and "gallery->gallery" in per_q:
            h, lo, hi = paired_bootstrap_ci(
                np.asarray(per_q["gallery->gallery"][arr_key]),
                np.asarray(per_q["query->query"][arr_key]),
                n_boot=n_boot,
            )
            headroom[name] = {"headroom": h, "ci95": [lo, hi]}
        if "query->query" in per_q:
            d, lo, hi = paired_bootstrap_ci(
                np.asarray(het[arr_key]), np.asarray(per_q["query->query"][arr_key]), n_boot=n_boot
            )
            criterion[name] = {
                "holds": bool(metrics["query->gallery"][name] > metrics["query->query"][name]),
                "difference": d,
                "ci95": [lo, hi],
                "significant": bool(lo > 0),
            }
        if "gallery->gallery" in per_q:
            g, lo, hi = paired_bootstrap_ci(
                np.asarray(per_q["gallery->gallery"][arr_key]), np.asarray(het[arr_key]), n_boot=n_boot
            )
            gap[name] = {"gap": g, "ci95": [lo, hi]}
    for name in metrics["query->gallery"]:
        if not name.startswith(("tar@", "tpir@")):
            continue
        if "query->query" in metrics:
            criterion[name] = {"holds": bool(metrics["query->gallery"][name] > metrics["query->query"].get(name, -1))}
        if name in metrics.get("gallery->gallery", {}):
            gap[name] = {"gap": metrics["gallery->gallery"][name] - metrics["query->gallery"][name]}
    return criterion, gap, headroom


def heterogeneous_verdict(scores: dict[str, Any], metric: str = "map") -> list[str]:
    """One line for each reason heterogeneous search does not pay in these numbers (empty if none).

    Judged on ``metric`` (mAP by default: it ranks the whole gallery, where Recall@1 saturates) on
    the upper end of the paired 95% interval, so a line means the data show it, not noise:

    * the gallery model is no stronger than the query model alone (headroom M(g->g) - M(q->q) not
      above 0): the large model's embeddings have nothing to add to the small model's;
    * the query model does better searching its own embeddings of the gallery (criterion
      M(q->g) - M(q->q) below 0): its compatibility with the gallery model costs accuracy.
    """
    m = scores["metrics"]
    out = []

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    room = scores.get("headroom", {}).get(metric)
    if room and room["ci95"][1] is not None and room["ci95"][1] <= 0:
        lo, hi = room["ci95"]
        out.append(
            f"the gallery model is no stronger than the query model alone: {metric} M(g->g) "
            f"{pct(m['gallery->gallery'][metric])} vs M(q->q) {pct(m['query->query'][metric])} "
            f"(difference {pct(room['headroom'])} [{pct(lo)}, {pct(hi)}]); heterogeneous search cannot pay here "
            "(a stronger gallery model, more training data or pretrained weights are needed)"
        )
    crit = scores.get("compatibility_criterion", {}).get(metric)
    if crit and crit.get("ci95") and crit["ci95"][1] is not None and crit["ci95"][1] < 0:
        lo, hi = crit["ci95"]
        out.append(
            f"the query model does better searching its own embeddings of the gallery: {metric} M(q->g) "
            f"{pct(m['query->gallery'][metric])} vs M(q->q) {pct(m['query->query'][metric])} "
            f"(difference {pct(crit['difference'])} [{pct(lo)}, {pct(hi)}]); its compatibility with the gallery "
            "model costs accuracy here"
        )
    return out


def _threshold_intervals(metrics: dict, criterion: dict, gap: dict, boot: dict) -> None:
    """Bootstrap intervals of TAR@FAR and TPIR@FPIR (thresholds recomputed in every resample; the same
    resamples for every pair, so the criterion and gap intervals are paired)."""
    for name, reps in boot.items():
        for key in metrics:
            if key in reps:
                metrics[key][f"{name}_ci95"] = percentile_interval(reps[key])
        if name in criterion and "query->query" in reps:
            ci = percentile_interval(reps["query->gallery"] - reps["query->query"])
            criterion[name].update(
                difference=metrics["query->gallery"][name] - metrics["query->query"][name],
                ci95=ci,
                significant=bool(ci is not None and ci[0] > 0),
            )
        if name in gap and "gallery->gallery" in reps:
            gap[name]["ci95"] = percentile_interval(reps["gallery->gallery"] - reps["query->gallery"])


def _threshold_replicates(
    metrics: dict, per_probe: dict, pairs: dict, n_queries: int, n_boot: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """{metric: {pair: n_boot bootstrap replicates}} for every TAR@FAR / TPIR@FPIR reported."""
    out: dict[str, dict[str, np.ndarray]] = {}
    # one resample = one multiset of queries, applied to every pair and every metric (paired CIs)
    w_q = resample_weights(n_queries, n_boot, seed)
    for key in metrics:
        for name in metrics[key]:
            if name.startswith("tpir@fpir="):
                rate = float(name.split("=", 1)[1])
                out.setdefault(name, {})[key] = tpir_bootstrap(per_probe[key], rate, w_q)
            elif name.startswith("tar@far=") and pairs.get(key) is not None:
                rate = float(name.split("=", 1)[1])
                if rate * metrics[key]["n_impostor_pairs"] <= TAR_BOOT_MAX_RANK:
                    out.setdefault(name, {})[key] = tar_bootstrap(pairs[key], rate, w_q)
    return out


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def format_report(result: dict[str, Any]) -> str:
    """A readable table: one row per metric, M(g->g), M(q->q), M(q->g), gap, criterion."""
    m = result["metrics"]
    names = [k for k in ("recall@1", "recall@5", "recall@10", "map")]
    names += [k for k in m["query->gallery"] if k.startswith(("tar@", "tpir@")) and not k.endswith("_ci95")]
    lines = [
        f"{result['data']} [{result['protocol']}-set]: {result['n_query']} queries, "
        f"{result['n_gallery']} gallery items; gallery model {result['gallery_model']['model']}, "
        f"query model {result['query_model']['model']}",
        f"{'metric':<16}{'M(g->g)':>9}{'M(q->q)':>9}{'M(q->g)':>9}{'gap [95% CI]':>24}  criterion q->g > q->q",
    ]
    for name in names:
        gap = result["gap_to_paragon"].get(name)
        crit = result["compatibility_criterion"].get(name, {})
        gap_s = (
            "-"
            if gap is None
            else f"{100 * gap['gap']:+.2f}"
            + (f" [{100 * gap['ci95'][0]:+.2f},{100 * gap['ci95'][1]:+.2f}]" if gap.get("ci95") else "")
        )
        crit_s = ("holds" if crit.get("holds") else "FAILS") + (
            f" (diff {100 * crit['difference']:+.2f} [{100 * crit['ci95'][0]:+.2f},{100 * crit['ci95'][1]:+.2f}])"
            if crit.get("ci95")
            else ""
        )
        lines.append(
            f"{name:<16}{_pct(m['gallery->gallery'].get(name)):>9}{_pct(m['query->query'].get(name)):>9}"
            f"{_pct(m['query->gallery'].get(name)):>9}{gap_s:>24}  {crit_s}"
        )
    cost = result["cost"]
    r = cost["ratio_gallery_over_query"]
    g, q = cost["gallery"], cost["query"]
    at = (
        f" (gallery at {g['image_size']}px, query at {q['image_size']}px)"
        if g.get("image_size", 0) != q.get("image_size", 0)
        else ""
    )
    line = (
        f"cost{at}: gallery {g['flops'] / 1e6:.2f} MFLOPs / query {q['flops'] / 1e6:.2f} MFLOPs = {r['flops']:.1f}x "
        f"fewer query FLOPs"
        if r["flops"] is not None
        else f"cost{at}: gallery FLOPs unknown (not countable from its graph) / query {q['flops'] / 1e6:.2f} MFLOPs"
    )
    if "latency_batch1" in r:
        b = g["latency_batch"]
        line += (
            f"; CPU latency batch 1: {g['latency_ms_batch1']:.2f} / {q['latency_ms_batch1']:.2f} ms = "
            f"{r['latency_batch1']:.1f}x, batch {b}: {g[f'latency_ms_batch{b}']:.1f} / "
            f"{q[f'latency_ms_batch{b}']:.1f} ms = {r[f'latency_batch{b}']:.1f}x"
        )
    lines.append(line)
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def save_per_query(result: dict, path: str | Path) -> None:
    """Write ``result["per_query"]`` (from ``evaluate(..., per_query=True)``) as one .npz, keys
    ``<pair>/<array>``; read back with :func:`load_per_query`."""
    arrays = {f"{pair}/{k}": v for pair, d in result["per_query"].items() for k, v in d.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_per_query(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            pair, name = key.split("/", 1)
            out.setdefault(pair, {})[name] = z[key]
    return out


def save_json(result: dict, path: str | Path) -> None:
    result = {k: v for k, v in result.items() if k != "per_query"}  # arrays: see save_per_query
    ckpt.atomic_write_json(path, json.loads(json.dumps(result, default=float)))
