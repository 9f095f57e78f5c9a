"""CSV/TSV manifests: ``csv:FILE`` with a header row naming the columns.

Required columns ``path`` and ``label`` (any string; classes are the sorted distinct labels);
optional ``split`` (``train`` / ``query`` / ``gallery``, fixing each row's role) and ``bbox``
(``"x1 y1 x2 y2"`` in pixels, top-left origin, to crop an object out of a larger photo). Other
columns are ignored. The separator is a comma, or a tab when the header line contains a tab
(open_clip's manifests are TSV). Column names are matched case-insensitively.

Paths are relative to the folder holding the CSV and must stay inside it: a manifest is data a
user may have downloaded, and ``../../home/…`` or ``/etc/…`` must not make us read other files
(checked lexically, so symbolic links placed inside the folder by its owner still work).
Without a ``split`` column, rows are split like ``imagefolder`` according to the protocol.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

from .base import SPLITS, DataError, RetrievalData
from .imagefolder import DEFAULT_SIZE, from_files
from .registry import register_source

REQUIRED = ("path", "label")


def _bbox(cell: str, where: str) -> tuple[float, ...] | None:
    cell = cell.strip()
    if not cell:
        return None
    parts = [p for p in re.split(r"[\s,;]+", cell) if p]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise DataError(f"{where}: bbox {cell!r} must be four numbers 'x1 y1 x2 y2'")
    return box


def read_manifest(
    file: str, *, name: str | None = None
) -> tuple[list[tuple[str, tuple[float, ...] | None, str, str | None, int]], bool]:
    """Parse the manifest: ``([(abs_path, bbox, label, split, line), ...], has_split_column)``."""
    name = name or f"csv:{file}"
    path = os.path.abspath(os.path.expanduser(file))
    if not os.path.isfile(path):
        raise DataError(f"{name}: no such file")
    root = os.path.dirname(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{name}: cannot read ({type(err).__name__}: {err})") from None
    header_line = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in header_line else ","
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DataError(f"{name}: empty file (expected a header with columns path,label)")
    columns = [h.strip().lower() for h in header]
    for col in REQUIRED:
        if col not in columns:
            raise DataError(f"{name}: missing column {col!r} (have: {', '.join(columns)})")
    col = {c: columns.index(c) for c in ("path", "label", "split", "bbox") if c in columns}

    rows = []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank line
        where = f"{name}: line {line}"
        get = lambda key: cells[col[key]].strip() if key in col and col[key] < len(cells) else ""  # noqa: E731, B023  (used in this iteration only)
        rel, label = get("path"), get("label")
        if not rel:
            raise DataError(f"{where}: empty path")
        if not label:
            raise DataError(f"{where}: empty label for {rel!r}")
        full = os.path.normpath(os.path.join(root, os.path.expanduser(rel)))
        if os.path.commonpath([root, full]) != root:
            raise DataError(f"{where}: path {rel!r} resolves outside the manifest's folder {root}")
        split = None
        if "split" in col:
            split = get("split").lower()
            if split not in SPLITS:
                raise DataError(f"{where}: unknown split {get('split')!r} (expected one of {', '.join(SPLITS)})")
        rows.append((full, _bbox(get("bbox"), where) if "bbox" in col else None, label, split, line))
    if not rows:
        raise DataError(f"{name}: no rows after the header")
    return rows, "split" in col


@register_source("csv", arg="FILE", arg_required=True, help="CSV/TSV manifest with columns path,label[,split][,bbox]")
def csv_manifest(
    arg: str,
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
) -> RetrievalData:
    """Rows of ``path,label[,split][,bbox]``; paths relative to the CSV's folder.

    With a ``split`` column, only the rows of the requested ``splits`` are decoded."""
    name = f"csv:{arg}"
    rows, has_split = read_manifest(arg, name=name)
    classes = sorted({label for _, _, label, _, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    return from_files(
        name,
        [(p, box) for p, box, _, _, _ in rows],
        [index[label] for _, _, label, _, _ in rows],
        classes,
        protocol=protocol,
        size=image_size or DEFAULT_SIZE,
        channels=channels or 3,
        strict=strict,
        seed=seed,
        roles=[s for _, _, _, s, _ in rows] if has_split else None,
        splits=splits,
        data_mode=data_mode,
        workers=workers,
        cache_dir=cache_dir,
    )
