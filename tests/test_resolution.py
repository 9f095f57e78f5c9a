"""Resolution asymmetry: a query model reading 16 px images against a gallery model reading 32 px.

Trained (``hvs train --image-size 16``), evaluated, searched with image files, served and
exported, each side reading images at its own size; the pairing rule allows different sizes but
not different channels; FLOPs are counted at each side's own size."""

import io

import pytest
import torch
from PIL import Image

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.compat import CompatError, GallerySide, Preprocessing, QuerySide, check_pair
from hvs.data import create_dataset
from hvs.embed import resize_images
from hvs.models.cost import count_flops
from hvs.train import TrainConfig, TrainError, train

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6"
G_SIZE, Q_SIZE = 32, 16


def png_of(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    data = create_dataset(SPEC, image_size=G_SIZE)
    common = dict(data=SPEC, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32, lr=0.05)
    train(TrainConfig(out=str(root / "g"), **common), data=data, progress=False, log=lambda _: None)
    argv = ["train", "--data", SPEC, "--model", "cnn-nano", "--embed-dim", "16", "--epochs", "1"]
    argv += ["--batch-size", "32", "--lr", "0.05", "--gallery-model", str(root / "g"), "--compat", "bct"]
    assert main([*argv, "--image-size", str(Q_SIZE), "--out", str(root / "q"), "--no-progress"]) == 0
    from hvs.search import build_gallery_index

    build_gallery_index(root / "g", SPEC, f"faiss:{root / 'idx'}", progress=False)
    return root, data


def test_resize_images_is_one_antialiased_resize():
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    assert resize_images(x, 32) is x and resize_images(x, None) is x
    small = resize_images(x, 16)
    assert small.dtype == torch.uint8 and small.shape == (3, 1, 16, 16)
    # antialiased: a 2x downscale of noise averages it (a point sampler would keep its spread)
    assert small.float().std() < 0.8 * x.float().std()
    assert abs(small.float().mean() - x.float().mean()) < 3
    flat = torch.full((1, 3, 20, 20), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(flat, 10), torch.full((1, 3, 10, 10), 77, dtype=torch.uint8))
    f = torch.randn(2, 1, 32, 32)
    assert resize_images(f, 16).dtype == torch.float32 and resize_images(f, 16).shape == (2, 1, 16, 16)
    assert resize_images(x[:0], 16).shape == (0, 1, 16, 16)


def test_pairing_rule_allows_sizes_refuses_channels():
    g = GallerySide("ggg", 16, Preprocessing(1, 32), model="resnet8")
    q = QuerySide("cnn-nano", "qqq", "ggg", 16, Preprocessing(1, 16))
    assert check_pair(q, g) is None
    with pytest.raises(CompatError, match=r"query model reads 3x16px images but the gallery model reads 1x32px images"):
        check_pair(QuerySide("cnn-nano", "qqq", "ggg", 16, Preprocessing(3, 16)), g)
    # writing gallery vectors: the very model (and so its size) that made them
    writer = QuerySide("resnet8", "ggg", None, 16, Preprocessing(1, 16), role="gallery", label="gallery model")
    with pytest.raises(CompatError, match="gallery model reads 1x16px images"):
        check_pair(writer, g, same_model=True)


def test_query_model_records_its_own_size(world):
    root, _ = world
    q, g = ckpt.read_card(root / "q"), ckpt.read_card(root / "g")
    assert (q.image_size, g.image_size) == (Q_SIZE, G_SIZE) and q.compatible_with["fingerprint"] == g.fingerprint


def test_evaluate_reads_each_side_at_its_size_and_costs_it_there(world):
    from hvs.evaluate import evaluate, format_report

    root, _ = world
    r = evaluate(root / "g", root / "q", SPEC, n_boot=20, latency=False)
    cost = r["cost"]
    q_model, _ = ckpt.load_model(root / "q")
    g_model, _ = ckpt.load_model(root / "g")
    assert (cost["gallery"]["image_size"], cost["query"]["image_size"]) == (G_SIZE, Q_SIZE)
    assert cost["query"]["flops"] == count_flops(q_model, (1, Q_SIZE, Q_SIZE))
    assert cost["gallery"]["flops"] == count_flops(g_model, (1, G_SIZE, G_SIZE))
    # the same query net at 16 px costs about a quarter of what it costs at 32 px
    assert cost["query"]["flops"] < 0.4 * count_flops(q_model, (1, G_SIZE, G_SIZE))
    assert cost["ratio_gallery_over_query"]["flops"] == pytest.approx(cost["gallery"]["flops"] / cost["query"]["flops"])
    assert 0 <= r["metrics"]["query->gallery"]["recall@1"] <= 1
    assert "gallery at 32px, query at 16px" in format_report(r)


def test_search_files_decodes_at_the_query_size(world, tmp_path):
    from hvs.search import Searcher

    root, data = world
    files = []
    for i in range(3):
        files.append(tmp_path / f"q{i}.png")
        files[-1].write_bytes(png_of(data.query.images[i]))  # 32 px files
    s = Searcher(f"faiss:{root / 'idx'}", root / "q")
    assert s.load(files).shape == (3, 1, Q_SIZE, Q_SIZE)
    hits = s.search_files(files, k=4)
    s.index.close()
    assert [len(h) for h in hits] == [4, 4, 4]


def test_serve_decodes_uploads_at_the_query_size(world):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from hvs.serve import create_app

    root, data = world
    client = TestClient(create_app(f"faiss:{root / 'idx'}", root / "q", token=""))
    r = client.post("/search?k=3", files={"image": ("q.png", png_of(data.query.images[0]), "image/png")})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


def test_onnx_export_keeps_the_query_size(world, tmp_path):
    from hvs.export import check_export, export_onnx
    from hvs.search import Searcher

    root, data = world
    report = export_onnx(root / "q", tmp_path / "q.onnx")
    assert report["input"] == [None, 1, Q_SIZE, Q_SIZE]
    check = check_export(report, root / "g", SPEC, latency=False)
    torch_row, onnx_row = check["rows"]["torch"], check["rows"]["onnx"]
    assert abs(torch_row["map"] - onnx_row["map"]) < 0.05
    s = Searcher(f"faiss:{root / 'idx'}", tmp_path / "q.onnx")
    assert s.encoder.preprocessing["image_size"] == Q_SIZE
    assert len(s.search_images(resize_images(data.query.images[:2], Q_SIZE), k=2)[0]) == 2
    s.index.close()


def test_query_size_larger_than_the_data_is_refused(world, tmp_path):
    root, data = world
    cfg = TrainConfig(
        out=str(tmp_path / "q64"), data=SPEC, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32,
        gallery=str(root / "g"), compat=["bct"], image_size=64,
    )  # fmt: skip
    with pytest.raises(TrainError, match="--image-size 64 is larger than the data's 32px images"):
        train(cfg, data=data, progress=False, log=lambda _: None)
    assert not (tmp_path / "q64").exists()


def test_gallery_side_resized_down_when_the_query_reads_larger_images(world, tmp_path):
    """The data is decoded at the larger size (48 px for the query) and the frozen gallery model's
    inputs (class means for BCT, the batch for l2) are resized to its own 32 px."""
    from hvs.evaluate import evaluate

    root, _ = world
    cfg = TrainConfig(
        out=str(tmp_path / "q48"), data=SPEC, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32,
        gallery=str(root / "g"), compat=["bct", "l2=0.5"], image_size=48,
    )  # fmt: skip
    logs = []
    card = train(cfg, progress=False, log=logs.append)
    assert card.image_size == 48 and any("query model reads 48px images, the gallery model 32px" in m for m in logs)
    r = evaluate(root / "g", tmp_path / "q48", SPEC, n_boot=10, latency=False)
    assert r["cost"]["query"]["image_size"] == 48 and r["n_query"] == 18
