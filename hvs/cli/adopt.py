"""``hvs adopt``: a frozen encoder hvs did not train becomes a gallery model folder (:mod:`hvs.adopt`).

hvs adopt onnx --onnx prod.onnx --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --out runs/g-prod
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ._common import parse_kv


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _print(card, out: str) -> None:
    a = card.adopted
    print(
        f"adopted {a['kind']} encoder {a['source']} as gallery model {card.model} -> {out}: "
        f"{card.in_chans}x{card.image_size}px, {card.embed_dim}-d, fingerprint {card.fingerprint}, no classifier"
    )


def cmd_adopt_onnx(args: argparse.Namespace) -> int:
    from ..adopt import adopt_onnx

    card = adopt_onnx(
        args.onnx,
        args.out,
        mean=_floats(args.mean, "--mean"),
        std=_floats(args.std, "--std"),
        channels=args.channels,
        image_size=args.image_size,
        name=args.name,
        data=args.data,
    )
    _print(card, args.out)
    return 0


def cmd_adopt_weights(args: argparse.Namespace) -> int:
    from ..adopt import adopt_weights

    if args.image_size is None:
        raise UsageError("--image-size is required: a weights file does not record its input size")
    card = adopt_weights(
        args.arch,
        args.weights,
        args.out,
        image_size=args.image_size,
        mean=_floats(args.mean, "--mean"),
        std=_floats(args.std, "--std"),
        channels=args.channels or 3,
        model_kwargs=parse_kv(args.model_arg),
        data=args.data,
    )
    _print(card, args.out)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the new gallery model folder (must not exist, or be empty)")
    p.add_argument("--mean", help="preprocessing mean on the [0, 1] scale: one value, or one per channel (a,b,c)")
    p.add_argument("--std", help="preprocessing std: one value, or one per channel")
    p.add_argument("--channels", type=int, help="input channels (default: the ONNX input's; weights: 3)")
    p.add_argument("--image-size", type=int, help="input size in px (default: the ONNX input's; weights: required)")
    p.add_argument("--name", help="the model name its card records (default: onnx:FILE-STEM)")
    p.add_argument("--data", metavar="SPEC", help="check that this data's images have the model's channels")


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs adopt``."""
    kinds = p.add_subparsers(dest="kind", required=True)
    o = kinds.add_parser("onnx", help="an ONNX image encoder (float32 N,C,S,S -> N,D), kept in the folder")
    o.add_argument("--onnx", required=True, help="the .onnx file of the encoder")
    _common(o)
    o.set_defaults(fn=cmd_adopt_onnx)
    w = kinds.add_parser("weights", help="a timm/torchvision architecture and a local weights file (pooled features)")
    w.add_argument("--arch", required=True, help="timm:NAME, torchvision:NAME or a registered model name")
    w.add_argument("--weights", required=True, help="safetensors or torch state dict (timm / torchvision keys)")
    w.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra architecture argument")
    _common(w)
    w.set_defaults(fn=cmd_adopt_weights)


__all__ = ["cmd_adopt_onnx", "cmd_adopt_weights", "configure"]
