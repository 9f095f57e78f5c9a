"""Atomic file writes, shared by every part of hvs that persists something.

Write to a unique temporary name in the target's folder, fsync, give it the usual permissions
(``mkstemp`` creates 0600 files), then ``os.replace``: a reader sees the old file or the new one,
never half of one, and concurrent writers (torchrun ranks) never share a temporary name. A write
that fails removes its temporary file; one that is killed (SIGKILL, power loss) cannot, so the
owner of a folder calls :func:`remove_stale_temps` when it next opens the folder for writing.
Kept free of heavy imports so the index and data packages can use it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_UMASK = os.umask(0)
os.umask(_UMASK)
# The temporary names atomic_write_bytes makes: ".<target name>.<8 random chars from mkstemp>.tmp".
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably; on any failure the target is untouched
    and the temporary file is gone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_temp_name(name: str) -> bool:
    """True for a temporary file name of :func:`atomic_write_bytes`."""
    return TEMP_NAME.match(name) is not None


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed :func:`atomic_write_bytes` left in ``folder`` (not in
    sub-folders); returns their names. Call it only where no other process writes into the
    folder at the same time (a run folder its trainer owns, a model folder being saved): a live
    writer's temporary file looks the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_temp_name(entry.name) and entry.is_file():
            try:
                entry.unlink()
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    dumps_kwargs.setdefault("indent", 2)
    atomic_write_bytes(path, (json.dumps(obj, **dumps_kwargs) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: Any) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's contents, or a folder's entries, to disk (a folder is opened and
    fsynced as a file is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_names(folder: Path) -> tuple[Path, Path]:
    """The sibling names a folder replacement stages in: the new contents, and the old kept until the swap."""
    return folder.with_name(f".{folder.name}.new"), folder.with_name(f".{folder.name}.old")


def recover_folder(folder: str | os.PathLike) -> None:
    """Finish or undo a :func:`replace_folder` that was killed: if the folder is missing but its old
    contents were already moved aside, move them back (the replacement had not committed); remove
    whatever staging is left. A no-op when nothing was interrupted."""
    folder = Path(folder)
    new, old = _swap_names(folder)
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)
        fsync_file(folder.parent)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def replace_folder(folder: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Replace the whole of ``folder`` by what ``write(staging)`` puts in a fresh staging folder, so
    that a reader (after :func:`recover_folder`) sees the old folder or the new one, never a mix of
    their files: the staging folder is written and fsynced beside it, the old folder is renamed
    aside, the new one renamed into place (the commit), then the old one deleted. A folder that does
    not exist yet is simply created by the same rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    new, old = _swap_names(folder)
    new.mkdir()
    result = write(new)
    fsync_file(new)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)  # the commit
    fsync_file(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return result


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks: the one digest every checksum hvs records uses
    (model fingerprints are its first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
