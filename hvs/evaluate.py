"""Homogeneous and heterogeneous retrieval evaluation of a gallery/query model pair.

On the query/gallery split of a dataset:
- the paragon M(g->g): both sides embedded by the gallery model;
- homogeneous M(q->q): both sides embedded by the query model;
- heterogeneous M(q->g): queries by the query model, gallery by the gallery model.

Reports Recall@K, mAP, TAR@FAR and TPIR@FPIR for each, the empirical compatibility criterion of
BCT (Shen et al. 2020) M(q->g) > M(q->q) with a paired bootstrap interval of the difference, the gap
to the paragon M(g->g) - M(q->g) (paired bootstrap over queries), and the query-side cost ratios:
FLOPs and measured CPU latency (batch 1 and batched).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .data import RetrievalData, create_dataset
from .embed import embed_images
from .metrics import bootstrap_ci, paired_bootstrap_ci, retrieval_metrics
from .models.cost import count_flops, count_params, measure_latency

PAIRS = {"gallery->gallery": ("gallery", "gallery"), "query->query": ("query", "query"),
         "query->gallery": ("query", "gallery")}
# per-query arrays behind each headline metric (for bootstrap intervals)
PER_QUERY = {"recall@1": "hit@1", "recall@5": "hit@5", "recall@10": "hit@10", "map": "ap"}


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (one-line message)."""


def model_cost(model: torch.nn.Module, card: ckpt.ModelCard, latency: bool = True, batch: int = 256) -> dict:
    cost = {"model": card.model, "flops": count_flops(model, card.input_shape), "params": count_params(model)}
    if latency:
        m = model.to(memory_format=torch.channels_last)
        cost["latency_ms_batch1"] = measure_latency(m, card.input_shape, 1)
        cost[f"latency_ms_batch{batch}"] = measure_latency(m, card.input_shape, batch, repeats=5, min_seconds=0.5)
        cost["latency_batch"] = batch
    return cost


def evaluate(gallery_model: str | Path, query_model: str | Path, data: str | RetrievalData = "fashion-mnist", *,
             protocol: str = "closed", force: bool = False, latency: bool = True, n_boot: int = 1000,
             batch_size: int = 256, data_seed: int = 0) -> dict[str, Any]:
    """Evaluate a gallery/query model pair; returns every number as a JSON-able dict."""
    g_model, g_card = ckpt.load_model(gallery_model)
    q_model, q_card = ckpt.load_model(query_model)
    notes: list[str] = []
    warning = ckpt.check_compatible(q_card, g_card.fingerprint, g_card.embed_dim, force=force,
                                    allow_independent=True)
    if warning:
        notes.append(warning)
    if g_card.input_shape != q_card.input_shape:
        raise EvaluationError(f"gallery model reads {g_card.input_shape} images but the query model reads "
                              f"{q_card.input_shape}: evaluate them on data of one shape")
    if isinstance(data, str):
        data = create_dataset(data, protocol=protocol, image_size=g_card.image_size, seed=data_seed)
    if (data.channels, data.image_size) != (g_card.in_chans, g_card.image_size):
        raise EvaluationError(f"data is {data.channels}x{data.image_size}px but the models read "
                              f"{g_card.in_chans}x{g_card.image_size}px")

    emb = {}
    for role, model, card in (("gallery", g_model, g_card), ("query", q_model, q_card)):
        emb[role] = {split: embed_images(model, data.split(split).images, card.mean, card.std, batch_size)
                     for split in ("query", "gallery")}

    # A probe is non-mated when its identity is absent from the gallery (open-set data);
    # when every probe has mates, the metrics fall back to leave-identity-out.
    gallery_ids = set(data.gallery.labels.tolist())
    nonmated = torch.tensor([int(l) not in gallery_ids for l in data.query.labels.tolist()])
    nonmated_mask = nonmated if bool(nonmated.any()) else None

    metrics, per_query = {}, {}
    for key, (q_side, g_side) in PAIRS.items():
        m = retrieval_metrics(emb[q_side]["query"], data.query.labels, emb[g_side]["gallery"], data.gallery.labels,
                              nonmated_query_mask=nonmated_mask)
        per_query[key] = m.pop("per_query")
        for name, arr_key in PER_QUERY.items():
            _, lo, hi = bootstrap_ci(np.asarray(per_query[key][arr_key]), n_boot=n_boot)
            m[f"{name}_ci95"] = [lo, hi]
        metrics[key] = m

    criterion, gap = {}, {}
    for name, arr_key in PER_QUERY.items():
        het, hom, par = (np.asarray(per_query[k][arr_key]) for k in ("query->gallery", "query->query",
                                                                      "gallery->gallery"))
        d, lo, hi = paired_bootstrap_ci(het, hom, n_boot=n_boot)
        criterion[name] = {"holds": bool(metrics["query->gallery"][name] > metrics["query->query"][name]),
                           "difference": d, "ci95": [lo, hi], "significant": bool(lo > 0)}
        g, lo, hi = paired_bootstrap_ci(par, het, n_boot=n_boot)
        gap[name] = {"gap": g, "ci95": [lo, hi]}
    for name in metrics["query->gallery"]:
        if name.startswith(("tar@", "tpir@")):
            criterion[name] = {"holds": bool(metrics["query->gallery"][name] > metrics["query->query"].get(name, -1))}
            if name in metrics["gallery->gallery"]:
                gap[name] = {"gap": metrics["gallery->gallery"][name] - metrics["query->gallery"][name]}

    cost = {"gallery": model_cost(g_model, g_card, latency), "query": model_cost(q_model, q_card, latency)}
    ratios = {"flops": cost["gallery"]["flops"] / max(1, cost["query"]["flops"])}
    if latency:
        b = cost["gallery"]["latency_batch"]
        ratios["latency_batch1"] = cost["gallery"]["latency_ms_batch1"] / cost["query"]["latency_ms_batch1"]
        ratios[f"latency_batch{b}"] = cost["gallery"][f"latency_ms_batch{b}"] / cost["query"][f"latency_ms_batch{b}"]
    cost["ratio_gallery_over_query"] = ratios

    m_gg = metrics["gallery->gallery"]
    notes.append(f"TAR@FAR down to FAR={m_gg.get('smallest_far_supported')} "
                 f"({m_gg['n_impostor_pairs']} impostor pairs); TPIR@FPIR down to "
                 f"FPIR={m_gg.get('smallest_fpir_supported')} ({m_gg['n_nonmated_probes']} non-mated probes, "
                 + ("held-out identities" if nonmated_mask is not None else "leave-identity-out") + ")")
    return {
        "data": data.name, "protocol": data.protocol, "n_query": len(data.query), "n_gallery": len(data.gallery),
        "gallery_model": {"path": str(gallery_model), "model": g_card.model, "fingerprint": g_card.fingerprint},
        "query_model": {"path": str(query_model), "model": q_card.model, "fingerprint": q_card.fingerprint,
                        "compat": q_card.compat, "compatible_with": q_card.compatible_with},
        "metrics": metrics, "compatibility_criterion": criterion, "gap_to_paragon": gap, "cost": cost,
        "notes": notes,
    }


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def format_report(result: dict[str, Any]) -> str:
    """A readable table: one row per metric, M(g->g), M(q->q), M(q->g), gap, criterion."""
    m = result["metrics"]
    names = [k for k in ("recall@1", "recall@5", "recall@10", "map")]
    names += [k for k in m["query->gallery"] if k.startswith(("tar@", "tpir@"))]
    lines = [f"{result['data']} [{result['protocol']}-set]: {result['n_query']} queries, "
             f"{result['n_gallery']} gallery items; gallery model {result['gallery_model']['model']}, "
             f"query model {result['query_model']['model']}",
             f"{'metric':<16}{'M(g->g)':>9}{'M(q->q)':>9}{'M(q->g)':>9}{'gap [95% CI]':>24}  criterion q->g > q->q"]
    for name in names:
        gap = result["gap_to_paragon"].get(name)
        crit = result["compatibility_criterion"].get(name, {})
        gap_s = "-" if gap is None else f"{100 * gap['gap']:+.2f}" + (
            f" [{100 * gap['ci95'][0]:+.2f},{100 * gap['ci95'][1]:+.2f}]" if "ci95" in gap else "")
        crit_s = ("holds" if crit.get("holds") else "FAILS") + (
            f" (diff {100 * crit['difference']:+.2f} [{100 * crit['ci95'][0]:+.2f},{100 * crit['ci95'][1]:+.2f}])"
            if "ci95" in crit else "")
        lines.append(f"{name:<16}{_pct(m['gallery->gallery'].get(name)):>9}{_pct(m['query->query'].get(name)):>9}"
                     f"{_pct(m['query->gallery'].get(name)):>9}{gap_s:>24}  {crit_s}")
    cost = result["cost"]
    r = cost["ratio_gallery_over_query"]
    g, q = cost["gallery"], cost["query"]
    line = (f"cost: gallery {g['flops'] / 1e6:.2f} MFLOPs / query {q['flops'] / 1e6:.2f} MFLOPs = {r['flops']:.1f}x "
            f"fewer query FLOPs")
    if "latency_batch1" in r:
        b = g["latency_batch"]
        line += (f"; CPU latency batch 1: {g['latency_ms_batch1']:.2f} / {q['latency_ms_batch1']:.2f} ms = "
                 f"{r['latency_batch1']:.1f}x, batch {b}: {g[f'latency_ms_batch{b}']:.1f} / "
                 f"{q[f'latency_ms_batch{b}']:.1f} ms = {r[f'latency_batch{b}']:.1f}x")
    lines.append(line)
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def save_json(result: dict, path: str | Path) -> None:
    ckpt.atomic_write_json(path, json.loads(json.dumps(result, default=float)))
