"""The streaming path of file sources (hvs.data.store), the image cache (hvs.data.cache) and the
named augmentations (hvs.training.augment): same data, same embeddings, same batches as the
in-memory path, on tiny generated folders."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hvs.data import DataError, DataWarning, ImageError, create_dataset
from hvs.data import cache as cache_mod
from hvs.data import store as store_mod
from hvs.data.store import ImageStore
from hvs.embed import embed_images
from hvs.models import create_model
from hvs.training.augment import create_augment, list_augments
from hvs.training.core import Batches, TrainError, parse_augment


def _image(path, w, h, seed, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 3))
    arr = np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def make_folder(root, classes=3, per_class=6, bad=True):
    """PNG and JPEG files of several sizes (some large enough for JPEG draft decoding at 16 px),
    plus unreadable ones: garbage, empty, truncated."""
    for c in range(classes):
        for i in range(per_class):
            ext = (".png", ".jpg", ".jpeg")[i % 3]
            w, h = ((20, 14), (90, 70), (33, 41))[(i + c) % 3]
            _image(os.path.join(root, f"c{c}", f"{i:02d}{ext}"), w, h, seed=100 * c + i)
    if bad:
        with open(os.path.join(root, "c0", "zz_garbage.jpg"), "wb") as f:
            f.write(b"not an image at all")
        open(os.path.join(root, "c1", "zz_empty.png"), "wb").close()
        good = open(os.path.join(root, "c2", "01.jpg"), "rb").read()
        with open(os.path.join(root, "c2", "zz_truncated.jpg"), "wb") as f:
            f.write(good[: len(good) // 2])
    return str(root)


def load(spec, image_size=16, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return create_dataset(spec, image_size=image_size, **kw)


def assert_same_data(a, b):
    assert a.skipped == b.skipped and a.classes == b.classes and a.mean == b.mean and a.std == b.std
    for role in a.loaded:
        sa, sb = a.split(role), b.split(role)
        assert sa.sources == sb.sources and torch.equal(sa.labels, sb.labels)
        assert torch.equal(sa.images, sb.images[:])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("if") / "imgs")


def test_stream_is_the_memory_path_item_for_item_and_embedding_for_embedding(folder):
    mem = load(f"imagefolder:{folder}", data_mode="memory")
    streamed = load(f"imagefolder:{folder}", data_mode="stream", workers=2)
    assert isinstance(streamed.train.images, ImageStore) and streamed.train.streamed and not mem.train.streamed
    assert_same_data(mem, streamed)
    # the three unreadable files are skipped and listed like the in-memory path lists them
    assert len(mem.skipped) == 3 and all("zz_" in s for s in streamed.skipped)
    assert streamed.train.images.shape == mem.train.images.shape and streamed.train.images.dtype == torch.uint8
    # the tensor surface: int, slice, index tensor, bool mask
    imgs, ref = streamed.gallery.images, mem.gallery.images
    assert torch.equal(imgs[1], ref[1]) and torch.equal(imgs[-1], ref[-1]) and torch.equal(imgs[1:3], ref[1:3])
    idx = torch.tensor([2, 0])
    assert torch.equal(imgs[idx], ref[idx]) and torch.equal(imgs[torch.arange(len(ref)) % 2 == 0], ref[::2])
    torch.manual_seed(0)
    model = create_model("cnn-nano", embed_dim=8, in_chans=3)
    for role in ("query", "gallery", "train"):
        want = embed_images(model, mem.split(role).images, mem.mean, mem.std, batch_size=4)
        for workers in (0, 2):
            got = embed_images(model, streamed.split(role).images, mem.mean, mem.std, batch_size=4, workers=workers)
            assert torch.equal(got, want)
    # a model of a smaller input (a query model at its own resolution): resized in the workers alike
    want = embed_images(model, mem.gallery.images, mem.mean, mem.std, batch_size=4, image_size=8)
    got = embed_images(model, streamed.gallery.images, mem.mean, mem.std, batch_size=4, workers=2, image_size=8)
    assert torch.equal(got, want)


def test_csv_with_boxes_streams_like_memory(tmp_path, folder):
    rows = ["path,label,split,bbox"]
    for c in range(3):
        rows += [
            f"{folder}/c{c}/01.jpg,k{c},train,",
            f"{folder}/c{c}/01.jpg,k{c},train,5 5 60 50",
            f"{folder}/c{c}/04.jpg,k{c},query,0 0 30 30",
            f"{folder}/c{c}/02.jpeg,k{c},gallery,",
        ]
    rows.append(f"{folder}/c0/01.jpg,k0,train,95 75 120 90")  # outside the 90x70 image: skipped
    rows.append(f"{folder}/c0/01.jpg,k0,train,80 60 80 90")  # no width, yet 1 px at the JPEG draft scale
    os.symlink(folder, tmp_path / "imgs")  # manifest paths stay inside its folder
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(r.replace(f"{folder}/", "imgs/") for r in rows) + "\n")
    mem = load(f"csv:{manifest}", data_mode="memory")
    streamed = load(f"csv:{manifest}", data_mode="stream", workers=0)
    assert len(mem.skipped) == 1 and "degenerate bounding box" in mem.skipped[0]
    assert_same_data(mem, streamed)
    gallery_only = load(f"csv:{manifest}", data_mode="stream", splits=("gallery",))
    assert torch.equal(gallery_only.gallery.images[:], mem.gallery.images)


def test_deepfashion2_streams_like_memory(tmp_path):
    from test_data import make_deepfashion2

    root = make_deepfashion2(tmp_path / "df2")
    mem = load(f"deepfashion2:{root}", data_mode="memory")
    for mode in ("stream", "cache"):
        other = load(f"deepfashion2:{root}", data_mode=mode, cache_dir=str(tmp_path / "cache"))
        assert_same_data(mem, other)


def test_training_batches_are_the_same_streamed_or_in_memory(folder):
    mem = load(f"imagefolder:{folder}", data_mode="memory")
    streamed = load(f"imagefolder:{folder}", data_mode="stream")
    targets = mem.train.labels
    for spec, workers, epochs in (
        ("crop,flip", 0, (0, 1)),
        ("crop,flip", 2, (1,)),
        ("rrc,jitter,trivial,erase=0.5", 2, (0,)),
    ):
        ref = Batches(mem.train.images, targets, mem.mean, mem.std, 4, spec, seed=3, channels_last=False)
        got = Batches(
            streamed.train.images, targets, mem.mean, mem.std, 4, spec, seed=3, channels_last=False, workers=workers
        )
        for epoch in epochs:
            pairs = list(zip(ref.epoch(epoch), got.epoch(epoch), strict=True))
            assert len(pairs) == ref.steps_per_epoch == 3
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # augmentation changes the batch, and another seed changes it otherwise
    plain = next(Batches(mem.train.images, targets, mem.mean, mem.std, 4, "none", seed=3).epoch(0))[0]
    aug = next(Batches(mem.train.images, targets, mem.mean, mem.std, 4, "rrc,jitter", seed=3).epoch(0))[0]
    aug2 = next(Batches(mem.train.images, targets, mem.mean, mem.std, 4, "rrc,jitter", seed=4).epoch(0))[0]
    assert plain.shape == aug.shape and not torch.equal(plain, aug) and not torch.equal(aug, aug2)


def test_training_on_streamed_data_follows_the_in_memory_run(tmp_path, folder):
    from hvs.train import TrainConfig, train

    losses = []
    for mode in ("memory", "stream"):
        data = load(f"imagefolder:{folder}", data_mode=mode, workers=2)
        cfg = TrainConfig(out=str(tmp_path / mode), model="cnn-nano", embed_dim=8, epochs=2, batch_size=4, threads=1)
        card = train(cfg, data=data, progress=False, log=lambda _: None)
        losses.append(card.extra["final"]["loss"])
        assert card.extra["augment"] == "crop,flip"
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_forced_memory_that_does_not_fit_is_refused_before_decoding(folder, monkeypatch):
    from hvs.data import images as images_mod

    monkeypatch.setattr(store_mod, "available_memory", lambda: 10_000)
    decoded = []
    monkeypatch.setattr(images_mod, "load_image", lambda *a, **k: decoded.append(a))
    with pytest.raises(DataError) as err:
        load(f"imagefolder:{folder}", data_mode="memory")
    msg = str(err.value)
    assert "\n" not in msg and "21 images of 3x16x16 in memory takes" in msg and "MiB" in msg and "stream" in msg
    assert decoded == []
    # auto picks stream above the threshold, memory below it
    monkeypatch.undo()
    assert not load(f"imagefolder:{folder}").train.streamed
    monkeypatch.setattr(store_mod, "AUTO_MEMORY_MAX_BYTES", 1000)
    assert load(f"imagefolder:{folder}").train.streamed
    monkeypatch.setenv(store_mod.DATA_MODE_ENV, "memory")
    assert not load(f"imagefolder:{folder}").train.streamed


def test_bad_modes_and_in_memory_sources(folder):
    with pytest.raises(DataError, match="unknown data mode 'disk'; expected one of auto, memory, stream, cache"):
        load(f"imagefolder:{folder}", data_mode="disk")
    with pytest.raises(DataError, match="workers must be a non-negative integer"):
        load(f"imagefolder:{folder}", data_mode="stream", workers=-1)
    with pytest.raises(DataError, match="held in memory only; data mode stream applies to file sources"):
        create_dataset("synthetic:classes=4,size=8", data_mode="stream")
    assert not create_dataset("synthetic:classes=4,size=8", data_mode="memory").train.streamed


def test_unreadable_files_in_stream_mode_strict_and_changed_on_disk(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=3)
    with pytest.raises(ImageError, match=r"zz_garbage\.jpg: UnidentifiedImageError"):
        load(f"imagefolder:{root}", data_mode="stream", strict=True)
    with pytest.warns(DataWarning, match="skipped 3 item"):
        d = create_dataset(f"imagefolder:{root}", image_size=16, data_mode="stream")
    assert [s.split(": ")[0] for s in d.skipped] == [
        f"{root}/c0/zz_garbage.jpg",
        f"{root}/c1/zz_empty.png",
        f"{root}/c2/zz_truncated.jpg",
    ]
    # a file that passed the listing check and breaks afterwards stops with a one-line error
    path = d.train.sources[0]
    open(path, "wb").write(b"broken since")
    with pytest.raises(ImageError) as err:
        d.train.images[:]
    assert str(err.value).startswith(f"{path}: ") and "changed on disk" in str(err.value) and "\n" not in str(err.value)


def test_cache_is_built_resumably_reused_and_repaired(tmp_path, folder, monkeypatch):
    mem = load(f"imagefolder:{folder}", data_mode="memory")
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 4 * 3 * 16 * 16)  # 4 images a chunk: 5 chunks
    decoded = []
    real = ImageStore.decode

    def counting(self, rows):
        decoded.extend(rows.tolist())
        return real(self, rows)

    monkeypatch.setattr(ImageStore, "decode", counting)

    class Killed(Exception):
        pass

    def kill(i):
        if i == 2:
            raise Killed

    monkeypatch.setattr(cache_mod.hooks, "after_chunk", kill)
    with pytest.raises(Killed):
        load(f"imagefolder:{folder}", data_mode="cache", workers=0, cache_dir=str(cache_dir))
    (folder_c,) = cache_dir.iterdir()
    assert sorted(p.name for p in (folder_c / "chunks").iterdir()) == ["00000.json", "00001.json", "00002.json"]
    assert not (folder_c / "cache.json").exists() and len(decoded) == 12
    monkeypatch.setattr(cache_mod.hooks, "after_chunk", lambda i: None)
    decoded.clear()
    resumed = load(f"imagefolder:{folder}", data_mode="cache", workers=0, cache_dir=str(cache_dir))
    assert len(decoded) == 18 - 12  # 18 readable images: only the chunks the killed build had not sealed
    assert_same_data(mem, resumed)
    info = json.loads((folder_c / "cache.json").read_text())
    assert info["shape"] == [18, 3, 16, 16] and len(info["chunks"]) == 5
    # a second run (another model of this size) reuses it: nothing decoded from the files
    decoded.clear()
    again = load(f"imagefolder:{folder}", data_mode="cache", workers=2, cache_dir=str(cache_dir))
    assert decoded == [] and type(again.train.images).__name__ == "CachedStore"
    assert_same_data(mem, again)
    # a damaged byte is found by the checksum and that chunk decoded again
    with open(folder_c / "images.u8", "r+b") as f:
        f.seek(5 * 3 * 16 * 16 + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        repaired = create_dataset(
            f"imagefolder:{folder}", image_size=16, data_mode="cache", workers=0, cache_dir=str(cache_dir)
        )
    assert any("1 damaged chunk(s) (checksum mismatch, e.g. chunk 1)" in str(w.message) for w in caught)
    assert len(decoded) == 4
    assert_same_data(mem, repaired)
    # another size is another cache
    load(f"imagefolder:{folder}", data_mode="cache", workers=0, cache_dir=str(cache_dir), image_size=8)
    assert len(list(cache_dir.iterdir())) == 2


def test_index_build_reads_a_store_like_a_tensor(tmp_path, folder):
    from hvs.index import build_index

    mem = load(f"imagefolder:{folder}", data_mode="memory")
    streamed = load(f"imagefolder:{folder}", data_mode="stream", workers=2)
    proj = torch.randn(3 * 16 * 16, 8, generator=torch.Generator().manual_seed(0))

    def embed_fn(batch):
        return (batch.float().flatten(1) @ proj).numpy()

    labels = [str(x) for x in mem.train.labels.tolist()]
    results = []
    for name, images in (("mem", mem.train.images), ("stream", streamed.train.images)):
        index = build_index(
            f"faiss:{tmp_path / name}",
            images,
            labels,
            mem.train.sources,
            embed_fn,
            meta={"gallery_model": {"embed_dim": 8}},
            batch_size=4,
            shard_size=5,
            progress=False,
        )
        results.append(index.search(embed_fn(mem.query.images), 5))
        index.close()
    assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][0], results[1][0])


def test_augment_specs():
    assert list_augments() == ["rrc", "jitter", "trivial", "randaugment", "crop", "flip", "erase"]
    aug = create_augment("flip, crop")
    assert aug.spec == "crop,flip" and "crop" in aug and aug == {"crop", "flip"}
    assert create_augment("erase=0.5,rrc=0.25,randaugment=12").spec == "rrc,randaugment=12,erase=0.5"
    assert not create_augment("none") and create_augment("none").spec == "none"
    assert parse_augment("crop,flip") == create_augment({"flip", "crop"})
    with pytest.raises(TrainError) as err:
        parse_augment("crop,blur")
    msg = str(err.value)
    assert "\n" not in msg and "unknown augmentation 'blur'" in msg and "rrc, jitter, trivial, randaugment" in msg
    for bad, match in (("flip=2", "probability"), ("trivial=3", "takes no value"), ("crop=x", "needs a number")):
        with pytest.raises(TrainError, match=match):
            parse_augment(bad)
    # deterministic given the seed, on 1 and 3 channels
    for c in (1, 3):
        x = torch.randint(0, 256, (5, c, 12, 12), dtype=torch.uint8)
        full = create_augment("rrc,jitter,trivial,randaugment,crop,flip,erase=1")
        a, b = full(x, (0.5,) * c, (0.25,) * c, seed=7), full(x, (0.5,) * c, (0.25,) * c, seed=7)
        assert a.dtype == torch.float32 and a.shape == x.shape and torch.equal(a, b)
        assert not torch.equal(a, full(x, (0.5,) * c, (0.25,) * c, seed=8))


def test_cli_flags_reach_the_data():
    from hvs.cli import build_parser
    from hvs.cli._common import data_kwargs

    for argv in (
        ["train", "--out", "x", "--data-mode", "stream", "--workers", "3", "--cache-dir", "c"],
        [
            "evaluate",
            "--gallery-model",
            "g",
            "--query-model",
            "q",
            "--data-mode",
            "stream",
            "--workers",
            "3",
            "--cache-dir",
            "c",
        ],
        [
            "index",
            "build",
            "--gallery-model",
            "g",
            "--out",
            "faiss:i",
            "--data-mode",
            "stream",
            "--workers",
            "3",
            "--cache-dir",
            "c",
        ],
    ):
        args = build_parser(argv).parse_args(argv)
        assert data_kwargs(args) == {"data_mode": "stream", "workers": 3, "cache_dir": "c"}
    args = build_parser(["train"]).parse_args(["train", "--out", "x"])
    assert data_kwargs(args) == {} and args.data_mode is None
