"""The main job: a paragon gallery model, a small query model trained alone and with BCT, evaluated.

What it shows: the independently trained query model is as good as chance at searching the gallery
model's index (its embeddings live in another space), while the BCT query model searches it at
close to the paragon's accuracy for a fraction of the query cost. Finished stages are reused, an
interrupted one resumes, so re-running after a kill continues where it stopped (the stages are
:class:`hvs.pipeline.Pipeline`'s, as in the benchmarks).
"""

from __future__ import annotations

import time
from pathlib import Path

from .data import create_dataset
from .evaluate import evaluate, format_report, save_json
from .pipeline import REUSED, Event, Pipeline
from .train import TrainConfig


def _reuse_line(event: Event) -> str | None:
    """The demo announces each stage itself; of the pipeline's events it only says what it reused."""
    return f"[reuse] {event['name']} is already trained" if event["status"] == REUSED else None


def run_demo(
    out: str = "runs/demo",
    *,
    data: str = "fashion-mnist",
    gallery_model: str = "resnet8",
    query_model: str = "cnn-tiny",
    gallery_epochs: int = 6,
    query_epochs: int = 6,
    train_subset: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    t_start = time.perf_counter()
    root = Path(out)
    dataset = create_dataset(data)
    common = dict(data=data, train_subset=train_subset)
    stages = {
        "gallery": TrainConfig(out=str(root / "gallery"), model=gallery_model, epochs=gallery_epochs, **common),
        "query-independent": TrainConfig(
            out=str(root / "query-independent"), model=query_model, role="query", epochs=query_epochs, **common
        ),
        "query-bct": TrainConfig(
            out=str(root / "query-bct"),
            model=query_model,
            epochs=query_epochs,
            gallery=str(root / "gallery"),
            compat=["bct"],
            **common,
        ),
    }
    pipe = Pipeline(log=log, event_line=_reuse_line, progress=progress)
    seconds = {}
    for name, cfg in stages.items():
        log(f"== training {name}: {cfg.model}, {cfg.epochs} epochs" + (f", compat {cfg.compat}" if cfg.compat else ""))
        pipe.train("train", cfg, data=dataset, name=str(cfg.out))
        seconds[f"train {name}"] = pipe.events[-1]["seconds"]

    results = {}
    for name in ("query-independent", "query-bct"):
        t0 = time.perf_counter()
        results[name] = evaluate(root / "gallery", root / name, dataset)
        seconds[f"evaluate {name}"] = time.perf_counter() - t0
        save_json(results[name], root / f"eval-{name}.json")
    log("\n== " + format_report(results["query-bct"]) + "\n")
    log(summary_table(results))
    wall = time.perf_counter() - t_start
    log("\nwall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()) + f"; total {wall:.0f}s")
    summary = {"results": results, "seconds": seconds, "wall_seconds": wall}
    save_json(summary, root / "demo.json")
    return summary


def summary_table(results: dict[str, dict]) -> str:
    """One row per query model: cost ratios, M(q->q), M(q->g), gap to paragon, criterion."""
    any_result = next(iter(results.values()))
    gg = any_result["metrics"]["gallery->gallery"]
    g_cost = any_result["cost"]["gallery"]
    head = (
        f"| {'model':<26} | {'MFLOPs':>7} | {'FLOPs ratio':>11} | {'latency ratio b1':>16} | "
        f"{'R@1 q->q':>8} | {'R@1 q->g':>8} | {'R@1 gap [95% CI]':>22} | {'mAP q->q':>8} | {'mAP q->g':>8} | "
        f"{'mAP gap [95% CI]':>22} | criterion R@1 / mAP |"
    )
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    rows = [
        head,
        sep,
        f"| {'paragon ' + g_cost['model'] + ' (g->g)':<26} | {g_cost['flops'] / 1e6:>7.2f} | {'1.0x':>11} | "
        f"{'1.0x':>16} | {100 * gg['recall@1']:>8.2f} | {100 * gg['recall@1']:>8.2f} | {'-':>22} | "
        f"{100 * gg['map']:>8.2f} | {100 * gg['map']:>8.2f} | {'-':>22} | {'-':<19} |",
    ]

    def gap(r, k):
        g = r["gap_to_paragon"][k]
        return f"{100 * g['gap']:+.2f} [{100 * g['ci95'][0]:+.2f},{100 * g['ci95'][1]:+.2f}]"

    for name, r in results.items():
        q = r["cost"]["query"]
        ratio = r["cost"]["ratio_gallery_over_query"]
        qq, qg = r["metrics"]["query->query"], r["metrics"]["query->gallery"]
        crit = r["compatibility_criterion"]
        label = f"{q['model']} {name.replace('query-', '')}"
        lat = f"{ratio['latency_batch1']:.1f}x" if "latency_batch1" in ratio else "-"
        crit_s = " / ".join("holds" if crit[k]["holds"] else "fails" for k in ("recall@1", "map"))
        rows.append(
            f"| {label:<26} | {q['flops'] / 1e6:>7.2f} | {ratio['flops']:>10.1f}x | {lat:>16} | "
            f"{100 * qq['recall@1']:>8.2f} | {100 * qg['recall@1']:>8.2f} | {gap(r, 'recall@1'):>22} | "
            f"{100 * qq['map']:>8.2f} | {100 * qg['map']:>8.2f} | {gap(r, 'map'):>22} | {crit_s:<19} |"
        )
    return "\n".join(rows)
