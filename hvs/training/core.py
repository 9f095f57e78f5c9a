"""The epoch loop both trainers share, made of short steps (nanoGPT's shape).

A trainer is a :class:`Task` (what one step computes, what a checkpoint holds) over the pieces
here: :class:`Batches` (the data, in memory), :func:`make_optimizer` (SGD or AdamW, warm-up then
cosine), :func:`resume` and :func:`fit` (the epochs, each logged and checkpointed into the run
folder, :mod:`hvs.training.run`)::

    batches = Batches(images, targets, mean, std, batch_size=256, augment={"crop", "flip"}, seed=0)
    opt, sched = make_optimizer(params, cfg, batches.steps_per_epoch)
    start, history = resume(run, task, opt, sched, epochs) if resume_asked else (0, [])
    fit(task, run, batches, opt, sched, epochs=epochs, start_epoch=start, history=history)

Why the loop looks the way it does: images usually live in memory as uint8 tensors and batches
are sliced (no DataLoader workers competing for 2 cores); a file source too large for memory is
an ImageStore whose batches are decoded and augmented by DataLoader workers instead, the same
batches. Shuffling draws from a generator seeded by (seed, epoch) and each batch's augmentation
from a seed of (seed, epoch, step, rank), so a resumed run replays exactly what an uninterrupted
one would have done. On N processes every rank draws the same permutation and
takes every N-th item of each global batch (see :mod:`hvs.train`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from .. import distributed as dist
from ..data.store import is_store
from ..embed import normalize_images
from ..errors import HVSError
from .augment import Augment, create_augment, list_augments, translate_flip
from .run import RunFolder

C = TypeVar("C")
AUGMENTATIONS = tuple(list_augments())
# Environment variable for tests: rank 0 dies abruptly (no cleanup, like SIGKILL) right after
# saving the given 1-based epoch, to prove that a killed multi-process run resumes.
KILL_AFTER_EPOCH_ENV = "HVS_TEST_KILL_AFTER_EPOCH"


class TrainError(HVSError):
    """A training job that cannot start as asked (one-line message)."""


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------


def read_mapping(path: str | os.PathLike | None) -> dict[str, Any]:
    """A YAML or JSON file of options (a mapping), or {} for None."""
    if not path:
        return {}
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        loaded = yaml.safe_load(text) or {}
    else:
        loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise TrainError(f"{path}: a config file must hold a mapping of options")
    return loaded


def config_from_dict(cls: type[C], d: dict[str, Any], what: str, error: type[HVSError] = TrainError) -> C:
    """The config dataclass ``cls`` from a mapping; an unknown option is an error naming it."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise error(f"unknown {what} option(s): {', '.join(unknown)}")
    return cls(**d)


def parse_augment(spec: str, error: type[HVSError] = TrainError) -> Augment:
    """``"crop,flip"`` -> the :class:`~hvs.training.augment.Augment` it names; ``"none"`` -> an
    empty (falsy) one. A bad name is ``error`` listing the valid ones (:mod:`hvs.training.augment`)."""
    return create_augment(spec, error)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``auto`` is CUDA (this process's ``cuda:LOCAL_RANK``) when torch sees it, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    raise TrainError(f"unknown device {name!r}; use auto, cpu or cuda")


# ------------------------------------------------------------------------------------------
# Optimizer and schedule
# ------------------------------------------------------------------------------------------


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(
    params: list, cfg: Any, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (Nesterov) or AdamW with per-step linear warm-up then cosine decay to zero.

    ``cfg`` is any config with optimizer, lr, momentum, weight_decay, warmup_epochs and epochs
    (the model trainer's and the supernet trainer's)."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise TrainError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    return opt, sched


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, kinds: set[str], gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` px (zero padding) and horizontal flip, per sample
    (the ``crop`` and ``flip`` of :mod:`hvs.training.augment`)."""
    return translate_flip(x, kinds, gen, pad=pad)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in one epoch (shuffle, augmentation, sub-network sampling)."""
    return seed * 100_003 + epoch


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of one batch's augmentation: a function of (seed, epoch, step, rank) only, so a
    batch is the same wherever it is prepared (this process or a DataLoader worker)."""
    return ((epoch_seed(seed, epoch) * 1_000_003 + step) * 1_009 + rank) % (1 << 63)


class PrepareBatch:
    """uint8 batch ``k`` of an epoch -> normalised, augmented float batch (picklable: a streamed
    store runs it in its DataLoader workers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], aug: Augment, seeds: Sequence[int]) -> None:
        self.mean, self.std, self.aug, self.seeds = tuple(mean), tuple(std), aug, list(seeds)

    def __call__(self, images: torch.Tensor, k: int) -> torch.Tensor:
        if not self.aug:
            return normalize_images(images, self.mean, self.std)
        return self.aug(images, self.mean, self.std, self.seeds[k])


@dataclass
class Batches:
    """Training batches of uint8 images, this rank's share of each global batch.

    ``images`` is a uint8 (N, C, H, W) tensor in memory (batches are sliced from it) or an
    :class:`~hvs.data.store.ImageStore` (batches are decoded, normalised and augmented in its
    DataLoader workers, ``workers`` of them, default the store's); both give the same batches.

    An epoch is a permutation drawn from a generator seeded by (seed, epoch), the same on every
    rank, cut into ``steps_per_epoch`` global batches of ``batch`` images (the last partial batch
    is dropped, for BatchNorm); rank ``r`` of ``world`` takes every ``world``-th image of each
    from position ``r``. Each batch is augmented from its own seed (:func:`batch_seed`, which
    includes the rank, so no two ranks crop or flip alike). ``augment``: an
    :class:`~hvs.training.augment.Augment`, a spec string or a set of names."""

    images: torch.Tensor
    targets: torch.Tensor
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int  # the global batch asked for
    augment: Any
    seed: int = 0
    channels_last: bool = True
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world: int = 1
    workers: int | None = None  # DataLoader workers for streamed images (None: the store's own)

    def __post_init__(self) -> None:
        self.augment = create_augment(self.augment, TrainError)
        self.n = int(self.images.shape[0])
        self.steps_per_epoch = max(1, self.n // self.batch_size)
        local = min(self.batch_size, self.n) // self.world  # this rank's share of the global batch
        if local < 1:
            raise TrainError(f"{self.n} training images cannot be shared by {self.world} processes")
        self.batch = local * self.world  # the global batch

    def indices(self, epoch: int) -> list[torch.Tensor]:
        """This rank's image indices of each step of ``epoch``."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=gen)
        return [
            perm[step * self.batch : (step + 1) * self.batch][self.rank :: self.world]
            for step in range(self.steps_per_epoch)
        ]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of each step of ``epoch``: normalised, augmented, on the device."""
        idx = self.indices(epoch)
        seeds = [batch_seed(self.seed, epoch, step, self.rank) for step in range(len(idx))]
        prepare = PrepareBatch(self.mean, self.std, self.augment, seeds)
        if is_store(self.images):
            xs = self.images.batches(
                idx, workers=self.workers, transform=prepare, pin_memory=self.device.type == "cuda"
            )
        else:
            xs = (prepare(self.images[i], k) for k, i in enumerate(idx))
        for k, x in enumerate(xs):
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.targets[idx[k]].to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


class Task(Protocol):
    """What a trainer adds to the loop: one step, and what its checkpoint holds.

    ``metrics``: the names summed over an epoch's steps and logged as their mean (``loss``, the
    total the core adds, first). ``step`` runs the forward and backward pass of one batch, adds
    its terms to ``sums`` and returns the total loss; the core zeroes the gradients before and
    steps the optimizer after. ``begin_epoch`` returns fields logged before the metrics
    (e.g. the phase), ``end_epoch`` fields logged after them."""

    metrics: list[str]
    error: type[HVSError]

    def begin_epoch(self, epoch: int) -> dict[str, Any]: ...

    def step(self, x: torch.Tensor, y: torch.Tensor, sums: dict[str, float]) -> float: ...

    def end_epoch(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def save(self, epoch: int, row: dict[str, Any]) -> None: ...


class _Hooks:
    """Test seam: called after each finished epoch (a test raises here to simulate a kill)."""

    after_epoch: Callable[[int], None] = staticmethod(lambda epoch: None)


hooks = _Hooks()


def kill_if_asked(epoch: int) -> None:
    value = os.environ.get(KILL_AFTER_EPOCH_ENV, "").strip()
    if value and int(value) == epoch + 1 and dist.is_main():
        os._exit(137)  # the exit status of a SIGKILLed process; skips every cleanup on purpose


def resume(
    run: RunFolder, task: Task, opt: torch.optim.Optimizer, sched: Any, epochs: int, log: Callable[[str], None] = print
) -> tuple[int, list[dict]]:
    """Load the run's last checkpoint into the task, optimizer and schedule: (next epoch, history).
    (0, []) when the run has no checkpoint yet."""
    if not run.has_state():
        return 0, []
    state = run.load_state()
    task.load_state(state)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    start = int(state["epoch"]) + 1
    log(f"resuming {run.path} after epoch {start} of {epochs}")
    return start, json.loads(state["history"])


def fit(
    task: Task,
    run: RunFolder,
    batches: Batches,
    opt: torch.optim.Optimizer,
    sched: Any,
    *,
    epochs: int,
    start_epoch: int = 0,
    history: list[dict] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train ``epochs`` epochs from ``start_epoch``: after each, log its row and (rank 0) write the
    log and a checkpoint. Returns the history (one row per epoch since the run began)."""
    history = list(history or [])
    main = dist.is_main()
    for epoch in range(start_epoch, epochs):
        row = train_epoch(task, batches, opt, sched, epoch, epochs, progress=progress and main)
        history.append(row)
        log("  ".join(f"{k}={v}" for k, v in row.items()))
        if main:
            task.save(epoch, row)
            run.save_epoch(
                history,
                {
                    **task.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch,
                    "history": json.dumps(history),
                },
            )
        hooks.after_epoch(epoch)
        kill_if_asked(epoch)
    return history


def train_epoch(
    task: Task,
    batches: Batches,
    opt: torch.optim.Optimizer,
    sched: Any,
    epoch: int,
    epochs: int,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """One epoch of steps; returns its log row (metrics averaged over steps and ranks)."""
    from tqdm import tqdm

    before = task.begin_epoch(epoch)
    sums = dict.fromkeys(task.metrics, 0.0)
    steps = batches.steps_per_epoch
    desc = f"epoch {epoch + 1}/{epochs}" + "".join(f" [{v}]" for v in before.values())
    bar = tqdm(batches.epoch(epoch), total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(bar):
        opt.zero_grad(set_to_none=True)
        loss = task.step(x, y, sums)
        if not math.isfinite(loss):
            raise task.error(f"loss became {loss} at epoch {epoch + 1} step {step}; lower --lr")
        opt.step()
        sched.step()
        sums["loss"] += loss
        bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")  # rank 0's share only
    bar.close()
    sums = dist.mean_over_ranks(sums)  # every rank had an equal share: the mean is the global mean
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        **before,
        **{k: round(v / steps, 5) for k, v in sums.items()},
        **task.end_epoch(),
        "lr": round(sched.get_last_lr()[0], 6),
        "seconds": round(seconds, 2),
        "images_per_s": round(steps * batches.batch / seconds, 1),
    }


# ------------------------------------------------------------------------------------------
# The model folder
# ------------------------------------------------------------------------------------------


def save_trained_model(
    out: str | os.PathLike, model: torch.nn.Module, card: Any, classifier: torch.Tensor | None = None
) -> Any:
    """Write a trained model as a model folder (weights, classifier, then its card, fingerprinted).

    The weights are stored contiguously: safetensors refuses the channels_last tensors training
    leaves (the module is converted back in place)."""
    from .. import checkpoint as ckpt

    model = model.to(memory_format=torch.contiguous_format)
    model.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    return ckpt.save_model_folder(out, model, card, classifier=None if classifier is None else classifier.detach())
