"""Upgrading an index's gallery model without re-indexing first: does the old query model keep its accuracy?

    python benchmarks/upgrade.py                       # fashion-mnist, ~15 min on 2 busy CPU cores
    python benchmarks/upgrade.py --train-subset 60000 --epochs 8 --queries 0   # the full run
    python benchmarks/upgrade.py --g2-compat bct         # G2 with the BCT influence loss alone

Trains, on the data's train split:

* G1, the old gallery model (``--g1``, default cnn-small);
* Q1, a query model for G1 (``--q1``, default cnn-tiny, BCT with G1 frozen);
* G2, the new gallery model (``--g2``, default resnet8), trained backward-compatible with G1 as
  its frozen reference: ``hvs train --role gallery --gallery-model G1 --compat bct,l2=1`` (the
  BCT influence loss plus feature regression onto G1's embeddings; ``--g2-compat``). With BCT
  alone, at the default budget, Q1 lost 3.5 points of R@1 once the index was re-embedded (paired
  95% CI below 0): an old *query* model is a second hop away from G2's space, and BCT alone
  does not keep it close enough; the regression term does.

Then builds a FAISS index of the gallery split with G1 and measures Q1 (R@1 and mAP of the
query split, searched through the index itself: every score is the index's) at each step of the
upgrade: the G1 index, the index half backfilled with G2 (``hvs index backfill`` stopped midway),
and fully re-embedded. References in the same run: G1->G1 and G2->G2 (each model searching its own
vectors) and Q1 against an index built with G2 from scratch (must equal the full backfill).
Q1's change against its starting accuracy comes with a paired bootstrap 95% CI over the queries.
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
from hvs.metrics import paired_bootstrap_ci, retrieval_metrics_from_scores
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
    per_q = m["per_query"]
    return {
        "r1": float(m["recall@1"]),
        "map": float(m["map"]),
        "models": {str(k): v for k, v in counts.items()},
        "per_query": {"query_index": per_q["query_index"], "hit@1": per_q["hit@1"], "ap": per_q["ap"]},
    }


def paired_change(row: dict, start: dict, n_boot: int) -> dict:
    """Change of R@1 and mAP against ``start`` (same queries): mean and paired bootstrap 95% CI."""
    a, b = row["per_query"], start["per_query"]
    assert np.array_equal(a["query_index"], b["query_index"])
    out = {}
    for key, name in (("hit@1", "r1"), ("ap", "map")):
        mean, lo, hi = paired_bootstrap_ci(a[key], b[key], n_boot=n_boot)
        out[name] = [float(mean), float(lo), float(hi)]
    return out


def _pp(x: list[float]) -> str:
    return f"{100 * x[0]:+.2f} [{100 * x[1]:+.2f}, {100 * x[2]:+.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--work", default="runs/bench-upgrade")
    p.add_argument("--g1", default="cnn-small")
    p.add_argument("--q1", default="cnn-tiny")
    p.add_argument("--g2", default="resnet8")
    p.add_argument(
        "--g2-compat", default="bct,l2=1", help="G2's compatibility losses with G1 (bct alone: see the docstring)"
    )
    p.add_argument("--g2-epochs", type=int, help="G2's epochs (default --epochs)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the paired CIs")
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
    g2_epochs = args.g2_epochs or args.epochs
    g1, q1 = work / "g1", work / "q1"
    g2 = work / f"g2-{args.g2_compat}-{g2_epochs}ep"
    _train(g1, log, model=args.g1, role="gallery", **common)
    _train(q1, log, model=args.q1, gallery=str(g1), compat=["bct"], **common)
    g2_common = dict(common, epochs=g2_epochs)
    g2_card = _train(
        g2, log, model=args.g2, gallery=str(g1), role="gallery", compat=args.g2_compat.split(","), **g2_common
    )
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
        name = model.name[:2]  # q1, g1, g2
        r = {"step": step, "query_model": name, **measure(index, model, q_images, q_labels, g_labels)}
        r.update(extra or {})
        rows.append(r)
        log(f"{step:<34} {name:<4} R@1 {100 * r['r1']:.2f}  mAP {100 * r['map']:.2f}  {r['models']}")

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
        "| step | query model | R@1 | mAP | Q1's change vs start: R@1, mAP [95% CI] | vectors (G1 / G2) |",
        "|---|---|---|---|---|---|",
    ]
    fp1, fp2 = ckpt.read_card(g1).fingerprint, g2_card.fingerprint
    for r in rows:
        counts = f"{r['models'].get(fp1, 0) + r['models'].get('None', 0)} / {r['models'].get(fp2, 0)}"
        change = ""
        if r["query_model"] == "q1" and r is not start:
            r["change"] = paired_change(r, start, args.n_boot)
            change = f"{_pp(r['change']['r1'])}, {_pp(r['change']['map'])}"
        table.append(
            f"| {r['step']} | {r['query_model']} | {100 * r['r1']:.2f} | {100 * r['map']:.2f} | {change} | {counts} |"
        )
    q1_rows = [r for r in rows if "change" in r]
    below = [r for r in q1_rows if r["change"]["r1"][2] < 0 or r["change"]["map"][2] < 0]
    lower = [r for r in q1_rows if r["change"]["r1"][0] < 0 or r["change"]["map"][0] < 0]
    if below:
        verdict = "Q1 (for G1) fell below its starting accuracy (95% CI below 0) at: " + ", ".join(
            r["step"] for r in below
        )
    elif lower:
        verdict = "Q1 (for G1) did not fall significantly below its starting accuracy (every 95% CI reaches 0)"
    else:
        verdict = "Q1 (for G1) never fell below its starting accuracy"
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
                    "rows": [{k: v for k, v in r.items() if k != "per_query"} for r in rows],
                    "verdict": verdict,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
