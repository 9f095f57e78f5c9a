"""Loopback load test of ``hvs serve``: the PyTorch query model vs its ONNX export, side by side.

For each query encoder the server is started in a subprocess on a free loopback port; N client
threads (one ``httpx.Client`` each) send M ``POST /search`` requests each, bounded by a time
limit per run. Reported per run: client-side latency p50/p99, throughput, errors, and the
server's own p50 for ``POST /search`` (from ``/stats``, i.e. without the client's HTTP overhead).

    python benchmarks/bench_serve.py                          # builds a small synthetic setup in a temp dir
    python benchmarks/bench_serve.py --clients 8 --requests 200
    python benchmarks/bench_serve.py --index faiss:runs/index --query-model runs/q-bct [--onnx q.onnx]

Without ``--index`` it trains a 1-epoch gallery model (cnn-small) and a BCT query model (cnn-tiny)
on synthetic 28x28 data, builds the index and exports the query model, all in a temp dir, so it
runs from a fresh clone. The numbers are for one machine and its load at the time; on a shared
2-core box compare the two columns of one run rather than runs with each other.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SPEC = "synthetic:classes=10,train_per_class=40,test_per_class=20,size=28"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_setup(root: Path, log=print) -> tuple[str, str]:
    """Train a gallery model and a BCT query model for it, index the gallery split."""
    from hvs.data import create_dataset
    from hvs.search import build_gallery_index
    from hvs.train import TrainConfig, train

    data = create_dataset(SPEC)
    common = dict(data=SPEC, embed_dim=32, epochs=1, batch_size=64, lr=0.05)
    log(f"setup: training cnn-small (gallery) and cnn-tiny (query, BCT) for 1 epoch on {SPEC}")
    train(TrainConfig(out=str(root / "g"), model="cnn-small", **common), data=data, progress=False, log=lambda s: None)
    train(
        TrainConfig(out=str(root / "q"), model="cnn-tiny", gallery=str(root / "g"), compat=["bct"], **common),
        data=data,
        progress=False,
        log=lambda s: None,
    )
    build_gallery_index(root / "g", SPEC, f"faiss:{root / 'idx'}", progress=False)
    return f"faiss:{root / 'idx'}", str(root / "q")


def query_images(index_spec: str, n: int = 32) -> list[bytes]:
    """PNG query images at the index's preprocessing: the dataset's query split when the index
    records a synthetic/in-memory dataset, random pixels otherwise (cost does not depend on content)."""
    from PIL import Image

    from hvs.index import open_index

    with open_index(index_spec) as index:
        meta = index.meta
    pre = meta.get("preprocessing") or {"channels": 3, "image_size": 224}
    spec = (meta.get("data") or {}).get("spec")
    images = None
    if spec and spec.startswith(("synthetic", "fashion-mnist")):
        from hvs.data import create_dataset

        images = create_dataset(spec, image_size=pre["image_size"], channels=pre["channels"]).query.images[:n]
    if images is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, pre["channels"], pre["image_size"], pre["image_size"]), dtype=np.uint8)
    out = []
    for x in np.asarray(images):
        arr = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Server:
    """``hvs serve`` in a subprocess, stopped on exit."""

    def __init__(self, index: str, query_model: str, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "HVS_TOKEN"}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hvs",
                "serve",
                "--index",
                index,
                "--query-model",
                query_model,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(
                    f"hvs serve exited with {self.proc.returncode}: {self.log.read().strip().splitlines()[-1:]}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("hvs serve did not answer /healthz within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def load(url: str, images: list[bytes], clients: int, requests: int, k: int, time_limit: float) -> dict:
    """N threads x M requests (or until ``time_limit``); latencies in ms, errors counted."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.monotonic() + time_limit
    start_gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            start_gate.wait()
            for j in range(requests):
                if time.monotonic() > stop:
                    break
                img = images[(i * requests + j) % len(images)]
                t = time.perf_counter()
                try:
                    r = c.post("/search", params={"k": k}, files={"image": ("q.png", img, "image/png")})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies[i].append(1000.0 * (time.perf_counter() - t))
                else:
                    errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray([x for per in latencies for x in per], dtype=np.float64)
    server = httpx.get(url + "/stats", timeout=5).json()["latency_ms"].get("POST /search", {})
    return {
        "ok": int(lat.size),
        "errors": int(sum(errors)),
        "wall_s": wall,
        "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "throughput": lat.size / wall if wall > 0 else 0.0,
        "server_p50": server.get("p50", float("nan")),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", "-n", type=int, default=4, help="concurrent client threads (N)")
    p.add_argument("--requests", "-m", type=int, default=25, help="search requests per client (M)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per run at most")
    p.add_argument("--warmup", type=int, default=5, help="requests before measuring")
    p.add_argument("--index", help="faiss:DIR to serve (default: build a synthetic setup in a temp dir)")
    p.add_argument("--query-model", help="PyTorch query model folder (needed with --index)")
    p.add_argument("--onnx", help="ONNX export of the query model (default: exported into a temp dir)")
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 10_000 and args.time_limit > 0):
        p.error("need 1 <= --clients <= 64, 1 <= --requests <= 10000 and a positive --time-limit")
    if args.index and not args.query_model:
        p.error("--index needs --query-model")

    import httpx

    with tempfile.TemporaryDirectory(prefix="hvs-bench-serve-") as tmp:
        root = Path(tmp)
        index, query_model = (args.index, args.query_model) if args.index else build_setup(root)
        onnx_path = args.onnx
        if onnx_path is None:
            from hvs.export import export_onnx

            report = export_onnx(query_model, root / "q.onnx")
            onnx_path = report["onnx"]
            print(f"exported {query_model} -> ONNX (max |diff| {report['parity']['max_abs_diff']:.1e})")
        images = query_images(index)
        results = {}
        for name, model in (("torch", query_model), ("onnx", onnx_path)):
            with Server(index, str(model), free_port()) as server:
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    for i in range(args.warmup):
                        c.post("/search", files={"image": ("q.png", images[i % len(images)], "image/png")})
                results[name] = load(server.url, images, args.clients, args.requests, args.k, args.time_limit)

    where = index if args.index else SPEC
    print(f"\n{args.clients} clients x {args.requests} requests, k={args.k}, loopback, index {where}")
    rows = [
        ("requests ok", "ok", "{:d}"),
        ("errors", "errors", "{:d}"),
        ("latency p50 (ms)", "p50", "{:.2f}"),
        ("latency p99 (ms)", "p99", "{:.2f}"),
        ("throughput (req/s)", "throughput", "{:.1f}"),
        ("server p50 (ms)", "server_p50", "{:.2f}"),
        ("wall (s)", "wall_s", "{:.1f}"),
    ]
    print(f"{'':<20}{'torch':>12}{'onnx':>12}")
    for label, key, fmt in rows:
        print(f"{label:<20}" + "".join(f"{fmt.format(results[n][key]):>12}" for n in ("torch", "onnx")))
    return results


if __name__ == "__main__":
    main()
