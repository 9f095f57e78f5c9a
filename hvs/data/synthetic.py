"""Procedural retrieval data generated in memory: ``synthetic[:KEY=VAL,...]``.

For tests, demos and CI (open_clip keeps a synthetic dataset for the same reason): no files,
deterministic for a given seed, and well under a second at the defaults. It is built so that
*capacity matters*, which is what a heterogeneous (big gallery / small query model) search
experiment needs to show anything:

* every class is a random smooth pattern (its prototype) made of a shared component plus a
  class-specific one at a finer scale, so classes differ in mid-frequency detail;
* every sample is its prototype seen through nuisances a model must become invariant to: a
  random shift of a few pixels, a random smooth elastic warp, contrast/brightness jitter, a
  random smooth background pattern, and pixel noise.

``difficulty`` (0 easy … 1 hard, default 0.5) scales the warp, jitter, background and the share
of the prototype common to all classes; ``noise`` is the pixel noise std (default
``0.05 + 0.15 * difficulty``).

Keys: ``classes`` (total, default 10), ``train_per_class`` (64), ``test_per_class`` (16, split
half query / half gallery), ``size`` (32), ``channels`` (1), ``seed``, ``difficulty``,
``noise``, ``shift`` (max shift in pixels, default ``size // 8``). The same keys may be passed
as keyword arguments; ``image_size``/``channels``/``seed`` of :func:`create_dataset` apply when the
spec does not set them. Open protocol: a seeded half of the classes trains, the rest are searched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import DataError, RetrievalData, Split
from .images import channel_stats
from .registry import register_source
from .splits import check_nonempty, query_gallery_split, split_classes

DEFAULTS: dict[str, int | float | None] = {
    "classes": 10,
    "train_per_class": 64,
    "test_per_class": 16,
    "size": 32,
    "channels": 1,
    "seed": None,
    "difficulty": 0.5,
    "noise": None,
    "shift": None,
}
_INT_KEYS = {"classes", "train_per_class", "test_per_class", "size", "channels", "seed", "shift"}


def parse_options(arg: str | None) -> dict[str, int | float]:
    """``"classes=20,size=16"`` → ``{"classes": 20, "size": 16}`` (types from :data:`DEFAULTS`)."""
    opts: dict[str, int | float] = {}
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise DataError(
                f"synthetic: bad option {part.strip()!r}; expected KEY=VALUE with KEY in {', '.join(DEFAULTS)}"
            )
        try:
            opts[key] = int(val) if key in _INT_KEYS else float(val)
        except ValueError:
            kind = "an integer" if key in _INT_KEYS else "a number"
            raise DataError(f"synthetic: {key} must be {kind}, got {val.strip()!r}") from None
    return opts


def _smooth(g: torch.Generator, n: int, c: int, grid: int, size: int) -> torch.Tensor:
    """(n, c, size, size) smooth random fields: Gaussian noise on a ``grid`` x ``grid`` lattice,
    bicubically upsampled, standardised per field."""
    x = torch.randn(n, c, grid, grid, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def prototypes(g: torch.Generator, classes: int, channels: int, canvas: int, difficulty: float) -> torch.Tensor:
    """(classes, C, canvas, canvas) class patterns in [0, 1]."""
    shared = _smooth(g, 1, channels, 4, canvas)
    coarse = _smooth(g, classes, channels, 4, canvas)
    fine = _smooth(g, classes, channels, max(4, canvas // 5), canvas)
    # harder → more of the pattern is common to all classes, so the differences that remain are
    # the finer, class-specific ones
    common = 0.4 + 0.8 * difficulty
    field = common * shared + 0.6 * coarse + 0.8 * fine
    return torch.sigmoid(1.5 * field / field.std(dim=(-2, -1), keepdim=True))


def render(
    g: torch.Generator,
    protos: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    shift: int,
    difficulty: float,
    noise: float,
    chunk: int = 2048,
) -> torch.Tensor:
    """Samples of ``protos[labels]`` through shift, warp, photometric jitter and noise → uint8."""
    n, c, canvas = len(labels), protos.shape[1], protos.shape[-1]
    # every random draw is made up front in a fixed order, so results do not depend on ``chunk``
    offsets = torch.randint(-shift, shift + 1, (n, 1, 1, 2), generator=g).float()
    warp = _smooth(g, n, 2, 3, size).permute(0, 2, 3, 1) * (0.6 + 2.4 * difficulty) * size / 32
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * 0.6 * difficulty
    brightness = torch.randn(n, 1, 1, 1, generator=g) * 0.1 * difficulty
    background = _smooth(g, n, c, 3, size) * 0.25 * difficulty
    pixel_noise = torch.randn(n, c, size, size, generator=g) * noise

    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    base = torch.stack([xs, ys], dim=-1) + shift  # output pixel → canvas pixel, centred
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        pix = base + offsets[sl] + warp[sl]
        grid = (2 * pix + 1) / canvas - 1  # pixel centres → [-1, 1] (align_corners=False)
        x = F.grid_sample(protos[labels[sl]], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = (x - 0.5) * contrast[sl] + 0.5 + brightness[sl] + background[sl] + pixel_noise[sl]
        out[sl] = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return out


@register_source("synthetic", arg="KEY=VAL,...", help="procedural class patterns generated in memory (no files)")
def synthetic(
    arg: str | None,
    *,
    protocol: str = "closed",
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    seed: int = 0,
    **kwargs,
) -> RetrievalData:
    """Deterministic smooth-pattern classes with shift/warp/noise nuisances."""
    opts = dict(DEFAULTS)
    for key, val in kwargs.items():
        if key not in DEFAULTS:
            raise DataError(f"synthetic: unknown option {key!r}; valid: {', '.join(DEFAULTS)}")
        opts[key] = val
    spec_opts = parse_options(arg)
    for key, given in (("size", image_size), ("channels", channels)):
        if given is not None and key in spec_opts and spec_opts[key] != given:
            raise DataError(f"synthetic: {key}={spec_opts[key]} in the spec but {given} passed")
        if given is not None:
            opts[key] = given
    opts.update(spec_opts)
    if opts["seed"] is None:
        opts["seed"] = seed
    k, size, ch = int(opts["classes"]), int(opts["size"]), int(opts["channels"])
    n_train, n_test = int(opts["train_per_class"]), int(opts["test_per_class"])
    difficulty = float(opts["difficulty"])
    noise = 0.05 + 0.15 * difficulty if opts["noise"] is None else float(opts["noise"])
    shift = max(1, size // 8) if opts["shift"] is None else int(opts["shift"])
    if ch not in (1, 3):
        raise DataError(f"synthetic: channels must be 1 or 3, got {ch}")
    if size < 4 or k < 1 or n_train < 1 or n_test < 2 or shift < 0 or noise < 0 or difficulty < 0:
        raise DataError(
            f"synthetic: need size >= 4, classes >= 1, train_per_class >= 1, "
            f"test_per_class >= 2 and non-negative shift/noise/difficulty; got {opts}"
        )
    if protocol == "open" and k < 2:
        raise DataError("synthetic: the open protocol needs classes >= 2")

    g = torch.Generator().manual_seed(int(opts["seed"]))
    protos = prototypes(g, k, ch, size + 2 * shift, difficulty)
    if protocol == "open":
        train_cls, test_cls = split_classes(range(k), int(opts["seed"]))
    else:
        train_cls = test_cls = list(range(k))
    train_y = torch.tensor(train_cls).repeat_interleave(n_train)
    test_y = torch.tensor(test_cls).repeat_interleave(n_test)
    train_x = render(g, protos, train_y, size, shift, difficulty, noise)
    test_x = render(g, protos, test_y, size, shift, difficulty, noise)
    q, gal = query_gallery_split(test_y, int(opts["seed"]))

    name = "synthetic" if arg is None else f"synthetic:{arg}"
    train = Split(train_x, train_y, [f"synthetic:train:{i}" for i in range(len(train_y))], "train")
    query = Split(test_x[q], test_y[q], [f"synthetic:test:{i}" for i in q.tolist()], "query")
    gallery = Split(test_x[gal], test_y[gal], [f"synthetic:test:{i}" for i in gal.tolist()], "gallery")
    check_nonempty(name, train=train, query=query, gallery=gallery)
    mean, std = channel_stats(train.images)
    width = max(2, math.ceil(math.log10(max(k, 2))))
    classes = [f"pattern-{i:0{width}d}" for i in range(k)]
    return RetrievalData(name, train, query, gallery, classes, protocol, mean, std)
