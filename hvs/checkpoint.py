"""Model folders: ``config.json`` + ``model.safetensors`` + ``classifier.safetensors``.

A model folder is self-describing (timm's release layout): the architecture and its arguments,
the preprocessing (channels, image size, mean, std), the class names of the classifier rows, and a
**fingerprint** (SHA-256 of the weights file) of the model. A query model trained for
compatibility records the fingerprint of the gallery model it was trained against, so an index
built by one gallery model refuses queries from a model made for another.

All writes are atomic (write to a temporary name, fsync, ``os.replace``): an interrupted save
leaves the previous version, never a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import HVSError
from . import fileio
from .fileio import atomic_write_bytes
from .models import EmbeddingModel, create_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CLASSIFIER = "classifier.safetensors"


class CheckpointError(HVSError):
    """A model folder that is missing, corrupt, or the wrong one for the job (one-line message)."""


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    fileio.atomic_write_json(path, obj, indent=2, sort_keys=False)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def file_fingerprint(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class ModelCard:
    """What ``config.json`` of a model folder holds."""

    model: str
    embed_dim: int
    in_chans: int
    image_size: int
    mean: list[float]
    std: list[float]
    role: str = "gallery"
    model_kwargs: dict = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # classifier row order
    fingerprint: str = ""  # of this model's weights
    compatible_with: dict | None = None  # {"fingerprint", "model", "path"} of the gallery model
    compat: list = field(default_factory=list)  # [(loss, weight)] used for compatibility
    extra: dict = field(default_factory=dict)  # data spec, metrics at save time, ...

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def save_model_folder(folder: str | os.PathLike, model: EmbeddingModel, card: ModelCard,
                      classifier: torch.Tensor | None = None) -> ModelCard:
    """Write weights (and classifier), fingerprint them, then write config.json last: a folder
    with a config.json is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / WEIGHTS, model.state_dict())
    if classifier is not None:
        atomic_save_tensors(folder / CLASSIFIER, {"weight": classifier})
    card.fingerprint = file_fingerprint(folder / WEIGHTS)
    atomic_write_json(folder / CONFIG, card.to_dict())
    return card


def read_card(folder: str | os.PathLike) -> ModelCard:
    folder = Path(folder)
    path = folder / CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a model folder (no {CONFIG}; is training finished?)")
    try:
        raw = json.loads(path.read_text())
        return ModelCard(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt model config ({e})") from None


def load_model(folder: str | os.PathLike, verify: bool = True) -> tuple[EmbeddingModel, ModelCard]:
    """Rebuild the model of a folder in eval mode; checks the weights against the fingerprint."""
    folder = Path(folder)
    card = read_card(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: missing {WEIGHTS}")
    if verify and not card.fingerprint:
        raise CheckpointError(f"{folder / CONFIG}: no weights fingerprint recorded (incomplete or edited model folder)")
    if verify and file_fingerprint(weights) != card.fingerprint:
        raise CheckpointError(f"{weights}: weights do not match the fingerprint in {CONFIG} (corrupt or replaced)")
    model = create_model(card.model, embed_dim=card.embed_dim, in_chans=card.in_chans, **card.model_kwargs)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{weights}: cannot load weights ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, card


def load_classifier(folder: str | os.PathLike) -> torch.Tensor:
    path = Path(folder) / CLASSIFIER
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing {CLASSIFIER} (BCT needs the gallery model's classifier)")
    return load_file(str(path))["weight"]
