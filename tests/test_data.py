"""Tests for hvs.data: every source on a tiny fixture written into tmp_path, plus bad input.

No real data is read except Fashion-MNIST from the Debian package when it is installed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hvs.data import (
    DataError,
    DataWarning,
    ImageError,
    RetrievalData,
    Split,
    channel_stats,
    create_dataset,
    list_sources,
    load_image,
    register_source,
    to_float,
    validate,
)
from hvs.data import fashion_mnist as fm
from hvs.data.registry import _SOURCES
from hvs.data.splits import closed_split, open_split, query_gallery_split

# --------------------------------------------------------------------------- fixture builders

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def write_image(path, size=(12, 10), color=(128, 64, 32), fmt=None, seed=0):
    """A small image: ``color`` plus a little seeded noise (so JPEG/PNG files differ)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, np.int16) + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_imagefolder(root, classes=("cat", "dog", "fox"), per_class=5, corrupt=True):
    for c, cls in enumerate(classes):
        for i in range(per_class):
            ext = ".png" if i % 2 else ".jpg"
            write_image(os.path.join(root, cls, f"{i:02d}{ext}"), color=(40 * c, 100, 200 - 40 * c), seed=c * 100 + i)
    if corrupt:
        with open(os.path.join(root, classes[0], "zz_bad.jpg"), "wb") as f:
            f.write(b"this is not a jpeg")
        with open(os.path.join(root, classes[0], "notes.txt"), "w") as f:
            f.write("ignored: not an image ending")
    return str(root)


def make_idx_dir(root, n_train_per_class=3, n_test_per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # lets tests check that images travel with their labels
        fm.write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), images)
        fm.write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), labels)
    return str(root)


def df2_json(path, source, pair_id, items):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    anno = {"source": source, "pair_id": pair_id}
    for k, (style, box) in enumerate(items, start=1):
        anno[f"item{k}"] = {
            "bounding_box": list(box),
            "style": style,
            "category_id": 1,
            "category_name": "short sleeve top",
            "scale": 2,
            "occlusion": 1,
            "zoom_in": 1,
            "viewpoint": 2,
            "landmarks": [],
            "segmentation": [],
        }
    with open(path, "w") as f:
        json.dump(anno, f)


def df2_image(path, boxes_colors, size=(48, 40)):
    """JPEG with each box painted in its colour (grey elsewhere)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, (128, 128, 128))
    for box, color in boxes_colors:
        img.paste(RGB[color], tuple(int(v) for v in box))
    img.save(path, quality=95)


def make_deepfashion2(root, validation=True):
    """Images in the released layout. Train: pairs 1 and 2 (user + shop each), a style-0 item,
    a degenerate box. Validation: pair 10 (user + shop, two styles on the user photo), a shop
    style-0 distractor, and pair 11 (shop only)."""
    A, B = (2, 2, 22, 30), (24, 4, 46, 36)
    spec = {
        "train": [
            ("000001", "user", 1, [(1, A, "red"), (0, B, "blue")]),
            ("000002", "shop", 1, [(1, A, "red")]),
            ("000003", "user", 2, [(1, B, "green")]),
            ("000004", "shop", 2, [(1, B, "green"), (1, (10, 10, 10, 20), "white")]),
            ("000005", "user", 3, [(1, A, "blue")]),
            ("000006", "shop", 3, [(1, A, "blue")]),
        ],
        "validation": [
            ("000001", "user", 10, [(1, A, "red"), (2, B, "green")]),
            ("000002", "shop", 10, [(1, A, "red"), (0, B, "blue")]),
            ("000003", "shop", 11, [(1, B, "white")]),
            ("000004", "user", 11, [(0, A, "blue")]),  # style 0 user item: not a query
        ],
    }
    for folder, images in spec.items():
        if folder == "validation" and not validation:
            continue
        for image_id, source, pair_id, items in images:
            df2_json(
                os.path.join(root, folder, "annos", f"{image_id}.json"), source, pair_id, [(s, b) for s, b, _ in items]
            )
            df2_image(
                os.path.join(root, folder, "image", f"{image_id}.jpg"), [(b, c) for _, b, c in items if b[2] > b[0]]
            )
    return str(root)


def mean_color(img: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in img.float().mean(dim=(1, 2)).round())


def close_to(color, name, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(color, RGB[name]))


# --------------------------------------------------------------------------- images.py


def test_load_image_resizes_shorter_side_then_center_crops(tmp_path):
    img = Image.new("RGB", (30, 10))
    for x0, color in ((0, "red"), (10, "green"), (20, "blue")):
        img.paste(RGB[color], (x0, 0, x0 + 10, 10))
    img.save(tmp_path / "strip.png")
    out = load_image(tmp_path / "strip.png", 10)
    assert out.dtype == torch.uint8 and out.shape == (3, 10, 10)
    assert close_to(mean_color(out), "green", tol=2)  # the center third survives the crop
    # bbox crop (top-left origin) and clipping of a box that runs off the image
    assert close_to(mean_color(load_image(tmp_path / "strip.png", 4, bbox=(20, 0, 30, 10))), "blue", 2)
    assert close_to(mean_color(load_image(tmp_path / "strip.png", 4, bbox=(-5, -5, 10, 99))), "red", 2)
    gray = load_image((tmp_path / "strip.png").read_bytes(), 8, channels=1)
    assert gray.shape == (1, 8, 8)
    assert load_image(tmp_path / "strip.png", None).shape == (3, 10, 30)


def test_load_image_large_jpeg_draft_keeps_box_coordinates(tmp_path):
    img = Image.new("RGB", (800, 600), RGB["white"])
    img.paste(RGB["red"], (600, 100, 700, 300))
    img.save(tmp_path / "big.jpg", quality=90)
    out = load_image(tmp_path / "big.jpg", 16, bbox=(600, 100, 700, 300))
    assert close_to(mean_color(out), "red", tol=25)
    full = load_image(tmp_path / "big.jpg", 16)
    assert full.shape == (3, 16, 16)


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageError, match="bad.png"):
        load_image(tmp_path / "bad.png", 8)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good.getvalue()[:200])
    with pytest.raises(ImageError, match=r"trunc\.jpg: .*"):
        load_image(tmp_path / "trunc.jpg", 8)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", 8)
    write_image(tmp_path / "ok.png")
    with pytest.raises(ImageError, match="degenerate bounding box"):
        load_image(tmp_path / "ok.png", 8, bbox=(5, 5, 5, 9))
    with pytest.raises(ImageError, match="degenerate"):
        load_image(tmp_path / "ok.png", 8, bbox=(50, 50, 60, 60))  # entirely outside
    with pytest.raises(DataError, match="channels"):
        load_image(tmp_path / "ok.png", 8, channels=2)


def test_load_image_decompression_bomb(tmp_path, monkeypatch):
    write_image(tmp_path / "bomb.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 * 100 → error, not warning
    with pytest.raises(ImageError, match="DecompressionBombError"):
        load_image(tmp_path / "bomb.png", 8)


def test_to_float_and_channel_stats():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 1.0)
    y = to_float(x, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert y.dtype == torch.float32 and torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(to_float(x[0], (0.5,), (0.5,)), x[0].float() / 127.5 - 1, atol=1e-6)
    with pytest.raises(DataError):
        to_float(x, (0.1, 0.2), (1.0, 1.0))
    m, s = channel_stats(x)
    xf = x.double() / 255
    assert np.allclose(m, xf.mean(dim=(0, 2, 3)).numpy(), atol=1e-4)
    assert np.allclose(s, xf.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-4)


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, (1, 0, 0)),
        (2, (1, 0, 1)),
        (3, (1, 1, 1)),
        (4, (2, 1, 1)),
        (5, (3, 1, 1)),
        (10, (6, 2, 2)),
        (100, (60, 20, 20)),
    ],
)
def test_closed_split_rule(n, expected):
    tr, q, g = closed_split(torch.zeros(n, dtype=torch.long), seed=3)
    assert (len(tr), len(q), len(g)) == expected
    assert sorted(torch.cat([tr, q, g]).tolist()) == list(range(n))


def test_open_and_query_gallery_split_are_seeded_and_disjoint():
    labels = torch.arange(6).repeat_interleave(5)
    tr, q, g = open_split(labels, seed=1)
    assert set(labels[tr].tolist()).isdisjoint(labels[torch.cat([q, g])].tolist())
    assert len(set(labels[tr].tolist())) == 3
    assert all(torch.equal(a, b) for a, b in zip((tr, q, g), open_split(labels, seed=1)))
    q2, g2 = query_gallery_split(labels, seed=0)
    assert len(q2) == 6 * 2 and len(g2) == 6 * 3  # the gallery takes the odd item


# --------------------------------------------------------------------------- registry


def test_registry_lists_sources_and_rejects_unknown_prefixes():
    assert {"fashion-mnist", "imagefolder", "csv", "deepfashion2", "synthetic"} <= set(list_sources())
    with pytest.raises(DataError, match=r"unknown data source 'nope'.*imagefolder:DIR"):
        create_dataset("nope:x")
    with pytest.raises(DataError, match="pick a prefix"):
        create_dataset("/some/folder")
    with pytest.raises(DataError, match="needs an argument: imagefolder:DIR"):
        create_dataset("imagefolder")
    with pytest.raises(DataError, match="unknown protocol"):
        create_dataset("synthetic", protocol="half-open")
    with pytest.raises(DataError, match="image_size"):
        create_dataset("synthetic", image_size=0)


def test_register_custom_source_and_contract_checks():
    def tiny(arg, *, protocol, image_size, channels, strict, seed, unseen=False):
        x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
        y = torch.tensor([0, 0, 1, 1])
        q = torch.tensor([2, 2, 2, 2]) if unseen else y
        return RetrievalData(
            "tiny", Split(x, y), Split(x, q, role="query"), Split(x, q, role="gallery"), ["a", "b", "c"], protocol
        )

    register_source("tiny-test", tiny)
    try:
        assert "tiny-test" in list_sources()
        assert create_dataset("tiny-test").name == "tiny-test"
        with pytest.raises(DataError, match="closed protocol but 1 query/gallery class.*'c'"):
            create_dataset("tiny-test", unseen=True)
        assert create_dataset("tiny-test", protocol="open", unseen=True).protocol == "open"
        with pytest.raises(ValueError, match="already registered"):
            register_source("tiny-test", lambda *a, **k: None)
        with pytest.raises(DataError, match="takes no argument"):
            create_dataset("tiny-test:x")
    finally:
        _SOURCES.pop("tiny-test", None)


def test_validate_names_empty_split():
    x = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0, 0])
    empty = Split(x[:0], y[:0], role="gallery")
    with pytest.raises(DataError, match="gallery split is empty"):
        validate(RetrievalData("d", Split(x, y), Split(x, y, role="query"), empty, ["a"]))


# --------------------------------------------------------------------------- fashion-mnist


def test_idx_roundtrip_and_bad_files(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    fm.write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), arr)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "plain").write_bytes(raw)  # uncompressed IDX is read too
    assert np.array_equal(fm.read_idx(tmp_path / "plain"), arr)
    i32 = np.array([1, -2, 70000], dtype=np.int32)
    fm.write_idx(tmp_path / "i.gz", i32)
    assert np.array_equal(fm.read_idx(tmp_path / "i.gz"), i32)

    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(DataError, match=r"short\.gz: truncated"):
        fm.read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:30])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt gzip"):
        fm.read_idx(tmp_path / "cut.gz")
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(DataError, match=r"magic\.gz: not an IDX file"):
        fm.read_idx(tmp_path / "magic.gz")


def test_fashion_mnist_closed_from_dir(tmp_path):
    root = make_idx_dir(tmp_path / "fm")
    d = create_dataset(f"fashion-mnist:{root}")
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot" and len(d.classes) == 10
    assert (len(d.train), len(d.query), len(d.gallery)) == (30, 20, 20)
    assert d.train.images.shape[1:] == (1, 28, 28) and d.protocol == "closed"
    # stratified 50/50 per class, images stay with their labels
    assert torch.equal(torch.bincount(d.query.labels, minlength=10), torch.full((10,), 2))
    for split in (d.train, d.query, d.gallery):
        assert torch.equal(split.images[:, 0, 0, 0].long(), split.labels)
    assert d.query.sources[0].startswith("fashion-mnist:test:")
    assert set(d.query.sources).isdisjoint(d.gallery.sources)
    same = create_dataset(f"fashion-mnist:{root}")
    assert same.query.sources == d.query.sources
    other = create_dataset(f"fashion-mnist:{root}", seed=1)
    assert other.query.sources != d.query.sources
    # the cached arrays are not shared with (and so not corrupted through) the returned splits
    d.train.images.zero_()
    assert create_dataset(f"fashion-mnist:{root}").train.images.float().mean() > 0


def test_fashion_mnist_open_resize_and_channels(tmp_path):
    root = make_idx_dir(tmp_path / "fm")
    d = create_dataset(f"fashion-mnist:{root}", protocol="open", image_size=32, channels=3)
    assert set(d.train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(torch.cat([d.query.labels, d.gallery.labels]).tolist()) == {5, 6, 7, 8, 9}
    assert d.train.images.shape[1:] == (3, 32, 32) and len(d.mean) == 3


def test_fashion_mnist_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such directory"):
        create_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")
    root = make_idx_dir(tmp_path / "fm")
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: file not found"):
        create_dataset(f"fashion-mnist:{root}")
    root = make_idx_dir(tmp_path / "fm2")
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    data = gzip.decompress(open(path, "rb").read())
    with gzip.open(path, "wb") as f:
        f.write(data[:1000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated"):
        create_dataset(f"fashion-mnist:{root}")
    # not installed: the error says how to get it
    monkeypatch.setattr(fm.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no dpkg")))
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "none"))
    fm.default_dir.cache_clear()
    try:
        with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*fashion-mnist:DIR"):
            create_dataset("fashion-mnist")
    finally:
        fm.default_dir.cache_clear()


def test_fashion_mnist_installed_package():
    try:
        folder = fm.default_dir()
    except DataError:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    d = create_dataset("fashion-mnist")
    assert (len(d.train), len(d.query), len(d.gallery)) == (60000, 5000, 5000)
    assert abs(d.mean[0] - 0.2860) < 1e-3 and abs(d.std[0] - 0.3530) < 1e-3
    assert torch.equal(torch.bincount(d.query.labels), torch.full((10,), 500))
    assert os.path.isdir(folder)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_closed_skips_corrupt_and_warns(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    with pytest.warns(DataWarning, match="skipped 1 item"):
        d = create_dataset(f"imagefolder:{root}", image_size=16)
    assert d.classes == ["cat", "dog", "fox"]
    assert len(d.skipped) == 1 and d.skipped[0].startswith(os.path.join(root, "cat", "zz_bad.jpg") + ": ")
    assert (len(d.train), len(d.query), len(d.gallery)) == (9, 3, 3)  # 5 per class: 3/1/1
    assert d.train.images.shape[1:] == (3, 16, 16) and d.train.images.dtype == torch.uint8
    for split in (d.query, d.gallery):
        assert sorted(split.labels.tolist()) == [0, 1, 2]
    assert all(s.startswith(root) for s in d.train.sources)
    assert "skipped 1 unreadable" in d.summary()
    with pytest.warns(DataWarning):
        d2 = create_dataset(f"imagefolder:{root}", image_size=16, channels=1, seed=5)
    assert d2.train.images.shape[1] == 1 and len(d2.mean) == 1


def test_imagefolder_strict_and_missing(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"zz_bad\.jpg"):
        create_dataset(f"imagefolder:{root}", strict=True)
    with pytest.raises(DataError, match="no such directory"):
        create_dataset(f"imagefolder:{tmp_path / 'missing'}")
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(DataError, match="no images found"):
        create_dataset(f"imagefolder:{tmp_path / 'empty'}")


def test_imagefolder_open_and_empty_split(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=4, corrupt=False)
    d = create_dataset(f"imagefolder:{root}", protocol="open", image_size=8)
    train_cls = set(d.train.labels.tolist())
    test_cls = set(torch.cat([d.query.labels, d.gallery.labels]).tolist())
    assert len(train_cls) == 2 and train_cls.isdisjoint(test_cls) and len(test_cls) == 2
    assert (len(d.query), len(d.gallery)) == (4, 4)
    one = make_imagefolder(tmp_path / "one", classes=("a",), per_class=1, corrupt=False)
    with pytest.raises(DataError, match="query split is empty"):
        create_dataset(f"imagefolder:{one}")


# --------------------------------------------------------------------------- csv


def write_csv(path, rows, sep=","):
    with open(path, "w") as f:
        f.write("\n".join(sep.join(r) for r in rows) + "\n")
    return str(path)


def test_csv_with_split_and_bbox(tmp_path):
    img = Image.new("RGB", (20, 10), RGB["red"])
    img.paste(RGB["blue"], (10, 0, 20, 10))
    os.makedirs(tmp_path / "img")
    img.save(tmp_path / "img" / "two.png")
    rows = [
        ["path", "label", "split", "bbox", "note"],
        ["img/two.png", "redthing", "train", "0 0 10 10", "x"],
        ["img/two.png", "bluething", "train", "10 0 20 10", ""],
        ["img/two.png", "redthing", "query", "0 0 9 10", ""],
        ["img/two.png", "bluething", "gallery", "11 1 20 10", ""],
        [str(tmp_path / "img" / "two.png"), "redthing", "Gallery", "", ""],
    ]
    for sep in (",", "\t"):
        d = create_dataset(f"csv:{write_csv(tmp_path / 'm.csv', rows, sep)}", image_size=8)
        assert d.classes == ["bluething", "redthing"]
        assert (len(d.train), len(d.query), len(d.gallery)) == (2, 1, 2)
        assert close_to(mean_color(d.train.images[0]), "red", 2)
        assert close_to(mean_color(d.train.images[1]), "blue", 2)
        assert d.train.labels.tolist() == [1, 0]
        assert d.duplicates == []  # crops of one photo are distinct items


def test_csv_without_split_column_uses_protocol(tmp_path):
    root = make_imagefolder(tmp_path, classes=("a", "b", "c", "d"), per_class=3, corrupt=False)
    rows = [["label", "path"]] + [[c, f"{c}/{i:02d}{'.png' if i % 2 else '.jpg'}"] for c in "abcd" for i in range(3)]
    f = write_csv(tmp_path / "m.csv", rows)
    closed = create_dataset(f"csv:{f}", image_size=8)
    assert (len(closed.train), len(closed.query), len(closed.gallery)) == (4, 4, 4)
    opened = create_dataset(f"csv:{f}", image_size=8, protocol="open")
    assert set(opened.train.labels.tolist()).isdisjoint(opened.query.labels.tolist())
    assert os.path.isdir(root)


def test_csv_bad_inputs(tmp_path):
    write_image(tmp_path / "a.png")
    f = write_csv(tmp_path / "m.csv", [["path", "lbl"], ["a.png", "x"]])
    with pytest.raises(DataError) as err:
        create_dataset(f"csv:{f}")
    assert str(err.value) == f"csv:{f}: missing column 'label' (have: path, lbl)"
    f = write_csv(tmp_path / "m.csv", [["path", "label", "split"], ["a.png", "x", "train"], ["a.png", "x", "test"]])
    with pytest.raises(DataError, match=r"line 3: unknown split 'test'"):
        create_dataset(f"csv:{f}")
    for bad in ("../a.png", "sub/../../a.png", "/etc/passwd"):
        f = write_csv(tmp_path / "m.csv", [["path", "label"], ["a.png", "x"], [bad, "y"]])
        with pytest.raises(DataError, match=r"line 3: path .* resolves outside"):
            create_dataset(f"csv:{f}")
    f = write_csv(tmp_path / "m.csv", [["path", "label", "bbox"], ["a.png", "x", "1 2 3"]])
    with pytest.raises(DataError, match="line 2: bbox '1 2 3'"):
        create_dataset(f"csv:{f}")
    with pytest.raises(DataError, match="no such file"):
        create_dataset(f"csv:{tmp_path / 'nope.csv'}")
    # a manifest whose query classes were never trained on is not a closed-set dataset
    f = write_csv(
        tmp_path / "m.csv",
        [["path", "label", "split"], ["a.png", "x", "train"], ["a.png", "y", "query"], ["a.png", "y", "gallery"]],
    )
    with pytest.raises(DataError, match="protocol='open'"):
        create_dataset(f"csv:{f}")
    assert create_dataset(f"csv:{f}", protocol="open").protocol == "open"
    # unreadable image listed in a manifest: skipped, or an error naming it with strict
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    f = write_csv(tmp_path / "m.csv", [["path", "label"]] + [["a.png", "x"]] * 3 + [["broken.jpg", "x"]])
    with pytest.warns(DataWarning):
        d = create_dataset(f"csv:{f}")
    assert d.skipped == [f"{tmp_path / 'broken.jpg'}: " + d.skipped[0].split(": ", 1)[1]]
    with pytest.raises(DataError, match=r"broken\.jpg"):
        create_dataset(f"csv:{f}", strict=True)


# --------------------------------------------------------------------------- deepfashion2


def test_deepfashion2_consumer_to_shop(tmp_path):
    root = make_deepfashion2(tmp_path / "df2")
    with pytest.warns(DataWarning, match="skipped 1"):
        d = create_dataset(f"deepfashion2:{root}", image_size=16)
    assert d.protocol == "open"
    # train: style > 0 items of train/, degenerate box skipped and listed
    assert len(d.train) == 6 and len(d.skipped) == 1 and "000004.jpg#item2: degenerate" in d.skipped[0]
    assert {d.classes[i] for i in d.train.labels.tolist()} == {"1:1", "2:1", "3:1"}
    # query: user items with style > 0; gallery: every shop item, style 0 as a unique distractor
    q_names = [d.classes[i] for i in d.query.labels.tolist()]
    g_names = [d.classes[i] for i in d.gallery.labels.tolist()]
    assert sorted(q_names) == ["10:1", "10:2"]
    assert sorted(g_names) == ["10:1", "11:1", "distractor:000002:item2"]
    assert d.query.sources == ["validation/image/000001.jpg#item1", "validation/image/000001.jpg#item2"]
    assert set(d.classes[i] for i in d.train.labels.tolist()).isdisjoint(q_names + g_names)
    # a positive is same pair_id and same style: exactly one gallery match for "10:1"
    pos = d.query.labels[0] == d.gallery.labels
    assert int(pos.sum()) == 1
    # crops follow the boxes (top-left origin)
    assert close_to(mean_color(d.query.images[0]), "red")
    assert close_to(mean_color(d.query.images[1]), "green")
    assert close_to(mean_color(d.gallery.images[g_names.index("distractor:000002:item2")]), "blue")


def test_deepfashion2_without_validation_holds_out_pairs(tmp_path):
    root = make_deepfashion2(tmp_path / "df2", validation=False)
    with pytest.warns(DataWarning, match="degenerate bounding box"):
        d = create_dataset(f"deepfashion2:{root}", image_size=8, holdout=0.3)
    train_pairs = {d.classes[i].split(":")[0] for i in d.train.labels.tolist()}
    test_pairs = {d.classes[i].split(":")[0] for i in torch.cat([d.query.labels, d.gallery.labels]).tolist()}
    assert train_pairs and test_pairs and train_pairs.isdisjoint(test_pairs)
    with pytest.warns(DataWarning):
        again = create_dataset(f"deepfashion2:{root}", image_size=8, holdout=0.3)
    assert again.query.sources == d.query.sources


def test_deepfashion2_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        create_dataset(f"deepfashion2:{tmp_path / 'none'}")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="missing folder train/"):
        create_dataset(f"deepfashion2:{tmp_path / 'empty'}")
    root = make_deepfashion2(tmp_path / "df2")
    (tmp_path / "df2" / "validation" / "image" / "000003.jpg").write_bytes(b"corrupt")
    (tmp_path / "df2" / "train" / "annos" / "000009.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        d = create_dataset(f"deepfashion2:{root}", image_size=8)
    assert any("000009.json: unreadable annotation" in s for s in d.skipped)
    assert any(s.startswith(os.path.join(root, "validation", "image", "000003.jpg") + ": ") for s in d.skipped)
    assert len(d.gallery) == 2  # pair 11's only shop image was unreadable
    with pytest.raises(DataError, match=r"000009\.json|000004\.jpg#item2"):
        create_dataset(f"deepfashion2:{root}", strict=True)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_defaults_deterministic():
    d = create_dataset("synthetic")
    assert (len(d.train), len(d.query), len(d.gallery)) == (640, 80, 80)
    assert d.train.images.shape[1:] == (1, 32, 32) and len(d.classes) == 10
    assert torch.equal(d.train.images, create_dataset("synthetic").train.images)
    assert not torch.equal(d.train.images, create_dataset("synthetic", seed=1).train.images)
    # samples of one class vary (nuisances), yet resemble each other more than other classes
    x = to_float(d.train.images, d.mean, d.std).flatten(1)
    x = torch.nn.functional.normalize(x - x.mean(0), dim=1)
    sim = x @ x.T
    same = d.train.labels[:, None] == d.train.labels[None, :]
    assert sim[same].mean() > sim[~same].mean() + 0.1
    assert d.train.images.float().std(0).mean() > 10


def test_synthetic_options_and_open_protocol():
    d = create_dataset(
        "synthetic:classes=6,train_per_class=5,test_per_class=4,size=16,channels=3,seed=7,difficulty=0.2,noise=0.01",
        protocol="open",
    )
    assert d.train.images.shape == (15, 3, 16, 16) and (len(d.query), len(d.gallery)) == (6, 6)
    assert set(d.train.labels.tolist()).isdisjoint(d.query.labels.tolist() + d.gallery.labels.tolist())
    assert create_dataset("synthetic", image_size=12, classes=3).train.images.shape[-1] == 12
    with pytest.raises(DataError, match="bad option 'colour=1'"):
        create_dataset("synthetic:colour=1")
    with pytest.raises(DataError, match="classes must be an integer"):
        create_dataset("synthetic:classes=many")
    with pytest.raises(DataError, match="size=16 in the spec but 32 passed"):
        create_dataset("synthetic:size=16", image_size=32)


# --------------------------------------------------------------------------- every source


@pytest.fixture
def every_source(tmp_path):
    folder = make_imagefolder(tmp_path / "folder", corrupt=False)
    rows = [["path", "label"]] + [
        [os.path.relpath(os.path.join(folder, c, f), tmp_path), c]
        for c in sorted(os.listdir(folder))
        for f in sorted(os.listdir(os.path.join(folder, c)))
    ]
    return {
        "fashion-mnist": f"fashion-mnist:{make_idx_dir(tmp_path / 'fm')}",
        "imagefolder": f"imagefolder:{folder}",
        "csv": f"csv:{write_csv(tmp_path / 'm.csv', rows)}",
        "deepfashion2": f"deepfashion2:{make_deepfashion2(tmp_path / 'df2')}",
        "synthetic": "synthetic:classes=4,train_per_class=4,test_per_class=4",
        "kanji-fonts": f"kanji-fonts:{tmp_path / 'kf'},limit=12,max_faces=2",
    }


@pytest.mark.parametrize("source", sorted(n for n in _SOURCES if n != "tiny-test"))
def test_every_registered_source_meets_the_contract(source, every_source):
    if source == "kanji-fonts":
        from hvs.data import kanji_fonts

        kinds = {face.kind for face in kanji_fonts.discover_faces()[0]}
        if not {kanji_fonts.PRINT, kanji_fonts.HANDWRITING} <= kinds:
            pytest.skip("kanji-fonts needs one print and one handwriting CJK font installed (make setup)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        d = create_dataset(every_source[source], image_size=12, channels=3)
    validate(d)
    assert d.image_size == 12 and d.channels == 3
    for role in ("train", "query", "gallery"):
        split = d.split(role)
        assert split.role == role and split.images.dtype == torch.uint8
        assert split.sources is not None and len(split.sources) == len(split)
        assert int(split.labels.max()) < len(d.classes)
    if d.protocol == "closed":
        assert set(torch.cat([d.query.labels, d.gallery.labels]).tolist()) <= set(d.train.labels.tolist())
    img, label = d.train[0]
    assert img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1 and isinstance(label, int)


@pytest.mark.parametrize("source", sorted(n for n in _SOURCES if n != "tiny-test"))
def test_every_source_loads_one_split_alone_as_it_is_in_the_whole(source, every_source):
    """``splits=("gallery",)`` (what an index build asks for) gives the gallery of a full load,
    and nothing else; 1 and 3 channels alike (``in_chans`` of any model can be passed)."""
    if source == "kanji-fonts":
        from hvs.data import kanji_fonts

        kinds = {face.kind for face in kanji_fonts.discover_faces()[0]}
        if not {kanji_fonts.PRINT, kanji_fonts.HANDWRITING} <= kinds:
            pytest.skip("kanji-fonts needs one print and one handwriting CJK font installed (make setup)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        whole = create_dataset(every_source[source], image_size=12, channels=1)
        alone = create_dataset(every_source[source], image_size=12, channels=1, splits=("gallery",))
    assert alone.loaded == ("gallery",) and alone.train is None and alone.query is None
    assert torch.equal(alone.gallery.images, whole.gallery.images) and alone.gallery.sources == whole.gallery.sources
    assert alone.channels == 1 and alone.mean == () and "train not loaded" in alone.summary()
    with pytest.raises(DataError, match="the train split was not loaded"):
        alone.split("train")


# --------------------------------------------------------------------------- leaks, lazy splits


def _leaky(arg, *, protocol, image_size, channels, strict, seed, sources=True):
    """4 distinct images; query = 0, 1; gallery = 0 (same item), a copy of 1 under another name,
    2, 3, 3 (a row twice); train = 0, 1, 2, 3."""
    x = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([0, 1, 0, 1])
    names = [f"f{i}.png" for i in range(4)]

    def part(idx, role, src):
        return Split(x[idx], y[idx], src if sources else None, role)

    return RetrievalData(
        "leaky",
        part([0, 1, 2, 3], "train", names),
        part([0, 1], "query", names[:2]),
        part([0, 1, 2, 3, 3], "gallery", ["f0.png", "copy.png", "f2.png", "f3.png", "f3.png"]),
        ["a", "b"],
        protocol,
    )


def test_leaks_are_counted_per_kind_warned_and_refused_when_strict():
    from hvs.data.checks import find_duplicates

    register_source("leaky-test", _leaky)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = create_dataset("leaky-test")
        found = {dup.kind: dup.count for dup in find_duplicates(d)}
        assert found == {"gallery-item": 1, "query-gallery-item": 1, "query-gallery-pixels": 1}
        lines = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
        assert lines == d.duplicates and len(lines) == 3 and all("\n" not in m for m in lines)
        assert "1 query image(s) are pixel-identical to a gallery image, e.g. f1.png = copy.png" in lines[2]
        with pytest.raises(
            DataError,
            match=r"leaky-test: 1 gallery item\(s\) are listed more than once.*"
            r"\(and 2 more finding\(s\)\); refused in strict mode",
        ):
            create_dataset("leaky-test", strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            # without sources only pixels can tell: both query images are in the gallery
            blind = create_dataset("leaky-test", sources=False)
            assert [(d.kind, d.count) for d in find_duplicates(blind)] == [("query-gallery-pixels", 2)]
            # the gallery alone: no query to compare with, the repeated row is still found
            alone = create_dataset("leaky-test", splits=["gallery"])
            assert [(d.kind, d.count) for d in find_duplicates(alone)] == [("gallery-item", 1)]
    finally:
        _SOURCES.pop("leaky-test", None)


def test_bbox_crops_of_one_photo_are_not_duplicates(tmp_path):
    img = Image.new("RGB", (20, 10), RGB["red"])
    img.paste(RGB["blue"], (10, 0, 20, 10))
    img.save(tmp_path / "two.png")
    rows = [
        ["path", "label", "split", "bbox"],
        ["two.png", "r", "train", "0 0 10 10"],
        ["two.png", "b", "train", "10 0 20 10"],
        ["two.png", "r", "query", "0 0 9 10"],
        ["two.png", "b", "gallery", "11 1 20 10"],
        ["two.png", "r", "gallery", ""],
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        d = create_dataset(f"csv:{write_csv(tmp_path / 'm.csv', rows)}", image_size=8)
    assert d.duplicates == []


def test_csv_decodes_only_the_rows_of_the_splits_asked_for(tmp_path, monkeypatch):
    from hvs.data import images as images_module

    for i in range(6):
        write_image(tmp_path / f"{i}.png", seed=i)
    rows = [["path", "label", "split"]] + [
        [f"{i}.png", "ab"[i % 2], ("train", "train", "query", "query", "gallery", "gallery")[i]] for i in range(6)
    ]
    decoded = []
    real = images_module.load_image
    monkeypatch.setattr(
        images_module, "load_image", lambda src, *a, **k: decoded.append(os.path.basename(src)) or real(src, *a, **k)
    )
    d = create_dataset(f"csv:{write_csv(tmp_path / 'm.csv', rows)}", image_size=8, splits=("gallery",))
    assert decoded == ["4.png", "5.png"] and len(d.gallery) == 2
    with pytest.raises(DataError, match="splits must name some of train, query, gallery"):
        create_dataset(f"csv:{tmp_path / 'm.csv'}", splits=("test",))


def test_a_long_decode_says_what_it_decodes_on_a_terminal(tmp_path, monkeypatch):
    from hvs.data import images as images_module

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(images_module, "PROGRESS_MIN_ITEMS", 2)
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    images_module.load_images([(p, None) for p in paths], 8, 3, desc="decode csv:m.csv gallery")
    assert "decode csv:m.csv gallery" in term.getvalue() and "3/3" in term.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    images_module.load_images([(p, None) for p in paths[:1]], 8, 3, desc="decode csv:m.csv gallery")
    assert quiet.getvalue() == ""  # below the threshold: no bar


def test_an_imagefolder_class_folder_without_images_is_not_a_class(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "c"), per_class=3, corrupt=False)
    os.makedirs(os.path.join(root, "b", "sub"))  # sorts between a and c, holds nothing usable
    with open(os.path.join(root, "b", "sub", "notes.txt"), "w") as f:
        f.write("not an image")
    with pytest.warns(
        DataWarning,
        match=r"1 class folder\(s\) hold no images and are not used as "
        r"classes: .*/b$",
    ):
        d = create_dataset(f"imagefolder:{root}", image_size=8)
    assert d.classes == ["a", "c"] and sorted(set(d.train.labels.tolist())) == [0, 1]
