"""Architecture search under a query-cost budget (CMP-NAS step 4).

Regularized (aging) evolution (Real et al., "Regularized Evolution for Image Classifier
Architecture Search", AAAI 2019): a population of ``population`` budget-respecting random
sub-networks; each iteration draws a tournament of ``parents * population`` members, the best
one is the parent, the child is a **mutation** of it (each gene resampled with probability
``mutation_prob``) with probability ``mutate_ratio``, otherwise a **crossover** with a second
tournament winner; the child joins and the *oldest* member leaves. The knobs and defaults are
Once-for-All's evolution finder (Cai et al. 2020: population 100, 500 iterations, 25% parents,
50% mutation, mutation probability 0.1); OFA uses them generationally with an accuracy
predictor, here every child is actually scored, so ``iterations`` is the number of children.

Guard rails: every candidate satisfies the budget (random sampling is rejection sampling with at
most ``max_tries`` draws; a mutation/crossover is re-drawn while it misses the budget or equals
its parent, and after ``max_tries`` draws falls back to a copy of the parent), an infeasible
budget fails at once naming the smallest sub-network's cost, every score is cached by the
network's key, and one seed gives one result.

The reward is CMP-NAS's point (Duggal et al. 2021): ``hetero`` scores a candidate by the
heterogeneous accuracy M(q->g) -- its embeddings of val-query images searched among the
*gallery model's* embeddings of val-gallery images -- so the search prefers architectures that
are compatible with the gallery, not just accurate on their own. ``homo`` scores M(q->q), the
compatibility-agnostic baseline; ``penalized`` subtracts ``penalty * (M(q->q) - M(q->g))`` when
the empirical compatibility criterion M(q->g) > M(q->q) (BCT, Shen et al. 2020) fails.
(Penalising the gap to the paragon, M(g->g) - M(q->g), would rank exactly as ``hetero``: the
gallery model is fixed.) Rewards are pluggable with :func:`register_reward`. Validation images
come from the training classes (:func:`hvs.nas.common.carve_validation`); the test query and
gallery splits are never touched. Before scoring, the extracted sub-network's BatchNorm
statistics are re-estimated on a fixed subset of training images (OFA).

    hvs nas search --supernet runs/supernet --gallery runs/gallery --flops 5M --out runs/search
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..compat import GallerySide, QuerySide, check_pair
from ..data import RetrievalData
from ..embed import embed_images
from ..metrics import retrieval_metrics
from ..models.ofa import ArchSpace, OFAMobileNetV3Supernet
from .common import (
    InfeasibleBudget,
    NASError,
    config_from_dict,
    load_data,
    load_supernet,
    parse_flops,
    prepare_data,
    recalibrate_bn,
)
from .latency import (
    LatencyError,
    LatencyTable,
    check_runtime,
    check_threads,
    compare_latency,
    latency_agreement,
    measure_subnet_latency,
)

METRICS = ("recall@1", "recall@5", "map")


# ------------------------------------------------------------------------------------------
# Budget and the evolution itself (independent of what is being scored)
# ------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """A cost limit on the query sub-network: ``cost(arch) <= limit``."""

    kind: str  # "flops" or "latency"
    limit: float
    cost: Callable[[dict], float]

    def describe(self, value: float) -> str:
        return f"{value / 1e6:.4g} MFLOPs" if self.kind == "flops" else f"{value:.4g} ms"

    def ok(self, arch: dict) -> bool:
        return self.cost(arch) <= self.limit


def check_feasible(space: ArchSpace, budget: Budget | None) -> None:
    """The smallest sub-network must fit, or no search can succeed: fail at once, saying why."""
    if budget is None:
        return
    smallest = budget.cost(space.min_arch())
    if smallest > budget.limit:
        raise InfeasibleBudget(
            f"budget {budget.describe(budget.limit)} is infeasible: the smallest sub-network needs "
            f"{budget.describe(smallest)}"
        )


def measured_feasibility(
    space: ArchSpace, budget: Budget, measure: Callable[[dict], float]
) -> tuple[Budget, dict | None]:
    """A latency budget the table calls infeasible, checked end to end: the table's absolute numbers
    drift between runs (by up to ~1.5x here), so "the smallest sub-network needs more" is a
    measurement's question. The smallest is measured (``measure(arch)``, ms); when it fits, the
    search runs under the table's limit scaled by its predicted/measured ratio (so the smallest
    fits in the table's units as it does in milliseconds) and the returned ``{"limit_ms",
    "table_limit_ms", "smallest_predicted_ms", "smallest_measured_ms"}`` says so; the pick is then
    kept within the real limit by :func:`keep_measured_fit`. Otherwise InfeasibleBudget names both
    figures. A feasible budget comes back unchanged, with None."""
    try:
        check_feasible(space, budget)
        return budget, None
    except InfeasibleBudget as e:
        smallest = space.min_arch()
        predicted, ms = budget.cost(smallest), float(measure(smallest))
        if ms > budget.limit:
            raise InfeasibleBudget(f"{e} on the latency table, {budget.describe(ms)} measured end to end") from None
    table_limit = budget.limit * predicted / ms
    info = {  # 5 significant digits
        k: float(f"{v:.5g}")
        for k, v in (
            ("limit_ms", budget.limit),
            ("table_limit_ms", table_limit),
            ("smallest_predicted_ms", predicted),
            ("smallest_measured_ms", ms),
        )
    }
    return Budget(budget.kind, table_limit, budget.cost), info


def sample_under_budget(space: ArchSpace, rng: random.Random, budget: Budget | None, max_tries: int = 1000) -> dict:
    """Rejection sampling with at most ``max_tries`` draws.

    A tight budget, just above the smallest sub-network, is rarely met by uniform draws; then the
    sample is a bounded random walk up from the smallest sub-network (mutations kept only while
    under budget), so every feasible budget yields varied candidates."""
    for _ in range(max(1, max_tries)):
        arch = space.sample(rng)
        if budget is None or budget.ok(arch):
            return arch
    smallest_arch = space.min_arch()
    if budget.ok(smallest_arch):
        arch = smallest_arch
        for _ in range(max(1, min(max_tries, 200))):
            candidate = space.mutate(arch, rng, 0.1)
            if budget.ok(candidate):
                arch = candidate
        return arch
    smallest = budget.cost(smallest_arch)
    raise InfeasibleBudget(
        f"no random sub-network met the budget {budget.describe(budget.limit)} in {max_tries} tries "
        f"(the smallest needs {budget.describe(smallest)}): raise the budget or max_tries"
    )


@dataclass
class SearchResult:
    best: dict  # the history record of the best candidate (first one on ties)
    history: list[dict]  # one record per candidate, in order (initial population: iteration 0)
    evaluations: int  # calls of the reward function (unique networks)


def _as_scores(value: float | dict) -> dict:
    return dict(value) if isinstance(value, dict) else {"reward": float(value)}


class _Scorer:
    """Scores by network key (cached) and appends history records."""

    def __init__(
        self,
        space: ArchSpace,
        reward_fn: Callable[[dict], float | dict],
        budget: Budget | None,
        annotate: Callable[[dict], dict] | None,
    ) -> None:
        self.space, self.reward_fn, self.budget, self.annotate = space, reward_fn, budget, annotate
        self.cache: dict[str, dict] = {}
        self.history: list[dict] = []

    def __call__(self, arch: dict, iteration: int, origin: str) -> dict:
        if self.budget is not None and not self.budget.ok(arch):  # a guard rail, not a filter
            raise AssertionError(f"candidate over budget: {self.space.key(arch)}")
        key = self.space.key(arch)  # active layers only: equal networks share one score
        cached = key in self.cache
        if not cached:
            scores = _as_scores(self.reward_fn(arch))
            if self.annotate is not None:
                scores = {**self.annotate(arch), **scores}
            elif self.budget is not None:  # without annotations, record what the budget limits
                scores = {"cost": self.budget.cost(arch), **scores}
            self.cache[key] = scores
        record = {
            "iteration": iteration,
            "origin": origin,
            "key": key,
            **self.cache[key],
            "cached": cached,
            "arch": arch,
        }
        self.history.append(record)
        return record

    def result(self) -> SearchResult:
        best = max(self.history, key=lambda r: r["reward"])  # max keeps the first of equals
        return SearchResult(best, self.history, len(self.cache))


def regularized_evolution(
    space: ArchSpace,
    reward_fn: Callable[[dict], float | dict],
    budget: Budget | None = None,
    *,
    population: int = 100,
    iterations: int = 500,
    parents: float = 0.25,
    mutation_prob: float = 0.1,
    mutate_ratio: float = 0.5,
    seed: int = 0,
    max_tries: int = 1000,
    annotate: Callable[[dict], dict] | None = None,
    progress: bool = False,
) -> SearchResult:
    """Aging evolution over ``space``; ``reward_fn(arch)`` returns a float or a dict with
    "reward" (higher is better). ``annotate(arch)`` adds cost fields to each record (default:
    "cost", the budgeted quantity)."""
    from tqdm import tqdm

    if population < 1 or iterations < 0:
        raise NASError(f"population must be >= 1 and iterations >= 0, got {population} and {iterations}")
    if not 0 < parents <= 1 or not 0 <= mutation_prob <= 1 or not 0 <= mutate_ratio <= 1:
        raise NASError("parents must be in (0, 1], mutation_prob and mutate_ratio in [0, 1]")
    check_feasible(space, budget)
    rng = random.Random(seed)
    score = _Scorer(space, reward_fn, budget, annotate)
    bar = tqdm(total=population + iterations, desc="search", disable=not progress, dynamic_ncols=True, leave=False)
    pop: deque[dict] = deque()
    for _ in range(population):
        pop.append(score(sample_under_budget(space, rng, budget, max_tries), 0, "random"))
        bar.update()
    tournament = min(population, max(1, round(parents * population)))

    def select() -> dict:
        return max(rng.sample(list(pop), tournament), key=lambda r: r["reward"])

    for it in range(1, iterations + 1):
        parent = select()
        if rng.random() < mutate_ratio:
            origin, make = "mutation", lambda: space.mutate(parent["arch"], rng, mutation_prob)  # noqa: B023
        else:
            other = select()
            origin, make = "crossover", lambda: space.crossover(parent["arch"], other["arch"], rng)  # noqa: B023
        child = None
        for _ in range(max(1, max_tries)):  # a child must fit the budget and differ from its parent
            cand = make()
            if space.key(cand) != parent["key"] and (budget is None or budget.ok(cand)):
                child = cand
                break
        if child is None:
            child, origin = parent["arch"], "parent-copy"
        pop.append(score(child, it, origin))
        pop.popleft()  # aging: the oldest leaves, however good it is
        bar.update()
        bar.set_postfix(best=f"{max(r['reward'] for r in score.history):.4f}")
    bar.close()
    return score.result()


def random_search(
    space: ArchSpace,
    reward_fn: Callable[[dict], float | dict],
    budget: Budget | None = None,
    *,
    evaluations: int = 100,
    seed: int = 0,
    max_tries: int = 1000,
    annotate: Callable[[dict], dict] | None = None,
) -> SearchResult:
    """The baseline: random budget-respecting sub-networks until ``evaluations`` distinct ones
    are scored (at most ``10 * evaluations`` draws)."""
    check_feasible(space, budget)
    rng = random.Random(seed)
    score = _Scorer(space, reward_fn, budget, annotate)
    for i in range(10 * evaluations):
        if len(score.cache) >= evaluations:
            break
        score(sample_under_budget(space, rng, budget, max_tries), i, "random")
    return score.result()


# ------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reward:
    name: str
    needs_gallery: bool
    fn: Callable[[dict, str, float], float]  # (scores, metric, penalty) -> reward
    description: str


_REWARDS: dict[str, Reward] = {}


def register_reward(name: str, needs_gallery: bool, description: str):
    """Register ``fn(scores, metric, penalty) -> float``; ``scores`` has "query->gallery/<metric>"
    (when a gallery model is given) and "query->query/<metric>" for each of :data:`METRICS`."""

    def deco(fn: Callable[[dict, str, float], float]) -> Callable[[dict, str, float], float]:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        _REWARDS[name] = Reward(name, needs_gallery, fn, description)
        return fn

    return deco


def list_rewards() -> list[str]:
    return sorted(_REWARDS)


def get_reward(name: str) -> Reward:
    if name not in _REWARDS:
        raise NASError(f"unknown reward {name!r}; registered: {', '.join(list_rewards())}")
    return _REWARDS[name]


@register_reward("hetero", True, "M(q->g): query sub-network against the gallery model's embeddings (CMP-NAS)")
def _hetero(s: dict, metric: str, penalty: float) -> float:
    return s[f"query->gallery/{metric}"]


@register_reward("homo", False, "M(q->q): the sub-network on both sides (compatibility-agnostic baseline)")
def _homo(s: dict, metric: str, penalty: float) -> float:
    return s[f"query->query/{metric}"]


@register_reward("penalized", True, "M(q->g) - penalty * (M(q->q) - M(q->g)) where the criterion fails")
def _penalized(s: dict, metric: str, penalty: float) -> float:
    het, hom = s[f"query->gallery/{metric}"], s[f"query->query/{metric}"]
    return het - penalty * max(0.0, hom - het)


class SubnetScorer:
    """Scores an arch on the validation split: extract, re-calibrate BN, embed, retrieve.

    The val-gallery side is embedded once by the gallery model; each candidate embeds the
    val-query side (and the val-gallery side, for M(q->q))."""

    def __init__(
        self,
        supernet: OFAMobileNetV3Supernet,
        mean: Sequence[float],
        std: Sequence[float],
        bn_images: torch.Tensor,
        val_query: tuple[torch.Tensor, torch.Tensor],
        val_gallery: tuple[torch.Tensor, torch.Tensor],
        gallery_model: torch.nn.Module | None = None,
        gallery_card: ckpt.ModelCard | None = None,
        reward: str = "hetero",
        metric: str = "recall@1",
        penalty: float = 1.0,
    ) -> None:
        self.supernet, self.mean, self.std, self.bn_images = supernet, mean, std, bn_images
        self.val_query, self.val_gallery = val_query, val_gallery
        self.reward, self.metric, self.penalty = get_reward(reward), metric, penalty
        if metric not in METRICS:
            raise NASError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        if self.reward.needs_gallery and gallery_model is None:
            raise NASError(f"the {reward} reward needs a gallery model: pass --gallery DIR")
        self.gallery_emb = None
        if gallery_model is not None:
            self.gallery_emb = embed_images(gallery_model, val_gallery[0], gallery_card.mean, gallery_card.std)

    def _metrics(self, q: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
        m = retrieval_metrics(q, self.val_query[1], g, self.val_gallery[1], ks=(1, 5), far_targets=(), fpir_targets=())
        return {k: float(m[k]) for k in METRICS}

    @torch.no_grad()
    def scores(self, arch: dict) -> dict[str, float]:
        self.supernet.set_active_subnet(arch)
        sub = recalibrate_bn(self.supernet.get_active_subnet(), self.bn_images, self.mean, self.std)
        q = embed_images(sub, self.val_query[0], self.mean, self.std)
        out = {}
        if self.gallery_emb is not None:
            out.update({f"query->gallery/{k}": v for k, v in self._metrics(q, self.gallery_emb).items()})
        g = embed_images(sub, self.val_gallery[0], self.mean, self.std)
        out.update({f"query->query/{k}": v for k, v in self._metrics(q, g).items()})
        return out

    def __call__(self, arch: dict) -> dict[str, float]:
        s = self.scores(arch)
        return {"reward": float(self.reward.fn(s, self.metric, self.penalty)), **s}


# ------------------------------------------------------------------------------------------
# The search job
# ------------------------------------------------------------------------------------------


@dataclass
class SearchConfig:
    supernet: str
    out: str
    gallery: str | None = None
    data: str | None = None  # default: the supernet's training data (the same validation split)
    flops: float | str | None = None  # budget, e.g. 5e6 or "5M"
    latency_ms: float | None = None  # budget on this CPU
    latency_mode: str = "table"  # table (per-layer lookup table) | measure (time each extracted sub-network)
    latency_batch: int = 1
    latency_runtime: str = "ort"  # where the latency budget is measured: ort (ONNX Runtime fp32) | ort-int8 | torch
    # the thread count the latency budget is measured at (the device's; ORT's intra-op threads): default the search's
    latency_threads: int | None = None
    # a table budget: the best candidates measured end to end, in reward order, until one fits (0: keep the table's)
    latency_checks: int = 8
    reward: str = "hetero"
    metric: str = "recall@1"
    penalty: float = 1.0
    population: int = 100
    iterations: int = 500
    parents: float = 0.25
    mutation_prob: float = 0.1
    mutate_ratio: float = 0.5
    max_tries: int = 1000
    bn_images: int = 2000
    seed: int = 0
    threads: int | None = None
    force: bool = False  # search against a gallery model other than the supernet's
    plot: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        return config_from_dict(cls, d, "search")


def make_budget(
    supernet: OFAMobileNetV3Supernet,
    image_size: int,
    *,
    flops: float | str | None = None,
    latency_ms: float | None = None,
    latency_mode: str = "table",
    latency_batch: int = 1,
    folder: str | Path | None = None,
    latency_runtime: str = "torch",
    latency_threads: int | None = None,
) -> tuple[Budget | None, LatencyTable | None]:
    """The budget (None for none) and, for a table-based latency budget, the table; a latency is
    measured on ``latency_threads`` threads (default: torch's count)."""
    if flops is not None and latency_ms is not None:
        raise NASError("give one budget: --flops or --latency-ms, not both")
    if flops is not None:
        return Budget("flops", parse_flops(flops), lambda a: float(supernet.flops(a, image_size))), None
    if latency_ms is None:
        return None, None
    if latency_ms <= 0:
        raise NASError(f"a latency budget must be positive, got {latency_ms}")
    try:
        check_runtime(latency_runtime)
        check_threads(latency_threads)
    except LatencyError as e:
        raise NASError(str(e)) from None
    if latency_mode == "table":
        table = LatencyTable(
            supernet, image_size, folder, latency_batch, runtime=latency_runtime, threads=latency_threads
        )
        return Budget("latency", float(latency_ms), table.predict), table
    if latency_mode == "measure":
        cache: dict[str, float] = {}

        def measured(arch: dict) -> float:
            key = supernet.space.key(arch)
            if key not in cache:
                cache[key] = measure_subnet_latency(
                    supernet,
                    arch,
                    image_size,
                    latency_batch,
                    min_seconds=0.1,
                    runtime=latency_runtime,
                    threads=latency_threads,
                )
            return cache[key]

        return Budget("latency", float(latency_ms), measured), None
    raise NASError(f"unknown latency mode {latency_mode!r}; use table or measure")


def run_search(
    cfg: SearchConfig, *, progress: bool = True, data: RetrievalData | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Search the supernet for the best query sub-network under the budget; writes ``cfg.out``
    (best.json, history.json, history.csv, search_config.json[, search.png]) and returns best.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise NASError(f"{out} already holds files; choose another --out")
    supernet, _, card = load_supernet(cfg.supernet)
    reward = get_reward(cfg.reward)
    if cfg.metric not in METRICS:
        raise NASError(f"unknown metric {cfg.metric!r}; use one of {', '.join(METRICS)}")
    budget, table = make_budget(
        supernet,
        card.image_size,
        flops=cfg.flops,
        latency_ms=cfg.latency_ms,
        latency_mode=cfg.latency_mode,
        latency_batch=cfg.latency_batch,
        folder=cfg.supernet,
        latency_runtime=cfg.latency_runtime,
        latency_threads=cfg.latency_threads,
    )
    if budget is None:
        raise NASError("no budget: pass --flops (e.g. 5M) or --latency-ms")
    runtime = cfg.latency_runtime if budget.kind == "latency" else "torch"  # a FLOPs search: eager PyTorch, as before
    lat_threads = check_threads(cfg.latency_threads if budget.kind == "latency" else None)

    def measure(arch: dict) -> float:
        return measure_subnet_latency(
            supernet, arch, card.image_size, cfg.latency_batch, runtime=runtime, threads=lat_threads
        )

    limit = budget.limit  # what the pick must meet, in milliseconds for a latency budget
    rescaled = None
    if table is not None and cfg.latency_checks > 0:  # before any data is read
        budget, rescaled = measured_feasibility(supernet.space, budget, measure)
        if rescaled:
            log(
                f"the latency table reads the smallest sub-network at {rescaled['smallest_predicted_ms']:.4f} ms, "
                f"over {limit:.4f} ms, but it measures {rescaled['smallest_measured_ms']:.4f} ms: searching under "
                f"the table's {rescaled['table_limit_ms']:.4f} ms, the pick kept within {limit:.4f} ms as measured"
            )
    else:
        check_feasible(supernet.space, budget)  # before any data is read

    g_model = g_card = None
    if cfg.gallery:
        g_model, g_card = ckpt.load_model(cfg.gallery)
        trained_for = (card.gallery or {}).get("fingerprint")
        # a plain supernet searches any gallery (allow_independent): M(q->g) then measures inherited compatibility
        check_pair(
            QuerySide.of_card(card, cfg.supernet, label="the supernet"),
            GallerySide.of_card(g_card, cfg.gallery),
            force=cfg.force,
            allow_independent=True,
            action="search against it",
        )
        if not trained_for:
            log("note: a plain supernet (trained without a gallery model): M(q->g) measures inherited compatibility")
    elif reward.needs_gallery:
        raise NASError(f"the {cfg.reward} reward needs a gallery model: pass --gallery DIR")

    data = load_data(
        data if data is not None else (cfg.data or card.data), card.protocol, card.image_size, card.data_seed
    )
    if (data.channels, data.image_size) != (card.in_chans, card.image_size):
        raise NASError(
            f"data is {data.channels}x{data.image_size}px but the supernet reads {card.in_chans}x{card.image_size}px"
        )
    if data.name != card.data:
        log(
            f"note: searching on {data.name}, the supernet trained on {card.data}: validation images may have been "
            "training images"
        )
    nd = prepare_data(data, card.val_fraction, card.val_max_per_class, card.data_seed, card.val_split)
    if len(nd.val_query_labels) == 0 or len(nd.val_gallery_labels) == 0:
        why = " or classes of < 4 images; --val-split identities needs 2" if card.val_split == "images" else ""
        raise NASError(f"no validation images (the supernet was trained with val_fraction=0{why})")
    scorer = SubnetScorer(
        supernet,
        card.mean,
        card.std,
        nd.bn_subset(cfg.bn_images, cfg.seed),
        (nd.val_query_images, nd.val_query_labels),
        (nd.val_gallery_images, nd.val_gallery_labels),
        g_model,
        g_card,
        cfg.reward,
        cfg.metric,
        cfg.penalty,
    )
    log(
        f"search: {cfg.reward} reward ({reward.description}) on {len(nd.val_query_labels)} val-query / "
        f"{len(nd.val_gallery_labels)} val-gallery images "
        + ("from the training classes" if card.val_split == "images" else "of held-out training identities")
        + "; budget "
        f"{budget.describe(budget.limit)}; population {cfg.population}, {cfg.iterations} iterations"
    )

    def annotate(arch: dict) -> dict:
        rec = {"flops": supernet.flops(arch, card.image_size)}
        if budget.kind == "latency":
            rec["latency_ms"] = round(budget.cost(arch), 4)
        return rec

    t0 = time.perf_counter()
    result = regularized_evolution(
        supernet.space,
        scorer,
        budget,
        population=cfg.population,
        iterations=cfg.iterations,
        parents=cfg.parents,
        mutation_prob=cfg.mutation_prob,
        mutate_ratio=cfg.mutate_ratio,
        seed=cfg.seed,
        max_tries=cfg.max_tries,
        annotate=annotate,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    if table is not None:
        table.save()

    best = result.best
    fit = measured = None
    if table is not None and cfg.latency_checks > 0:  # the table's absolute numbers drift: the kept pick is measured
        kept, kept_ms, checks = keep_measured_fit(result.history, measure, limit, cfg.latency_checks)
        fell_back = any(c.get("by") == "latency" for c in checks)  # none of the best by reward fit
        fit = {"limit_ms": round(limit, 5), "checked": checks}
        fit["kept_by"] = "table" if kept is None else "measured, fastest predicted" if fell_back else "measured"
        if rescaled:
            fit["rescaled"] = rescaled
        if kept is None:
            walks = "best by reward, then fastest predicted" if fell_back else "best by reward"
            log(
                f"warning: none of the {len(checks)} candidates measured ({walks}) is within {limit:.4f} ms "
                f"({runtime}, {lat_threads} threads); keeping the table's pick"
            )
        elif kept["key"] != best["key"]:
            log(
                f"the table's pick measures {checks[0]['measured_ms']:.4f} ms, over {limit:.4f} ms: kept "
                f"the best of {len(checks)} candidates measured that fits ({kept_ms:.4f} ms, "
                f"reward {kept['reward']:.4f})"
            )
        if kept is not None:
            best, measured = kept, kept_ms
    if measured is None:
        measured = measure(best["arch"])
    latency_check = agreement = None
    if table is not None:  # predicted vs measured: the best and a few others of the final population
        others = {r["key"]: r["arch"] for r in reversed(result.history) if r["key"] != best["key"]}
        latency_check = compare_latency(supernet, table, [best["arch"], *list(others.values())[:4]])
        agreement = latency_agreement(latency_check)
        table.save()
        for row in latency_check:
            log(
                f"latency ({runtime}, {lat_threads} threads) {row['key']}: table {row['predicted_ms']:.3f} ms, "
                f"measured {row['measured_ms']:.3f} ms"
            )
        log(
            f"latency table vs measurement over {agreement['n']} sub-networks: Spearman {agreement['spearman']}, "
            f"predicted/measured median {agreement['ratio_median']} (range {agreement['ratio_range']})"
        )
    summary = {
        "arch": best["arch"],
        "key": best["key"],
        "flops": best["flops"],
        "latency_ms_measured": round(measured, 4),
        "reward": best["reward"],
        "scores": {k: v for k, v in best.items() if "->" in k},
        "reward_kind": cfg.reward,
        "metric": cfg.metric,
        "budget": {
            "kind": budget.kind,
            "limit": limit,
            **({"table_limit": budget.limit} if rescaled else {}),
            **(
                {
                    "latency_mode": cfg.latency_mode,
                    "latency_batch": cfg.latency_batch,
                    "latency_runtime": cfg.latency_runtime,
                    "latency_threads": lat_threads,
                }
                if budget.kind == "latency"
                else {}
            ),
        },
        "supernet": {"path": str(Path(cfg.supernet).resolve()), "fingerprint": card.fingerprint, "kind": card.kind},
        "gallery": None
        if g_card is None
        else {"path": str(Path(cfg.gallery).resolve()), "fingerprint": g_card.fingerprint, "model": g_card.model},
        "evaluations": result.evaluations,
        "candidates": len(result.history),
        "seconds": round(seconds, 1),
        "latency_check": latency_check,
        "latency_agreement": agreement,
        "latency_fit": fit,
    }
    if "latency_ms" in best:
        summary["latency_ms_predicted"] = best["latency_ms"]
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(out / "search_config.json", asdict(cfg))
    save_history(result.history, out)
    ckpt.atomic_write_json(out / "best.json", summary)
    log(
        f"best: {best['key']}  {best['flops'] / 1e6:.3f} MFLOPs  {cfg.reward} reward {best['reward']:.4f}  "
        + "  ".join(f"{k}={v:.4f}" for k, v in summary["scores"].items() if k.endswith(cfg.metric))
        + f"  ({result.evaluations} networks scored in {seconds:.0f} s)"
    )
    if cfg.plot:
        from .plot import plot_history

        log(f"wrote {plot_history(result.history, out / 'search.png')}")
    return summary


def keep_measured_fit(
    history: list[dict], measure: Callable[[dict], float], limit: float, max_checks: int = 8
) -> tuple[dict | None, float | None, list[dict]]:
    """The candidates of a search's ``history`` in order of reward (distinct networks, the first of
    equals first), each measured end to end (``measure(arch)``, ms) until one fits ``limit``:
    (its record, its measured ms, every check as {key, reward, measured_ms}). When none of the
    first ``max_checks`` fits, up to ``max_checks`` more are measured in order of their predicted
    latency (``latency_ms``, fastest first), and the best by reward of those that fit is kept
    (their checks say ``"by": "latency"``); (None, None, checks) when none fits. A latency table
    ranks well but its absolute numbers drift from one run to the next (a budget is absolute):
    this keeps the pick within the budget as measured, at the cost of a few measurements. Equal
    predictions (rounded to 0.1 us) are walked best reward first; among fits of equal reward the
    first in that walk is kept."""
    if max_checks < 1:
        raise NASError(f"latency checks must be >= 1, got {max_checks}")
    seen: set[str] = set()
    checks: list[dict] = []

    def walk(order: list[int], by: str | None):  # up to max_checks networks of ``order`` not yet measured
        n = 0
        for rec in (history[i] for i in order):
            if n >= max_checks:
                return
            if rec["key"] in seen:
                continue
            seen.add(rec["key"])
            n += 1
            ms = float(measure(rec["arch"]))
            checks.append({"key": rec["key"], "reward": rec["reward"], "measured_ms": round(ms, 5)})
            checks[-1].update({"by": by} if by else {})
            yield rec, ms

    for rec, ms in walk(sorted(range(len(history)), key=lambda i: (-history[i]["reward"], i)), None):
        if ms <= limit:
            return rec, ms, checks
    # the table reads low here: the fastest-predicted candidates next, the best of those that fit
    fastest = sorted(
        range(len(history)), key=lambda i: (history[i].get("latency_ms", math.inf), -history[i]["reward"], i)
    )
    fits = [(rec, ms) for rec, ms in walk(fastest, "latency") if ms <= limit]
    if fits:
        rec, ms = max(fits, key=lambda f: f[0]["reward"])  # max keeps the first of equals
        return rec, ms, checks
    return None, None, checks


def save_history(history: list[dict], out: str | Path) -> None:
    """history.json (records with their arch dicts) and history.csv (arch as JSON text)."""
    out = Path(out)
    ckpt.atomic_write_json(out / "history.json", history)
    keys: list[str] = []
    for rec in history:
        keys += [k for k in rec if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for rec in history:
        writer.writerow({**rec, "arch": json.dumps(rec["arch"], separators=(",", ":"))})
    ckpt.atomic_write_bytes(out / "history.csv", buf.getvalue().encode())
