"""Local pretrained weights: load a safetensors or torch state dict into a model's backbone.

Nothing is downloaded: the file is one the user has (a timm or torchvision release, a training
checkpoint of their own). The keys are those of the library network inside the backbone --
timm's for ``timm:NAME`` and the timm-based registered models (``mobilenetv3_large``, ...),
torchvision's for ``torchvision:NAME``, ``resnet18/34/50`` and ``shufflenetv2_*`` (torchvision's
and timm's ResNet keys coincide, so a timm ResNet file loads into ``resnet50`` as well). A
torchvision MobileNet or EfficientNet file therefore goes with ``torchvision:mobilenet_v3_large``,
a timm one with ``mobilenetv3_large`` / ``timm:mobilenetv3_large_100``: the two libraries name
those layers differently and no key mapping is guessed. hvs's own architectures (CIFAR ResNets,
plain CNNs, ``ofa-mbv3``) take their backbone's own keys.

The rules (:func:`load_pretrained`):

* a file may hold the state dict itself, or a checkpoint dict holding it under ``state_dict``,
  ``model`` or ``state_dict_ema``; a ``module.`` prefix (DDP) is stripped;
* classifier keys in the file (``fc.``, ``classifier.``, ``head.``, ``heads.``, ``last_linear.``)
  that the backbone does not have are ignored: the embedding head replaces the classifier;
* any other unexpected key, a missing key or a shape mismatch is a one-line error naming the
  first few; a truncated or corrupt file is a one-line error naming the file;
* a first conv trained on 3 channels loads into a 1-channel (or other) stem as timm adapts it
  (``timm.models.adapt_input_conv``: summed for 1 channel, repeated and rescaled otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import HVSError
from ..fileio import sha256_file
from .embedding import EmbeddingModel

HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "last_linear.")
CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema")
_SHOW = 3  # keys named in an error


class PretrainedError(HVSError):
    """A weights file that cannot be read or does not fit the architecture (one-line message)."""


def file_sha256(path: str | os.PathLike) -> str:
    """The full SHA-256 (hex) of a file: what a model folder records of its pretrained weights."""
    return sha256_file(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch-saved state dict (or checkpoint holding one)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        torch_file = head.startswith(b"PK") or head[:1] == b"\x80"  # a torch.save zip, or a legacy pickle
        if path.suffix == ".safetensors" or not torch_file:
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for damaged files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PretrainedError(f"pretrained weights {path}: cannot read, truncated or corrupt ({msg})") from None
    if isinstance(state, dict):
        for key in CHECKPOINT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"pretrained weights {path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def target_module(model: nn.Module) -> nn.Module:
    """The module whose keys a weights file holds: the library network inside a backbone (its
    ``net``), or the backbone itself for hvs's own architectures."""
    backbone = model.backbone if isinstance(model, EmbeddingModel) else model
    net = getattr(backbone, "net", None)
    return net if isinstance(net, nn.Module) else backbone


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> str:
    """Load the weights file ``path`` into the backbone of ``model`` (an EmbeddingModel or a
    backbone) in place; returns the file's SHA-256. The embedding head is left as it is."""
    path = Path(path)
    state = read_state_dict(path)
    target = target_module(model)
    own = target.state_dict()
    ignored = [k for k in state if k not in own and k.startswith(HEAD_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in ignored}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not _is_counter(k)]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) {_names(unexpected)}")
        raise PretrainedError(
            f"pretrained weights {path} do not fit {type(target).__name__}: {'; '.join(parts)} "
            "(timm and torchvision name layers differently: pick the architecture of the file's library)"
        )
    state = _adapt_first_conv(own, state)
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:_SHOW])
        more = f" and {len(wrong) - _SHOW} more" if len(wrong) > _SHOW else ""
        raise PretrainedError(f"pretrained weights {path}: shape mismatch (file vs model) {shapes}{more}")
    target.load_state_dict(state, strict=False)  # every key checked above; only counters may be absent
    return file_sha256(path)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm's step counter: absent from many releases


def _adapt_first_conv(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A first conv of another input-channel count adapted as timm does for ``in_chans``."""
    first = next((k for k, v in own.items() if v.ndim == 4), None)
    if first is None or first not in state:
        return state
    w, want = state[first], own[first]
    if w.ndim == 4 and w.shape[1] != want.shape[1] and (w.shape[0], *w.shape[2:]) == (want.shape[0], *want.shape[2:]):
        from timm.models import adapt_input_conv

        state = dict(state)
        state[first] = adapt_input_conv(want.shape[1], w.float()).to(w.dtype)
    return state


__all__ = ["HEAD_PREFIXES", "PretrainedError", "file_sha256", "load_pretrained", "read_state_dict", "target_module"]
