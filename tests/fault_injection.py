"""Fault injection: kill a writer at *every* file operation of one commit, then reopen what it left.

A commit (saving a model folder, adding to an index, embedding a build shard, ...) is a sequence of
file operations. "Atomic and durable" means that a ``kill -9`` at any instant of that sequence
leaves an artefact that opens with exactly the last committed state: the old one or the new one,
never a mix, never an error other than a clear "nothing committed yet". Random kills sample that
promise; this harness checks it at every instant:

1. **Record.** The commit runs once in a forked child under a tracer that logs every operation
   that changes something under the artefact's folder: ``os.open`` for writing, ``os.write`` /
   ``os.pwrite`` / ``os.ftruncate``, ``os.fsync``, ``os.replace`` / ``os.rename``,
   ``os.unlink`` / ``os.rmdir`` / ``os.mkdir`` / ``os.chmod`` (``shutil`` and ``tempfile`` go
   through these), writes through Python file objects (``open`` / ``io.open`` / ``os.fdopen``:
   the bytes reach the OS as ``os.write`` at ``flush`` / ``close``), and library calls that write a
   file from C (``faiss.write_index``; see :data:`OPAQUE_WRITERS`). Nothing about the artefact's
   file names is known here: the operations are discovered.
2. **Crash.** For each operation ``N`` a fresh copy of the pre-commit artefact gets a child that
   runs the commit and calls ``os._exit(137)`` (the status of a SIGKILLed process: no cleanup, no
   flush of Python buffers, locks dropped by the kernel) right *before* operation ``N``; each write
   is also cut *halfway* (a torn write: half its bytes reach the file, then the kill); and one
   child dies right *after* the last operation, before the commit returns.
3. **Reopen.** After each kill the parent reopens the artefact through the caller's ``observe``
   (the public API: ``open_index(...)``, ``load_model(...)``) and compares the state it returns
   with the state before the commit and after it. An optional ``recover`` then plays the next
   user (a retried build, the next writer) on the crashed artefact.

A kill -9 loses what the process had not handed to the kernel; it does not lose the page cache, so
this simulates process death, not power loss (fsync ordering is not exercised). Two consequences:
while the harness runs, ``os.fsync`` only checks its descriptor (a real one costs milliseconds on
a shared disk and changes nothing observable here), and the point right before an fsync or before
an op that failed (``os.mkdir`` of an existing folder) is skipped by default, since it leaves the
same files as the point right after it (``prune=False`` runs them anyway).

Everything runs in forked children of the test process (milliseconds each, the imports are
already done), with one thread for torch and FAISS in the child (a forked OpenMP pool is not safe
to use) and an alarm so a hung child fails instead of hanging the suite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KILLED = 137  # exit status of a process killed by SIGKILL, as a shell reports it

# C-level writers that open and write a file themselves (no Python file operation to trace):
# module -> function name -> position of the file-name argument. A crash "before" one skips the
# call; a torn one lets it finish and cuts the file to half its size.
OPAQUE_WRITERS: dict[str, dict[str, int]] = {"faiss": {"write_index": 1}}

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_REAL = {
    name: getattr(os, name)
    for name in (
        "open",
        "write",
        "pwrite",
        "ftruncate",
        "fsync",
        "fdatasync",
        "close",
        "replace",
        "rename",
        "unlink",
        "remove",
        "rmdir",
        "mkdir",
        "chmod",
    )
}
_REAL_IO_OPEN = io.open


def _checked_no_sync(fd: Any) -> None:
    """``os.fsync`` while crash points run: a process kill keeps the page cache, so an fsync
    changes nothing this harness can observe, and a real one costs milliseconds per call on a
    shared disk. The descriptor is still checked, so a bad fsync call fails as it would."""
    os.fstat(fd if isinstance(fd, int) else fd.fileno())


class HarnessError(AssertionError):
    """The harness itself could not do its job (the commit failed, or is not deterministic)."""


class _Nothing:
    """The state of an artefact to which nothing was ever committed."""

    def __repr__(self) -> str:
        return "<nothing committed>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Nothing)

    def __hash__(self) -> int:
        return 0


NOTHING = _Nothing()


@dataclass(frozen=True)
class Op:
    """One traced file operation of a commit (paths relative to the artefact's folder)."""

    index: int
    kind: str
    path: str
    size: int = 0  # bytes, for writes
    failed: bool = False  # it raised (os.mkdir of an existing folder): it changed nothing

    @property
    def inert(self) -> bool:
        """Dying right before this op leaves what dying right before the next one leaves: it
        failed, or it is an fsync (which changes nothing a process kill can observe)."""
        return self.failed or self.kind in ("fsync", "fdatasync")

    @property
    def tearable(self) -> bool:
        return self.kind == "opaque-write" or (self.kind in ("write", "pwrite") and self.size > 1)

    def __str__(self) -> str:
        return f"op {self.index} {self.kind} {self.path}" + (f" ({self.size} B)" if self.size else "")


@dataclass(frozen=True)
class CrashPoint:
    """Where a child dies: right before op ``op`` (``op == len(ops)``: after the last op), or
    halfway through it when ``torn``."""

    op: int
    torn: bool = False

    def describe(self, ops: Sequence[Op]) -> str:
        if self.op >= len(ops):
            return f"after the last op ({len(ops)} ops)"
        return ("halfway through " if self.torn else "before ") + str(ops[self.op])


def crash_points(ops: Sequence[Op], torn: bool = True, prune: bool = True) -> list[CrashPoint]:
    """Every point of a recorded commit: before each op, halfway through each write, after the end.

    ``prune`` leaves out the points right before an inert op (see :attr:`Op.inert`): each leaves
    the same files as the point after it, which is kept, so no distinct crash state is lost."""
    points = []
    for op in ops:
        if not (prune and op.inert):
            points.append(CrashPoint(op.index))
        if torn and op.tearable and not op.failed:
            points.append(CrashPoint(op.index, torn=True))
    points.append(CrashPoint(len(ops)))
    return points


# ----------------------------------------------------------------------------------------------
# The tracer (installed only in forked children; never uninstalled: the child exits).
class _Tracer:
    def __init__(self, root: Path, crash: CrashPoint | None, report: Callable[[dict], None]):
        self.root = os.path.abspath(root)
        self.crash, self.report = crash, report
        self.ops: list[Op] = []
        self.fds: dict[int, str] = {}  # open descriptors of paths under root
        self.pid = os.getpid()

    # -- helpers ----------------------------------------------------------------------------------
    def _abs(self, path: Any, dir_fd: int | None = None) -> str | None:
        if isinstance(path, int):
            return self.fds.get(path)
        p = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(p):
            base = self.fds.get(dir_fd)
            if base is None:
                return None
            p = os.path.join(base, p)
        return os.path.abspath(p)

    def _mine(self, path: str | None) -> bool:
        """Under the artefact's folder, or in a sibling staging folder of it (``.NAME.*``, where a
        whole-folder replacement writes before its rename)."""
        if path is None:
            return False
        if path == self.root or path.startswith(self.root + os.sep):
            return True
        parent, name = os.path.split(self.root)
        rel = os.path.relpath(path, parent)
        return not rel.startswith("..") and rel.split(os.sep)[0].startswith(f".{name}.")

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return rel.replace(str(self.pid), "<pid>")

    def op(self, kind: str, path: str, size: int = 0, torn: Callable[[], None] | None = None) -> int:
        """Log an operation about to happen (returns its index); die here if this is the crash point."""
        op = Op(len(self.ops), kind, path, size)
        self.ops.append(op)
        if self.crash is not None and self.crash.op == op.index:
            self.report(
                {"killed_at": op.index, "kinds": [o.kind for o in self.ops], "sizes": [o.size for o in self.ops]}
            )
            if self.crash.torn and torn is not None:
                torn()
            os._exit(KILLED)
        return op.index

    def run(self, index: int | None, fn: Callable, *args, **kwargs) -> Any:
        """Do a logged operation; one that raises is marked failed (it changed nothing)."""
        try:
            return fn(*args, **kwargs)
        except OSError:
            if index is not None:
                self.ops[index] = dataclasses.replace(self.ops[index], failed=True)
            raise

    # -- the patched functions --------------------------------------------------------------------
    def install(self) -> None:
        t, real = self, _REAL

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            p = t._abs(path, dir_fd)
            mine = t._mine(p)
            i = t.op("open", t._rel(p)) if mine and flags & _WRITE_FLAGS else None
            fd = t.run(i, real["open"], path, flags, mode, dir_fd=dir_fd)
            if mine:
                t.fds[fd] = p
            else:
                t.fds.pop(fd, None)
            return fd

        def write(fd, data):
            p = t.fds.get(fd)
            if p is None:
                return real["write"](fd, data)
            view = memoryview(data).cast("B")
            i = t.op("write", t._rel(p), view.nbytes, torn=lambda: real["write"](fd, view[: view.nbytes // 2]))
            return t.run(i, real["write"], fd, data)

        def pwrite(fd, data, offset):
            p = t.fds.get(fd)
            if p is None:
                return real["pwrite"](fd, data, offset)
            view = memoryview(data).cast("B")
            i = t.op(
                "pwrite", t._rel(p), view.nbytes, torn=lambda: real["pwrite"](fd, view[: view.nbytes // 2], offset)
            )
            return t.run(i, real["pwrite"], fd, data, offset)

        def on_fd(name):
            def fn(fd, *args):
                num = fd if isinstance(fd, int) else fd.fileno()
                p = t.fds.get(num)
                i = t.op(name, t._rel(p)) if p is not None else None
                if name in ("fsync", "fdatasync"):
                    return t.run(i, _checked_no_sync, fd)  # see _checked_no_sync
                return t.run(i, real[name], fd, *args)

            return fn

        def close(fd):
            t.fds.pop(fd, None)
            return real["close"](fd)

        def two_paths(name):
            def fn(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
                a, b = t._abs(src, src_dir_fd), t._abs(dst, dst_dir_fd)
                i = (
                    t.op(name, f"{t._rel(a) if a else src} -> {t._rel(b) if b else dst}")
                    if t._mine(a) or t._mine(b)
                    else None
                )
                return t.run(i, real[name], src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

            return fn

        def one_path(name):
            def fn(path, *args, dir_fd=None, **kwargs):
                p = t._abs(path, dir_fd)
                i = t.op(name, t._rel(p)) if t._mine(p) else None
                if dir_fd is not None:
                    kwargs["dir_fd"] = dir_fd
                return t.run(i, real[name], path, *args, **kwargs)

            return fn

        def io_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
            p = (
                t.fds.get(file)
                if isinstance(file, int)
                else (t._abs(file) if isinstance(file, (str, bytes, os.PathLike)) else None)
            )
            if not t._mine(p) or not set(mode) & set("wxa") or "+" in mode or opener is not None:
                f = _REAL_IO_OPEN(file, mode, buffering, encoding, errors, newline, closefd, opener)
                if not isinstance(file, int):
                    t.fds.pop(f.fileno(), None)  # a descriptor number reused by an untraced open
                return f
            if isinstance(file, int):
                fd = file
            else:
                flags = (
                    os.O_WRONLY
                    | os.O_CREAT
                    | {"w": os.O_TRUNC, "x": os.O_EXCL, "a": os.O_APPEND}[next(c for c in mode if c in "wxa")]
                )
                fd = os.open(file, flags, 0o666)
                closefd = True
            raw = _HeldWriter(fd, p, closefd)
            if "b" in mode:
                return raw
            return io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline=newline, write_through=True)

        os.open, os.write, os.pwrite, os.close = open_, write, pwrite, close
        for name in ("fsync", "fdatasync", "ftruncate"):
            setattr(os, name, on_fd(name))
        for name in ("replace", "rename"):
            setattr(os, name, two_paths(name))
        for name in ("unlink", "remove", "rmdir", "mkdir", "chmod"):
            setattr(os, name, one_path(name))
        io.open = io_open
        import builtins

        builtins.open = io_open

        for module_name, functions in OPAQUE_WRITERS.items():
            module = sys.modules.get(module_name)
            if module is None:
                continue
            for fname, arg in functions.items():
                setattr(module, fname, self._opaque(getattr(module, fname), arg))

    def _opaque(self, fn: Callable, arg: int) -> Callable:
        t = self

        def wrapped(*args, **kwargs):
            target = args[arg] if len(args) > arg else None
            p = t._abs(target) if isinstance(target, (str, os.PathLike)) else None
            if not t._mine(p):
                return fn(*args, **kwargs)

            def torn():
                fn(*args, **kwargs)
                size = os.path.getsize(p)
                with _REAL_IO_OPEN(p, "r+b") as f:
                    f.truncate(size // 2)

            i = t.op("opaque-write", t._rel(p), torn=torn)  # its size is known only once written
            return t.run(i, fn, *args, **kwargs)

        return wrapped


class _HeldWriter(io.RawIOBase):
    """A write-mode file whose bytes reach the OS (as one traced ``os.write``) at flush/close:
    what a kill before the flush loses is exactly what a buffered Python file would lose."""

    def __init__(self, fd: int, path: str, closefd: bool):
        super().__init__()
        self._fd, self._closefd, self.name = fd, closefd, path
        self._pending = bytearray()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        self._pending += view
        return view.nbytes

    def flush(self) -> None:
        while self._pending:
            n = os.write(self._fd, bytes(self._pending))  # the traced os.write
            del self._pending[:n]

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            if self._closefd:
                os.close(self._fd)
            super().close()


# ----------------------------------------------------------------------------------------------
# Running a commit in a forked child.
def _single_threaded() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(1)


def run_in_child(
    fn: Callable[[Callable[[dict], None]], None], timeout: int = 60, env: dict[str, str] | None = None
) -> tuple[int, list[dict]]:
    """Run ``fn(report)`` in a forked child; return its exit code and the dicts it reported.

    ``report`` sends a JSON-able dict to the parent. An exception in the child is reported as
    ``{"error": traceback}`` with exit code 1; a child still running after ``timeout`` seconds dies
    of SIGALRM (exit code -14)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 1
        try:
            os.close(r)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(timeout)
            os.environ.update(env or {})
            _single_threaded()

            def report(msg: dict) -> None:
                data = (json.dumps(msg) + "\n").encode()
                while data:
                    data = data[_REAL["write"](w, data) :]

            try:
                fn(report)
                code = 0
            except BaseException:
                report({"error": traceback.format_exc()})
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with _REAL_IO_OPEN(r, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    lines = b"".join(chunks).decode().splitlines()
    return os.waitstatus_to_exitcode(status), [json.loads(line) for line in lines if line]


def record_ops(root: Path, commit: Callable[[Path], Any], timeout: int = 60) -> list[Op]:
    """Run ``commit(root)`` once in a child under the tracer; return its file operations."""

    def child(report):
        tracer = _Tracer(root, None, report)
        tracer.install()
        commit(root)
        report({"ops": [[o.kind, o.path, o.size, o.failed] for o in tracer.ops]})

    code, msgs = run_in_child(child, timeout)
    errors = [m["error"] for m in msgs if "error" in m]
    if code != 0 or errors:
        raise HarnessError(f"the commit failed when run alone (exit {code}):\n" + "".join(errors))
    ops = next(m["ops"] for m in msgs if "ops" in m)
    return [Op(i, kind, path, size, failed) for i, (kind, path, size, failed) in enumerate(ops)]


def crash_commit(
    root: Path, commit: Callable[[Path], Any], point: CrashPoint, ops: Sequence[Op], timeout: int = 60
) -> None:
    """Run ``commit(root)`` in a child killed at ``point``; check it died where the recording said."""

    def child(report):
        tracer = _Tracer(root, point, report)
        tracer.install()
        commit(root)
        if point.op >= len(ops):  # after the last op, before the commit returns to its caller
            report(
                {
                    "killed_at": len(tracer.ops),
                    "kinds": [o.kind for o in tracer.ops],
                    "sizes": [o.size for o in tracer.ops],
                }
            )
            os._exit(KILLED)

    code, msgs = run_in_child(child, timeout)
    where = point.describe(ops)
    errors = [m["error"] for m in msgs if "error" in m]
    if errors:
        raise HarnessError(f"the commit raised instead of dying {where}:\n" + "".join(errors))
    if code != KILLED:
        raise HarnessError(f"the child exited with {code}, not {KILLED}, {where} (not deterministic, or hung)")
    got = next(m for m in msgs if "killed_at" in m)
    want = [o.kind for o in ops[: point.op + 1]]
    if got["killed_at"] != point.op or got["kinds"] != want:
        raise HarnessError(f"the commit is not deterministic: killed {where} but its ops were {got['kinds']}")


# ----------------------------------------------------------------------------------------------
# States and verdicts.
def fingerprint(obj: Any) -> Any:
    """A canonical, exactly comparable form of ``obj``: arrays and tensors become
    (dtype, shape, SHA-256 of their bytes); dicts, lists and tuples are converted recursively."""
    if hasattr(obj, "detach"):  # torch.Tensor
        obj = obj.detach().cpu().contiguous().numpy()
    if hasattr(obj, "dtype") and hasattr(obj, "tobytes"):
        import numpy as np

        arr = np.ascontiguousarray(obj)
        return ("array", str(arr.dtype), tuple(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()[:16])
    if isinstance(obj, dict):
        return {str(k): fingerprint(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [fingerprint(v) for v in obj]
    return obj


@dataclass
class Outcome:
    """What one kill left: ``verdict`` is "old", "new", "committed" (another allowed state),
    "mixed" (a state that was never committed), "error" (reopening raised an HVSError other than
    "nothing committed"), "traceback" (reopening raised anything else) or "recovery" (the artefact
    opened, but the next user's step on it failed)."""

    point: CrashPoint
    where: str
    verdict: str
    detail: str = ""
    state: Any = None
    recovered: Any = None

    @property
    def ok(self) -> bool:
        return self.verdict in ("old", "new", "committed")

    def __str__(self) -> str:
        return f"killed {self.where}: {self.verdict}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    """All crash points of one commit and what each left."""

    ops: list[Op]
    before: Any
    after: Any
    outcomes: list[Outcome] = field(default_factory=list)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def tracebacks(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict == "traceback"]

    def verdicts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.verdict] = out.get(o.verdict, 0) + 1
        return out

    def describe(self, outcomes: Iterable[Outcome] | None = None) -> str:
        outcomes = self.failures() if outcomes is None else list(outcomes)
        head = f"{len(self.ops)} ops, {len(self.outcomes)} crash points, verdicts {self.verdicts()}"
        return "\n".join([head, *map(str, outcomes)])


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def crash_matrix(
    workdir: Path,
    prepare: Callable[[Path], Any],
    commit: Callable[[Path], Any],
    observe: Callable[[Path], Any],
    *,
    nothing: Callable[[BaseException], bool] = lambda e: False,
    allowed: Callable[[Any, Any], list] | None = None,
    recover: Callable[[Path, Any, Any], Any] | None = None,
    torn: bool = True,
    prune: bool = True,
    timeout: int = 60,
) -> Report:
    """Kill ``commit`` at every file operation and check what each kill left.

    ``prepare(root)`` makes the artefact as it is before the commit in ``root`` (``workdir/artefact``;
    run once, then each crash point gets a fresh copy at that same path, so artefacts and states
    may mention their own path).
    ``commit(root)`` is the write under test; it runs in forked children. ``observe(root)`` reopens
    the artefact with the public API and returns a comparable state (see :func:`fingerprint`);
    when it raises an exception for which ``nothing(exc)`` holds, the state is :data:`NOTHING`.
    ``allowed(before, after)`` lists committed states other than those two (a commit made of
    several commits). ``recover(root, state, after)`` runs after a good reopen as the next user of
    the artefact would (the next writer, a retried build) and raises if that fails; what it returns
    is kept in ``Outcome.recovered``. ``torn`` and ``prune``: see :func:`crash_points`.

    While it runs, ``os.fsync`` and ``os.fdatasync`` only check their descriptor, in the parent
    as in the children (a kill does not lose the page cache; power loss is not simulated).
    """
    workdir = Path(workdir)
    template, root = workdir / "template", workdir / "artefact"
    synced = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = _checked_no_sync
    try:
        root.mkdir(parents=True)
        prepare(root)  # at the artefact's own path: what it records about itself stays true
        shutil.copytree(root, template, symlinks=True)
        return _crash_all(template, root, commit, observe, nothing, allowed, recover, torn, prune, timeout)
    finally:
        os.fsync, os.fdatasync = synced


def _crash_all(
    template: Path, root: Path, commit, observe, nothing, allowed, recover, torn: bool, prune: bool, timeout: int
) -> Report:
    from hvs.errors import HVSError

    def fresh() -> None:
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(template, root, symlinks=True)

    def state_of() -> Any:
        try:
            return observe(root)
        except Exception as e:
            if nothing(e):
                return NOTHING
            raise

    fresh()
    before = state_of()
    ops = record_ops(root, commit, timeout)
    after = state_of()
    if after == before:
        raise HarnessError("the commit changed nothing that observe() sees: the test would prove nothing")
    good = {"old": before, "new": after}
    extra = list(allowed(before, after)) if allowed else []
    report = Report(ops, before, after)
    for point in crash_points(ops, torn, prune):
        fresh()
        where = point.describe(ops)
        crash_commit(root, commit, point, ops, timeout)
        try:
            state = state_of()
        except HVSError as e:
            report.outcomes.append(Outcome(point, where, "error", _one_line(e)))
            continue
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            report.outcomes.append(
                Outcome(point, where, "traceback", f"{_one_line(e)} at {Path(tb.filename).name}:{tb.lineno}")
            )
            continue
        verdict = next((name for name, s in good.items() if state == s), None)
        if verdict is None:
            verdict = "committed" if any(state == s for s in extra) else "mixed"
        outcome = Outcome(point, where, verdict, "" if verdict != "mixed" else f"state {_short(state)}", state)
        if outcome.ok and recover is not None:
            try:
                outcome.recovered = recover(root, state, after)
            except Exception as e:
                outcome.verdict, outcome.detail = "recovery", _one_line(e)
        report.outcomes.append(outcome)
    return report


def _short(state: Any, limit: int = 200) -> str:
    text = repr(state)
    return text if len(text) <= limit else text[: limit - 3] + "..."
