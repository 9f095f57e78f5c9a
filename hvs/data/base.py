"""The one dataset interface every data source yields.

Images are ``uint8`` tensors of shape (N, C, H, W) kept in memory: on a 2-core CPU, decoding
and DataLoader workers would compete with training for the same cores, so small sources decode
(and resize/crop) once at load time and the trainer slices tensors. File sources too large for
that hold an :class:`~hvs.data.store.ImageStore` instead, with the same indexing surface, whose
images are decoded on demand by DataLoader workers (see :mod:`hvs.data.store`).

A dataset may be created with only some of its splits (``create_dataset(..., splits=("gallery",))``,
what building an index needs): the others are ``None`` and :meth:`RetrievalData.split` refuses
them by name, so nothing silently works on a split that was never decoded.

Labels index into ``RetrievalData.classes``, one global list of class (identity) names shared by
all three splits, so that a query model trained on one dataset can be matched row by row to the
classifier of a gallery model trained on another (BCT needs this to know which classes the gallery
has seen).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import HVSError, HVSWarning

SPLITS = ("train", "query", "gallery")


class DataError(HVSError):
    """Bad input data: the message is one line that names the problem."""


class DataWarning(HVSWarning):
    """Something in a dataset deserves attention (items skipped, leaked, empty class folders)."""


def is_store(images) -> bool:
    """True for a lazy image store (:class:`hvs.data.store.ImageStore`), False for a tensor."""
    return not isinstance(images, torch.Tensor) and hasattr(images, "subset") and hasattr(images, "batches")


def take(images, index):
    """``images[index]`` that stays lazy for an image store (a view, nothing decoded) and
    indexes a tensor otherwise."""
    if is_store(images):
        return images.subset(index)
    return images[index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)]


def data_warning(message: str) -> None:
    """Issue ``message`` (one line) as a :class:`DataWarning`."""
    warnings.warn(message, DataWarning, stacklevel=2)


@dataclass
class Split:
    """One role of a retrieval dataset: ``train``, ``query`` or ``gallery``."""

    images: torch.Tensor  # uint8, (N, C, H, W), or an hvs.data.store.ImageStore standing for one
    labels: torch.Tensor  # int64, (N,), indices into RetrievalData.classes
    sources: list[str] | None = None  # provenance per item (file path, "fashion-mnist:test:17", ...)
    role: str = "train"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.role} images must be a uint8 (N, C, H, W) tensor, got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.role}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.sources is not None and len(self.sources) != len(self.labels):
            raise DataError(f"{self.role}: {len(self.labels)} items but {len(self.sources)} sources")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """(float image in [0, 1], label): the map-style Dataset view of the split."""
        return self.images[i].float().div_(255.0), int(self.labels[i])

    def subset(self, index: torch.Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        sources = None if self.sources is None else [self.sources[i] for i in index.tolist()]
        return Split(take(self.images, index), self.labels[index], sources, self.role)

    @property
    def streamed(self) -> bool:
        """True when the images are decoded on demand from files (an ImageStore)."""
        return not isinstance(self.images, torch.Tensor)


@dataclass
class RetrievalData:
    """A retrieval dataset: train / query / gallery splits plus what a model needs to read it."""

    name: str  # the spec it was created from, e.g. "fashion-mnist" or "csv:/data/m.csv"
    train: Split | None  # None: not loaded (create_dataset(..., splits=...))
    query: Split | None
    gallery: Split | None
    classes: list[str]  # global class names; labels of every split index into this list
    protocol: str = "closed"  # "closed": test classes seen in training; "open": disjoint
    # per-channel statistics of the training images; () when the train split is not loaded
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    skipped: list[str] = field(default_factory=list)  # "path: reason" for unreadable items
    duplicates: list[str] = field(default_factory=list)  # one line per leak found (hvs.data.checks)

    @property
    def loaded(self) -> tuple[str, ...]:
        """The roles whose split was decoded, in ``SPLITS`` order."""
        return tuple(role for role in SPLITS if getattr(self, role) is not None)

    def _first(self) -> Split:
        for role in SPLITS:
            if getattr(self, role) is not None:
                return getattr(self, role)
        raise DataError(f"{self.name}: no split loaded")

    @property
    def channels(self) -> int:
        return int(self._first().images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self._first().images.shape[-1])

    def split(self, role: str) -> Split:
        if role not in SPLITS:
            raise DataError(f"unknown split {role!r}; expected one of {', '.join(SPLITS)}")
        part = getattr(self, role)
        if part is None:
            raise DataError(
                f"{self.name}: the {role} split was not loaded (loaded: "
                f"{', '.join(self.loaded) or 'none'}); create the dataset with it in splits="
            )
        return part

    def summary(self) -> str:
        parts = []
        for role in SPLITS:
            part = getattr(self, role)
            if part is None:
                parts.append(f"{role} not loaded")
            elif role == "train":
                n_classes = int(part.labels.unique().numel()) if len(part) else 0
                parts.append(f"train {len(part)} ({n_classes} classes)")
            else:
                parts.append(f"{role} {len(part)}")
        return (
            f"{self.name} [{self.protocol}-set] {', '.join(parts)}, "
            f"{self.channels}x{self.image_size}x{self.image_size}"
            + (f", skipped {len(self.skipped)} unreadable" if self.skipped else "")
        )
