"""DeepFashion2 consumer-to-shop retrieval (Ge et al., CVPR 2019): ``deepfashion2:DIR``.

Reads the dataset in its released layout, ``DIR/train/image/000001.jpg`` with
``DIR/train/annos/000001.json`` (same for ``validation/``). Each JSON has image-level ``source``
(``"user"`` = consumer photo, ``"shop"`` = catalogue photo) and ``pair_id``, and one key per
clothing item (``item1``, ``item2``, …; like the official COCO converter, every key other than
``source``/``pair_id`` is an item) with ``bounding_box`` ``[x1, y1, x2, y2]`` (top-left origin,
as the converter uses it), ``style``, ``category_id`` and ``category_name``.

Each item is cropped by its box (clipped to the image) and resized to ``image_size`` (default
64, shorter side + center crop). The identity of an item is ``f"{pair_id}:{style}"`` for
``style > 0`` — the dataset's definition of a positive pair is a user item and a shop item with
the same ``pair_id`` and the same ``style > 0``; ``style == 0`` items cannot form pairs.

* train = every ``style > 0`` item of ``train/`` (user and shop photos alike);
* query = ``user`` items with ``style > 0`` from ``validation/``;
* gallery = *all* ``shop`` items of ``validation/``: a ``style == 0`` item gets its own class
  ``f"distractor:{image_id}:{item}"``, so it is retrieved only as a wrong answer, as in the
  official evaluation (its gallery lists every shop item).

This is the simpler "ground-truth boxes" protocol (retrieval only, no detection). The official
split keeps train and validation ``pair_id``s apart, so the protocol is always ``open``. Without
``validation/``, a seeded ``holdout`` fraction of the train ``pair_id``s that have at least one
user/shop positive pair is held out as query/gallery instead.

The full dataset (~490k items) does not fit in memory at useful sizes: above 2 GiB of decoded
crops it is streamed from the photos (``data_mode``, see :mod:`hvs.data.store`), each item
decoded at the draft scale the in-memory path uses, so the pixels are the same.

Source kwargs: ``holdout`` (default 0.2), ``limit`` (read at most this many images per folder,
in file-name order — the full train set is 390k images).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .base import SPLITS, DataError, RetrievalData, Split
from .images import ImageError, channel_stats, crop_resize, decode_progress, open_image
from .registry import register_source
from .splits import check_nonempty
from .store import ImageStore, choose_mode, default_workers, item_box_problem, item_digest, probe_files

DEFAULT_SIZE = 64
IMAGE_LEVEL_KEYS = ("source", "pair_id")


@dataclass
class Item:
    """One clothing item of one image, before cropping."""

    folder: str  # "train" / "validation"
    image_id: str  # file stem, e.g. "000001"
    item: str  # "item1", ...
    source: str  # "user" / "shop"
    pair_id: int
    style: int
    category_id: int
    bbox: tuple[float, float, float, float]

    @property
    def identity(self) -> str:
        if self.style > 0:
            return f"{self.pair_id}:{self.style}"
        return f"distractor:{self.image_id}:{self.item}"


def _image_path(root: str, folder: str, image_id: str) -> str | None:
    base = os.path.join(root, folder, "image", image_id)
    for ext in (".jpg", ".jpeg", ".png", ".JPG"):
        if os.path.exists(base + ext):
            return base + ext
    return None


def read_annotations(
    root: str, folder: str, *, strict: bool = False, limit: int | None = None
) -> tuple[list[Item], list[str]]:
    """Parse ``root/folder/annos/*.json`` into :class:`Item` records; returns (items, skipped)."""
    annos = os.path.join(root, folder, "annos")
    if not os.path.isdir(annos):
        raise DataError(f"deepfashion2:{root}: missing folder {folder}/annos")
    files = sorted(f for f in os.listdir(annos) if f.endswith(".json") and not f.startswith("."))
    if limit is not None:
        files = files[:limit]
    items: list[Item] = []
    skipped: list[str] = []

    def bad(where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if strict:
            raise DataError(msg)
        skipped.append(msg)

    for fname in files:
        path = os.path.join(annos, fname)
        image_id = fname[: -len(".json")]
        try:
            with open(path, encoding="utf-8") as f:
                anno = json.load(f)
            source = anno["source"]
            pair_id = int(anno["pair_id"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            bad(path, f"unreadable annotation ({type(err).__name__}: {' '.join(str(err).split())})")
            continue
        except (KeyError, TypeError, ValueError) as err:
            bad(path, f"annotation lacks a valid 'source'/'pair_id' ({type(err).__name__}: {err})")
            continue
        if source not in ("user", "shop"):
            bad(path, f"source must be 'user' or 'shop', got {source!r}")
            continue
        for key in sorted((k for k in anno if k not in IMAGE_LEVEL_KEYS), key=_item_order):
            it = anno[key]
            try:
                box = tuple(float(v) for v in it["bounding_box"])
                if len(box) != 4:
                    raise ValueError(f"bounding_box has {len(box)} numbers")
                items.append(
                    Item(folder, image_id, key, source, pair_id, int(it["style"]), int(it.get("category_id", 0)), box)
                )  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as err:
                bad(f"{path}#{key}", f"malformed item ({type(err).__name__}: {err})")
    return items, skipped


def _item_order(key: str) -> tuple[int, str]:
    """item2 before item10."""
    digits = key[4:] if key.startswith("item") else ""
    return (int(digits), key) if digits.isdigit() else (1 << 30, key)


def crop_items(
    root: str, items: list[Item], size: int, channels: int, *, strict: bool = False, desc: str | None = None
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Crop every item (each image decoded once); returns (images, kept indices, skipped).
    ``desc`` labels a progress bar shown on a terminal."""
    out = torch.empty((len(items), channels, size, size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[str] = []
    by_image: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        by_image.setdefault((it.folder, it.image_id), []).append(i)

    def bad(msg: str) -> None:
        if strict:
            raise ImageError(msg)
        skipped.append(msg)

    with decode_progress(len(by_image), desc) as bar:
        for (folder, image_id), idx in by_image.items():
            bar.update(1)
            _crop_image(root, folder, image_id, idx, items, out, size, channels, kept, bad)
    return out[: len(kept)].clone(), kept, skipped


def _crop_image(
    root: str,
    folder: str,
    image_id: str,
    idx: list[int],
    items: list[Item],
    out: torch.Tensor,
    size: int,
    channels: int,
    kept: list[int],
    bad,
) -> None:
    """Decode one photo and crop each of its items ``idx`` into ``out`` (failures go to ``bad``)."""
    path = _image_path(root, folder, image_id)
    if path is None:
        bad(f"{os.path.join(root, folder, 'image', image_id)}.jpg: image file not found")
        return
    try:
        img, scale = open_image(path, channels, size=size, bboxes=[items[i].bbox for i in idx])
    except ImageError as err:
        bad(str(err))
        return
    for i in idx:
        try:
            out[len(kept)] = crop_resize(img, size, items[i].bbox, scale=scale, name=f"{path}#{items[i].item}")
        except ImageError as err:
            bad(str(err))
            continue
        kept.append(i)


def list_items(
    root: str, items: list[Item], size: int, channels: int, *, strict: bool = False, workers: int | None = None
) -> tuple[ImageStore, list[int], list[str]]:
    """The streaming counterpart of :func:`crop_items`: the same (kept, skipped), found by
    probing each photo once (:func:`~hvs.data.store.probe_files`), and a store whose items decode
    at the JPEG draft scale :func:`crop_items` uses (the smallest box of the photo's items)."""
    by_image: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        by_image.setdefault((it.folder, it.image_id), []).append(i)
    paths = {key: _image_path(root, *key) for key in by_image}
    probed = dict(zip(paths.values(), probe_files([p for p in paths.values() if p is not None], channels)))
    kept: list[int] = []
    skipped: list[str] = []
    draft: dict[int, float | None] = {}

    def bad(msg: str) -> None:
        if strict:
            raise ImageError(msg)
        skipped.append(msg)

    for (folder, image_id), idx in by_image.items():
        path = paths[folder, image_id]
        if path is None:
            bad(f"{os.path.join(root, folder, 'image', image_id)}.jpg: image file not found")
            continue
        reason = probed[path][0]
        if reason is not None:
            bad(f"{path}: {reason}")
            continue
        boxes = [items[i].bbox for i in idx]
        sides = [min(b[2] - b[0], b[3] - b[1]) for b in boxes if b[2] - b[0] > 0 and b[3] - b[1] > 0]
        side = min(sides, default=None)
        for i in idx:
            problem = item_box_problem(path, channels, size, items[i].bbox, boxes)
            if problem is not None:
                bad(f"{path}#{items[i].item}: {problem}")
                continue
            kept.append(i)
            draft[i] = side
    kept_paths = [paths[items[i].folder, items[i].image_id] for i in kept]
    store = ImageStore(
        kept_paths,
        [items[i].bbox for i in kept],
        size,
        channels,
        draft=[draft[i] for i in kept],
        names=[f"{p}#{items[i].item}" for p, i in zip(kept_paths, kept)],
        digests=[item_digest(probed[p][3], items[i].bbox, size, channels) for p, i in zip(kept_paths, kept)],
        workers=default_workers(workers),
    )
    return store, kept, skipped


def _identity_key(name: str) -> tuple:
    pair, _, style = name.partition(":")
    return (0, int(pair), int(style)) if pair.isdigit() and style.isdigit() else (1, name)


@register_source(
    "deepfashion2",
    arg="DIR",
    arg_required=True,
    help="DeepFashion2 consumer-to-shop retrieval (train/ + validation/ folders)",
)
def deepfashion2(
    arg: str,
    *,
    protocol: str = "open",
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    seed: int = 0,
    holdout: float = 0.2,
    limit: int | None = None,
    splits: Sequence[str] | None = None,
    data_mode: str | None = None,
    workers: int | None = None,
    cache_dir: str | None = None,
) -> RetrievalData:
    """Items cropped by their boxes; identity ``pair_id:style``; always the open protocol."""
    name = f"deepfashion2:{arg}"
    root = os.path.abspath(os.path.expanduser(arg))
    if not os.path.isdir(root):
        raise DataError(f"{name}: no such directory")
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"{name}: missing folder train/ (expected train/image + train/annos)")
    size, channels = image_size or DEFAULT_SIZE, channels or 3
    train_items, skipped = read_annotations(root, "train", strict=strict, limit=limit)

    if os.path.isdir(os.path.join(root, "validation")):
        val_items, val_skipped = read_annotations(root, "validation", strict=strict, limit=limit)
        skipped += val_skipped
    else:  # carve an open-set test part out of train, by pair_id
        if not 0.0 < holdout < 1.0:
            raise DataError(f"{name}: holdout must be in (0, 1), got {holdout}")
        user = {(it.pair_id, it.style) for it in train_items if it.source == "user" and it.style > 0}
        shop = {(it.pair_id, it.style) for it in train_items if it.source == "shop" and it.style > 0}
        eligible = sorted({p for p, _ in user & shop})
        all_pairs = {it.pair_id for it in train_items}
        if not eligible or len(all_pairs) < 2:
            raise DataError(
                f"{name}: no validation/ folder and too few pair_ids in train/ to hold "
                f"out a query/gallery part (need >= 2, one with a user and a shop "
                f"item of the same style > 0)"
            )
        n_hold = min(max(1, math.floor(holdout * len(eligible) + 0.5)), len(all_pairs) - 1)
        perm = np.random.default_rng(seed).permutation(len(eligible))
        held = {eligible[i] for i in perm[:n_hold]}
        val_items = [it for it in train_items if it.pair_id in held]
        train_items = [it for it in train_items if it.pair_id not in held]

    train_items = [it for it in train_items if it.style > 0]
    query_items = [it for it in val_items if it.source == "user" and it.style > 0]
    gallery_items = [it for it in val_items if it.source == "shop"]

    train_ids = sorted({it.identity for it in train_items}, key=_identity_key)
    test_ids = sorted({it.identity for it in query_items + gallery_items} - set(train_ids), key=_identity_key)
    classes = train_ids + test_ids
    class_index = {c: i for i, c in enumerate(classes)}

    wanted = set(SPLITS if splits is None else splits)
    n_items = sum(
        len(x) for x, r in ((train_items, "train"), (query_items, "query"), (gallery_items, "gallery")) if r in wanted
    )
    mode = choose_mode(data_mode, name, n_items, channels, size)

    def split(items: list[Item], role: str) -> Split | None:
        if role not in wanted:
            return None  # annotations are read for the class list; the photos are not decoded
        if mode == "memory":
            images, kept, bad = crop_items(root, items, size, channels, strict=strict, desc=f"decode {name} {role}")
        else:
            images, kept, bad = list_items(root, items, size, channels, strict=strict, workers=workers)
            if mode == "cache":
                from .cache import cached_store

                images = cached_store(images, f"{name} {role}", cache_dir=cache_dir, strict=strict)
        skipped.extend(bad)
        kept_items = [items[i] for i in kept]
        return Split(
            images,
            torch.tensor([class_index[it.identity] for it in kept_items], dtype=torch.long),
            [
                f"{os.path.relpath(_image_path(root, it.folder, it.image_id) or '', root)}#{it.item}"
                for it in kept_items
            ],
            role,
        )

    train, query, gallery = (split(train_items, "train"), split(query_items, "query"), split(gallery_items, "gallery"))
    check_nonempty(name, train=train, query=query, gallery=gallery)
    mean, std = channel_stats(train.images) if train is not None else ((), ())
    return RetrievalData(name, train, query, gallery, classes, "open", mean, std, skipped)
