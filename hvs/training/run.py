"""The run folder of a training job: its resolved config, its log and its resumable checkpoint.

One folder per run (``--out``), shared by the model trainer (:func:`hvs.train.train`) and the
supernet trainer (:func:`hvs.nas.train.train_supernet`)::

    train_config.json   the resolved configuration (written once the data and model are built)
    log.csv             one row per finished epoch
    state.pt            what --resume needs after the last finished epoch (checksummed)
    ...                 the trainer's own artefacts (the model folder, the supernet folder)

The rules, the same for both trainers:

- a folder holding a *run* (a checkpoint or any file that is not ours) is never overwritten: the
  same command with ``--resume`` continues it, and only with a configuration equal to the
  recorded one up to the keys that may change between sessions (threads, device, ...);
- a start that failed before its first epoch finished left at most ``train_config.json``,
  ``log.csv`` and temporary files: nothing to resume, so it does not block the next start,
  whatever that one's configuration (the failed start is replaced);
- temporary files of a write that was killed are removed when the folder is next opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from .. import fileio
from ..errors import HVSError

STATE = ckpt.STATE
LOG = "log.csv"
TRAIN_CONFIG = "train_config.json"
# What a start that never finished an epoch can have left behind (besides temporary files).
_UNSTARTED = {TRAIN_CONFIG, LOG}


class RunFolder:
    """The folder ``path`` of one training run (see the module docstring for its rules)."""

    def __init__(self, path: str | os.PathLike, error: type[HVSError] = HVSError) -> None:
        self.path = Path(path)
        self.error = error  # the trainer's error class, so its callers catch what they expect

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    def holds_run(self) -> bool:
        """True when the folder holds something worth keeping: a checkpoint, a finished model, or
        any file that a failed start cannot have left."""
        if not self.path.is_dir():
            return False
        return any(e.name not in _UNSTARTED and not fileio.is_temp_name(e.name) for e in self.path.iterdir())

    def check(self, config: dict[str, Any], defaults: dict[str, Any], *, resume: bool, resume_free: set[str]) -> None:
        """Refuse a start that would overwrite a run, or a resumption with another configuration.

        ``defaults`` fills keys a run's recorded config lacks (options added since it started).
        Called on every rank before any writes, so every rank fails alike."""
        if not self.holds_run():
            return
        if not resume:
            raise self.error(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")
        recorded = self.path / TRAIN_CONFIG
        if not recorded.is_file():
            return
        try:
            old = json.loads(recorded.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self.error(f"{recorded}: corrupt run configuration ({e}); cannot check the resumption") from None
        if not isinstance(old, dict):
            raise self.error(f"{recorded}: corrupt run configuration (not a JSON object)")
        diff = sorted(k for k in config if k not in resume_free and old.get(k, defaults.get(k)) != config[k])
        if diff:
            raise self.error(f"cannot resume {self.path}: configuration differs in {', '.join(diff)}")

    def start(self, config: dict[str, Any]) -> None:
        """Create the folder (rank 0 only), clear what a killed write or a failed start left, and
        record the configuration. Call it once the data and model are built, so a job that
        cannot start leaves nothing behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temps(self.path)
        if not self.state_path.is_file() and (self.path / LOG).is_file():
            (self.path / LOG).unlink()  # the log of a start that never checkpointed
        ckpt.atomic_write_json(self.path / TRAIN_CONFIG, config)

    def has_state(self) -> bool:
        return self.state_path.is_file()

    def load_state(self) -> dict[str, Any]:
        """The last checkpoint, verified (a one-line CheckpointError naming a damaged file)."""
        return ckpt.load_state(self.state_path)

    def save_epoch(self, history: list[dict], state: dict[str, Any]) -> None:
        """The log, then the checkpoint (the file --resume trusts comes last)."""
        write_log(self.path / LOG, history)
        ckpt.save_state(self.state_path, state)


def write_log(path: Path, history: list[dict]) -> None:
    """``history`` (one dict per epoch, same keys) as a CSV file, written atomically."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    fileio.atomic_write_bytes(path, buf.getvalue().encode())
