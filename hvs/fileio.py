"""Atomic file writes, shared by every part of hvs that persists something.

Write to a unique temporary name in the target's folder, fsync, give it the usual permissions
(``mkstemp`` creates 0600 files), then ``os.replace``: a reader sees the old file or the new one,
never half of one, and concurrent writers (torchrun ranks) never share a temporary name. Kept free
of heavy imports so the index and data packages can use it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
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


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    dumps_kwargs.setdefault("indent", 2)
    atomic_write_bytes(path, (json.dumps(obj, **dumps_kwargs) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: Any) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
