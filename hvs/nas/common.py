"""Pieces shared by supernet training, search and export: the supernet folder, the validation
split carved from the training classes, BatchNorm re-calibration.

A supernet folder (written by :func:`hvs.nas.train.train_supernet`)::

    config.json            SupernetCard: how to rebuild the supernet, preprocessing, classes,
                           the gallery model it was trained against, epochs done, fingerprint
    supernet.safetensors   the supernet's weights (largest weights of every layer)
    head.safetensors       the margin-softmax classifier shared by all sub-networks
    state.pt               weights, optimizer, scheduler, history for --resume (checksummed)
    log.csv                one row per epoch
    latency_table_*.json   per-layer CPU latencies measured by the search (reused)

Why the validation split: CMP-NAS scores candidates by retrieval accuracy, and scoring on the
test split would tune the architecture on the test set. So part of the *training* split is held
out of supernet training and split into a val-query and a val-gallery side; the supernet never
trains on it, and search re-creates the same split from the same data spec, seed and kind
(``val_split``, recorded in the supernet card):

* ``images`` (:func:`carve_validation`): a few images of every training class. Right for
  closed-set data, where the test queries are of classes the models trained on.
* ``identities`` (:func:`carve_identities`): every image of a share of the training classes,
  which the supernet then never sees. Right for open-set data (the test identities are new
  ones): a reward scored on images of training identities rewards memorising them. It works with
  2 views per identity (one val-query, one val-gallery), where ``images`` needs >= 4 per class.
* ``auto`` (the training default): ``identities`` for open-set data with at least
  ``AUTO_MIN_IDENTITIES`` training classes (fewer cannot spare whole classes), else ``images``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .. import checkpoint as ckpt
from ..data import RetrievalData, create_dataset
from ..embed import normalize_images
from ..errors import HVSError
from ..models.ofa import OFAMobileNetV3Supernet
from ..models.supernets import DEFAULT_SPACE, create_supernet

CONFIG = "config.json"
WEIGHTS = "supernet.safetensors"
HEAD = "head.safetensors"
STATE = ckpt.STATE
LOG = "log.csv"


class NASError(HVSError):
    """A NAS job that cannot run as asked (one-line message)."""


class InfeasibleBudget(NASError):
    """No sub-network of the space fits the cost budget (a result, not a mistake in the call)."""


@dataclass
class SupernetCard:
    """What ``config.json`` of a supernet folder holds."""

    supernet: dict  # create_supernet(space, **supernet)
    embed_dim: int
    in_chans: int
    image_size: int
    mean: list[float]
    std: list[float]
    classes: list[str]  # head row order
    data: str
    protocol: str = "closed"
    data_seed: int = 0
    val_fraction: float = 0.1
    val_max_per_class: int = 50
    val_split: str = "images"  # the kind of validation split (module docstring); older cards: images
    gallery: dict | None = None  # {"fingerprint", "model", "path"} of the frozen gallery model (BCT)
    bct_weight: float = 0.0
    regress_weight: float = 0.0  # feature regression onto the gallery model's embeddings
    loss: str = "cosface"
    scale: float = 16.0
    margin: float = 0.2
    epochs: int = 0
    epochs_done: int = 0
    fingerprint: str = ""  # of supernet.safetensors
    extra: dict = field(default_factory=dict)
    space: str = DEFAULT_SPACE  # the search space (hvs.models.supernets); older cards: ofa-mbv3

    @property
    def kind(self) -> str:
        aware = self.bct_weight > 0 or self.regress_weight > 0 or bool(self.extra.get("compat"))
        return "compatibility-aware" if self.gallery and aware else "plain"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SupernetCard:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_supernet(
    folder: str | os.PathLike, model: OFAMobileNetV3Supernet, head_weight: torch.Tensor, card: SupernetCard
) -> SupernetCard:
    """Weights first, then config.json (a folder with a config.json is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_save_tensors(folder / WEIGHTS, model.state_dict())
    ckpt.atomic_save_tensors(folder / HEAD, {"weight": head_weight})
    card.fingerprint = ckpt.file_fingerprint(folder / WEIGHTS)
    ckpt.atomic_write_json(folder / CONFIG, {"format": "hvs-ofa-supernet", **asdict(card)})
    return card


def read_supernet_card(folder: str | os.PathLike) -> SupernetCard:
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise NASError(f"{folder} is not a supernet folder (no {CONFIG}; run `hvs nas train-supernet` first)")
    raw = json.loads((folder / CONFIG).read_text())
    if raw.get("format") != "hvs-ofa-supernet":
        raise NASError(f'{folder} holds a model folder, not a supernet (no "format": "hvs-ofa-supernet")')
    return SupernetCard.from_dict(raw)


def load_supernet(folder: str | os.PathLike) -> tuple[OFAMobileNetV3Supernet, torch.Tensor, SupernetCard]:
    """(supernet in eval mode, head weight, card); checks the weights against the fingerprint."""
    folder = Path(folder)
    card = read_supernet_card(folder)
    if card.fingerprint and ckpt.file_fingerprint(folder / WEIGHTS) != card.fingerprint:
        raise NASError(f"{folder / WEIGHTS}: weights do not match the fingerprint in {CONFIG} (corrupt or replaced)")
    try:
        model = create_supernet(card.space, **card.supernet)
    except HVSError as e:
        raise NASError(f"{folder / CONFIG}: {e}") from None
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    head = load_file(str(folder / HEAD))["weight"]
    return model.eval(), head, card


# ------------------------------------------------------------------------------------------
# Data: training targets and the validation split carved from the training classes
# ------------------------------------------------------------------------------------------


def carve_validation(
    labels: torch.Tensor, fraction: float = 0.1, max_per_class: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val_query, val_gallery) indices into ``labels``.

    Per class, a seeded shuffle holds out ``min(round(fraction * n), max_per_class)`` images
    (at least 2 when the class has >= 4, so it can have a query and a positive), half val-query
    (rounded down), half val-gallery; the rest trains. Classes with < 4 images only train."""
    if not 0 <= fraction < 1:
        raise NASError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    lab = labels.numpy()
    train, vq, vg = [], [], []
    for c in np.unique(lab):
        idx = rng.permutation(np.flatnonzero(lab == c))
        n = len(idx)
        n_val = min(int(math.floor(fraction * n + 0.5)), max_per_class) if fraction > 0 else 0
        if n >= 4 and fraction > 0:
            n_val = max(2, n_val)
        elif n < 4:
            n_val = 0
        n_q = n_val // 2
        vq.append(idx[:n_q])
        vg.append(idx[n_q:n_val])
        train.append(idx[n_val:])
    return tuple(
        torch.from_numpy(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64)).long() for p in (train, vq, vg)
    )


VAL_SPLITS = ("images", "identities")
AUTO_MIN_IDENTITIES = 20


def resolve_val_split(split: str, data: RetrievalData) -> str:
    """``auto`` -> ``identities`` for open-set data of >= ``AUTO_MIN_IDENTITIES`` training classes, else
    ``images``; the others as given."""
    if split == "auto":
        n_classes = int(torch.unique(data.train.labels).numel()) if data.train is not None else 0
        return "identities" if data.protocol == "open" and n_classes >= AUTO_MIN_IDENTITIES else "images"
    if split not in VAL_SPLITS:
        raise NASError(f"unknown validation split {split!r}; expected auto, {', '.join(VAL_SPLITS)}")
    return split


def carve_identities(
    labels: torch.Tensor, fraction: float = 0.1, max_per_class: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val_query, val_gallery) indices into ``labels``, the validation sides from held-out classes.

    Of the classes with >= 2 images, a seeded draw of ``max(2, round(fraction * n_classes))`` is
    held out whole (none if ``fraction`` is 0): their images never train. Of each, up to
    ``max_per_class`` images (a seeded shuffle) are split half val-query (rounded down, at least
    1), the rest val-gallery, so an identity with 2 views gives one query and its one positive.
    Every other class trains on all its images."""
    if not 0 <= fraction < 1:
        raise NASError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    lab = labels.numpy()
    classes, counts = np.unique(lab, return_counts=True)
    eligible = classes[counts >= 2]
    n_held = 0 if fraction == 0 else max(2, int(math.floor(fraction * len(classes) + 0.5)))
    if n_held and len(classes) - n_held < 1:
        raise NASError(f"{len(classes)} training classes cannot spare {n_held} held-out identities and still train")
    if n_held > len(eligible):
        raise NASError(
            f"a held-out-identity validation split needs {n_held} classes with >= 2 images; "
            f"the training split has {len(eligible)}"
        )
    held = set(rng.permutation(eligible)[:n_held].tolist())
    train, vq, vg = [], [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(lab == c))
        if c not in held:
            train.append(idx)
            continue
        idx = idx[: max(2, max_per_class)]
        n_q = max(1, len(idx) // 2)
        vq.append(idx[:n_q])
        vg.append(idx[n_q:])
    return tuple(
        torch.from_numpy(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64)).long() for p in (train, vq, vg)
    )


@dataclass
class NASData:
    """Training targets (classifier rows) and the carved validation split, all uint8 in memory."""

    data: RetrievalData
    classes: list[str]  # classifier rows: training classes in the order of their global label
    train_images: torch.Tensor
    train_targets: torch.Tensor  # row indices
    val_query_images: torch.Tensor
    val_query_labels: torch.Tensor
    val_gallery_images: torch.Tensor
    val_gallery_labels: torch.Tensor
    train_index: torch.Tensor | None = None  # rows of data.train that train (the validation split's left out)

    def bn_subset(self, n: int, seed: int = 0) -> torch.Tensor:
        """A fixed seeded subset of ``n`` training images for BatchNorm re-calibration."""
        if n >= len(self.train_images):
            return self.train_images
        perm = torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(seed))
        return self.train_images[perm[:n]]


def prepare_data(
    data: RetrievalData,
    val_fraction: float = 0.1,
    val_max_per_class: int = 50,
    seed: int = 0,
    val_split: str = "images",
) -> NASData:
    """Rows = the classes that train, in sorted order of their global label (as hvs.train does):
    every training class, less the held-out identities of a ``val_split="identities"`` split."""
    labels = data.train.labels
    if len(labels) == 0:
        raise NASError(f"{data.name}: the train split is empty")
    carve = carve_identities if resolve_val_split(val_split, data) == "identities" else carve_validation
    tr, vq, vg = carve(labels, val_fraction, val_max_per_class, seed)
    class_ids = torch.unique(labels[tr])
    row_of = torch.full((len(data.classes),), -1, dtype=torch.long)
    row_of[class_ids] = torch.arange(len(class_ids))
    return NASData(
        data,
        [data.classes[i] for i in class_ids.tolist()],
        data.train.images[tr],
        row_of[labels[tr]],
        data.train.images[vq],
        labels[vq],
        data.train.images[vg],
        labels[vg],
        torch.as_tensor(tr, dtype=torch.long),
    )


def load_data(
    spec: str | RetrievalData, protocol: str = "closed", image_size: int | None = None, seed: int = 0
) -> RetrievalData:
    if isinstance(spec, RetrievalData):
        return spec
    return create_dataset(spec, protocol=protocol, image_size=image_size, seed=seed)


# ------------------------------------------------------------------------------------------
# BatchNorm re-calibration
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    channels_last: bool = True,
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` (uint8), in place.

    A sub-network's activations differ from the mixture the shared running statistics were
    averaged over during supernet training, so OFA resets them on ~2k training images before
    any accuracy is measured. Statistics are the exact average over the batches (momentum None).
    Returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    # a batch of 1 cannot give BatchNorm1d statistics: fold a trailing singleton into the previous batch
    starts = list(range(0, len(images), batch_size))
    if len(starts) > 1 and len(images) - starts[-1] < 2:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(images)
        x = normalize_images(images[start:end], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model(x)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model.eval()


def gallery_ref(card: ckpt.ModelCard, path: str | os.PathLike) -> dict[str, str]:
    return {"fingerprint": card.fingerprint, "model": card.model, "path": str(Path(path).resolve())}


def parse_flops(text: str | float | int) -> float:
    """``"5M"``, ``"0.5G"``, ``"800k"``, ``"5e6"`` -> FLOPs."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower().removesuffix("flops").strip()
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:], 1.0)
    try:
        value = float(s[:-1] if mult != 1.0 else s) * mult
    except ValueError:
        raise NASError(f"cannot read FLOPs {text!r}; write e.g. 5M, 0.5G or 5e6") from None
    if value <= 0:
        raise NASError(f"a FLOPs budget must be positive, got {text!r}")
    return value


def load_mapping(path: str | os.PathLike | None) -> dict[str, Any]:
    """A YAML or JSON file of options (a mapping), or {} for None (the trainer's reader)."""
    from ..training.core import read_mapping

    return read_mapping(path)


def config_from_dict(cls, d: dict[str, Any], what: str):
    """The trainer core's config reader, with NAS's error class."""
    from ..training.core import config_from_dict as _from_dict

    return _from_dict(cls, d, what, NASError)
