"""Model folders: ``config.json`` + ``model.safetensors`` + ``classifier.safetensors``.

A model folder is self-describing (timm's release layout): the architecture and its arguments,
the preprocessing (channels, image size, mean, std), the class names of the classifier rows, and a
**fingerprint** (SHA-256 of the weights file) of the model. A query model trained for
compatibility records the fingerprint of the gallery model it was trained against, so an index
built by one gallery model refuses queries from a model made for another.

An **adopted** gallery model (:mod:`hvs.adopt`: a frozen encoder hvs did not train, e.g. a
production model whose index cannot be rebuilt) is a model folder too: its card's ``adopted``
records where it came from (kind, source file and its SHA-256) and it has no classifier. An
adopted ONNX file is kept in the folder as ``model.onnx`` (the fingerprint is of that file) and
:func:`load_model` returns it as an inference-only torch module over an ONNX Runtime session; an
adopted architecture + weights file is stored as ``model.safetensors`` of the library backbone
(no embedding head). Every caller of :func:`load_model` works with either unchanged.

All writes are atomic (write to a temporary name, fsync, ``os.replace``): an interrupted save
leaves the previous version, never a half-written file. ``config.json`` is checked field by field
when read (a wrong type or a key this version does not know is a one-line error naming the key),
and records the hvs version that wrote it. A training checkpoint (``state.pt``) carries a SHA-256
of its contents (:func:`save_state` / :func:`load_state`), so a damaged one is refused by name
rather than resumed from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file

from . import fileio
from .errors import HVSError
from .fileio import atomic_write_bytes, sha256_file
from .models import EmbeddingModel, create_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CLASSIFIER = "classifier.safetensors"
STATE = "state.pt"  # a training run's resumable state, beside the model files of its folder
ADOPTED_ONNX = "model.onnx"  # an adopted ONNX gallery encoder, kept in its folder
# Loaders of adopted models by kind ("module:function", imported on first use): frozen encoders
# that are not a registry EmbeddingModel (an ONNX file; a library backbone without embedding head).
ADOPTED_LOADERS: dict[str, str] = {"onnx": "hvs.adopt:load_onnx_module", "weights": "hvs.adopt:load_backbone_module"}
STATE_CHECKSUM = "sha256"  # key of the contents' digest inside a training checkpoint

C = TypeVar("C")


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


def hvs_version() -> str:
    """The running hvs's version (read at call time: ``hvs/__init__`` may still be importing us)."""
    from . import __version__

    return __version__


def file_fingerprint(path: str | os.PathLike) -> str:
    """The first 64 bits (16 hex digits) of a file's SHA-256."""
    return sha256_file(path)[:16]


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
    classifier_fingerprint: str = ""  # of classifier.safetensors ("" for a folder without one, or an older hvs)
    compatible_with: dict | None = None  # {"fingerprint", "model", "path"} of the gallery model
    compat: list = field(default_factory=list)  # [(loss, weight)] used for compatibility
    extra: dict = field(default_factory=dict)  # data spec, metrics at save time, ...
    hvs_version: str = ""  # the hvs that wrote the folder ("" before 0.1.0 recorded it)
    # an adopted gallery model (hvs.adopt): {"kind", "source", "sha256", ...}; {} for one hvs trained
    adopted: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if not d["adopted"]:  # a trained model's card stays readable by an hvs without the key
            del d["adopted"]
        return d


def save_model_folder(
    folder: str | os.PathLike, model: EmbeddingModel, card: ModelCard, classifier: torch.Tensor | None = None
) -> ModelCard:
    """Write weights (and classifier), fingerprint them, then write config.json last: a folder
    with a config.json is complete. Saving over an existing model folder replaces it as a whole
    (:func:`hvs.fileio.replace_folder`): a kill at any instant leaves the old model or the new one,
    never new weights beside the old card. Other files in the folder (a run's log) are kept."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():  # nothing committed to lose: write in place, config.json last
        folder.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temps(folder)  # left by a save that was killed
        return _write_model_files(folder, model, card, classifier)

    def write(staging: Path) -> ModelCard:
        for entry in folder.iterdir():  # keep what is not ours to replace (logs, a run's state)
            if (
                entry.is_file()
                and entry.name not in (WEIGHTS, CLASSIFIER, CONFIG)
                and not fileio.is_temp_name(entry.name)
            ):
                shutil.copy2(entry, staging / entry.name)
        return _write_model_files(staging, model, card, classifier)

    return fileio.replace_folder(folder, write)


def copy_model_folder(src: str | os.PathLike, dst: str | os.PathLike) -> ModelCard:
    """A copy of the complete model folder ``src`` as ``dst`` (replaced whole if it exists, as
    :func:`save_model_folder` does): every file but a training run's resumable state, the
    weights checked against the card's fingerprint first. Returns the (unchanged) card."""
    src = Path(src)
    card = read_card(src)
    if file_fingerprint(src / WEIGHTS) != card.fingerprint:
        raise CheckpointError(f"{src / WEIGHTS}: weights do not match the fingerprint in {CONFIG}; not copied")

    def write(staging: Path) -> ModelCard:
        for entry in src.iterdir():
            if entry.is_file() and entry.name not in (CONFIG, STATE) and not fileio.is_temp_name(entry.name):
                shutil.copy2(entry, staging / entry.name)
                fileio.fsync_file(staging / entry.name)
        atomic_write_json(staging / CONFIG, card.to_dict())  # last: a folder with a config.json is complete
        return card

    return fileio.replace_folder(dst, write)


def _write_model_files(
    folder: Path, model: EmbeddingModel, card: ModelCard, classifier: torch.Tensor | None
) -> ModelCard:
    atomic_save_tensors(folder / WEIGHTS, model.state_dict())
    if classifier is not None:
        atomic_save_tensors(folder / CLASSIFIER, {"weight": classifier})
        card.classifier_fingerprint = file_fingerprint(folder / CLASSIFIER)
    card.fingerprint = file_fingerprint(folder / WEIGHTS)
    card.hvs_version = hvs_version()
    atomic_write_json(folder / CONFIG, card.to_dict())
    return card


def read_card(folder: str | os.PathLike) -> ModelCard:
    folder = Path(folder)
    fileio.recover_folder(folder)  # a replacement killed midway: back to the old folder
    path = folder / CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a model folder (no {CONFIG}; is training finished?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt model config, not JSON ({e})") from None
    return card_from_dict(ModelCard, raw, path)


def card_from_dict(
    cls: type[C],
    raw: Any,
    path: str | os.PathLike,
    *,
    error: type[HVSError] = CheckpointError,
    ignore: frozenset[str] = frozenset(),
) -> C:
    """Build the dataclass ``cls`` (a card) from the JSON object ``raw`` read from ``path``, checking
    every value against the field's type annotation, so a hand-edited or damaged file is a
    one-line ``error`` naming the key, the expected type and the file instead of a traceback later.

    A key the dataclass does not know is refused, not dropped: a newer hvs may have added a field
    that changes what the folder means; the message names the key and the hvs version that wrote
    the file. Keys in ``ignore`` (a format tag) are skipped."""
    if not isinstance(raw, dict):
        raise error(f"{path}: corrupt config, expected a JSON object, got {_json_type(raw)}")
    spec = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(spec) - ignore)
    if unknown:
        writer = raw.get("hvs_version")
        by = f"written by hvs {writer}" if isinstance(writer, str) and writer else "written by an unknown hvs version"
        raise error(f"{path}: unknown key {unknown[0]!r} ({by}; this is hvs {hvs_version()}: upgrade hvs to read it)")
    for name, f in spec.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise error(f"{path}: corrupt config, required key {name!r} is missing")
            continue
        if not _has_type(raw[name], hints[name]):
            raise error(
                f"{path}: {name} must be {_type_name(hints[name])}, got {_json_type(raw[name])} "
                f"{json.dumps(raw[name])[:40]}"
            )
    return cls(**{k: v for k, v in raw.items() if k in spec})


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits an annotation: int, float, str, bool, list[T], dict, X | None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is Any:
        return True
    if (origin or hint) in (list, tuple):
        return isinstance(value, list) and (not args or all(_has_type(v, args[0]) for v in value))
    if (origin or hint) is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "an object",
        type(None): "null",
        Any: "any value",
    }
    if (origin or hint) in (list, tuple):
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _json_type(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def state_digest(obj: Any) -> str:
    """SHA-256 of a training checkpoint's contents (nested dicts, lists, tensors, numbers, strings):
    the bytes, dtype and shape of every tensor and the repr of everything else, in key order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: hashlib._Hash, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode() + b"=")
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"V{obj!r};".encode())


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically, with the SHA-256 of its contents inside it (it
    stays a plain dict that ``torch.load(weights_only=True)`` reads)."""
    atomic_torch_save(path, {**state, STATE_CHECKSUM: state_digest(state)})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state`, refusing a truncated or altered one with a
    one-line error naming the file (a checkpoint without a digest, from before hvs recorded one,
    is read as is)."""
    path = Path(path)
    hint = f"delete {path.name} to restart the run from scratch"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or garbled zip
        raise CheckpointError(
            f"{path}: cannot read the training checkpoint, truncated or corrupt "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); {hint}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(state).__name__}, not a dict); {hint}")
    recorded = state.pop(STATE_CHECKSUM, None)
    if recorded is not None and recorded != state_digest(state):
        raise CheckpointError(f"{path}: the training checkpoint does not match its checksum (corrupt); {hint}")
    return state


def load_model(folder: str | os.PathLike, verify: bool = True) -> tuple[EmbeddingModel, ModelCard]:
    """Rebuild the model of a folder in eval mode; checks the weights against the fingerprint."""
    folder = Path(folder)
    card = read_card(folder)
    kind = card.adopted.get("kind") if card.adopted else None
    if kind in ADOPTED_LOADERS:
        import importlib

        module, _, name = ADOPTED_LOADERS[kind].partition(":")
        model = getattr(importlib.import_module(module), name)(folder, card, verify=verify)
        model.eval()
        return model, card
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
    """The classifier rows of a model folder (BCT's fixed targets), checked against the fingerprint
    its card records (folders written before hvs recorded one are read unchecked)."""
    path = Path(folder) / CLASSIFIER
    if not path.is_file() and (Path(folder) / CONFIG).is_file() and read_card(folder).adopted:
        raise CheckpointError(f"{folder}: an adopted gallery model has no classifier")
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing {CLASSIFIER} (BCT needs the gallery model's classifier)")
    expected = read_card(folder).classifier_fingerprint
    if expected and file_fingerprint(path) != expected:
        raise CheckpointError(f"{path}: classifier does not match the fingerprint in {CONFIG} (corrupt or replaced)")
    try:
        return load_file(str(path))["weight"]
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise CheckpointError(f"{path}: cannot load the classifier ({str(e).splitlines()[0]})") from None
