"""Adopting a gallery model hvs did not train (``hvs adopt``), end to end:

adopt an ONNX encoder the test exports itself -> build an index -> train BCT and l2 query models
for it -> evaluate -> search -> export; plus every bad input, each a one-line error with nothing
written."""

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.data import create_dataset

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


class Encoder(nn.Module):
    """A foreign image encoder: conv -> global pool -> linear (unnormalised output)."""

    def __init__(self, in_chans: int = 1, dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fc = nn.Linear(8, dim)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


class FeatureMap(nn.Module):  # its output is not a vector per image
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class VectorIn(nn.Module):  # its input is not an image tensor
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x)


def to_onnx(module: nn.Module, example: torch.Tensor, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["features"],
            dynamo=False,
            dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
        )


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def png_of(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The adopted ONNX gallery model (root/g), its index (root/idx), BCT and l2 query models."""
    from hvs.train import TrainConfig, train

    root = tmp_path_factory.mktemp("adopt")
    torch.manual_seed(0)
    to_onnx(Encoder(), torch.zeros(1, 1, 12, 12), root / "prod.onnx")
    assert main(["adopt", "onnx", "--onnx", str(root / "prod.onnx"), "--mean", "0.5", "--std", "0.25",
                 "--out", str(root / "g"), "--data", SPEC]) == 0  # fmt: skip
    assert main(["index", "build", "--gallery-model", str(root / "g"), "--data", SPEC,
                 "--out", f"faiss:{root / 'idx'}", "--no-progress"]) == 0  # fmt: skip
    data = create_dataset(SPEC)
    common = dict(data=SPEC, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32, lr=0.05)
    logs: list[str] = []
    for name, compat in (("q", "bct"), ("ql", "l2")):
        train(
            TrainConfig(out=str(root / name), gallery=str(root / "g"), compat=[compat], **common),
            data=data,
            progress=False,
            log=logs.append,
        )
    return root, data, logs


def test_adopted_folder_is_a_gallery_model_without_classifier(world):
    root, _, _ = world
    card = ckpt.read_card(root / "g")
    assert card.role == "gallery" and card.classes == [] and card.embed_dim == 16
    assert (card.in_chans, card.image_size, card.mean, card.std) == (1, 12, [0.5], [0.25])
    assert card.adopted["kind"] == "onnx" and card.adopted["source"] == str((root / "prod.onnx").resolve())
    assert card.fingerprint == ckpt.file_fingerprint(root / "g" / ckpt.ADOPTED_ONNX)
    assert card.adopted["sha256"].startswith(card.fingerprint)
    assert card.adopted["flops"] == 2 * 8 * 12 * 12 * 9 + 2 * 8 * 16  # conv + linear
    assert not (root / "g" / ckpt.CLASSIFIER).exists() and not (root / "g" / ckpt.WEIGHTS).exists()
    with pytest.raises(ckpt.CheckpointError, match="an adopted gallery model has no classifier"):
        ckpt.load_classifier(root / "g")
    # loads as a torch module giving the ONNX file's embeddings, L2-normalised
    model, _ = ckpt.load_model(root / "g")
    x = torch.randn(3, 1, 12, 12)
    torch.manual_seed(0)
    ref = F.normalize(Encoder().eval()(x), dim=-1)
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_bct_synthesises_every_row_from_class_means(world):
    from hvs.losses import BCTLoss
    from hvs.training.gallery import FrozenGallery

    root, data, logs = world
    assert any("no classifier (adopted)" in m for m in logs)
    gallery = FrozenGallery.load(root / "g")
    images, targets = data.train.images, data.train.labels
    classes = [data.classes[i] for i in range(6)]
    ctx = gallery.context(classes, images, targets, kind="cosface", scale=16, margin=0.2, log=lambda _: None)
    rows = BCTLoss.for_training(ctx).weight
    from hvs.embed import embed_images

    for c in (0, 3):
        mean = embed_images(gallery.model, images[targets == c], [0.5], [0.25]).mean(0)
        assert torch.allclose(rows[c], F.normalize(mean, dim=0), atol=1e-5)


def test_query_models_record_the_adopted_gallery_and_evaluate(world):
    from hvs.evaluate import evaluate

    root, _, _ = world
    g = ckpt.read_card(root / "g")
    for name in ("q", "ql"):
        assert ckpt.read_card(root / name).compatible_with["fingerprint"] == g.fingerprint
    r = evaluate(root / "g", root / "q", SPEC, n_boot=20, latency=True)
    assert r["gallery_model"]["model"] == "onnx:prod"
    assert r["cost"]["gallery"]["flops"] == g.adopted["flops"]
    assert r["cost"]["gallery"]["params"] == 8 * 9 + 8 + 16 * 8 + 16  # the graph's initializers
    assert r["cost"]["gallery"]["latency_ms_batch1"] > 0
    assert 0 <= r["metrics"]["query->gallery"]["map"] <= 1 and not any("trained for" in n for n in r["notes"])


def test_search_add_and_export_with_the_adopted_gallery(world, tmp_path, capsys):
    from hvs.export import export_onnx
    from hvs.index import open_index
    from hvs.search import Searcher

    root, data, _ = world
    img = tmp_path / "q.png"
    img.write_bytes(png_of(data.query.images[0]))
    code, err = run(["search", "--index", f"faiss:{root / 'idx'}", "--query-model", root / "q", "-k", 3, img], capsys)
    assert code == 0, err
    # the query model exported to ONNX searches the same index
    export_onnx(root / "ql", tmp_path / "ql.onnx")
    s = Searcher(f"faiss:{root / 'idx'}", tmp_path / "ql.onnx")
    assert len(s.search_files([img], k=3)[0]) == 3
    s.index.close()
    # new gallery items are embedded by the adopted model (the index's recorded path)
    import shutil

    shutil.copytree(root / "idx", tmp_path / "idx")
    code, err = run(["index", "add", "--index", f"faiss:{tmp_path / 'idx'}", "--label", "new", img], capsys)
    assert code == 0, err
    with open_index(f"faiss:{tmp_path / 'idx'}") as index:
        assert len(index) == len(data.gallery) + 1
    # the adopted gallery model itself exports, its graph's output L2-normalised like its folder's
    report = export_onnx(root / "g", tmp_path / "g.onnx")
    assert report["exporter"] == "adopted" and report["parity"]["max_abs_diff"] < 1e-5
    from hvs.encoders import load_onnx_encoder

    emb = load_onnx_encoder(tmp_path / "g.onnx").embed(data.query.images[:4])
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_serve_searches_and_adds_with_the_adopted_gallery(world, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import shutil

    from fastapi.testclient import TestClient

    from hvs.serve import create_app

    root, data, _ = world
    shutil.copytree(root / "idx", tmp_path / "idx")
    client = TestClient(create_app(f"faiss:{tmp_path / 'idx'}", root / "q", token="tok"))
    image = {"image": ("q.png", png_of(data.train.images[0]), "image/png")}
    r = client.post("/search?k=3", files=image)
    assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
    r = client.post("/gallery", headers={"Authorization": "Bearer tok"}, data={"label": "new"}, files=image)
    assert r.status_code == 201 and r.json()["index_size"] == len(data.gallery) + 1, r.text


@pytest.mark.slow
def test_nas_trains_searches_and_exports_against_the_adopted_gallery(world, tmp_path):
    from hvs.nas.train import SupernetTrainConfig, train_supernet

    root, data, logs = world
    tiny = {"stem_width": 8, "first_width": 8, "stage_widths": [8, 16, 24], "stage_strides": [2, 2, 1],
            "stage_acts": ["relu", "h_swish", "h_swish"], "stage_se": [False, True, True], "final_width": 48,
            "feature_width": 64}  # fmt: skip
    cfg = SupernetTrainConfig(
        out=str(tmp_path / "sn"), data=SPEC, gallery=str(root / "g"), bct_weight=1.0, regress_weight=0.5,
        epochs=1, batch_size=32, supernet=tiny,
    )  # fmt: skip
    card = train_supernet(cfg, data=data, progress=False, log=lambda _: None)
    g = ckpt.read_card(root / "g")
    assert (card.gallery or {}).get("fingerprint") == g.fingerprint
    sn, gm = str(tmp_path / "sn"), str(root / "g")
    assert (
        main(
            [
                "nas",
                "search",
                "--supernet",
                sn,
                "--gallery-model",
                gm,
                "--population",
                "2",
                "--iterations",
                "2",
                "--bn-images",
                "32",
                "--flops",
                "2M",
                "--out",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["nas", "export", "--supernet", sn, "--arch", str(tmp_path / "r" / "best.json"), "--gallery-model",
                 gm, "--out", str(tmp_path / "q"), "--finetune-epochs", "1", "--batch-size", "32",
                 "--no-progress"]) == 0  # fmt: skip
    assert ckpt.read_card(tmp_path / "q").compatible_with["fingerprint"] == g.fingerprint


def test_a_tampered_adopted_encoder_is_refused(world, tmp_path):
    import shutil

    root, _, _ = world
    shutil.copytree(root / "g", tmp_path / "g")
    path = tmp_path / "g" / ckpt.ADOPTED_ONNX
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ckpt.CheckpointError, match="does not match the fingerprint"):
        ckpt.load_model(tmp_path / "g")


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    to_onnx(FeatureMap(), torch.zeros(1, 1, 12, 12), root / "map.onnx")
    to_onnx(VectorIn(), torch.zeros(1, 16), root / "vector.onnx")
    to_onnx(Encoder(in_chans=3), torch.zeros(1, 3, 12, 12), root / "rgb.onnx")
    to_onnx(Encoder(), torch.zeros(1, 1, 12, 12), root / "good.onnx")
    (root / "truncated.onnx").write_bytes((root / "good.onnx").read_bytes()[:200])
    return root


@pytest.mark.parametrize(
    "file, extra, message",
    [
        ("vector.onnx", [], "ONNX input 'pixels' is not an image tensor (float32 N, C, H, W)"),
        ("map.onnx", [], "the encoder's output has shape (2, 4, 12, 12) for 2 images, not one vector per image"),
        ("truncated.onnx", [], "not a readable ONNX file"),
        ("rgb.onnx", ["--data", SPEC], "the preprocessing reads 3-channel images but the data"),
        ("good.onnx", ["--mean", "0.5,0.5,0.5"], "preprocessing mean has 3 values but the model reads 1-channel"),
        ("good.onnx", ["--image-size", "16"], "image size 16 given, but the ONNX input has image size 12"),
        ("missing.onnx", [], "no such ONNX file"),
    ],
)
def test_bad_encoders_are_one_line_errors_and_write_nothing(bad_files, tmp_path, capsys, file, extra, message):
    argv = ["adopt", "onnx", "--onnx", bad_files / file, "--out", tmp_path / "g"]
    if "--mean" not in extra:
        argv += ["--mean", "0.5"]
    code, err = run([*argv, "--std", "0.25", *extra], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g*"))


def test_no_preprocessing_or_an_occupied_folder_is_refused(bad_files, tmp_path, capsys):
    code, err = run(["adopt", "onnx", "--onnx", bad_files / "good.onnx", "--out", tmp_path / "g"], capsys)
    assert code == 2 and "no preprocessing mean given" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, err = run(["adopt", "onnx", "--onnx", bad_files / "good.onnx", "--mean", "0.5", "--std", "0.25",
                     "--out", tmp_path / "busy"], capsys)  # fmt: skip
    assert code == 2 and "already exists and is not empty" in err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------- architecture + weights
@pytest.fixture(scope="module")
def weights_world(tmp_path_factory):
    """A timm network saved as a release would be (with its classifier), adopted by name + file."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("adopt_w")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=5, in_chans=1).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "prod.safetensors"))
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / "other.safetensors"))
    (root / "truncated.safetensors").write_bytes((root / "prod.safetensors").read_bytes()[:1000])
    assert main(["adopt", "weights", "--arch", "timm:test_resnet", "--weights", str(root / "prod.safetensors"),
                 "--image-size", "12", "--channels", "1", "--mean", "0.5", "--std", "0.25",
                 "--out", str(root / "g")]) == 0  # fmt: skip
    return root, net


def test_adopt_weights_index_train_evaluate(weights_world, tmp_path):
    from hvs.evaluate import evaluate
    from hvs.models.pretrained import file_sha256
    from hvs.search import Searcher, build_gallery_index
    from hvs.train import TrainConfig, train

    root, net = weights_world
    card = ckpt.read_card(root / "g")
    assert card.model == "timm:test_resnet" and card.adopted["kind"] == "weights"
    assert card.adopted["sha256"] == file_sha256(root / "prod.safetensors") and card.embed_dim == net.num_features
    assert card.fingerprint == ckpt.file_fingerprint(root / "g" / ckpt.WEIGHTS)
    assert not (root / "g" / ckpt.CLASSIFIER).exists()
    model, _ = ckpt.load_model(root / "g")
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        assert torch.allclose(model(x), F.normalize(pooled), atol=1e-5)
    build_gallery_index(root / "g", SPEC, f"faiss:{tmp_path / 'idx'}", progress=False)
    q = train(
        TrainConfig(out=str(tmp_path / "q"), data=SPEC, model="cnn-nano", embed_dim=card.embed_dim, epochs=1,
                    batch_size=32, lr=0.05, gallery=str(root / "g"), compat=["bct"]),
        progress=False, log=lambda _: None,
    )  # fmt: skip
    assert q.compatible_with["fingerprint"] == card.fingerprint
    r = evaluate(root / "g", tmp_path / "q", SPEC, n_boot=10, latency=False)
    assert r["cost"]["gallery"]["flops"] > 0 and r["cost"]["gallery"]["params"] > 0
    s = Searcher(f"faiss:{tmp_path / 'idx'}", tmp_path / "q")
    assert len(s.search_images(create_dataset(SPEC).query.images[:2], k=3)[1]) == 3
    s.index.close()


@pytest.mark.parametrize(
    "file, arch, message",
    [
        ("other.safetensors", "timm:test_resnet", "do not fit"),
        ("truncated.safetensors", "timm:test_resnet", "cannot read, truncated or corrupt"),
        ("prod.safetensors", "timm:no_such_net", "unknown timm architecture"),
    ],
)
def test_bad_weights_are_one_line_errors_and_write_nothing(weights_world, tmp_path, capsys, file, arch, message):
    root, _ = weights_world
    code, err = run(["adopt", "weights", "--arch", arch, "--weights", root / file, "--image-size", 12,
                     "--channels", 1, "--mean", 0.5, "--std", 0.25, "--out", tmp_path / "g"], capsys)  # fmt: skip
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g*"))


def _export_fixed_batch(path, batch: int) -> None:
    """The seed-0 Encoder as an ONNX graph whose batch is fixed at ``batch`` (no dynamic axes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        torch.onnx.export(Encoder().eval(), (torch.zeros(batch, 1, 12, 12),), str(path), dynamo=False)


def test_a_fixed_batch_graph_runs_image_by_image_but_does_not_export(tmp_path):
    from hvs.adopt import adopt_onnx
    from hvs.errors import ExportError
    from hvs.export import export_onnx

    _export_fixed_batch(tmp_path / "b1.onnx", 1)
    adopt_onnx(tmp_path / "b1.onnx", tmp_path / "g", mean=[0.5], std=[0.25])
    model, _ = ckpt.load_model(tmp_path / "g")
    x = torch.randn(3, 1, 12, 12)
    torch.manual_seed(0)
    assert torch.allclose(model(x), F.normalize(Encoder().eval()(x), dim=-1), atol=1e-5)
    with pytest.raises(ExportError, match="has a fixed batch of 1"):
        export_onnx(tmp_path / "g", tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()
    # a graph of a fixed batch of 4 takes any number of images: chunks of 4, the last one padded
    _export_fixed_batch(tmp_path / "b4.onnx", 4)
    adopt_onnx(tmp_path / "b4.onnx", tmp_path / "g4", mean=[0.5], std=[0.25])
    model, _ = ckpt.load_model(tmp_path / "g4")
    for n in (1, 4, 7):
        x = torch.randn(n, 1, 12, 12)
        torch.manual_seed(0)
        assert torch.allclose(model(x), F.normalize(Encoder().eval()(x), dim=-1), atol=1e-5), n
