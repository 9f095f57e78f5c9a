"""Reuse-or-run stages: the resumable chains of ``hvs demo`` and the benchmarks, built on hvs's folders.

A chain of jobs (train a gallery model, a query model against it, a supernet, search, export,
evaluate, time) writes every artefact into a folder or file of its own. Re-running the chain after
a kill or with more stages should redo only what is missing, and never silently build on an
artefact that no longer matches its inputs. :class:`Pipeline` does that:

* every stage is **keyed** by its output (a model folder, a search folder, an evaluation file) and
  is *reused* when that output is complete (a model folder is complete once its ``config.json``
  exists: :func:`hvs.checkpoint.save_model_folder` writes it last), *run* otherwise (an
  interrupted training resumes from its last epoch; an interrupted search or export, being seeded
  and short, is redone from scratch), or *skipped* when the caller restricts the stages
  (``only``, the benchmarks' ``--only``);
* every reuse is **fingerprinted**: a query model trained for a gallery model is reused only while
  that gallery folder still has the weights it was trained for (otherwise a one-line
  :class:`PipelineError`; the folder is kept, the user decides); an evaluation is reused only
  while both model folders still hold the weights it measured (otherwise it is redone); a
  :class:`FingerprintTable` keeps per-model figures (latency) valid for one weights fingerprint.

Each decision is an event (``{"stage", "name", "status", "seconds", ...}``) kept in
``Pipeline.events`` and logged as one line, so a summary can say what ran and what was reused.
Used by ``hvs demo`` (:mod:`hvs.demo`) and, through :mod:`hvs.profiles`, by the benchmarks.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import evaluate as hvs_eval
from . import train as hvs_train
from .compat import CompatError, GallerySide, QuerySide, check_pair
from .data import RetrievalData
from .errors import HVSError
from .fileio import atomic_write_json

Log = Callable[[str], None]
Event = dict[str, Any]

# what a stage's status is when its output was ...
RAN, REUSED, SKIPPED = "ran", "reused", "skipped"


class PipelineError(HVSError):
    """A chain of stages that cannot run as asked (one-line message)."""


def default_event_line(event: Event) -> str | None:
    """``[ran] offshelf bct-cnn-nano (12.3 s)``, ``[skipped] nas 40x: not in --only``."""
    return (
        f"[{event['status']}] {event['stage']} {event['name']}"
        + (f" ({event['seconds']:.1f} s)" if event["status"] == RAN else "")
        + (f": {event['why']}" if "why" in event else "")
    )


def file_logger(path: str | Path) -> Log:
    """A log function appending each message as a line to ``path`` (the library's own chatter of a
    long chain goes there, so the console keeps one line per stage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        with open(path, "a") as f:
            f.write(msg.rstrip() + "\n")

    return log


class Pipeline:
    """Reuse-or-run stages over hvs's artefacts, with one event per decision.

    ``only``: the stage names allowed to run (empty: all); a missing output of another stage is
    skipped, not built. ``log`` gets one line per event (``event_line`` makes it, None: no line);
    ``lib_log`` gets what the library's jobs print (training epochs, search progress)."""

    def __init__(
        self,
        *,
        only: set[str] | frozenset[str] = frozenset(),
        log: Log = print,
        lib_log: Log | None = None,
        event_line: Callable[[Event], str | None] = default_event_line,
        progress: bool = False,
    ) -> None:
        self.only = frozenset(only)
        self.log, self.lib_log = log, lib_log if lib_log is not None else log
        self.event_line, self.progress = event_line, progress
        self.events: list[Event] = []

    def allowed(self, stage: str) -> bool:
        return not self.only or stage in self.only

    def event(self, stage: str, name: str, status: str, seconds: float = 0.0, **more: Any) -> Event:
        e = {"stage": stage, "name": name, "status": status, "seconds": round(seconds, 2), **more}
        self.events.append(e)
        line = self.event_line(e)
        if line is not None:
            self.log(line)
        return e

    def stage(
        self, stage: str, name: str, *, done: Callable[[], bool], run: Callable[[], Any], redo: Path | None = None
    ) -> bool:
        """Reuse (``done()``), skip (stage not allowed) or run one stage; True when its output
        exists afterwards. ``redo``: a partial output removed before running (a job that cannot
        resume, such as a search or an export, starts clean)."""
        if done():
            self.event(stage, name, REUSED)
            return True
        if not self.allowed(stage):
            self.event(stage, name, SKIPPED, why="not in --only")
            return False
        if redo is not None and redo.exists():
            shutil.rmtree(redo)
        t0 = time.perf_counter()
        run()
        self.event(stage, name, RAN, time.perf_counter() - t0)
        return True

    # -- the stages of hvs's jobs ---------------------------------------------------------------
    def train(
        self, stage: str, cfg: hvs_train.TrainConfig, data: RetrievalData | None = None, name: str | None = None
    ) -> bool:
        """A model folder (``hvs.train.train``): reused when trained (and, for a compatible query
        model, still made for its gallery folder), resumed when interrupted."""
        out = Path(cfg.out)

        def done() -> bool:
            if not (out / ckpt.CONFIG).is_file():
                return False
            if cfg.gallery:
                check_made_for(out, cfg.gallery)
            return True

        return self.stage(
            stage,
            name or out.name,
            done=done,
            run=lambda: hvs_train.train(
                cfg,
                resume=(out / hvs_train.TRAIN_CONFIG).is_file(),
                progress=self.progress,
                data=data,
                log=self.lib_log,
            ),
        )

    def supernet(self, cfg: Any, data: RetrievalData | None = None, stage: str = "supernet") -> bool:
        """An OFA supernet (``hvs.nas.train_supernet``, ``cfg`` a ``SupernetTrainConfig``): reused
        once it has trained ``cfg.epochs`` epochs, resumed otherwise."""
        import hvs.nas.train as nas_train

        out = Path(cfg.out)

        def done() -> bool:
            if not ((out / ckpt.CONFIG).is_file() and (out / nas_train.TRAIN_CONFIG).is_file()):
                return False
            return json.loads((out / ckpt.CONFIG).read_text()).get("epochs_done", 0) >= cfg.epochs

        return self.stage(
            stage,
            out.name,
            done=done,
            run=lambda: nas_train.train_supernet(
                cfg,
                resume=(out / nas_train.TRAIN_CONFIG).is_file(),
                progress=self.progress,
                data=data,
                log=self.lib_log,
            ),
        )

    def search(self, cfg: Any, data: RetrievalData | None = None, stage: str = "nas") -> dict | None:
        """An architecture search (``hvs.nas.run_search``, ``cfg`` a ``SearchConfig``): its
        ``best.json``, reused when written; an interrupted search is redone (it is seeded)."""
        import hvs.nas.search as nas_search

        out = Path(cfg.out)
        best: dict[str, Any] = {}

        def run() -> None:
            best.update(nas_search.run_search(cfg, progress=self.progress, data=data, log=self.lib_log))

        if not self.stage(stage, out.name, done=(out / "best.json").is_file, run=run, redo=out):
            return None
        return best or json.loads((out / "best.json").read_text())

    def export(
        self,
        out: Path,
        supernet: Path,
        arch: dict,
        *,
        gallery: Path | None,
        data: RetrievalData | None,
        stage: str = "nas",
        **kw: Any,
    ) -> bool:
        """A searched sub-network exported as a model folder (``hvs.nas.export_subnet``, fine-tuned
        per ``kw``); an interrupted export is redone."""
        import hvs.nas.export as nas_export

        def done() -> bool:
            if not (out / ckpt.CONFIG).is_file():
                return False
            card = ckpt.read_card(out)
            if gallery is not None and card.compatible_with:
                check_made_for(out, gallery)
            chosen = nas_export.recipes_folder(out) / nas_export.DECISION
            if chosen.is_file() and json.loads(chosen.read_text()).get("fingerprint") == card.fingerprint:
                raise PipelineError(
                    f"{out} was chosen among export recipes (trained without the validation split), not "
                    f"exported as asked now; remove it and {chosen.parent.name}/ to export it again"
                )
            return True

        return self.stage(
            stage,
            out.name,
            done=done,
            redo=out,
            run=lambda: nas_export.export_subnet(
                supernet, arch, out, gallery=gallery, data=data, progress=self.progress, log=self.lib_log, **kw
            ),
        )

    def inherit(
        self, out: Path, supernet: Path, *, flops: float, data: RetrievalData | None, stage: str = "inherit", **kw: Any
    ) -> tuple[Path, Path] | None:
        """Weight inheritance (``hvs.nas.inherit``): ``out/gallery`` and ``out/query`` from one
        supernet, both reused when complete, both redone otherwise. Returns the two folders."""
        import hvs.nas.export as nas_export

        g_out, q_out = out / "gallery", out / "query"
        ok = self.stage(
            stage,
            out.name,
            redo=out,
            done=lambda: (g_out / ckpt.CONFIG).is_file() and (q_out / ckpt.CONFIG).is_file(),
            run=lambda: nas_export.inherit(supernet, g_out, q_out, flops=flops, data=data, log=self.lib_log, **kw),
        )
        return (g_out, q_out) if ok else None

    def evaluate(
        self,
        stage: str,
        gallery: Path,
        query: Path,
        out: Path,
        data: RetrievalData,
        *,
        n_boot: int = 1000,
        latency: bool = True,
    ) -> dict | None:
        """``hvs.evaluate.evaluate`` of a pair into ``out`` (JSON) and its per-query arrays
        (``out`` with ``.npz``, for paired comparisons): reused while both exist and both model
        folders still hold the weights evaluated; the JSON alone is reused when this stage may not
        run (no paired intervals then)."""
        npz = out.with_suffix(".npz")
        name = f"evaluate {out.stem}"

        def done() -> bool:
            return (
                out.is_file()
                and (npz.is_file() or not self.allowed(stage))
                and evaluation_is_current(out, gallery, query)
            )

        def run() -> None:
            result = hvs_eval.evaluate(gallery, query, data, n_boot=n_boot, latency=latency, per_query=True)
            hvs_eval.save_per_query(result, npz)
            hvs_eval.save_json(result, out)

        if not self.stage(stage, name, done=done, run=run):
            return None
        return json.loads(out.read_text())


def check_made_for(folder: str | Path, gallery: str | Path) -> None:
    """Raise when the query model in ``folder`` was trained for other weights than ``gallery``'s
    now (the gallery was retrained after it): reusing it would pair two spaces that do not match."""
    card, g_card = ckpt.read_card(folder), ckpt.read_card(gallery)
    try:
        check_pair(QuerySide.of_card(card, folder), GallerySide.of_card(g_card, gallery))
    except CompatError as e:
        raise PipelineError(f"{folder} is stale: {e}; remove {folder} to train it again") from None


def evaluation_is_current(result_json: str | Path, gallery: str | Path, query: str | Path) -> bool:
    """Whether an evaluation file measured the weights the two model folders hold now."""
    try:
        r = json.loads(Path(result_json).read_text())
        return (
            r["gallery_model"]["fingerprint"] == ckpt.read_card(gallery).fingerprint
            and r["query_model"]["fingerprint"] == ckpt.read_card(query).fingerprint
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


class FingerprintTable:
    """A JSON file of per-model entries, each valid for one weights fingerprint.

    ``get(key, fingerprint)`` returns the entry only when it was made for that fingerprint, so a
    retrained model's figures are measured again; ``save()`` writes atomically, and only when
    something changed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.changed = False

    def get(self, key: str, fingerprint: str) -> dict | None:
        entry = self.entries.get(key)
        return entry if entry is not None and entry.get("fingerprint") == fingerprint else None

    def put(self, key: str, fingerprint: str, values: dict) -> dict:
        self.entries[key] = {"fingerprint": fingerprint, **values}
        self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if self.changed:
            atomic_write_json(self.path, self.entries)
            self.changed = False


def ort_thread_counts(threads: int, ort_threads: Sequence[int] | None = None) -> list[int]:
    """The ORT intra-op thread counts :func:`folder_latency` times: ``ort_threads`` and ``threads``
    (sorted, each once), or ``threads`` alone."""
    counts = sorted({*map(int, ort_threads), int(threads)}) if ort_threads else [int(threads)]
    if any(t < 1 for t in counts):
        raise PipelineError(f"ort_threads {list(ort_threads or [])}: thread counts must be >= 1")
    return counts


def fastest_thread_count(
    measure: Callable[[int, float], float], counts: Sequence[int], min_seconds: float, rounds: int = 3
) -> tuple[dict[int, float], int]:
    """``measure(t, seconds)`` (ms, timed over at least ``seconds``) at each thread count of
    ``counts`` in ``rounds`` rounds that alternate between the counts, so a drift of the machine
    falls on each alike (one round for one count), each count's rounds sharing ``min_seconds``:
    the median per count, and the fastest count."""
    rounds = 1 if len(counts) == 1 else rounds
    runs: dict[int, list[float]] = {int(t): [] for t in counts}
    for _ in range(rounds):
        for t in runs:
            runs[t].append(measure(t, min_seconds / rounds))
    by_threads = {t: statistics.median(v) for t, v in runs.items()}
    return by_threads, min(by_threads, key=by_threads.__getitem__)


def folder_latency(
    folder: str | Path,
    threads: int | None = None,
    batch_size: int = 1,
    min_seconds: float = 1.0,
    ort_threads: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Latency (ms, median) of a model folder on this CPU, in eager PyTorch (channels-last) and in
    ONNX Runtime after :func:`hvs.export.export_onnx` to a temporary file: ``{"threads",
    "torch_ms_batch<B>", "ort_ms_batch<B>"}``. When the export or ORT fails, ``"ort_error"`` says
    why instead (one line) and the PyTorch figure stands.

    ``ort_threads`` (e.g. ``[1, 2]``): ORT is timed at each of these intra-op thread counts and at
    ``threads``, in rounds that alternate between them (so a drift of the machine falls on each
    alike), and ``"ort_ms_batch<B>"`` is the fastest, as a deployment would configure each model;
    ``"ort_threads"`` names its count and ``"ort_ms_batch<B>_by_threads"`` keeps every figure. A
    small network often runs faster on one thread than on two: its per-operator work is too small
    to split, and the split's synchronisation is paid per operator."""
    from . import export as hvs_export  # optional extra (onnx, onnxruntime): imported when used
    from .models.cost import measure_latency

    threads = int(threads or torch.get_num_threads())
    counts = ort_thread_counts(threads, ort_threads)
    model, card = ckpt.load_model(folder)
    key = f"ort_ms_batch{batch_size}"
    row: dict[str, Any] = {
        "threads": threads,
        f"torch_ms_batch{batch_size}": measure_latency(
            model.to(memory_format=torch.channels_last), card.input_shape, batch_size, min_seconds=min_seconds
        ),
    }
    with tempfile.TemporaryDirectory(prefix="hvs-latency-") as tmp:
        onnx = Path(tmp) / "model.onnx"
        try:
            hvs_export.export_onnx(folder, onnx)
            sessions = {t: hvs_export.ort_session(onnx, t) for t in counts}
            by_threads, best = fastest_thread_count(
                lambda t, seconds: hvs_export.measure_ort_latency(
                    sessions[t], card.input_shape, batch_size, min_seconds=seconds
                ),
                counts,
                min_seconds,
            )
            row[key] = by_threads[best]
            if ort_threads:
                row["ort_threads"] = best
                row[f"{key}_by_threads"] = {str(t): by_threads[t] for t in counts}
        except Exception as e:  # noqa: BLE001 -- export or ORT failure: no ORT figure, say why
            row["ort_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


__all__ = [
    "FingerprintTable",
    "Pipeline",
    "PipelineError",
    "check_made_for",
    "default_event_line",
    "evaluation_is_current",
    "fastest_thread_count",
    "file_logger",
    "folder_latency",
    "ort_thread_counts",
]
