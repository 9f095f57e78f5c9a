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

From Python, on data or a module of your own (``model`` is trained in place; ``cfg.model`` names
the registered architecture its weights must fit, so the model folder loads back)::

    from hvs.train import TrainConfig, train
    card = train(TrainConfig(out="runs/q", model="cnn-tiny", gallery="runs/gallery", compat=["bct"]),
                 data=my_data, model=my_module)

The loop, the run folder (config, log, checkpoint, --resume) and the compatibility losses are the
trainer core's (:mod:`hvs.training`), shared with the supernet trainer; this module adds what a
model run is: a model and its margin-softmax head as one module, and the model folder it writes.

How several processes divide the work (everything comes from torchrun's environment variables,
see :mod:`hvs.distributed`; without them nothing below happens and no process group is made):

- every rank draws the same permutation from the (seed, epoch) generator; global batch ``s`` is
  ``perm[s*B:(s+1)*B]`` exactly as on one process, and rank ``r`` takes every N-th item of it
  from position ``r`` (``DistributedSampler`` semantics: the ranks' shares are disjoint and
  together are the single-process batch). The last partial batch is dropped, as on one process,
  so N processes run the same number of steps and the same learning-rate schedule as one;
- gradients are averaged by DDP; the model is initialised from ``seed`` on every rank (and DDP
  broadcasts rank 0's weights anyway); each batch's augmentation draws from a seed that includes
  the rank (rank 0's is the single-process one);
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

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist
from .data import RetrievalData, create_dataset
from .data.store import take
from .embed import resize_images
from .errors import HVSError
from .losses import MarginHead, parse_compat
from .models import create_model, resolve_model_kwargs
from .models.pretrained import file_sha256, load_pretrained
from .training import core
from .training.core import KILL_AFTER_EPOCH_ENV, Batches, TrainError, hooks, make_optimizer, read_mapping  # noqa: F401
from .training.gallery import CompatTerms, FrozenGallery, build_compat_terms, check_gallery_card, renormalizer
from .training.run import LOG, STATE, TRAIN_CONFIG, RunFolder  # noqa: F401  (re-exported)


@dataclass
class TrainConfig:
    out: str
    data: str = "fashion-mnist"
    protocol: str = "closed"
    # the trained model's input size (default: the data's; with a gallery model, the gallery's). A
    # query model may read smaller images than its gallery model: the data is then decoded at the
    # larger size and each side's images are resized to its own (hvs.embed.resize_images)
    image_size: int | None = None
    model: str = "resnet8"
    model_kwargs: dict = field(default_factory=dict)
    embed_dim: int = 128
    gallery: str | None = None  # folder of the frozen gallery model: makes this a query model
    init_from: str | None = None  # model folder whose weights (and classifier, same classes) start training
    pretrained: str | None = None  # weights file (timm/torchvision layout) loaded into the backbone first
    pretrained_sha256: str | None = None  # of that file; filled in at the start, checked on --resume
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
    augment: str = "crop,flip"  # spec of hvs.training.augment: crop, flip, rrc, jitter, trivial, ...; "none"
    train_subset: int | None = None  # use only the first N (shuffled) training images
    seed: int = 0
    data_seed: int = 0  # fixes the query/gallery split independently of the training seed
    threads: int | None = None
    channels_last: bool = True
    device: str = "auto"  # auto (cuda:LOCAL_RANK if CUDA is available, else cpu) | cpu | cuda
    sync_bn: bool = False  # multi-process runs: BatchNorm statistics over the global batch
    force: bool = False  # allow a gallery model whose preprocessing differs
    strict: bool = False  # unreadable images are an error instead of skipped
    check: bool = True  # with a gallery model: after training, say when heterogeneous search cannot pay
    data_mode: str | None = None  # auto | memory | stream | cache (hvs.data.store); None: $HVS_DATA_MODE or auto
    workers: int | None = None  # DataLoader workers decoding streamed images; None: one per core (<= 8)
    cache_dir: str | None = None  # where data mode cache keeps its files; None: $HVS_CACHE or ~/.cache/hvs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return core.config_from_dict(cls, d, "training")


# Keys that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"threads", "out", "force", "strict", "device", "check", "workers", "cache_dir"}


class _Net(nn.Module):
    """Model and classifier head as one module, so DDP averages the gradients of both."""

    def __init__(self, model: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model(x)
        return emb, self.head(emb, y)


class _ModelTask:
    """One step of a model run: own margin softmax + the weighted compatibility terms."""

    error = TrainError

    def __init__(self, net: _Net, terms: CompatTerms, device: torch.device, size: int | None = None) -> None:
        self.net, self.terms, self.size = net, terms, size  # size: the model's input (batches may be larger)
        self.forward: nn.Module = net
        if dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.metrics = ["loss", "own", "acc", *terms.keys]

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        self.net.train()
        return {}

    def step(self, x: torch.Tensor, y: torch.Tensor, sums: dict[str, float]) -> float:
        emb, own = self.forward(resize_images(x, self.size), y)
        loss = self.terms.add(own, emb, y, self.terms.reference(x), sums)
        loss.backward()
        sums["own"] += own.item()
        with torch.no_grad():
            sums["acc"] += float((self.net.head.cosine(emb).argmax(1) == y).float().mean())
        return loss.item()

    def end_epoch(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.model.state_dict(), "head": self.net.head.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.net.model.load_state_dict(state["model"])
        self.net.head.load_state_dict(state["head"])

    def save(self, epoch: int, row: dict[str, Any]) -> None:
        pass  # the model folder is written once, at the end


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    data: RetrievalData | None = None,
    log: Callable[[str], None] = print,
    model: nn.Module | None = None,
    classifier: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
    classifier_classes: list[str] | None = None,
) -> ckpt.ModelCard:
    """Train a model as configured; returns the card of the finished model folder ``cfg.out``.

    ``model``: a module to train (in place) instead of a new ``cfg.model``, whose weights it must
    fit; ``classifier``: starting rows of the margin-softmax head, one per training class in the
    trainer's order, or with ``classifier_classes`` (the class of each row) matched by name, a
    training class without a row starting from the head's own initialisation; ``extra``:
    provenance added to the card. Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group (nccl for CUDA,
    gloo for CPU; see :func:`hvs.distributed.init`) and trains data-parallel; every rank returns
    the card once rank 0 has written the model folder (see the module docstring)."""
    device = core.resolve_device(cfg.device, dist.env_info().local_rank)
    dist.init(device=device)
    log = log if dist.is_main() else _quiet
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    compat, aug = _check_options(cfg)
    if cfg.pretrained:  # recorded in train_config.json: a resumption with another file is refused
        cfg = _with_pretrained_digest(cfg)
    run = RunFolder(cfg.out, TrainError)
    run.check(asdict(cfg), asdict(TrainConfig(out=cfg.out)), resume=resume, resume_free=_RESUME_FREE)

    data = (
        data
        if data is not None
        else create_dataset(
            cfg.data,
            protocol=cfg.protocol,
            image_size=_decode_size(cfg),
            seed=cfg.data_seed,
            strict=cfg.strict,
            data_mode=cfg.data_mode,
            workers=cfg.workers,
            cache_dir=cfg.cache_dir,
        )
    )
    size = cfg.image_size or data.image_size  # the input size of the model trained here
    if size > data.image_size and not cfg.force:
        raise TrainError(
            f"--image-size {size} is larger than the data's {data.image_size}px images (pass --force to upscale)"
        )
    _log_data(cfg, data, device, log)
    classes, images, targets = _training_set(cfg, data)
    batches = Batches(
        images,
        targets,
        data.mean,
        data.std,
        cfg.batch_size,
        aug,
        cfg.seed,
        cfg.channels_last,
        device,
        dist.rank(),
        dist.world_size(),
        cfg.workers,
    )
    gallery, terms = _compat_terms(cfg, compat, data, classes, images, targets, log, size)
    net = _build_net(cfg, data, classes, model, classifier, device, size, classifier_classes).to(device)
    terms.to(device)
    opt, sched = make_optimizer(list(net.parameters()), cfg, batches.steps_per_epoch)
    dist.barrier()  # every rank has checked the old run folder before rank 0 writes into it
    if dist.is_main():
        run.start(asdict(cfg))

    task = _ModelTask(net, terms, device, size)
    start, history = core.resume(run, task, opt, sched, cfg.epochs, log) if resume else (0, [])
    history = core.fit(
        task,
        run,
        batches,
        opt,
        sched,
        epochs=cfg.epochs,
        start_epoch=start,
        history=history,
        progress=progress,
        log=log,
    )
    if dist.is_main():
        card = _model_card(cfg, data, classes, compat, gallery, history, extra, size)
        core.save_trained_model(cfg.out, net.model, card, classifier=net.head.weight)
        log(f"saved {card.role} model {cfg.model} to {cfg.out} (fingerprint {card.fingerprint})")
        if cfg.gallery and cfg.check:
            _check_verdict(cfg, data, log)
    dist.barrier()  # the model folder is complete before any rank returns
    return card if dist.is_main() else ckpt.read_card(cfg.out)


def _check_verdict(cfg: TrainConfig, data: RetrievalData, log: Callable[[str], None]) -> None:
    """The cheap after-training check (:func:`hvs.evaluate.quick_verdict`): a note per reason the new
    query model's searches of the gallery model's vectors do not pay, on a sample of the test splits."""
    from .evaluate import quick_verdict

    try:
        lines = quick_verdict(cfg.gallery, cfg.out, data, seed=cfg.data_seed)
    except (HVSError, OSError, RuntimeError, ValueError) as e:  # the model is saved: a note, not a failure
        log(f"note: after-training check skipped: {str(e).splitlines()[0]}")
        return
    for line in lines:
        log(f"note: warning: {line}")
    if lines:
        log(f"note: checked on a sample of the test splits; hvs evaluate --gallery-model {cfg.gallery} gives all")


def _quiet(_: str) -> None:
    pass


def _decode_size(cfg: TrainConfig) -> int | None:
    """The size the data is decoded at: ``cfg.image_size``; with a gallery model, the larger of
    its input size and ``cfg.image_size`` (each side is resized down to its own)."""
    if not cfg.gallery:
        return cfg.image_size
    g_size = ckpt.read_card(cfg.gallery).image_size
    return max(g_size, cfg.image_size or g_size)


def _check_options(cfg: TrainConfig) -> tuple[list[tuple[str, float]], set[str]]:
    """The parsed compatibility specs and augmentations, once every option that needs no data is checked."""
    compat = parse_compat(cfg.compat)
    if compat and not cfg.gallery:
        raise TrainError("compatibility losses need a frozen gallery model: pass --gallery DIR")
    if cfg.pretrained and cfg.init_from:
        raise TrainError("--pretrained and --init-from both give the starting weights: pass one of them")
    if cfg.role not in (None, "gallery", "query"):
        raise TrainError(f"unknown role {cfg.role!r}; use gallery or query")
    aug = core.parse_augment(cfg.augment)
    if cfg.batch_size % dist.world_size():
        raise TrainError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over the "
            f"{dist.world_size()} processes"
        )
    return compat, aug


def _log_data(cfg: TrainConfig, data: RetrievalData, device: torch.device, log: Callable[[str], None]) -> None:
    log(data.summary())
    world = dist.world_size()
    if world > 1:
        log(
            f"data-parallel on {world} processes ({dist.info().backend}, {device.type}): global batch "
            f"{cfg.batch_size} = {world} x {cfg.batch_size // world}"
            + (", BatchNorm synchronised" if cfg.sync_bn else ", BatchNorm per process")
        )


def _training_set(cfg: TrainConfig, data: RetrievalData) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(classes, images, targets): classifier rows are the training classes in sorted order of
    their global label; ``train_subset`` keeps a seeded random subset of the images."""
    split = data.train
    if len(split) == 0:
        raise TrainError(f"{cfg.data}: the train split is empty")
    class_ids = torch.unique(split.labels)
    row_of = torch.full((len(data.classes),), -1, dtype=torch.long)
    row_of[class_ids] = torch.arange(len(class_ids))
    order = torch.arange(len(split))
    if cfg.train_subset and cfg.train_subset < len(order):
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(cfg.data_seed))[: cfg.train_subset]
    return [data.classes[i] for i in class_ids.tolist()], take(split.images, order), row_of[split.labels][order]


def _compat_terms(
    cfg: TrainConfig,
    compat: list[tuple[str, float]],
    data: RetrievalData,
    classes: list[str],
    images: torch.Tensor,
    targets: torch.Tensor,
    log: Callable[[str], None],
    size: int | None = None,
) -> tuple[FrozenGallery | None, CompatTerms]:
    """The frozen gallery model (with --gallery) and the compatibility losses built on it."""
    if not cfg.gallery:
        return None, CompatTerms([])
    gallery = FrozenGallery.load(cfg.gallery)
    check_gallery_card(gallery.card, cfg.embed_dim, data, force=cfg.force, error=TrainError, image_size=size)
    if size and size != gallery.card.image_size:
        log(f"query model reads {size}px images, the gallery model {gallery.card.image_size}px")
    context = gallery.context(classes, images, targets, kind=cfg.loss, scale=cfg.scale, margin=cfg.margin, log=log)
    return gallery, build_compat_terms(compat, gallery, context, to_gallery=renormalizer(data, gallery.card))


def _build_net(
    cfg: TrainConfig,
    data: RetrievalData,
    classes: list[str],
    model: nn.Module | None,
    classifier: torch.Tensor | None,
    device: torch.device,
    size: int | None = None,
    classifier_classes: list[str] | None = None,
) -> _Net:
    """The model (new from the registry, the given module, or --init-from's weights) and its head;
    ``size``: its input size (picks a resolution-aware model's stem)."""
    torch.manual_seed(cfg.seed)  # not offset by rank: every rank starts from the same weights
    registered = create_model(
        cfg.model, embed_dim=cfg.embed_dim, in_chans=data.channels, **_model_kwargs(cfg, size or data.image_size)
    )
    if cfg.pretrained and model is None:
        load_pretrained(registered, cfg.pretrained)
    if model is not None:
        _load_weights(registered, model.state_dict(), "the given model", cfg.model)  # its folder must load back
        _check_strides(model, registered, cfg, size or data.image_size)
    model = registered if model is None else model
    head = MarginHead(cfg.embed_dim, len(classes), cfg.loss, cfg.scale, cfg.margin)
    if cfg.init_from:
        _init_weights(model, head, classes, cfg.init_from)
    if classifier is not None and classifier_classes is not None:
        if len(classifier_classes) != len(classifier):
            raise TrainError(f"classifier of {len(classifier)} rows is given {len(classifier_classes)} class names")
        row_of = {c: i for i, c in enumerate(classifier_classes)}
        rows = head.weight.detach().clone()
        for j, c in enumerate(classes):
            if c in row_of:
                rows[j] = classifier[row_of[c]]
        classifier = rows
    if classifier is not None:
        if tuple(classifier.shape) != tuple(head.weight.shape):
            raise TrainError(
                f"classifier of shape {tuple(classifier.shape)} does not fit {len(classes)} classes x "
                f"{cfg.embed_dim}-d embeddings"
            )
        head.weight.data.copy_(classifier)
    if dist.world_size() > 1:
        torch.manual_seed(cfg.seed + dist.rank())  # anything random from here on differs between ranks
        if cfg.sync_bn:
            model = dist.convert_sync_batchnorm(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return _Net(model, head)


def _check_strides(model: nn.Module, registered: nn.Module, cfg: TrainConfig, size: int) -> None:
    """A given module whose convs stride otherwise than the model its folder will rebuild (a
    timm stem differs in stride only, so its weights load either way) is refused by name."""

    def strides(m: nn.Module) -> list[tuple[str, tuple]]:
        return [(n, tuple(c.stride)) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]

    ours, theirs = strides(registered), strides(model)
    if ours != theirs:
        where = next((a[0] for a, b in zip(ours, theirs) if a != b), "")
        stem = _model_kwargs(cfg, size).get("stem")
        raise TrainError(
            f"the given model's conv strides differ from model {cfg.model} at {size} px"
            f"{f' (stem {stem!r})' if stem else ''}, first at {where!r}: build it with "
            f"create_model(..., image_size={size})"
        )


def _model_kwargs(cfg: TrainConfig, image_size: int) -> dict[str, Any]:
    """The model arguments with the stem its input size gets (recorded in the model folder)."""
    return resolve_model_kwargs(cfg.model, image_size, cfg.model_kwargs)


def _with_pretrained_digest(cfg: TrainConfig) -> TrainConfig:
    try:
        digest = file_sha256(cfg.pretrained)
    except OSError as e:
        raise TrainError(f"--pretrained {cfg.pretrained}: cannot read ({e.strerror or e})") from None
    if cfg.pretrained_sha256 and cfg.pretrained_sha256 != digest:
        raise TrainError(f"--pretrained {cfg.pretrained}: sha256 {digest[:16]}... is not the configured one")
    return replace(cfg, pretrained_sha256=digest)


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TrainError(
            f"{what}: its weights do not fit model {name} as configured ({str(e).splitlines()[0]})"
        ) from None


def _init_weights(model: nn.Module, head: MarginHead, classes: list[str], folder: str) -> None:
    """Start from a model folder's weights (a fine-tune); its classifier too when its rows are our classes."""
    init, init_card = ckpt.load_model(folder)
    _load_weights(model, init.state_dict(), f"--init-from {folder}", init_card.model)
    if init_card.classes == classes and (Path(folder) / ckpt.CLASSIFIER).is_file():
        head.weight.data.copy_(ckpt.load_classifier(folder))


def _model_card(
    cfg: TrainConfig,
    data: RetrievalData,
    classes: list[str],
    compat: list[tuple[str, float]],
    gallery: FrozenGallery | None,
    history: list[dict],
    extra: dict[str, Any] | None,
    size: int | None = None,
) -> ckpt.ModelCard:
    return ckpt.ModelCard(
        model=cfg.model,
        embed_dim=cfg.embed_dim,
        in_chans=data.channels,
        image_size=size or data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        role=cfg.role or ("query" if cfg.gallery else "gallery"),
        model_kwargs=_model_kwargs(cfg, size or data.image_size),
        classes=classes,
        compat=[list(c) for c in compat],
        compatible_with=None if gallery is None else gallery.reference(),
        extra={
            "data": cfg.data,
            "protocol": data.protocol,
            "epochs": cfg.epochs,
            "augment": core.parse_augment(cfg.augment).spec,
            "final": history[-1] if history else {},
            **({"pretrained": {"file": cfg.pretrained, "sha256": cfg.pretrained_sha256}} if cfg.pretrained else {}),
            **(extra or {}),
        },
    )


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any]) -> TrainConfig:
    """Config = dataclass defaults <- optional YAML/JSON file <- command-line flags."""
    merged = read_mapping(path)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if "out" not in merged:
        raise TrainError("no output folder: pass --out DIR")
    return TrainConfig.from_dict(merged)
