"""What the ``hvs`` subcommand modules share: the errors printed as one line, ``KEY=VALUE``
parsing, the optimisation flags of every trainer and the one gallery-model flag.

The subcommand modules import this module, never :mod:`hvs.cli` itself (which imports them), so
the CLI's import graph has no cycle.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import HVSError, UsageError

# Expected failures, printed by ``hvs.cli.main`` as one line: hvs's own explained errors, and
# unusable paths (missing, a directory, no permission). Anything else is a bug and keeps its traceback.
ERRORS: tuple[type[BaseException], ...] = (HVSError, OSError)


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """``["width=2", "name=x"]`` -> ``{"width": 2, "name": "x"}`` (values read as JSON when they parse)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_gallery_model_arg(
    p: argparse.ArgumentParser, *, required: bool = False, help: str = "gallery model folder"
) -> None:
    """``--gallery-model DIR`` (dest ``gallery_model``), the one name of the gallery model folder
    in every command. ``--gallery`` is kept as a hidden, deprecated alias for older scripts; giving
    both is an error."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--gallery-model", dest="gallery_model", metavar="DIR", help=help)
    g.add_argument("--gallery", dest="gallery_model", help=argparse.SUPPRESS)


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
    p.add_argument(
        "--augment",
        help="augmentation spec: comma list of crop, flip, rrc, jitter, trivial, randaugment, erase "
        "(NAME or NAME=VALUE), or none; default crop,flip",
    )
    p.add_argument("--train-subset", type=int)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """How a file source holds its images (see :mod:`hvs.data.store`): ``--data-mode``,
    ``--workers``, ``--cache-dir`` (dests ``data_mode``, ``workers``, ``cache_dir``; None when
    not given, so a config file or the library default decides)."""
    p.add_argument(
        "--data-mode",
        choices=["auto", "memory", "stream", "cache"],
        help="file sources: decode into memory, stream from disk in DataLoader workers, or a "
        "memory-mapped cache at this resolution; auto (default): memory up to 2 GiB of decoded images",
    )
    p.add_argument("--workers", type=int, metavar="N", help="DataLoader workers decoding streamed images")
    p.add_argument("--cache-dir", metavar="DIR", help="where --data-mode cache keeps its files")


def data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``create_dataset`` keywords of :func:`add_data_args`' flags that were given."""
    names = ("data_mode", "workers", "cache_dir")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


__all__ = ["ERRORS", "add_data_args", "add_gallery_model_arg", "add_optimization_args", "data_kwargs", "parse_kv"]
