"""The CLI chain train -> index build -> search, and its guards."""

import json

import numpy as np
import pytest
from PIL import Image

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.data import create_dataset
from hvs.embed import embed_images
from hvs.index import open_index
from hvs.search import Searcher

DATA = "synthetic:classes=6,train_per_class=24,test_per_class=8,size=12"
TRAIN = ["--data", DATA, "--epochs", "2", "--batch-size", "32", "--embed-dim", "16", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    assert main(["train", "--model", "cnn-small", "--out", str(root / "g"), *TRAIN]) == 0
    assert (
        main(
            [
                "train",
                "--model",
                "cnn-nano",
                "--out",
                str(root / "q"),
                "--gallery",
                str(root / "g"),
                "--compat",
                "bct",
                *TRAIN,
            ]
        )
        == 0
    )
    assert main(["train", "--model", "cnn-nano", "--out", str(root / "q-indep"), *TRAIN]) == 0
    assert (
        main(
            [
                "index",
                "build",
                "--gallery-model",
                str(root / "g"),
                "--data",
                DATA,
                "--out",
                str(root / "idx"),
                "--no-progress",
            ]
        )
        == 0
    )
    data = create_dataset(DATA)
    images = []
    for i in range(3):
        path = root / f"query{i}.png"
        Image.fromarray(data.query.images[i, 0].numpy()).save(path)
        images.append(path)
    return root, data, images


def test_search_returns_exact_top_k(setup, capsys):
    root, data, images = setup
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "--index",
                str(root / "idx"),
                "--query-model",
                str(root / "q"),
                "-k",
                "5",
                "--json",
                *map(str, images),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 and all(len(r["results"]) == 5 for r in out)
    # brute force: the same query images embedded by the query model against all gallery embeddings
    q_model, q_card = ckpt.load_model(root / "q")
    g_model, g_card = ckpt.load_model(root / "g")
    q = embed_images(q_model, data.query.images[:3], q_card.mean, q_card.std).numpy()
    g = embed_images(g_model, data.gallery.images, g_card.mean, g_card.std).numpy()
    scores = q @ g.T
    for row, result in zip(scores, out):
        expected = np.argsort(-row, kind="stable")[:5]
        assert [h["id"] for h in result["results"]] == expected.tolist()
        assert np.allclose([h["score"] for h in result["results"]], row[expected], atol=1e-4)
        assert result["results"][0]["label"] == data.classes[int(data.gallery.labels[expected[0]])]


def test_incompatible_query_model_is_refused(setup, capsys):
    root, _, images = setup
    capsys.readouterr()
    args = ["search", "--index", str(root / "idx"), "--query-model", str(root / "q-indep"), str(images[0])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "trained for gallery fingerprint none (independent)" in err and "--force" in err and "\n" not in err
    assert main(args + ["--force"]) == 0
    assert "warning:" in capsys.readouterr().out


def test_dimension_mismatch_is_refused(setup, tmp_path, capsys):
    root, _, images = setup
    assert (
        main(
            ["train", "--model", "cnn-nano", "--out", str(tmp_path / "q8"), *TRAIN, "--epochs", "1", "--embed-dim", "8"]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["search", "--index", str(root / "idx"), "--query-model", str(tmp_path / "q8"), str(images[0])]) == 2
    assert "query model embeds 8-d vectors but the index holds 16-d vectors" in capsys.readouterr().err


def test_add_remove_info(setup, tmp_path, capsys):
    root, data, images = setup
    idx = f"faiss:{tmp_path / 'idx2'}"
    assert (
        main(["index", "build", "--gallery-model", str(root / "g"), "--data", DATA, "--out", idx, "--no-progress"]) == 0
    )
    n = len(data.gallery)
    capsys.readouterr()
    assert (
        main(["index", "add", "--index", idx, "--gallery-model", str(root / "g"), "--label", "new", str(images[0])])
        == 0
    )
    assert f"added ids {n}" in capsys.readouterr().out
    # homogeneous search with the gallery model itself finds the added image at similarity 1
    hits = Searcher(idx, root / "g").search_files([images[0]], k=1)[0]
    assert hits[0]["id"] == n and hits[0]["label"] == "new" and hits[0]["score"] > 0.999
    assert main(["index", "remove", "--index", idx, str(n)]) == 0
    with open_index(idx) as index:
        assert len(index) == n
        assert n not in index.search(np.ones((1, 16), dtype=np.float32), k=n)[1]
    # adding with a different gallery model is refused: its vectors would live in another space
    assert (
        main(["index", "add", "--index", idx, "--gallery-model", str(root / "q"), "--label", "x", str(images[0])]) == 2
    )
    assert "is not the gallery model that built this index" in capsys.readouterr().err


def test_info_prints_the_sidecar(setup, capsys):
    root, _, _ = setup
    capsys.readouterr()
    assert main(["index", "info", "--index", str(root / "idx")]) == 0
    info = json.loads(capsys.readouterr().out)
    g_card = ckpt.read_card(root / "g")
    text = json.dumps(info)
    assert g_card.fingerprint in text and '"image_size": 12' in text


def test_corrupt_image_is_a_one_line_error(setup, tmp_path, capsys):
    root, _, _ = setup
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["search", "--index", str(root / "idx"), "--query-model", str(root / "q"), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.png" in err and "\n" not in err


def test_index_without_a_recorded_gallery_model_is_refused(setup, tmp_path):
    root, _, images = setup
    spec = f"faiss:{tmp_path / 'bare'}"
    with open_index(spec, create=True, dim=16) as index:  # made by hand: no gallery model in the sidecar
        index.add(np.eye(16, dtype=np.float32))
    with pytest.raises(ValueError, match="no recorded fingerprint"):
        Searcher(spec, root / "q")
    assert Searcher(spec, root / "q", force=True).warning
    assert (
        main(["index", "add", "--index", spec, "--gallery-model", str(root / "g"), "--label", "x", str(images[0])]) == 2
    )


def test_add_defaults_to_the_recorded_gallery_model(setup, tmp_path, capsys):
    """`hvs index add` and POST /gallery share hvs.gallery: without --gallery-model the index's own
    gallery model embeds the images; labels are one for all or one per image."""
    import shutil

    from hvs.gallery import add_images

    root, data, images = setup
    shutil.copytree(root / "idx", tmp_path / "idx")
    idx = str(tmp_path / "idx")  # a bare folder, as for search
    n = len(data.gallery)
    assert main(["index", "add", "--index", idx, "--label", "a", "--label", "b", *map(str, images)]) == 2
    assert "3 images but 2 labels" in capsys.readouterr().err
    assert main(["index", "add", "--index", idx, "--label", "new", *map(str, images[:2])]) == 0
    assert f"added ids {n}, {n + 1}" in capsys.readouterr().out
    with open_index(idx) as index:
        assert [r["label"] for r in index.records([n, n + 1])] == ["new", "new"]
        assert add_images(index, [images[2]], ["x"]).tolist() == [n + 2]  # the library call itself
    hits = Searcher(idx, root / "g").search_files(images, k=1)
    assert [h[0]["id"] for h in hits] == [n, n + 1, n + 2] and all(h[0]["score"] > 0.999 for h in hits)
