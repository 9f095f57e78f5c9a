"""Multi-process helpers for ``torchrun``: one process per device, configured by environment only.

``torchrun`` (``python -m torch.distributed.run``) starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each; nothing here takes a
rank or an address as an argument (nanoGPT's recipe). Without those variables, or with
``WORLD_SIZE=1``, every helper is a no-op on a single process, so library code calls them
unconditionally::

    from hvs import distributed as dist

    info = dist.init()                 # process group if launched by torchrun, else nothing
    if dist.is_main():
        print("only rank 0 writes files and logs")
    dist.barrier()
    refs = dist.all_gather(local_refs)  # (world * B, D); gradient flows into the local part
    # the process group made by init() is left at exit (dist.cleanup())

The backend follows the device: ``nccl`` when the processes use CUDA, ``gloo`` on CPUs.

:class:`CPUSyncBatchNorm` stands in for ``torch.nn.SyncBatchNorm``, which only runs on GPUs: on
CPU processes (gloo) it computes BatchNorm statistics over the global batch, so a multi-process
CPU run normalises exactly like one process with the whole batch.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import HVSError

T = TypeVar("T")


class DistributedError(HVSError):
    """A failure on one rank, raised on every rank so none is left waiting (one-line message)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (single process)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment variables (1 process if unset)."""

    def get(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value.strip() else default
        except ValueError:
            raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None

    world = get("WORLD_SIZE", 1)
    return DistInfo(
        rank=get("RANK", 0) if world > 1 else 0, world_size=world, local_rank=get("LOCAL_RANK", 0) if world > 1 else 0
    )


def default_backend(device: torch.device | str | None = None) -> str:
    """``nccl`` for CUDA processes, ``gloo`` otherwise (``device`` None: CUDA if available)."""
    if device is None:
        return "nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(
    backend: str | None = None, *, device: torch.device | str | None = None, timeout_s: float | None = None
) -> DistInfo:
    """Join the process group torchrun set up; a no-op without ``WORLD_SIZE`` > 1.

    Idempotent: if a process group already exists (a caller's own script made it, or an earlier
    call), it is used as is, so one torchrun process may train several models and build an index
    in turn. A group made here lives until the process exits (then :func:`cleanup` runs): under
    torchrun a destroyed group cannot be made again (``init_process_group`` waits forever). For
    ``nccl`` the current CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process). Returns
    where this process stands; ``backend`` is None on a single process."""
    if tdist.is_available() and tdist.is_initialized():
        return info()
    env = env_info()
    if not env.distributed:
        return env
    if not tdist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or default_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    tdist.init_process_group(**kwargs)
    atexit.register(cleanup)
    return info()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def info() -> DistInfo:
    """Where this process stands in the current process group (rank 0 of 1 without one)."""
    if not is_initialized():
        return DistInfo()
    env = env_info()
    return DistInfo(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=env.local_rank,
        backend=str(tdist.get_backend()),
    )


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one process that logs and writes files (and on a single process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def cleanup() -> None:
    """Leave the process group (if any); safe to call twice or on a single process. Runs at exit
    for a group :func:`init` made; call it earlier only when this process needs no group again."""
    if is_initialized():
        tdist.destroy_process_group()


def _collective_device() -> torch.device:
    """Tensors for collectives must live on the backend's device (CUDA for nccl)."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GatherLocalGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward passes each rank the gradient of its own rows.

    The gradient of the *local* loss with respect to the local input is exactly the slice of the
    output gradient that belongs to this rank; contributions that other ranks' losses make
    through their copies of our rows are dropped (open_clip's default ``gather_with_grad=False``).
    With a frozen reference model (the gallery model) the gathered tensor needs no gradient at
    all, so nothing is lost there."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        top = max(sizes)
        padded = torch.zeros((top, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        tdist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (the tensor itself on one
    process). Ranks may hold different numbers of rows; the other dimensions must agree.
    Gradient flows back into this rank's own rows only (see :class:`_GatherLocalGrad`)."""
    if world_size() == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes_t = [torch.zeros_like(n) for _ in range(world_size())]
    tdist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    return _GatherLocalGrad.apply(tensor, sizes, rank())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: d(sum_r x_r)/dx_q = 1, and every rank's loss depends on
    the sum, so the backward is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, differentiable (the tensor itself on one process)."""
    return tensor if world_size() == 1 else _AllReduceSum.apply(tensor)


@torch.no_grad()
def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of numbers over ranks (for logging: each rank's mean over equal batches)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    tdist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.cpu().tolist()))


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def run_together(fn: Callable[[], T], *, only_main: bool = False) -> T | None:
    """Run ``fn`` (on every rank, or on rank 0 only) and make a failure anywhere fail everywhere.

    A collective after an exception on one rank would leave the others waiting until the timeout
    (30 min by default); here every rank learns of the first failure and raises it (the failing
    rank re-raises its own exception, the others a :class:`DistributedError` naming it)."""
    result, error = None, None
    if not only_main or is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - reported on every rank, re-raised below
            error = e
    if world_size() == 1:
        if error is not None:
            raise error
        return result
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for r, msg in enumerate(messages):
        if msg is not None:
            raise DistributedError(f"rank {r} failed: {msg.splitlines()[0]}")
    return result


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all ranks, for CPU (gloo) processes.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors. This computes the batch mean and the variance
    with two differentiable all-reduces (sum and count, then the sum of squared deviations: two
    passes, as stable as the single-process kernel), so forward and backward equal those of one
    BatchNorm over the concatenated batch. The price is four small collectives per layer and
    step (two forward, two backward), which dominates for small models on CPUs. Outside
    training, or on one process, it is plain BatchNorm. State-dict keys are those of
    ``BatchNorm*d``, so saved weights load into the ordinary model."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        c = x.shape[1]
        local_count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([x.sum(dims), local_count]))  # one collective for sum and count
        count = sums[c:]
        mean = sums[:c] / count
        var = all_reduce_sum((x - mean.view(shape)).pow(2).sum(dims)) / count  # biased, as BatchNorm uses
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / max(n - 1, 1), alpha=factor)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Every BatchNorm layer of ``module`` synchronised over ranks: ``torch.nn.SyncBatchNorm`` on
    GPUs, :class:`CPUSyncBatchNorm` on CPUs. Parameters and running statistics are kept."""
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


__all__ = [
    "CPUSyncBatchNorm",
    "DistInfo",
    "DistributedError",
    "all_gather",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "convert_sync_batchnorm",
    "default_backend",
    "env_info",
    "info",
    "init",
    "is_initialized",
    "is_main",
    "mean_over_ranks",
    "rank",
    "run_together",
    "world_size",
]
