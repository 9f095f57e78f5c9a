"""The latency table against end-to-end measurement: rank correlation and ratio, per space.

    python benchmarks/bench_latency_table.py [--runtime ort] [--threads 2] [--archs 12] [--size 28]

For each search space with the shape the trade-off profiles search (``fast-cnn`` from
configs/tradeoff_quick-fast.yaml, ``ofa-mbv3`` from configs/tradeoff_quick.yaml; 1 channel,
``--size`` px), it takes the smallest, the largest and ``--archs`` random members, and prints for
each the table's prediction (:class:`hvs.nas.latency.LatencyTable`), the plain sum of its units
(what the table predicted before it counted one call per network), and the extracted
sub-network's measured batch-1 latency in the same runtime (the mean of two
:func:`hvs.nas.latency.measure_subnet_latency` runs). The summary line per space gives Spearman's
rank correlation and the median and range of predicted / measured for both predictions
(:func:`hvs.nas.latency.latency_agreement`). Timings move with the machine and its load; the
ratios are the figure.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from hvs.models.supernets import create_supernet  # noqa: E402
from hvs.nas.latency import LatencyTable, latency_agreement, latency_units, measure_subnet_latency  # noqa: E402

SPACES = {
    "fast-cnn": ("fast-cnn", ROOT / "configs" / "tradeoff_quick-fast.yaml"),
    "ofa-mbv3": ("ofa-mbv3", ROOT / "configs" / "tradeoff_quick.yaml"),
}


def supernet_for(space: str) -> torch.nn.Module:
    name, profile = SPACES[space]
    shape = yaml.safe_load(profile.read_text())["supernet"]["supernet"]
    torch.manual_seed(0)
    return create_supernet(name, embed_dim=128, in_chans=1, **shape).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", default="ort", choices=["ort", "ort-int8", "torch"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--archs", type=int, default=12, help="random members per space, besides the smallest and largest")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--spaces", default="fast-cnn,ofa-mbv3")
    p.add_argument("--min-seconds", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"runtime {args.runtime}, {args.threads} threads, batch 1, {args.size} px, torch {torch.__version__}")
    for space in args.spaces.split(","):
        net = supernet_for(space)
        rng = random.Random(args.seed)
        archs = [net.min_arch(), net.max_arch()] + [net.space.sample(rng) for _ in range(args.archs)]
        table = LatencyTable(net, args.size, None, runtime=args.runtime, min_seconds=0.1, repeats=20)
        rows, sums = [], []
        print(f"\n{space}: call {table.call_ms():.4f} ms")
        print(f"{'units':>5} {'table ms':>9} {'sum ms':>8} {'measured':>9} {'table/meas':>10} {'sum/meas':>8}")
        for arch in archs:
            units = latency_units(net, arch, args.size)
            predicted, plain = table.predict(arch), sum(table.unit_latency(u) for u in units)
            measured = (
                sum(
                    measure_subnet_latency(net, arch, args.size, 1, args.min_seconds, runtime=args.runtime)
                    for _ in range(2)
                )
                / 2
            )
            rows.append({"predicted_ms": predicted, "measured_ms": measured})
            sums.append({"predicted_ms": plain, "measured_ms": measured})
            print(
                f"{len(units):>5} {predicted:>9.4f} {plain:>8.4f} {measured:>9.4f} "
                f"{predicted / measured:>10.2f} {plain / measured:>8.2f}"
            )
        for name, got in (("table", latency_agreement(rows)), ("plain sum", latency_agreement(sums))):
            print(
                f"{space} {name}: spearman {got['spearman']}, predicted/measured median {got['ratio_median']} "
                f"(range {got['ratio_range'][0]}-{got['ratio_range'][1]}), n={got['n']}"
            )


if __name__ == "__main__":
    main()
