"""Adopt a gallery model hvs did not train: a frozen encoder becomes a gallery model folder.

Most teams already run a production gallery model whose index they cannot afford to rebuild;
what they need is a small query model compatible with *that* model. ``hvs adopt`` turns such an
encoder into a model folder every downstream command reads (index build, compatible query
training, evaluate, search, serve, ONNX export, NAS)::

    hvs adopt onnx --onnx prod_gallery.onnx --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
        --out runs/gallery-prod
    hvs index build --gallery-model runs/gallery-prod --data imagefolder:photos --out faiss:runs/idx
    hvs train --gallery-model runs/gallery-prod --compat bct --model mobilenetv3_small --out runs/q

    from hvs.adopt import adopt_onnx
    card = adopt_onnx("prod_gallery.onnx", "runs/gallery-prod", mean=[0.5], std=[0.25])

The folder is a normal model folder whose card says it is adopted (``adopted``: kind, source
file and its SHA-256); its fingerprint is that of the encoder file, its embedding dimension is
found by running it once on a dummy batch, and it has **no classifier**: BCT then synthesises
every classifier row from the class means of the gallery embeddings of the training images
(:meth:`hvs.training.gallery.FrozenGallery.context`), and ``l2`` / ``contrastive`` need none.

An ONNX encoder is kept in the folder as ``model.onnx`` and loaded by
:func:`hvs.checkpoint.load_model` as :class:`OnnxModule`, an inference-only torch module over an
ONNX Runtime session (gallery models are frozen in every use). Its outputs are L2-normalised,
as every hvs model's are (vectors are compared by inner product). Input: float32
``(N, C, H, W)`` normalised as ``(x/255 - mean)/std``, output ``(N, D)``.

Bad input is refused with a one-line :class:`AdoptError` before anything is written: a file ONNX
Runtime cannot load, an input that is not an image tensor ``(N, C, S, S)`` of float32, an output
that is not one vector per image, a preprocessing that disagrees with the model's input or with
the data's channels.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import fileio
from .errors import HVSError
from .fileio import sha256_file

KIND_ONNX, KIND_WEIGHTS = "onnx", "weights"


class AdoptError(HVSError):
    """An encoder that cannot be adopted as a gallery model (one-line message)."""


# ----------------------------------------------------------------------------------------------
# The ONNX encoder as a torch module.
class OnnxModule(nn.Module):
    """An ONNX image encoder behind ``nn.Module``'s call: float (N, C, S, S) -> (N, D) unit vectors.

    Inference only (no parameters, no gradients): what a frozen gallery model is in every
    downstream use. A graph with a fixed batch B is run B images at a time. ``flops`` (counted
    from the graph when adopted, see :func:`onnx_flops`) is what :func:`hvs.models.cost.count_flops`
    reports for it."""

    def __init__(
        self,
        session: Any,
        embed_dim: int,
        in_chans: int,
        image_size: int,
        flops: int | None = None,
        params: int | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        batch = session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.embed_dim, self.in_chans, self.image_size = embed_dim, in_chans, image_size
        self.flops, self.params = flops, params

    def run(self, x: np.ndarray) -> np.ndarray:
        b = self.fixed_batch
        if b is None or len(x) == b:
            return self.session.run(None, {self.input_name: x})[0]
        # a graph of a fixed batch B: chunks of B, the last one padded with zeros and cut back
        out = []
        for i in range(0, len(x), b):
            chunk = x[i : i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = torch.from_numpy(np.asarray(self.run(arr), dtype=np.float32).copy())
        return F.normalize(out.reshape(len(arr), -1), dim=-1).to(x.device)

    def param_count(self) -> int:
        """Parameters of the graph (its initializers' elements), recorded when adopted."""
        return int(self.params or 0)

    def flops_for(self, input_shape: tuple[int, ...]) -> int:
        """FLOPs of one image (counted at the adopted input size, the only one it reads)."""
        return int(self.flops or 0)


def load_onnx_module(folder: str | os.PathLike, card: ckpt.ModelCard, verify: bool = True) -> OnnxModule:
    """The adopted ONNX encoder of a model folder (``checkpoint.ADOPTED_LOADERS["onnx"]``),
    checked against the fingerprint its card records."""
    from .encoders import ort_session

    path = Path(folder) / ckpt.ADOPTED_ONNX
    if not path.is_file():
        raise ckpt.CheckpointError(f"{folder}: missing {ckpt.ADOPTED_ONNX} (the adopted ONNX encoder)")
    if verify and ckpt.file_fingerprint(path) != card.fingerprint:
        raise ckpt.CheckpointError(
            f"{path}: the ONNX encoder does not match the fingerprint in {ckpt.CONFIG} (corrupt or replaced)"
        )
    session = ort_session(path, torch.get_num_threads())
    a = card.adopted
    return OnnxModule(session, card.embed_dim, card.in_chans, card.image_size, a.get("flops"), a.get("params"))


# ----------------------------------------------------------------------------------------------
# An architecture + weights file: the library network's pooled features.
class BackboneEncoder(nn.Module):
    """A timm / torchvision (or registered) backbone as a frozen encoder: its pooled features,
    L2-normalised (no embedding head: the production model's own output is what its index holds)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(getattr(backbone, "num_features", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x).flatten(1), dim=-1)


def _backbone_encoder(arch: str, in_chans: int, image_size: int, kwargs: dict) -> BackboneEncoder:
    from .models import build_backbone

    return BackboneEncoder(build_backbone(arch, in_chans, image_size, **kwargs))


def load_backbone_module(folder: str | os.PathLike, card: ckpt.ModelCard, verify: bool = True) -> BackboneEncoder:
    """The adopted architecture + weights of a model folder (``checkpoint.ADOPTED_LOADERS["weights"]``),
    its ``model.safetensors`` checked against the fingerprint its card records."""
    from safetensors.torch import load_file

    weights = Path(folder) / ckpt.WEIGHTS
    if not weights.is_file():
        raise ckpt.CheckpointError(f"{folder}: missing {ckpt.WEIGHTS}")
    if verify and ckpt.file_fingerprint(weights) != card.fingerprint:
        raise ckpt.CheckpointError(
            f"{weights}: weights do not match the fingerprint in {ckpt.CONFIG} (corrupt or replaced)"
        )
    module = _backbone_encoder(card.model, card.in_chans, card.image_size, card.model_kwargs)
    try:
        module.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors / torch raise several types for a damaged or foreign file
        raise ckpt.CheckpointError(f"{weights}: cannot load weights ({str(e).splitlines()[0]})") from None
    return module


def adopt_weights(
    arch: str,
    weights: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    channels: int = 3,
    model_kwargs: dict | None = None,
    data: str | None = None,
) -> ckpt.ModelCard:
    """Make the architecture ``arch`` (``timm:NAME``, ``torchvision:NAME`` or a registered name)
    with the local weights file ``weights`` (:func:`hvs.models.pretrained.load_pretrained`: timm
    or torchvision keys, the classifier dropped) the gallery model folder ``out``. Its embeddings
    are the network's pooled features, L2-normalised; the folder stores them as
    ``model.safetensors`` (fingerprinted) and records the source file's SHA-256."""
    from .models.pretrained import load_pretrained

    src, out = Path(weights), Path(out)
    _check_out(out)
    if channels not in (1, 3):
        raise AdoptError(f"channels must be 1 or 3, got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise AdoptError(f"image size must be a positive integer, got {image_size!r}")
    mean_c = _per_channel(mean, channels, "mean", src)
    std_c = _per_channel(std, channels, "std", src)
    if data is not None and (data_c := _data_channels(data)) != channels:
        raise AdoptError(
            f"{src}: the preprocessing reads {channels}-channel images but the data {data} has {data_c}-channel images"
        )
    kwargs = dict(model_kwargs or {})
    torch.manual_seed(0)
    module = _backbone_encoder(arch, channels, image_size, kwargs)
    sha = load_pretrained(module.backbone, src)
    module.eval()
    embed_dim = _probe(module, (channels, image_size, image_size), src)
    card = ckpt.ModelCard(
        model=arch,
        embed_dim=embed_dim,
        in_chans=channels,
        image_size=image_size,
        mean=mean_c,
        std=std_c,
        role="gallery",
        model_kwargs=kwargs,
        adopted={
            "kind": KIND_WEIGHTS,
            "source": str(src.resolve()),
            "sha256": sha,
            "output": "pooled features, L2-normalised",
        },
    )

    def write(staging: Path) -> ckpt.ModelCard:
        ckpt.atomic_save_tensors(staging / ckpt.WEIGHTS, module.state_dict())
        card.fingerprint = ckpt.file_fingerprint(staging / ckpt.WEIGHTS)
        card.hvs_version = ckpt.hvs_version()
        ckpt.atomic_write_json(staging / ckpt.CONFIG, card.to_dict())  # config.json last
        return card

    return _commit(out, write)


# ----------------------------------------------------------------------------------------------
# Reading an ONNX file.
def _input_spec(proto, where: Path) -> tuple[str, list[int | None]]:
    """(name, [N, C, H, W] with None for a symbolic dim) of the one image input, or AdoptError."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise AdoptError(f"{where}: the ONNX graph has {len(inputs)} inputs; an image encoder takes one image tensor")
    inp = inputs[0]
    t = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    shown = [d if d is not None else "?" for d in dims]
    if not inp.type.HasField("tensor_type") or t.elem_type != 1 or len(dims) != 4:  # 1 = FLOAT
        raise AdoptError(
            f"{where}: ONNX input {inp.name!r} is not an image tensor (float32 N, C, H, W): "
            f"elem_type {t.elem_type}, shape {shown}"
        )
    if dims[2] is not None and dims[3] is not None and dims[2] != dims[3]:
        raise AdoptError(f"{where}: ONNX input {inp.name!r} is {dims[2]}x{dims[3]}; hvs reads square images")
    if dims[1] is not None and dims[1] not in (1, 3):
        raise AdoptError(
            f"{where}: ONNX input {inp.name!r} has {dims[1]} channels, not an image tensor (1 or 3 channels)"
        )
    return inp.name, dims


def onnx_flops(proto, input_shape: tuple[int, int, int]) -> int | None:
    """FLOPs (2 x multiply-accumulates of Conv, Gemm and MatMul, like :func:`hvs.models.cost.count_flops`)
    of one image of ``input_shape``, from ONNX shape inference; None where shapes cannot be inferred."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    for d, v in zip(inp.type.tensor_type.shape.dim, (1, *input_shape)):
        d.Clear()
        d.dim_value = v
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:
        return None
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in m.graph.initializer}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    total = 0
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[1])
        a = shapes.get(node.input[0])
        if not out or not w or not a or 0 in out or 0 in w or 0 in a:
            return None
        if node.op_type == "Conv":
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            total += 2 * int(np.prod(out)) * int(a[0] if trans_a else a[-1])
        else:
            total += 2 * int(np.prod(out)) * int(a[-1])
    return total


def _per_channel(values: list[float] | tuple[float, ...] | None, channels: int, what: str, where: Path) -> list[float]:
    if not values:
        raise AdoptError(f"{where}: no preprocessing {what} given: pass {what} (one value, or one per channel)")
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise AdoptError(
            f"{where}: preprocessing {what} has {len(values)} values but the model reads {channels}-channel images"
        )
    if what == "std" and min(values) <= 0:
        raise AdoptError(f"{where}: preprocessing std must be positive, got {values}")
    return values


def _data_channels(spec: str) -> int:
    """The channels of a dataset's images as its source stores them (its own default)."""
    from .data import create_dataset

    return int(create_dataset(spec, splits=("gallery",)).channels)


def _probe(module: nn.Module, shape: tuple[int, int, int], where: Path) -> int:
    """Run the encoder once on a dummy batch of 2; the embedding dimension, or AdoptError."""
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            raw = module.run(x.numpy()) if isinstance(module, OnnxModule) else module(x)
    except HVSError:
        raise
    except Exception as e:  # ORT / the foreign module raise their own types
        raise AdoptError(
            f"{where}: the encoder fails on a dummy {shape[0]}x{shape[1]}x{shape[2]} batch "
            f"({' '.join(str(e).split())[:200]})"
        ) from None
    out = np.asarray(raw.detach() if isinstance(raw, torch.Tensor) else raw)
    if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        raise AdoptError(
            f"{where}: the encoder's output has shape {tuple(out.shape)} for 2 images, not one vector per "
            "image (N, D): adopt the embedding output, after pooling"
        )
    if not np.isfinite(out).all():
        raise AdoptError(f"{where}: the encoder returns NaN or inf on a dummy batch (broken weights?)")
    return int(out.shape[1])


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _check_out(out: Path) -> None:
    fileio.recover_folder(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdoptError(f"{out} already exists and is not empty; choose another --out")


def adopt_onnx(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    name: str | None = None,
    data: str | None = None,
) -> ckpt.ModelCard:
    """Make the ONNX image encoder ``onnx_path`` the gallery model folder ``out`` (see the module
    docstring). ``channels`` / ``image_size`` default to the graph's static input shape (required
    where it is symbolic) and must agree with it; ``mean`` / ``std`` (one value or one per channel)
    default to an hvs export's recorded preprocessing. ``data``: a dataset spec whose images must
    have the model's channels. Returns the card written; nothing is written on a refusal."""
    from .encoders import import_onnx, ort_session

    onnx, _ = import_onnx()
    src, out = Path(onnx_path), Path(out)
    _check_out(out)
    if not src.is_file():
        raise AdoptError(f"{src}: no such ONNX file")
    try:
        proto = onnx.load_from_string(src.read_bytes())
    except Exception as e:
        raise AdoptError(f"{src}: not a readable ONNX file ({type(e).__name__})") from None
    input_name, dims = _input_spec(proto, src)
    recorded = _hvs_preprocessing(proto)
    c = _agree("channels", channels, dims[1], recorded.get("channels"), src)
    s = _agree("image size", image_size, dims[2] if dims[2] is not None else dims[3], recorded.get("image_size"), src)
    if c not in (1, 3):
        raise AdoptError(f"{src}: channels must be 1 or 3, got {c}")
    mean_c = _per_channel(mean or recorded.get("mean"), c, "mean", src)
    std_c = _per_channel(std or recorded.get("std"), c, "std", src)
    if data is not None and (data_c := _data_channels(data)) != c:
        raise AdoptError(
            f"{src}: the preprocessing reads {c}-channel images but the data {data} has {data_c}-channel images"
        )
    session = ort_session(src, torch.get_num_threads(), where=src)
    module = OnnxModule(session, 0, c, s, None)
    embed_dim = _probe(module, (c, s, s), src)
    sha = _sha256(src)
    card = ckpt.ModelCard(
        model=name or f"onnx:{src.stem}",
        embed_dim=embed_dim,
        in_chans=c,
        image_size=s,
        mean=mean_c,
        std=std_c,
        role="gallery",
        fingerprint=sha[:16],  # = checkpoint.file_fingerprint of the copy in the folder
        adopted={
            "kind": KIND_ONNX,
            "source": str(src.resolve()),
            "sha256": sha,
            "file": ckpt.ADOPTED_ONNX,
            "input": input_name,
            "output": "L2-normalised by hvs",
            "flops": onnx_flops(proto, (c, s, s)),
            "params": int(sum(int(np.prod(i.dims)) for i in proto.graph.initializer)),
        },
        hvs_version=ckpt.hvs_version(),
    )

    def write(staging: Path) -> ckpt.ModelCard:
        shutil.copyfile(src, staging / ckpt.ADOPTED_ONNX)
        if ckpt.file_fingerprint(staging / ckpt.ADOPTED_ONNX) != card.fingerprint:
            raise AdoptError(f"{src}: the file changed while it was being adopted; try again")
        ckpt.atomic_write_json(staging / ckpt.CONFIG, card.to_dict())  # config.json last
        return card

    return _commit(out, write)


def _commit(out: Path, write) -> ckpt.ModelCard:
    """Write the folder through a staging folder (``fileio.replace_folder``): a kill or a failure
    leaves no folder, never a partial one."""
    if out.is_dir():
        out.rmdir()  # empty (checked): replace_folder creates it by a rename
    try:
        return fileio.replace_folder(out, write)
    except BaseException:
        fileio.recover_folder(out)  # removes the staging folder of the failed write
        raise


def _hvs_preprocessing(proto) -> dict[str, Any]:
    """An hvs export's recorded preprocessing ({} for a foreign file)."""
    import json

    for p in proto.metadata_props:
        if p.key == "preprocessing":
            try:
                value = json.loads(p.value)
            except json.JSONDecodeError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def _agree(what: str, given: int | None, in_graph: int | None, recorded: Any, where: Path) -> int:
    """The one value of ``what``: the caller's, the graph's static dim, the recorded one; all that
    are known must agree."""
    if given is not None and in_graph is not None and int(given) != int(in_graph):
        raise AdoptError(f"{where}: {what} {given} given, but the ONNX input has {what} {in_graph}")
    value = given if given is not None else in_graph if in_graph is not None else recorded
    if value is None:
        flag = "--channels" if what == "channels" else "--image-size"
        raise AdoptError(f"{where}: the ONNX input's {what} is symbolic: pass {flag}")
    if int(value) < 1:
        raise AdoptError(f"{where}: {what} must be positive, got {value}")
    return int(value)


__all__ = [
    "AdoptError",
    "BackboneEncoder",
    "OnnxModule",
    "adopt_onnx",
    "adopt_weights",
    "load_backbone_module",
    "load_onnx_module",
    "onnx_flops",
]
