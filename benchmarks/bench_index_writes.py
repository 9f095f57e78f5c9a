"""What a write to a ``faiss:DIR`` index costs, how searches fare while writes and a compaction
run, and a gallery past RAM. Synthetic 128-d unit vectors, Flat unless said.

    python benchmarks/bench_index_writes.py                              # 10k, 100k; past RAM at 1M
    python benchmarks/bench_index_writes.py --sizes 10000,100000,1000000 --ram-n 10000000

1. One-item ``add`` and ``remove`` latency (p50/p99 over ``--writes`` calls, each durable: one
   fsync'ed log record) at each size, the ratio largest/smallest (target <= 1.5), against raw
   FAISS ``add_with_ids`` of one vector on the same kind of index in the same run (in memory,
   not durable: the floor).
2. Search QPS and p99 (one query per call, k=10, one searching thread) while a writer thread
   adds 10 items/s and a compaction runs, against the same with no writer (target >= 0.8x).
3. Past RAM: ``--ram-n`` vectors with ``--ram-factory`` on a memory-mapped base (``mmap=True``):
   build time, resident memory of a fresh process that opens it and searches (VmRSS, and
   RssAnon: the part that is not file pages the kernel can drop), recall@10 against exact
   search on a sample of queries, QPS. Clustered synthetic vectors (4096 centres) for this part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(rng: np.random.Generator, n: int, d: int, centers: int = 4096, noise: float = 0.6) -> np.ndarray:
    """Unit vectors around ``centers`` random directions: structure like real embeddings have
    (i.i.d. Gaussian vectors have none, and every approximate index looks bad on them)."""
    c = np.random.default_rng(12345).standard_normal((centers, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 1 << 20):
        m = min(1 << 20, n - start)
        block = c[rng.integers(0, centers, m)] + noise * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def pct(a: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(a) * 1000.0, [50, 99])
    return float(p50), float(p99)


def build(
    path: Path,
    n: int,
    dim: int,
    factory: str = "Flat",
    mmap: bool = False,
    rerank: int = 1,
    chunk: int = 1_000_000,
    data=unit,
):
    """An index of n random unit vectors in one base (created from the first chunk, then the log
    and compactions for the rest, as a large gallery is built)."""
    from hvs.index.faiss_backend import FaissGalleryIndex, default_search_params, make_index

    rng = np.random.default_rng(n)
    first = min(n, chunk)
    params = dict(default_search_params(make_index(dim, factory)), **({"rerank": rerank} if rerank > 1 else {}))
    meta = {"mmap": mmap, "search_params": params}
    index = FaissGalleryIndex.create(str(path), dim, factory, meta, initial=(data(rng, first, dim), None, None, None))
    index.auto_compact = False
    for start in range(first, n, chunk):
        m = min(chunk, n - start)
        index.add(data(rng, m, dim))
        index.compact()
    return index


def write_latency(sizes: list[int], dim: int, writes: int, tmp: Path) -> list[dict]:
    """Every size is built first; then the timed calls go round-robin over the sizes (and raw
    FAISS), so that the disk's fsync latency, which other processes' writes move, hits all alike."""
    import faiss

    indexes = {n: build(tmp / f"w{n}", n, dim) for n in sizes}
    raws = {}
    for n in sizes:
        raw = faiss.IndexIDMap2(faiss.index_factory(dim, "Flat", faiss.METRIC_INNER_PRODUCT))
        raw.add_with_ids(unit(np.random.default_rng(n), n, dim), np.arange(n, dtype=np.int64))
        raws[n] = raw
    os.sync()  # the builds' dirty pages are not the first write's problem
    time.sleep(2)
    rng = np.random.default_rng(1)
    new = unit(rng, writes, dim)
    victims = {n: rng.choice(n, writes, replace=False) for n in sizes}
    add_t = {n: [] for n in sizes}
    rm_t = {n: [] for n in sizes}
    raw_t = {n: [] for n in sizes}
    for j in range(writes):
        for n in sizes if j % 2 == 0 else reversed(sizes):
            t = time.perf_counter()
            indexes[n].add(new[j : j + 1])
            add_t[n].append(time.perf_counter() - t)
            t = time.perf_counter()
            raws[n].add_with_ids(new[j : j + 1], np.asarray([n + j], dtype=np.int64))
            raw_t[n].append(time.perf_counter() - t)
    for j in range(writes):
        for n in sizes if j % 2 == 0 else reversed(sizes):
            t = time.perf_counter()
            indexes[n].remove([int(victims[n][j])])
            rm_t[n].append(time.perf_counter() - t)
    rows = []
    for n in sizes:
        log_bytes = indexes[n].info()["log"]["bytes"]
        indexes[n].close()
        rows.append(
            {
                "n": n,
                "add": pct(add_t[n]),
                "remove": pct(rm_t[n]),
                "raw_add": pct(raw_t[n]),
                "log_bytes_per_write": log_bytes / (2 * writes),
            }
        )
    raws.clear()
    return rows


def search_under_writes(n: int, dim: int, seconds: float, tmp: Path) -> dict:
    index = build(tmp / f"s{n}", n, dim)
    index.auto_compact = False
    rng = np.random.default_rng(2)
    queries = unit(rng, 4096, dim)

    def run_searches(stop_after: float) -> list[float]:
        lat, j, end = [], 0, time.perf_counter() + stop_after
        while time.perf_counter() < end:
            t = time.perf_counter()
            index.search(queries[j % len(queries)], 10)
            lat.append(time.perf_counter() - t)
            j += 1
        return lat

    run_searches(1.0)  # warm-up
    quiet = run_searches(seconds)
    stop = threading.Event()
    compaction: dict = {}

    def writer():
        wrng = np.random.default_rng(3)
        while not stop.is_set():
            t = time.perf_counter()
            index.add(unit(wrng, 1, dim))
            stop.wait(max(0.0, 0.1 - (time.perf_counter() - t)))  # 10 items/s

    def compactor():
        time.sleep(seconds * 0.2)
        t = time.perf_counter()
        compaction["summary"] = index.compact()
        compaction["seconds"] = time.perf_counter() - t

    threads = [threading.Thread(target=writer), threading.Thread(target=compactor)]
    for t in threads:
        t.start()
    busy = run_searches(seconds)
    stop.set()
    for t in threads:
        t.join()
    index.close()
    return {
        "n": n,
        "quiet_qps": len(quiet) / seconds,
        "quiet_p99_ms": pct(quiet)[1],
        "busy_qps": len(busy) / seconds,
        "busy_p99_ms": pct(busy)[1],
        "busy_max_ms": 1000.0 * max(busy),
        "compaction_s": compaction.get("seconds"),
    }


PROBE = r"""
import json, sys, time, numpy as np
from hvs.index import open_index
path, nq = sys.argv[1], int(sys.argv[2])
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out
index = open_index("faiss:" + path)
opened = status()
q = np.load(path + ".queries.npy")[:nq]
import faiss; faiss.omp_set_num_threads(1)
index.search(q[:10], 10)
t = time.perf_counter()
_, ids = index.search(q, 10)
qps = len(q) / (time.perf_counter() - t)
lat = []
for row in q[:200]:
    t1 = time.perf_counter(); index.search(row, 10); lat.append(time.perf_counter() - t1)
np.save(path + ".ids.npy", ids)
print(json.dumps({"opened_mb": opened, "after_search_mb": status(), "qps_batched": qps,
                  "p99_one_query_ms": float(np.percentile(lat, 99) * 1000)}))
"""


def past_ram(n: int, dim: int, factory: str, queries: int, rerank: int, tmp: Path) -> dict:
    path = tmp / "ram"
    t = time.perf_counter()
    index = build(path, n, dim, factory, mmap=True, rerank=rerank, data=clustered)
    build_s = time.perf_counter() - t
    vectors = index._base.vectors  # the memory-mapped raw vectors (what exact re-ranking reads)
    assert isinstance(vectors, np.memmap)
    rng = np.random.default_rng(5)
    q = clustered(rng, queries, dim)  # new points from the gallery's distribution
    np.save(str(path) + ".queries.npy", q)
    index.close()
    # exact top-10 over the memory-mapped vectors, in chunks (bounded memory)
    best_s = np.full((queries, 10), -np.inf, np.float32)
    best_i = np.full((queries, 10), -1, np.int64)
    ids_all = np.load(path / (path / "CURRENT").read_text().strip() / "vector_ids.npy", mmap_mode="r")
    for start in range(0, n, 262144):
        block = np.asarray(vectors[start : start + 262144])
        s = q @ block.T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.asarray(ids_all[start : start + len(block)]), s.shape)], 1)
        top = np.argpartition(-cand_s, 9, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(queries)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    got = np.load(str(path) + ".ids.npy")
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), best_i.tolist())]))
    disk = {p.name: p.stat().st_size for p in (path / (path / "CURRENT").read_text().strip()).iterdir()}
    return {"n": n, "factory": factory, "build_s": build_s, "recall@10": recall, **probe, "files_mb": disk}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--search-n", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--ram-n", type=int, default=1_000_000)
    p.add_argument("--ram-factory", default="IVF1024,PQ16")
    p.add_argument("--ram-queries", type=int, default=1000)
    p.add_argument("--ram-rerank", type=int, default=32, help="search param rerank (1: PQ scores as they are)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: writes,search,ram")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    import faiss

    # One FAISS thread: single-query searches and small writes gain nothing from OpenMP, whose
    # spin-waiting threads make a shared 2-core machine 40x slower per query.
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        if "writes" not in skip:
            sizes = [int(s) for s in args.sizes.split(",")]
            print(f"== 1. one-item write latency, Flat {args.dim}-d, {args.writes} adds then {args.writes} removes")
            rows = write_latency(sizes, args.dim, args.writes, tmp)
            print(
                f"| {'items':>9} | {'add p50 ms':>10} | {'add p99 ms':>10} | {'remove p50':>10} | "
                f"{'remove p99':>10} | {'raw FAISS add p50/p99 ms':>24} | {'log B/write':>11} |"
            )
            print(f"|{'-' * 11}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 26}|{'-' * 13}|")
            for r in rows:
                print(
                    f"| {r['n']:>9} | {r['add'][0]:>10.3f} | {r['add'][1]:>10.3f} | {r['remove'][0]:>10.3f} | "
                    f"{r['remove'][1]:>10.3f} | {r['raw_add'][0]:>11.4f} / {r['raw_add'][1]:>10.4f} | "
                    f"{r['log_bytes_per_write']:>11.0f} |"
                )
            lo, hi = rows[0], rows[-1]
            print(
                f"ratio {hi['n']} / {lo['n']} items: add p50 {hi['add'][0] / lo['add'][0]:.2f}x, "
                f"p99 {hi['add'][1] / lo['add'][1]:.2f}x; remove p50 {hi['remove'][0] / lo['remove'][0]:.2f}x, "
                f"p99 {hi['remove'][1] / lo['remove'][1]:.2f}x (target <= 1.5); hvs add p50 / raw FAISS add p50 "
                f"at {hi['n']}: {hi['add'][0] / hi['raw_add'][0]:.0f}x (the fsync of a durable write)"
            )
        if "search" not in skip:
            print(
                f"\n== 2. search (1 query/call, k=10) on {args.search_n} items: quiet vs a 10 items/s writer "
                "+ a compaction"
            )
            s = search_under_writes(args.search_n, args.dim, args.seconds, tmp)
            print(
                f"quiet: {s['quiet_qps']:.0f} QPS, p99 {s['quiet_p99_ms']:.2f} ms; with writer and compaction "
                f"({s['compaction_s']:.1f} s): {s['busy_qps']:.0f} QPS, p99 {s['busy_p99_ms']:.2f} ms, max "
                f"{s['busy_max_ms']:.1f} ms; ratio {s['busy_qps'] / s['quiet_qps']:.2f}x (target >= 0.8)"
            )
        if "ram" not in skip:
            print(
                f"\n== 3. past RAM: {args.ram_n} x {args.dim}-d, {args.ram_factory}, memory-mapped base, "
                f"rerank {args.ram_rerank}"
            )
            r = past_ram(args.ram_n, args.dim, args.ram_factory, args.ram_queries, args.ram_rerank, tmp)
            raw_mb = args.ram_n * args.dim * 4 / 2**20
            print(
                f"build {r['build_s']:.0f} s; recall@10 vs exact {r['recall@10']:.3f} ({args.ram_queries} queries); "
                f"{r['qps_batched']:.0f} QPS batched, p99 one query {r['p99_one_query_ms']:.2f} ms"
            )
            print(
                f"resident memory of a fresh reader: after open {r['opened_mb']} MB, after searching "
                f"{r['after_search_mb']} MB (raw vectors alone would be {raw_mb:.0f} MB)"
            )
            print("base files (MB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(r["files_mb"].items())))


if __name__ == "__main__":
    main()
