"""Benchmark profiles: YAML mappings of per-stage options, and the stages they configure.

A profile (``configs/tradeoff_<name>.yaml``) says, for a whole benchmark, how to train the paragon,
the off-the-shelf query models, the supernet, how to search, export and evaluate. Every script
that runs on a profile (``benchmarks/tradeoff.py``, ``benchmarks/compat_ablation.py``) builds its
stages from it through :class:`ProfileStages`, so one profile means one recipe whichever script
reads it, and the artefacts one script made are reused by the other. The reuse-or-run mechanism
itself is :class:`hvs.pipeline.Pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import convergence
from . import train as hvs_train
from .data import RetrievalData, create_dataset
from .pipeline import Event, Pipeline, PipelineError, check_made_for, file_logger

CURVE_JSON = "paragon-curve.json"  # beside the paragon's folder: its learning curve and convergence
DEFAULT_METRICS = {
    "fashion-mnist": ["recall@1", "recall@10", "map"],
    "kanji-fonts": ["recall@1", "tpir@fpir=1e-02", "tar@far=1e-03"],
}


def budget_tag(ratio: float, latency: bool = False) -> str:
    """A search budget's name in a benchmark run's folders (``search-hetero-<tag>``,
    ``nas-hetero-<tag>``): ``23x`` for FLOPs, ``lat10x`` for latency, ratios to the paragon."""
    return f"{'lat' if latency else ''}{float(ratio):g}x"


def load_profile(name: str, configs_dir: str | Path) -> tuple[dict, Path]:
    """(profile, its path): ``name`` is a path to a YAML file, or ``tiny`` / ``quick`` / ... for
    ``configs_dir/tradeoff_<name>.yaml``.

    A profile may start from another: ``extends: quick`` (a name or a path, resolved the same way)
    takes that profile's sections and replaces each one the file names, whole (a section is never
    merged key by key, so a variant that swaps the search space cannot inherit the other space's
    choice lists)."""
    profile, path = _load_profile(name, Path(configs_dir), ())
    check_export(profile)
    return profile, path


def check_export(profile: dict) -> None:
    """The profile's ``export`` section checked as it will run (each recipe over the other
    options): a bad one is refused before the paragon trains, not hours later at the first pick."""
    opts = dict(profile.get("export") or {})
    recipes = opts.pop("recipes", None)
    if recipes is not None:
        from .nas.export import check_recipes

        check_recipes(recipes, {"seed": 0, **opts})


def _load_profile(name: str, configs_dir: Path, seen: tuple[Path, ...]) -> tuple[dict, Path]:
    path = Path(name)
    if not path.suffix:
        path = configs_dir / f"tradeoff_{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"no profile {name!r} (looked for {path})")
    if path.resolve() in seen:
        chain = " -> ".join(p.name for p in (*seen, path.resolve()))
        raise PipelineError(f"profile {path.name}: 'extends' goes round in a circle ({chain})")
    profile = hvs_train.read_mapping(path)
    base_name = profile.pop("extends", None)
    if base_name is None:
        return profile, path
    if not isinstance(base_name, str) or not base_name.strip():
        raise PipelineError(f"profile {path.name}: 'extends' must name one profile, got {base_name!r}")
    base, _ = _load_profile(base_name.strip(), configs_dir, (*seen, path.resolve()))
    return {**base, **profile}, path


def data_entry(profile: dict, data: str) -> dict:
    """``{"spec", "protocol", ...}`` of dataset ``data`` in a profile (unmapped: the name is the
    spec); kanji-fonts is always open-set."""
    entry = (profile.get("data") or {}).get(data)
    if entry is None:
        entry = {"spec": data}
    if isinstance(entry, str):
        entry = {"spec": entry}
    entry = dict(entry)
    if data.startswith("kanji-fonts") or entry["spec"].startswith("kanji-fonts"):
        entry["protocol"] = "open"  # the source forces it anyway
    entry.setdefault("protocol", "closed")
    return entry


def load_dataset(profile: dict, data: str) -> tuple[RetrievalData, RetrievalData]:
    """(full data, data whose train split is the profile's seeded ``train_subset``): the second
    trains everything, the first's query/gallery splits evaluate (they are the same in both)."""
    entry = data_entry(profile, data)
    seed = int(profile.get("data_seed", 0))
    full = create_dataset(entry["spec"], protocol=entry["protocol"], image_size=entry.get("image_size"), seed=seed)
    return full, train_subset(full, profile.get("train_subset"), seed)


def train_subset(full: RetrievalData, n: int | None, seed: int = 0) -> RetrievalData:
    """``full`` with its train split cut to a seeded ``n`` images (in their order); all of it for
    None, 0 or an ``n`` at least its size."""
    if n and n < len(full.train):
        keep = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return dataclasses.replace(full, train=full.train.subset(keep))
    return full


def profile_metrics(profile: dict, data: str, fallback: list[str] | None = None) -> list[str]:
    """The metrics a profile reports for ``data`` (the first is the headline one)."""
    return (
        (profile.get("metrics") or {}).get(data) or DEFAULT_METRICS.get(data) or list(fallback or ["recall@1", "map"])
    )


class ProfileStages:
    """The stages of one profile on one dataset and seed, each reused when complete.

    Training and search read ``train_data`` (the profile's training subset), evaluation ``full``.
    The library's own logs go to ``root/log.txt``; ``log`` gets one line per stage."""

    def __init__(
        self,
        root: Path,
        profile: dict,
        data_name: str,
        full: RetrievalData,
        train_data: RetrievalData,
        only: set[str],
        log: Callable[[str], None],
        seed: int = 0,
    ) -> None:
        self.root, self.profile, self.data_name = root, profile, data_name
        self.full, self.train_data, self.log, self.seed = full, train_data, log, seed
        self.entry = data_entry(profile, data_name)
        self.embed_dim = int(profile.get("embed_dim", 128))
        self.pipe = Pipeline(only=only, log=log, lib_log=file_logger(root / "log.txt"))

    @property
    def events(self) -> list[Event]:
        return self.pipe.events

    def allowed(self, stage: str) -> bool:
        return self.pipe.allowed(stage)

    def event(self, stage: str, name: str, status: str, seconds: float = 0.0, **more: Any) -> Event:
        return self.pipe.event(stage, name, status, seconds, **more)

    def train(self, stage: str, out: Path, data: RetrievalData | None = None, **kw: Any) -> bool:
        """A model folder trained on the profile's data (``kw``: TrainConfig fields; ``data``: other
        training data than the profile's subset, same spec)."""
        cfg = hvs_train.TrainConfig(
            out=str(out),
            data=self.entry["spec"],
            protocol=self.entry["protocol"],
            embed_dim=self.embed_dim,
            threads=self.profile.get("threads"),
            **kw,
        )
        return self.pipe.train(stage, cfg, data=self.train_data if data is None else data)

    def paragon(self, out: Path, opts: dict, seed: int) -> bool:
        """The profile's paragon (the gallery model every query model is measured against) in ``out``.

        ``opts`` are TrainConfig fields, plus ``train_subset`` (this model's own training subset of
        the full data; ``null``: all of it; default: the profile's) and ``converge`` (train to
        convergence, :mod:`hvs.convergence`, in place of ``epochs``)::

            converge: {schedules: [8, 16, 32], min_gain: 0.005, val_fraction: 0.1, val_split: auto}

        With ``converge`` the rungs train in ``out.parent / "paragon-curve" / e<epochs>`` on the
        training data less the validation split; the curve and decision are written to
        ``out.parent / "paragon-curve.json"``, then the best rung is copied to ``out``. A rerun
        reuses the paragon when the curve was made with the same options and names its weights;
        rungs and a paragon made otherwise (other options, or ``out`` trained without the ladder)
        are refused with a one-line error rather than mixed in. The stage is ``paragon`` either way."""
        opts = dict(opts)
        data = self.train_data
        if "train_subset" in opts:
            data = train_subset(self.full, opts.pop("train_subset"), int(self.profile.get("data_seed", 0)))
        if opts.get("converge") is None:
            opts.pop("converge", None)
            return self.train("paragon", out, data=data, role="gallery", seed=seed, **opts)
        conv = convergence.ConvergeOptions.parse(opts.pop("converge"))
        opts.pop("epochs", None)  # the ladder's schedules say how long each rung trains
        signature = json.loads(
            json.dumps(
                {
                    "converge": conv.as_dict(),
                    "train": opts,
                    "seed": seed,
                    "data": self.entry["spec"],
                    "n": len(data.train),
                },
                sort_keys=True,
                default=str,
            )
        )
        curve_json, ladder = out.parent / CURVE_JSON, out.parent / "paragon-curve"
        curve = json.loads(curve_json.read_text()) if curve_json.is_file() else None
        if (out / ckpt.CONFIG).is_file():
            fingerprint = ckpt.read_card(out).fingerprint
            if curve is None or curve.get("signature") != signature or curve.get("paragon_fingerprint") != fingerprint:
                raise PipelineError(
                    f"{out} was not made by this convergence ladder (trained without converge, or with other "
                    f"options); remove it, {curve_json.name}, {ladder.name}/ and what was trained against it"
                )
            self.event("paragon", "paragon", "reused")
            return True
        if not self.allowed("paragon"):
            self.event("paragon", "paragon", "skipped", why="not in --only")
            return False
        sig_json = ladder / "ladder.json"  # the options its rungs are trained with: never mixed
        if sig_json.is_file() and json.loads(sig_json.read_text()) != signature:
            raise PipelineError(
                f"{ladder} was trained with other options; remove it (and {curve_json.name}) to retrain"
            )
        ckpt.atomic_write_json(sig_json, signature)
        rest, vq, vg, kind = convergence.val_split(
            data, conv.val_split, conv.val_fraction, conv.val_max_per_class, seed=seed
        )
        rungs: list[convergence.Rung] = []
        decision = convergence.decide(rungs, conv.schedules, conv.min_gain)
        while decision["next"] is not None:
            epochs = decision["next"]
            folder = ladder / f"e{epochs}"
            if not self.train("paragon", folder, data=rest, role="gallery", seed=seed, epochs=epochs, **opts):
                return False
            s = convergence.score(folder, vq, vg)
            rungs.append(convergence.Rung(epochs, str(folder), {k: s[k] for k in ("recall@1", "map")}, s["hits"]))
            decision = convergence.decide(rungs, conv.schedules, conv.min_gain)
            self.log(f"  paragon-curve: {epochs} epochs, val recall@1 {rungs[-1].val['recall@1']:.4f}")
        n_boot = int((self.profile.get("evaluate") or {}).get("n_boot", 1000))
        for g in decision["gains"]:
            a, b = (next(r for r in rungs if r.epochs == e) for e in (g["from"], g["to"]))
            ci = convergence.gain_ci(a, b, n_boot=n_boot)
            g["ci95"] = None if ci is None else [ci[1], ci[2]]
        best = next(r for r in rungs if r.epochs == decision["best"])
        ckpt.atomic_write_json(  # first: a paragon/ without its curve is one this ladder did not make
            curve_json,
            {
                "signature": signature,
                "paragon_fingerprint": ckpt.read_card(best.folder).fingerprint,
                "schedules": list(conv.schedules),
                "val_split": kind,
                "n_val_query": len(vq[1]),
                "n_val_gallery": len(vg[1]),
                "n_train": len(rest.train),
                "rungs": [r.as_dict() for r in rungs],
                **decision,
            },
        )
        ckpt.copy_model_folder(best.folder, out)
        return True

    def supernet(self, out: Path, gallery: Path | None) -> bool:
        """The profile's supernet (BCT with ``gallery``; OFA's plain training without)."""
        from .nas.train import SupernetTrainConfig

        opts = dict(self.profile.get("supernet") or {})
        cfg = SupernetTrainConfig.from_dict(
            {
                **opts,
                "out": str(out),
                "data": self.entry["spec"],
                "protocol": self.entry["protocol"],
                "gallery": None if gallery is None else str(gallery),
                "threads": self.profile.get("threads"),
                "embed_dim": self.embed_dim,
                "seed": opts.get("seed", self.seed),
            }
        )
        return self.pipe.supernet(cfg, data=self.train_data)

    def search(
        self,
        out: Path,
        supernet: Path,
        gallery: Path,
        limit: float | None,
        reward: str,
        latency_ms: float | None = None,
    ) -> dict | None:
        """The profile's search under ``limit`` FLOPs, or ``latency_ms`` (batch-1 CPU latency from
        the per-layer table); its best pick."""
        from .nas.search import SearchConfig

        opts = {
            k: v
            for k, v in (self.profile.get("search") or {}).items()
            if k not in ("budgets", "rewards", "latency_budgets")
        }
        cfg = SearchConfig.from_dict(
            {
                **opts,
                "supernet": str(supernet),
                "out": str(out),
                "gallery": str(gallery),
                "flops": limit,
                "latency_ms": latency_ms,
                "reward": reward,
                "seed": opts.get("seed", self.seed),
                "threads": self.profile.get("threads"),
            }
        )
        return self.pipe.search(cfg, data=self.train_data)

    def export(self, out: Path, supernet: Path, gallery: Path, best: dict) -> bool:
        """A search's pick exported and fine-tuned per the profile's ``export`` options. With
        ``recipes`` ({name: export options over the others}) each recipe is trained with the
        supernet's validation split held out and the best on it is kept
        (:func:`hvs.nas.export.export_best_recipe`)::

            export: {finetune_epochs: 5, lr: 0.1, recipes: {finetune: {}, scratch: {init: scratch}}}
        """
        opts = dict(self.profile.get("export") or {})
        recipes = opts.pop("recipes", None)
        if recipes is not None:
            return self._export_best(out, supernet, gallery, best, recipes, opts)
        return self.pipe.export(
            out, supernet, best["arch"], gallery=gallery, data=self.train_data, seed=opts.pop("seed", self.seed), **opts
        )

    def _export_best(self, out: Path, supernet: Path, gallery: Path, best: dict, recipes: dict, opts: dict) -> bool:
        import hvs.nas.export as nas_export

        common = {"seed": self.seed, **opts}
        nas_export.check_recipes(recipes, common)

        def done() -> bool:
            if not (out / ckpt.CONFIG).is_file():
                return False
            try:
                check_made_for(out, gallery)
            except PipelineError as e:  # the recipes there were trained for that gallery too
                raise PipelineError(f"{e}; remove {nas_export.recipes_folder(out).name}/ too") from None
            nas_export.check_decision(out, recipes, common, best.get("key"), supernet)
            return True

        n_boot = int((self.profile.get("evaluate") or {}).get("n_boot", 1000))
        return self.pipe.stage(
            "nas",
            out.name,
            done=done,
            redo=out,
            run=lambda: nas_export.export_best_recipe(
                supernet,
                best["arch"],
                out,
                gallery=gallery,
                recipes=recipes,
                data=self.train_data,
                n_boot=n_boot,
                progress=self.pipe.progress,
                log=self.pipe.lib_log,
                **common,
            ),
        )

    def inherit(self, out: Path, supernet: Path, flops: float, opts: dict) -> tuple[Path, Path] | None:
        """Weight inheritance at ``flops`` (``opts``: ``hvs.nas.inherit`` options)."""
        opts = dict(opts)
        return self.pipe.inherit(
            out, supernet, flops=flops, data=self.train_data, seed=opts.pop("seed", self.seed), **opts
        )

    def evaluate(self, stage: str, gallery: Path, query: Path, out: Path) -> dict | None:
        """A pair evaluated on the full data per the profile's ``evaluate`` options."""
        ev = self.profile.get("evaluate") or {}
        return self.pipe.evaluate(
            stage,
            gallery,
            query,
            out,
            self.full,
            n_boot=int(ev.get("n_boot", 1000)),
            latency=bool(ev.get("latency", True)),
        )


__all__ = [
    "DEFAULT_METRICS",
    "ProfileStages",
    "data_entry",
    "load_dataset",
    "load_profile",
    "profile_metrics",
    "train_subset",
]
