"""``hvs nas``: CMP-NAS from the command line (each subcommand wraps one :mod:`hvs.nas` function).

hvs nas train-supernet --gallery-model G --data SPEC --out S [--epochs N --progressive kernel,depth,expand]
hvs nas search --supernet S --gallery-model G (--flops 5M | --latency-ms 2) --out R [--reward hetero|homo|penalized]
hvs nas export --supernet S --arch R/best.json --gallery-model G --out Q [--finetune-epochs N] [--init scratch]
hvs nas inherit --supernet S --out-gallery G2 --out-query Q2 (--arch A | --flops 5M)
hvs nas info --supernet S [--arch A]       search space, FLOPs range, training state
hvs nas plot --search R [--out FILE]       reward vs iteration and vs MFLOPs
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UsageError
from ._common import add_gallery_model_arg, add_optimization_args, parse_kv

# Flags copied into the config dict, by config key; ``gallery`` is read from --gallery-model.
_TRAIN_FLAGS = (
    "out",
    "data",
    "protocol",
    "image_size",
    "gallery",
    "embed_dim",
    "space",
    "bct_weight",
    "regress_weight",
    "compat",
    "distill",
    "distill_kind",
    "subnets_per_step",
    "loss",
    "scale",
    "margin",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "augment",
    "train_subset",
    "val_fraction",
    "val_max_per_class",
    "val_split",
    "seed",
    "threads",
)
_SEARCH_FLAGS = (
    "supernet",
    "out",
    "gallery",
    "data",
    "flops",
    "latency_ms",
    "latency_mode",
    "latency_runtime",
    "latency_batch",
    "latency_threads",
    "reward",
    "metric",
    "penalty",
    "population",
    "iterations",
    "parents",
    "mutation_prob",
    "mutate_ratio",
    "max_tries",
    "bn_images",
    "seed",
    "threads",
)
_DEST = {"gallery": "gallery_model"}  # config key -> argparse dest, where the flag name differs


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _merge(config: str | None, args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Any]:
    from ..nas.common import load_mapping

    merged = load_mapping(config)
    values = {k: getattr(args, _DEST.get(k, k)) for k in flags}
    merged.update({k: v for k, v in values.items() if v is not None})
    return merged


def cmd_train_supernet(args: argparse.Namespace) -> int:
    from ..nas.train import SupernetTrainConfig, train_supernet

    merged = _merge(args.config, args, _TRAIN_FLAGS)
    if args.supernet_arg:
        merged["supernet"] = {**merged.get("supernet", {}), **parse_kv(args.supernet_arg)}
    for key in ("progressive", "phase_epochs"):
        value = _csv(getattr(args, key))
        if value is not None:
            merged[key] = value if key == "progressive" else [int(v) for v in value]
    for key in ("sandwich", "force"):
        if getattr(args, key):
            merged[key] = True
    if "out" not in merged:
        raise UsageError("no output folder: pass --out DIR")
    train_supernet(SupernetTrainConfig.from_dict(merged), resume=args.resume, progress=not args.no_progress)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..nas.search import SearchConfig, run_search

    merged = _merge(args.config, args, _SEARCH_FLAGS)
    for key in ("force", "plot"):
        if getattr(args, key):
            merged[key] = True
    for key in ("supernet", "out"):
        if key not in merged:
            raise UsageError(f"missing --{key}")
    try:
        run_search(SearchConfig.from_dict(merged), progress=not args.no_progress)
    except ImportError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..nas.export import export_subnet

    export_subnet(
        args.supernet,
        args.arch,
        args.out,
        gallery=args.gallery_model,
        data=args.data,
        finetune_epochs=args.finetune_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        bct_weight=args.bct_weight,
        compat=_csv(args.compat),
        bn_images=args.bn_images,
        init=args.init,
        hold_out_val=args.hold_out_val,
        seed=args.seed,
        force=args.force,
        progress=not args.no_progress,
    )
    return 0


def cmd_inherit(args: argparse.Namespace) -> int:
    from ..nas.common import parse_flops
    from ..nas.export import inherit

    inherit(
        args.supernet,
        args.out_gallery,
        args.out_query,
        arch=args.arch,
        flops=None if args.flops is None else parse_flops(args.flops),
        data=args.data,
        samples=args.samples,
        bn_images=args.bn_images,
        seed=args.seed,
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..models.ofa import load_arch
    from ..nas.common import load_supernet

    model, _, card = load_supernet(args.supernet)
    space = model.space
    print(
        f"{card.kind} supernet {args.supernet}: {card.epochs_done}/{card.epochs} epochs on {card.data}, "
        f"{card.in_chans}x{card.image_size}px, {card.embed_dim}-d, {len(card.classes)} classes, "
        f"fingerprint {card.fingerprint}"
    )
    if card.gallery:
        print(
            f"trained for gallery {card.gallery['model']} {card.gallery['fingerprint']} ({card.gallery['path']}), "
            f"BCT weight {card.bct_weight}, regression weight {card.regress_weight}"
        )
    print(f"space {card.space}: {space.describe()}")
    for name, arch in (("smallest", space.min_arch()), ("largest", space.max_arch())):
        print(f"{name}: {model.flops(arch, card.image_size) / 1e6:.3f} MFLOPs  [{space.key(arch)}]")
    if args.arch:
        arch = space.validate(load_arch(args.arch))
        print(f"arch: {model.flops(arch, card.image_size) / 1e6:.3f} MFLOPs  [{space.key(arch)}]")
        print(json.dumps(space.canonical(arch)))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..nas.plot import plot_history

    out = args.out or str(Path(args.search) / "search.png")
    try:
        print(f"wrote {plot_history(args.search, out)}")
    except ImportError as e:
        raise UsageError(str(e)) from None
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs nas``."""
    nas = p.add_subparsers(dest="nas_command", required=True)

    t = nas.add_parser("train-supernet", help="train an OFA supernet, compatible with --gallery-model (BCT) if given")
    t.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    t.add_argument("--out", help="supernet folder")
    t.add_argument("--data", help="data source, e.g. fashion-mnist, synthetic:..., imagefolder:DIR")
    t.add_argument("--protocol", choices=["closed", "open"])
    t.add_argument("--image-size", type=int)
    add_gallery_model_arg(t, help="frozen gallery model folder: adds the BCT influence loss")
    t.add_argument("--embed-dim", type=int, help="default: the gallery model's, else 128")
    t.add_argument("--space", help="search space: ofa-mbv3 (default) or fast-cnn (dense, fused and depthwise blocks)")
    t.add_argument(
        "--supernet-arg",
        action="append",
        metavar="KEY=VALUE",
        help="supernet shape/choices, e.g. stage_widths=[16,24,40] ks_list=[3,5,7] depth_list=[2,3,4]",
    )
    t.add_argument("--bct-weight", type=float, help="lambda of the BCT influence loss (default 1)")
    t.add_argument(
        "--regress-weight",
        type=float,
        help="weight of feature regression onto the gallery model's embeddings (default 0)",
    )
    t.add_argument(
        "--compat",
        action="append",
        metavar="LOSS[=WEIGHT]",
        help="a further compatibility loss, e.g. relational=1 or simdist=0.5 (repeat to compose)",
    )
    t.add_argument("--distill", type=float, help="weight of in-place distillation from the largest (default 0)")
    t.add_argument("--distill-kind", choices=["cosine", "l2"])
    t.add_argument("--subnets-per-step", type=int, help="random sub-networks per step besides the largest (2)")
    t.add_argument("--sandwich", action="store_true", help="also train the smallest sub-network every step")
    t.add_argument("--progressive", help="progressive shrinking phases, e.g. full,kernel,depth,expand")
    t.add_argument("--phase-epochs", help="epochs per phase, e.g. 2,2,3,3 (default: even split)")
    add_optimization_args(t)
    t.add_argument(
        "--val-fraction", type=float, help="share of each training class (or of the identities) held out (0.1)"
    )
    t.add_argument("--val-max-per-class", type=int, help="cap on held-out images per class (50)")
    t.add_argument(
        "--val-split",
        choices=["auto", "images", "identities"],
        help="validation of the search's reward: images of every training class, or whole held-out "
        "identities (auto: identities for open-set data)",
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--force", action="store_true", help="accept a gallery model whose input size differs")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train_supernet)

    s = nas.add_parser("search", help="regularized evolution for the best query sub-network under a budget")
    s.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    s.add_argument("--supernet", help="supernet folder")
    s.add_argument("--out", help="search folder (best.json, history.json/.csv)")
    add_gallery_model_arg(s, help="gallery model folder (needed by the hetero and penalized rewards)")
    s.add_argument("--data", help="default: the supernet's training data (same validation split)")
    s.add_argument("--flops", help="FLOPs budget, e.g. 5M, 0.5G, 5e6")
    s.add_argument("--latency-ms", type=float, help="batch-1 latency budget on this CPU (ms; see --latency-runtime)")
    s.add_argument(
        "--latency-mode",
        choices=["table", "measure"],
        help="per-layer lookup table (default) or time each extracted sub-network",
    )
    s.add_argument("--latency-batch", type=int, help="batch size of the latency budget (1)")
    s.add_argument(
        "--latency-runtime",
        choices=["ort", "ort-int8", "torch"],
        help="where the latency budget is measured: ONNX Runtime fp32 (default), int8, or eager PyTorch",
    )
    s.add_argument(
        "--latency-threads",
        type=int,
        help="threads the latency budget is measured on, the device's (ORT intra-op threads; default: --threads)",
    )
    s.add_argument("--reward", help="hetero (M(q->g), default), homo (M(q->q)), penalized")
    s.add_argument("--metric", choices=["recall@1", "recall@5", "map"])
    s.add_argument("--penalty", type=float, help="weight of the penalized reward's criterion penalty (1)")
    s.add_argument("--population", type=int, help="(100)")
    s.add_argument("--iterations", type=int, help="children scored after the initial population (500)")
    s.add_argument("--parents", type=float, help="tournament size as a share of the population (0.25)")
    s.add_argument("--mutation-prob", type=float, help="per-gene mutation probability (0.1)")
    s.add_argument("--mutate-ratio", type=float, help="share of children made by mutation, the rest crossover (0.5)")
    s.add_argument("--max-tries", type=int, help="bound on draws to meet the budget (1000)")
    s.add_argument("--bn-images", type=int, help="training images for BatchNorm re-calibration (2000)")
    s.add_argument("--seed", type=int)
    s.add_argument("--threads", type=int)
    s.add_argument("--force", action="store_true", help="search against a gallery other than the supernet's")
    s.add_argument("--plot", action="store_true", help="write search.png (needs matplotlib)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_search)

    e = nas.add_parser("export", help="a searched sub-network as a query model folder (optional BCT fine-tune)")
    e.add_argument("--supernet", required=True)
    e.add_argument("--arch", required=True, help="inline JSON, an arch JSON file, or a search's best.json")
    add_gallery_model_arg(e, required=True, help="the gallery model the query model is for")
    e.add_argument("--out", required=True)
    e.add_argument("--data", help="default: the supernet's training data")
    e.add_argument("--finetune-epochs", type=int, default=0)
    e.add_argument("--lr", type=float, default=0.01)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--bct-weight", type=float, help="default: the supernet's (1 for a plain supernet)")
    e.add_argument("--compat", help="fine-tuning compatibility losses instead of BCT alone, e.g. bct,l2=1")
    e.add_argument("--bn-images", type=int, default=2000)
    e.add_argument(
        "--init",
        choices=("supernet", "scratch"),
        default="supernet",
        help="start from the supernet's weights (default) or train the architecture from random ones "
        "(needs --finetune-epochs)",
    )
    e.add_argument(
        "--hold-out-val",
        action="store_true",
        help="fine-tune on the supernet's training images only, its validation split left unseen",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--force", action="store_true", help="export for a gallery the supernet was not trained for")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=cmd_export)

    i = nas.add_parser("inherit", help="weight inheritance: largest sub-network = gallery, a smaller one = query")
    i.add_argument("--supernet", required=True)
    i.add_argument("--out-gallery", required=True)
    i.add_argument("--out-query", required=True)
    i.add_argument("--arch", help="the query sub-network (inline JSON, arch file, best.json)")
    i.add_argument("--flops", help="or a budget: the largest of --samples random sub-networks under it")
    i.add_argument("--samples", type=int, default=200)
    i.add_argument("--data", help="default: the supernet's training data (for BatchNorm re-calibration)")
    i.add_argument("--bn-images", type=int, default=2000)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(fn=cmd_inherit)

    n = nas.add_parser("info", help="a supernet's search space, FLOPs range and training state")
    n.add_argument("--supernet", required=True)
    n.add_argument("--arch", help="also print this arch's FLOPs")
    n.set_defaults(fn=cmd_info)

    pl = nas.add_parser("plot", help="plot a search history (needs matplotlib)")
    pl.add_argument("--search", required=True, help="search folder or history.json")
    pl.add_argument("--out", help="PNG path (default SEARCH/search.png)")
    pl.set_defaults(fn=cmd_plot)
