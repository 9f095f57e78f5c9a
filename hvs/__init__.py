"""hvs: compatibility-aware heterogeneous visual search (CMP-NAS, CVPR 2021).

A large gallery model and a small query model share one embedding space, so queries run cheaply
while accuracy stays near the large model's (the paragon). The main job in a few lines::

    import hvs

    hvs.train_model(hvs.TrainConfig(model="resnet8", data="fashion-mnist", out="runs/gallery"))
    hvs.train_model(hvs.TrainConfig(model="cnn-tiny", data="fashion-mnist", out="runs/query",
                                    gallery="runs/gallery", compat=["bct"]))
    report = hvs.evaluate_pair("runs/gallery", "runs/query", "fashion-mnist")
    hvs.build_gallery_index("runs/gallery", "fashion-mnist", "faiss:runs/index")
    hits = hvs.Searcher("faiss:runs/index", "runs/query").search_files(["shoe.png"], k=5)

The names below are imported on first use, so ``import hvs`` stays cheap (no torch until needed).
``train_model`` and ``evaluate_pair`` are :func:`hvs.train.train` and :func:`hvs.evaluate.evaluate`
under names that cannot be shadowed by their modules (importing ``hvs.train`` binds the module
``hvs.train`` on the package).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module" (same name there) or "module:name"
_API = {
    "HVSError": "hvs.errors",
    "create_model": "hvs.models",
    "list_models": "hvs.models",
    "create_dataset": "hvs.data",
    "list_sources": "hvs.data",
    "TrainConfig": "hvs.train",
    "train_model": "hvs.train:train",
    "create_compat_loss": "hvs.losses",
    "list_compat_losses": "hvs.losses",
    "load_model": "hvs.checkpoint",
    "evaluate_pair": "hvs.evaluate:evaluate",
    "evaluate_embeddings": "hvs.evaluate",
    "format_report": "hvs.evaluate",
    "check_pair": "hvs.compat",
    "build_gallery_index": "hvs.search",
    "Searcher": "hvs.search",
    "open_index": "hvs.index",
    "adopt_onnx": "hvs.adopt",
    "adopt_weights": "hvs.adopt",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'hvs' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
