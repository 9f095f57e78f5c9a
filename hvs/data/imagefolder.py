"""torchvision ``ImageFolder`` layout: ``imagefolder:DIR`` with ``DIR/<class>/<image>``.

The layout used by timm, ml-fct and openBCT: each sub-folder of ``DIR`` is a class (sorted by
name → label index), and the image files anywhere below it (walked recursively, as torchvision
does) are its samples. Files whose ending is not an image type (``README.txt``) and hidden files
are ignored; image files that fail to decode are skipped and listed in ``RetrievalData.skipped``
(or raise with ``strict=True``).

Images are decoded once, as RGB (``channels=3``, default) or grayscale, resized to
``image_size`` (default 64) by shorter-side resize + center crop. The split rules are in
:mod:`hvs.data.splits` (closed: 60/20/20 per class; open: half the classes train).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .base import SPLITS, DataError, RetrievalData
from .images import IMG_EXTENSIONS, BBox, load_images
from .registry import data_warning, register_source
from .splits import build, check_protocol, split_by_protocol
from .store import choose_mode, list_images

DEFAULT_SIZE = 64
ROLE_IDS = {"train": 0, "query": 1, "gallery": 2}


def is_image_file(fname: str) -> bool:
    return not fname.startswith(".") and fname.lower().endswith(IMG_EXTENSIONS)


def scan_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of an ImageFolder tree, classes and files sorted.

    A class folder with no image file below it is not a class (it would be a class no split
    can hold, and it shifts every later label): it is left out with one :class:`DataWarning`
    line naming the folder(s).
    """
    if not os.path.isdir(root):
        raise DataError(f"imagefolder:{root}: no such directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    classes: list[str] = []
    empty: list[str] = []
    files: list[tuple[str, int]] = []
    for cls in folders:
        found = []
        for dirpath, dirnames, fnames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(fnames) if is_image_file(f)]
        if not found:
            empty.append(cls)
            continue
        files += [(path, len(classes)) for path in found]
        classes.append(cls)
    if not files:
        raise DataError(
            f"imagefolder:{root}: no images found (expected DIR/<class>/<image> with "
            f"endings {' '.join(IMG_EXTENSIONS)})"
        )
    if empty:
        data_warning(
            f"imagefolder:{root}: {len(empty)} class folder(s) hold no images and are not "
            f"used as classes: {', '.join(os.path.join(root, c) for c in empty[:5])}"
            + (", ..." if len(empty) > 5 else "")
        )
    return classes, files


def from_files(
    name: str,
    items: Sequence[tuple[str, BBox | None]],
    labels: Sequence[int],
    classes: list[str],
    *,
    protocol: str,
    size: int,
    channels: int,
    strict: bool,
    seed: int,
    roles: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    data_mode: str | None = None,
    workers: int | None = None,
    cache_dir: str | None = None,
) -> RetrievalData:
    """Decode ``items`` (path, bbox) and split them into a :class:`RetrievalData`.

    ``roles`` (one of train/query/gallery per item) fixes the split; without it the split
    follows ``protocol``. Failures are reported under ``names`` (default: the paths).
    ``splits``: the roles wanted (default all). With ``roles`` only those items are decoded;
    without, every item still is, because which files decode decides the protocol's split
    (an unreadable file is dropped before splitting, so no class loses its training images).

    ``data_mode`` / ``workers`` / ``cache_dir``: decode now into memory, or keep an
    :class:`~hvs.data.store.ImageStore` over the files (see :mod:`hvs.data.store`); the split,
    the skipped list and the pixels are the same either way.
    """
    check_protocol(protocol)
    wanted = tuple(SPLITS if splits is None else splits)
    todo = list(range(len(items)))
    if roles is not None and set(wanted) != set(SPLITS):
        todo = [i for i in todo if roles[i] in wanted]
    mode = choose_mode(data_mode, name, len(todo), channels, size)
    todo_names = None if names is None else [names[i] for i in todo]
    if mode == "memory":
        desc = f"decode {name} " + ("(all splits)" if len(todo) == len(items) else "+".join(wanted))
        images, kept_todo, skipped = load_images(
            [items[i] for i in todo], size, channels, strict=strict, names=todo_names, desc=desc
        )
    else:
        images, kept_todo, skipped = list_images(
            [items[i] for i in todo], size, channels, strict=strict, names=todo_names, workers=workers
        )
        if mode == "cache":
            from .cache import cached_store

            images = cached_store(images, name, cache_dir=cache_dir, strict=strict)
    kept = [todo[k] for k in kept_todo]
    kept_t = torch.as_tensor(kept, dtype=torch.long)
    lab = torch.as_tensor(list(labels), dtype=torch.long)[kept_t]
    src = [(sources or [p for p, _ in items])[i] for i in kept]
    if roles is None:
        index = split_by_protocol(lab, protocol, seed)
    else:
        role_t = torch.as_tensor([ROLE_IDS[roles[i]] for i in kept], dtype=torch.long)
        index = tuple(torch.nonzero(role_t == r).flatten() for r in range(3))
    return build(name, images, lab, src, classes, index, protocol, skipped, splits=wanted)


@register_source("imagefolder", arg="DIR", arg_required=True, help="torchvision ImageFolder tree DIR/<class>/<image>")
def imagefolder(
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
    """Images in ``DIR/<class>/...``; classes sorted; split by ``protocol`` with ``seed``."""
    root = os.path.abspath(os.path.expanduser(arg))
    classes, files = scan_folder(root)
    return from_files(
        f"imagefolder:{arg}",
        [(p, None) for p, _ in files],
        [label for _, label in files],
        classes,
        protocol=protocol,
        size=image_size or DEFAULT_SIZE,
        channels=channels or 3,
        strict=strict,
        seed=seed,
        splits=splits,
        data_mode=data_mode,
        workers=workers,
        cache_dir=cache_dir,
    )
