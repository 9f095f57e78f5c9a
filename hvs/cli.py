"""The ``hvs`` command line: thin wrappers around the library (each subcommand calls one function).

    hvs models [--data fashion-mnist]          registered models with FLOPs and parameters
    hvs train ...                              train a gallery model, or a query model with --gallery
    hvs evaluate --gallery-model G --query-model Q --data SPEC [--json FILE]
    hvs demo                                   the end-to-end job on fashion-mnist
    hvs index build|add|remove|info, hvs search  the gallery index (hvs/cli_index.py)
    hvs export onnx, hvs serve                 on-device export and the search service
    hvs nas train-supernet|search|export|inherit|info|plot   CMP-NAS (hvs/cli_nas.py)
    hvs data build|info|fonts                  dataset builds and summaries (hvs/cli_data.py)

Multi-process training: ``torchrun --standalone --nproc_per_node N -m hvs train ...`` (see hvs.train).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

# Bad input and unusable paths (missing, a directory, no permission) are one-line errors, not tracebacks.
ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _kv(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_models(args: argparse.Namespace) -> int:
    from .models import create_model, list_models, model_entry
    from .models.cost import count_flops, count_params

    shape = (args.channels, args.image_size, args.image_size)
    print(f"{'model':<20}{'role':<9}{'MFLOPs':>10}{'params (M)':>12}  description   [input {shape}]")
    for name in list_models(args.role):
        model = create_model(name, in_chans=args.channels, embed_dim=args.embed_dim)
        entry = model_entry(name)
        print(f"{name:<20}{entry.role:<9}{count_flops(model, shape) / 1e6:>10.2f}"
              f"{count_params(model) / 1e6:>12.3f}  {entry.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    overrides = {k: getattr(args, k) for k in (
        "out", "data", "protocol", "image_size", "model", "embed_dim", "gallery", "compat", "loss", "scale",
        "margin", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "augment", "train_subset", "seed",
        "threads", "force", "strict", "device", "role", "init_from")}
    if args.sync_bn:
        overrides["sync_bn"] = True
    if args.model_arg:
        overrides["model_kwargs"] = _kv(args.model_arg)
    if not args.force:
        overrides["force"] = None
    if not args.strict:
        overrides["strict"] = None
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import evaluate, format_report, save_json

    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        raise ValueError(f"--json {args.json}: not a writable file path (a directory, or its folder is missing)")
    result = evaluate(args.gallery_model, args.query_model, args.data, protocol=args.protocol, force=args.force,
                      latency=not args.no_latency, n_boot=args.bootstrap, strict=args.strict)
    print(format_report(result))
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, gallery_epochs=args.gallery_epochs, query_epochs=args.query_epochs,
             gallery_model=args.gallery_model, query_model=args.query_model, data=args.data,
             train_subset=args.train_subset, progress=not args.no_progress)
    return 0


def add_optimization_args(p: argparse.ArgumentParser) -> None:
    """Loss and optimisation flags shared by every trainer (models and supernets)."""
    p.add_argument("--loss", choices=["normface", "cosface", "arcface"])
    p.add_argument("--scale", type=float)
    p.add_argument("--margin", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--augment", help="comma list of crop, flip, or none")
    p.add_argument("--train-subset", type=int)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvs", description="compatibility-aware heterogeneous visual search")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list registered models with FLOPs and parameter counts")
    m.add_argument("--role", choices=["gallery", "query"])
    m.add_argument("--channels", type=int, default=1)
    m.add_argument("--image-size", type=int, default=28)
    m.add_argument("--embed-dim", type=int, default=128)
    m.set_defaults(fn=cmd_models)

    t = sub.add_parser("train", help="train a gallery model, or a query model compatible with --gallery")
    t.add_argument("--config", help="YAML or JSON file of training options (flags override it)")
    t.add_argument("--out", help="run folder (becomes the model folder)")
    t.add_argument("--data", help="data source, e.g. fashion-mnist, imagefolder:DIR, csv:FILE, deepfashion2:DIR")
    t.add_argument("--protocol", choices=["closed", "open"])
    t.add_argument("--image-size", type=int)
    t.add_argument("--model", help="registered model name (hvs models)")
    t.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model argument, e.g. width=2")
    t.add_argument("--embed-dim", type=int)
    t.add_argument("--gallery", help="frozen gallery model folder: trains a query model for it")
    t.add_argument("--role", choices=["gallery", "query"], help="recorded role (default: query with --gallery)")
    t.add_argument("--init-from", help="model folder to start from (fine-tuning); its classifier too if classes match")
    t.add_argument("--compat", action="append", metavar="LOSS[=WEIGHT]",
                   help="compatibility loss: none, bct, l2, contrastive (repeat to compose)")
    add_optimization_args(t)
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees it, else CPU")
    t.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch, not each process's share")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--force", action="store_true", help="accept a gallery model whose input differs")
    t.add_argument("--strict", action="store_true", help="unreadable images are an error, not skipped")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="homogeneous and heterogeneous retrieval of a gallery/query model pair")
    e.add_argument("--gallery-model", required=True)
    e.add_argument("--query-model", required=True)
    e.add_argument("--data", default="fashion-mnist")
    e.add_argument("--protocol", choices=["closed", "open"], default="closed")
    e.add_argument("--json", help="write every number to this file")
    e.add_argument("--force", action="store_true", help="evaluate a query model trained for another gallery model")
    e.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    e.add_argument("--strict", action="store_true",
                   help="refuse leaked items (same image in query and gallery, repeated rows) and unreadable images")
    e.set_defaults(fn=cmd_evaluate)

    d = sub.add_parser("demo", help="train a paragon and query models on fashion-mnist and print the table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default="fashion-mnist")
    d.add_argument("--gallery-model", default="resnet8")
    d.add_argument("--query-model", default="cnn-tiny")
    d.add_argument("--gallery-epochs", type=int, default=6)
    d.add_argument("--query-epochs", type=int, default=6)
    d.add_argument("--train-subset", type=int)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    # Feature commands live in their own modules (hvs/cli_<feature>.py, each with add_parser(sub)).
    import importlib

    for feature in _FEATURES:
        try:
            module = importlib.import_module(f"hvs.cli_{feature}")
        except ModuleNotFoundError as e:
            if e.name != f"hvs.cli_{feature}":
                raise
            continue
        module.add_parser(sub)
    return p


_FEATURES = ("index", "export", "serve", "nas", "data")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"hvs {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hvs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
