"""One trainer for both roles: the gallery (paragon) model and compatible query models.

Gallery model::

    hvs train --data fashion-mnist --model resnet8 --epochs 5 --out runs/gallery

Query model, compatible with that gallery model (BCT influence loss, optionally composed with
feature regression and cross-model contrastive terms)::

    hvs train --data fashion-mnist --model cnn-tiny --gallery runs/gallery --compat bct --out runs/q-bct
    hvs train ... --compat bct=1 --compat l2=0.5

An interrupted run continues from its last finished epoch with ``--resume`` (same command).

Data-parallel on several processes (DDP), launched by ``torchrun``; the same flags, and
``--batch-size`` stays the *global* batch (each of N processes takes batch_size / N of it)::

    # one process (CPU, or one GPU if CUDA is available)
    hvs train --data fashion-mnist --model resnet8 --epochs 5 --out runs/gallery
    # one node, 8 GPUs (nccl) -- or 8 CPU processes (gloo) where there is no CUDA
    torchrun --standalone --nproc_per_node 8 -m hvs train --data fashion-mnist --model resnet8 --out runs/gallery
    # two nodes of 8 GPUs: run on each node, --node_rank 0 on the master (the one at --master_addr)
    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 --nproc_per_node 8 \
        -m hvs train --data fashion-mnist --model resnet8 --out /shared/runs/gallery
    torchrun --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500 --nproc_per_node 8 \
        -m hvs train --data fashion-mnist --model resnet8 --out /shared/runs/gallery

Why the loop looks the way it does: images live in memory as uint8 tensors and batches are sliced
(no DataLoader workers competing for 2 cores); augmentation is done on whole batches; shuffling and
augmentation draw from a generator seeded by (seed, epoch), so a resumed run replays exactly what
an uninterrupted one would have done.

How several processes divide the work (everything comes from torchrun's environment variables,
see :mod:`hvs.distributed`; without them nothing below happens and no process group is made):

- every rank draws the same permutation from the (seed, epoch) generator; global batch ``s`` is
  ``perm[s*B:(s+1)*B]`` exactly as on one process, and rank ``r`` takes every N-th item of it
  from position ``r`` (``DistributedSampler`` semantics: the ranks' shares are disjoint and
  together are the single-process batch). The last partial batch is dropped, as on one process,
  so N processes run the same number of steps and the same learning-rate schedule as one;
- gradients are averaged by DDP; the model is initialised from ``seed`` on every rank (and DDP
  broadcasts rank 0's weights anyway); augmentation draws from a generator offset by rank (rank 0
  keeps the single-process one);
- BatchNorm: by default each rank normalises with its own share's statistics (B/N images), the
  usual DDP behaviour and the fastest; DDP copies rank 0's running statistics to the others, so
  the saved model holds rank 0's. Trajectories then differ from one process with batch B, the
  more so the smaller B/N (in the tests, 16 images per rank: ~20% in the first epoch's loss).
  ``sync_bn: true`` (config file) computes the statistics over the global batch instead:
  ``torch.nn.SyncBatchNorm`` on GPUs, :class:`hvs.distributed.CPUSyncBatchNorm` on CPUs, and N
  processes then follow the single-process trajectory up to float rounding (costs four small
  all-reduces per BatchNorm layer per step: worth it on GPUs, slow for small models on CPUs);
- the ``contrastive`` compatibility loss sees the gallery embeddings of the *global* batch
  (all-gathered), so its negatives are the same as on one process; ``bct`` and ``l2`` are per
  image and need nothing;
- the logged losses and accuracy are averaged over ranks; only rank 0 logs, shows progress and
  writes (train_config.json, log.csv, state.pt, the model folder); the others wait at a barrier
  before returning. ``--resume`` works with any number of processes: every rank loads state.pt,
  so a multi-node run folder must be on a filesystem all nodes share.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HVSError
from . import checkpoint as ckpt
from . import distributed as dist
from .data import RetrievalData, create_dataset
from .embed import embed_images, normalize_images
from .losses import (BCTLoss, CrossModelContrastive, L2Regression, MarginHead, parse_compat,
                     synthesize_gallery_classifier)
from .models import create_model
from .training.run import LOG, STATE, TRAIN_CONFIG, RunFolder  # noqa: F401  (LOG, STATE, TRAIN_CONFIG: re-exported)



class TrainError(HVSError):
    """A training job that cannot start as asked (one-line message)."""


@dataclass
class TrainConfig:
    out: str
    data: str = "fashion-mnist"
    protocol: str = "closed"
    image_size: int | None = None
    model: str = "resnet8"
    model_kwargs: dict = field(default_factory=dict)
    embed_dim: int = 128
    gallery: str | None = None  # folder of the frozen gallery model: makes this a query model
    init_from: str | None = None  # model folder whose weights (and classifier, same classes) start training
    role: str | None = None  # "gallery" | "query"; default: query when --gallery is given
    compat: list[str] = field(default_factory=list)  # e.g. ["bct"], ["bct=1", "l2=0.5"]
    loss: str = "cosface"  # normface | cosface | arcface
    scale: float = 16.0
    margin: float = 0.2
    epochs: int = 5
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.3
    augment: str = "crop,flip"  # comma list of crop, flip; "none"
    train_subset: int | None = None  # use only the first N (shuffled) training images
    seed: int = 0
    data_seed: int = 0  # fixes the query/gallery split independently of the training seed
    threads: int | None = None
    channels_last: bool = True
    device: str = "auto"  # auto (cuda:LOCAL_RANK if CUDA is available, else cpu) | cpu | cuda
    sync_bn: bool = False  # multi-process runs: BatchNorm statistics over the global batch
    force: bool = False  # allow a gallery model whose preprocessing differs
    strict: bool = False  # unreadable images are an error instead of skipped

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)


# Keys that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"threads", "out", "force", "strict", "device"}
# Environment variable for tests: rank 0 dies abruptly (no cleanup, like SIGKILL) right after
# saving the given 1-based epoch, to prove that a killed multi-process run resumes.
KILL_AFTER_EPOCH_ENV = "HVS_TEST_KILL_AFTER_EPOCH"


def _augment(x: torch.Tensor, kinds: set[str], gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` px (zero padding) and horizontal flip, per sample."""
    n, c, h, w = x.shape
    if "crop" in kinds:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
        bi = torch.arange(n)[:, None, None, None]
        ci = torch.arange(c)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if "flip" in kinds:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _init_weights(model: nn.Module, head: MarginHead, classes: list[str], folder: str) -> None:
    """Start from a model folder's weights (a fine-tune); its classifier too when its rows are our classes."""
    init, init_card = ckpt.load_model(folder)
    try:
        model.load_state_dict(init.state_dict())
    except RuntimeError as e:
        raise TrainError(f"--init-from {folder}: its weights do not fit model {init_card.model} as configured "
                         f"({str(e).splitlines()[0]})") from None
    if init_card.classes == classes and (Path(folder) / ckpt.CLASSIFIER).is_file():
        head.weight.data.copy_(ckpt.load_classifier(folder))


def make_optimizer(params: list, cfg: Any, steps_per_epoch: int
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    return opt, sched


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


class _Hooks:
    """Test seam: called after each finished epoch (a test raises here to simulate a kill)."""

    after_epoch: Callable[[int], None] = staticmethod(lambda epoch: None)


hooks = _Hooks()


def _kill_if_asked(epoch: int) -> None:
    value = os.environ.get(KILL_AFTER_EPOCH_ENV, "").strip()
    if value and int(value) == epoch + 1 and dist.is_main():
        os._exit(137)  # the exit status of a SIGKILLed process; skips every cleanup on purpose


class _Net(nn.Module):
    """Model and classifier head as one module, so DDP averages the gradients of both."""

    def __init__(self, model: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model(x)
        return emb, self.head(emb, y)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    raise TrainError(f"unknown device {name!r}; use auto, cpu or cuda")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          data: RetrievalData | None = None, log: Callable[[str], None] = print) -> ckpt.ModelCard:
    """Train a model as configured; returns the card of the finished model folder ``cfg.out``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group (nccl for CUDA, gloo for
    CPU; see :func:`hvs.distributed.init`) and trains data-parallel; every rank returns the card
    once rank 0 has written the model folder. See the module docstring for how the work is
    divided."""
    from tqdm import tqdm

    device = _resolve_device(cfg.device, dist.env_info().local_rank)
    dist.init(device=device)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if not main:
        log = _quiet
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    compat = parse_compat(cfg.compat)
    if compat and not cfg.gallery:
        raise TrainError("compatibility losses need a frozen gallery model: pass --gallery DIR")
    if cfg.role not in (None, "gallery", "query"):
        raise TrainError(f"unknown role {cfg.role!r}; use gallery or query")
    aug = {a for a in cfg.augment.split(",") if a and a != "none"}
    if aug - {"crop", "flip"}:
        raise TrainError(f"unknown augmentation(s) {sorted(aug - {'crop', 'flip'})}; use crop, flip or none")
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over the "
                         f"{world} processes")

    # The run folder: refuse to overwrite, resume only a matching configuration. Every rank checks
    # (so every rank fails alike); rank 0 records the configuration once the data and model are built.
    run = RunFolder(out, TrainError)
    run.check(asdict(cfg), asdict(TrainConfig(out=cfg.out)), resume=resume, resume_free=_RESUME_FREE)

    if data is None:
        data = create_dataset(cfg.data, protocol=cfg.protocol, image_size=cfg.image_size, seed=cfg.data_seed,
                              strict=cfg.strict)
    log(data.summary())
    if world > 1:
        log(f"data-parallel on {world} processes ({dist.info().backend}, {device.type}): global batch "
            f"{cfg.batch_size} = {world} x {cfg.batch_size // world}"
            + (", BatchNorm synchronised" if cfg.sync_bn else ", BatchNorm per process"))
    train_split = data.train
    if len(train_split) == 0:
        raise TrainError(f"{cfg.data}: the train split is empty")

    # Classifier rows = the training classes in sorted order of their global label.
    train_labels = train_split.labels
    class_ids = torch.unique(train_labels)
    row_of = torch.full((len(data.classes),), -1, dtype=torch.long)
    row_of[class_ids] = torch.arange(len(class_ids))
    targets_all = row_of[train_labels]
    classes = [data.classes[i] for i in class_ids.tolist()]

    order = torch.arange(len(train_split))
    if cfg.train_subset and cfg.train_subset < len(order):
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(cfg.data_seed))[:cfg.train_subset]
    images, targets = train_split.images[order], targets_all[order]
    n = images.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)  # drop the last partial batch (BatchNorm)
    batch = min(cfg.batch_size, n)  # the global batch
    local_batch = batch // world  # this rank's share of it
    if local_batch < 1:
        raise TrainError(f"{n} training images cannot be shared by {world} processes")
    batch = local_batch * world

    # Frozen gallery model and the compatibility losses built on it.
    gallery_model, gallery_card, compat_losses = None, None, []
    if cfg.gallery:
        gallery_model, gallery_card = ckpt.load_model(cfg.gallery)
        for p in gallery_model.parameters():
            p.requires_grad_(False)
        if gallery_card.embed_dim != cfg.embed_dim:
            raise TrainError(f"query embed_dim {cfg.embed_dim} differs from the gallery model's "
                             f"{gallery_card.embed_dim}: compatible embeddings must share one space")
        if (gallery_card.in_chans, gallery_card.image_size) != (data.channels, data.image_size) and not cfg.force:
            raise TrainError(f"gallery model expects {gallery_card.in_chans}x{gallery_card.image_size}px input, the "
                             f"data is {data.channels}x{data.image_size}px (pass --force to ignore)")
        for name, weight in compat:
            if name == "bct":
                g_weight = ckpt.load_classifier(cfg.gallery)

                def class_mean(row: int) -> torch.Tensor:
                    sel = images[targets == row]
                    return embed_images(gallery_model, sel, gallery_card.mean, gallery_card.std).mean(0)

                rows, synthesized = synthesize_gallery_classifier(g_weight, gallery_card.classes, classes, class_mean)
                if synthesized:
                    log(f"bct: {len(synthesized)} of {len(classes)} classes unseen by the gallery model; "
                        "their classifier rows are their mean gallery embeddings")
                bct = BCTLoss(rows, cfg.loss, cfg.scale, cfg.margin)
                bct.weight = bct.weight.to(device)
                compat_losses.append((name, weight, bct))
            elif name == "l2":
                compat_losses.append((name, weight, L2Regression()))
            elif name == "contrastive":
                compat_losses.append((name, weight, CrossModelContrastive()))
        gallery_model.to(device)
    needs_ref = any(loss.needs_ref for _, _, loss in compat_losses)
    # Losses that compare each anchor with the whole batch: on N processes, the global batch.
    global_ref = {name for name, _, loss in compat_losses if isinstance(loss, CrossModelContrastive)}

    torch.manual_seed(cfg.seed)  # not offset by rank: every rank starts from the same weights
    model = create_model(cfg.model, embed_dim=cfg.embed_dim, in_chans=data.channels, **cfg.model_kwargs)
    head = MarginHead(cfg.embed_dim, len(classes), cfg.loss, cfg.scale, cfg.margin)
    if cfg.init_from:
        _init_weights(model, head, classes, cfg.init_from)
    if world > 1:
        torch.manual_seed(cfg.seed + rank)  # anything random from here on differs between ranks
        if cfg.sync_bn:
            model = dist.convert_sync_batchnorm(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    head.to(device)
    opt, sched = make_optimizer(list(model.parameters()) + list(head.parameters()), cfg, steps_per_epoch)
    dist.barrier()  # every rank has read the old config and checkpoint state before rank 0 writes
    if main:
        run.start(asdict(cfg))

    history: list[dict] = []
    start_epoch = 0
    if resume and run.has_state():
        state = run.load_state()
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        log(f"resuming {out} after epoch {start_epoch} of {cfg.epochs}")

    net = _Net(model, head)
    forward: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        head.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)  # the same on every rank
        # Augmentation: rank 0 continues the permutation's generator (what one process does), the
        # other ranks draw from their own, so no two ranks crop or flip alike.
        aug_gen = gen if rank == 0 else torch.Generator().manual_seed(
            (cfg.seed * 100_003 + epoch) * 1_000_003 + rank)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "own": 0.0, "acc": 0.0, **{name: 0.0 for name, _, _ in compat_losses}}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and main),
                   leave=False, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * batch:(step + 1) * batch][rank::world]
            x = normalize_images(images[idx], data.mean, data.std)
            if aug:
                x = _augment(x, aug, aug_gen)
            x = x.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = targets[idx].to(device, non_blocking=True)
            emb, own = forward(x, y)
            loss = own
            ref = ref_all = y_all = None
            if needs_ref:
                with torch.no_grad():
                    ref = gallery_model(x)
                if global_ref and world > 1:
                    ref_all, y_all = dist.all_gather(ref), dist.all_gather(y)
            for name, weight, fn in compat_losses:
                if name in global_ref and world > 1:
                    term = fn(emb, y, ref_emb=ref_all, ref_labels=y_all)
                else:
                    term = fn(emb, y, ref_emb=ref, ref_labels=y)
                sums[name] += term.item()
                loss = loss + weight * term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {float(loss)} at epoch {epoch + 1} step {step}; lower --lr")
            sums["loss"] += loss.item()
            sums["own"] += own.item()
            with torch.no_grad():
                sums["acc"] += float((head.cosine(emb).argmax(1) == y).float().mean())
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")  # rank 0's share only
        bar.close()
        sums = dist.mean_over_ranks(sums)  # every rank had an equal share: the mean is the global mean
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, **{k: round(v / steps_per_epoch, 5) for k, v in sums.items()},
               "lr": round(sched.get_last_lr()[0], 6), "seconds": round(seconds, 2),
               "images_per_s": round(steps_per_epoch * batch / seconds, 1)}
        history.append(row)
        log("  ".join(f"{k}={v}" for k, v in row.items()))
        if main:
            run.save_epoch(history, {
                "model": model.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "history": json.dumps(history)})
        hooks.after_epoch(epoch)
        _kill_if_asked(epoch)

    if main:
        model = model.to(memory_format=torch.contiguous_format)
        card = ckpt.ModelCard(
            model=cfg.model, embed_dim=cfg.embed_dim, in_chans=data.channels, image_size=data.image_size,
            mean=list(data.mean), std=list(data.std), role=cfg.role or ("query" if cfg.gallery else "gallery"),
            model_kwargs=dict(cfg.model_kwargs), classes=classes, compat=[list(c) for c in compat],
            compatible_with=None if gallery_card is None else {
                "fingerprint": gallery_card.fingerprint, "model": gallery_card.model,
                "path": str(Path(cfg.gallery).resolve())},
            extra={"data": cfg.data, "protocol": data.protocol, "epochs": cfg.epochs,
                   "final": history[-1] if history else {}})
        # Contiguous copies: safetensors refuses non-contiguous (channels_last) tensors.
        model.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
        ckpt.save_model_folder(out, model, card, classifier=head.weight.detach())
        log(f"saved {card.role} model {cfg.model} to {out} (fingerprint {card.fingerprint})")
    dist.barrier()  # the model folder is complete before any rank returns
    return card if main else ckpt.read_card(out)


def _quiet(_: str) -> None:
    pass


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any]) -> TrainConfig:
    """Config = dataclass defaults <- optional YAML/JSON file <- command-line flags."""
    merged = read_mapping(path)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if "out" not in merged:
        raise TrainError("no output folder: pass --out DIR")
    return TrainConfig.from_dict(merged)
