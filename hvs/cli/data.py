"""``hvs data build|info|fonts``: thin wrappers over hvs.data (and its kanji-fonts cache).

hvs data build kanji-fonts [--size 32] [--out DIR] [--limit N] [--max-faces N] [--force]
hvs data info SPEC [--protocol open] [--image-size N] [--seed N] [--json]
hvs data fonts                        installed CJK faces: print / handwriting / excluded
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def split_stats(data) -> dict:
    """Per split: items, identities, views per identity (min/median/max); for the query split
    also how many probes are mated (their identity is in the gallery) and how many are not, and
    for sources that name a style in each item (``kanji-fonts:<face>:U+XXXX``) the styles."""
    gallery_ids = set(data.gallery.labels.tolist())
    out = {}
    for role in ("train", "query", "gallery"):
        split = data.split(role)
        labels = split.labels.numpy()
        _, counts = np.unique(labels, return_counts=True)
        row = {
            "items": int(len(labels)),
            "identities": int(len(counts)),
            "views_per_identity": {
                "min": int(counts.min()),
                "median": float(np.median(counts)),
                "max": int(counts.max()),
            }
            if len(counts)
            else None,
        }
        if role == "query":
            mated = np.isin(labels, list(gallery_ids))
            row["mated_probes"] = int(mated.sum())
            row["nonmated_probes"] = int((~mated).sum())
            row["nonmated_identities"] = int(len(np.unique(labels[~mated])))
        if split.sources and all(s.startswith("kanji-fonts:") for s in split.sources[:1]):
            faces: dict[str, int] = {}
            for src in split.sources:
                face = src.split(":")[1]
                faces[face] = faces.get(face, 0) + 1
            row["styles"] = dict(sorted(faces.items()))
        out[role] = row
    return out


def format_info(data) -> str:
    lines = [data.summary()]
    for role, row in split_stats(data).items():
        v = row["views_per_identity"]
        line = f"  {role:<8}{row['items']:>8,} items, {row['identities']:>5,} identities" + (
            ""
            if not v
            else f", {v['min']} views each"
            if v["min"] == v["max"]
            else f", {v['min']}-{v['max']} views each (median {v['median']:g})"
        )
        if role == "query":
            line += (
                f"; {row['mated_probes']:,} mated / {row['nonmated_probes']:,} non-mated probes "
                f"({row['nonmated_identities']:,} identities without gallery views)"
            )
        lines.append(line)
        if "styles" in row:
            lines[-1] += f"; {len(row['styles'])} font faces"
    if data.skipped:
        lines.append(f"  skipped {len(data.skipped)}: {data.skipped[0]}" + (" ..." if len(data.skipped) > 1 else ""))
    return "\n".join(lines)


def cmd_build(args: argparse.Namespace) -> int:
    from ..data import DataError, parse_spec
    from ..data import kanji_fonts as kf

    name, arg = parse_spec(args.spec)
    if name != "kanji-fonts":
        raise DataError(
            f"hvs data build: only kanji-fonts has a cache to build, got {args.spec!r} "
            f"(other sources read their files directly)"
        )
    kw = {
        k: v
        for k, v in (
            ("size", args.size),
            ("limit", args.limit),
            ("max_faces", args.max_faces),
            ("jitter", args.jitter),
            ("dir", args.out),
        )
        if v is not None
    }
    opts = kf.resolve_options(arg, **kw)
    path = kf.cache_path(opts["dir"], int(opts["size"]), opts["limit"], opts["max_faces"], float(opts["jitter"]))
    existed = os.path.exists(path)
    m = kf.build_cache(
        opts["dir"],
        size=int(opts["size"]),
        limit=opts["limit"],
        max_faces=opts["max_faces"],
        jitter=float(opts["jitter"]),
        force=args.force,
        progress=not args.no_progress,
    )
    verb = "reused" if existed and not args.force else "built"
    took = f" in {m['build_seconds']:.1f} s" if verb == "built" and "build_seconds" in m else ""
    print(
        f"{verb} {path}{took}: {m['characters']:,} characters, {m['print_faces']} print + "
        f"{m['handwriting_faces']} handwriting faces, {m['views']:,} views, {m['bytes'] / 2**20:.1f} MiB"
    )
    for face in m["faces"]:
        gaps = {
            k: v if isinstance(v, int) else len(v)
            for k, v in (
                ("not in cmap", face["missing"]),
                ("empty", face["empty"]),
                ("FreeType errors", face["errors"]),
            )
        }
        gaps_text = ", ".join(f"{n} {what}" for what, n in gaps.items() if n)
        print(
            f"  {face['kind']:<12}{face['key']:<36}{face['views']:>6,} views  {face['package']}"
            + (f"  ({gaps_text})" if gaps_text else "")
        )
    for item in m.get("skipped", []):
        print(f"  skipped: {item}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..data import (
        create_dataset,
        kanji_fonts,  # noqa: F401  (registers the source)
        parse_spec,
        source_info,
    )

    protocol = args.protocol
    if protocol is None:  # a source that supports only some protocols says so; others default closed
        fn = source_info(parse_spec(args.spec)[0]).fn
        protocol = (getattr(fn, "supported_protocols", None) or ("closed",))[0]
    data = create_dataset(args.spec, protocol=protocol, image_size=args.image_size, seed=args.seed)
    if args.json:
        print(
            json.dumps(
                {
                    "summary": data.summary(),
                    "protocol": data.protocol,
                    "classes": len(data.classes),
                    "splits": split_stats(data),
                    "skipped": data.skipped,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        print(format_info(data))
    return 0


def cmd_fonts(args: argparse.Namespace) -> int:
    from ..data import kanji_fonts as kf

    usable, excluded, unclassified = kf.discover_faces()
    for face in usable:
        print(f"{face.kind:<12}{face.key:<36}{face.package:<30}{face.path}" + (f":{face.index}" if face.index else ""))
    if args.all:
        for face in sorted(excluded, key=lambda f: f.key):
            print(f"{'excluded':<12}{face.key:<36}{face.package:<30}{face.note}")
        for item in unclassified:
            print(f"{'unknown':<12}{item}")
    n_print = sum(f.kind == kf.PRINT for f in usable)
    print(
        f"{n_print} print + {len(usable) - n_print} handwriting faces before de-duplication; "
        f"{len(excluded)} excluded, {len(unclassified)} unclassified" + ("" if args.all else " (--all lists them)")
    )
    if not n_print or n_print == len(usable):
        print(f"hint: {kf.INSTALL_HINT}")
    return 0


def configure(d: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs data``."""
    dsub = d.add_subparsers(dest="data_command", required=True)

    b = dsub.add_parser("build", help="render kanji-fonts once into its cache (.npz + manifest)")
    b.add_argument("spec", nargs="?", default="kanji-fonts", help="kanji-fonts[:DIR][,KEY=VAL...]")
    b.add_argument("--size", type=int, help="canvas size in pixels (default 32)")
    b.add_argument("--out", help="cache folder (default $HVS_CACHE/kanji-fonts or ~/.cache/hvs/kanji-fonts)")
    b.add_argument("--limit", type=int, help="only the first N characters (JIS order)")
    b.add_argument("--max-faces", type=int, help="at most N faces, half print and half handwriting")
    b.add_argument("--jitter", type=float, help="deterministic per-view rotation/scale/shift, 0..1 (default 0)")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_build)

    i = dsub.add_parser("info", help="load a dataset and print its splits and per-split view statistics")
    i.add_argument("spec", help="data spec, e.g. kanji-fonts, fashion-mnist, synthetic:classes=20")
    i.add_argument(
        "--protocol", choices=["closed", "open"], help="default: the source's only protocol if it has one, else closed"
    )
    i.add_argument("--image-size", type=int)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    f = dsub.add_parser("fonts", help="CJK font faces installed here and how kanji-fonts classifies them")
    f.add_argument("--all", action="store_true", help="also list excluded and unclassified faces")
    f.set_defaults(fn=cmd_fonts)
