"""Preprocessing and batched embedding, shared by training, evaluation, indexing and search."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.images import to_float as normalize_images  # one preprocessing for every caller


@torch.inference_mode()
def embed_images(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    channels_last: bool = True,
) -> torch.Tensor:
    """Embeddings (N, D) of uint8 images, in eval mode, batch by batch.

    ``channels_last`` converts the model (in place) and the inputs to NHWC: 2-3.5x faster convs on
    this CPU (measured: ResNet-8 2,300 vs 660 img/s at batch 256)."""
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize_images(images[start : start + batch_size], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float())
    model.train(was_training)
    if not out:
        return torch.zeros(0, getattr(model, "embed_dim", 0))
    return torch.cat(out)
