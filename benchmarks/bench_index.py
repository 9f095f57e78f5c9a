"""Gallery index benchmark: wrapper overhead, approximate indexes on real embeddings, build speed.

    python benchmarks/bench_index.py --gallery-model runs/demo/gallery --query-model runs/demo/query-bct

1. Overhead of ``GalleryIndex.search`` over raw FAISS on the same Flat index (100k x 128-d random
   unit vectors, batched queries), measured side by side (benchmarks/bench_index_overhead.py).
2. HNSW / IVF / PQ on real embeddings: the fashion-mnist *train* set (60k) embedded by the gallery
   model is the index; the *test* images embedded by the query model are the queries
   (heterogeneous search, as deployed). Recall@10 against exact search, queries/s (batched, all
   queries at once), bytes per vector on disk, build seconds.
3. ``hvs index build`` throughput (images/s) against the bare forward pass of the gallery model on
   the same images: what sharding, id maps and atomic writes cost.
4. Writes, concurrency and a gallery past RAM (benchmarks/bench_index_writes.py): one-item add /
   remove latency at 10k, 100k (and ``--write-sizes`` up to 1M) against raw FAISS add_with_ids,
   search QPS while a writer adds 10 items/s and a compaction runs, and a memory-mapped IVF-PQ
   gallery (``--ram-n``, 10M for the full figure): build time, resident memory, recall@10, QPS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def dir_bytes(path: Path, name: str = "index.faiss") -> int:
    return sum(p.stat().st_size for p in path.rglob(name))


def ann_table(gallery_model: str, query_model: str | None, data: str, factories: list[str], k: int = 10) -> list[dict]:
    from hvs import checkpoint as ckpt
    from hvs.data import create_dataset
    from hvs.embed import embed_images
    from hvs.index import open_index

    g_model, g_card = ckpt.load_model(gallery_model)
    q_model, q_card = ckpt.load_model(query_model) if query_model else (g_model, g_card)
    d = create_dataset(data, image_size=g_card.image_size)
    base = embed_images(g_model, d.train.images, g_card.mean, g_card.std).numpy()
    test = torch.cat([d.query.images, d.gallery.images])
    queries = embed_images(q_model, test, q_card.mean, q_card.std).numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exact_ids = None
        for factory in ["Flat", *factories]:
            path = Path(tmp) / factory.replace(",", "_")
            t0 = time.perf_counter()
            index = open_index(f"faiss:{path}", create=True, dim=base.shape[1], factory=factory)
            index.add(base, labels=None)
            build_s = time.perf_counter() - t0
            index.search(queries[:100], k)  # warm-up
            t0 = time.perf_counter()
            _, ids = index.search(queries, k)
            search_s = time.perf_counter() - t0
            if exact_ids is None:
                exact_ids = ids
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))
            index.close()
            rows.append(
                {
                    "factory": factory,
                    "recall@10": recall,
                    "queries_per_s": len(queries) / search_s,
                    "bytes_per_vector": dir_bytes(path) / len(base),
                    "build_s": build_s,
                    "n": len(base),
                    "queries": len(queries),
                }
            )
    return rows


def build_throughput(gallery_model: str, data: str) -> dict:
    from hvs import checkpoint as ckpt
    from hvs.data import create_dataset
    from hvs.embed import embed_images
    from hvs.search import build_gallery_index

    model, card = ckpt.load_model(gallery_model)
    d = create_dataset(data, image_size=card.image_size)
    n = len(d.gallery)
    embed_images(model, d.gallery.images[:512], card.mean, card.std)  # warm-up
    t0 = time.perf_counter()
    embed_images(model, d.gallery.images, card.mean, card.std)
    bare = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_gallery_index(gallery_model, data, f"faiss:{tmp}/idx", progress=False).close()
        built = time.perf_counter() - t0
    return {"images": n, "bare_forward_img_s": n / bare, "index_build_img_s": n / built, "ratio": bare / built}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery-model", default="runs/demo/gallery")
    p.add_argument("--query-model", default="runs/demo/query-bct")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--factories", default="HNSW32;IVF256,Flat;IVF256,PQ16;IVF256,PQ8")
    p.add_argument("--overhead-n", type=int, default=100_000)
    p.add_argument("--write-sizes", default="10000,100000,1000000")
    p.add_argument("--ram-n", type=int, default=1_000_000, help="past-RAM gallery size (10000000: the issue's figure)")
    p.add_argument("--ram-factory", default="IVF1024,PQ16")
    p.add_argument("--skip-writes", action="store_true", help="skip part 4")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    import bench_index_overhead

    print("== 1. hvs search path vs raw FAISS (Flat, exact)")
    bench_index_overhead.main(["--n", str(args.overhead_n), "--repeats", "7"])

    print(
        f"\n== 2. approximate indexes on real embeddings ({args.data} train set by {args.gallery_model}; "
        f"queries = test set by {args.query_model})"
    )
    rows = ann_table(args.gallery_model, args.query_model, args.data, args.factories.split(";"))
    print(
        f"| {'factory':<14} | {'recall@10 vs exact':>18} | {'queries/s':>10} | {'bytes/vector':>12} | {'build s':>8} |"
    )
    print(f"|{'-' * 16}|{'-' * 20}|{'-' * 12}|{'-' * 14}|{'-' * 10}|")
    for r in rows:
        print(
            f"| {r['factory']:<14} | {r['recall@10']:>18.4f} | {r['queries_per_s']:>10.0f} | "
            f"{r['bytes_per_vector']:>12.1f} | {r['build_s']:>8.2f} |"
        )
    print(f"({rows[0]['n']} vectors, {rows[0]['queries']} queries, k=10)")

    print("\n== 3. index build throughput vs the bare forward pass")
    b = build_throughput(args.gallery_model, args.data)
    print(
        f"{b['images']} images: bare forward {b['bare_forward_img_s']:.0f} img/s, hvs index build "
        f"{b['index_build_img_s']:.0f} img/s, ratio build/forward = {b['ratio']:.2f}"
    )

    if not args.skip_writes:
        import bench_index_writes

        print("\n== 4. writes, searches under writes, a gallery past RAM")
        bench_index_writes.main(
            ["--sizes", args.write_sizes, "--ram-n", str(args.ram_n), "--ram-factory", args.ram_factory]
        )


if __name__ == "__main__":
    main()
