"""A writer killed at every file operation of a commit leaves the last committed state.

Each test runs one commit of an artefact hvs writes (a model folder, a training checkpoint, an
index version, an index build with its shard cache) under :mod:`fault_injection`: the commit's
file operations are discovered by tracing it once, then a forked child is killed (``os._exit(137)``)
before each of them, halfway through each write and after the last one, and the artefact is
reopened with the public API after each kill. It must hold exactly the old state or the new one
("nothing committed yet" counts as the old state of a first commit, when its error says so), and
the next user of the artefact (the next writer, a retried build, ``--resume``) must succeed on it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import fault_injection as fi
import numpy as np
import pytest
import torch

from hvs import checkpoint as ckpt
from hvs.checkpoint import CheckpointError
from hvs.index import IndexStoreError, build_index, open_index
from hvs.models import create_model

# The one-line errors that mean "nothing was ever committed here" (and nothing else).
NO_MODEL = re.compile(r"does not exist|is not a model folder")
NO_INDEX = re.compile(r"no index at|is not an hvs index")

DIM = 8
PROBES = np.random.default_rng(7).standard_normal((6, DIM)).astype(np.float32)
K = 64  # more than any index here holds: a search lists every item with its score


@pytest.fixture(autouse=True)
def one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def nothing_model(e: BaseException) -> bool:
    return isinstance(e, CheckpointError) and bool(NO_MODEL.search(str(e)))


def nothing_index(e: BaseException) -> bool:
    return isinstance(e, IndexStoreError) and bool(NO_INDEX.search(str(e)))


def check(report: fi.Report) -> None:
    assert report.outcomes, "no crash point was exercised"
    assert not report.failures(), report.describe()


# ----------------------------------------------------------------------------------------------
# The harness itself: it must fail a writer that is not atomic, and pass one that is.
def _two_files(write, value: str):
    def commit(root: Path) -> None:
        write(root / "a.json", {"v": value, "pad": "x" * 200})
        write(root / "b.json", {"v": value})

    return commit


def _plain_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def _pair(root: Path):
    return [json.loads((root / name).read_text())["v"] for name in ("a.json", "b.json")]


def test_harness_catches_torn_and_mixed_writes(tmp_path):
    report = fi.crash_matrix(tmp_path, _two_files(_plain_json, "old"), _two_files(_plain_json, "new"), _pair)
    # The commit writes in place, so the harness sees the open/write of each file and flags
    # a torn a.json (a JSONDecodeError traceback) and new a.json beside old b.json (mixed).
    assert {"open", "write"} <= {op.kind for op in report.ops}
    verdicts = report.verdicts()
    assert verdicts.get("traceback") and verdicts.get("mixed"), report.describe(report.outcomes)


def test_harness_passes_an_atomic_write_at_every_point(tmp_path):
    from hvs.fileio import atomic_write_json

    def write(value: str):
        return lambda root: atomic_write_json(root / "a.json", {"v": value})

    def observe(root: Path):
        return json.loads((root / "a.json").read_text())["v"]

    full = fi.crash_matrix(tmp_path / "all", write("old"), write("new"), observe, prune=False)
    pruned = fi.crash_matrix(tmp_path / "pruned", write("old"), write("new"), observe)
    check(full)
    check(pruned)
    # Pruning drops only points equivalent to a kept one (before an fsync or a failed op).
    assert len(pruned.outcomes) < len(full.outcomes) and any(op.inert for op in full.ops)
    assert {"replace", "fsync"} <= {op.kind for op in full.ops}


# ----------------------------------------------------------------------------------------------
# (a) Model folders.
def _model(seed: int):
    torch.manual_seed(seed)
    model = create_model("cnn-nano", embed_dim=DIM, in_chans=1)
    card = ckpt.ModelCard(
        model="cnn-nano",
        embed_dim=DIM,
        in_chans=1,
        image_size=12,
        mean=[0.5],
        std=[0.25],
        classes=["a", "b", "c"],
        extra={"seed": seed},
    )
    classifier = torch.randn(3, DIM, generator=torch.Generator().manual_seed(seed))
    return model, card, classifier


def model_state(folder: Path):
    """What a user of the folder gets: the card, the weights and the classifier."""
    model, card = ckpt.load_model(folder)
    return fi.fingerprint(
        {"card": card.to_dict(), "weights": model.state_dict(), "classifier": ckpt.load_classifier(folder)}
    )


def _save(seed: int):
    def save(root: Path) -> None:
        model, card, classifier = _model(seed)
        ckpt.save_model_folder(root / "m", model, card, classifier=classifier)

    return save


def _resave(seed: int):
    def recover(root: Path, state, after) -> list[str]:
        """The save is retried: it must give the new folder. Returns the names the retried folder
        holds beyond those of a clean save (what the kill left behind and nobody removed)."""
        _save(seed)(root)
        assert model_state(root / "m") == after, "a retried save does not give the saved folder"
        clean = root.parent / "clean"
        shutil.rmtree(clean, ignore_errors=True)
        _save(seed)(clean)
        return sorted({p.name for p in (root / "m").iterdir()} - {p.name for p in (clean / "m").iterdir()})

    return recover


@pytest.fixture(scope="module")
def first_save_report(tmp_path_factory):
    """save_model_folder into a folder that holds no model yet (what training does at its end)."""
    return fi.crash_matrix(
        tmp_path_factory.mktemp("first"),
        lambda root: None,
        _save(1),
        lambda root: model_state(root / "m"),
        nothing=nothing_model,
        recover=_resave(1),
    )


def test_first_model_save_is_all_or_nothing(first_save_report):
    assert first_save_report.before is fi.NOTHING
    check(first_save_report)


def test_a_killed_model_save_leaves_nothing_behind_once_retried(first_save_report):
    left = {o.where: o.recovered for o in first_save_report.outcomes if o.recovered}
    assert not left, "\n".join(f"killed {where}: left {names}" for where, names in left.items())


@pytest.fixture(scope="module")
def overwrite_report(tmp_path_factory):
    """save_model_folder over an existing model folder (the old model is seed 0, the new seed 1)."""
    return fi.crash_matrix(
        tmp_path_factory.mktemp("overwrite"),
        _save(0),
        _save(1),
        lambda root: model_state(root / "m"),
        nothing=nothing_model,
        recover=_resave(1),
    )


def test_overwritten_model_folder_never_fails_with_a_traceback(overwrite_report):
    report = overwrite_report
    assert not report.tracebacks(), report.describe(report.tracebacks())
    assert any(o.verdict == "old" for o in report.outcomes) and any(o.verdict == "new" for o in report.outcomes)


def test_overwritten_model_folder_keeps_the_old_model_or_the_new(overwrite_report):
    check(overwrite_report)


# ----------------------------------------------------------------------------------------------
# (a) Training checkpoints: state.pt in a run folder, then the model folder.
SPEC = "synthetic:classes=4,train_per_class=16,test_per_class=4,size=8"
TIMING = {"seconds", "images_per_s"}


@pytest.fixture(scope="module")
def data():
    from hvs.data import create_dataset

    # Forked children start from the parent's modules, so pay torch's lazy imports here once
    # (the first optimizer imports torch._dynamo: ~10 s on this CPU) rather than in every child.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return create_dataset(SPEC)


def _untimed(obj):
    """Drop wall-clock fields (seconds, images/s): they differ between two runs of one epoch."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def run_state(out: Path):
    """What ``--resume`` starts from (the checkpoint it loads) and the finished model folder, if any."""
    from hvs.train import STATE

    state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    resumable = fi.fingerprint(
        {
            "epoch": state["epoch"],
            "history": _untimed(json.loads(state["history"])),
            "model": state["model"],
            "head": state["head"],
            "optimizer": state["optimizer"],
        }
    )
    try:
        model, card = ckpt.load_model(out)
    except CheckpointError as e:
        if not NO_MODEL.search(str(e)):
            raise
        finished = None
    else:
        finished = fi.fingerprint({"card": _untimed(card.to_dict()), "weights": model.state_dict()})
    return {"resumable": resumable, "finished": finished}


@pytest.mark.slow  # ~40 kills, each a child that trains an epoch
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, data):
    """The commit: resume a run killed after epoch 1, train epoch 2, save the model folder."""
    from hvs.train import KILL_AFTER_EPOCH_ENV, TrainConfig, train

    def cfg(root: Path) -> TrainConfig:
        return TrainConfig(
            out=str(root / "run"),
            data=SPEC,
            model="cnn-nano",
            embed_dim=DIM,
            epochs=2,
            batch_size=32,
            lr=0.05,
            augment="none",
        )

    def quiet(_: str) -> None:
        pass

    def first_epoch(root: Path) -> None:
        code, msgs = fi.run_in_child(
            lambda report: train(cfg(root), progress=False, data=data, log=quiet), env={KILL_AFTER_EPOCH_ENV: "1"}
        )
        assert code == fi.KILLED, msgs

    def resume(root: Path) -> None:
        train(cfg(root), resume=True, progress=False, data=data, log=quiet)

    resumed_from = []

    def resume_again(root: Path, state, after) -> None:
        # --resume after the kill must finish the run with the model an uninterrupted one makes
        # (single-threaded child, like the recorded run: the same computation, the same bits).
        # Once per committed state: resume reads only what run_state() sees (state.pt, and the
        # train_config.json every crash point leaves identical), and each resume trains an epoch.
        if state in resumed_from:
            return
        resumed_from.append(state)
        code, msgs = fi.run_in_child(lambda report: resume(root))
        assert code == 0, msgs
        assert run_state(root / "run")["finished"] == after["finished"], "resumed run made another model"

    report = fi.crash_matrix(
        tmp_path,
        first_epoch,
        resume,
        lambda root: run_state(root / "run"),
        allowed=lambda before, after: [dict(after, finished=None)],
        recover=resume_again,
    )
    assert report.before["finished"] is None and report.after["finished"] is not None
    assert any(o.verdict == "committed" for o in report.outcomes)  # epoch 2 saved, model folder not yet
    check(report)
    assert len(resumed_from) == 3  # resumed from epoch 1, from epoch 2, and after the model folder


# ----------------------------------------------------------------------------------------------
# (b) Index versions: create, add, remove.
def unit(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_state(spec: str):
    """Everything a reader sees: count, sidecar basics, every item's id, record and score."""
    with open_index(spec) as index:
        scores, ids = index.search(PROBES, K)
        found = sorted(set(ids[ids >= 0].tolist()))
        meta = index.meta
        return {
            "count": len(index),
            "ids": found,
            "records": index.records(found) if found else [],
            "ranking": ids.tolist(),
            "scores": fi.fingerprint(scores),
            "meta": {k: meta[k] for k in ("dim", "count", "next_id", "factory")},
            "models": index.model_counts(),
        }


def _idx(root: Path) -> str:
    return f"faiss:{root / 'idx'}"


def _create(root: Path) -> None:
    open_index(_idx(root), create=True, dim=DIM, meta={"gallery_model": {"name": "test"}}).close()


def _add(seed: int, n: int, ids=None):
    def add(root: Path) -> None:
        with open_index(_idx(root)) as index:
            index.add(
                unit(seed, n),
                ids=ids,
                labels=[f"c{i % 3}" for i in range(n)],
                sources=[f"s{seed}-{i}.png" for i in range(n)],
            )

    return add


def _remove(ids):
    def remove(root: Path) -> None:
        with open_index(_idx(root)) as index:
            assert index.remove(ids) == len(ids)

    return remove


def _then(*steps):
    def run(root: Path) -> None:
        for step in steps:
            step(root)

    return run


def next_writer(root: Path, state, after) -> None:
    """The next writer takes the lock, starts from the committed state and commits on top of it."""
    if state is fi.NOTHING:
        _create(root)
        state = index_state(_idx(root))
    with open_index(_idx(root)) as index:
        index.add(unit(99, 1), ids=[10_000], labels=["x"], sources=["next.png"])
    now = index_state(_idx(root))
    assert now["ids"] == sorted(state["ids"] + [10_000]), "the next writer did not build on the committed state"


def _compact(root: Path) -> None:
    with open_index(_idx(root)) as index:
        assert index.compact()["compacted"]


def _replace(root: Path) -> None:
    with open_index(_idx(root)) as index:
        index.replace([2, 25], unit(5, 2), "sha256:new")


INDEX_COMMITS = {
    "create": (lambda root: None, _create),
    "add": (_then(_create, _add(1, 20)), _add(2, 12)),
    "remove": (_then(_create, _add(1, 20), _add(2, 12)), _remove([3, 4, 5, 21, 30])),
    "replace": (_then(_create, _add(1, 20), _add(2, 12)), _replace),
    # a compaction interrupted anywhere: the base and its log, or the new base, never a mix
    "compact": (_then(_create, _add(1, 20), _compact, _add(2, 12), _remove([3, 4, 21])), _compact),
}


@pytest.mark.parametrize("name", list(INDEX_COMMITS))
def test_index_commit_is_all_or_nothing(tmp_path, name):
    prepare, commit = INDEX_COMMITS[name]

    def observe(root: Path):
        state = index_state(_idx(root))
        if name == "compact":  # the same items either way: which base holds them is the difference
            with open_index(_idx(root)) as index:
                state["base"] = (index.info()["version"], index.info()["log"]["records"])
        return state

    report = fi.crash_matrix(tmp_path, prepare, commit, observe, nothing=nothing_index, recover=next_writer)
    assert (report.before is fi.NOTHING) == (name == "create")
    check(report)


# ----------------------------------------------------------------------------------------------
# (c) Index builds: resumable shards, then one index commit.
N_ITEMS, SHARD = 20, 8
IMAGES = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (N_ITEMS, 1, 4, 4), dtype=np.uint8))
PROJECTION = np.random.default_rng(4).standard_normal((16, DIM)).astype(np.float32)


def embed(batch) -> np.ndarray:
    return batch.reshape(len(batch), -1).float().numpy() @ PROJECTION + 0.01


def _build(root: Path):
    index = build_index(
        _idx(root),
        IMAGES,
        [f"c{i % 3}" for i in range(N_ITEMS)],
        [f"img{i}.png" for i in range(N_ITEMS)],
        embed,
        factory="Flat",
        batch_size=4,
        shard_size=SHARD,
        meta={"gallery_model": {"name": "test"}},
        progress=False,
    )
    return index


def rebuild(root: Path, state, after):
    """Run the build again, as a user whose build was killed would: it must finish with the same
    index, reusing the shards finished before the kill. Returns how many shards it reused."""
    if state is not fi.NOTHING:
        return None  # the index was committed: nothing to redo
    with _build(root) as index:
        reused = index.meta["build_report"]["n_reused_shards"]
    assert index_state(_idx(root)) == after, "the retried build made another index"
    return reused


@pytest.mark.slow  # ~80 kills: 3 shards, the index commit, the cleanup
def test_index_build_is_all_or_nothing_and_keeps_finished_shards(tmp_path):
    report = fi.crash_matrix(
        tmp_path,
        lambda root: None,
        lambda root: _build(root).close(),
        lambda root: index_state(_idx(root)),
        nothing=nothing_index,
        recover=rebuild,
    )
    check(report)
    reused = [o.recovered for o in report.outcomes if o.recovered is not None]
    # A later kill never costs more embedding than an earlier one, and some kill found every shard done.
    assert reused == sorted(reused), reused
    assert reused[0] == 0 and reused[-1] == -(-N_ITEMS // SHARD), reused


def test_overwrite_is_traced_through_its_staging_folder(overwrite_report):
    """The replacement writes in a sibling staging folder: the tracer must see (and kill at) those writes too."""
    assert any(".new" in o.where for o in overwrite_report.outcomes), [o.where for o in overwrite_report.outcomes]
