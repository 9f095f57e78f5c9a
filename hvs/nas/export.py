"""Sub-networks out of the supernet as ordinary model folders (CMP-NAS steps 5 and 6).

* :func:`export_subnet`: the searched arch becomes a **query model** folder (the space's static
  model, ``ofa-mbv3`` or ``fast-cnn``, with the arch in its ``model_kwargs``; role "query";
  ``compatible_with`` = the gallery model's fingerprint; classifier = the supernet's shared
  head), usable by ``hvs evaluate``, ``hvs index`` and ``hvs search``. Its BatchNorm
  statistics are re-estimated on training images first (Once-for-All, Cai et al. 2020).
  Optionally it is fine-tuned with the BCT loss (Shen et al. 2020) against the frozen gallery
  classifier, which is CMP-NAS's last step (or with any other mix of the trainer's
  compatibility losses, ``compat=["bct", "l2=1"]``).
* :func:`inherit`: **weight inheritance**, the first way to compatibility in the CMP-NAS paper
  (Duggal et al. 2021): the gallery model is the supernet's largest sub-network, the query
  model a smaller one with the *same* shared weights and no further training. ``hvs evaluate``
  on the pair measures how compatible weight sharing alone makes them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..compat import GallerySide, QuerySide, check_pair
from ..data import RetrievalData
from ..losses import MarginHead, parse_compat
from ..models.ofa import OFAMobileNetV3Supernet, load_arch
from ..train import TrainConfig, train
from .common import NASError, SupernetCard, gallery_ref, load_data, load_supernet, prepare_data, recalibrate_bn
from .search import Budget, check_feasible, sample_under_budget


def _fresh(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise NASError(f"{out} already holds files; choose another output folder")
    return out


def _nas_extra(card: SupernetCard, supernet_dir: str | os.PathLike, flops: int, **more: Any) -> dict:
    return {
        "data": card.data,
        "protocol": card.protocol,
        "nas": {
            "supernet": str(Path(supernet_dir).resolve()),
            "supernet_fingerprint": card.fingerprint,
            "supernet_kind": card.kind,
            "arch_key": more.pop("key"),
            "flops": flops,
            **more,
        },
    }


def export_subnet(
    supernet: str | os.PathLike,
    arch: dict | str,
    out: str | os.PathLike,
    *,
    gallery: str | os.PathLike,
    data: str | RetrievalData | None = None,
    finetune_epochs: int = 0,
    lr: float = 0.01,
    batch_size: int = 256,
    bct_weight: float | None = None,
    bn_images: int = 2000,
    compat: list[str] | str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ckpt.ModelCard:
    """Extract ``arch`` (a dict, inline JSON, or a JSON file such as a search's best.json) as a
    query model folder compatible with ``gallery``; fine-tune it first if ``finetune_epochs``.

    The fine-tuning loss is the own margin softmax + BCT (weight ``bct_weight``, default the
    supernet's, else 1); ``compat`` (the trainer's specs, e.g. ``["bct", "l2=1"]``) replaces the
    compatibility terms altogether."""
    if compat is not None:
        if bct_weight is not None:
            raise NASError("pass either bct_weight or compat, not both")
        try:
            compat_terms = parse_compat(compat)
        except ValueError as e:
            raise NASError(str(e)) from None
    out = _fresh(out)
    model, head_w, card = load_supernet(supernet)
    arch = model.space.validate(load_arch(arch) if isinstance(arch, str) else arch)
    g_card = ckpt.read_card(gallery)
    # fine-tuning against this gallery model makes the pair compatible whatever the supernet was trained for
    warning = check_pair(
        QuerySide.of_card(card, supernet, label="the supernet"),
        GallerySide.of_card(g_card, gallery),
        force=force or finetune_epochs > 0,
        remedy="fine-tune with --finetune-epochs N, use `hvs nas inherit`, or pass --force",
    )
    if warning and finetune_epochs <= 0:
        log(f"warning: {warning} (forced)")
    trained_for = (card.gallery or {}).get("fingerprint")

    data = load_data(data if data is not None else card.data, card.protocol, card.image_size, card.data_seed)
    nd = prepare_data(data, card.val_fraction, card.val_max_per_class, card.data_seed, card.val_split)
    if nd.classes != card.classes:
        raise NASError(
            f"{data.name}: its training classes differ from the supernet's ({len(nd.classes)} vs {len(card.classes)})"
        )
    model.set_active_subnet(arch)
    sub = recalibrate_bn(model.get_active_subnet(), nd.bn_subset(bn_images, seed), card.mean, card.std)
    flops = model.flops(arch, card.image_size)
    head = MarginHead(card.embed_dim, len(card.classes), card.loss, card.scale, card.margin)
    head.weight.data.copy_(head_w)
    trained = (
        [["bct", card.bct_weight], ["l2", card.regress_weight], *(card.extra.get("compat") or [])]
        if trained_for == g_card.fingerprint
        else []
    )
    card_compat = [[name, w] for name, w in trained if w > 0]
    mcard = ckpt.ModelCard(
        model=model.model_name,
        embed_dim=card.embed_dim,
        in_chans=card.in_chans,
        image_size=card.image_size,
        mean=list(card.mean),
        std=list(card.std),
        role="query",
        model_kwargs=model.subnet_kwargs(arch),
        classes=list(card.classes),
        compatible_with=gallery_ref(g_card, gallery),
        compat=card_compat,
        extra=_nas_extra(
            card,
            supernet,
            flops,
            key=model.space.key(arch),
            finetune_epochs=finetune_epochs,
            bn_images=min(bn_images, len(nd.train_images)),
        ),
    )
    if finetune_epochs > 0:
        # Fine-tune the extracted sub-network in process with the ordinary trainer (its weights and
        # the supernet's head are the start); the trainer writes the model folder and its card.
        if compat is None:
            w = (
                card.bct_weight
                if bct_weight is None and card.bct_weight > 0
                else (1.0 if bct_weight is None else bct_weight)
            )
            compat_terms = [("bct", w)] if w > 0 else []
        return train(
            TrainConfig(
                out=str(out),
                data=data.name,
                protocol=card.protocol,
                model=model.model_name,
                model_kwargs=model.subnet_kwargs(arch),
                embed_dim=card.embed_dim,
                gallery=str(gallery),
                compat=[f"{name}={w}" for name, w in compat_terms],
                loss=card.loss,
                scale=card.scale,
                margin=card.margin,
                epochs=finetune_epochs,
                lr=lr,
                batch_size=batch_size,
                warmup_epochs=0.0,
                seed=seed,
                data_seed=card.data_seed,
                role="query",
            ),
            progress=progress,
            data=data,
            log=log,
            model=sub,
            # by name: a held-out-identity split kept some training classes out of the supernet's head
            classifier=head.weight.detach(),
            classifier_classes=list(card.classes),
            extra=mcard.extra,
        )
    ckpt.save_model_folder(out, sub, mcard, classifier=head.weight.detach())
    log(
        f"saved query model {model.model_name} [{model.space.key(arch)}] {flops / 1e6:.3f} MFLOPs to {out} "
        f"(fingerprint {mcard.fingerprint}, compatible with gallery {g_card.fingerprint})"
    )
    return mcard


def largest_under_budget(
    supernet: OFAMobileNetV3Supernet,
    image_size: int,
    flops: float,
    samples: int = 200,
    seed: int = 0,
    max_tries: int = 1000,
) -> dict:
    """The sub-network with the most FLOPs among ``samples`` seeded random ones under ``flops``
    (the minimum sub-network when it is the only one that fits)."""
    budget = Budget("flops", float(flops), lambda a: float(supernet.flops(a, image_size)))
    check_feasible(supernet.space, budget)
    rng = random.Random(seed)
    best = supernet.space.min_arch()
    for _ in range(samples):
        arch = sample_under_budget(supernet.space, rng, budget, max_tries)
        if budget.cost(arch) > budget.cost(best):
            best = arch
    return best


def inherit(
    supernet: str | os.PathLike,
    out_gallery: str | os.PathLike,
    out_query: str | os.PathLike,
    *,
    arch: dict | str | None = None,
    flops: float | None = None,
    data: str | RetrievalData | None = None,
    samples: int = 200,
    bn_images: int = 2000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[ckpt.ModelCard, ckpt.ModelCard]:
    """Weight inheritance: export the largest sub-network as the gallery model and ``arch`` (or
    the largest of ``samples`` random sub-networks under ``flops``) as its query model."""
    if (arch is None) == (flops is None):
        raise NASError("give the query sub-network as --arch or a budget as --flops (one of them)")
    out_gallery, out_query = _fresh(out_gallery), _fresh(out_query)
    model, head_w, card = load_supernet(supernet)
    if arch is not None:
        arch = model.space.validate(load_arch(arch) if isinstance(arch, str) else arch)
    else:
        arch = largest_under_budget(model, card.image_size, flops, samples, seed)
    data = load_data(data if data is not None else card.data, card.protocol, card.image_size, card.data_seed)
    nd = prepare_data(data, card.val_fraction, card.val_max_per_class, card.data_seed, card.val_split)
    bn = nd.bn_subset(bn_images, seed)
    cards = []
    for role, a, folder in (("gallery", model.max_arch(), out_gallery), ("query", arch, out_query)):
        model.set_active_subnet(a)
        sub = recalibrate_bn(model.get_active_subnet(), bn, card.mean, card.std)
        flops_a = model.flops(a, card.image_size)
        mcard = ckpt.ModelCard(
            model=model.model_name,
            embed_dim=card.embed_dim,
            in_chans=card.in_chans,
            image_size=card.image_size,
            mean=list(card.mean),
            std=list(card.std),
            role=role,
            model_kwargs=model.subnet_kwargs(a),
            classes=list(card.classes),
            compatible_with=None if role == "gallery" else gallery_ref(cards[0], out_gallery),
            extra={
                **_nas_extra(card, supernet, flops_a, key=model.space.key(a)),
                "compatibility": "weight-inheritance",
            },
        )
        ckpt.save_model_folder(folder, sub, mcard, classifier=head_w)
        log(
            f"saved {role} model {model.model_name} [{model.space.key(a)}] {flops_a / 1e6:.3f} MFLOPs to {folder} "
            f"(fingerprint {mcard.fingerprint})"
        )
        cards.append(mcard)
    return cards[0], cards[1]
