"""Several gallery models in one index: the rule (hvs.compat rules 4 and 5), the backfill
(hvs.index.backfill), and the upgrade flow through the library and the CLI.

The models are 1-epoch cnn-nano nets on a tiny synthetic set: g (the old gallery model), q (a BCT
query model for g), g2 (a new gallery model trained BCT-compatible with g as frozen reference),
q2 (a query model for g2), and gx (a gallery model the index does not know and no relative of g).
"""

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_SPEC, build_tiny_world
from PIL import Image

from hvs import checkpoint as ckpt
from hvs import compat
from hvs.cli import main
from hvs.compat import CompatError, GallerySide, Preprocessing, QuerySide, check_pair
from hvs.index import IndexStoreError, open_index

PRE = Preprocessing(1, 12, (0.5,), (0.25,))


# ------------------------------------------------------------------------------------------------
# The rule on records alone.
def _meta(registry=None, primary="g1", legacy=None):
    meta = {
        "dim": 16,
        "gallery_model": {"model": "cnn-small", "fingerprint": primary, "embed_dim": 16, "path": "/m/g1"},
        "preprocessing": PRE.as_dict(),
    }
    if registry is not None:
        meta[compat.REGISTRY] = registry
    if legacy:
        meta[compat.LEGACY] = legacy
    return meta


REGISTRY = {
    "g1": {"model": "cnn-small", "embed_dim": 16, "path": "/m/g1", "preprocessing": {}, "compatible_with": None},
    "g2": {"model": "resnet8", "embed_dim": 16, "path": "/m/g2", "preprocessing": {}, "compatible_with": "g1"},
    "g3": {"model": "resnet8", "embed_dim": 16, "path": "/m/g3", "preprocessing": {}, "compatible_with": "g2"},
}


def _index(counts, registry=REGISTRY, **kw):
    return GallerySide.of_index_meta(_meta(registry, **kw), counts, "faiss:runs/idx")


def _q(fingerprint="q1", compatible_with="g1", role="query", name="cnn-nano", path=None):
    return QuerySide(name, fingerprint, compatible_with, 16, PRE, role=role, path=path)


def test_a_sidecar_before_the_registry_knows_its_gallery_model():
    known = compat.gallery_models(_meta())
    assert list(known) == ["g1"] and known["g1"]["compatible_with"] is None and known["g1"]["path"] == "/m/g1"
    assert compat.gallery_models({"dim": 16}) == {}  # a hand-made index: no fingerprint, no model
    assert set(compat.gallery_models(_meta(REGISTRY))) == {"g1", "g2", "g3"}


def test_descendants_follow_compatible_with_links_and_survive_a_loop():
    assert compat.descendants(REGISTRY, {"g1"}) == {"g1", "g2", "g3"}
    assert compat.descendants(REGISTRY, {"g2"}) == {"g2", "g3"}
    loop = {"a": {"compatible_with": "b"}, "b": {"compatible_with": "a"}}
    assert compat.descendants(loop, {"c"}) == {"c"}


def test_old_query_models_search_a_mixed_index():
    half = _index({"g1": 5, "g2": 3})
    assert check_pair(_q(), half) is None  # made for g1: g2 maps into g1's space
    assert check_pair(_q("g1", None, "gallery"), half) is None  # the old gallery model itself
    assert check_pair(_q("g2", "g1", "gallery"), half) is None  # the new one was trained for the old
    assert check_pair(_q(), _index({"g2": 8})) is None  # fully re-embedded
    assert check_pair(_q(), _index({"g1": 2, "g2": 3, "g3": 1})) is None  # grandchildren too


def test_a_query_model_for_the_new_gallery_model_waits_for_the_backfill():
    q2 = _q("q2", "g2")
    with pytest.raises(CompatError) as e:
        check_pair(q2, _index({"g1": 5, "g2": 3}))
    assert str(e.value) == (
        "query model cnn-nano was trained for gallery fingerprint g2, but 5 of the index's 8 vectors come "
        "from gallery model cnn-small (g1), which it is not compatible with; run hvs index backfill "
        "faiss:runs/idx --gallery-model /m/g2 to re-embed them, or pass --force to search anyway"
    )
    assert "\n" not in str(e.value)
    assert check_pair(q2, _index({"g2": 8})) is None
    assert check_pair(q2, _index({"g2": 8, "g3": 2})) is None
    warning = check_pair(q2, _index({"g1": 5, "g2": 3}), force=True)
    assert warning.startswith("query model cnn-nano was trained for gallery fingerprint g2, but 5 of")
    assert "--force" not in warning


def test_legacy_vectors_are_the_primary_models_and_stay_so_once_pinned():
    q2 = _q("q2", "g2")
    with pytest.raises(CompatError, match="4 of the index's 7 vectors come from gallery model cnn-small"):
        check_pair(q2, _index({None: 4, "g2": 3}))
    # once g2 is primary, vectors recording no model are still g1's (pinned when g2 was registered)
    with pytest.raises(CompatError, match="4 of the index's 7"):
        check_pair(q2, _index({None: 4, "g2": 3}, primary="g2", legacy="g1"))


def test_an_unrelated_query_model_keeps_rule_3s_words_on_a_one_model_index():
    other = _q("qx", "0123456789abcdef")
    with pytest.raises(CompatError) as single:
        check_pair(other, _index({"g1": 8}))
    assert str(single.value) == (
        "query model cnn-nano was trained for gallery fingerprint 0123456789abcdef, but the index's gallery "
        "model cnn-small has fingerprint g1; pass --force to search anyway"
    )
    with pytest.raises(CompatError, match=r"8 of the index's 8 vectors .*re-embed them with hvs index backfill"):
        check_pair(other, _index({"g1": 5, "g2": 3}))
    # without counts (a backend that records no model per vector), or empty, the primary model is all there is
    assert check_pair(_q(), GallerySide.of_index_meta(_meta(REGISTRY))) is None
    for empty in (GallerySide.of_index_meta(_meta(REGISTRY)), _index({})):
        with pytest.raises(CompatError, match="but the index's gallery model cnn-small has fingerprint g1"):
            check_pair(other, empty)


def test_writers_are_known_gallery_models_or_compatible_newcomers():
    index = _index({"g1": 5})
    kw = {"same_model": True, "upgrade": True}
    assert check_pair(_q("g2", "g1", "gallery"), index, **kw) is None  # known
    assert check_pair(_q("g4", "g3", "gallery"), index, **kw) is None  # new, trained for a known one
    with pytest.raises(CompatError) as e:
        check_pair(_q("gx", "zz", "gallery", path="/m/gx"), index, **kw)
    assert str(e.value) == (
        "/m/gx (fingerprint gx) is not a gallery model the index knows (g1, g2, g3) and was trained compatible "
        "with zz: its vectors would live in another embedding space (train it with hvs train --role gallery "
        "--gallery-model KNOWN --compat bct)"
    )
    with pytest.raises(CompatError, match="and was trained independently"):
        check_pair(_q("gx", None, "gallery"), index, **kw)
    with pytest.raises(CompatError, match="is not the gallery model that built this index"):
        check_pair(_q("q1", "g1", "query", path="runs/q"), index, **kw)  # a query model writes nothing
    with pytest.raises(CompatError, match="is not the gallery model that built this index"):
        check_pair(_q("g4", "g1", "gallery"), index, same_model=True)  # a build's shards are one model's
    with pytest.raises(CompatError, match="embeds 8-d"):
        check_pair(QuerySide("x", "g2", "g1", 8, PRE, role="gallery"), index, **kw)
    # an upgrade to a model of larger inputs (a 224-px backbone for a 12-px index) reads at its own size ...
    big = Preprocessing(1, 48, (0.5,), (0.25,))
    assert check_pair(QuerySide("g4", "g4", "g1", 16, big, role="gallery"), index, **kw) is None
    # ... but not with other channels, and the index's own writes keep its size
    with pytest.raises(CompatError, match="reads 3x48px images but the index was built from 1x12px"):
        check_pair(QuerySide("g4", "g4", "g1", 16, Preprocessing(3, 48), role="gallery"), index, **kw)
    with pytest.raises(CompatError, match="reads 1x48px images but the index was built from 1x12px"):
        check_pair(QuerySide("g1", "g1", None, 16, big, role="gallery"), index, same_model=True)


def test_register_and_primary_patches():
    meta = _meta()
    writer = QuerySide("resnet8", "g2", "g1", 16, PRE, role="gallery", path="/m/g2")
    assert compat.register_patch(meta, QuerySide("cnn-small", "g1", None, 16, PRE, role="gallery")) is None
    patch = compat.register_patch(meta, writer)
    assert patch[compat.LEGACY] == "g1" and set(patch[compat.REGISTRY]) == {"g1", "g2"}
    assert patch[compat.REGISTRY]["g2"]["compatible_with"] == "g1"
    meta.update(patch)
    primary = compat.primary_patch(meta, "g2")
    assert primary["gallery_model"]["fingerprint"] == "g2" and primary["gallery_model"]["path"] == "/m/g2"
    assert primary["preprocessing"] == PRE.as_dict()


# ------------------------------------------------------------------------------------------------
# The flow on real (tiny) models and indexes.
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hvs.data import create_dataset
    from hvs.train import TrainConfig, train

    root = tmp_path_factory.mktemp("upgrade")
    build_tiny_world(root, TINY_SPEC)  # g, q (for g), idx (g's vectors)
    data = create_dataset(TINY_SPEC)
    common = dict(data=TINY_SPEC, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32, lr=0.05)
    quiet = dict(data=data, progress=False, log=lambda _: None)
    train(TrainConfig(out=str(root / "g2"), gallery=str(root / "g"), role="gallery", compat=["bct"], **common), **quiet)
    train(TrainConfig(out=str(root / "q2"), gallery=str(root / "g2"), compat=["bct"], **common), **quiet)
    model, card = ckpt.load_model(root / "g")  # gx: another gallery model, no relative of g
    with torch.no_grad():
        next(model.parameters()).mul_(-1.0)
    ckpt.save_model_folder(root / "gx", model, card)
    for i in range(3):
        Image.fromarray(data.query.images[i, 0].numpy(), mode="L").save(root / f"new{i}.png")
    return root


def _fp(folder):
    return ckpt.read_card(folder).fingerprint


def _copy(world, tmp_path):
    shutil.copytree(world / "idx", tmp_path / "idx")
    return f"faiss:{tmp_path / 'idx'}"


def test_a_new_gallery_model_records_its_lineage(world):
    card = ckpt.read_card(world / "g2")
    assert card.role == "gallery" and card.compatible_with["fingerprint"] == _fp(world / "g")


def test_upgrade_through_the_library(world, tmp_path, monkeypatch):
    from hvs.gallery import add_images
    from hvs.index.backfill import backfill
    from hvs.search import Searcher

    spec = _copy(world, tmp_path)
    g1, g2 = _fp(world / "g"), _fp(world / "g2")
    with open_index(spec) as index:
        n_old = len(index)
        new = add_images(index, [world / "new0.png"], ["x"], gallery_model=world / "g2")  # registered
        assert index.records(new)[0]["model"] == g2 and index.model_counts() == {g1: n_old, g2: 1}
        assert index.meta[compat.REGISTRY][g2]["compatible_with"] == g1
        assert Searcher(index, world / "q").warning is None  # old query model: fine on the mixed index
        with pytest.raises(CompatError, match=f"{n_old} of the index's {n_old + 1} vectors .* hvs index backfill"):
            Searcher(index, world / "q2")

        real = type(index).replace
        calls = []

        def crash_on_second_batch(self, *a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed between batches
            return real(self, *a, **kw)

        monkeypatch.setattr(type(index), "replace", crash_on_second_batch)
        with pytest.raises(KeyboardInterrupt):
            backfill(index, world / "g2", batch_size=5)
        monkeypatch.undo()
    with open_index(spec) as index:  # a fresh process: the first batch is there, the rest is not
        assert index.model_counts() == {g1: n_old - 5, g2: 6}
        with pytest.raises(CompatError, match=f"{n_old - 5} of the index's"):
            Searcher(index, world / "q2")
        lines = []
        report = backfill(index, world / "g2", batch_size=5, log=lines.append)
        assert report.todo == n_old - 5 and report.replaced == n_old - 5 and report.complete
        assert not report.registered and lines and lines[-1].endswith(f"{n_old - 5} re-embedded")
        assert index.model_counts() == {g2: n_old + 1} and index.meta["gallery_model"]["fingerprint"] == g2
        assert Searcher(index, world / "q2").warning is None and Searcher(index, world / "q").warning is None
        again = backfill(index, world / "g2")  # nothing left: a no-op
        assert again.todo == 0 and again.complete
        # labels and sources survive; re-embedded vectors are g2's (same as embedding afresh)
        rec = index.records([0])[0]
        assert rec["model"] == g2 and rec["source"] and rec["label"]


def test_the_re_embedded_vectors_are_the_new_models(world, tmp_path):
    from hvs.index.backfill import backfill
    from hvs.search import Searcher, build_gallery_index

    spec = _copy(world, tmp_path)
    backfill(spec, world / "g2")
    fresh = build_gallery_index(world / "g2", TINY_SPEC, f"faiss:{tmp_path / 'fresh'}", progress=False)
    # an index built by g2 from scratch records its lineage: g's query models may search it
    assert fresh.meta[compat.REGISTRY][_fp(world / "g2")]["compatible_with"] == _fp(world / "g")
    assert Searcher(fresh, world / "q").warning is None and Searcher(fresh, world / "q2").warning is None
    with open_index(spec) as index:
        ids = index.ids()
        q = np.asarray(fresh.search(np.eye(16, dtype=np.float32)[:4], k=len(ids))[1])
        p = np.asarray(index.search(np.eye(16, dtype=np.float32)[:4], k=len(ids))[1])
        assert (q == p).all()  # the same ranking as an index built with g2 from scratch
    fresh.close()


def test_an_unknown_gallery_model_is_refused_and_nothing_is_written(world, tmp_path):
    from hvs.gallery import add_images
    from hvs.index.backfill import backfill

    spec = _copy(world, tmp_path)
    with open_index(spec) as index:
        before = (index.meta, index.model_counts())
        for attempt in (
            lambda: add_images(index, [world / "new0.png"], ["x"], gallery_model=world / "gx"),
            lambda: backfill(index, world / "gx"),
        ):
            with pytest.raises(CompatError) as e:
                attempt()
            message = str(e.value)
            assert "\n" not in message and _fp(world / "gx") in message and _fp(world / "g") in message
            assert "is not a gallery model the index knows" in message
        assert (index.meta, index.model_counts()) == before
        with pytest.raises(CompatError, match="is not the gallery model that built this index"):
            backfill(index, world / "q")  # a query model never writes gallery vectors


def test_items_whose_source_is_gone_are_listed_and_left(world, tmp_path):
    from hvs.gallery import add_images
    from hvs.index.backfill import backfill

    spec = _copy(world, tmp_path)
    image = tmp_path / "gone.png"
    shutil.copy(world / "new1.png", image)
    with open_index(spec) as index:
        (gone,) = add_images(index, [image], ["x"])  # by g, the old model
        image.unlink()
        with pytest.raises(IndexStoreError, match=f"item {gone} of .* cannot be re-embedded: source"):
            backfill(index, world / "g2", strict=True)
        report = backfill(index, world / "g2")
        assert report.n_missing == 1 and report.missing[0].startswith(f"{gone}: {image}")
        assert not report.complete and report.remaining == 1
        assert index.meta["gallery_model"]["fingerprint"] == _fp(world / "g")  # not switched
        index.remove([gone])
        assert backfill(index, world / "g2").complete


def test_the_upgrade_through_the_cli(world, tmp_path, capsys):
    spec = _copy(world, tmp_path)
    query = str(world / "new2.png")
    add = ["index", "add", "--index", spec, "--gallery-model", str(world / "g2"), "--label", "x", query]
    assert main(add) == 0
    assert main(["search", "--index", spec, "--query-model", str(world / "q2"), query]) == 2
    err = capsys.readouterr().err
    assert "hvs index backfill" in err and len(err.strip().splitlines()) == 1
    assert main(["index", "backfill", spec, "--gallery-model", str(world / "g2"), "--batch", "7"]) == 0
    out = capsys.readouterr().out
    assert "re-embedded" in out and "complete: the index's gallery model is now" in out
    assert main(["search", "--index", spec, "--query-model", str(world / "q2"), "-k", "3", query]) == 0
    assert main(["search", "--index", spec, "--query-model", str(world / "q"), "-k", "3", query]) == 0
    assert main(["index", "backfill", spec, "--gallery-model", str(world / "gx")]) == 2
    assert "is not a gallery model the index knows" in capsys.readouterr().err


def test_the_service_keeps_answering_through_a_backfill_and_rechecks_on_reload(world, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from hvs.gallery import add_images
    from hvs.index.backfill import backfill
    from hvs.serve import create_app

    spec = _copy(world, tmp_path)
    png = (world / "new2.png").read_bytes()
    files = {"image": ("q.png", png, "image/png")}
    with TestClient(create_app(spec, world / "q", token="tok")) as old:  # the old query model's service
        assert old.post("/search?k=3", files=files).status_code == 200
        auth = {"Authorization": "Bearer tok"}
        first = old.post("/gallery", headers=auth, data={"label": "x"}, files=files).json()  # by g, loaded now
        backfill(spec, world / "g2", batch_size=4, max_batches=2)  # another process, half-way
        assert old.post("/search?k=3", files=files).status_code == 200
        backfill(spec, world / "g2")
        body = old.post("/search?k=3", files=files).json()
        assert {hit["model"] for hit in body["results"]} == {_fp(world / "g2")}
        added = old.post("/gallery", headers=auth, data={"label": "x"}, files=files).json()  # by the new primary
        with open_index(spec) as index:
            # the upload kept for its thumbnail was the source the backfill re-embedded it from
            assert [r["model"] for r in index.records([first["id"], added["id"]])] == [_fp(world / "g2")] * 2
    with TestClient(create_app(spec, world / "q2", token="")) as new:  # the new query model's service
        assert new.post("/search?k=3", files=files).status_code == 200
        with open_index(spec) as index:  # someone adds an item with the old gallery model
            add_images(index, [world / "new0.png"], ["x"], gallery_model=world / "g")
        refused = new.post("/search?k=3", files=files)
        assert refused.status_code == 409 and "1 of the index's" in refused.json()["detail"]


def test_an_item_removed_by_another_writer_mid_batch_is_dropped_not_an_error(world, tmp_path, monkeypatch):
    from hvs.index.backfill import backfill

    spec = _copy(world, tmp_path)
    with open_index(spec) as index:
        real = type(index).records
        removed = []

        def records_then_removed(self, ids, **kw):
            out = real(self, ids, **kw)
            if not removed and self is index:  # the backfill read item 1's record; now another process removes it
                with open_index(spec) as other:
                    removed.append(other.remove([1]))
            return out

        monkeypatch.setattr(type(index), "records", records_then_removed)
        report = backfill(index, world / "g2", batch_size=4)
        monkeypatch.undo()
        assert removed == [1] and report.complete and report.replaced == report.todo - 1
        assert 1 not in index.ids().tolist() and index.model_counts() == {_fp(world / "g2"): report.todo - 1}


def test_a_batch_waits_for_another_writers_lock(world, tmp_path, monkeypatch):
    import threading

    from hvs.index.backfill import backfill

    spec = _copy(world, tmp_path)
    other = open_index(spec)
    with open_index(spec) as index:
        real = type(index).records
        held = []

        def records_then_locked(self, ids, **kw):
            out = real(self, ids, **kw)
            if not held and self is index:  # another writer takes the lock and keeps it a moment
                other.update_meta({"note": "busy"})
                held.append(threading.Timer(0.3, other.release_writer))
                held[0].start()
            return out

        monkeypatch.setattr(type(index), "records", records_then_locked)
        report = backfill(index, world / "g2", batch_size=100)
        monkeypatch.undo()
        assert held and report.complete and report.replaced == report.todo
    held[0].join()
    other.close()


def test_storage_refuses_a_vector_from_a_gallery_model_the_index_does_not_know(tmp_path):
    """The last line of defence below the pairing rule: add and replace with an unregistered
    fingerprint are one-line errors and write nothing; the registered and the primary model pass."""
    from hvs.index.faiss_backend import FaissGalleryIndex

    rng = np.random.default_rng(0)
    meta = {"gallery_model": {"model": "g1", "fingerprint": "aaaa"}, "gallery_models": {"bbbb": {"model": "g2"}}}
    index = FaissGalleryIndex.create(str(tmp_path / "ix"), dim=8, factory="Flat", meta=meta)
    ids = index.add(rng.standard_normal((3, 8)).astype(np.float32))  # the primary model, by default
    index.add(rng.standard_normal((1, 8)).astype(np.float32), model="bbbb")  # registered
    with pytest.raises(IndexStoreError, match=r"gallery model cccc is not one it knows \(aaaa \(g1\), bbbb \(g2\)\)"):
        index.add(rng.standard_normal((2, 8)).astype(np.float32), model="cccc")
    with pytest.raises(IndexStoreError, match="gallery model cccc is not one it knows"):
        index.replace(ids[:1], rng.standard_normal((1, 8)).astype(np.float32), model="cccc")
    index.close()
    again = open_index(f"faiss:{tmp_path / 'ix'}")
    assert len(again) == 4 and again.model_counts() == {"aaaa": 3, "bbbb": 1}


def test_two_writers_registering_gallery_models_keep_both(tmp_path):
    """Two handles, each registering a model from its own (older) view of the sidecar: the registry's
    entries add up instead of the second write dropping the first's model."""
    from hvs.index.faiss_backend import FaissGalleryIndex

    meta = {"gallery_model": {"model": "g1", "fingerprint": "aaaa"}}
    FaissGalleryIndex.create(str(tmp_path / "ix"), dim=8, factory="Flat", meta=meta).close()
    a, b = open_index(f"faiss:{tmp_path / 'ix'}"), open_index(f"faiss:{tmp_path / 'ix'}")
    a.update_meta({"gallery_models": {"bbbb": {"model": "g2"}}})
    a.release_writer()
    b.update_meta({"gallery_models": {"cccc": {"model": "g3"}}})  # b never saw bbbb
    b.add(np.ones((1, 8), np.float32), model="bbbb")  # still known
    b.close()
    a.close()
    assert set(open_index(f"faiss:{tmp_path / 'ix'}").meta["gallery_models"]) == {"bbbb", "cccc"}
