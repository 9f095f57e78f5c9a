"""Training augmentations named by a spec, built from ``torchvision.transforms.v2``.

A spec is a comma list of names, each optionally with one number (``NAME=VALUE``)::

    crop,flip                  the default: translate by up to 2 px, horizontal flip
    rrc,flip,jitter,erase      few-shot recipe: random resized crop, colour jitter, random erasing
    trivial,flip  /  randaugment=12,flip
    none                       no augmentation

=================  ====================================================================  ========
name               what it does (VALUE)                                                  default
=================  ====================================================================  ========
``crop``           random translation by up to VALUE px, zero padding after              2
                   normalisation (the training mean colour); hvs's own, batched
``flip``           horizontal flip with probability VALUE                                 0.5
``rrc``            ``RandomResizedCrop`` back to the image size, area scale (VALUE, 1)    0.25
``jitter``         ``ColorJitter`` brightness/contrast/saturation VALUE, hue VALUE/4      0.4
``trivial``        ``TrivialAugmentWide`` (no parameter)
``randaugment``    ``RandAugment`` with 2 ops of magnitude VALUE (0-30)                    9
``erase``          ``RandomErasing`` with probability VALUE, after normalisation (zeros)  0.25
=================  ====================================================================  ========

Whatever the order in the spec, a batch goes through the pixel operations (``rrc``, ``jitter``,
``trivial``, ``randaugment``: per image, on ``uint8``), then normalisation, then ``crop`` and
``flip`` (whole batch) and ``erase`` (per image). :attr:`Augment.spec` is that canonical form,
which a run records in its config and model card.

Everything random in a batch follows from one integer seed (the trainer derives it from the
run's seed, the epoch, the step and the rank): torchvision's transforms draw from torch's global
generator, which is forked and seeded around them, so a batch is the same wherever it is
computed (in this process for images in memory, in a DataLoader worker for streamed ones) and a
resumed run replays what an uninterrupted one would have done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.images import to_float
from ..errors import HVSError


@dataclass(frozen=True)
class AugmentInfo:
    name: str
    stage: str  # "pixel" (uint8, per image), "batch" (normalised batch), "erase" (normalised, per image)
    default: float | None  # the VALUE when none is given; None: the augmentation takes none
    help: str


_AUGMENTS = {
    a.name: a
    for a in (
        AugmentInfo("rrc", "pixel", 0.25, "RandomResizedCrop back to the image size, area scale (VALUE, 1)"),
        AugmentInfo("jitter", "pixel", 0.4, "ColorJitter brightness/contrast/saturation VALUE, hue VALUE/4"),
        AugmentInfo("trivial", "pixel", None, "TrivialAugmentWide"),
        AugmentInfo("randaugment", "pixel", 9, "RandAugment, 2 ops of magnitude VALUE"),
        AugmentInfo("crop", "batch", 2, "random translation by up to VALUE px (zero padding after normalisation)"),
        AugmentInfo("flip", "batch", 0.5, "horizontal flip with probability VALUE"),
        AugmentInfo("erase", "erase", 0.25, "RandomErasing with probability VALUE (after normalisation)"),
    )
}
ORDER = tuple(_AUGMENTS)  # the order a batch goes through them


def list_augments() -> list[str]:
    """The augmentation names a spec may use, in the order they are applied."""
    return list(ORDER)


def translate_flip(x: torch.Tensor, kinds, gen: torch.Generator, pad: int = 2, p_flip: float = 0.5) -> torch.Tensor:
    """Random translation by up to ``pad`` px (zero padding) and horizontal flip, per sample,
    of a float (N, C, H, W) batch; ``kinds`` holds ``"crop"`` and/or ``"flip"``."""
    n, c, h, w = x.shape
    if "crop" in kinds and pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
        bi = torch.arange(n)[:, None, None, None]
        ci = torch.arange(c)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if "flip" in kinds:
        flip = torch.rand(n, generator=gen) < p_flip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class Augment:
    """A parsed augmentation spec; ``augment(uint8_batch, mean, std, seed)`` is the normalised,
    augmented float batch. Picklable (it travels to DataLoader workers). Empty (falsy) for
    ``none``; ``"crop" in augment`` says whether a name is in it."""

    def __init__(self, values: dict[str, float | None]) -> None:
        self.values = {name: values[name] for name in ORDER if name in values}
        self._pixel: dict[tuple[int, int], Callable] = {}  # built per image shape, on first use

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    @property
    def spec(self) -> str:
        """The canonical spec: names in application order, values that differ from the default."""
        if not self.values:
            return "none"
        parts = []
        for name, value in self.values.items():
            default = _AUGMENTS[name].default
            parts.append(name if value is None or value == default else f"{name}={value:g}")
        return ",".join(parts)

    def __bool__(self) -> bool:
        return bool(self.values)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __iter__(self):
        return iter(self.values)

    def __repr__(self) -> str:
        return f"Augment({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Augment):
            return self.values == other.values
        if isinstance(other, (set, frozenset)):
            return set(self.values) == other
        return NotImplemented

    def __getstate__(self) -> dict:
        return {"values": self.values}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["values"])

    def _value(self, name: str) -> float:
        value = self.values[name]
        return float(_AUGMENTS[name].default if value is None else value)

    def _pixel_ops(self, h: int, w: int) -> Callable | None:
        names = [n for n in self.values if _AUGMENTS[n].stage == "pixel"]
        if not names:
            return None
        if (h, w) not in self._pixel:
            from torchvision.transforms import v2

            ops = []
            for name in names:
                v = self._value(name) if _AUGMENTS[name].default is not None else None
                if name == "rrc":
                    ops.append(v2.RandomResizedCrop((h, w), scale=(v, 1.0), antialias=True))
                elif name == "jitter":
                    ops.append(v2.ColorJitter(brightness=v, contrast=v, saturation=v, hue=min(0.5, v / 4)))
                elif name == "trivial":
                    ops.append(v2.TrivialAugmentWide())
                elif name == "randaugment":
                    ops.append(v2.RandAugment(num_ops=2, magnitude=int(v)))
            self._pixel[h, w] = v2.Compose(ops)
        return self._pixel[h, w]

    def __call__(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
        pixel = self._pixel_ops(images.shape[-2], images.shape[-1])
        if pixel is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(1 << 62, (1,), generator=gen)))
                images = torch.stack([pixel(img) for img in images])
        x = to_float(images, mean, std)
        kinds = {n for n in ("crop", "flip") if n in self.values}
        if kinds:
            pad = int(self._value("crop")) if "crop" in kinds else 0
            x = translate_flip(x, kinds, gen, pad=pad, p_flip=self._value("flip") if "flip" in kinds else 0.5)
        if "erase" in self.values:
            from torchvision.transforms import v2

            erase = v2.RandomErasing(p=self._value("erase"), value=0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(1 << 62, (1,), generator=gen)))
                x = torch.stack([erase(img) for img in x])
        return x


def create_augment(spec: str | Augment | set | frozenset | None, error: type[HVSError] = HVSError) -> Augment:
    """Parse ``spec`` (``"crop,flip"``, ``"rrc=0.5,flip,erase"``, ``"none"``; a set of names, or
    an :class:`Augment`, passes through). A bad name or value raises ``error`` with one line
    listing the valid names."""
    if isinstance(spec, Augment):
        return spec
    if spec is None:
        return Augment({})
    if isinstance(spec, (set, frozenset, list, tuple)):
        spec = ",".join(spec)
    if not isinstance(spec, str):
        raise error(f"augmentation spec must be a string like 'crop,flip', got {type(spec).__name__}")
    values: dict[str, float | None] = {}
    valid = f"valid: {', '.join(ORDER)}, none (NAME or NAME=VALUE, comma-separated)"
    for part in (p.strip() for p in spec.split(",")):
        if not part or part == "none":
            continue
        name, sep, raw = part.partition("=")
        name = name.strip().lower()
        if name not in _AUGMENTS:
            raise error(f"unknown augmentation {name!r} in {spec!r}; {valid}")
        info = _AUGMENTS[name]
        if not sep:
            values[name] = None
            continue
        if info.default is None:
            raise error(f"augmentation {name!r} takes no value, got {part!r}")
        try:
            value = float(raw)
        except ValueError:
            raise error(f"augmentation {name!r} needs a number after '=', got {part!r}") from None
        _check_value(name, value, part, error)
        values[name] = value
    return Augment(values)


def _check_value(name: str, value: float, part: str, error: type[HVSError]) -> None:
    ok = {
        "crop": value >= 0 and value == int(value),
        "flip": 0 <= value <= 1,
        "rrc": 0 < value <= 1,
        "jitter": 0 <= value <= 2,
        "randaugment": 0 <= value <= 30 and value == int(value),
        "erase": 0 <= value <= 1,
    }[name]
    if not ok:
        rule = {
            "crop": "a whole number of pixels >= 0",
            "flip": "a probability in [0, 1]",
            "rrc": "a minimum area fraction in (0, 1]",
            "jitter": "a strength in [0, 2]",
            "randaugment": "a whole magnitude in [0, 30]",
            "erase": "a probability in [0, 1]",
        }[name]
        raise error(f"augmentation {part!r}: {name} needs {rule}")


__all__ = ["Augment", "create_augment", "list_augments", "translate_flip"]
