"""``hvs index build|add|remove|info`` and ``hvs search``: thin wrappers over hvs.search, hvs.gallery
and hvs.index (a bare folder is a FAISS index, as everywhere: see :func:`hvs.index.open_index`).

    hvs index build --gallery-model runs/gallery --data fashion-mnist --out faiss:runs/index [--factory HNSW32]
    hvs index add --index faiss:runs/index [--gallery-model runs/gallery] --label Bag new_bag.png
    hvs index remove --index faiss:runs/index 17 42 [--uploads DIR]
    hvs index info --index faiss:runs/index
    hvs index compact faiss:runs/index
    hvs index backfill faiss:runs/index --gallery-model runs/gallery-v2 [--batch 256] [--strict]
    hvs search --index faiss:runs/index --query-model runs/query-bct photo.png [-k 10] [--json]
"""

from __future__ import annotations

import argparse
import json

from ._common import add_data_args, add_gallery_model_arg, data_kwargs


def cmd_build(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..search import build_gallery_index

    build = build_gallery_index
    if distributed.env_info().distributed:  # under torchrun: ranks embed disjoint shards, rank 0 writes
        from ..index.distributed_build import build_gallery_index_distributed as build
    index = build(
        args.gallery_model,
        args.data,
        args.out,
        split=args.split,
        factory=args.factory,
        protocol=args.protocol,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=not args.no_progress,
        strict=args.strict,
        **data_kwargs(args),
    )
    if index is None:  # a rank other than 0
        return 0
    report = index.meta.get("build_report", {})
    print(
        f"built {index.spec}: {len(index)} vectors, dim {index.dim}, factory {args.factory}; "
        + ", ".join(f"{k} {v}" for k, v in report.items() if not isinstance(v, list))
    )
    skipped = report.get("skipped") or index.meta.get("data", {}).get("skipped") or []
    for item in skipped:
        print(f"skipped: {item}")
    index.close()
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from ..gallery import add_images
    from ..index import open_index

    with open_index(args.index) as index:
        ids = add_images(index, args.images, args.label, gallery_model=args.gallery_model)
        print(f"added ids {', '.join(str(int(i)) for i in ids)}; index now holds {len(index)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from ..index import open_index

    with open_index(args.index) as index:
        n, deleted = index.remove_with_uploads(args.ids, args.uploads)  # ids validated there (int64)
        print(
            f"removed {n}; index now holds {len(index)}"
            + (f"; deleted {len(deleted)} uploaded image(s)" if deleted else "")
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..index import open_index

    with open_index(args.index) as index:
        print(json.dumps(index.info(), indent=2, default=str))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from ..index import open_index

    with open_index(args.spec) as index:
        summary = index.compact()
        if summary.get("compacted"):
            print(
                f"compacted {index.spec}: {summary.get('count', len(index))} items in version "
                f"{summary.get('version')}; folded {summary.get('log_records', 0)} log record(s), "
                f"{summary.get('tombstones', 0)} tombstone(s)"
            )
        else:
            print(f"nothing to compact in {index.spec}: {summary.get('reason', 'no pending writes')}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from ..index.backfill import backfill, missing_lines

    report = backfill(args.spec, args.gallery_model, batch_size=args.batch, strict=args.strict, log=print)
    for line in missing_lines(report):
        print(line)
    print(report.summary())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..search import Searcher

    searcher = Searcher(args.index, args.query_model, force=args.force)
    try:
        if searcher.warning:
            print(f"warning: {searcher.warning}")
        results = searcher.search_files(args.images, k=args.k)
        if args.json:
            print(json.dumps([{"query": str(p), "results": r} for p, r in zip(args.images, results)], indent=2))
        else:
            for path, hits in zip(args.images, results):
                print(f"{path}:")
                for rank, hit in enumerate(hits, 1):
                    print(f"  {rank:>3}. id {hit['id']:<8} score {hit['score']:.4f}  {hit['label']}  {hit['source']}")
    finally:
        searcher.index.close()
    return 0


def configure_index(ix: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs index``."""
    isub = ix.add_subparsers(dest="index_command", required=True)

    b = isub.add_parser("build", help="embed a dataset split with the gallery model into a new index")
    add_gallery_model_arg(b, required=True)
    b.add_argument("--data", default="fashion-mnist")
    b.add_argument("--split", default="gallery", choices=["train", "query", "gallery"])
    b.add_argument("--protocol", default="closed", choices=["closed", "open"])
    b.add_argument("--out", required=True, help="faiss:DIR (or a bare DIR) or milvus:URI")
    b.add_argument("--factory", default="Flat", help="FAISS index factory: Flat, HNSW32, IVF256,Flat, IVF256,PQ16, ...")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    b.add_argument("--strict", action="store_true", help="an unreadable image is an error, not skipped")
    add_data_args(b)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_build)

    a = isub.add_parser("add", help="embed images with the gallery model and add them")
    a.add_argument("--index", required=True)
    add_gallery_model_arg(a, help="the gallery model that built the index (default: the folder it records)")
    a.add_argument("--label", action="append", required=True, help="label for every image, or one per image")
    a.add_argument("images", nargs="+")
    a.set_defaults(fn=cmd_add)

    r = isub.add_parser("remove", help="remove items by id (really removed, ids never reused)")
    r.add_argument("--index", required=True)
    r.add_argument(
        "--uploads",
        help="folder of images added with POST /gallery, deleted with their items "
        "(default: INDEX_DIR/uploads, as for hvs serve)",
    )
    r.add_argument("ids", nargs="+", type=int)
    r.set_defaults(fn=cmd_remove)

    i = isub.add_parser("info", help="print the index sidecar")
    i.add_argument("--index", required=True)
    i.set_defaults(fn=cmd_info)

    c = isub.add_parser("compact", help="fold the write-ahead log and tombstones into a new base version")
    c.add_argument("spec", help="faiss:DIR (or a bare DIR) or milvus:URI")
    c.set_defaults(fn=cmd_compact)

    configure_backfill(isub)


def configure_backfill(isub) -> None:
    """``hvs index backfill SPEC --gallery-model NEW``: re-embed the other models' items (hvs.index.backfill)."""
    f = isub.add_parser("backfill", help="re-embed the items of older gallery models with a new one (resumable)")
    f.add_argument("spec", help="faiss:DIR (or a bare DIR) or milvus:URI")
    add_gallery_model_arg(f, required=True, help="the new gallery model (trained compatible with the index's)")
    f.add_argument("--batch", type=int, default=256, help="items per durable write (the lock is released between)")
    f.add_argument("--strict", action="store_true", help="an item whose source cannot be read is an error")
    f.set_defaults(fn=cmd_backfill)


def configure_search(s: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs search``."""
    s.add_argument("--index", required=True)
    s.add_argument("--query-model", required=True, help="query model folder (or exported .onnx file)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--json", action="store_true")
    s.add_argument("--force", action="store_true", help="search with a query model made for another gallery model")
    s.add_argument("images", nargs="+")
    s.set_defaults(fn=cmd_search)
