"""Deterministic train / query / gallery splits shared by the readers.

Two protocols (the usual ones in compatible-representation work, e.g. BCT, Shen et al. 2020):

* ``closed``: query and gallery hold *new images* of the classes seen in training — per class,
  a seeded shuffle gives 60 % train, 20 % query, 20 % gallery (:func:`closed_split`).
* ``open``: query and gallery hold *classes never seen* in training — a seeded half of the
  classes trains, the other half is split per class into query and gallery (:func:`open_split`).

Every function takes the integer labels of the decoded items and returns index tensors, so that
an unreadable file (dropped before splitting) never leaves a class without training images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .base import SPLITS, DataError, RetrievalData, Split, take
from .images import channel_stats

PROTOCOLS = ("closed", "open")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def _by_class(labels: torch.Tensor) -> dict[int, np.ndarray]:
    lab = labels.numpy()
    return {int(c): np.flatnonzero(lab == c) for c in np.unique(lab)}


def _idx(parts: list[np.ndarray]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.sort(np.concatenate(parts))).long()


def closed_split(
    labels: torch.Tensor, seed: int = 0, query: float = 0.2, gallery: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: shuffle (seeded), then ``query`` / ``gallery`` fractions, the rest trains.

    A class with n images gives ``max(1, round(query * n))`` queries and as many gallery items
    (rounded half up), and the rest to train — so every class with >= 3 images appears in all
    three splits. Smaller classes: 2 images → 1 train + 1 gallery (a query without a positive in
    the gallery would only measure nothing); 1 image → train only.
    """
    rng = np.random.default_rng(seed)
    train, qry, gal = [], [], []
    for _, idx in sorted(_by_class(labels).items()):
        idx = rng.permutation(idx)
        n = len(idx)
        if n >= 3:
            n_q = max(1, math.floor(query * n + 0.5))
            n_g = max(1, math.floor(gallery * n + 0.5))
            n_q, n_g = min(n_q, n - 2), min(n_g, n - 2)  # keep >= 1 for training
            n_g = min(n_g, n - 1 - n_q)
        elif n == 2:
            n_q, n_g = 0, 1
        else:
            n_q, n_g = 0, 0
        qry.append(idx[:n_q])
        gal.append(idx[n_q : n_q + n_g])
        train.append(idx[n_q + n_g :])
    return _idx(train), _idx(qry), _idx(gal)


def query_gallery_split(labels: torch.Tensor, seed: int = 0, query: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: shuffle (seeded), ``floor(query * n)`` items → query, the rest → gallery.

    The gallery gets the odd item, and a class with a single item is a gallery distractor.
    """
    rng = np.random.default_rng(seed)
    qry, gal = [], []
    for _, idx in sorted(_by_class(labels).items()):
        idx = rng.permutation(idx)
        n_q = math.floor(query * len(idx))
        qry.append(idx[:n_q])
        gal.append(idx[n_q:])
    return _idx(qry), _idx(gal)


def split_classes(class_ids: Sequence[int], seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded permutation of the classes; the first ``ceil(K / 2)`` train, the rest test."""
    ids = sorted(int(c) for c in class_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_train = math.ceil(len(ids) / 2)
    return sorted(ids[i] for i in perm[:n_train]), sorted(ids[i] for i in perm[n_train:])


def open_split(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded half of the classes (the larger half for odd counts) → train; each remaining
    class → half query / half gallery (:func:`query_gallery_split`)."""
    present = sorted(_by_class(labels))
    if len(present) < 2:
        raise DataError(f"open protocol needs at least 2 classes (disjoint train and test classes), got {len(present)}")
    train_cls, test_cls = split_classes(present, seed)
    lab = labels.numpy()
    train = np.flatnonzero(np.isin(lab, train_cls))
    test = np.flatnonzero(np.isin(lab, test_cls))
    q, g = query_gallery_split(labels[torch.from_numpy(test)], seed)
    return (
        torch.from_numpy(train).long(),
        torch.from_numpy(test[q.numpy()]).long(),
        torch.from_numpy(test[g.numpy()]).long(),
    )


def split_by_protocol(
    labels: torch.Tensor, protocol: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, query, gallery) indices for ``protocol`` ("closed" or "open")."""
    if check_protocol(protocol) == "closed":
        return closed_split(labels, seed)
    return open_split(labels, seed)


def make_split(
    images: torch.Tensor, labels: torch.Tensor, sources: list[str] | None, index: torch.Tensor, role: str
) -> Split:
    index = torch.as_tensor(index, dtype=torch.long)
    src = None if sources is None else [sources[i] for i in index.tolist()]
    return Split(take(images, index), labels[index], src, role)


def build(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    sources: list[str] | None,
    classes: list[str],
    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    protocol: str,
    skipped: list[str] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    splits: Sequence[str] | None = None,
) -> RetrievalData:
    """Assemble a :class:`RetrievalData` from one pool of items and three index tensors.

    ``splits``: the roles to keep (default all); the others are left ``None``. Mean/std default
    to the exact per-channel statistics of the training images (``()`` without a train split).
    """
    keep = set(SPLITS if splits is None else splits)
    parts = {
        role: make_split(images, labels, sources, ix, role) if role in keep else None for ix, role in zip(index, SPLITS)
    }
    check_nonempty(name, **parts)
    if mean is None or std is None:
        mean, std = channel_stats(parts["train"].images) if parts["train"] is not None else ((), ())
    return RetrievalData(
        name,
        parts["train"],
        parts["query"],
        parts["gallery"],
        list(classes),
        protocol,
        tuple(mean),
        tuple(std),
        list(skipped or []),
    )


def check_nonempty(name: str, **splits: Split | None) -> None:
    """Refuse an empty split (``None``, a split not loaded, is not checked)."""
    for role, split in splits.items():
        if split is not None and len(split) == 0:
            raise DataError(f"{name}: the {role} split is empty (too few readable images or classes for this protocol)")
