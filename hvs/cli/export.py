"""``hvs export``: model folders to deployable files (a thin wrapper around :mod:`hvs.export`).

    hvs export onnx --query-model runs/q-bct --out q.onnx [--opset 18] [--int8]
    hvs export onnx --query-model runs/q-bct --out q.onnx --int8 \\
        --check-data fashion-mnist --gallery-model runs/gallery     # + M(q->g) and latency table
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ._common import add_gallery_model_arg


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..checkpoint import atomic_write_json
    from ..export import DEFAULT_OPSET, check_export, export_onnx, format_report

    if args.check_data and not args.gallery_model:
        raise UsageError("--check-data needs --gallery-model (the model that embeds the gallery side)")
    if args.check_data:  # refuse a mismatched pair before the export, not after it
        from ..checkpoint import read_card
        from ..compat import GallerySide, QuerySide, check_pair

        check_pair(
            QuerySide.of_card(read_card(args.query_model)),
            GallerySide.of_card(read_card(args.gallery_model)),
            force=args.force,
            action="measure",
        )
    report = export_onnx(
        args.query_model,
        args.out,
        opset=args.opset or DEFAULT_OPSET,
        quantize_int8=args.int8,
        int8_path=args.int8_out,
        calibration_data=args.calib_data or args.check_data,
        calibration_images=args.calib_images,
        tol=args.tol,
    )
    check = None
    if args.check_data:
        check = check_export(
            report,
            args.gallery_model,
            args.check_data,
            protocol=args.protocol,
            latency=not args.no_latency,
            force=args.force,
        )
    print(format_report(report, check))
    if args.json:
        atomic_write_json(args.json, {"export": report, "check": check})
        print(f"wrote {args.json}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs export``."""
    from ..export import DEFAULT_OPSET, PARITY_TOL

    formats = p.add_subparsers(dest="format", required=True)
    o = formats.add_parser("onnx", help="ONNX with hvs metadata, checked against PyTorch (parity <= 1e-4)")
    o.add_argument("--query-model", required=True, help="model folder to export (usually a query model)")
    o.add_argument("--out", required=True, help="output .onnx file (written only if the parity check passes)")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    o.add_argument("--tol", type=float, default=PARITY_TOL, help="largest accepted |ONNX - PyTorch| (default 1e-4)")
    o.add_argument("--int8", action="store_true", help="also write a statically quantized int8 copy (OUT.int8.onnx)")
    o.add_argument("--int8-out", help="path of the int8 copy (default: next to --out, .int8.onnx)")
    o.add_argument(
        "--calib-data", help="data spec for int8 calibration (default: --check-data, else the model's training data)"
    )
    o.add_argument("--calib-images", type=int, default=64, help="training images used to calibrate int8")
    o.add_argument(
        "--check-data",
        metavar="SPEC",
        help="measure M(q->g) Recall@1/mAP of torch vs ONNX vs int8 on this dataset (needs --gallery-model)",
    )
    add_gallery_model_arg(o, help="gallery model folder that embeds the gallery side for --check-data")
    o.add_argument("--protocol", choices=["closed", "open"], default="closed")
    o.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    o.add_argument("--force", action="store_true", help="measure a query model made for another gallery model")
    o.add_argument("--json", help="write the report to this file")
    o.set_defaults(fn=cmd_export_onnx)


__all__ = ["cmd_export_onnx", "configure"]
