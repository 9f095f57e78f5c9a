"""Search spaces on the device: ONNX Runtime batch-1 latency and FLOPs of members of each space.

    python benchmarks/bench_spaces.py [--sizes 32,28] [--threads 1] [--runtime ort]

At each input size (1 channel: kanji-fonts' 32 px and fashion-mnist's 28 px), for

* ``cnn-tiny`` (the registered plain CNN: the baseline every row is divided by) and the quick
  profile's paragon (configs/tradeoff_quick.yaml: ResNet-14 at width 2);
* ``ofa-mbv3`` with the quick profile's supernet shape and choices (the space CMP-NAS searched
  there): its smallest, a middle and its largest member;
* ``fast-cnn`` with its default shape and choices: the smallest in FLOPs (depthwise blocks), the
  smallest all-``plain`` member (the cheapest dense one), the all-``plain`` depth-1 member at
  width 0.5 (``cnn-tiny``'s widths, strided convs instead of max-pooling), a middle and the
  largest member;

it prints FLOPs (``hvs.models.cost.count_flops``, embedding neck included), the median latency
of the extracted static model (``hvs.nas.latency.module_latency``: exported to ONNX, one fixed
shape, ORT session with ``--threads`` intra-op threads), the GFLOP/s that makes, and the latency
ratio to ``cnn-tiny`` measured in the same run. The middle member takes every gene's middle
choice (:func:`middle_arch`). Latencies vary with the machine and its load; the ratios are the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from hvs.models import create_model  # noqa: E402
from hvs.models.cost import count_flops  # noqa: E402
from hvs.models.supernets import create_supernet  # noqa: E402
from hvs.nas.latency import module_latency  # noqa: E402


def middle_arch(space, genes) -> dict:
    """Every gene at its middle choice (index (len - 1) // 2 of the choices in cost order: of two
    choices, the cheaper -- SE off, relu)."""
    arch = space.max_arch()
    for gene in genes:
        values = space.choices(gene)
        pick = values[(len(values) - 1) // 2]
        arch[gene] = [pick] * len(arch[gene]) if isinstance(arch[gene], list) else pick
    return arch


def members(profile: dict, embed_dim: int, size: int) -> list[tuple[str, torch.nn.Module]]:
    out = [
        ("cnn-tiny", create_model("cnn-tiny", embed_dim=embed_dim, image_size=size)),
        (
            f"paragon {profile['paragon']['model']}",
            create_model(
                profile["paragon"]["model"], embed_dim=embed_dim, image_size=size, **profile["paragon"]["model_kwargs"]
            ),
        ),
    ]
    ofa_kwargs = {k: v for k, v in profile["supernet"]["supernet"].items()}
    ofa = create_supernet("ofa-mbv3", embed_dim=embed_dim, **ofa_kwargs).eval()
    fast = create_supernet("fast-cnn", embed_dim=embed_dim).eval()
    n = fast.space.num_stages
    plain_min = {**fast.min_arch(), "b": ["plain"] * n}
    plain_half = {**plain_min, "w": [0.5] * n}  # stem 8, stages 16 / 32 / 64: cnn-tiny's widths
    for name, net, archs in (
        (
            "ofa-mbv3",
            ofa,
            [("min", ofa.min_arch()), ("mid", middle_arch(ofa.space, ("ks", "e", "d"))), ("max", ofa.max_arch())],
        ),
        (
            "fast-cnn",
            fast,
            [
                ("min", fast.min_arch()),
                ("min plain", plain_min),
                ("plain w0.5", plain_half),
                ("mid", middle_arch(fast.space, ("b", "d", "e", "w", "se", "act"))),
                ("max", fast.max_arch()),
            ],
        ),
    ):
        for label, arch in archs:
            net.set_active_subnet(arch)
            out.append((f"{name} {label} [{net.space.key(arch)}]", net.get_active_subnet().eval()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,28")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtime", default="ort", choices=["ort", "ort-int8", "torch"])
    p.add_argument("--profile", default=str(ROOT / "configs" / "tradeoff_quick.yaml"))
    p.add_argument("--min-seconds", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    profile = yaml.safe_load(Path(args.profile).read_text())
    embed_dim = int(profile.get("embed_dim", 128))
    for size in (int(s) for s in args.sizes.split(",")):
        shape = (1, size, size)
        print(f"\n{size} px, 1 channel, batch 1, {args.runtime}, {args.threads} thread(s), embed_dim {embed_dim}")
        print(f"{'model':<78}{'MFLOPs':>9}{'ms':>9}{'GFLOP/s':>9}{'x tiny':>8}")
        base = None
        for name, model in members(profile, embed_dim, size):
            torch.manual_seed(0)
            flops = count_flops(model, shape)
            ms = module_latency(model, shape, 1, args.runtime, warmup=20, repeats=200, min_seconds=args.min_seconds)
            base = ms if base is None else base
            print(f"{name[:77]:<78}{flops / 1e6:>9.3f}{ms:>9.4f}{flops / ms / 1e6:>9.1f}{ms / base:>8.2f}")


if __name__ == "__main__":
    main()
