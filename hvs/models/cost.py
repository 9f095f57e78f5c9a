"""Query-side cost: FLOPs, parameters and measured CPU latency.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 x multiply-accumulates of
convolutions and matmuls) at the deployed input size. On CPUs, FLOPs predict latency poorly
(depthwise-heavy nets run ~10 GFLOP/s here, dense convs ~100), so latency is measured as well.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass for a single image of shape (C, H, W), on the model's device (a
    model on the ``meta`` device is counted from shapes alone, without arithmetic). A module torch
    cannot count (an adopted ONNX encoder, :class:`hvs.adopt.OnnxModule`) reports its own
    ``flops_for``."""
    if hasattr(model, "flops_for"):
        return int(model.flops_for(input_shape))
    was_training = model.training
    model.eval()
    param = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def meta_flops(build: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> int:
    """FLOPs of the model ``build()`` makes, built and run on the ``meta`` device: the same count
    as :func:`count_flops` for convolutions and matmuls, without allocating weights or computing
    anything (a 224 px ResNet-50 in ~0.2 s instead of seconds)."""
    with torch.device("meta"):
        return count_flops(build(), input_shape)


def count_params(model: nn.Module) -> int:
    """Parameters of a module (an adopted ONNX encoder reports its graph's: ``param_count``)."""
    if hasattr(model, "param_count"):
        return int(model.param_count())
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    min_seconds: float = 0.3,
) -> float:
    """Median wall time in milliseconds of one forward pass of a batch, in eval mode on the CPU.

    Repeats until both ``repeats`` runs and ``min_seconds`` have passed, so tiny models are timed
    over enough calls to rise above timer noise."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape)
    try:
        return median_call_ms(lambda: model(x), warmup=warmup, repeats=repeats, min_seconds=min_seconds)
    finally:
        model.train(was_training)


def median_call_ms(
    call: Callable[[], object], *, warmup: int = 5, repeats: int = 20, min_seconds: float = 0.3
) -> float:
    """Median wall time in milliseconds of ``call()``, after ``warmup`` calls, over at least ``repeats``
    calls and ``min_seconds`` (at most 10,000 calls): the one timing loop of every latency hvs reports."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 10_000):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)
