"""Upgrading an index's gallery model in place: re-embed the old items in a resumable backfill.

    from hvs.index import open_index
    from hvs.index.backfill import backfill

    with open_index("faiss:runs/index") as index:
        report = backfill(index, "runs/gallery-v2", batch_size=256)
    print(report.summary())

``hvs index backfill SPEC --gallery-model NEW`` is the same call. ``NEW`` must be allowed to
write the index (:mod:`hvs.compat` rule 5: a gallery model the index knows, or one trained
backward-compatible with one it knows, e.g. ``hvs train --role gallery --gallery-model OLD
--compat bct``); it is registered in the sidecar before its first vector is written.

Every live item whose vector records another model (or none: an index written before vectors
recorded their model) is re-embedded by ``NEW`` from its recorded ``source``, decoded at NEW's
input size and channels:

* a file path: the file itself;
* anything else the dataset the index was built from names (``meta["data"]``: its spec, split
  and protocol): ``fashion-mnist:test:17``, DeepFashion2's ``REL#ITEM`` crops, or the
  ``SPEC:SPLIT:ROW`` of a split without sources. The dataset is loaded once, at NEW's size, and
  only if some source is not a file.

Items go in batches of ``batch_size``; each batch is one durable ``replace`` (vectors and model
fingerprint of existing ids, label and source kept) under the index's writer lock, which is
released between batches (and while a batch is embedded), so a running service keeps answering
(with either model's vector for an item, never none) and other writers interleave: a batch waits
a moment for another writer's lock, and an item another writer removed meanwhile is dropped.
The index itself is the progress: a backfill killed at any point is resumed by running it
again, which re-embeds only the items still recording another model. An item whose source is
missing or unreadable is listed in the report and left as it is (``strict=True``: an error
naming it, after the batches before it are written).
When no live vector of another model remains, the sidecar's primary ``gallery_model`` (and
``preprocessing``) becomes NEW, so ``hvs index add`` and the service embed new items with it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compat import primary_patch
from ..gallery import embed_gallery_images, load_gallery_encoder, register_gallery_model
from .base import GalleryIndex, IndexLockedError, IndexStoreError

MAX_LISTED_MISSING = 20
LOCK_WAIT_S = 10.0  # how long a batch waits for another writer's lock before giving up (rerun resumes)


@dataclass
class BackfillReport:
    """What one :func:`backfill` call did, and what is left."""

    spec: str
    model: str  # fingerprint of the new gallery model
    registered: bool  # the index did not know the model before this call
    todo: int  # items recording another model when the call started
    replaced: int = 0
    batches: int = 0
    missing: list[str] = field(default_factory=list)  # "ID: SOURCE (reason)", at most MAX_LISTED_MISSING
    n_missing: int = 0
    remaining: int = 0  # live items still recording another model when the call ended
    complete: bool = False  # none remain: the index's primary gallery model is now ``model``

    def summary(self) -> str:
        state = (
            "complete: the index's gallery model is now " + self.model
            if self.complete
            else f"{self.remaining} item(s) still embedded by another model"
        )
        return (
            f"backfill of {self.spec} with {self.model}: re-embedded {self.replaced} of {self.todo} item(s) "
            f"in {self.batches} batch(es), {self.n_missing} left with a missing or unreadable source; {state}"
        )


class _Sources:
    """Record ``source`` strings -> uint8 (C, H, W) images at one model's size and channels."""

    def __init__(self, meta: dict, image_size: int, channels: int) -> None:
        data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        self.spec, self.split = data.get("spec"), data.get("split")
        self.protocol = data.get("protocol") or "closed"
        self.size, self.channels = int(image_size), int(channels)
        self._rows: dict[str, int] | None = None
        self._images: Any = None
        self._error: str | None = None

    def _dataset(self) -> str | None:
        """Load the index's dataset split once (None, or why it cannot be)."""
        if self._rows is not None or self._error is not None:
            return self._error
        if not self.spec or not self.split:
            self._error = "not a file, and the index records no dataset (meta data.spec/split)"
            return self._error
        from ..data import create_dataset
        from ..errors import HVSError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # skipped items were reported when the index was built
                data = create_dataset(
                    self.spec,
                    protocol=self.protocol,
                    image_size=self.size,
                    channels=self.channels,
                    splits=(self.split,),
                )
        except (HVSError, OSError, ValueError) as e:
            self._error = f"the index's dataset {self.spec} cannot be loaded ({' '.join(str(e).split())[:200]})"
            return self._error
        part = data.split(self.split)
        self._images = part.images
        if part.sources:
            self._rows = {src: row for row, src in reversed(list(enumerate(part.sources)))}
        else:  # build_gallery_index names the items of a split without sources SPEC:SPLIT:ROW
            prefix = f"{self.spec}:{self.split}:"
            self._rows = {f"{prefix}{row}": row for row in range(len(part.images))}
        return None

    def load(self, source: str | None) -> tuple[torch.Tensor | None, str | None]:
        """(image, None), or (None, why not)."""
        from ..data.images import ImageError, load_image

        if not source:
            return None, "no source recorded"
        if os.path.isfile(source):
            try:
                return load_image(source, self.size, self.channels), None
            except (ImageError, OSError) as e:
                return None, " ".join(str(e).split())[:200]
        error = self._dataset()
        if error is not None:
            return None, error
        row = self._rows.get(source)
        if row is None:
            return None, f"not a file, nor an item of {self.spec} {self.split}"
        try:  # a streamed split decodes here: a file changed or gone since the listing is left, not fatal
            return self._images[row], None
        except (ImageError, OSError) as e:
            return None, " ".join(str(e).split())[:200]


def _batches(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def backfill(
    index: GalleryIndex | str,
    gallery_model: str | os.PathLike,
    *,
    batch_size: int = 256,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
    max_batches: int | None = None,
) -> BackfillReport:
    """Re-embed every live item of ``index`` whose vector another model made with ``gallery_model``.

    See the module docstring. ``index``: an open index or a spec. ``log`` gets one progress line
    per batch. ``max_batches``: stop after that many batches (a rerun does the rest). Raises
    :class:`~hvs.compat.CompatError` if ``gallery_model`` may not write the index, and with
    ``strict`` :class:`IndexStoreError` for the first item whose source cannot be read."""
    from . import open_index

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IndexStoreError(f"batch size must be a positive integer, got {batch_size!r}")
    own = isinstance(index, (str, os.PathLike))
    ix = open_index(index) if own else index
    try:
        return _backfill(ix, gallery_model, batch_size, strict, log, max_batches)
    finally:
        if own:
            ix.close()


def _backfill(
    index: GalleryIndex,
    gallery_model: str | os.PathLike,
    batch_size: int,
    strict: bool,
    log: Callable[[str], None] | None,
    max_batches: int | None,
) -> BackfillReport:
    say = log or (lambda _: None)
    encoder = load_gallery_encoder(index, gallery_model)  # hvs.compat rule 5, or CompatError
    fp = encoder.fingerprint
    try:
        registered = register_gallery_model(index, encoder, gallery_model)
    finally:
        index.release_writer()  # other writers may write while batches are embedded
    pre = encoder.preprocessing
    sources = _Sources(index.meta, pre["image_size"], pre["channels"])
    todo = index.ids(exclude_model=fp)
    report = BackfillReport(spec=index.spec, model=fp, registered=registered, todo=int(len(todo)))
    done = 0
    try:
        for batch in _batches(todo, batch_size):
            if max_batches is not None and report.batches >= max_batches:
                break
            if index.stale():
                index.refresh()  # another writer committed: work on what is there now
            records = [r for r in index.records(batch, skip_missing=True) if r.get("model") != fp]
            ids, images, names = [], [], []
            for rec in records:
                image, why = sources.load(rec.get("source"))
                if image is None:
                    if strict:
                        raise IndexStoreError(
                            f"item {rec['id']} of {index.spec} cannot be re-embedded: source "
                            f"{rec.get('source')!r}: {why} (rerun without --strict to leave such items)"
                        )
                    report.n_missing += 1
                    if len(report.missing) < MAX_LISTED_MISSING:
                        report.missing.append(f"{rec['id']}: {rec.get('source')} ({why})")
                    continue
                ids.append(int(rec["id"]))
                images.append(image)
                names.append(str(rec.get("source")))
            if ids:
                emb = embed_gallery_images(encoder, torch.stack(images), names)
                report.replaced += _replace(index, np.asarray(ids, dtype=np.int64), emb, fp)
            report.batches += 1
            done += len(batch)
            say(f"backfill {index.spec}: {done}/{len(todo)} checked, {report.replaced} re-embedded")
    finally:
        index.release_writer()
    _finish(index, report, fp)
    return report


def _locked(e: IndexStoreError) -> bool:
    return isinstance(e, IndexLockedError)


def _replace(index: GalleryIndex, ids: np.ndarray, emb: np.ndarray, fp: str) -> int:
    """One durable ``replace``, the writer lock released after it. Another writer holding the lock
    (a write of its own, a moment long) is waited for, up to LOCK_WAIT_S; an item removed meanwhile
    (between reading its record and this write) is dropped and the rest written."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return _replace_once(index, ids, emb, fp)
        except IndexStoreError as e:
            if not _locked(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _replace_once(index: GalleryIndex, ids: np.ndarray, emb: np.ndarray, fp: str) -> int:
    try:
        return int(index.replace(ids, emb, model=fp))
    except IndexStoreError as e:
        if _locked(e):
            raise
        if index.stale():
            index.refresh()
        alive = {int(r["id"]) for r in index.records(ids, skip_missing=True)}
        if len(alive) == len(ids):
            raise  # not a concurrent removal
        keep = np.asarray([i in alive for i in ids.tolist()], dtype=bool)
        return int(index.replace(ids[keep], emb[keep], model=fp)) if keep.any() else 0
    finally:
        index.release_writer()


def _finish(index: GalleryIndex, report: BackfillReport, fp: str) -> None:
    """Count what is left; none of another model: ``fp`` becomes the primary gallery model."""
    if index.stale():
        index.refresh()
    counts = index.model_counts()
    report.remaining = int(sum(n for m, n in counts.items() if m != fp))
    report.complete = report.remaining == 0
    if report.complete and (index.meta.get("gallery_model") or {}).get("fingerprint") != fp:
        try:
            index.update_meta(primary_patch(index.meta, fp))
        finally:
            index.release_writer()


def missing_lines(report: BackfillReport) -> Sequence[str]:
    """The report's listed items that were left, plus a line for those not listed."""
    lines = [f"left: {m}" for m in report.missing]
    if report.n_missing > len(report.missing):
        lines.append(f"... and {report.n_missing - len(report.missing)} more")
    return lines


__all__ = ["BackfillReport", "backfill", "missing_lines"]
