"""Leakage checks every dataset goes through: the same item in query and gallery, or twice in a split.

A query whose own image sits in the gallery is found at rank 1 by any model, so a manifest that
lists the query files again as gallery rows drives M(g->g) and M(q->q) Recall@1 to 100 % and
hides the gap compatibility is about; a row listed twice in a split weighs that item double.
Both are easy to make by hand (a copy-pasted manifest, a re-exported folder), so
:func:`find_duplicates` looks for them in every dataset :func:`~hvs.data.create_dataset`
returns, whatever the source, in two kinds:

* the **same item**: same source (file path, ``path#item``, ``fashion-mnist:test:17``) *and*
  same decoded pixels — a row listed twice. Same source with other pixels is not a duplicate:
  two bounding-box crops of one photo are two items;
* the **same pixels from another source**: a file copied under another name.

Between query and gallery both kinds are counted; within a split only repeated items, since
pixel copies inside one split are common and harmless (two fonts drawing a glyph alike, two
shots of one product). Pixels are compared by a 16-byte BLAKE2b digest of each decoded ``uint8`` image, of
every query and gallery image and of the training images whose source repeats: milliseconds per
thousand images, next to the seconds decoding them took, so the check runs on every load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .base import DataError, RetrievalData, Split, data_warning, is_store, take


@dataclass(frozen=True)
class Duplicate:
    """One kind of duplication found in a dataset: how many items, one line saying so."""

    kind: str  # "query-gallery-item", "query-gallery-pixels" or "<split>-item"
    count: int
    message: str  # one line, starting with the dataset's name


def image_hashes(images: torch.Tensor) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each ``uint8`` (C, H, W) image of an (N, C, H, W) tensor.

    A streamed split (an :class:`~hvs.data.store.ImageStore`) is not decoded for this: its
    digests, taken when the files were listed, hash each file's bytes with the crop box, so a
    copied file is found; a re-encoded copy (same pixels, other bytes) is not."""
    if is_store(images):
        return images.digests()
    arr = images.contiguous().numpy().reshape(images.shape[0], -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr]


def _repeated_items(split: Split) -> tuple[int, str]:
    """(items equal to an earlier item of the split: same source and same pixels, an example).
    Only the items whose source repeats are hashed."""
    if split.sources is None:
        return 0, ""
    seen: dict[str, int] = {}
    repeated = [i for i, s in enumerate(split.sources) if seen.setdefault(s, i) != i]
    if not repeated:
        return 0, ""
    candidates = sorted(set(repeated) | {seen[split.sources[i]] for i in repeated})
    digest = dict(zip(candidates, image_hashes(take(split.images, candidates))))
    keys: set[tuple[str, bytes]] = set()
    count, example = 0, ""
    for i in candidates:
        key = (split.sources[i], digest[i])
        if key in keys:
            count += 1
            example = example or split.sources[i]
        keys.add(key)
    return count, example


def find_duplicates(data: RetrievalData) -> list[Duplicate]:
    """Every duplication listed in this module's docstring, found in ``data``'s loaded splits
    (empty when there is none)."""
    out: list[Duplicate] = []
    for role in data.loaded:
        n, example = _repeated_items(data.split(role))
        if n:
            out.append(
                Duplicate(
                    f"{role}-item",
                    n,
                    f"{data.name}: {n} {role} item(s) are listed more "
                    f"than once in the {role} split (same source and pixels), e.g. {example}",
                )
            )
    if "query" not in data.loaded or "gallery" not in data.loaded:
        return out
    query, gallery = data.query, data.gallery
    q_hash, g_hash = image_hashes(query.images), image_hashes(gallery.images)
    q_src = query.sources or [None] * len(query)
    g_src = gallery.sources or [None] * len(gallery)
    gallery_items = {(h, s) for h, s in zip(g_hash, g_src) if s is not None}
    gallery_pixels: dict[bytes, int] = {}
    for j, h in enumerate(g_hash):
        gallery_pixels.setdefault(h, j)
    same, copies = [], []
    for i, (h, s) in enumerate(zip(q_hash, q_src)):
        if (h, s) in gallery_items:
            same.append(s)
        elif h in gallery_pixels:
            j = gallery_pixels[h]
            copies.append(f"{s} = {g_src[j]}" if s is not None and g_src[j] is not None else f"query {i} = gallery {j}")
    if same:
        out.append(
            Duplicate(
                "query-gallery-item",
                len(same),
                f"{data.name}: {len(same)} query item(s) are also in the gallery (same "
                f"source and pixels), e.g. {same[0]}; every model finds them at rank 1",
            )
        )
    if copies:
        out.append(
            Duplicate(
                "query-gallery-pixels",
                len(copies),
                f"{data.name}: {len(copies)} query image(s) are pixel-identical to a gallery "
                f"image, e.g. {copies[0]}; every model finds them at rank 1",
            )
        )
    return out


def check_duplicates(data: RetrievalData, *, strict: bool = False) -> list[Duplicate]:
    """:func:`find_duplicates`, each finding one :class:`~hvs.data.DataWarning` line; with
    ``strict`` the first finding raises :class:`DataError` instead."""

    found = find_duplicates(data)
    if found and strict:
        more = f" (and {len(found) - 1} more finding(s))" if len(found) > 1 else ""
        raise DataError(f"{found[0].message}{more}; refused in strict mode")
    for dup in found:
        data_warning(dup.message)
    return found
