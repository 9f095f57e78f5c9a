"""Which compatibility loss closes the gap? CMP-NAS picks re-made with other losses, paired against the benchmark's.

    python benchmarks/compat_ablation.py --data kanji-fonts --profile quick --seeds 0

Runs on top of a finished ``benchmarks/tradeoff.py`` run of the same data, profile and seeds: it
reuses that run's paragon, BCT supernet and searches (``results/<data>/<profile>/seed<S>/``).
Each variant of the profile's ``ablation.variants`` changes the CMP-NAS recipe:

* ``export``   -- overrides of the export step, e.g. ``{compat: [bct, l2=1]}``: the same searched
  architecture, fine-tuned with feature regression onto the paragon's embeddings besides BCT;
* ``supernet`` -- overrides of supernet training, e.g. ``{regress_weight: 1}``: a new supernet,
  trained with the regression term, searched again (hetero reward) at each budget;
* ``scratch``  -- ``{epochs: E, lr: LR[, batch_size: B]}``: the benchmark's searched architecture
  trained from random weights (``hvs.train``) for E epochs with the export's compatibility losses
  (default BCT) instead of fine-tuned from the supernet's weights. Beside export variants with
  other ``finetune_epochs`` / ``lr``, it tells whether a pick is held back by its schedule or by
  the shared weights it starts from.

A profile whose ``export`` has ``recipes`` (hvs.nas.export_best_recipe) passes them on: an export
variant then trains every recipe with its overrides and keeps the best on the supernet's
validation split, as the benchmark did; ``export: {recipes: null}`` makes it one plain export on
every training image.

Every variant's query model is evaluated against the paragon like the benchmark's own models, and
compared with the benchmark's CMP-NAS pick at the same budget and seed (``nas-hetero-<B>x``):
the difference in M(q->g) with a paired bootstrap 95% CI over queries. Output:
``results/<data>/<profile>_ablation.{json,md}`` (every number and the command). Everything it
trains lives in ``seed<S>/ablation/<variant>/`` and is reused when complete.

This is an ablation on the test split, to find out where the gap comes from. The benchmark's
own recipe is not tuned on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hvs import checkpoint as ckpt
from hvs.pipeline import PipelineError
from hvs.profiles import ProfileStages, check_export, load_dataset, load_profile, profile_metrics
from hvs.results import ci_cell, diff_cell, load_q2g, metric_block, paired_difference, pct

ROOT = Path(__file__).resolve().parent.parent  # configs/ lives here


SCRATCH_EXPORT_KEYS = ("compat", "bct_weight", "batch_size")  # what a scratch variant takes from the export


def scratch_compat(export: dict, supernet_bct: float) -> list[str]:
    """The compatibility losses the export fine-tune would use, as trainer specs
    (:func:`hvs.nas.export.finetune_compat`, the export's one rule)."""
    from hvs.nas.export import finetune_compat

    terms = finetune_compat(export.get("compat"), export.get("bct_weight"), supernet_bct)
    return [f"{name}={w:g}" for name, w in terms]


def check_scratch_folder(folder: Path, want: dict) -> None:
    """A scratch model folder made under other settings is an error, not reused or resumed."""
    saved = folder / "train_config.json"
    if not saved.is_file():
        return
    from hvs.losses import parse_compat

    have = json.loads(saved.read_text())
    same = {"compat": lambda a, b: parse_compat(a or []) == parse_compat(b or [])}  # "bct" is "bct=1"
    diff = sorted(k for k, v in want.items() if not same.get(k, lambda a, b: a == b)(have.get(k), v))
    if diff:
        raise PipelineError(
            f"{folder} was trained with other settings ({', '.join(f'{k}={have.get(k)!r}' for k in diff)}); "
            f"remove it or name the variant anew"
        )


def variant_profile(profile: dict, spec: dict) -> dict:
    unknown = set(spec) - {"export", "supernet", "scratch"}
    if unknown:
        raise PipelineError(f"ablation variant keys must be export, supernet or scratch, got {sorted(unknown)}")
    if "scratch" in spec:
        sc = spec["scratch"]
        if spec.get("supernet") or not isinstance(sc, dict) or set(sc) - {"epochs", "lr", "batch_size"}:
            raise PipelineError(
                "an ablation scratch variant is {epochs: E, lr: LR[, batch_size: B]} and trains the "
                f"benchmark's architecture (no supernet overrides), got {spec}"
            )
        if int(sc.get("epochs", 0)) < 1 or float(sc.get("lr", 0)) <= 0:
            raise PipelineError(f"an ablation scratch variant needs epochs >= 1 and lr > 0, got {sc}")
        ignored = sorted(set(spec.get("export") or {}) - set(SCRATCH_EXPORT_KEYS))
        if ignored:
            raise PipelineError(
                f"an ablation scratch variant trains no export: its export overrides {ignored} would be "
                f"ignored (it reads only {', '.join(SCRATCH_EXPORT_KEYS)})"
            )
    out = copy.deepcopy(profile)
    for key in ("export", "supernet"):
        out[key] = {**(out.get(key) or {}), **(spec.get(key) or {})}
    return out


def run_seed(
    root: Path,
    profile: dict,
    data: str,
    full,
    train_data,
    seed: int,
    budgets: list[float],
    variants: dict[str, dict],
    metrics: list[str],
    log: Callable[[str], None],
) -> list[dict]:
    from hvs.models.cost import count_flops

    sd = root / f"seed{seed}"
    gallery = sd / "paragon"
    if not (gallery / ckpt.CONFIG).is_file() or not (sd / "supernet" / "config.json").is_file():
        raise PipelineError(
            f"{sd} has no paragon or supernet: run benchmarks/tradeoff.py with the same --data, "
            f"--profile and --seeds first"
        )
    g_model, g_card = ckpt.load_model(gallery)
    paragon_flops = count_flops(g_model, g_card.input_shape)
    n_boot = int((profile.get("evaluate") or {}).get("n_boot", 1000))
    sn_bct = float(json.loads((sd / "supernet" / "config.json").read_text()).get("bct_weight", 1.0))
    rows = []
    for name, spec in variants.items():
        vp = variant_profile(profile, spec)
        runner = ProfileStages(root, vp, data, full, train_data, set(), log, seed=seed)
        vd = sd / "ablation" / name
        vd.mkdir(parents=True, exist_ok=True)
        supernet = sd / "supernet"
        if spec.get("supernet"):
            supernet = vd / "supernet"
            runner.supernet(supernet, gallery)
        for ratio in budgets:
            tag = f"{ratio:g}x"
            base_json = sd / f"eval-nas-hetero-{tag}.json"
            if not base_json.is_file():
                log(f"[skip] {name} {tag}: the benchmark has no nas-hetero-{tag} for seed {seed}")
                continue
            base_best = json.loads((sd / f"search-hetero-{tag}" / "best.json").read_text())
            if spec.get("supernet"):
                best = runner.search(vd / f"search-hetero-{tag}", supernet, gallery, paragon_flops / ratio, "hetero")
            else:
                best = base_best
            folder, eval_json = vd / f"nas-hetero-{tag}", vd / f"eval-nas-hetero-{tag}.json"
            if spec.get("scratch"):
                base_card = ckpt.read_card(sd / f"nas-hetero-{tag}")
                sc, ex = spec["scratch"], vp.get("export") or {}
                settings = {
                    "model": base_card.model,
                    "model_kwargs": base_card.model_kwargs,
                    "compat": scratch_compat(ex, sn_bct),
                    "epochs": int(sc["epochs"]),
                    "lr": float(sc["lr"]),
                    "batch_size": int(sc.get("batch_size", ex.get("batch_size", 256))),
                    "seed": seed,
                }
                check_scratch_folder(folder, settings)
                ok = runner.train("ablation", folder, gallery=str(gallery), role="query", **settings)
            else:
                ok = runner.export(folder, supernet, gallery, best)
            if not ok:
                raise PipelineError(f"{folder}: not made")
            result = runner.evaluate("ablation", gallery, folder, eval_json)
            base = json.loads(base_json.read_text())
            row: dict[str, Any] = {
                "seed": seed,
                "variant": name,
                "spec": spec,
                "budget_ratio": ratio,
                "arch": best["key"],
                "val_reward": None if spec.get("scratch") else best.get("reward"),  # the supernet's, not this model's
                "flops": result["cost"]["query"]["flops"],
                "flops_ratio": result["cost"]["ratio_gallery_over_query"]["flops"],
                "eval_json": str(eval_json),
                "baseline_eval_json": str(base_json),
                "metrics": {},
                "baseline": {"arch": base_best["key"], "flops": base["cost"]["query"]["flops"]},
            }
            a, b = (load_q2g(p.with_suffix(".npz")) for p in (eval_json, base_json))
            for metric in metrics:
                blk, bblk = metric_block(result, metric), metric_block(base, metric)
                d = paired_difference(a, b, metric, n_boot)
                blk["baseline_q->g"] = bblk["q->g"]
                blk["diff_vs_baseline"] = None if d is None else d[0]
                blk["diff_vs_baseline_ci95"] = None if d is None else d[1]
                row["metrics"][metric] = blk
            rows.append(row)
    return rows


def markdown(rows: list[dict], metrics: list[str]) -> str:
    m0 = metrics[0]
    lines = [
        f"| seed | budget | variant | MFLOPs | val R@1 (search) | {m0} q->g | vs benchmark's CMP-NAS "
        f"(paired) | {m0} q->q | gap to paragon | criterion q->g - q->q |"
        + "".join(f" {m} q->g | vs benchmark |" for m in metrics[1:]),
        "|" + "---|" * (10 + 2 * (len(metrics) - 1)),
    ]
    for r in rows:
        b = r["metrics"][m0]
        crit = b.get("criterion") or {}
        cells = [
            str(r["seed"]),
            f"{r['budget_ratio']:g}x",
            r["variant"],
            f"{r['flops'] / 1e6:.2f}",
            pct(r.get("val_reward")),
            pct(b["q->g"]) + ci_cell(b["q->g_ci95"]),
            diff_cell(None if b["diff_vs_baseline"] is None else (b["diff_vs_baseline"], b["diff_vs_baseline_ci95"])),
            pct(b["q->q"]),
            pct(b["gap"], True) + ci_cell(b["gap_ci95"], True),
            pct(crit.get("difference"), True) if isinstance(crit, dict) else "-",
        ]
        for m in metrics[1:]:
            bm = r["metrics"][m]
            cells += [
                pct(bm["q->g"]) + ci_cell(bm["q->g_ci95"]),
                diff_cell(
                    None if bm["diff_vs_baseline"] is None else (bm["diff_vs_baseline"], bm["diff_vs_baseline_ci95"])
                ),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compat_ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--profile", default="quick")
    p.add_argument("--seeds", help="comma list (default: the profile's ablation.seeds, else its seeds)")
    p.add_argument("--variants", help="comma list of the profile's ablation variants to run (default: all)")
    p.add_argument("--out", default="results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    log = (lambda s: None) if args.quiet else print
    try:
        return _main(args, argv, log)
    except ValueError as e:  # PipelineError and every HVSError among them
        print(f"compat_ablation: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str] | None, log: Callable[[str], None]) -> int:
    t0 = time.perf_counter()
    profile, profile_path = load_profile(args.profile, ROOT / "configs")
    name = profile_path.stem.removeprefix("tradeoff_")
    ab = profile.get("ablation") or {}
    variants = dict(ab.get("variants") or {})
    if not variants:
        raise PipelineError(f"profile {name} has no ablation.variants")
    if args.variants:
        pick = [v.strip() for v in args.variants.split(",") if v.strip()]
        missing = [v for v in pick if v not in variants]
        if missing:
            raise PipelineError(f"no ablation variant(s) {missing} in profile {name}; it has {sorted(variants)}")
        variants = {v: variants[v] for v in pick}
    for spec in variants.values():  # every variant's export as it will run, before anything trains
        check_export(variant_profile(profile, spec))
    seeds = (
        [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.seeds
        else [int(s) for s in ab.get("seeds", profile.get("seeds", [0]))]
    )
    budgets = [float(b) for b in ab.get("budgets", (profile.get("search") or {}).get("budgets", []))]
    metrics = profile_metrics(profile, args.data, ["recall@1"])
    if profile.get("threads"):
        torch.set_num_threads(int(profile["threads"]))
    data_dir = Path(args.out) / args.data.replace(":", "_").replace("/", "_")
    root = data_dir / name
    full, train_data = load_dataset(profile, args.data)
    rows = [
        r
        for s in seeds
        for r in run_seed(root, profile, args.data, full, train_data, s, budgets, variants, metrics, log)
    ]
    md = (
        f"# Ablation of the CMP-NAS recipe: {args.data}, profile {name}, seeds {','.join(map(str, seeds))}\n\n"
        f"Paired against the benchmark's CMP-NAS pick (supernet BCT, fine-tune BCT) at the same budget and seed; "
        f"* = the paired 95% CI excludes 0. val R@1 = the search's reward on the validation split "
        f"(training identities) for the architecture used.\n\n{markdown(rows, metrics)}\n"
    )
    log("\n" + md)
    summary = {
        "command": shlex.join(
            [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
        ),
        "data": args.data,
        "profile_name": name,
        "profile_path": str(profile_path),
        "seeds": seeds,
        "budgets": budgets,
        "variants": variants,
        "metrics": metrics,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    ckpt.atomic_write_json(data_dir / f"{name}_ablation.json", json.loads(json.dumps(summary, default=float)))
    (data_dir / f"{name}_ablation.md").write_text(md)
    log(f"wrote {data_dir / (name + '_ablation.json')} and .md; {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
