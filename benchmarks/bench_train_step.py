"""Profile of the training step: hvs's trainer against a bare PyTorch loop over the same network.

    python benchmarks/bench_train_step.py                       # cnn-tiny, resnet8, ofa-mbv3 (min / max) at 32 px
    python benchmarks/bench_train_step.py --models resnet8 --batch-sizes 128,256,512 --steps 20

For each model, batch size and memory format, it times ``--steps`` steps (after ``--warmup``):

* **hvs**: the trainer's own pieces as ``hvs train`` runs them -- :class:`hvs.training.core.Batches`
  (uint8 images normalised and augmented per batch, the default ``crop,flip``) feeding the model
  task's step (embedding, margin-softmax head, backward) and the optimizer and scheduler;
* **bare**: the same network and head (its margin-softmax cross-entropy), SGD, over tensors made
  once (no normalisation, no augmentation, no bookkeeping): what the step costs with nothing around it.

* **compiled** (``--compile``): the bare loop with the network under ``torch.compile`` (inductor's
  generated C++ kernels on CPU: fused elementwise ops around the convolutions), compile time apart.

It prints images/s of both and their ratio (hvs / bare; 1.0 means the trainer adds nothing), so the
figure says where the time goes before any optimisation: in the network (both slow) or in what
surrounds it (hvs slower). Single process, CPU, ``torch.get_num_threads()`` threads (printed); on a
shared machine compare the two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from hvs.losses import MarginHead
from hvs.models import create_model
from hvs.training.core import Batches, parse_augment


def _model(name: str, in_chans: int, image_size: int, embed_dim: int) -> torch.nn.Module:
    if name.startswith("ofa-mbv3:"):  # ofa-mbv3:min / ofa-mbv3:max -- a sub-network of the default space
        from hvs.models.ofa import OFAMobileNetV3Supernet

        sn = OFAMobileNetV3Supernet(embed_dim=embed_dim, in_chans=in_chans)
        arch = sn.space.min_arch() if name.endswith("min") else sn.space.max_arch()
        sn.set_active_subnet(arch)
        return sn.get_active_subnet()
    return create_model(name, embed_dim=embed_dim, in_chans=in_chans)


def _time(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def measure(name: str, batch: int, channels_last: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    n_classes, c, s = args.classes, args.channels, args.image_size
    n = batch * (args.steps + args.warmup)
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8)
    targets = torch.randint(0, n_classes, (n,))

    def parts():
        model = _model(name, c, s, args.embed_dim)
        head = MarginHead(args.embed_dim, n_classes, "cosface", 16.0, 0.2)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        return model.train(), head.train(), opt

    # hvs: its batch iterator (normalise + augment per batch) and the step the model task runs
    model, head, opt = parts()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = Batches(images, targets, (0.5,) * c, (0.5,) * c, batch, parse_augment(args.augment), 0, channels_last)
    it = batches.epoch(0)

    def hvs_step():
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = head(model(x), y)  # the margin-softmax cross-entropy
        loss.backward()
        opt.step()
        sched.step()
        loss.item()  # the trainer reads the loss every step (its log and the finite check)

    t_hvs = _time(hvs_step, args.steps, args.warmup)

    # bare: tensors made once, the same network and head
    model, head, opt = parts()
    x = torch.randn(batch, c, s, s)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = targets[:batch]

    def bare_step():
        opt.zero_grad(set_to_none=True)
        head(model(x), y).backward()
        opt.step()

    t_bare = _time(bare_step, args.steps, args.warmup)
    ips_hvs, ips_bare = args.steps * batch / t_hvs, args.steps * batch / t_bare
    row = {
        "model": name,
        "batch": batch,
        "channels_last": channels_last,
        "hvs_images_per_s": round(ips_hvs, 1),
        "bare_images_per_s": round(ips_bare, 1),
        "ratio_hvs_over_bare": round(ips_hvs / ips_bare, 3),
    }
    if args.compile:  # the bare loop again, the network compiled (torch.compile, inductor's C++ CPU kernels)
        model, head, opt = parts()
        compiled = torch.compile(model)

        def compiled_step():
            opt.zero_grad(set_to_none=True)
            head(compiled(x), y).backward()
            opt.step()

        t0 = time.perf_counter()
        compiled_step()  # the compilation (forward and backward graphs)
        row["compile_seconds"] = round(time.perf_counter() - t0, 1)
        ips = args.steps * batch / _time(compiled_step, args.steps, args.warmup)
        row["compiled_images_per_s"] = round(ips, 1)
        row["ratio_compiled_over_bare"] = round(ips / ips_bare, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn-tiny,resnet8,ofa-mbv3:min,ofa-mbv3:max")
    p.add_argument("--batch-sizes", default="128,256")
    p.add_argument("--formats", default="channels_last,contiguous")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--augment", default="crop,flip")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument(
        "--compile", action="store_true", help="also time the bare loop with the network under torch.compile"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"# training step, {args.channels}x{args.image_size}px, {threads} threads, torch {torch.__version__}")
    more = " compiled img/s | compiled / bare | compile s |" if args.compile else ""
    print("| model | batch | memory format | hvs img/s | bare img/s | hvs / bare |" + more)
    print("|---|---|---|---|---|---|" + ("---|---|---|" if args.compile else ""))
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for fmt in args.formats.split(","):
                r = measure(name, batch, fmt == "channels_last", args)
                rows.append(r)
                print(
                    f"| {name} | {batch} | {fmt} | {r['hvs_images_per_s']:.0f} | {r['bare_images_per_s']:.0f} | "
                    f"{r['ratio_hvs_over_bare']:.2f} |"
                    + (
                        f" {r['compiled_images_per_s']:.0f} | {r['ratio_compiled_over_bare']:.2f} | "
                        f"{r['compile_seconds']:.1f} |"
                        if args.compile
                        else ""
                    ),
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
