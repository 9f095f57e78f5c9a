"""Gallery index: one behavioural suite run on every backend, plus FAISS file-format guarantees.

The shared tests take the ``spec`` fixture, parametrized over ``faiss:DIR`` and ``milvus:FILE.db``
(Milvus Lite); milvus cases are skipped, with the install hint, when pymilvus is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import hvs.index.build as build_mod
import hvs.index.faiss_backend as faiss_backend
from hvs.index import IndexStoreError, build_index, list_backends, open_index

REPO = Path(__file__).resolve().parents[1]

try:
    import pymilvus  # noqa: F401

    HAVE_MILVUS = True
except ImportError:
    HAVE_MILVUS = False

BACKENDS = [
    "faiss",
    pytest.param(
        "milvus",
        marks=pytest.mark.skipif(not HAVE_MILVUS, reason="pymilvus not installed: pip install pymilvus milvus-lite"),
    ),
]


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS' OpenMP threads spin-wait: on a shared 2-core CI machine two of them run several
    times slower than one, and these indexes are small."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def spec(request, tmp_path) -> str:
    return f"faiss:{tmp_path / 'idx'}" if request.param == "faiss" else f"milvus:{tmp_path / 'g.db'}"


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def without_model(record: dict) -> dict:
    """A record less its per-item gallery model (which the milvus backend does not keep)."""
    assert "model" in record
    return {k: v for k, v in record.items() if k != "model"}


def brute_force(gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    sims = queries @ gallery.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def clustered(rng: np.random.Generator, n: int, d: int, centers: int = 32, noise: float = 1.0):
    c = unit(rng, centers, d)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# The shared behavioural suite.
def test_specs_need_a_known_prefix(tmp_path):
    assert list_backends() == ["faiss", "milvus"]
    with pytest.raises(IndexStoreError, match="no known backend prefix; use one of: faiss:DIR, milvus:URI"):
        open_index(f"annoy:{tmp_path}")


def test_a_bare_folder_is_a_faiss_index(tmp_path):
    with open_index(f"faiss:{tmp_path / 'idx'}", create=True, dim=4) as index:
        index.add(np.eye(4, dtype=np.float32))
    for bare in (str(tmp_path / "idx"), tmp_path / "idx"):
        with open_index(bare) as index:
            assert len(index) == 4 and index.spec == f"faiss:{tmp_path / 'idx'}"
    with pytest.raises(IndexStoreError, match="is not an hvs index"):
        open_index(str(tmp_path))  # a folder that holds no index is refused as one


def test_flat_search_equals_brute_force(spec):
    rng = np.random.default_rng(0)
    gallery, queries = unit(rng, 300, 32), unit(rng, 20, 32)
    with open_index(spec, create=True, dim=32) as index:
        ids = index.add(gallery * 3.0)  # scale must not matter: vectors are normalised on add
        np.testing.assert_array_equal(ids, np.arange(300))
        scores, got = index.search(queries * 0.5, k=10)
    want_scores, want_ids = brute_force(gallery, ids, queries, 10)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (20, 10)
    np.testing.assert_array_equal(got, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_ids_labels_stable_across_reopen(spec):
    rng = np.random.default_rng(1)
    x, y = unit(rng, 40, 16), unit(rng, 5, 16)
    with open_index(spec, create=True, dim=16, meta={"gallery_model": {"name": "g", "fingerprint": "abc"}}) as index:
        auto = index.add(x, labels=[f"c{i % 4}" for i in range(40)], sources=[f"img{i}.jpg" for i in range(40)])
        index.add(y, ids=np.array([100, 101, 102, 103, 104]), labels=list("abcde"))
        assert index.remove([3, 101]) == 2
    with open_index(spec) as index:
        assert len(index) == 43
        assert [without_model(r) for r in index.records([5, 100, 102])] == [
            {"id": 5, "label": "c1", "source": "img5.jpg"},
            {"id": 100, "label": "a", "source": None},
            {"id": 102, "label": "c", "source": None},
        ]
        _, ids = index.search(x[10:12], k=1)
        np.testing.assert_array_equal(ids[:, 0], auto[10:12])
        # next auto id is one past the largest id ever added, so removed ids are never reused
        np.testing.assert_array_equal(index.add(unit(rng, 2, 16)), [105, 106])
        meta = index.meta
        assert meta["gallery_model"] == {"name": "g", "fingerprint": "abc"}
        for key, value in {"dim": 16, "metric": "ip", "normalised": True, "factory": "Flat", "count": 45}.items():
            assert meta[key] == value, key
        assert {"created", "updated", "hvs_version"} <= set(meta)
        assert index.info()["count"] == 45


def test_remove_is_real(spec):
    rng = np.random.default_rng(2)
    x = unit(rng, 30, 8)
    with open_index(spec, create=True, dim=8) as index:
        index.add(x)
        assert index.remove(np.arange(0, 30, 2)) == 15
        assert index.remove([0, 2, 999]) == 0  # already gone / never there
        assert len(index) == 15
        scores, ids = index.search(x, k=20)  # every vector, including the removed ones, as a query
        assert not np.isin(ids, np.arange(0, 30, 2)).any()
        assert (ids == -1).sum(axis=1).tolist() == [5] * 30
        with pytest.raises(IndexStoreError, match="not in index"):
            index.records([4])
    with open_index(spec) as index:
        assert len(index) == 15 and index.meta["count"] == 15


def test_padding_when_k_exceeds_count(spec):
    rng = np.random.default_rng(3)
    with open_index(spec, create=True, dim=8) as index:
        scores, ids = index.search(unit(rng, 2, 8), k=4)  # empty index
        assert (ids == -1).all() and np.isneginf(scores).all()
        index.add(unit(rng, 3, 8))
        scores, ids = index.search(unit(rng, 2, 8), k=5)
    assert ids.shape == scores.shape == (2, 5)
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
    assert np.isfinite(scores[:, :3]).all() and np.isneginf(scores[:, 3:]).all()
    assert (np.diff(scores[:, :3], axis=1) <= 1e-6).all()  # best first


def test_bad_inputs_are_one_line_errors(spec):
    rng = np.random.default_rng(4)
    with open_index(spec, create=True, dim=8) as index:
        index.add(unit(rng, 4, 8))
        with pytest.raises(IndexStoreError, match="index has dim 8, embeddings have dim 6"):
            index.add(unit(rng, 2, 6))
        with pytest.raises(IndexStoreError, match="index has dim 8, queries have dim 9"):
            index.search(unit(rng, 2, 9), k=1)
        bad = unit(rng, 3, 8)
        bad[1, 2] = np.nan
        with pytest.raises(IndexStoreError, match="NaN or inf in 1 row"):
            index.add(bad)
        bad[1, 2] = np.inf
        with pytest.raises(IndexStoreError, match="NaN or inf"):
            index.search(bad, k=1)
        with pytest.raises(IndexStoreError, match="all-zero row"):
            index.add(np.zeros((1, 8), np.float32))
        with pytest.raises(IndexStoreError, match="id 2 is already in index"):
            index.add(unit(rng, 2, 8), ids=[10, 2])
        with pytest.raises(IndexStoreError, match="duplicate id 7"):
            index.add(unit(rng, 2, 8), ids=[7, 7])
        with pytest.raises(IndexStoreError, match="non-negative"):
            index.add(unit(rng, 1, 8), ids=[-1])
        with pytest.raises(IndexStoreError, match="2 embeddings but 1 labels"):
            index.add(unit(rng, 2, 8), labels=["a"])
        with pytest.raises(IndexStoreError, match="k must be a positive integer"):
            index.search(unit(rng, 1, 8), k=0)
        assert len(index) == 4  # nothing above changed the index
    with pytest.raises(IndexStoreError, match="already exists"):
        open_index(spec, create=True, dim=8)


def test_missing_index_and_unknown_factory(spec, tmp_path):
    with pytest.raises(IndexStoreError, match="no index at"):
        open_index(spec)
    with pytest.raises(IndexStoreError, match="factory"):
        open_index(spec, create=True, dim=8, factory="Bogus42")
    with pytest.raises(IndexStoreError, match="needs dim"):
        open_index(spec, create=True)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8))


class CountingEmbed:
    """A deterministic 'gallery model' that counts what it embeds and can be told to crash."""

    def __init__(self, fail_on_call: int | None = None):
        self.proj = np.random.default_rng(42).standard_normal((16, 8)).astype(np.float32)
        self.calls = self.items = 0
        self.fail_on_call = fail_on_call

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed mid-build (simulated)")
        self.items += len(batch)
        return batch.reshape(len(batch), -1).float().numpy() @ self.proj + 0.01


def test_resumable_build_reuses_finished_shards(spec, tmp_path):
    n, images = 50, _images(50)
    labels, sources = [f"c{i % 3}" for i in range(n)], [f"img{i}.png" for i in range(n)]
    kwargs = dict(
        meta={"gallery_model": {"name": "m"}}, batch_size=8, shard_size=16, work_dir=tmp_path / "work", progress=False
    )
    crashing = CountingEmbed(fail_on_call=6)  # shards 0-1 take calls 1-4; dies inside shard 2
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(spec, images, labels, sources, crashing, **kwargs)
    assert crashing.items == 40
    assert sorted(p.name for p in (tmp_path / "work" / "shards").iterdir()) == [
        "shard_00000.ids.npy",
        "shard_00000.npy",
        "shard_00001.ids.npy",
        "shard_00001.npy",
    ]
    with pytest.raises(IndexStoreError, match="no index at"):
        open_index(spec)  # nothing half-built is visible
    with pytest.raises(IndexStoreError, match="different build"):
        build_index(spec, images, labels, sources, CountingEmbed(), **dict(kwargs, shard_size=8))

    resumed = CountingEmbed()
    index = build_index(spec, images, labels, sources, resumed, **kwargs)
    assert resumed.items == n - 32 and resumed.calls == 3  # shard 2 (2 batches) + shard 3 (1)
    report = index.meta["build_report"]
    assert (report["n_embedded"], report["n_reused_shards"], report["n_reused_items"], report["n_skipped"]) == (
        18,
        2,
        32,
        0,
    )
    assert not (tmp_path / "work").exists()
    full = CountingEmbed()(images)
    want_scores, want_ids = brute_force(
        full / np.linalg.norm(full, axis=1, keepdims=True),
        np.arange(n),
        full[:5] / np.linalg.norm(full[:5], axis=1, keepdims=True),
        5,
    )
    scores, ids = index.search(full[:5], k=5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert [without_model(r) for r in index.records([7])] == [{"id": 7, "label": "c1", "source": "img7.png"}]
    index.close()


# ------------------------------------------------------------------------------------------------
# FAISS: approximate indexes, training, file format, atomicity, locking.
@pytest.mark.parametrize("factory,min_recall", [("HNSW32", 0.9), ("IVF64,Flat", 0.75), ("IVF16,PQ8", 0.4)])
def test_faiss_ann_recall(tmp_path, factory, min_recall):
    rng = np.random.default_rng(5)
    gallery, queries = clustered(rng, 4000, 32), clustered(rng, 200, 32)
    with open_index(f"faiss:{tmp_path / 'ann'}", create=True, dim=32, factory=factory) as index:
        ids = index.add(gallery)
        _, got = index.search(queries, k=10)
        _, want = brute_force(gallery, ids, queries, 10)
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.tolist(), want.tolist())])
        assert recall >= min_recall, f"{factory} recall@10 {recall:.3f}"
        assert index.remove(ids[:100]) == 100  # HNSW: rebuilt from the kept vectors
        _, after = index.search(gallery[:100], k=10)
        assert not np.isin(after, ids[:100]).any() and len(index) == 3900
    with open_index(f"faiss:{tmp_path / 'ann'}") as index:
        assert len(index) == 3900 and index.meta["factory"] == factory


def test_faiss_training_needs_enough_vectors(tmp_path):
    rng = np.random.default_rng(6)
    with open_index(f"faiss:{tmp_path / 'pq'}", create=True, dim=16, factory="IVF16,PQ8") as index:
        with pytest.raises(IndexStoreError, match="needs at least 256 vectors to train, got 100"):
            index.add(unit(rng, 100, 16))
        assert len(index) == 0
    with pytest.raises(IndexStoreError, match="IDMap"):
        open_index(f"faiss:{tmp_path / 'x'}", create=True, dim=16, factory="IDMap2,Flat")
    with pytest.raises(IndexStoreError, match="invalid FAISS factory 'PQ5'"):
        open_index(f"faiss:{tmp_path / 'y'}", create=True, dim=16, factory="PQ5")  # 5 does not divide 16


def test_faiss_rebuild_with_new_factory(tmp_path):
    rng = np.random.default_rng(7)
    x = clustered(rng, 1000, 16)
    with open_index(f"faiss:{tmp_path / 'r'}", create=True, dim=16) as index:
        index.add(x, labels=[str(i) for i in range(1000)])
        index.rebuild("IVF8,Flat")
        assert index.meta["factory"] == "IVF8,Flat" and index.meta["search_params"] == {"nprobe": 8}
        _, ids = index.search(x[:5], k=1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(5))
    with open_index(f"faiss:{tmp_path / 'r'}") as index:
        assert index.records([999])[0]["label"] == "999"


def _open_fails(spec: str, match: str) -> None:
    with pytest.raises(IndexStoreError, match=match) as info:
        open_index(spec)
    assert "\n" not in str(info.value)


def _version_dir(root: Path) -> Path:
    return root / (root / "CURRENT").read_text().strip()


def test_faiss_open_validates_files(tmp_path):
    root = tmp_path / "v"
    with open_index(f"faiss:{root}", create=True, dim=8) as index:
        index.add(unit(np.random.default_rng(8), 10, 8))
        index.compact()  # into the base version's files
    meta_path = _version_dir(root) / "meta.json"
    good = meta_path.read_text()

    meta_path.write_text(good[:40])
    _open_fails(f"faiss:{root}", "meta.json is not valid JSON")
    meta_path.write_text(json.dumps(dict(json.loads(good), count=11)))
    _open_fails(f"faiss:{root}", "meta.json says count 11 but index.faiss holds 10 vectors")
    meta_path.write_text(json.dumps(dict(json.loads(good), dim=9)))
    _open_fails(f"faiss:{root}", "meta.json says dim 9 but index.faiss has dim 8")
    meta_path.write_text(good)
    (_version_dir(root) / "index.faiss").write_bytes(b"garbage")
    _open_fails(f"faiss:{root}", "index.faiss is unreadable")
    (_version_dir(root) / "ids.jsonl").unlink()
    _open_fails(f"faiss:{root}", "incomplete: v000002/ids.jsonl is missing")
    (root / "CURRENT").unlink()
    _open_fails(f"faiss:{root}", "not an hvs index")


def test_faiss_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    root = tmp_path / "a"
    rng = np.random.default_rng(9)
    x = unit(rng, 20, 8)
    index = open_index(f"faiss:{root}", create=True, dim=8)
    index.add(x, labels=[f"old{i}" for i in range(20)])
    real_append = faiss_backend._append_wal

    def torn_append(path, data):  # half-writes the log record, then the "machine dies"
        real_append(path, data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(faiss_backend, "_append_wal", torn_append)
    with pytest.raises(OSError, match="simulated"):
        index.add(unit(rng, 5, 8), labels=["new"] * 5)
    assert len(index) == 20  # memory changes only once the record is durable
    faiss_backend._WARNED.clear()
    with pytest.warns(UserWarning, match="not a complete record"), open_index(f"faiss:{root}") as reader:
        assert len(reader) == 20 and reader.records([19])[0]["label"] == "old19"
        np.testing.assert_array_equal(reader.search(x[:3], k=1)[1][:, 0], [0, 1, 2])
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="cut .* byte"):
        assert index.add(x[:1] + 0.5, labels=["after"]).tolist() == [20]  # the next write cuts the torn tail

    def crash(path, *args):  # half-writes ids.jsonl of the new base, then the "machine dies"
        Path(path).write_text('{"id": 0, "lab')
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(faiss_backend, "_write_records", crash)
    with pytest.raises(OSError, match="simulated"):
        index.compact()
    monkeypatch.undo()

    def crash_before_switch(root_, version):  # new base folder complete, CURRENT not yet moved
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(faiss_backend, "_write_current", crash_before_switch)
    with pytest.raises(OSError, match="simulated"):
        index.compact()
    assert index.remove([0, 1]) == 2  # the log still takes writes
    with open_index(f"faiss:{root}") as reader:
        assert len(reader) == 19 and reader.records([20])[0]["label"] == "after"
    monkeypatch.undo()

    assert index.compact()["compacted"]  # the next compaction succeeds and clears the debris
    index.close()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["CURRENT", "v000001", "v000002", "writer.lock"], names
    with open_index(f"faiss:{root}") as reader:
        assert len(reader) == 19 and reader.info()["log"]["records"] == 0


LOCK_HOLDER = textwrap.dedent("""
    import sys, numpy as np
    from hvs.index import open_index
    index = open_index(sys.argv[1])
    index.add(np.ones((1, 8), np.float32))  # the first write takes the writer lock
    print("locked", flush=True)
    sys.stdin.readline()
    index.close()
""")


def test_faiss_single_writer_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("HVS_INDEX_LOCK_WAIT", "0.2")  # a held lock is waited for this long, then refused
    root = tmp_path / "l"
    spec = f"faiss:{root}"
    open_index(spec, create=True, dim=8).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, spec], cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        index = open_index(spec)  # readers need no lock ...
        with pytest.raises(IndexStoreError, match=rf"index {root} is locked by another writer \(pid {holder.pid}\)"):
            index.add(np.ones((1, 8), np.float32))  # ... writers do
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert len(index) == 1  # a reader keeps the snapshot it opened ...
    other = open_index(spec)
    other.add(np.full((1, 8), 3.0, np.float32))  # ... while the lock is free again and someone commits
    other.close()
    assert len(index) == 1
    index.add(np.full((1, 8), 2.0, np.float32))  # writing reloads the newer commit first: nothing is lost
    assert len(index) == 3
    np.testing.assert_array_equal(np.sort(index.search(np.ones((1, 8)), k=3)[1][0]), [0, 1, 2])
    index.close()


def test_build_crash_between_shard_files_redoes_only_that_shard(tmp_path, monkeypatch):
    images, labels = _images(40), [str(i) for i in range(40)]
    real_save = build_mod._save_atomic

    def save_then_die(path, array):  # shard 1's vectors reach disk, its ids (the marker) never do
        if path.name == "shard_00001.ids.npy":
            raise OSError("killed (simulated)")
        real_save(path, array)

    monkeypatch.setattr(build_mod, "_save_atomic", save_then_die)
    kwargs = dict(meta={}, batch_size=10, shard_size=20, progress=False)
    with pytest.raises(OSError, match="simulated"):
        build_index(f"faiss:{tmp_path / 'c'}", images, labels, None, CountingEmbed(), **kwargs)
    monkeypatch.undo()
    resumed = CountingEmbed()
    index = build_index(f"faiss:{tmp_path / 'c'}", images, labels, None, resumed, **kwargs)
    assert resumed.items == 20 and index.meta["build_report"]["n_reused_shards"] == 1
    assert len(index) == 40 and not (tmp_path / "c.build").exists()
    index.close()


def test_build_from_a_loader_matches_tensor(tmp_path):
    n, images = 37, _images(37, seed=3)
    labels = [str(i) for i in range(n)]
    loader = [(images[i : i + 5], None) for i in range(0, n, 5)]  # (batch, labels) straddling shards
    embed = CountingEmbed()
    a = build_index(
        f"faiss:{tmp_path / 'a'}", images, labels, None, embed, meta={}, shard_size=10, batch_size=4, progress=False
    )
    b = build_index(
        f"faiss:{tmp_path / 'b'}", loader, labels, None, embed, meta={}, shard_size=10, batch_size=4, progress=False
    )
    q = np.random.default_rng(0).standard_normal((4, 8))
    for x, y in zip(a.search(q, 6), b.search(q, 6)):
        np.testing.assert_array_equal(x, y)
    assert not (tmp_path / "a.build").exists()
    a.close(), b.close()


def test_build_rejects_nan_embeddings_unless_skipped(tmp_path):
    images = _images(12)
    embed = CountingEmbed()

    def bad(batch):
        out = embed(batch)
        out[0, 0] = np.nan  # the first item of every batch
        return out

    with pytest.raises(IndexStoreError, match=r"embedding of item 0 \(img0\) is NaN"):
        build_index(
            f"faiss:{tmp_path / 'n'}",
            images,
            list("abcdefghijkl"),
            [f"img{i}" for i in range(12)],
            bad,
            meta={},
            batch_size=4,
            shard_size=8,
            progress=False,
        )
    index = build_index(
        f"faiss:{tmp_path / 'n'}",
        images,
        list("abcdefghijkl"),
        [f"img{i}" for i in range(12)],
        bad,
        meta={},
        batch_size=4,
        shard_size=8,
        progress=False,
        skip_bad=True,
    )
    report = index.meta["build_report"]
    assert report["n_skipped"] == 3 and report["skipped"] == ["0: img0", "4: img4", "8: img8"]
    assert len(index) == 9 and index.meta["count"] == 9
    index.close()


# ------------------------------------------------------------------------------------------------
# Milvus: the sidecar lives in a second collection.
@pytest.mark.skipif(not HAVE_MILVUS, reason="pymilvus not installed: pip install pymilvus milvus-lite")
def test_milvus_sidecar_disagreement_and_recount(tmp_path):
    from hvs.index import milvus_backend

    spec = f"milvus:{tmp_path / 'm.db'}#shoes"
    with open_index(spec, create=True, dim=8) as index:
        index.add(unit(np.random.default_rng(10), 6, 8))
        client, meta = index._client, index.meta
        milvus_backend._write_meta(client, "shoes", dict(meta, count=4))
    with pytest.raises(IndexStoreError, match="sidecar says count 4 but the collection holds 6"):
        open_index(spec)
    assert milvus_backend.recount(spec)["count"] == 6
    with open_index(spec) as index:
        assert len(index) == 6
        index._client.upsert("shoes_hvs_meta", [{"id": 0, "vector": [0.0, 0.0], "json": "{oops"}])
    with pytest.raises(IndexStoreError, match="sidecar is not valid JSON"):
        open_index(spec)
    with pytest.raises(IndexStoreError, match="must be a local file ending in .db"):
        open_index(f"milvus:{tmp_path / 'x.sqlite'}")


def test_missing_pymilvus_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # makes `import pymilvus` raise ImportError
    with pytest.raises(IndexStoreError, match="pip install pymilvus milvus-lite"):
        open_index(f"milvus:{tmp_path / 'g.db'}", create=True, dim=8)


# ------------------------------------------------------------------------------------------------
# Hardening: k, ids, checksums, snapshots, uploads, retryable builds.
def test_huge_k_is_capped_at_the_index_size(spec):
    """k = 5e6 on a 3-item index must cost what 3 items cost (k = 1e9 used to allocate until OOM)."""
    import tracemalloc

    from hvs.index.base import MAX_PADDED_K

    rng = np.random.default_rng(11)
    with open_index(spec, create=True, dim=8) as index:
        index.add(unit(rng, 3, 8))
        tracemalloc.start()
        try:
            scores, ids = index.search(unit(rng, 2, 8), k=5_000_000)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2_000_000, f"searching 3 items with a huge k allocated {peak} bytes"
        assert ids.shape == scores.shape == (2, MAX_PADDED_K)
        assert sorted(ids[0, :3].tolist()) == [0, 1, 2] and (ids[:, 3:] == -1).all()
        assert index.search(unit(rng, 1, 8), k=2)[1].shape == (1, 2)  # small k: exactly k columns
        for bad in (0, -3, 2.5, True):
            with pytest.raises(IndexStoreError, match="k must be a positive integer"):
                index.search(unit(rng, 1, 8), k=bad)


def test_ids_beyond_int64_are_one_line_errors(spec):
    with open_index(spec, create=True, dim=8) as index:
        index.add(unit(np.random.default_rng(12), 2, 8))
        for bad in ([99999999999999999999999], 2**63, np.array([2**63], dtype=np.uint64)):
            with pytest.raises(IndexStoreError, match="out of range: ids are integers from 0 to 9223372036854775807"):
                index.remove(bad)
            with pytest.raises(IndexStoreError, match="out of range"):
                index.records(bad)
        with pytest.raises(IndexStoreError, match="must be integers, got str"):
            index.remove(["7", 10**30])
        assert index.remove([2**63 - 1]) == 0 and len(index) == 2  # the largest valid id is just unknown


def _flip(path: Path, offset: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_faiss_files_are_checksummed_and_verified_at_open(tmp_path):
    root = tmp_path / "c"
    spec = f"faiss:{root}"
    x = unit(np.random.default_rng(13), 20, 8)
    with open_index(spec, create=True, dim=8) as index:
        index.add(x, labels=[str(i) for i in range(20)])
        index.compact()
    vdir = _version_dir(root)
    sums = json.loads((vdir / "checksums.json").read_text())
    assert sums["algorithm"] == "sha256" and set(sums["files"]) == set(faiss_backend.FILES)
    pristine = {name: (vdir / name).read_bytes() for name in faiss_backend.FILES}

    def restore():
        for name, data in pristine.items():
            (vdir / name).write_bytes(data)

    size = len(pristine["index.faiss"])
    _flip(vdir / "index.faiss", size - 168 - 400, 100)  # inside the stored vectors (the id map is the last
    # 8 + 20 * 8 bytes): FAISS reads such a file without complaint
    _open_fails(spec, "v000002/index.faiss is corrupt: its SHA-256 does not match checksums.json")
    restore()
    vectors = np.load(vdir / "vectors.npy")
    for value in (np.nan, 1000.0):
        bad = vectors.copy()
        bad[3] = value
        np.save(vdir / "vectors.npy", bad)  # same shape, same size: only the checksum can tell
        _open_fails(spec, "v000002/vectors.npy is corrupt")
    restore()
    (vdir / "ids.jsonl").write_text((vdir / "ids.jsonl").read_text().replace('"label": "7"', '"label": "X"'))
    _open_fails(spec, "ids.jsonl is corrupt")
    restore()
    (vdir / "vector_ids.npy").write_bytes(pristine["vector_ids.npy"][:-8])
    _open_fails(spec, r"vector_ids.npy is unreadable: \d+ bytes where checksums.json records")
    restore()
    meta = json.loads(pristine["meta.json"])
    (vdir / "meta.json").write_text(json.dumps(dict(meta, gallery_model={"fingerprint": "forged"})))
    _open_fails(spec, "meta.json is (corrupt|unreadable)")
    restore()
    (vdir / "checksums.json").write_text("{not json")
    _open_fails(spec, "checksums.json is corrupt")
    (vdir / "checksums.json").write_text(json.dumps(sums))
    with open_index(spec) as index:
        assert len(index) == 20


def test_faiss_index_without_checksums_opens_with_a_warning_after_a_value_check(tmp_path):
    """Versions written before checksums keep working (warned), but NaN or scaled rows in their
    vectors.npy are still refused; their next commit records checksums."""
    root = tmp_path / "old"
    spec = f"faiss:{root}"
    with open_index(spec, create=True, dim=8) as index:
        index.add(unit(np.random.default_rng(14), 10, 8))
        index.compact()
    vdir = _version_dir(root)
    (vdir / "checksums.json").unlink()
    faiss_backend._WARNED_LEGACY.clear()
    with pytest.warns(UserWarning, match="has no checksums.json"):
        index = open_index(spec)
    assert len(index) == 10
    good = np.load(vdir / "vectors.npy")
    for value in (np.nan, 1000.0):
        bad = good.copy()
        bad[4] = value
        np.save(vdir / "vectors.npy", bad)
        _open_fails(spec, r"vectors.npy row 4 \(id 4\) is not a finite unit vector")
    np.save(vdir / "vectors.npy", good)
    index.remove([0])
    index.compact()  # the next base records checksums
    assert (_version_dir(root) / "checksums.json").is_file()
    index.close()


def test_a_reader_sees_newer_commits_only_when_it_refreshes(tmp_path):
    spec = f"faiss:{tmp_path / 's'}"
    x = unit(np.random.default_rng(15), 6, 8)
    with open_index(spec, create=True, dim=8) as writer:
        writer.add(x)
    reader = open_index(spec)
    assert not reader.stale() and not reader.refresh()
    with open_index(spec) as writer:
        writer.remove([2])
    assert len(reader) == 6 and reader.stale()  # the snapshot holds until asked
    assert reader.refresh() and len(reader) == 5 and not reader.stale()
    assert 2 not in reader.search(x[2:3], k=6)[1][0].tolist()
    with pytest.raises(IndexStoreError, match="not in index"):
        reader.records([2])
    reader.add(x[:1])  # its own commit does not make it stale
    assert not reader.stale() and len(reader) == 6
    reader.close()


def test_removal_deletes_only_the_uploads_it_owned(spec, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    dataset_image = tmp_path / "dataset.png"
    files = [uploads / "a.png", uploads / "b.png", dataset_image]
    for f in files:
        f.write_bytes(b"img")
    sources = [str(files[0]), str(files[1]), str(files[1]), str(dataset_image)]  # b.png shared by 1 and 2
    with open_index(spec, create=True, dim=8) as index:
        index.add(unit(np.random.default_rng(16), 4, 8), sources=sources)
        assert index.remove_with_uploads([0, 1, 3, 77], uploads) == (3, [str(files[0])])
        assert not files[0].exists() and files[1].exists() and dataset_image.exists()
        assert index.remove_with_uploads([2], uploads) == (1, [str(files[1])])
        assert not files[1].exists() and len(index) == 0
        with pytest.raises(IndexStoreError, match="out of range"):
            index.remove_with_uploads([10**20], uploads)


def test_build_checks_the_factory_before_embedding(tmp_path):
    images, labels = _images(50), [str(i) for i in range(50)]
    for meta, embedded in (({"gallery_model": {"embed_dim": 8}}, 0), ({}, 8)):  # no dim hint: one batch
        embed = CountingEmbed()
        with pytest.raises(IndexStoreError, match="'IVF256,Flat' needs at least 256 vectors to train, got 50"):
            build_index(
                f"faiss:{tmp_path / 'f'}",
                images,
                labels,
                None,
                embed,
                factory="IVF256,Flat",
                meta=meta,
                batch_size=8,
                shard_size=16,
                progress=False,
            )
        assert embed.items == embedded
    index = build_index(
        f"faiss:{tmp_path / 'f'}",
        images,
        labels,
        None,
        CountingEmbed(),
        factory="Flat",
        meta={},
        batch_size=8,
        shard_size=16,
        progress=False,
    )
    assert len(index) == 50
    index.close()


def test_build_resumes_with_another_factory_and_verifies_shards(tmp_path):
    n, images = 50, _images(50)
    labels = [str(i) for i in range(n)]
    kwargs = dict(
        meta={"gallery_model": {"name": "m"}}, batch_size=8, shard_size=16, work_dir=tmp_path / "work", progress=False
    )
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(
            f"faiss:{tmp_path / 'x'}", images, labels, None, CountingEmbed(fail_on_call=6), factory="HNSW32", **kwargs
        )
    _flip(tmp_path / "work" / "shards" / "shard_00000.npy", 200)  # damaged while the build was down
    resumed = CountingEmbed()
    index = build_index(f"faiss:{tmp_path / 'y'}", images, labels, None, resumed, factory="Flat", **kwargs)
    assert resumed.items == 16 + 18  # shard 0 again (its checksum failed), shards 2-3; shard 1 reused
    assert index.meta["build_report"]["n_reused_shards"] == 1 and index.meta["factory"] == "Flat"
    full = CountingEmbed()(images)
    np.testing.assert_array_equal(index.search(full[:3], k=1)[1][:, 0], [0, 1, 2])
    index.close()


def test_a_build_that_finished_no_shard_does_not_block_a_retry(tmp_path):
    images, labels = _images(20), [str(i) for i in range(20)]
    spec, work = f"faiss:{tmp_path / 'z'}", tmp_path / "z.build"

    def nan_model(batch):
        return np.full((len(batch), 8), np.nan, np.float32)

    with pytest.raises(IndexStoreError, match="embedding of item 0 .* is NaN") as info:
        build_index(
            spec,
            images,
            labels,
            None,
            nan_model,
            meta={"gallery_model": {"fingerprint": "broken"}},
            batch_size=8,
            shard_size=8,
            progress=False,
        )
    assert "skip_bad" not in str(info.value) and "work_dir" not in str(info.value)
    assert (work / "build.json").exists() and not list((work / "shards").iterdir())
    index = build_index(
        spec,
        images,
        labels,
        None,
        CountingEmbed(),
        meta={"gallery_model": {"fingerprint": "fixed"}},
        batch_size=8,
        shard_size=8,
        progress=False,
    )
    assert len(index) == 20 and not work.exists()
    index.close()
    # with finished shards, another model is refused, and the hint names no Python-only option
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(
            f"faiss:{tmp_path / 'w'}",
            images,
            labels,
            None,
            CountingEmbed(fail_on_call=2),
            meta={},
            batch_size=8,
            shard_size=8,
            progress=False,
        )
    with pytest.raises(IndexStoreError, match=r"different build \(another gallery model .*delete .*w.build") as info:
        build_index(
            f"faiss:{tmp_path / 'w'}",
            images,
            labels,
            None,
            CountingEmbed(),
            meta={"gallery_model": {"fingerprint": "other"}},
            batch_size=8,
            shard_size=8,
            progress=False,
        )
    assert "work_dir" not in str(info.value)


def test_a_remote_milvus_build_needs_no_work_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    work = build_mod.default_work_dir("milvus", "http://db:19530#shoes")
    assert work.parent == tmp_path / "hvs" / "index-builds"
    assert work != build_mod.default_work_dir("milvus", "http://db:19530#bags")


def test_a_second_writer_waits_for_the_first_to_release_the_lock(tmp_path, monkeypatch):
    """Writers through two handles (two lock holders, as two processes are) are serialised: the second
    waits while the first holds the lock and writes once it is released; both writes are kept."""
    import threading
    import time

    monkeypatch.setenv("HVS_INDEX_LOCK_WAIT", "20")
    spec = f"faiss:{tmp_path / 'w'}"
    open_index(spec, create=True, dim=8).close()
    first, second = open_index(spec), open_index(spec)
    first.add(np.ones((1, 8), np.float32))  # takes the lock and keeps it until released
    done = threading.Event()
    errors = []

    def write():
        try:
            second.add(np.full((1, 8), 2.0, np.float32))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.3)
    assert not done.is_set(), "the second writer did not wait for the lock"
    first.release_writer()
    t.join(timeout=20)
    assert done.is_set() and not errors, errors
    second.close()
    first.close()
    assert len(open_index(spec)) == 2
