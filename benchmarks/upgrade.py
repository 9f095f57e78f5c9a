"""Upgrading an index's gallery model without re-indexing first: does the old query model keep its accuracy?

    python benchmarks/upgrade.py                       # fashion-mnist, ~10 min on 2 CPU cores
    python benchmarks/upgrade.py --train-subset 60000 --epochs 8 --queries 0   # the full run

Trains, on the data's train split:

* G1, the old gallery model (``--g1``, default cnn-small);
* Q1, a query model for G1 (``--q1``, default cnn-tiny, BCT with G1 frozen);
* G2, the new gallery model (``--g2``, default resnet8), trained backward-compatible with G1 as
  its frozen reference (BCT: ``hvs train --role gallery --gallery-model G1 --compat bct``).

Then builds a FAISS index of the gallery split with G1 and measures Q1 (R@1 and mAP of the
query split, searched through the index itself: every score is the index's) at each step of the
upgrade: the G1 index, the index half backfilled with G2 (``hvs index backfill`` stopped midway),
and fully re-embedded. References in the same run: G1->G1 and G2->G2 (each model searching its own
vectors) and Q1 against an index built with G2 from scratch (must equal the full backfill).
Prints a table; ``--json FILE`` writes every number and the command. Models are kept in
``--work`` and reused when complete (delete the folder to retrain).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hvs import checkpoint as ckpt
from hvs.data import create_dataset
from hvs.encoders import load_query_encoder
from hvs.index import open_index
from hvs.index.backfill import backfill
from hvs.metrics import retrieval_metrics_from_scores
from hvs.search import Searcher, build_gallery_index
from hvs.train import TrainConfig, train


def _train(out: Path, log, **kw) -> ckpt.ModelCard:
    if (out / ckpt.CONFIG).is_file():
        log(f"reusing {out}")
        return ckpt.read_card(out)
    t0 = time.perf_counter()
    card = train(TrainConfig(out=str(out), **kw), progress=False, log=lambda _: None)
    log(f"trained {out.name} ({kw['model']}) in {time.perf_counter() - t0:.0f} s")
    return card


def measure(index_spec: str, query_model: Path, images: torch.Tensor, q_labels, g_labels) -> dict:
    """R@1 and mAP of ``query_model`` on ``images`` searched through the index at ``index_spec``:
    the full ranking the index returns, as a (Q, G) score matrix (item ids are gallery rows)."""
    with open_index(index_spec) as index:
        searcher = Searcher(index, query_model)  # the pairing rule, as every search path applies it
        emb = np.asarray(searcher.encoder.embed(images), dtype=np.float32)
        n = len(index)
        scores, ids = index.search(emb, k=n)
        counts = index.model_counts()
    matrix = torch.full((len(emb), len(g_labels)), -1e9, dtype=torch.float32)  # an item not in the index ranks last
    rows = torch.arange(len(emb))[:, None].expand(-1, ids.shape[1])
    valid = torch.from_numpy(ids >= 0)
    matrix[rows[valid], torch.from_numpy(ids)[valid]] = torch.from_numpy(scores)[valid]
    m = retrieval_metrics_from_scores(matrix, q_labels, g_labels, ks=(1,), far_targets=(), fpir_targets=())
    return {"r1": float(m["recall@1"]), "map": float(m["map"]), "models": {str(k): v for k, v in counts.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--work", default="runs/bench-upgrade")
    p.add_argument("--g1", default="cnn-small")
    p.add_argument("--q1", default="cnn-tiny")
    p.add_argument("--g2", default="resnet8")
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=12000, help="training images (0: all)")
    p.add_argument("--queries", type=int, default=2000, help="queries measured (0: the whole query split)")
    p.add_argument("--batch", type=int, default=500, help="backfill batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()

    data = create_dataset(args.data)
    common = dict(
        data=args.data,
        embed_dim=args.embed_dim,
        epochs=args.epochs,
        batch_size=128,
        lr=0.05,
        train_subset=args.train_subset or None,
        threads=args.threads,
    )
    g1, q1, g2 = work / "g1", work / "q1", work / "g2"
    _train(g1, log, model=args.g1, role="gallery", **common)
    _train(q1, log, model=args.q1, gallery=str(g1), compat=["bct"], **common)
    g2_card = _train(g2, log, model=args.g2, gallery=str(g1), role="gallery", compat=["bct"], **common)
    assert g2_card.compatible_with["fingerprint"] == ckpt.read_card(g1).fingerprint

    query = data.query
    order = torch.arange(len(query))
    if args.queries and args.queries < len(order):
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(0))[: args.queries]
    q_images, q_labels = query.images[order], query.labels[order]
    g_labels = data.gallery.labels
    # the index's images are decoded at each model's size: they all read the data's own here
    enc = load_query_encoder(q1)
    assert (enc.preprocessing["channels"], enc.preprocessing["image_size"]) == (data.channels, data.image_size)

    rows: list[dict] = []

    def row(step: str, index: str, model: Path, extra: dict | None = None) -> None:
        r = {"step": step, "query_model": model.name, **measure(index, model, q_images, q_labels, g_labels)}
        r.update(extra or {})
        rows.append(r)
        log(f"{step:<34} {model.name:<4} R@1 {100 * r['r1']:.2f}  mAP {100 * r['map']:.2f}  {r['models']}")

    idx = work / "idx"
    fresh = work / "idx-g2"
    for folder in (idx, fresh):
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
    spec = f"faiss:{idx}"
    build_gallery_index(g1, args.data, spec, progress=False).close()
    row("G1 index (before the upgrade)", spec, q1)
    row("G1 index (before the upgrade)", spec, g1)
    n = len(g_labels)
    half = math.ceil(n / 2 / args.batch)
    t0 = time.perf_counter()
    report = backfill(spec, g2, batch_size=args.batch, max_batches=half)
    n_replaced = report.replaced
    t_half = time.perf_counter() - t0
    log(report.summary())
    row("half backfilled with G2", spec, q1, {"backfill_s": round(t_half, 2), "replaced": report.replaced})
    try:
        Searcher(spec, g2).index.close()
        g2_half = "accepted"
    except Exception as e:  # noqa: BLE001  reported, not hidden
        g2_half = f"refused: {e}"
    t0 = time.perf_counter()
    report = backfill(spec, g2, batch_size=args.batch)
    t_rest = time.perf_counter() - t0
    n_replaced += report.replaced
    log(report.summary())
    row("fully re-embedded with G2", spec, q1, {"backfill_s": round(t_rest, 2), "replaced": report.replaced})
    row("fully re-embedded with G2", spec, g2)
    build_gallery_index(g2, args.data, f"faiss:{fresh}", progress=False).close()
    row("G2 index built from scratch", f"faiss:{fresh}", q1)

    start = rows[0]
    table = [
        "| step | query model | R@1 | mAP | vectors (G1 / G2) |",
        "|---|---|---|---|---|",
    ]
    fp1, fp2 = ckpt.read_card(g1).fingerprint, g2_card.fingerprint
    for r in rows:
        counts = f"{r['models'].get(fp1, 0) + r['models'].get('None', 0)} / {r['models'].get(fp2, 0)}"
        table.append(f"| {r['step']} | {r['query_model']} | {100 * r['r1']:.2f} | {100 * r['map']:.2f} | {counts} |")
    q1_rows = [r for r in rows if r["query_model"] == "q1"]
    worst = min(q1_rows, key=lambda r: r["map"])
    verdict = (
        f"Q1 (for G1) never fell below its starting accuracy: worst mAP {100 * worst['map']:.2f} "
        f"vs {100 * start['map']:.2f} at the start ({worst['step']})"
        if all(r["map"] >= start["map"] and r["r1"] >= start["r1"] for r in q1_rows)
        else f"Q1 fell below its starting accuracy at '{worst['step']}': mAP {100 * worst['map']:.2f} "
        f"vs {100 * start['map']:.2f} (R@1 {100 * worst['r1']:.2f} vs {100 * start['r1']:.2f})"
    )
    print("\n" + "\n".join(table))
    print(f"\n{verdict}")
    print(f"G2 as a query model on the half-backfilled index: {g2_half}")
    print(
        f"backfill: {n_replaced} items re-embedded in {t_half + t_rest:.1f} s; "
        f"{len(q_images)} queries; total {time.perf_counter() - t_start:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                    "args": vars(args),
                    "rows": rows,
                    "verdict": verdict,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
