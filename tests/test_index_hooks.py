"""Per-item gallery model, replace, model counts, id listing, sidecar updates and compaction:
the storage hooks model versions and backfills build on (run on every backend that has them)."""

from __future__ import annotations

import numpy as np
import pytest

from hvs.cli import main as cli_main
from hvs.index import IndexStoreError, open_index

try:
    import pymilvus  # noqa: F401

    HAVE_MILVUS = True
except ImportError:
    HAVE_MILVUS = False

FP_OLD, FP_NEW = "sha256:old", "sha256:new"
# both gallery models known to the index (storage refuses vectors of a model it does not know)
META = {"gallery_model": {"fingerprint": FP_OLD}, "gallery_models": {FP_NEW: {"model": "new"}}}


def unit(seed: int, n: int, d: int = 8) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def index(tmp_path):
    idx = open_index(f"faiss:{tmp_path / 'i'}", create=True, dim=8, meta=META)
    yield idx
    idx.close()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_model_is_recorded_per_item_and_replace_swaps_vectors_and_model(tmp_path, factory):
    spec = f"faiss:{tmp_path / 'i'}"
    x = unit(1, 10)
    with open_index(spec, create=True, dim=8, factory=factory, meta=META) as ix:
        ix.add(x[:6], labels=[f"l{i}" for i in range(6)], sources=[f"s{i}" for i in range(6)])  # default model
        ix.add(x[6:], labels=["n"] * 4, model=FP_NEW)
        assert ix.records([0, 7]) == [
            {"id": 0, "label": "l0", "source": "s0", "model": FP_OLD},
            {"id": 7, "label": "n", "source": None, "model": FP_NEW},
        ]
        assert ix.model_counts() == {FP_OLD: 6, FP_NEW: 4}
        np.testing.assert_array_equal(ix.ids(), np.arange(10))
        np.testing.assert_array_equal(ix.ids(exclude_model=FP_NEW), np.arange(6))
        y = unit(2, 2)
        assert ix.replace([1, 3], y, FP_NEW) == 2
        assert ix.records([1]) == [{"id": 1, "label": "l1", "source": "s1", "model": FP_NEW}]
        assert ix.model_counts() == {FP_OLD: 4, FP_NEW: 6}
        assert len(ix) == 10
        _, got = ix.search(y, k=1)
        np.testing.assert_array_equal(got[:, 0], [1, 3])
    with open_index(spec) as ix:  # durable
        assert ix.model_counts() == {FP_OLD: 4, FP_NEW: 6}
        np.testing.assert_array_equal(ix.ids(exclude_model=FP_OLD), [1, 3, 6, 7, 8, 9])
        np.testing.assert_allclose(ix.vectors([1, 3]), y, atol=1e-6)


def test_replace_of_an_unknown_id_changes_nothing(index):
    index.add(unit(3, 4))
    before = index.search(unit(4, 2), k=4)
    with pytest.raises(IndexStoreError, match="cannot replace id 9: not in index") as info:
        index.replace([0, 9], unit(5, 2), FP_NEW)
    assert "\n" not in str(info.value)
    with pytest.raises(IndexStoreError, match="2 embeddings but 1 ids"):
        index.replace([0], unit(5, 2), FP_NEW)
    with pytest.raises(IndexStoreError, match="duplicate id 0"):
        index.replace([0, 0], unit(5, 2), FP_NEW)
    with pytest.raises(IndexStoreError, match="model must be a gallery model fingerprint"):
        index.replace([0], unit(5, 1), 42)
    after = index.search(unit(4, 2), k=4)
    np.testing.assert_array_equal(before[1], after[1])
    assert index.model_counts() == {FP_OLD: 4}


def test_items_of_an_index_written_before_models_have_model_none(tmp_path):
    with open_index(f"faiss:{tmp_path / 'n'}", create=True, dim=8) as ix:  # no gallery_model in the sidecar
        ix.add(unit(6, 3))
        assert ix.model_counts() == {None: 3}
        assert ix.records([2])[0]["model"] is None
        np.testing.assert_array_equal(ix.ids(exclude_model=FP_OLD), [0, 1, 2])


def test_update_meta_is_durable_and_refuses_reserved_keys(index):
    spec = index.spec
    meta = index.update_meta({"model_versions": [{"fingerprint": FP_NEW}], "note": "x"})
    assert meta["model_versions"] == [{"fingerprint": FP_NEW}] and meta["note"] == "x"
    for bad, match in (
        ({"count": 3}, "meta key 'count' is kept by hvs itself"),
        ({"x": object()}, "not JSON-serialisable"),
        ([1], "must be a dict"),
    ):
        with pytest.raises(IndexStoreError, match=match):
            index.update_meta(bad)
    index.close()
    with open_index(spec) as again:
        assert again.meta["note"] == "x" and again.meta["gallery_model"] == {"fingerprint": FP_OLD}


def test_compact_subcommand(index, capsys):
    index.add(unit(7, 5))
    spec = index.spec
    index.close()
    assert cli_main(["index", "compact", spec]) == 0
    out = capsys.readouterr().out
    assert "compact" in out and spec in out
    with open_index(spec) as ix:
        assert len(ix) == 5


@pytest.mark.skipif(not HAVE_MILVUS, reason="pymilvus not installed: pip install pymilvus milvus-lite")
def test_milvus_hooks(tmp_path):
    with open_index(f"milvus:{tmp_path / 'g.db'}", create=True, dim=8) as ix:
        ix.add(unit(8, 3))
        assert ix.records([1])[0]["model"] is None
        assert ix.model_counts() == {None: 3}
        np.testing.assert_array_equal(ix.ids(), [0, 1, 2])
        assert ix.update_meta({"note": "y"})["note"] == "y"
        with pytest.raises(IndexStoreError, match="not supported by the milvus backend"):
            ix.replace([0], unit(9, 1), FP_NEW)
        with pytest.raises(IndexStoreError, match="not supported by the milvus backend"):
            ix.add(unit(9, 1), model=FP_NEW)
        assert ix.compact()["compacted"] is False
