"""Sub-networks out of the supernet as ordinary model folders (CMP-NAS steps 5 and 6).

* :func:`export_subnet`: the searched arch becomes a **query model** folder (the space's static
  model, ``ofa-mbv3`` or ``fast-cnn``, with the arch in its ``model_kwargs``; role "query";
  ``compatible_with`` = the gallery model's fingerprint; classifier = the supernet's shared
  head), usable by ``hvs evaluate``, ``hvs index`` and ``hvs search``. Its BatchNorm
  statistics are re-estimated on training images first (Once-for-All, Cai et al. 2020).
  Optionally it is fine-tuned with the BCT loss (Shen et al. 2020) against the frozen gallery
  classifier, which is CMP-NAS's last step (or with any other mix of the trainer's
  compatibility losses, ``compat=["bct", "l2=1"]``). With ``init="scratch"`` the searched
  architecture trains from random weights instead (the supernet chose it, not its weights).
* :func:`export_best_recipe`: several such recipes, each trained with the supernet's validation
  split held out and scored on it as the search's hetero reward is; the best one is kept. The
  choice of fine-tune schedule is the validation split's, never the test split's.
* :func:`inherit`: **weight inheritance**, the first way to compatibility in the CMP-NAS paper
  (Duggal et al. 2021): the gallery model is the supernet's largest sub-network, the query
  model a smaller one with the *same* shared weights and no further training. ``hvs evaluate``
  on the pair measures how compatible weight sharing alone makes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint as ckpt
from ..compat import GallerySide, QuerySide, check_pair
from ..data import RetrievalData
from ..losses import MarginHead, parse_compat
from ..models.ofa import OFAMobileNetV3Supernet, load_arch
from ..train import TrainConfig, train
from .common import (
    NASData,
    NASError,
    SupernetCard,
    gallery_ref,
    load_data,
    load_supernet,
    prepare_data,
    read_supernet_card,
    recalibrate_bn,
)
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


INITS = ("supernet", "scratch")  # where an exported sub-network's weights start


def finetune_compat(
    compat: list[str] | str | None = None, bct_weight: float | None = None, supernet_bct: float = 0.0
) -> list[tuple[str, float]]:
    """The compatibility terms of an export's fine-tune: ``compat`` (the trainer's specs, e.g.
    ``["bct", "l2=1"]`` or ``"bct,l2=1"``; ``[]`` for none) when given, else BCT at ``bct_weight``,
    else at the supernet's BCT weight when it trained with one, else at 1."""
    if compat is not None:
        if bct_weight is not None:
            raise NASError("pass either bct_weight or compat, not both")
        try:
            return parse_compat(compat)
        except ValueError as e:
            raise NASError(str(e)) from None
    w = float(bct_weight) if bct_weight is not None else (supernet_bct if supernet_bct > 0 else 1.0)
    return [("bct", w)] if w > 0 else []


def held_in(data: RetrievalData, nd: NASData) -> RetrievalData:
    """``data`` whose train split is the supernet's training images only: its validation split
    (held-out identities or images) left out."""
    return dataclasses.replace(data, train=data.train.subset(nd.train_index))


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
    init: str = "supernet",
    hold_out_val: bool = False,
    seed: int = 0,
    force: bool = False,
    check: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ckpt.ModelCard:
    """Extract ``arch`` (a dict, inline JSON, or a JSON file such as a search's best.json) as a
    query model folder compatible with ``gallery``; fine-tune it first if ``finetune_epochs``.

    The fine-tuning loss is the own margin softmax + the terms of :func:`finetune_compat` (BCT
    at ``bct_weight``, default the supernet's, else 1; ``compat`` replaces them altogether).
    ``init``: ``"supernet"`` (its shared weights and head, BatchNorm re-estimated, no warm-up) or
    ``"scratch"`` (the architecture alone, from random weights, with the trainer's warm-up; needs
    ``finetune_epochs``). ``hold_out_val``: fine-tune on the supernet's training images only, so
    that its validation split stays unseen (what :func:`export_best_recipe` scores on).
    ``check``: the trainer's check after fine-tuning (notes from the test splits on the card);
    :func:`export_best_recipe` turns it off for its candidates, which are judged on validation."""
    if init not in INITS:
        raise NASError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "scratch" and finetune_epochs <= 0:
        raise NASError("init scratch trains the architecture from random weights: it needs finetune_epochs >= 1")
    if compat is not None:
        finetune_compat(compat, bct_weight)  # a bad spec fails before anything is loaded
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
    sub = model.get_active_subnet()
    if init == "supernet":
        sub = recalibrate_bn(sub, nd.bn_subset(bn_images, seed), card.mean, card.std)
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
            bn_images=min(bn_images, len(nd.train_images)) if init == "supernet" else 0,
            init=init,
            hold_out_val=bool(hold_out_val) and finetune_epochs > 0,  # without training there is nothing to hold out
        ),
    )
    if finetune_epochs > 0:
        # Fine-tune the extracted sub-network in process with the ordinary trainer (its weights and
        # the supernet's head are the start); the trainer writes the model folder and its card.
        compat_terms = finetune_compat(compat, bct_weight, card.bct_weight)
        scratch = init == "scratch"
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
                # from the supernet's weights no warm-up; from random ones the trainer's default
                warmup_epochs=TrainConfig.warmup_epochs if scratch else 0.0,
                seed=seed,
                data_seed=card.data_seed,
                role="query",
                check=check,
            ),
            progress=progress,
            data=held_in(data, nd) if hold_out_val else data,
            log=log,
            model=None if scratch else sub,
            # by name: a held-out-identity split kept some training classes out of the supernet's head
            classifier=None if scratch else head.weight.detach(),
            classifier_classes=None if scratch else list(card.classes),
            extra=mcard.extra,
        )
    ckpt.save_model_folder(out, sub, mcard, classifier=head.weight.detach())
    log(
        f"saved query model {model.model_name} [{model.space.key(arch)}] {flops / 1e6:.3f} MFLOPs to {out} "
        f"(fingerprint {mcard.fingerprint}, compatible with gallery {g_card.fingerprint})"
    )
    return mcard


RECIPE_KEYS = ("finetune_epochs", "lr", "batch_size", "bct_weight", "compat", "init", "bn_images", "seed")
DECISION = "decision.json"  # in <out>.recipes/: each recipe's validation scores and the choice
SIGNATURE = "recipes.json"  # in <out>.recipes/: what the recipes there were trained for
_NUMBERS = {"finetune_epochs": int, "batch_size": int, "bn_images": int, "seed": int, "lr": float, "bct_weight": float}


def recipes_folder(out: str | os.PathLike) -> Path:
    """Where :func:`export_best_recipe` trains the recipes for the model folder ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".recipes")


def check_recipes(recipes: Any, common: dict | None = None) -> dict[str, dict]:
    """``recipes`` as {name: export options}; every option one :func:`export_subnet` takes."""
    if not isinstance(recipes, dict) or not recipes:
        raise NASError(f"export recipes must be a mapping of name -> export options, got {recipes!r}")
    for name, opts in {"(common)": common or {}, **recipes}.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise NASError(f"export recipe names must be plain folder names, got {name!r}")
        if name in (DECISION, SIGNATURE):
            raise NASError(f"export recipe name {name!r} is taken by a file of the recipes folder; rename it")
        if not isinstance(opts, dict):
            raise NASError(f"export recipe {name}: options must be a mapping, got {opts!r}")
        unknown = sorted(set(opts) - set(RECIPE_KEYS))
        if unknown:
            raise NASError(f"export recipe {name}: unknown options {unknown} (known: {', '.join(RECIPE_KEYS)})")
        for key, kind in _NUMBERS.items():
            v = opts.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int,) if kind is int else (int, float))):
                what = "an integer" if kind is int else "a number"
                raise NASError(f"export recipe {name}: {key} must be {what}, got {v!r}")
    for name, opts in recipes.items():  # each as it will run: refused now, not after the others trained
        run = {**(common or {}), **opts}
        init = run.get("init", "supernet")
        if init not in INITS:
            raise NASError(f"export recipe {name}: init must be one of {', '.join(INITS)}, got {init!r}")
        if init == "scratch" and not (run.get("finetune_epochs") or 0) >= 1:
            raise NASError(f"export recipe {name}: init scratch needs finetune_epochs >= 1")
        if run.get("compat") is not None or run.get("bct_weight") is not None:
            try:
                finetune_compat(run.get("compat"), run.get("bct_weight"))
            except NASError as e:
                raise NASError(f"export recipe {name}: {e}") from None
    return recipes


def _signature(arch_key: str, recipes: dict, common: dict, gallery_fp: str, supernet_fp: str) -> dict:
    # "order": a tie goes to the first listed, so the order is part of what was chosen
    sig = {"arch": arch_key, "recipes": recipes, "order": list(recipes), "common": common}
    sig.update(gallery=gallery_fp, supernet=supernet_fp)
    return json.loads(json.dumps(sig, sort_keys=True, default=str))


def check_decision(
    out: str | os.PathLike,
    recipes: dict,
    common: dict,
    arch_key: str | None = None,
    supernet: str | os.PathLike | None = None,
) -> dict:
    """The decision that made the model folder ``out``, checked to be for these ``recipes`` and
    ``common`` options (and ``arch_key``, and the supernet folder ``supernet`` as it is now) and
    to name ``out``'s weights; one-line error otherwise."""
    out = Path(out)
    path = recipes_folder(out) / DECISION
    if not path.is_file():
        raise NASError(f"{out} was not chosen among export recipes ({path} is missing); remove it to redo the choice")
    decision = json.loads(path.read_text())
    sig = decision.get("signature") or {}
    want = json.loads(json.dumps({"recipes": recipes, "common": common}, sort_keys=True, default=str))
    if (
        sig.get("recipes") != want["recipes"]
        or sig.get("order") != list(recipes)
        or sig.get("common") != want["common"]
        or (arch_key is not None and sig.get("arch") != arch_key)
        or (supernet is not None and sig.get("supernet") != read_supernet_card(supernet).fingerprint)
        or decision.get("fingerprint") != ckpt.read_card(out).fingerprint
    ):
        raise NASError(
            f"{out} was chosen among other export recipes or for another pick; remove it and "
            f"{recipes_folder(out).name}/ to redo the choice"
        )
    return decision


def export_best_recipe(
    supernet: str | os.PathLike,
    arch: dict | str,
    out: str | os.PathLike,
    *,
    gallery: str | os.PathLike,
    recipes: dict[str, dict],
    data: str | RetrievalData | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **common: Any,
) -> dict:
    """The searched ``arch`` exported by each of ``recipes`` ({name: :func:`export_subnet`
    options over ``common``}, e.g. ``{"finetune": {}, "scratch": {"init": "scratch"}}``), the
    best one kept as ``out``; returns the decision (also written to ``<out>.recipes/decision.json``).

    Every recipe trains in ``<out>.recipes/<name>`` with the supernet's validation split held out
    (``hold_out_val``) and is scored on that split the way the search's ``hetero`` reward is: the
    query model's val-query embeddings against the gallery model's val-gallery ones, on recall@1
    (whatever metric the search used).
    The highest wins (the first listed on a tie); each recipe's paired 95% CI against the winner
    is recorded. So the kept model trained without the validation images, and the test splits
    never entered the choice. A rerun reuses finished recipes and refuses a folder made for other
    recipes, another pick, gallery or supernet."""
    from ..convergence import score
    from ..metrics import paired_bootstrap_ci

    recipes = check_recipes(recipes, common)
    out = _fresh(out)
    model, _, card = load_supernet(supernet)
    arch = model.space.validate(load_arch(arch) if isinstance(arch, str) else arch)
    g_card = ckpt.read_card(gallery)
    data = load_data(data if data is not None else card.data, card.protocol, card.image_size, card.data_seed)
    nd = prepare_data(data, card.val_fraction, card.val_max_per_class, card.data_seed, card.val_split)
    if len(nd.val_query_labels) == 0 or len(nd.val_gallery_labels) == 0:
        raise NASError(f"{data.name}: the supernet's validation split is empty; there is nothing to choose a recipe on")
    signature = _signature(model.space.key(arch), recipes, common, g_card.fingerprint, card.fingerprint)
    rd = recipes_folder(out)
    sig_json = rd / SIGNATURE

    # what the recipes there trained for; the tie order is the decision's only, so a new order reuses them
    def trained_for(sig: dict) -> dict:
        return {k: v for k, v in sig.items() if k != "order"}

    if sig_json.is_file() and trained_for(json.loads(sig_json.read_text())) != trained_for(signature):
        raise NASError(f"{rd} was made for other recipes, pick, gallery or supernet; remove it to redo the choice")
    rd.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(sig_json, signature)
    vq, vg = (nd.val_query_images, nd.val_query_labels), (nd.val_gallery_images, nd.val_gallery_labels)
    scored: dict[str, dict] = {}
    for name, opts in recipes.items():
        folder = rd / name
        if not (folder / ckpt.CONFIG).is_file():
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted recipe is redone
            export_subnet(
                supernet,
                arch,
                folder,
                gallery=gallery,
                data=data,
                hold_out_val=True,
                check=False,  # judged on validation data here: no notes from the test splits
                progress=progress,
                log=log,
                **{**common, **opts},
            )
        scored[name] = score(folder, vq, vg, gallery=gallery)
        log(f"export recipe {name}: val recall@1 {scored[name]['recall@1']:.4f} (query vs gallery model)")
    best = max(recipes, key=lambda n: scored[n]["recall@1"])  # max keeps the first of equals
    rows = []
    for name, opts in recipes.items():
        d = paired_bootstrap_ci(
            np.asarray(scored[name]["hits"]), np.asarray(scored[best]["hits"]), n_boot=n_boot, seed=0
        )
        rows.append(
            {
                "recipe": name,
                "options": {**common, **opts},
                "val": {k: scored[name][k] for k in ("recall@1", "map")},
                "vs_best": [float(x) for x in d],
                "fingerprint": ckpt.read_card(rd / name).fingerprint,
            }
        )
    decision = {
        "signature": signature,
        "best": best,
        "fingerprint": ckpt.read_card(rd / best).fingerprint,
        "metric": "recall@1 q->g on the supernet's validation split",
        "n_train": len(nd.train_images),
        "n_val_query": len(vq[1]),
        "n_val_gallery": len(vg[1]),
        "recipes": rows,
    }
    ckpt.atomic_write_json(rd / DECISION, decision)  # first: an out/ without its decision is not this choice's
    ckpt.copy_model_folder(rd / best, out)
    log(f"export: recipe {best} kept as {out} (val recall@1 {scored[best]['recall@1']:.4f})")
    return decision


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
