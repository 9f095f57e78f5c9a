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

Single process, data in memory, the trainer's pieces reused (:mod:`hvs.train`)::

    hvs nas train-supernet --gallery runs/gallery --data fashion-mnist --out runs/supernet --epochs 10
    hvs nas train-supernet --config configs/nas_fashion_mnist.yaml --out runs/supernet --resume
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..data import RetrievalData
from ..embed import normalize_images
from ..losses import BCTLoss, L2Regression, MarginHead
from ..models.ofa import ELASTIC_DIMS, OFAMobileNetV3Supernet
from ..train import _augment, make_optimizer
from ..training.run import RunFolder
from .common import (NASError, SupernetCard, config_from_dict, gallery_ref, gallery_rows, load_data,
                     prepare_data, save_supernet)

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
    supernet: dict = field(default_factory=dict)  # OFAMobileNetV3Supernet kwargs: shape and choice lists
    bct_weight: float = 1.0  # lambda of the BCT influence loss (needs --gallery)
    regress_weight: float = 0.0  # weight of feature regression onto the gallery embedding (needs --gallery)
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
    seed: int = 0
    threads: int | None = None
    channels_last: bool = True
    force: bool = False  # accept a gallery model whose input size differs from the data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SupernetTrainConfig":
        return config_from_dict(cls, d, "supernet training")


def phase_plan(progressive: list[str], epochs: int, phase_epochs: list[int] | None = None
               ) -> list[tuple[str, int, list[str] | None]]:
    """[(phase name, epochs, elastic dimensions or None for all)] for the whole run.

    ``full`` trains only the largest sub-network (elastic = []); each later phase adds its
    dimension to those already elastic; dimensions never named are always elastic."""
    if not progressive:
        return [("all", epochs, None)]
    bad = [p for p in progressive if p not in PHASES]
    if bad or len(set(progressive)) != len(progressive):
        raise NASError(f"progressive phases must be distinct names from {', '.join(PHASES)}; got {progressive}")
    if "full" in progressive and progressive[0] != "full":
        raise NASError("progressive shrinking starts with the full network: put 'full' first")
    n = len(progressive)
    if phase_epochs:
        if len(phase_epochs) != n or sum(phase_epochs) != epochs or min(phase_epochs) < 1:
            raise NASError(f"phase_epochs {phase_epochs} must give >= 1 epoch to each of the {n} phases and sum to "
                           f"epochs={epochs}")
        counts = list(phase_epochs)
    else:
        if epochs < n:
            raise NASError(f"progressive shrinking with {n} phases needs at least {n} epochs, got {epochs}")
        counts = [epochs // n + (1 if i >= n - epochs % n else 0) for i in range(n)]  # later phases get the rest
    always = [d for d in ELASTIC_DIMS if d not in progressive]
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


_REGRESS = L2Regression()


def _renormalizer(data: RetrievalData, g_card: ckpt.ModelCard) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps a batch normalised with the data's mean/std to the gallery model's (its card's);
    built once, before the training loop."""
    if list(g_card.mean) == list(data.mean) and list(g_card.std) == list(data.std):
        return lambda x: x
    shape = (1, -1, 1, 1)
    dm, ds = torch.tensor(data.mean).view(shape), torch.tensor(data.std).view(shape)
    gm, gs = torch.tensor(g_card.mean).view(shape), torch.tensor(g_card.std).view(shape)
    return lambda x: (x * ds + dm - gm) / gs


def _distill_loss(kind: str, emb: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(emb, teacher, dim=-1)).mean()
    if kind == "l2":
        return _REGRESS(emb, None, ref_emb=teacher)
    raise NASError(f"unknown distillation {kind!r}; use cosine or l2")


def train_supernet(cfg: SupernetTrainConfig, *, resume: bool = False, progress: bool = True,
                   data: RetrievalData | None = None, log: Callable[[str], None] = print) -> SupernetCard:
    """Train (or resume) a supernet as configured; returns the card of the folder ``cfg.out``."""
    from tqdm import tqdm

    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    aug = {a for a in cfg.augment.split(",") if a and a != "none"}
    if aug - {"crop", "flip"}:
        raise NASError(f"unknown augmentation(s) {sorted(aug - {'crop', 'flip'})}; use crop, flip or none")
    if cfg.epochs < 1:
        raise NASError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.subnets_per_step < 0:
        raise NASError(f"subnets_per_step must be >= 0, got {cfg.subnets_per_step}")
    _distill_loss(cfg.distill_kind, torch.zeros(1, 1), torch.zeros(1, 1))  # validates the kind
    plan = phase_plan(cfg.progressive, cfg.epochs, cfg.phase_epochs)

    # The run folder: refuse to overwrite, resume only a matching configuration; the configuration
    # is recorded once the data and model are built.
    run = RunFolder(out, NASError)
    run.check(asdict(cfg), asdict(SupernetTrainConfig(out=cfg.out)), resume=resume, resume_free=_RESUME_FREE)

    g_card = ckpt.read_card(cfg.gallery) if cfg.gallery else None
    image_size = cfg.image_size or (g_card.image_size if g_card else None)
    data = load_data(data if data is not None else cfg.data, cfg.protocol, image_size, cfg.data_seed)
    log(data.summary())
    nd = prepare_data(data, cfg.val_fraction, cfg.val_max_per_class, cfg.data_seed)
    images, targets = nd.train_images, nd.train_targets
    if cfg.train_subset and cfg.train_subset < len(images):
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.data_seed))[:cfg.train_subset]
        images, targets = images[keep], targets[keep]
    log(f"supernet trains on {len(images)} images; {len(nd.val_query_labels)} val-query and "
        f"{len(nd.val_gallery_labels)} val-gallery images held out for the search")
    n = len(images)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // cfg.batch_size)

    embed_dim = cfg.embed_dim or (g_card.embed_dim if g_card else 128)
    bct = g_model = None
    if cfg.regress_weight < 0 or cfg.bct_weight < 0:
        raise NASError("bct_weight and regress_weight must be >= 0")
    if cfg.regress_weight > 0 and g_card is None:
        raise NASError("regress_weight > 0 regresses onto a gallery model's embeddings: pass --gallery DIR")
    if g_card is not None:
        if g_card.embed_dim != embed_dim:
            raise NASError(f"embed_dim {embed_dim} differs from the gallery model's {g_card.embed_dim}: "
                           "compatible embeddings must share one space")
        if (g_card.in_chans, g_card.image_size) != (data.channels, data.image_size) and not cfg.force:
            raise NASError(f"gallery model expects {g_card.in_chans}x{g_card.image_size}px input, the data is "
                           f"{data.channels}x{data.image_size}px (pass --force to ignore)")
        if cfg.bct_weight > 0:
            rows, _, g_card = gallery_rows(cfg.gallery, nd.classes, images, targets, log)
            bct = BCTLoss(rows, cfg.loss, cfg.scale, cfg.margin)
        if cfg.regress_weight > 0:
            g_model, g_card = ckpt.load_model(cfg.gallery)
            for p in g_model.parameters():
                p.requires_grad_(False)
            if cfg.channels_last:
                g_model = g_model.to(memory_format=torch.channels_last)
            to_gallery = _renormalizer(data, g_card)
    compatible = bct is not None or g_model is not None

    torch.manual_seed(cfg.seed)
    try:
        model = OFAMobileNetV3Supernet(embed_dim=embed_dim, in_chans=data.channels, **cfg.supernet)
    except TypeError as e:
        raise NASError(f"bad supernet argument: {e}") from None
    head = MarginHead(embed_dim, len(nd.classes), cfg.loss, cfg.scale, cfg.margin)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(list(model.parameters()) + list(head.parameters()), cfg, steps_per_epoch)

    card = SupernetCard(
        supernet=model.config(), embed_dim=embed_dim, in_chans=data.channels, image_size=data.image_size,
        mean=list(data.mean), std=list(data.std), classes=nd.classes, data=data.name, protocol=data.protocol,
        data_seed=cfg.data_seed, val_fraction=cfg.val_fraction, val_max_per_class=cfg.val_max_per_class,
        gallery=gallery_ref(g_card, cfg.gallery) if compatible else None,
        bct_weight=cfg.bct_weight if bct is not None else 0.0,
        regress_weight=cfg.regress_weight if g_model is not None else 0.0, loss=cfg.loss, scale=cfg.scale,
        margin=cfg.margin, epochs=cfg.epochs)

    run.start(asdict(cfg))
    history: list[dict] = []
    start_epoch = 0
    if resume and run.has_state():
        from safetensors.torch import load_file

        from .common import HEAD, WEIGHTS

        state = run.load_state()
        model.load_state_dict(load_file(str(out / WEIGHTS)))
        head.weight.data.copy_(load_file(str(out / HEAD))["weight"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        log(f"resuming {out} after epoch {start_epoch} of {cfg.epochs}")

    space = model.space
    max_arch = space.max_arch()
    for epoch in range(start_epoch, cfg.epochs):
        phase, elastic = _phase_of(plan, epoch)
        model.train()
        head.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        rng = random.Random(cfg.seed * 100_003 + epoch)  # sub-network sampling: replayed exactly on resume
        perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "own": 0.0, "bct": 0.0, "distill": 0.0, "regress": 0.0, "acc_largest": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs} [{phase}]", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * batch:(step + 1) * batch]
            x = normalize_images(images[idx], data.mean, data.std)
            if aug:
                x = _augment(x, aug, gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = targets[idx]
            archs = [max_arch]
            if elastic != []:
                archs += [space.sample(rng, elastic) for _ in range(cfg.subnets_per_step)]
                if cfg.sandwich:
                    archs.append(space.sample(_MinRng(), elastic))
            ref = None
            if g_model is not None:  # one gallery forward pass, shared by the step's sub-networks
                with torch.no_grad():
                    ref = g_model(to_gallery(x))
            opt.zero_grad(set_to_none=True)
            teacher = None
            step_loss = 0.0
            for j, arch in enumerate(archs):
                model.set_active_subnet(arch)
                emb = model(x)
                own = head(emb, y)
                loss = own
                sums["own"] += own.item() / len(archs)
                if bct is not None:
                    term = bct(emb, y)
                    sums["bct"] += term.item() / len(archs)
                    loss = loss + cfg.bct_weight * term
                if ref is not None:
                    term = _REGRESS(emb, y, ref_emb=ref)
                    sums["regress"] += term.item() / len(archs)
                    loss = loss + cfg.regress_weight * term
                if cfg.distill > 0 and teacher is not None:
                    term = _distill_loss(cfg.distill_kind, emb, teacher)
                    sums["distill"] += term.item() / max(1, len(archs) - 1)
                    loss = loss + cfg.distill * term
                if j == 0:
                    teacher = emb.detach()
                    with torch.no_grad():
                        sums["acc_largest"] += float((head.cosine(emb).argmax(1) == y).float().mean())
                # the mean over sub-networks keeps the step size independent of how many are sampled
                (loss / len(archs)).backward()
                step_loss += loss.item() / len(archs)
            if not torch.isfinite(torch.tensor(step_loss)):
                raise NASError(f"loss became {step_loss} at epoch {epoch + 1} step {step}; lower --lr")
            opt.step()
            sched.step()
            sums["loss"] += step_loss
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")
        bar.close()
        model.set_active_subnet(max_arch)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "phase": phase, **{k: round(v / steps_per_epoch, 5) for k, v in sums.items()},
               "subnets_per_step": len(archs), "lr": round(sched.get_last_lr()[0], 6), "seconds": round(seconds, 2),
               "images_per_s": round(steps_per_epoch * batch / seconds, 1)}
        history.append(row)
        log("  ".join(f"{k}={v}" for k, v in row.items()))
        card.epochs_done = epoch + 1
        card.extra = {"final": row, "train_images": n}
        save_supernet(out, model, head.weight.detach(), card)
        run.save_epoch(history, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "epoch": epoch, "history": json.dumps(history)})
        hooks.after_epoch(epoch)

    log(f"saved {card.kind} supernet to {out} ({card.epochs_done} epochs, fingerprint {card.fingerprint})")
    from .common import read_supernet_card

    return read_supernet_card(out)


class _MinRng(random.Random):
    """A 'random' source that always picks the smallest choice (the sandwich rule's smallest
    sub-network within the currently elastic dimensions)."""

    def choice(self, seq):  # type: ignore[override]
        return min(seq, key=lambda v: (v is not None, v if v is not None else 0))


class _Hooks:
    """Test seam: called after each finished epoch (a test raises here to simulate a kill)."""

    after_epoch: Callable[[int], None] = staticmethod(lambda epoch: None)


hooks = _Hooks()
