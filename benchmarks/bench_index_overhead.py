"""What does the ``hvs`` gallery-index wrapper cost on top of raw FAISS search?

``GalleryIndex.search`` adds input checks (finite, dimension), L2 normalisation of the queries,
the IndexIDMap2 id translation and -inf padding on top of ``faiss.IndexFlatIP.search``. On exact
(Flat) search that should be lost in the O(queries x gallery x dim) scan: the target is a ratio
of at most 1.2.

    python benchmarks/bench_index_overhead.py                      # 100k x 128-d, 1000 queries, k=10
    python benchmarks/bench_index_overhead.py --n 20000 --repeats 3

Prints one line per side (median of ``--repeats`` interleaved runs after a warm-up) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function, runs interleaved (a, b, b, a, ...) so that load from
    other processes on a shared machine hits both sides alike."""
    for fn in fns:
        fn()  # warm-up: page in the index, spin up OpenMP threads
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery size")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: FAISS default)")
    args = p.parse_args(argv)

    import faiss

    from hvs.index import open_index

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    raw = faiss.IndexFlatIP(args.dim)
    raw.add(gallery)
    with tempfile.TemporaryDirectory() as tmp:
        index = open_index(f"faiss:{tmp}/gallery", create=True, dim=args.dim, factory="Flat")
        index.add(gallery)
        t_raw, t_hvs = median_times(
            [lambda: raw.search(queries, args.k), lambda: index.search(queries, args.k)], args.repeats
        )
        # same answers, or the comparison means nothing
        assert np.array_equal(raw.search(queries, args.k)[1], index.search(queries, args.k)[1])
        index.close()

    ratio = t_hvs / t_raw
    print(
        f"gallery {args.n} x {args.dim}-d Flat IP, {args.queries} queries, k={args.k}, "
        f"median of {args.repeats}, {faiss.omp_get_max_threads()} FAISS threads"
    )
    print(f"raw faiss.IndexFlatIP.search : {t_raw * 1e3:8.1f} ms")
    print(f"hvs GalleryIndex.search      : {t_hvs * 1e3:8.1f} ms")
    print(f"ratio hvs / raw              : {ratio:8.3f}  (target <= 1.2)")
    return ratio


if __name__ == "__main__":
    main()
