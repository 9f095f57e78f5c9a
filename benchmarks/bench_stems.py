"""FLOPs of every registered model at 224 px against the library's standard architecture.

    python benchmarks/bench_stems.py [--image-size 224] [--channels 3]

For each registered model: backbone FLOPs (2 x multiply-adds, ``hvs.models.cost`` on the meta
device: shapes only, no arithmetic) with the small-input stem every size got before the stem
rule, with the stem the rule gives now at this size, and of the counterpart built straight from
timm / torchvision (classifier removed; the embedding head is not counted on either side).
``now/lib`` is the figure the rule fixes (1.00 = the library's cost); ``before/lib`` is what
``hvs models --image-size 224`` used to list. Models without a counterpart (hvs's own CIFAR
ResNets, plain CNNs, the OFA space) show their two stems only. torchvision / timm tables list
multiply-adds ("GFLOPS 4.09" for resnet50 = 8.2 GFLOPs here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch import nn  # noqa: E402

from hvs.models import create_model, list_models, model_entry, resolve_model_kwargs  # noqa: E402
from hvs.models.cost import meta_flops  # noqa: E402


def library_backbone(counterpart: str, in_chans: int) -> nn.Module:
    lib, _, arch = counterpart.partition(":")
    if lib == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    net.fc = nn.Identity()
    if in_chans != 3:
        raise SystemExit("torchvision counterparts are counted at 3 channels only")
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    args = p.parse_args()
    shape = (args.channels, args.image_size, args.image_size)

    def gflops(build) -> float:
        return meta_flops(build, shape) / 1e9

    print(f"backbone GFLOPs (2 x multiply-adds) at {shape}")
    head = f"{'model':<19}{'stem now':<10}{'before':>9}{'now':>9}{'library':>9}{'now/lib':>9}{'before/lib':>11}"
    print(f"{head}  counterpart")
    for name in list_models():
        entry = model_entry(name)
        stem = resolve_model_kwargs(name, args.image_size).get("stem", "-")
        before = gflops(lambda n=name: create_model(n, in_chans=args.channels, stem="small").backbone)
        now = gflops(lambda n=name: create_model(n, in_chans=args.channels, image_size=args.image_size).backbone)
        if entry.counterpart:
            lib = gflops(lambda c=entry.counterpart: library_backbone(c, args.channels))
            tail = f"{lib:>9.3f}{now / lib:>9.2f}{before / lib:>11.2f}  {entry.counterpart}"
        else:
            tail = f"{'-':>9}{'-':>9}{'-':>11}  none (hvs's own architecture)"
        print(f"{name:<19}{stem:<10}{before:>9.3f}{now:>9.3f}{tail}")


if __name__ == "__main__":
    main()
