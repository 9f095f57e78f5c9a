"""Gallery embedding on several processes: ranks embed disjoint shards, rank 0 writes the index.

Launched by ``torchrun`` (environment variables only, like training)::

    torchrun --standalone --nproc_per_node 4 -m hvs index build ...     # a CLI that calls this
    torchrun --standalone --nproc_per_node 4 my_build.py                # or a script:

    from hvs.index.distributed_build import build_gallery_index_distributed
    build_gallery_index_distributed("runs/gallery", "fashion-mnist", "faiss:runs/index")

It reuses :func:`hvs.index.build_index` and its shard format unchanged:

1. rank 0 validates the job and writes the work folder's manifest (``WORK/build.json``);
2. every rank embeds the shards ``i`` with ``i % world_size == rank`` into the shared work folder
   (``build_index(..., only_shards=...)``: atomic ``shard_NNNNN.npy`` + ``.ids.npy`` files);
3. rank 0 calls ``build_index`` once more, which finds every shard finished and writes the index
   in one step, exactly as after a resumed single-process build.

So the index equals the single-process one: the same ids (item ``i`` gets id ``i``), labels,
sources and vectors (bit-identical on CPUs; on GPUs up to the kernels' rounding). A killed build
resumes with any number of processes, a shard being finished whoever embedded it. The work folder
must be on a filesystem every rank sees (always true on one node). The sidecar's
``build_report`` counts the shards as reused (rank 0 found them embedded);
``distributed_build`` records the world size. Without torchrun it is plain ``build_index``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .. import distributed as dist
from .base import GalleryIndex
from .build import build_index


def build_index_distributed(
    spec: str,
    images: Any,
    labels: Sequence[str],
    sources: Sequence[str] | None,
    embed_fn: Callable[[Any], np.ndarray],
    *,
    factory: str = "Flat",
    meta: dict,
    batch_size: int = 256,
    shard_size: int = 4096,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    timeout_s: float = 24 * 3600,
) -> GalleryIndex | None:
    """:func:`hvs.index.build_index` with the embedding spread over torchrun's processes.

    Every rank passes the same arguments (each holds the whole gallery, embeds only its shards).
    Returns the index on rank 0 and None on the others, after rank 0 has written it. A failure on
    any rank raises on every rank. Joins the process group if torchrun launched this and none
    exists yet (gloo: only barriers and small objects travel, ``embed_fn`` may still use a GPU;
    ``timeout_s`` is how long a rank then waits for the slowest one)."""
    kwargs = dict(
        factory=factory, meta=meta, batch_size=batch_size, shard_size=shard_size, work_dir=work_dir, skip_bad=skip_bad
    )
    dist.init(backend="gloo", timeout_s=timeout_s)
    world, rank = dist.world_size(), dist.rank()
    if world == 1:
        return build_index(spec, images, labels, sources, embed_fn, progress=progress, **kwargs)
    n_shards = math.ceil(len(labels) / shard_size) if shard_size > 0 else 0
    # 1. rank 0 alone checks the job and writes the manifest (concurrent first writes would race)
    dist.run_together(
        lambda: build_index(spec, images, labels, sources, embed_fn, progress=False, only_shards=(), **kwargs),
        only_main=True,
    )
    # 2. every rank embeds its round-robin share of the shards
    mine = range(rank, n_shards, world)
    dist.run_together(
        lambda: build_index(
            spec, images, labels, sources, embed_fn, progress=progress and rank == 0, only_shards=mine, **kwargs
        )
    )
    # 3. rank 0 finds every shard finished and writes the index
    merged = dict(kwargs, meta=dict(meta, distributed_build={"world_size": world, "n_shards": n_shards}))
    index = dist.run_together(
        lambda: build_index(spec, images, labels, sources, embed_fn, progress=False, **merged), only_main=True
    )
    return index if rank == 0 else None


def build_gallery_index_distributed(
    gallery_model: str | os.PathLike,
    data: str,
    out: str,
    *,
    split: str = "gallery",
    factory: str = "Flat",
    protocol: str = "closed",
    batch_size: int = 256,
    shard_size: int = 4096,
    progress: bool = True,
    strict: bool = False,
    device: str = "auto",
    **data_kwargs,
) -> GalleryIndex | None:
    """:func:`hvs.search.build_gallery_index` on torchrun's processes (same arguments and result).

    ``device``: ``auto`` embeds on ``cuda:LOCAL_RANK`` when CUDA is available, else on the CPU
    (``cpu`` / ``cuda`` to choose). Returns the index on rank 0, None on the other ranks."""
    from ..embed import embed_images, normalize_images
    from ..search import gallery_inputs

    model, card, images, labels, sources, meta = gallery_inputs(
        gallery_model, data, split=split, protocol=protocol, strict=strict, **data_kwargs
    )

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise dist.DistributedError(f"unknown device {device!r}; use auto, cpu or cuda")
    target = torch.device("cuda", dist.env_info().local_rank) if device == "cuda" else torch.device("cpu")

    if target.type == "cpu":

        def embed_fn(batch: torch.Tensor) -> np.ndarray:  # the single-process path, bit for bit
            return embed_images(model, batch, card.mean, card.std, batch_size).numpy()
    else:
        model.to(target, memory_format=torch.channels_last).eval()

        @torch.inference_mode()
        def embed_fn(batch: torch.Tensor) -> np.ndarray:
            x = normalize_images(batch, card.mean, card.std).to(target, non_blocking=True)
            return model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

    return build_index_distributed(
        out,
        images,
        labels,
        sources,
        embed_fn,
        factory=factory,
        meta=meta,
        batch_size=batch_size,
        shard_size=shard_size,
        progress=progress,
    )


__all__ = ["build_gallery_index_distributed", "build_index_distributed"]
