"""Backbones: ResNet gallery models, the off-the-shelf query models, any timm / torchvision net.

Every backbone maps (N, C, H, W) to pooled features (N, num_features); `EmbeddingModel` adds the
embedding head. ImageNet architectures downsample 32x, which leaves nothing of a 28 px image, so
at small sizes each registered one loses one stride-2 step at the stem (``stem="small"``, total
stride 16: the layout the CMP-NAS paper's query models keep at their own input size, scaled
down); ``stem="standard"`` is the library's architecture as it is. Which one a model gets is
the registry's stem rule (:mod:`hvs.models._registry`). Weights are always random: nothing is
downloaded (``pretrained=False`` everywhere; local weights files load through
:mod:`hvs.models.pretrained`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3, stride), _conv_bn(cout, cout, 3, 1, act=False))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) in the CIFAR layout (He et al. 2016, sec. 4.2): 3 stages, stride-1 stem.

    ``width`` scales the stage widths (16, 32, 64); ResNet-8 at width 1.5 (24/48/96 channels) is
    the ~42 MFLOPs paragon that trains at ~420 img/s on 2 CPU cores. ``stem="standard"`` (large
    inputs) puts the ImageNet ResNet stem in front (7x7 stride-2 conv, 3x3 stride-2 max-pool):
    hvs's own layout, there is no library counterpart.
    """

    def __init__(self, depth: int = 8, width: float = 1.0, in_chans: int = 1, stem: str = "small") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(8, int(round(w * width))) for w in (16, 32, 64)]
        layers: list[nn.Module] = (
            [_conv_bn(in_chans, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1)]
            if stem == "standard"
            else [_conv_bn(in_chans, widths[0])]
        )
        cin = widths[0]
        for stage, cout in enumerate(widths):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class TorchvisionResNet(nn.Module):
    """torchvision ResNet-18/34/50; ``stem="small"``: a 3x3 stride-1 conv before the max-pool
    (total stride 16 instead of 32), ``"standard"``: torchvision's 7x7 stride-2 conv. For width
    scaling use the CIFAR-layout ResNets. Keys under ``net.`` are torchvision's (and timm's)."""

    def __init__(self, arch: str = "resnet18", in_chans: int = 1, stem: str = "small") -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if stem == "standard":
            net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, 7, 2, 3, bias=False)
        else:
            net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, 3, 1, 1, bias=False)
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlainCNN(nn.Module):
    """A plain conv-BN-ReLU stack with max-pooling: the hand-picked tiny query net baseline.
    ``stem="standard"`` (large inputs): the first conv has stride 2 and a 3x3 stride-2 max-pool
    follows it (4x fewer rows and columns, as an ImageNet stem); hvs's own, no library counterpart."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), in_chans: int = 1, stem: str = "small") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i, cout in enumerate(widths):
            layers.append(_conv_bn(cin, cout, 3, 2 if (i == 0 and stem == "standard") else 1))
            if i == 0 and stem == "standard":
                layers.append(nn.MaxPool2d(3, 2, 1))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class TimmBackbone(nn.Module):
    """A timm architecture (random init, no classifier: ``num_classes=0``); ``stem="small"``
    reduces the stride of its ``conv_stem`` from 2 to 1. Keys under ``net.`` are timm's."""

    def __init__(self, arch: str, in_chans: int = 1, stem: str = "standard", **kwargs) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        if stem == "small":
            conv_stem = getattr(self.net, "conv_stem", None)
            if not isinstance(conv_stem, nn.Conv2d):
                raise ConfigError(f"timm {arch} has no conv_stem: it has no small-input stem")
            conv_stem.stride = (1, 1)
        # MobileNetV3 has a conv head after pooling: its output width is head_hidden_size.
        self.num_features = getattr(self.net, "head_hidden_size", None) or self.net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ShuffleNetV2(nn.Module):
    """torchvision ShuffleNetV2 (random init); ``stem="small"``: a stride-1 first conv (the
    max-pool stays), ``"standard"``: torchvision's stride 2. Keys under ``net.`` are torchvision's."""

    def __init__(self, width: str = "x1_0", in_chans: int = 1, stem: str = "small") -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, f"shufflenet_v2_{width}")(weights=None)
        first = net.conv1[0]
        stride = 2 if stem == "standard" else 1
        net.conv1[0] = nn.Conv2d(in_chans, first.out_channels, 3, stride, 1, bias=False)
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchvisionBackbone(nn.Module):
    """Any torchvision classification architecture (random init) as a backbone: its last
    ``nn.Linear`` (the classifier) becomes the identity, so the output is the features it reads,
    and with ``in_chans`` != 3 its first conv takes that many channels. Keys under ``net.`` are
    torchvision's, so a torchvision state dict loads as it is."""

    def __init__(self, arch: str, in_chans: int = 1, **kwargs) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.get_model(arch, weights=None, **kwargs)
        linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"torchvision {arch} has no linear classifier to take features from")
        last = net.get_submodule(linears[-1])
        self.num_features = last.in_features
        _replace(net, linears[-1], nn.Identity())
        if in_chans != 3:
            convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ConfigError(f"torchvision {arch} has no first conv to take {in_chans} channels")
            c = net.get_submodule(convs[0])
            _replace(
                net,
                convs[0],
                nn.Conv2d(
                    in_chans, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, 1, c.bias is not None
                ),
            )
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
