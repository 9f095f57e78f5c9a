"""Data-source registry: ``create_dataset("name:ARG")`` → :class:`RetrievalData`.

Sources are chosen by an explicit prefix, as timm's ``hf-hub:`` / ``local-dir:`` choose where a
model comes from: ``fashion-mnist``, ``imagefolder:DIR``, ``csv:FILE``, ``deepfashion2:DIR``,
``synthetic:KEY=VAL,...``. A bare path is never guessed at (a folder of images and a folder of
DeepFashion2 annotations look alike); an unknown prefix fails with the list of valid ones.

A source is a function ``fn(arg, *, protocol, image_size, channels, strict, seed, **kwargs)``
registered with :func:`register_source`; one that also takes ``splits`` decodes only the splits
asked for (a source without it is loaded whole and trimmed here, so callers see the same thing).
:func:`create_dataset` checks the contract on what it returns (non-empty splits, labels inside
``classes``, one image shape, closed-set classes seen in training) so that a new source cannot
hand the trainer an inconsistent dataset, and looks for leaked items (the same image in query and
gallery, a row twice in a split: :mod:`hvs.data.checks`).

Warnings about data are :class:`DataWarning`\\ s, printed as one line ``hvs: warning: ...``
(not Python's ``file:line: category`` plus a source line); they remain ordinary warnings, so
``warnings.catch_warnings`` / ``pytest.warns`` see them and ``-W error`` turns them into errors.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .base import SPLITS, DataError, DataWarning, RetrievalData, data_warning  # noqa: F401  (re-exported)
from .checks import check_duplicates
from .splits import check_nonempty, check_protocol
from .store import check_data_mode, default_workers

SourceFn = Callable[..., RetrievalData]


@dataclass(frozen=True)
class SourceInfo:
    name: str
    fn: SourceFn
    arg: str  # what follows "name:" in a spec, e.g. "DIR"; "" when the source takes none
    arg_required: bool
    help: str

    @property
    def usage(self) -> str:
        if not self.arg:
            return self.name
        return f"{self.name}:{self.arg}" if self.arg_required else f"{self.name}[:{self.arg}]"


_SOURCES: dict[str, SourceInfo] = {}


def register_source(
    name: str,
    fn: SourceFn | None = None,
    *,
    arg: str = "",
    arg_required: bool = False,
    help: str = "",
    overwrite: bool = False,
):
    """Register ``fn`` as the source ``name``; usable as a decorator.

    ``arg`` names what may follow ``name:`` in a spec (``"DIR"``, ``"FILE"``; empty if nothing)
    and ``arg_required`` whether it must. ``fn`` is called as
    ``fn(arg_or_None, protocol=..., image_size=..., channels=..., strict=..., seed=..., **kw)``.
    """
    if not name or ":" in name:
        raise ValueError(f"source name must be non-empty and contain no ':', got {name!r}")

    def deco(f: SourceFn) -> SourceFn:
        if name in _SOURCES and not overwrite and _SOURCES[name].fn is not f:
            raise ValueError(f"data source {name!r} is already registered")
        doc = help or ((f.__doc__ or "").strip().splitlines() or [""])[0]
        _SOURCES[name] = SourceInfo(name, f, arg, arg_required, doc)
        return f

    return deco if fn is None else deco(fn)


def list_sources() -> list[str]:
    """Names of the registered data sources, sorted."""
    return sorted(_SOURCES)


def source_info(name: str) -> SourceInfo:
    if name not in _SOURCES:
        valid = ", ".join(_SOURCES[n].usage for n in list_sources())
        hint = (
            " (pick a prefix, e.g. imagefolder:DIR or csv:FILE)"
            if ("/" in name or "\\" in name or name.startswith("."))
            else ""
        )
        raise DataError(f"unknown data source {name!r}{hint}; valid: {valid}")
    return _SOURCES[name]


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"name"`` → ``("name", None)``; ``"name:ARG"`` → ``("name", "ARG")`` (split at the first
    colon, so ARG may itself contain colons)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; valid: {', '.join(list_sources())}")
    name, sep, arg = spec.strip().partition(":")
    return name, (arg if sep else None)


def create_dataset(
    spec: str,
    *,
    protocol: str = "closed",
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    seed: int = 0,
    splits: Sequence[str] | None = None,
    data_mode: str | None = None,
    workers: int | None = None,
    cache_dir: str | None = None,
    **source_kwargs,
) -> RetrievalData:
    """Load the dataset named by ``spec`` (``"name"`` or ``"name:ARG"``).

    ``protocol``: ``"closed"`` (query/gallery classes are seen in training) or ``"open"``
    (disjoint classes); DeepFashion2 is always open. ``image_size``/``channels``: output shape
    (each source has its default; every source converts to the channels asked for, so a model's
    ``in_chans`` can always be passed). ``strict``: an unreadable item, or a leaked one (the same
    image in query and gallery, a duplicate in a split), raises :class:`DataError` instead of
    being skipped/warned about. ``seed``: every random split is a function of it. ``splits``:
    the roles to load (default all); the others are ``None`` in the result, and sources that can
    skip decoding them do. ``data_mode`` (``auto`` / ``memory`` / ``stream`` / ``cache``),
    ``workers`` (DataLoader processes decoding streamed images; default one per core, at most 8)
    and ``cache_dir``: how a file source holds its images, see :mod:`hvs.data.store`; sources
    generated or read whole into memory (fashion-mnist, kanji-fonts, synthetic) refuse
    ``stream``/``cache``. Remaining keyword arguments go to the source.
    """
    check_protocol(protocol)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    wanted = _check_splits(splits)
    name, arg = parse_spec(spec)
    info = source_info(name)
    if arg is not None and not info.arg:
        raise DataError(f"data source {name!r} takes no argument, got {spec!r}")
    if arg is None and info.arg_required:
        raise DataError(f"data source {name!r} needs an argument: {info.usage}")
    params = inspect.signature(info.fn).parameters
    if splits is not None and "splits" in params:
        source_kwargs["splits"] = wanted
    mode = check_data_mode(data_mode)
    default_workers(workers)  # checked here, whatever the source
    if "data_mode" in params:
        source_kwargs.update(data_mode=mode, workers=workers, cache_dir=cache_dir)
    elif data_mode is not None and mode in ("stream", "cache"):
        raise DataError(
            f"data source {name!r} is held in memory only; data mode {mode} applies to file sources "
            f"({', '.join(n for n in list_sources() if 'data_mode' in inspect.signature(_SOURCES[n].fn).parameters)})"
        )
    data = info.fn(
        arg, protocol=protocol, image_size=image_size, channels=channels, strict=strict, seed=seed, **source_kwargs
    )
    data.name = spec
    for role in SPLITS:
        if role not in wanted:
            setattr(data, role, None)
    if data.train is None:
        data.mean, data.std = (), ()
    validate(data)
    if data.skipped:
        warnings.warn(
            f"{spec}: skipped {len(data.skipped)} item(s) that could not be used, e.g. "
            f"{data.skipped[0]} (all listed in RetrievalData.skipped)",
            DataWarning,
            stacklevel=2,
        )
    data.duplicates = [d.message for d in check_duplicates(data, strict=strict)]
    return data


def _check_splits(splits: Sequence[str] | None) -> tuple[str, ...]:
    if splits is None:
        return SPLITS
    if isinstance(splits, str):
        splits = (splits,)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataError(f"splits must name some of {', '.join(SPLITS)}, got {list(splits)!r}")
    return tuple(role for role in SPLITS if role in splits)


def validate(data: RetrievalData) -> None:
    """Check the dataset contract on its loaded splits; raises :class:`DataError` naming the
    first violation."""
    check_protocol(data.protocol)
    splits = {role: data.split(role) for role in data.loaded}
    if not splits:
        raise DataError(f"{data.name}: no split loaded")
    check_nonempty(data.name, **splits)
    shape = tuple(next(iter(splits.values())).images.shape[1:])
    n_classes = len(data.classes)
    for role, split in splits.items():
        if tuple(split.images.shape[1:]) != shape:
            raise DataError(
                f"{data.name}: {role} images are {tuple(split.images.shape[1:])}, {next(iter(splits))} images {shape}"
            )
        lo, hi = int(split.labels.min()), int(split.labels.max())
        if lo < 0 or hi >= n_classes:
            raise DataError(f"{data.name}: {role} labels span {lo}..{hi} but there are {n_classes} classes")
    if data.train is None:
        return  # mean/std and the protocol's class rules are about the training split
    if len(data.mean) != shape[0] or len(data.std) != shape[0]:
        raise DataError(f"{data.name}: mean/std need {shape[0]} values per channel")
    tested = [data.split(r).labels for r in ("query", "gallery") if r in splits]
    if not tested:
        return
    seen = set(data.train.labels.unique().tolist())
    test = set(torch.cat(tested).unique().tolist())
    if data.protocol == "closed" and not test <= seen:
        unseen = sorted(test - seen)
        raise DataError(
            f"{data.name}: closed protocol but {len(unseen)} query/gallery class(es) "
            f"have no training images, e.g. {data.classes[unseen[0]]!r} "
            f"(use protocol='open')"
        )
    if data.protocol == "open" and test & seen:
        warnings.warn(
            f"{data.name}: open protocol but {len(test & seen)} query/gallery class(es) also occur in training",
            DataWarning,
            stacklevel=3,
        )
