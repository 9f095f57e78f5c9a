"""faiss:DIR's write-ahead log: writes cost what they write, snapshots, torn tails, tombstones,
compaction, concurrency, kills at random instants, memory-mapped bases and the older format."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import hvs.index.faiss_backend as fb
from hvs.index import IndexStoreError, open_index

DIM = 8


@pytest.fixture(autouse=True)
def one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(seed: int, n: int, d: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tree(root: Path) -> dict[str, tuple]:
    """Every file under root with what a write would change (inode, size, mtime)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def wal(root: Path) -> Path:
    return root / (root / "CURRENT").read_text().strip() / fb.WAL_NAME


def all_ids(index) -> set[int]:
    _, ids = index.search(unit(0, 1), k=10**9)
    return set(ids[ids >= 0].tolist())


def test_a_write_touches_only_the_log_and_costs_the_same_at_any_size(tmp_path):
    grown = {}
    for n in (100, 5000):
        root = tmp_path / f"n{n}"
        with open_index(f"faiss:{root}", create=True, dim=DIM) as index:
            index.add(unit(n, n), labels=["x"] * n)
            index.compact()
            before = tree(root)
            index.add(unit(1, 1), labels=["new"], sources=["new.png"])
            after_add = tree(root)
            assert index.remove([3]) == 1
            after_remove = tree(root)
        changed = {k for k in after_add if after_add[k] != before.get(k)}
        assert changed == {str(wal(root).relative_to(root))}, changed  # the base files are untouched
        grown[n] = (
            after_add[str(wal(root).relative_to(root))][1] - before[str(wal(root).relative_to(root))][1],
            after_remove[str(wal(root).relative_to(root))][1] - after_add[str(wal(root).relative_to(root))][1],
        )
    # bytes appended per one-item add / remove: the same at 100 and 5000 items (ids differ by digits)
    (add_small, rm_small), (add_big, rm_big) = grown[100], grown[5000]
    assert abs(add_big - add_small) <= 8 and abs(rm_big - rm_small) <= 8, grown
    assert add_small < 400 and rm_small < 150, grown


def test_readers_see_a_snapshot_until_they_refresh(tmp_path):
    spec = f"faiss:{tmp_path / 's'}"
    x = unit(2, 30)
    with open_index(spec, create=True, dim=DIM) as w:
        w.add(x[:10])
    reader = open_index(spec)
    writer = open_index(spec)
    writer.add(x[10:20])
    writer.remove([0])
    assert all_ids(reader) == set(range(10)) and reader.stale()
    assert reader.refresh() and all_ids(reader) == set(range(1, 20)) and not reader.stale()
    writer.compact()
    writer.add(x[20:])
    assert all_ids(reader) == set(range(1, 20)) and reader.stale()
    assert reader.refresh() and all_ids(reader) == set(range(1, 30)) and len(reader) == 29
    writer.close()
    reader.close()


def test_a_torn_log_tail_is_dropped_with_a_warning_and_a_corrupt_middle_refuses_to_open(tmp_path):
    root = tmp_path / "t"
    spec = f"faiss:{root}"
    with open_index(spec, create=True, dim=DIM) as index:
        for i in range(3):
            index.add(unit(10 + i, 2), labels=[f"b{i}"] * 2)
    log = wal(root)
    pristine = log.read_bytes()
    sizes = []
    pos = fb.WAL_HEADER
    while pos < len(pristine):  # record boundaries
        _, length, _, _ = fb.REC.unpack_from(pristine, pos)
        pos += fb.REC.size + length
        sizes.append(pos)
    assert len(sizes) == 3

    for cut in (1, 17, sizes[2] - sizes[1] - 1):  # a last record torn anywhere
        log.write_bytes(pristine[: len(pristine) - cut])
        fb._WARNED.clear()
        with pytest.warns(UserWarning, match="not a complete record"), open_index(spec) as index:
            assert all_ids(index) == {0, 1, 2, 3} and len(index) == 4  # never served
    for junk in (b"\0" * 4096, pristine[sizes[0] : sizes[1]]):  # zero pages, a replayed record
        log.write_bytes(pristine + junk)
        fb._WARNED.clear()
        with pytest.warns(UserWarning, match="not a complete record"), open_index(spec) as index:
            assert len(index) == 6
    # The next writer cuts the tail off and appends after the last good record.
    log.write_bytes(pristine[:-5])
    fb._WARNED.clear()
    with pytest.warns(UserWarning), open_index(spec) as index:
        index.add(unit(20, 1), labels=["after"])
    with open_index(spec) as index:
        # ids 4, 5 of the torn write were never acknowledged, so never given to anyone: 4 is free
        assert all_ids(index) == {0, 1, 2, 3, 4} and index.records([4])[0]["label"] == "after"

    log.write_bytes(pristine)
    damaged = bytearray(pristine)
    damaged[sizes[0] + fb.REC.size + 3] ^= 0xFF  # inside record 2 of 3: acknowledged writes follow
    log.write_bytes(bytes(damaged))
    with pytest.raises(IndexStoreError, match=r"wal.log is corrupt at byte \d+ \(record 2\)") as info:
        open_index(spec)
    assert "\n" not in str(info.value)
    log.write_bytes(b"NOTALOG!" + pristine[8:])
    with pytest.raises(IndexStoreError, match="does not start with the header"):
        open_index(spec)


def test_removal_is_a_tombstone_until_compaction(tmp_path):
    root = tmp_path / "r"
    x = unit(3, 50)
    with open_index(f"faiss:{root}", create=True, dim=DIM, factory="HNSW16") as index:
        index.add(x, labels=[str(i) for i in range(50)])
        index.compact()
        version = index.info()["version"]
        assert index.remove([5, 7, 999]) == 2 and len(index) == 48
        assert index.info()["log"]["tombstones"] == 2 and index.info()["version"] == version
        _, ids = index.search(x[[5, 7]], k=3)
        assert not np.isin(ids, [5, 7]).any() and ids.min() >= 0
        with pytest.raises(IndexStoreError, match="not in index"):
            index.records([5])
        assert index.remove([5]) == 0  # already gone
        assert index.add(x[5:6], ids=[5], labels=["again"]).tolist() == [5]  # explicit re-add of a removed id
        with pytest.raises(IndexStoreError, match="id 5 is already in index"):
            index.add(x[5:6], ids=[5])
        assert index.search(x[5:6], k=1)[1][0, 0] == 5
        summary = index.compact()
        assert summary["compacted"] and summary["tombstones"] == 2 and len(index) == 49
    with open_index(f"faiss:{root}") as index:
        assert index.info()["log"]["tombstones"] == 0 and index.records([5])[0]["label"] == "again"
        assert 7 not in all_ids(index)


def _mixed_ops(index, x):
    index.add(x[:60], labels=[f"a{i}" for i in range(60)], sources=[f"s{i}" for i in range(60)])
    index.compact()
    index.add(x[60:90], labels=["b"] * 30)
    index.remove([1, 2, 3, 61, 62])
    index.replace([10, 70], x[90:92], "sha256:new")
    index.update_meta({"note": "n"})


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_compaction_gives_what_a_fresh_build_gives(tmp_path, factory):
    x = unit(4, 100)
    q = unit(5, 12)
    with open_index(f"faiss:{tmp_path / 'c'}", create=True, dim=DIM, factory=factory) as index:
        _mixed_ops(index, x)
        before = index.search(q, k=15)
        live = index.ids()
        recs = index.records(live)
        vecs = index.vectors(live)
        index.compact()
        after = index.search(q, k=15)
        assert index.records(live) == recs and index.meta["note"] == "n"
    fresh = open_index(f"faiss:{tmp_path / 'f'}", create=True, dim=DIM, factory=factory)
    fresh.close()
    from hvs.index.faiss_backend import FaissGalleryIndex

    labels, sources = [r["label"] for r in recs], [r["source"] for r in recs]
    fresh = FaissGalleryIndex.create(str(tmp_path / "g"), DIM, factory, None, initial=(vecs, live, labels, sources))
    want = fresh.search(q, k=15)
    np.testing.assert_array_equal(after[1], want[1])
    np.testing.assert_allclose(after[0], want[0], atol=1e-6)
    if factory == "Flat":  # exact: base + log searched together rank like the compacted base
        np.testing.assert_array_equal(before[1], after[1])
    fresh.close()


def test_ivf_compaction_keeps_its_training_and_rebuild_retrains_like_a_fresh_build(tmp_path):
    x = unit(6, 400)
    q = unit(7, 10)
    with open_index(f"faiss:{tmp_path / 'i'}", create=True, dim=DIM, factory="IVF4,Flat") as index:
        with pytest.raises(IndexStoreError, match="needs at least 4 vectors to train, got 2"):
            index.add(x[:2])
        index.add(x[:300])  # enough to train: trained by the automatic compaction
        assert index.info()["version"] == "v000002" and (tmp_path / "i" / "v000002" / fb.TRAINED).is_file()
        assert index.meta["search_params"]["nprobe"] == 4  # every list: exact, so comparable to numpy

        def exact_ok():
            live = index.ids()
            vecs = index.vectors(live)
            np.testing.assert_array_equal(index.search(q, k=10)[1], live[np.argsort(-(q @ vecs.T), axis=1)[:, :10]])

        index.add(x[300:350])
        index.compact()  # in place: the base's lists keep their codes, only the log's vectors are added
        exact_ok()
        index.add(x[350:])
        index.remove([0, 350])
        index.replace([5], x[:1], "sha256:m")
        index.compact()  # removals: every vector re-added to the trained lists
        exact_ok()
        assert len(index) == 398 and index.records([5])[0]["model"] == "sha256:m"
        index.rebuild()
        got = index.search(q, k=10)
        live = index.ids()
        vecs = index.vectors(live)
    fresh = fb.FaissGalleryIndex.create(str(tmp_path / "g"), DIM, "IVF4,Flat", None, initial=(vecs, live, None, None))
    want = fresh.search(q, k=10)
    np.testing.assert_array_equal(got[1], want[1])
    fresh.close()


def test_automatic_compaction_past_the_ratio(tmp_path):
    with open_index(f"faiss:{tmp_path / 'a'}", create=True, dim=DIM) as index:
        index.compact_min, index.compact_ratio = 10, 0.5
        index.add(unit(8, 40))
        v = index.info()["version"]
        for i in range(25):
            index.add(unit(100 + i, 1))
        assert index.info()["version"] > v and index.info()["log"]["records"] < 25
        assert len(index) == 65 and all_ids(index) == set(range(65))


def test_searches_see_whole_snapshots_while_another_thread_writes_and_compacts(tmp_path):
    index = open_index(f"faiss:{tmp_path / 'c'}", create=True, dim=DIM)
    index.compact_min, index.compact_ratio = 20, 0.2
    index.add(unit(9, 30))
    states = [frozenset(range(30))]
    seen: list[frozenset] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    q = unit(11, 2)

    def writer():
        try:
            live = set(range(30))
            for step in range(60):
                if step % 3 == 2:
                    gone = sorted(live)[:2]
                    index.remove(gone)
                    live -= set(gone)
                else:
                    new = index.add(unit(200 + step, 3))
                    live |= set(new.tolist())
                if step % 20 == 19:
                    index.compact()
                states.append(frozenset(live))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    def searcher():
        try:
            while not stop.is_set():
                with index.snapshot():
                    n = len(index)
                    _, ids = index.search(q, k=10**6)
                    found = ids[0][ids[0] >= 0]
                    recs = index.records(found)
                assert len(found) == n == len(set(found.tolist())) == len(recs)
                np.testing.assert_array_equal(np.sort(found), np.sort(ids[1][ids[1] >= 0]))
                seen.append(frozenset(found.tolist()))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    index.close()
    assert not errors, errors
    assert seen and set(seen) <= set(states)  # every search saw one state the writer committed
    assert len(set(seen)) > 1  # ... and the writes did land while they ran


WRITER_IDS = 1000


def _killable_writer(spec: str, ack_fd: int, seed: int) -> None:
    """Child: random adds, removes and compactions; writes "+id"/"-id" to ack_fd after each returns."""
    rng = random.Random(seed)
    index = open_index(spec)
    index.compact_min, index.compact_ratio = 8, 0.3
    while True:
        live = sorted(int(i) for i in index.ids())
        r = rng.random()
        if r < 0.6 or not live:
            i = int(index.meta["next_id"])
            index.add(unit(i, 1), ids=[i], labels=[f"l{i}"])
            os.write(ack_fd, f"+{i}\n".encode())
        elif r < 0.95:
            i = rng.choice(live)
            index.remove([i])
            os.write(ack_fd, f"-{i}\n".encode())
        else:
            index.compact()


@pytest.mark.slow  # 60 forked writers killed at random instants, ~10 s
def test_a_writer_killed_at_random_instants_loses_no_acknowledged_write(tmp_path):
    spec = f"faiss:{tmp_path / 'k'}"
    open_index(spec, create=True, dim=DIM).close()
    acked: set[int] = set()
    rng = random.Random(1234)
    deadline = time.monotonic() + 60
    kills = writes = 0
    while kills < 60 and time.monotonic() < deadline:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read_fd)
            try:
                _killable_writer(spec, write_fd, kills)
            finally:
                os._exit(3)
        os.close(write_fd)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        with os.fdopen(read_fd) as f:
            lines = f.read().splitlines()
        for line in lines:  # acknowledgements: one short write each, atomic on a pipe
            writes += 1
            (acked.add if line[0] == "+" else acked.discard)(int(line[1:]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn tail is expected here, and said
            with open_index(spec) as index:
                have = set(index.ids().tolist())
                assert all_ids(index) == have and len(index) == len(have)
        # Exactly the acknowledged writes, give or take the one in flight at the kill (durable
        # but not yet acknowledged: an add that is there, or a remove that took effect).
        extra, lost = have - acked, acked - have
        assert len(extra) + len(lost) <= 1, (kills, sorted(extra), sorted(lost))
        acked = have
    assert kills >= 50, f"only {kills} kills in the time limit"
    assert writes >= kills, f"{writes} acknowledged writes in {kills} runs: the writers hardly ran"


def test_a_memory_mapped_base_opens_with_raw_vectors_on_disk(tmp_path):
    x = unit(12, 600)
    q = unit(13, 5)
    for factory in ("Flat", "IVF8,PQ4"):
        spec = f"faiss:{tmp_path / factory.replace(',', '_')}"
        with open_index(spec, create=True, dim=DIM, factory=factory, mmap=True) as index:
            index.add(x, labels=["a"] * 600)
            index.compact()
            want = index.search(q, k=5)
        with open_index(spec) as index:
            assert index.meta["mmap"] is True and isinstance(index._base.vectors, np.memmap)
            got = index.search(q, k=5)
            np.testing.assert_array_equal(got[1], want[1])
            index.add(unit(14, 1))  # writes still go to the log
            index.remove([3])
            index.compact()
            assert len(index) == 600
    plain = f"faiss:{tmp_path / 'plain'}"
    with open_index(plain, create=True, dim=DIM) as index:
        index.add(x)
        index.compact()
    with open_index(plain, mmap=True) as index:  # a flag at open maps any base
        assert index.meta["mmap"] is True and len(index) == 600
        np.testing.assert_array_equal(index.search(q, k=3)[1][:, 0], np.argmax(q @ x.T, axis=1))


def _write_format_1(root: Path, x: np.ndarray) -> None:
    """A base as hvs wrote it before the log existed (hvs-faiss-index/1)."""
    import faiss

    vdir = root / "v000003"
    vdir.mkdir(parents=True)
    ids = np.arange(len(x), dtype=np.int64)[::-1].copy()  # insertion order, not sorted
    index = faiss.IndexIDMap2(faiss.index_factory(DIM, "Flat", faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(vdir / "index.faiss"))
    np.save(vdir / "vectors.npy", x)
    np.save(vdir / "vector_ids.npy", ids)
    with open(vdir / "ids.jsonl", "w") as f:
        for i in ids.tolist():
            f.write(json.dumps({"id": i, "label": f"L{i}", "source": None}) + "\n")
    meta = {
        "format": "hvs-faiss-index/1",
        "backend": "faiss",
        "dim": DIM,
        "metric": "ip",
        "normalised": True,
        "factory": "Flat",
        "count": len(x),
        "next_id": len(x),
        "gallery_model": {"fingerprint": "sha256:g"},
    }
    (vdir / "meta.json").write_text(json.dumps(meta))
    files = {n: {"sha256": fb.sha256_file(vdir / n), "bytes": (vdir / n).stat().st_size} for n in fb.FILES_V1}
    (vdir / "checksums.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    (root / "CURRENT").write_text("v000003\n")


def test_an_index_of_the_previous_format_opens_and_takes_writes(tmp_path):
    root = tmp_path / "old"
    x = unit(15, 20)
    _write_format_1(root, x)
    spec = f"faiss:{root}"
    with open_index(spec) as index:
        assert len(index) == 20 and index.records([4]) == [{"id": 4, "label": "L4", "source": None, "model": None}]
        assert index.model_counts() == {None: 20}
        np.testing.assert_array_equal(index.search(x[:3], k=1)[1][:, 0], [19, 18, 17])  # row j has id 19 - j
        index.add(unit(16, 1), labels=["new"])  # default model: the sidecar's gallery model
        index.remove([0])
        assert index.model_counts() == {None: 19, "sha256:g": 1}
        index.compact()
    with open_index(spec) as index:
        assert json.loads((root / "v000004" / "meta.json").read_text())["format"] == fb.FORMAT
        assert len(index) == 20 and index.records([20])[0]["model"] == "sha256:g"
        assert index.records([19])[0]["label"] == "L19"


def test_rerank_rescores_compressed_candidates_with_the_raw_vectors(tmp_path):
    x = unit(17, 2000, 16)
    q = x[:50] + 0.05 * unit(18, 50, 16)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = {}
    for rerank in (1, 8):
        spec = f"faiss:{tmp_path / f'r{rerank}'}"
        params = {"nprobe": 8, "rerank": rerank}
        with open_index(spec, create=True, dim=16, factory="IVF8,PQ4", meta={"search_params": params}) as index:
            index.add(x)
            index.remove([int(exact[0, 1])])  # a tombstone among the candidates
            scores, ids = index.search(q, k=10)
            assert int(exact[0, 1]) not in ids[0].tolist()
        want = [set(row) - {int(exact[0, 1])} for row in exact.tolist()]
        recall[rerank] = np.mean([len(set(g) & w) / len(w) for g, w in zip(ids.tolist(), want)])
        if rerank > 1:  # exact inner products of the stored vectors, best first
            np.testing.assert_allclose(
                scores[:, 0],
                np.sum(q[:, None] / np.linalg.norm(q, axis=1)[:, None, None] * x[ids[:, :1]], -1)[:, 0],
                atol=1e-5,
            )
            assert (np.diff(scores, axis=1) <= 1e-7).all()
    assert recall[8] > recall[1] + 0.2 and recall[8] > 0.9, recall
    with pytest.raises(IndexStoreError, match="rerank must be an integer"):
        open_index(f"faiss:{tmp_path / 'bad'}", create=True, dim=16, meta={"search_params": {"rerank": 0}})


def test_a_write_whose_fsync_failed_is_not_applied_later(tmp_path, monkeypatch):
    """An add that raised (its fsync failed: not acknowledged) must not land at the next write or
    open: the log is cut back to where it was before the error is raised."""
    spec = f"faiss:{tmp_path / 'f'}"
    index = open_index(spec, create=True, dim=DIM)
    index.add(unit(0, 5))
    real = os.fsync
    calls = {"n": 0}

    def failing_once(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(fb.os, "fsync", failing_once)
    with pytest.raises(OSError, match="Input/output error"):
        index.add(unit(1, 1))
    monkeypatch.setattr(fb.os, "fsync", real)
    assert len(index) == 5
    index.add(unit(2, 1))
    assert len(index) == 6 and sorted(index.ids().tolist()) == [0, 1, 2, 3, 4, 5]
    index.close()
    again = open_index(spec)
    assert len(again) == 6 and np.allclose(again.vectors([5]), unit(2, 1), atol=1e-6)
