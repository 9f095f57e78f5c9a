"""hvs: compatibility-aware heterogeneous visual search (CMP-NAS, CVPR 2021).

A large gallery model and a small query model share one embedding space, so queries run cheaply
while accuracy stays near the large model's (the paragon). The main job in a few lines::

    import hvs

    hvs.train(hvs.TrainConfig(model="resnet8", data="fashion-mnist", out="runs/gallery"))
    hvs.train(hvs.TrainConfig(model="cnn-tiny", data="fashion-mnist", out="runs/query",
                              gallery="runs/gallery", compat=["bct"]))
    report = hvs.evaluate("runs/gallery", "runs/query", "fashion-mnist")
    hvs.build_gallery_index("runs/gallery", "fashion-mnist", "faiss:runs/index")
    hits = hvs.Searcher("faiss:runs/index", "runs/query").search_files(["shoe.png"], k=5)

The names below are imported on first use, so ``import hvs`` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "HVSError": "hvs.errors",
    "create_model": "hvs.models", "list_models": "hvs.models",
    "create_dataset": "hvs.data", "list_sources": "hvs.data",
    "TrainConfig": "hvs.train", "train": "hvs.train",
    "load_model": "hvs.checkpoint",
    "evaluate": "hvs.evaluate", "evaluate_embeddings": "hvs.evaluate", "format_report": "hvs.evaluate",
    "build_gallery_index": "hvs.search", "Searcher": "hvs.search",
    "open_index": "hvs.index",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'hvs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
