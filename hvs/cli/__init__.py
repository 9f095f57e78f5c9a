"""The ``hvs`` command line: thin wrappers around the library (each subcommand calls one function).

    hvs models [--data fashion-mnist]          registered models with FLOPs and parameters
    hvs train ...                              train a gallery model, or a query model with --gallery-model
    hvs evaluate --gallery-model G --query-model Q --data SPEC [--json FILE]
    hvs demo                                   the end-to-end job on fashion-mnist
    hvs index build|add|remove|info, hvs search  the gallery index (hvs/cli/index.py)
    hvs export onnx, hvs serve                 on-device export and the search service
    hvs nas train-supernet|search|export|inherit|info|plot   CMP-NAS (hvs/cli/nas.py)
    hvs data build|info|fonts                  dataset builds and summaries (hvs/cli/data.py)
    hvs adopt onnx|weights                     an existing encoder as a gallery model (hvs/cli/adopt.py)

Multi-process training: ``torchrun --standalone --nproc_per_node N -m hvs train ...`` (see hvs.train).

The commands of other modules are registered by name in :data:`COMMANDS` (``"module:function"``,
as the index backends are) and only the module of the command being run is imported, so
``hvs --help`` stays fast. Those modules share :mod:`hvs.cli._common` and never import this one.
Errors: an :class:`hvs.errors.HVSError` (or an unusable path, ``OSError``) is printed as one line
with exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from ..errors import UsageError
from ._common import ERRORS, add_data_args, add_gallery_model_arg, add_optimization_args, data_kwargs, parse_kv


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from ..models import STANDARD_STEM_MIN_SIZE, create_model, list_models, model_entry, resolve_model_kwargs
    from ..models.cost import count_flops, count_params

    shape = (args.channels, args.image_size, args.image_size)
    print(
        f"{'model':<20}{'role':<9}{'stem':<10}{'MFLOPs':>10}{'params (M)':>12}  description   "
        f"[input {shape}; FLOPs = 2 x multiply-adds; standard stems from {STANDARD_STEM_MIN_SIZE} px]"
    )
    for name in list_models(args.role):
        kwargs = resolve_model_kwargs(name, args.image_size)
        with torch.device("meta"):  # shapes only: FLOPs and parameters without weights or arithmetic
            model = create_model(name, in_chans=args.channels, embed_dim=args.embed_dim, **kwargs)
        entry = model_entry(name)
        print(
            f"{name:<20}{entry.role:<9}{kwargs.get('stem', '-'):<10}{count_flops(model, shape) / 1e6:>10.2f}"
            f"{count_params(model) / 1e6:>12.3f}  {entry.description}"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    overrides = {
        k: getattr(args, k)
        for k in (
            "out",
            "data",
            "protocol",
            "image_size",
            "model",
            "embed_dim",
            "compat",
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
            "seed",
            "threads",
            "force",
            "strict",
            "device",
            "role",
            "init_from",
            "check",
            "pretrained",
            "data_mode",
            "workers",
            "cache_dir",
        )
    }
    overrides["gallery"] = args.gallery_model  # the config's name of the gallery model folder
    if args.sync_bn:
        overrides["sync_bn"] = True
    if args.model_arg:
        overrides["model_kwargs"] = parse_kv(args.model_arg)
    if not args.force:
        overrides["force"] = None
    if not args.strict:
        overrides["strict"] = None
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..evaluate import evaluate, format_report, save_json

    if args.json and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        raise UsageError(f"--json {args.json}: not a writable file path (a directory, or its folder is missing)")
    result = evaluate(
        args.gallery_model,
        args.query_model,
        args.data,
        protocol=args.protocol,
        force=args.force,
        latency=not args.no_latency,
        n_boot=args.bootstrap,
        strict=args.strict,
        **data_kwargs(args),
    )
    print(format_report(result))
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        out=args.out,
        gallery_epochs=args.gallery_epochs,
        query_epochs=args.query_epochs,
        gallery_model=args.gallery_model,
        query_model=args.query_model,
        data=args.data,
        train_subset=args.train_subset,
        progress=not args.no_progress,
    )
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``hvs`` parser, with the arguments of the command named in ``argv`` (every command is
    listed, but only that one's module is imported; ``argv=None`` reads ``sys.argv``)."""
    p = argparse.ArgumentParser(prog="hvs", description="compatibility-aware heterogeneous visual search")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list registered models with FLOPs and parameter counts")
    m.add_argument("--role", choices=["gallery", "query"])
    m.add_argument("--channels", type=int, default=1)
    m.add_argument("--image-size", type=int, default=28)
    m.add_argument("--embed-dim", type=int, default=128)
    m.set_defaults(fn=cmd_models)

    t = sub.add_parser("train", help="train a gallery model, or a query model compatible with --gallery-model")
    t.add_argument("--config", help="YAML or JSON file of training options (flags override it)")
    t.add_argument("--out", help="run folder (becomes the model folder)")
    t.add_argument("--data", help="data source, e.g. fashion-mnist, imagefolder:DIR, csv:FILE, deepfashion2:DIR")
    t.add_argument("--protocol", choices=["closed", "open"])
    t.add_argument(
        "--image-size",
        type=int,
        help="the model's input size in px (a query model may read smaller images than its gallery model)",
    )
    t.add_argument("--model", help="registered model name (hvs models), or timm:NAME / torchvision:NAME")
    t.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model argument, e.g. width=2")
    t.add_argument("--embed-dim", type=int)
    add_gallery_model_arg(t, help="frozen gallery model folder: trains a query model for it")
    t.add_argument("--role", choices=["gallery", "query"], help="recorded role (default: query with --gallery-model)")
    t.add_argument("--init-from", help="model folder to start from (fine-tuning); its classifier too if classes match")
    t.add_argument(
        "--pretrained",
        metavar="FILE",
        help="local weights file (safetensors or torch state dict, timm or torchvision layout) loaded into "
        "the backbone before training; its classifier is ignored",
    )
    t.add_argument(
        "--compat",
        action="append",
        metavar="LOSS[=WEIGHT]",
        help="compatibility loss: none, bct, l2, contrastive, relational, simdist (repeat to compose)",
    )
    add_optimization_args(t)
    add_data_args(t)
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees it, else CPU")
    t.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch, not each process's share",
    )
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--force", action="store_true", help="accept a gallery model whose input differs")
    t.add_argument("--strict", action="store_true", help="unreadable images are an error, not skipped")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        default=None,
        help="skip the after-training check that heterogeneous search pays (with --gallery-model)",
    )
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="homogeneous and heterogeneous retrieval of a gallery/query model pair")
    add_gallery_model_arg(e, required=True)
    e.add_argument("--query-model", required=True)
    e.add_argument("--data", default="fashion-mnist")
    e.add_argument("--protocol", choices=["closed", "open"], default="closed")
    e.add_argument("--json", help="write every number to this file")
    e.add_argument("--force", action="store_true", help="evaluate a query model trained for another gallery model")
    e.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    add_data_args(e)
    e.add_argument(
        "--strict",
        action="store_true",
        help="refuse leaked items (same image in query and gallery, repeated rows) and unreadable images",
    )
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

    wanted = _command_in(argv)
    for name, (target, help_text) in COMMANDS.items():
        cp = sub.add_parser(name, help=help_text)
        if name == wanted:  # only the command being run imports its module
            module, _, fn = target.partition(":")
            getattr(importlib.import_module(module), fn)(cp)
    return p


# Commands defined in other modules: name -> ("module:function", help). The function adds the
# command's arguments (and sub-commands) to the parser it is given and sets ``fn``.
COMMANDS: dict[str, tuple[str, str]] = {
    "index": ("hvs.cli.index:configure_index", "build and maintain a persistent gallery index"),
    "search": ("hvs.cli.index:configure_search", "search an index with query images embedded by the query model"),
    "export": ("hvs.cli.export:configure", "export a model folder for deployment (ONNX, optional int8)"),
    "serve": ("hvs.cli.serve:configure", "serve searches over HTTP (FastAPI + uvicorn), with a search page"),
    "nas": ("hvs.cli.nas:configure", "CMP-NAS: compatibility-aware supernet training, search, export, inheritance"),
    "data": ("hvs.cli.data:configure", "inspect data sources; build the kanji-fonts cache"),
    "adopt": ("hvs.cli.adopt:configure", "adopt an encoder hvs did not train (ONNX, weights) as a gallery model"),
}


def _command_in(argv: list[str] | None) -> str | None:
    """The command word of ``argv`` (its first non-option word; the top parser has only -h)."""
    for word in sys.argv[1:] if argv is None else argv:
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
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


__all__ = ["COMMANDS", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
