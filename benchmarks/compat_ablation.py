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
  the shared weights it starts from;
* ``offshelf`` -- ``{model: M, epochs: E, lr: LR[, batch_size: B]}`` alone: the benchmark's
  off-the-shelf query net ``bct-<M>`` trained again for E epochs (same data, BCT against the same
  paragon), once per seed and paired against the benchmark's: the control for the picks' longer
  schedules (a pick that gains from 15 epochs is compared with ``cnn-tiny`` at 15 epochs).

A profile whose ``export`` has ``recipes`` (hvs.nas.export_best_recipe) passes them on: an export
variant then trains every recipe with its overrides and keeps the best on the supernet's
validation split, as the benchmark did; ``export: {recipes: null}`` makes it one plain export on
every training image.

Every variant's query model is evaluated against the paragon like the benchmark's own models, and
compared with the benchmark's CMP-NAS pick at the same budget and seed (``nas-hetero-<B>x``):
the difference in M(q->g) with a paired bootstrap 95% CI over queries.

Budgets are the profile's ``ablation.budgets`` (FLOPs ratios, tagged ``<B>x``) and
``ablation.latency_budgets`` (the benchmark's ONNX Runtime latency searches, tagged ``lat<B>x``),
or ``--budgets 23x,lat10x``. A latency pick's export and scratch variants keep its architecture,
so the row carries the benchmark's own ORT batch-1 measurement of it (``latency.json``, each
model at its fastest thread count) and the paragon's; a supernet variant searches again under the
benchmark's recorded limit (its ``best.json``), and its new architecture is not timed here. Output:
``results/<data>/<profile>_ablation.{json,md}``, or ``<NAME>.{json,md}`` with ``--report NAME``
(every number and the command). Everything it
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

import torch

from hvs import checkpoint as ckpt
from hvs.pipeline import PipelineError
from hvs.profiles import ProfileStages, budget_tag, check_export, load_dataset, load_profile, profile_metrics
from hvs.results import ci_cell, diff_cell, load_q2g, metric_block, paired_difference, pct

ROOT = Path(__file__).resolve().parent.parent  # configs/ lives here


SCRATCH_EXPORT_KEYS = ("compat", "bct_weight", "batch_size")  # what a scratch variant takes from the export
# what an offshelf control copies from the benchmark's model (hvs.train.TrainConfig fields): all but the schedule
OFFSHELF_SAME = (
    "image_size",
    "loss",
    "scale",
    "margin",
    "optimizer",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "augment",
    "data_seed",
    "channels_last",
)


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


def budget_ratio(tag: str) -> float:
    """``"23x"`` -> 23.0, ``"lat10x"`` -> 10.0."""
    return float(tag.removeprefix("lat").removesuffix("x"))


def parse_budgets(text: str) -> list[str]:
    """``--budgets 23x,lat10x`` (the ``x`` optional): the budget tags, each checked."""
    tags = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        tag = part if part.endswith("x") else f"{part}x"
        try:
            ok = budget_ratio(tag) > 0
        except ValueError:
            ok = False
        if not ok:
            raise PipelineError(f"--budgets: {part!r} is not a FLOPs ratio (23x) or a latency ratio (lat10x)")
        tags.append(budget_tag(budget_ratio(tag), tag.startswith("lat")))
    if not tags:
        raise PipelineError("--budgets: no budget given")
    return tags


def profile_budgets(profile: dict) -> list[str]:
    """The ablation's budget tags from the profile: ``ablation.budgets`` (else the search's FLOPs
    budgets) and ``ablation.latency_budgets``."""
    ab = profile.get("ablation") or {}
    flops = ab.get("budgets", (profile.get("search") or {}).get("budgets", []))
    return [budget_tag(b) for b in flops] + [budget_tag(b, True) for b in ab.get("latency_budgets", [])]


def ort_ms(row: dict | None, folder: Path | None = None) -> float | None:
    """A benchmark latency.json row's ORT batch-1 figure (its fastest thread count), if any; with
    ``folder``, only when the row was measured for that model's weights (its fingerprint)."""
    if not row or row.get("ort_ms_batch1") is None:
        return None
    if folder is not None and row.get("fingerprint") != ckpt.read_card(folder).fingerprint:
        return None  # measured for another model of that name (e.g. searched again since)
    return float(row["ort_ms_batch1"])


VARIANT_KEYS = ("export", "supernet", "scratch", "offshelf")


def variant_profile(profile: dict, spec: dict) -> dict:
    unknown = set(spec) - set(VARIANT_KEYS)
    if unknown:
        raise PipelineError(f"ablation variant keys must be {', '.join(VARIANT_KEYS)}, got {sorted(unknown)}")
    if "offshelf" in spec:
        oc = spec["offshelf"]
        if len(spec) != 1 or not isinstance(oc, dict) or set(oc) - {"model", "epochs", "lr", "batch_size"}:
            raise PipelineError(
                "an ablation offshelf variant is {model: M, epochs: E, lr: LR[, batch_size: B]} alone: the "
                f"benchmark's off-the-shelf query net trained longer with BCT, got {spec}"
            )
        if not oc.get("model") or int(oc.get("epochs", 0)) < 1 or float(oc.get("lr", 0)) <= 0:
            raise PipelineError(f"an ablation offshelf variant needs a model, epochs >= 1 and lr > 0, got {oc}")
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
    budgets: list[str],
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
    lat_rows = json.loads((sd / "latency.json").read_text()) if (sd / "latency.json").is_file() else {}
    paragon_ms = ort_ms(lat_rows.get("paragon"), gallery)
    rows = []
    for name, spec in variants.items():
        vp = variant_profile(profile, spec)
        runner = ProfileStages(root, vp, data, full, train_data, set(), log, seed=seed)
        vd = sd / "ablation" / name
        vd.mkdir(parents=True, exist_ok=True)
        if spec.get("offshelf"):  # one model per seed, whatever the budgets
            row = run_offshelf(sd, runner, name, spec, lat_rows, paragon_ms, metrics, n_boot)
            if row is None:
                log(f"[skip] {name}: the benchmark has no bct-{spec['offshelf']['model']} for seed {seed}")
            else:
                rows.append(row)
            continue
        supernet = sd / "supernet"
        if spec.get("supernet"):
            supernet = vd / "supernet"
            runner.supernet(supernet, gallery)
        for tag in budgets:
            latency = tag.startswith("lat")
            base_json = sd / f"eval-nas-hetero-{tag}.json"
            if not base_json.is_file():
                log(f"[skip] {name} {tag}: the benchmark has no nas-hetero-{tag} for seed {seed}")
                continue
            base_best = json.loads((sd / f"search-hetero-{tag}" / "best.json").read_text())
            if spec.get("supernet") and latency:  # the benchmark's limit, as it searched
                limit_ms = float(base_best["budget"]["limit"])
                search_out = vd / f"search-hetero-{tag}"
                best = runner.search(search_out, supernet, gallery, None, "hetero", latency_ms=limit_ms)
            elif spec.get("supernet"):
                flops_limit = paragon_flops / budget_ratio(tag)
                best = runner.search(vd / f"search-hetero-{tag}", supernet, gallery, flops_limit, "hetero")
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
            row = {
                "seed": seed,
                "variant": name,
                "spec": spec,
                "budget": tag,
                "budget_ratio": budget_ratio(tag),
                "budget_kind": "latency" if latency else "flops",
                "arch": best["key"],
                "val_reward": None if spec.get("scratch") else best.get("reward"),  # the supernet's, not this model's
                "baseline": {"arch": base_best["key"], "flops": base["cost"]["query"]["flops"]},
                # the same architecture as the benchmark's pick (not a supernet variant): its ORT figure
                "ort_ms": None
                if spec.get("supernet")
                else ort_ms(lat_rows.get(f"nas-hetero-{tag}"), sd / f"nas-hetero-{tag}"),
            }
            rows.append(paired(row, result, base, eval_json, base_json, paragon_ms, metrics, n_boot))
    return rows


def run_offshelf(
    sd: Path,
    runner: ProfileStages,
    name: str,
    spec: dict,
    lat_rows: dict,
    paragon_ms: float | None,
    metrics: list[str],
    n_boot: int,
) -> dict | None:
    """An off-the-shelf variant: the benchmark's ``bct-<model>`` trained again, longer (the same
    data, BCT against the same paragon), paired against the benchmark's: the control for a pick's
    longer schedule. None when the benchmark has no such model."""
    oc, vd = spec["offshelf"], sd / "ablation" / name
    model = str(oc["model"])
    base_json, base_dir = sd / f"eval-bct-{model}.json", sd / f"bct-{model}"
    if not base_json.is_file() or not (base_dir / "train_config.json").is_file():
        return None
    have = json.loads((base_dir / "train_config.json").read_text())
    settings = {k: have[k] for k in OFFSHELF_SAME if k in have}  # the benchmark's recipe but its length
    settings.update(
        model=model,
        model_kwargs=have.get("model_kwargs") or {},
        compat=have.get("compat") or ["bct"],
        epochs=int(oc["epochs"]),
        lr=float(oc["lr"]),
        batch_size=int(oc.get("batch_size", have.get("batch_size", 256))),
        seed=int(have.get("seed", runner.seed)),
    )
    folder, eval_json = vd / f"bct-{model}", vd / f"eval-bct-{model}.json"
    check_scratch_folder(folder, settings)
    if not runner.train("ablation", folder, gallery=str(sd / "paragon"), **settings):
        raise PipelineError(f"{folder}: not made")
    result = runner.evaluate("ablation", sd / "paragon", folder, eval_json)
    base = json.loads(base_json.read_text())
    row = {
        "seed": runner.seed,
        "variant": name,
        "spec": spec,
        "budget": "-",
        "budget_ratio": None,
        "budget_kind": "offshelf",
        "arch": model,
        "val_reward": None,
        "baseline": {"arch": model, "flops": base["cost"]["query"]["flops"], "epochs": have.get("epochs")},
        "ort_ms": ort_ms(lat_rows.get(f"bct-{model}"), base_dir),  # the same network as the benchmark's
    }
    return paired(row, result, base, eval_json, base_json, paragon_ms, metrics, n_boot)


def paired(
    row: dict,
    result: dict,
    base: dict,
    eval_json: Path,
    base_json: Path,
    paragon_ms: float | None,
    metrics: list[str],
    n_boot: int,
) -> dict:
    """``row`` completed with what every row has: this model's cost and files, the paragon's ORT
    figure, and each metric's block of ``result`` with its paired difference from ``base`` (the
    benchmark's model), a bootstrap over queries."""
    row.update(
        flops=result["cost"]["query"]["flops"],
        flops_ratio=result["cost"]["ratio_gallery_over_query"]["flops"],
        eval_json=str(eval_json),
        baseline_eval_json=str(base_json),
        paragon_ort_ms=paragon_ms,
        metrics={},
    )
    a, b = (load_q2g(p.with_suffix(".npz")) for p in (eval_json, base_json))
    for metric in metrics:
        blk, bblk = metric_block(result, metric), metric_block(base, metric)
        d = paired_difference(a, b, metric, n_boot)
        blk["baseline_q->g"] = bblk["q->g"]
        blk["diff_vs_baseline"] = None if d is None else d[0]
        blk["diff_vs_baseline_ci95"] = None if d is None else d[1]
        row["metrics"][metric] = blk
    return row


def ms_cell(ms: float | None, paragon_ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" + (f" ({paragon_ms / ms:.1f}x)" if paragon_ms else "")


def markdown(rows: list[dict], metrics: list[str]) -> str:
    m0 = metrics[0]
    lines = [
        f"| seed | budget | variant | MFLOPs | ORT b1 ms (x paragon) | val R@1 (search) | {m0} q->g | vs "
        f"benchmark's model (paired) | {m0} q->q | gap to paragon | criterion q->g - q->q |"
        + "".join(f" {m} q->g | vs benchmark |" for m in metrics[1:]),
        "|" + "---|" * (11 + 2 * (len(metrics) - 1)),
    ]
    for r in rows:
        b = r["metrics"][m0]
        crit = b.get("criterion") or {}
        cells = [
            str(r["seed"]),
            r["budget"],
            r["variant"],
            f"{r['flops'] / 1e6:.2f}",
            ms_cell(r.get("ort_ms"), r.get("paragon_ort_ms")),
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
    p.add_argument("--budgets", help="comma list of budget tags, e.g. 23x,lat10x (default: the profile's ablation)")
    p.add_argument("--report", help="report name under results/<data>/ (default: <profile>_ablation)")
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
    budgets = parse_budgets(args.budgets) if args.budgets else profile_budgets(profile)
    if args.budgets and not args.report:  # not the profile's ablation: not over its report
        raise PipelineError(f"--budgets needs --report NAME, so as not to replace {name}_ablation's report")
    offshelf_models = set((profile.get("offshelf") or {}).get("models") or [])
    for vname, spec in variants.items():
        if spec.get("offshelf") and spec["offshelf"]["model"] not in offshelf_models:
            raise PipelineError(
                f"ablation variant {vname}: {spec['offshelf']['model']!r} is not among the benchmark's "
                f"off-the-shelf models {sorted(offshelf_models)}"
            )
    report = args.report or f"{name}_ablation"
    if "/" in report or "\\" in report or report.startswith("."):
        raise PipelineError(f"--report {report!r}: a file name without folders (e.g. {name}_ablation-latency)")
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
        f"Paired against the benchmark's CMP-NAS pick (supernet BCT, fine-tune BCT) at the same budget and seed "
        f"(budget '-', the offshelf controls: against the benchmark's own bct-<model>); "
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
    ckpt.atomic_write_json(data_dir / f"{report}.json", json.loads(json.dumps(summary, default=float)))
    (data_dir / f"{report}.md").write_text(md)
    log(f"wrote {data_dir / (report + '.json')} and .md; {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
