"""Query encoders: a PyTorch model folder or an exported ONNX file behind one small interface.

    from hvs.encoders import load_query_encoder

    enc = load_query_encoder("runs/query-bct")      # or "q.onnx" (see hvs.export)
    vectors = enc.embed(images)                     # uint8 (N, C, H, W) -> float32 (N, D)

Loaders are registered by kind with a lazy ``"module:function"`` target (like the index
backends), and a path's kind is told by its suffix (``.onnx``) or else is a model folder, so a
new runtime is one :func:`register_encoder` call and importing this module imports no runtime.
A :class:`QueryEncoder` carries what :func:`hvs.compat.check_pair` needs to accept or refuse it
for a gallery (:attr:`QueryEncoder.side`).

The ONNX Runtime side lives here too (sessions, the hvs metadata of an export, batch-1 latency);
:mod:`hvs.export` only writes files. An export's metadata records a SHA-256 of its graph
(``weights_sha256``: the serialized ``GraphProto``, i.e. every node and initializer, without the
metadata that holds the digest) and loading verifies it, so an ``.onnx`` file whose weights were
altered after export is refused by name instead of searching under the fingerprint of the
PyTorch weights it no longer holds.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .compat import QuerySide
from .data.images import to_float
from .embed import embed_images
from .errors import ExportError
from .models.cost import median_call_ms

INPUT, OUTPUT = "images", "embeddings"
WEIGHTS_KEY = "weights_sha256"
METADATA_KEYS = ("preprocessing", "embed_dim", "model", "role", "fingerprint", "compatible_with", WEIGHTS_KEY)


@dataclass
class QueryEncoder:
    """Anything that turns uint8 query images into embeddings, with what it was made for."""

    name: str
    embed_dim: int
    fingerprint: str  # of the encoder's own weights
    compatible_with: str | None  # fingerprint of the gallery model it was trained for
    role: str
    preprocessing: dict  # channels, image_size, mean, std
    embed: Callable[[torch.Tensor], np.ndarray]  # uint8 (N, C, H, W) -> float32 (N, D)

    @property
    def side(self) -> QuerySide:
        """The record :func:`hvs.compat.check_pair` judges this encoder by."""
        return QuerySide.of_encoder(self)


# ----------------------------------------------------------------------------------------------
# The registry: kind -> "module:function", and which suffixes select a kind.
_ENCODERS: dict[str, str] = {}
_SUFFIXES: dict[str, str] = {}
DEFAULT_KIND = "torch"  # a path with no registered suffix is a model folder


def register_encoder(kind: str, target: str, suffixes: tuple[str, ...] = ()) -> None:
    """Register a loader ``"package.module:function"`` (path -> :class:`QueryEncoder`) under
    ``kind``; paths ending in one of ``suffixes`` are loaded by it."""
    if ":" not in target:
        raise ValueError(f"encoder target {target!r} must be 'package.module:function'")
    _ENCODERS[kind] = target
    for suffix in suffixes:
        _SUFFIXES[suffix.lower()] = kind


def list_encoders() -> list[str]:
    """Registered encoder kinds, e.g. ``["onnx", "torch"]``."""
    return sorted(_ENCODERS)


def encoder_kind(path: str | os.PathLike) -> str:
    """The kind that loads ``path``: by its suffix, else a model folder."""
    return _SUFFIXES.get(Path(path).suffix.lower(), DEFAULT_KIND)


def encoder_loader(kind: str) -> Callable[..., QueryEncoder]:
    """The loader function of ``kind`` (imported on first use)."""
    if kind not in _ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; registered: {', '.join(list_encoders())}")
    module, _, name = _ENCODERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_query_encoder(path: str | os.PathLike, kind: str | None = None) -> QueryEncoder:
    """A query encoder from a model folder or an exported file (kind chosen by the suffix)."""
    return encoder_loader(kind or encoder_kind(path))(str(path))


# ----------------------------------------------------------------------------------------------
# PyTorch model folders.
def load_torch_encoder(folder: str | os.PathLike) -> QueryEncoder:
    """A :class:`QueryEncoder` on a model folder (weights checked against its fingerprint)."""
    model, card = ckpt.load_model(folder)
    return QueryEncoder(
        name=card.model,
        embed_dim=card.embed_dim,
        fingerprint=card.fingerprint,
        compatible_with=(card.compatible_with or {}).get("fingerprint"),
        role=card.role,
        preprocessing={
            "channels": card.in_chans,
            "image_size": card.image_size,
            "mean": list(card.mean),
            "std": list(card.std),
        },
        embed=lambda x: embed_images(model, x, card.mean, card.std).numpy(),
    )


# ----------------------------------------------------------------------------------------------
# ONNX files and ONNX Runtime.
def import_onnx():
    """The ``onnx`` and ``onnxruntime`` modules, or a one-line install hint."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs onnx and onnxruntime ({e.name} is missing): pip install 'hvs[export]'"
        ) from None
    return onnx, onnxruntime


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None, *, where: Any = None):
    """A CPU InferenceSession; ``threads`` sets intra-op threads (default: ORT's, one per core).
    ``where`` names in-memory bytes in an error (default "ONNX model")."""
    _, ort = import_onnx()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers otherwise
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
        where = where or ("ONNX model" if isinstance(model, bytes) else str(model))
        raise ExportError(f"{where}: ONNX Runtime cannot load it ({' '.join(str(e).split())[:300]})") from None


def graph_sha256(proto) -> str:
    """SHA-256 of an ONNX model's graph (nodes and initializers, not the model's metadata, which
    records this digest): what an export writes as ``weights_sha256`` and loading verifies."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def _read(path: Path):
    """(parsed ModelProto, the file's bytes) of an ONNX file, or a one-line error naming it."""
    onnx, _ = import_onnx()
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        data = path.read_bytes()
        return onnx.load_from_string(data), data
    except Exception as e:
        raise ExportError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None


def read_metadata(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The hvs metadata of an exported ``.onnx`` file (values decoded from their JSON strings);
    with ``verify`` the graph is checked against its recorded ``weights_sha256``."""
    path = Path(path)
    proto, _ = _read(path)
    meta = _metadata_of(proto, path)
    if verify:
        _verify_graph(proto, meta, path)
    return meta


def _verify_graph(proto, meta: dict[str, Any], where: Any) -> None:
    if graph_sha256(proto) != meta[WEIGHTS_KEY]:
        raise ExportError(
            f"{where}: ONNX graph does not match the {WEIGHTS_KEY} recorded at export (weights "
            "altered or replaced); export it again with `hvs export onnx`"
        )


def _metadata_of(proto, where: Any) -> dict[str, Any]:
    raw = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in METADATA_KEYS if k not in raw]
    if missing:
        raise ExportError(
            f"{where}: ONNX file has no hvs metadata ({', '.join(missing)} missing); export it with `hvs export onnx`"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value  # foreign keys (e.g. onnxruntime's own) may be plain strings
    pre = meta["preprocessing"]
    if not isinstance(pre, dict) or any(k not in pre for k in ("channels", "image_size", "mean", "std")):
        raise ExportError(f"{where}: ONNX metadata 'preprocessing' lacks channels/image_size/mean/std")
    return meta


def _embed_fn(session, pre: dict, batch_size: int = 256) -> Callable[[torch.Tensor], np.ndarray]:
    name = session.get_inputs()[0].name
    mean, std = pre["mean"], pre["std"]

    def embed(images: torch.Tensor) -> np.ndarray:
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size], mean, std).numpy()
            out.append(session.run(None, {name: x})[0])
        if not out:
            return np.zeros((0, session.get_outputs()[0].shape[-1]), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    return embed


def load_onnx_encoder(path: str | os.PathLike, threads: int | None = None) -> QueryEncoder:
    """A :class:`QueryEncoder` backed by an ONNX Runtime session on an hvs export.

    Registered for ``.onnx``, so ``load_query_encoder("q.onnx")`` and ``Searcher(index, "q.onnx")``
    work like a model folder (same compatibility checks). The file is read once: its graph is
    verified against the recorded ``weights_sha256`` and the session is built from those bytes."""
    path = Path(path)
    proto, data = _read(path)
    meta = _metadata_of(proto, path)
    _verify_graph(proto, meta, path)
    session = ort_session(data, threads, where=path)
    pre = meta["preprocessing"]
    shape = session.get_inputs()[0].shape  # ["batch", C, H, W]
    want = [pre["channels"], pre["image_size"], pre["image_size"]]
    if len(shape) != 4 or list(shape[1:]) != want:
        raise ExportError(f"{path}: ONNX input shape {shape} does not match its metadata (N, {want})")
    return QueryEncoder(
        name=str(meta["model"]),
        embed_dim=int(meta["embed_dim"]),
        fingerprint=str(meta["fingerprint"]),
        compatible_with=meta["compatible_with"],
        role=str(meta["role"]),
        preprocessing={k: pre[k] for k in ("channels", "image_size", "mean", "std")},
        embed=_embed_fn(session, pre),
    )


def measure_ort_latency(
    session,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    min_seconds: float = 0.3,
) -> float:
    """Median wall time (ms) of one ``session.run`` on a random batch, timed like
    :func:`hvs.models.cost.measure_latency` (at least ``repeats`` runs and ``min_seconds``)."""
    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    return median_call_ms(lambda: session.run(None, feed), warmup=warmup, repeats=repeats, min_seconds=min_seconds)


register_encoder("torch", "hvs.encoders:load_torch_encoder")
register_encoder("onnx", "hvs.encoders:load_onnx_encoder", suffixes=(".onnx",))


__all__ = [
    "INPUT",
    "METADATA_KEYS",
    "OUTPUT",
    "QueryEncoder",
    "encoder_kind",
    "encoder_loader",
    "graph_sha256",
    "import_onnx",
    "list_encoders",
    "load_onnx_encoder",
    "load_query_encoder",
    "load_torch_encoder",
    "measure_ort_latency",
    "ort_session",
    "read_metadata",
    "register_encoder",
]
