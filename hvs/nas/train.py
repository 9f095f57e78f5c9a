"""Compatibility-aware supernet training (CMP-NAS step 3) on top of Once-for-All.

Every step trains the largest sub-network and ``subnets_per_step`` random ones (plus the
smallest with ``sandwich``, the sandwich rule of BigNAS/US-Nets) on one batch, accumulating
their gradients (Once-for-All, Cai et al. 2020: sampled sub-networks per step). Each
sub-network's loss is::

    own margin softmax (one MarginHead shared by all sub-networks)
    + bct_weight * BCT influence loss through the frozen gallery classifier W_g
    + regress_weight * feature regression onto the frozen gallery model's embedding of the same
      (augmented) images, ||phi_q(x) - phi_g(x)||^2 = 2 - 2 cos for unit embeddings (optional)
    + distill * in-place distillation to the largest sub-network's embedding (optional)
    + any other weighted compatibility loss of the registry, ``compat=["relational=1"]``
      (e.g. distillation of the gallery model's similarities to the batch: :mod:`hvs.losses`)

The BCT term (Shen et al. 2020) is what makes the supernet *compatibility-aware* (CMP-NAS,
Duggal et al. 2021): every sub-network learns to embed into the gallery model's space, so the
search can pick the one that is most accurate *against the gallery*. BCT aligns the query model
with the gallery classifier's rows, i.e. with the *training* classes; the regression term aligns it
with the gallery model's function itself, which is what an open-set protocol (test identities
never seen in training) needs. It costs one gallery-model forward pass per step, shared by all the
step's sub-networks. Without a gallery the supernet is a plain one, trained for weight inheritance
(:func:`hvs.nas.export.inherit`).

Progressive shrinking (OFA sec. 3.2) is optional: ``progressive=["full", "kernel", "depth",
"expand"]`` splits the epochs into phases; ``full`` trains the largest network only, and each
named dimension becomes elastic from its phase on (dimensions never named are elastic from the
start). One cosine learning-rate schedule spans all phases.

Single process, data in memory; the loop, run folder (config, log, checkpoint, --resume) and the
compatibility losses are the trainer core's (:mod:`hvs.training`), shared with :func:`hvs.train.train`;
this module adds only what a supernet run is: the sub-networks sampled at each step and the supernet
folder written after each epoch::

    hvs nas train-supernet --gallery runs/gallery --data fashion-mnist --out runs/supernet --epochs 10
    hvs nas train-supernet --config configs/nas_fashion_mnist.yaml --out runs/supernet --resume
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..data import RetrievalData
from ..errors import HVSError
from ..losses import MarginHead, create_compat_loss, parse_compat
from ..models import stem_for
from ..models.ofa import ELASTIC_DIMS, OFAMobileNetV3Supernet, default_resolution_list, stem_stride
from ..models.supernets import DEFAULT_SPACE, create_supernet, supernet_entry
from ..training import core
from ..training.core import Batches, hooks, make_optimizer  # noqa: F401  (hooks: the test seam, shared)
from ..training.gallery import CompatTerms, FrozenGallery, build_compat_terms, check_gallery_card, renormalizer
from ..training.run import TRAIN_CONFIG, RunFolder  # noqa: F401  (TRAIN_CONFIG: re-exported)
from .common import (
    NASError,
    SupernetCard,
    config_from_dict,
    load_data,
    prepare_data,
    read_supernet_card,
    resolve_val_split,
    save_supernet,
)

PHASES = ("full", *ELASTIC_DIMS)
_RESUME_FREE = {"threads", "out", "force"}


@dataclass
class SupernetTrainConfig:
    out: str
    data: str = "fashion-mnist"
    protocol: str = "closed"
    image_size: int | None = None  # default: the gallery model's, else the data's
    data_seed: int = 0
    gallery: str | None = None  # frozen gallery model folder: makes the supernet compatibility-aware
    embed_dim: int | None = None  # default: the gallery model's, else 128
    space: str = DEFAULT_SPACE  # the search space (hvs.models.supernets): ofa-mbv3 | fast-cnn
    supernet: dict = field(default_factory=dict)  # the space's supernet kwargs: shape and choice lists
    bct_weight: float = 1.0  # lambda of the BCT influence loss (needs --gallery)
    regress_weight: float = 0.0  # weight of feature regression onto the gallery embedding (needs --gallery)
    compat: list[str] = field(default_factory=list)  # further compatibility losses, e.g. ["simdist=1"]
    distill: float = 0.0  # weight of in-place distillation from the largest sub-network
    distill_kind: str = "cosine"  # cosine | l2
    subnets_per_step: int = 2  # random sub-networks per step, besides the largest
    sandwich: bool = False  # also train the smallest sub-network every step
    progressive: list[str] = field(default_factory=list)  # e.g. ["full", "kernel", "depth", "expand"]
    phase_epochs: list[int] = field(default_factory=list)  # epochs per phase; default: an even split
    loss: str = "cosface"
    scale: float = 16.0
    margin: float = 0.2
    epochs: int = 5
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.3
    augment: str = "crop,flip"
    train_subset: int | None = None
    val_fraction: float = 0.1  # held out per training class for the search's reward
    val_max_per_class: int = 50
    val_split: str = "auto"  # auto | images | identities (hvs.nas.common); auto: identities for open-set data
    seed: int = 0
    threads: int | None = None
    channels_last: bool = True
    force: bool = False  # accept a gallery model whose input size differs from the data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SupernetTrainConfig:
        return config_from_dict(cls, d, "supernet training")


def phase_plan(
    progressive: list[str], epochs: int, phase_epochs: list[int] | None = None, dims: dict | None = None
) -> list[tuple[str, int, list[str] | None]]:
    """[(phase name, epochs, elastic dimensions or None for all)] for the whole run.

    ``full`` trains only the largest sub-network (elastic = []); each later phase adds its
    dimension to those already elastic; dimensions never named are always elastic. ``dims``: the
    space's elastic dimensions (default OFA's)."""
    dims = ELASTIC_DIMS if dims is None else dims
    if not progressive:
        return [("all", epochs, None)]
    phases = ("full", *dims)
    bad = [p for p in progressive if p not in phases]
    if bad or len(set(progressive)) != len(progressive):
        raise NASError(f"progressive phases must be distinct names from {', '.join(phases)}; got {progressive}")
    if "full" in progressive and progressive[0] != "full":
        raise NASError("progressive shrinking starts with the full network: put 'full' first")
    n = len(progressive)
    if phase_epochs:
        if len(phase_epochs) != n or sum(phase_epochs) != epochs or min(phase_epochs) < 1:
            raise NASError(
                f"phase_epochs {phase_epochs} must give >= 1 epoch to each of the {n} phases and sum to epochs={epochs}"
            )
        counts = list(phase_epochs)
    else:
        if epochs < n:
            raise NASError(f"progressive shrinking with {n} phases needs at least {n} epochs, got {epochs}")
        counts = [epochs // n + (1 if i >= n - epochs % n else 0) for i in range(n)]  # later phases get the rest
    always = [d for d in dims if d not in progressive]
    plan, named = [], []
    for name, count in zip(progressive, counts):
        if name == "full":
            plan.append((name, count, []))
            continue
        named.append(name)
        plan.append((name, count, always + named))
    return plan


def _phase_of(plan: list[tuple[str, int, list[str] | None]], epoch: int) -> tuple[str, list[str] | None]:
    start = 0
    for name, count, elastic in plan:
        if epoch < start + count:
            return name, elastic
        start += count
    return plan[-1][0], plan[-1][2]


_REGRESS = create_compat_loss("l2")
_renormalizer = renormalizer  # the name the tests know


def _distill_loss(kind: str, emb: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(emb, teacher, dim=-1)).mean()
    if kind == "l2":
        return _REGRESS(emb, None, ref_emb=teacher)
    raise NASError(f"unknown distillation {kind!r}; use cosine or l2")


class _SupernetTask:
    """One step of supernet training: the largest sub-network and sampled ones on one batch."""

    error = NASError
    metrics = ["loss", "own", "bct", "distill", "regress", "acc_largest"]

    def __init__(
        self,
        model: OFAMobileNetV3Supernet,
        head: MarginHead,
        terms: CompatTerms,
        cfg: SupernetTrainConfig,
        plan: list,
        card: SupernetCard,
        n_images: int,
        folder: Path,
    ) -> None:
        self.model, self.head, self.terms, self.cfg, self.plan, self.card = model, head, terms, cfg, plan, card
        # the fixed columns, then each further compatibility term (--compat) under its own name
        self.metrics = [*self.metrics, *(k for k in terms.keys if k not in self.metrics)]
        self.max_arch, self.n_images, self.n_archs, self.folder = model.space.max_arch(), n_images, 1, folder

    def begin_epoch(self, epoch: int) -> dict[str, Any]:
        phase, self.elastic = _phase_of(self.plan, epoch)
        self.rng = random.Random(core.epoch_seed(self.cfg.seed, epoch))  # replayed exactly on resume
        self.model.train()
        self.head.train()
        return {"phase": phase}

    def archs(self) -> list[dict]:
        """The largest sub-network, ``subnets_per_step`` random ones, the smallest with ``sandwich``."""
        archs = [self.max_arch]
        if self.elastic != []:
            archs += [self.model.space.sample(self.rng, self.elastic) for _ in range(self.cfg.subnets_per_step)]
            if self.cfg.sandwich:
                archs.append(self.model.space.sample(_MinRng(), self.elastic))
        return archs

    def step(self, x: torch.Tensor, y: torch.Tensor, sums: dict[str, float]) -> float:
        archs = self.archs()
        self.n_archs, n = len(archs), len(archs)
        ref = self.terms.reference(x)  # one gallery forward pass, shared by the step's sub-networks
        teacher, total = None, 0.0
        for j, arch in enumerate(archs):
            self.model.set_active_subnet(arch)
            emb = self.model(x)
            own = self.head(emb, y)
            sums["own"] += own.item() / n
            loss = self.terms.add(own, emb, y, ref, sums, divisor=n)
            if self.cfg.distill > 0 and teacher is not None:
                term = _distill_loss(self.cfg.distill_kind, emb, teacher)
                sums["distill"] += term.item() / max(1, n - 1)
                loss = loss + self.cfg.distill * term
            if j == 0:
                teacher = emb.detach()
                with torch.no_grad():
                    sums["acc_largest"] += float((self.head.cosine(emb).argmax(1) == y).float().mean())
            (loss / n).backward()  # the mean over sub-networks keeps the step size independent of n
            total += loss.item() / n
        return total

    def end_epoch(self) -> dict[str, Any]:
        self.model.set_active_subnet(self.max_arch)
        return {"subnets_per_step": self.n_archs}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "head": self.head.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        """The checkpoint holds the weights too (one atomic file, consistent with the optimizer
        state); a checkpoint from before it did is read with the folder's weights files."""
        if "model" not in state:
            from safetensors.torch import load_file

            from .common import HEAD, WEIGHTS

            state = {"model": load_file(str(self.folder / WEIGHTS)), "head": load_file(str(self.folder / HEAD))}
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])

    def save(self, epoch: int, row: dict[str, Any]) -> None:
        self.card.epochs_done = epoch + 1
        self.card.extra = {**self.card.extra, "final": row, "train_images": self.n_images}
        save_supernet(self.folder, self.model, self.head.weight.detach(), self.card)


def train_supernet(
    cfg: SupernetTrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    data: RetrievalData | None = None,
    log: Callable[[str], None] = print,
) -> SupernetCard:
    """Train (or resume) a supernet as configured; returns the card of the folder ``cfg.out``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    aug, plan = _check_options(cfg)
    run = RunFolder(cfg.out, NASError)
    run.check(asdict(cfg), asdict(SupernetTrainConfig(out=cfg.out)), resume=resume, resume_free=_RESUME_FREE)

    g_card = ckpt.read_card(cfg.gallery) if cfg.gallery else None
    data = load_data(
        data if data is not None else cfg.data,
        cfg.protocol,
        cfg.image_size or (g_card.image_size if g_card else None),
        cfg.data_seed,
    )
    log(data.summary())
    classes, images, targets = _training_set(cfg, data, log)
    batches = Batches(images, targets, data.mean, data.std, cfg.batch_size, aug, cfg.seed, cfg.channels_last)
    embed_dim = cfg.embed_dim or (g_card.embed_dim if g_card else 128)
    terms = _compat_terms(cfg, g_card, data, classes, images, targets, embed_dim, log)
    model, head = _build(cfg, embed_dim, data.channels, len(classes), data.image_size)
    opt, sched = make_optimizer(list(model.parameters()) + list(head.parameters()), cfg, batches.steps_per_epoch)
    run.start(asdict(cfg))

    task = _SupernetTask(
        model, head, terms, cfg, plan, _card(cfg, model, embed_dim, data, classes, terms), len(images), run.path
    )
    start, history = core.resume(run, task, opt, sched, cfg.epochs, log) if resume else (0, [])
    core.fit(
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
    card = read_supernet_card(run.path)
    log(f"saved {card.kind} supernet to {run.path} ({card.epochs_done} epochs, fingerprint {card.fingerprint})")
    return card


def _check_options(cfg: SupernetTrainConfig) -> tuple[set[str], list]:
    """The augmentations and the phase plan, once every option that needs no data is checked."""
    aug = core.parse_augment(cfg.augment, NASError)
    if cfg.epochs < 1:
        raise NASError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.subnets_per_step < 0:
        raise NASError(f"subnets_per_step must be >= 0, got {cfg.subnets_per_step}")
    _distill_loss(cfg.distill_kind, torch.zeros(1, 1), torch.zeros(1, 1))  # validates the kind
    if cfg.regress_weight < 0 or cfg.bct_weight < 0:
        raise NASError("bct_weight and regress_weight must be >= 0")
    if cfg.regress_weight > 0 and not cfg.gallery:
        raise NASError("regress_weight > 0 regresses onto a gallery model's embeddings: pass --gallery DIR")
    try:
        extra = parse_compat(cfg.compat)
    except ValueError as e:
        raise NASError(str(e).splitlines()[0]) from None
    if extra and not cfg.gallery:
        raise NASError("compatibility losses need a frozen gallery model: pass --gallery DIR")
    if {name for name, _ in extra} & {"bct", "l2"}:
        raise NASError("give BCT and regression by --bct-weight and --regress-weight, not --compat")
    try:
        dims = supernet_entry(cfg.space).elastic_dims
    except HVSError as e:
        raise NASError(str(e)) from None
    return aug, phase_plan(cfg.progressive, cfg.epochs, cfg.phase_epochs, dims)


def _training_set(
    cfg: SupernetTrainConfig, data: RetrievalData, log: Callable[[str], None]
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(classes, images, targets) of the training split less the validation images the search scores on."""
    split = resolve_val_split(cfg.val_split, data)
    nd = prepare_data(data, cfg.val_fraction, cfg.val_max_per_class, cfg.data_seed, split)
    images, targets = nd.train_images, nd.train_targets
    if cfg.train_subset and cfg.train_subset < len(images):
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.data_seed))[: cfg.train_subset]
        images, targets = images[keep], targets[keep]
    log(
        f"supernet trains on {len(images)} images; {len(nd.val_query_labels)} val-query and "
        f"{len(nd.val_gallery_labels)} val-gallery images held out for the search"
        + (f" ({len(torch.unique(nd.val_query_labels))} held-out identities)" if split == "identities" else "")
    )
    return nd.classes, images, targets


def _compat_terms(
    cfg: SupernetTrainConfig,
    g_card: ckpt.ModelCard | None,
    data: RetrievalData,
    classes: list[str],
    images: torch.Tensor,
    targets: torch.Tensor,
    embed_dim: int,
    log: Callable[[str], None],
) -> CompatTerms:
    """BCT through the gallery classifier and regression onto its embeddings, as weighted."""
    if g_card is None:
        return CompatTerms([])
    check_gallery_card(g_card, embed_dim, data, force=cfg.force, error=NASError)
    specs = [(name, w) for name, w in (("bct", cfg.bct_weight), ("l2", cfg.regress_weight)) if w > 0]
    specs += parse_compat(cfg.compat)
    if not specs:
        return CompatTerms([])
    gallery = FrozenGallery.load(cfg.gallery)
    context = gallery.context(classes, images, targets, kind=cfg.loss, scale=cfg.scale, margin=cfg.margin, log=log)
    terms = build_compat_terms(
        specs, gallery, context, keys={"l2": "regress"}, to_gallery=renormalizer(data, gallery.card)
    )
    if cfg.channels_last and terms.needs_ref:
        gallery.model.to(memory_format=torch.channels_last)
    return terms


def _build(
    cfg: SupernetTrainConfig, embed_dim: int, in_chans: int, n_classes: int, image_size: int | None = None
) -> tuple[OFAMobileNetV3Supernet, MarginHead]:
    """The supernet and its head. Its stem stride follows the stem rule of the registry (OFA's
    stride-2 stem from STANDARD_STEM_MIN_SIZE px on) and at those sizes its input resolution is
    elastic (OFA's list, scaled), unless ``supernet`` sets ``stem_stride`` / ``resolution_list``;
    the card records the resolved values, so the supernet folder rebuilds it."""
    torch.manual_seed(cfg.seed)
    kwargs = {
        "stem_stride": stem_stride(stem_for(image_size)),
        "resolution_list": default_resolution_list(image_size),
        **cfg.supernet,
    }
    try:
        model = create_supernet(cfg.space, embed_dim=embed_dim, in_chans=in_chans, **kwargs)
    except HVSError as e:
        raise NASError(f"bad supernet argument: {e}") from None
    head = MarginHead(embed_dim, n_classes, cfg.loss, cfg.scale, cfg.margin)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, head


def _card(
    cfg: SupernetTrainConfig,
    model: OFAMobileNetV3Supernet,
    embed_dim: int,
    data: RetrievalData,
    classes: list[str],
    terms: CompatTerms,
) -> SupernetCard:
    return SupernetCard(
        supernet=model.config(),
        embed_dim=embed_dim,
        in_chans=data.channels,
        image_size=data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        classes=classes,
        data=data.name,
        protocol=data.protocol,
        data_seed=cfg.data_seed,
        val_fraction=cfg.val_fraction,
        val_max_per_class=cfg.val_max_per_class,
        val_split=resolve_val_split(cfg.val_split, data),
        gallery=terms.gallery.reference() if terms else None,
        bct_weight=cfg.bct_weight if "bct" in terms.keys else 0.0,
        regress_weight=cfg.regress_weight if "regress" in terms.keys else 0.0,
        extra={"compat": [list(t) for t in parse_compat(cfg.compat)]} if cfg.compat else {},
        loss=cfg.loss,
        scale=cfg.scale,
        margin=cfg.margin,
        epochs=cfg.epochs,
        space=cfg.space,
    )


class _MinRng(random.Random):
    """A 'random' source that always picks the smallest choice (the sandwich rule's smallest
    sub-network within the currently elastic dimensions). Every space lists its choices in cost
    order (OFA's sorted numbers; fast-cnn's blocks dw < plain < fused, SE off < on, relu <
    h_swish), so the smallest is the first."""

    def choice(self, seq):  # type: ignore[override]
        return seq[0]
