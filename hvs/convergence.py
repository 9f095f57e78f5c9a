"""Training a model to convergence for its size: a ladder of schedules scored on held-out data.

Every gap and ratio of a trade-off is measured against the paragon, so a paragon that stopped
short of what its architecture can reach makes gaps look smaller than they are. With a cosine
schedule the accuracy of one run, epoch by epoch, says little about convergence (it rises until
the learning rate reaches zero, whatever the length), so the learning curve here is the one that
does: accuracy against the *length of the schedule*, each point a whole run annealed to zero::

    schedules: [8, 16, 32]   # epochs of each run, in order
    min_gain: 0.005          # converged when doubling the schedule gains less than this

Rungs are trained in order, each on the training split less a validation split (held-out
identities for open-set data, a few images per class for closed-set data: the splits of
:mod:`hvs.nas.common`), and scored on it; the ladder stops at the first rung that gains less than
``min_gain`` over the one before (*converged*), or when the schedules run out (*not converged*,
said so). The model kept is the rung with the best validation score. The test splits are never
looked at: the decision is the validation split's alone.

:func:`decide` is the rule, :func:`val_split` the held-out data, :func:`score` one rung's
validation score; :meth:`hvs.profiles.ProfileStages.paragon` runs the ladder for a benchmark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import RetrievalData
from .errors import HVSError

METRIC = "recall@1"  # what the ladder is judged on (and its per-query hits paired)


class ConvergenceError(HVSError):
    """A convergence ladder that cannot run as asked (one-line message)."""


@dataclass
class Rung:
    """One run of the ladder: its schedule, its folder and its validation scores."""

    epochs: int
    folder: str
    val: dict[str, float]  # recall@1, map on the validation split
    hits: list[float] = field(default_factory=list)  # per-query hit@1 (paired CIs between rungs)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_schedules(schedules: Sequence[int], min_gain: float) -> list[int]:
    """The ladder's schedules as ints, strictly increasing and positive; ``min_gain`` a number >= 0."""
    if not isinstance(schedules, (list, tuple)) or not all(
        isinstance(e, int) and not isinstance(e, bool) for e in schedules
    ):
        raise ConvergenceError(f"converge.schedules must be a list of whole epoch counts, got {schedules!r}")
    out = list(schedules)
    if len(out) < 2:
        raise ConvergenceError(f"converge.schedules needs at least two schedules to compare, got {out}")
    if out[0] < 1 or any(b <= a for a, b in zip(out, out[1:])):
        raise ConvergenceError(f"converge.schedules must be positive and strictly increasing, got {out}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not min_gain >= 0:
        raise ConvergenceError(f"converge.min_gain must be a number >= 0 (recall@1 as a fraction), got {min_gain!r}")
    return out


@dataclass(frozen=True)
class ConvergeOptions:
    """A ladder as a profile asks for it (``converge:``): see the module docstring."""

    schedules: tuple[int, ...]
    min_gain: float = 0.005
    val_split: str = "auto"  # auto | identities | images
    val_fraction: float = 0.1
    val_max_per_class: int = 100

    @classmethod
    def parse(cls, d: Any) -> ConvergeOptions:
        """From a profile's ``converge`` mapping; anything else, an unknown key or a bad value is a
        one-line :class:`ConvergenceError`."""
        if not isinstance(d, dict):
            raise ConvergenceError(f"converge must be a mapping (schedules, min_gain, ...), got {d!r}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConvergenceError(f"unknown converge option(s): {', '.join(map(str, unknown))}")
        if "schedules" not in d:
            raise ConvergenceError("converge needs schedules, e.g. [5, 10, 20]")
        min_gain = d.get("min_gain", cls.min_gain)
        schedules = check_schedules(d["schedules"], min_gain)
        fraction = d.get("val_fraction", cls.val_fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConvergenceError(f"converge.val_fraction must be in (0, 1), got {fraction!r}")
        per_class = d.get("val_max_per_class", cls.val_max_per_class)
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 2:
            raise ConvergenceError(f"converge.val_max_per_class must be a whole number >= 2, got {per_class!r}")
        kind = d.get("val_split", cls.val_split)
        if kind not in ("auto", "identities", "images"):
            raise ConvergenceError(f"converge.val_split must be auto, identities or images, got {kind!r}")
        return cls(tuple(schedules), float(min_gain), kind, float(fraction), per_class)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["schedules"] = list(self.schedules)
        return d


def decide(rungs: Sequence[Rung], schedules: Sequence[int], min_gain: float) -> dict:
    """Where the ladder stands after ``rungs`` (in schedule order), judged on validation recall@1.

    Returns ``next`` (the next schedule to train, or None when the ladder stops), ``converged``
    (True once a rung gained less than ``min_gain`` over the one before), ``gains`` (one per
    consecutive pair: from, to, gain), ``best`` (epochs of the rung with the highest validation
    recall@1; the shorter on a tie) and ``last_gain``."""
    metric = METRIC
    schedules = check_schedules(schedules, min_gain)
    done = [r.epochs for r in rungs]
    if done != schedules[: len(done)]:
        raise ConvergenceError(f"rungs {done} are not the first schedules of {schedules}")
    gains = [
        {"from": a.epochs, "to": b.epochs, "gain": float(b.val[metric] - a.val[metric])}
        for a, b in zip(rungs, rungs[1:])
    ]
    converged = bool(gains) and gains[-1]["gain"] < float(min_gain)
    nxt = None if converged or len(rungs) >= len(schedules) else schedules[len(rungs)]
    best = max(rungs, key=lambda r: (r.val[metric], -r.epochs)).epochs if rungs else None
    return {
        "next": nxt,
        "converged": converged,
        "gains": gains,
        "best": best,
        "last_gain": gains[-1]["gain"] if gains else None,
        "metric": metric,
        "min_gain": float(min_gain),
    }


def val_split(
    data: RetrievalData, kind: str = "auto", fraction: float = 0.1, max_per_class: int = 100, seed: int = 0
) -> tuple[RetrievalData, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], str]:
    """(data whose train split lacks the validation images, (val-query images, labels),
    (val-gallery images, labels), the split's kind): ``identities`` or ``images`` (``auto``: the
    former for open-set data), carved as the NAS reward's validation split is."""
    from .nas.common import carve_identities, carve_validation, resolve_val_split

    if data.train is None or len(data.train) == 0:
        raise ConvergenceError(f"{data.name}: no training images to carve a validation split from")
    kind = resolve_val_split(kind, data)
    carve = carve_identities if kind == "identities" else carve_validation
    tr, vq, vg = carve(data.train.labels, fraction, max_per_class, seed)
    if len(vq) == 0 or len(vg) == 0:
        raise ConvergenceError(
            f"{data.name}: the {kind} validation split (fraction {fraction}) is empty: no training class has "
            f"enough images to spare (an images split needs >= 4 per class)"
        )
    images, labels = data.train.images, data.train.labels
    rest = dataclasses.replace(data, train=data.train.subset(tr))
    return rest, (images[vq], labels[vq]), (images[vg], labels[vg]), kind


def score(
    folder: str | Path, val_query: tuple, val_gallery: tuple, gallery: str | Path | None = None
) -> dict[str, Any]:
    """A model folder's validation scores: ``recall@1``, ``map`` and the per-query ``hits`` at
    rank 1, its own embeddings on both sides, or with ``gallery`` (a gallery model folder) its
    query embeddings against that model's gallery embeddings (heterogeneous search)."""
    from . import checkpoint as ckpt
    from .embed import embed_images
    from .metrics import retrieval_metrics

    model, card = ckpt.load_model(folder)
    g_model, g_card = (model, card) if gallery is None else ckpt.load_model(gallery)
    q = embed_images(model, val_query[0], card.mean, card.std, image_size=card.image_size)
    g = embed_images(g_model, val_gallery[0], g_card.mean, g_card.std, image_size=g_card.image_size)
    m = retrieval_metrics(q, val_query[1], g, val_gallery[1], ks=(1,), far_targets=(), fpir_targets=())
    return {
        "recall@1": float(m["recall@1"]),
        "map": float(m["map"]),
        "hits": np.asarray(m["per_query"]["hit@1"], dtype=float).tolist(),
    }


def gain_ci(a: Rung, b: Rung, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float] | None:
    """(gain, lo, hi) of ``b`` over ``a`` in recall@1: a paired bootstrap over the validation
    queries (the same queries for every rung); None without per-query hits."""
    from .metrics import paired_bootstrap_ci

    if not a.hits or len(a.hits) != len(b.hits):
        return None
    return paired_bootstrap_ci(np.asarray(b.hits), np.asarray(a.hits), n_boot=n_boot, seed=seed)


__all__ = [
    "METRIC",
    "ConvergeOptions",
    "ConvergenceError",
    "Rung",
    "check_schedules",
    "decide",
    "gain_ci",
    "score",
    "val_split",
]
