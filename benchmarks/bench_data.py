"""Streaming data benchmark: memory that does not grow with the dataset, and loader throughput.

    python benchmarks/bench_data.py --dir /tmp/hvs-bench-data --sizes 50000,200000 --workers 2

1. Writes ``max(sizes)`` JPEG files of ``--image-px`` (224) pixels into ``DIR/images/<class>/``
   (once; a later run reuses them) and, per size N, a CSV manifest of the first N files (closed
   protocol, 100 images per class) plus one listing all N as gallery rows.
2. Peak RSS, each in a fresh subprocess (``resource.getrusage`` maxrss of the process and of its
   largest DataLoader worker), at every N:

   * **train**: ``create_dataset(csv:..., data_mode="stream")`` (listing + probe of every file),
     then ``--steps`` SGD steps of a cheap model (cnn-nano) at ``--train-px`` (64) on batches
     drawn from a permutation of the whole training split (``hvs.training.core.Batches``, the
     trainer's own batch iterator, augmentation ``crop,flip``);
   * **index**: ``hvs.index.build_index`` of all N images (gallery rows) embedded by that model,
     resumable shards as ``hvs index build`` writes them.

   The ratio RSS(N_max) / RSS(N_min) should be ~1; the in-memory path would hold N x C x px^2
   bytes of decoded images (printed next to it).
3. Loader throughput, images/s: the ImageStore's batches (``store.iter_chunks``) against a bare
   ``torchvision.datasets.ImageFolder`` + ``DataLoader`` loop (Resize + CenterCrop + PILToTensor,
   the same output) over the same ``--throughput-images`` files with the same ``--workers``,
   at the image size and at the training size, alternating, best of ``--repeats``; ratio >= 0.9
   is the goal.

The figures printed by the last run are in the README with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_CLASS = 100


def _write_one(args: tuple[str, int, int]) -> None:
    from PIL import Image

    path, seed, px = args
    rng = np.random.default_rng(seed)
    cls = seed // PER_CLASS
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
    base = np.random.default_rng(cls).integers(40, 216, 3).astype(np.float32)
    img = base + 60 * np.stack([np.sin(6 * xx + seed % 7), np.cos(5 * yy + cls), xx * yy], -1)
    img += rng.normal(0, 6, (px, px, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(root: Path, n: int, px: int, workers: int) -> list[str]:
    """The first ``n`` files (relative paths), written where missing."""
    from multiprocessing import Pool

    rel = [f"images/c{i // PER_CLASS:05d}/{i:07d}.jpg" for i in range(n)]
    todo = [(str(root / r), i, px) for i, r in enumerate(rel) if not (root / r).exists()]
    for d in sorted({os.path.dirname(t[0]) for t in todo}):
        os.makedirs(d, exist_ok=True)
    if todo:
        t0 = time.perf_counter()
        with Pool(max(1, workers)) as pool:
            pool.map(_write_one, todo, chunksize=256)
        print(f"wrote {len(todo)} JPEGs of {px}px in {time.perf_counter() - t0:.0f} s", flush=True)
    return rel


def manifests(root: Path, rel: list[str], n: int) -> tuple[Path, Path]:
    train = root / f"train_{n}.csv"
    gallery = root / f"gallery_{n}.csv"
    if not train.exists():
        train.write_text("path,label\n" + "".join(f"{r},{r.split('/')[1]}\n" for r in rel[:n]))
    if not gallery.exists():
        gallery.write_text("path,label,split\n" + "".join(f"{r},{r.split('/')[1]},gallery\n" for r in rel[:n]))
    return train, gallery


def _peak() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(own, 1), "worker_rss_mb": round(child, 1)}


def measure_train(manifest: str, px: int, workers: int, steps: int, batch: int) -> dict:
    import torch

    from hvs.data import create_dataset
    from hvs.losses import MarginHead
    from hvs.models import create_model
    from hvs.training.core import Batches

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = create_dataset(f"csv:{manifest}", image_size=px, data_mode="stream", workers=workers)
    listed = time.perf_counter() - t0
    split = data.train
    classes = torch.unique(split.labels)
    row = torch.full((len(data.classes),), -1, dtype=torch.long)
    row[classes] = torch.arange(len(classes))
    targets = row[split.labels]
    torch.manual_seed(0)
    model = create_model("cnn-nano", embed_dim=32, in_chans=3).to(memory_format=torch.channels_last)
    head = MarginHead(32, len(classes), "cosface", 16.0, 0.2)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    batches = Batches(split.images, targets, data.mean, data.std, batch, "crop,flip", seed=0)
    t1 = time.perf_counter()
    seen = 0
    for step, (x, y) in enumerate(batches.epoch(0)):
        if step >= steps:
            break
        opt.zero_grad()
        loss = head(model(x), y)  # the margin-softmax loss
        loss.backward()
        opt.step()
        seen += len(y)
    return {
        "n_train": len(split),
        "list_s": round(listed, 1),
        "train_s": round(time.perf_counter() - t1, 1),
        "steps": min(steps, batches.steps_per_epoch),
        "images": seen,
        "in_memory_mb": round(split.images.size_bytes() / 2**20, 1),
        **_peak(),
    }


def measure_index(manifest: str, px: int, workers: int, work: str) -> dict:
    import shutil

    import torch

    from hvs.data import create_dataset
    from hvs.embed import embed_images
    from hvs.index import build_index
    from hvs.models import create_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = create_dataset(f"csv:{manifest}", image_size=px, data_mode="stream", workers=workers, splits=("gallery",))
    listed = time.perf_counter() - t0
    part = data.gallery
    torch.manual_seed(0)
    model = create_model("cnn-nano", embed_dim=32, in_chans=3)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def embed_fn(batch):
        return embed_images(model, batch, mean, std).numpy()

    shutil.rmtree(work, ignore_errors=True)
    t1 = time.perf_counter()
    index = build_index(
        f"faiss:{work}",
        part.images,
        [data.classes[i] for i in part.labels.tolist()],
        part.sources,
        embed_fn,
        meta={"gallery_model": {"embed_dim": 32}},
        batch_size=256,
        shard_size=4096,
        progress=False,
    )
    n = len(index)
    index.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "n_index": n,
        "list_s": round(listed, 1),
        "build_s": round(time.perf_counter() - t1, 1),
        "in_memory_mb": round(part.images.size_bytes() / 2**20, 1),
        **_peak(),
    }


def measure_throughput(root: Path, rel: list[str], px: int, workers: int, n: int, repeats: int) -> dict:
    import torch
    import torchvision
    from torchvision import transforms

    from hvs.data.store import ImageStore

    torch.set_num_threads(1)
    files = [str(root / r) for r in rel[:n]]
    store = ImageStore(files, None, px, 3, workers=workers)
    tf = transforms.Compose([transforms.Resize(px), transforms.CenterCrop(px), transforms.PILToTensor()])
    wanted = set(files)
    folder = torchvision.datasets.ImageFolder(
        str(root / "images"), transform=tf, is_valid_file=lambda p: os.path.abspath(p) in wanted, allow_empty=True
    )
    loader = torch.utils.data.DataLoader(folder, batch_size=64, num_workers=workers, shuffle=False)

    def ours() -> int:
        return sum(len(x) for x in store.iter_chunks(64))

    def bare() -> int:
        return sum(len(x) for x, _ in loader)

    best = {"hvs": 0.0, "torchvision": 0.0}
    for _ in range(repeats):
        for name, fn in (("torchvision", bare), ("hvs", ours)):
            t0 = time.perf_counter()
            count = fn()
            rate = count / (time.perf_counter() - t0)
            assert count == n, (name, count, n)
            best[name] = max(best[name], rate)
    return {
        "px": px,
        "images": n,
        "workers": workers,
        "hvs_img_s": round(best["hvs"], 1),
        "torchvision_img_s": round(best["torchvision"], 1),
        "ratio": round(best["hvs"] / best["torchvision"], 3),
    }


def _child(kind: str, args: argparse.Namespace, manifest: Path, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--manifest", str(manifest), "--dir", str(args.dir)]
    cmd += ["--train-px", str(args.train_px), "--workers", str(args.workers), "--steps", str(args.steps)]
    cmd += ["--batch-size", str(args.batch_size)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/hvs-bench-data"), help="where the JPEGs are written")
    p.add_argument("--sizes", default="50000,200000", help="comma list of dataset sizes N")
    p.add_argument("--image-px", type=int, default=224, help="size of the generated JPEGs")
    p.add_argument("--train-px", type=int, default=64, help="training / index resolution")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="training steps per RSS measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--throughput-images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["train", "index"], help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child == "train":
        print(json.dumps(measure_train(args.manifest, args.train_px, args.workers, args.steps, args.batch_size)))
        return 0
    if args.child == "index":
        work = str(args.dir / f"index-{os.getpid()}")
        print(json.dumps(measure_index(args.manifest, args.train_px, args.workers, work)))
        return 0

    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.dir.mkdir(parents=True, exist_ok=True)
    rel = generate(args.dir, max(sizes), args.image_px, args.workers)
    rows = []
    for n in sizes:
        train_csv, gallery_csv = manifests(args.dir, rel, n)
        for kind, manifest in (("train", train_csv), ("index", gallery_csv)):
            row = {"kind": kind, "N": n, **_child(kind, args, manifest, n)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"peak RSS, data mode stream, {args.workers} workers, {args.image_px}px JPEGs read at {args.train_px}px")
    print(f"{'run':<7}{'N':>9}{'RSS MB':>9}{'worker MB':>11}{'in-memory MB':>14}{'list s':>8}{'run s':>8}")
    for r in rows:
        secs = r.get("train_s", r.get("build_s"))
        print(
            f"{r['kind']:<7}{r['N']:>9}{r['rss_mb']:>9.0f}{r['worker_rss_mb']:>11.0f}"
            f"{r['in_memory_mb']:>14.0f}{r['list_s']:>8.1f}{secs:>8.1f}"
        )
    for kind in ("train", "index"):
        lo = next(r for r in rows if r["kind"] == kind and r["N"] == sizes[0])
        hi = next(r for r in rows if r["kind"] == kind and r["N"] == sizes[-1])
        print(
            f"{kind}: RSS ratio N={sizes[-1]} / N={sizes[0]}: {hi['rss_mb'] / lo['rss_mb']:.2f} "
            f"(worker {hi['worker_rss_mb'] / lo['worker_rss_mb']:.2f}); goal ~1, absolute < 2048 MB"
        )
    print()
    for px in sorted({args.image_px, args.train_px}, reverse=True):
        t = measure_throughput(args.dir, rel, px, args.workers, min(args.throughput_images, len(rel)), args.repeats)
        print(
            f"loader throughput at {px}px, {args.workers} workers, {t['images']} images: hvs "
            f"{t['hvs_img_s']:.0f} img/s, torchvision ImageFolder+DataLoader {t['torchvision_img_s']:.0f} "
            f"img/s, ratio {t['ratio']:.2f} (goal >= 0.9)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
