"""ONNX export: parity with PyTorch, metadata round trip, search through the ONNX encoder, int8,
and the compatibility refusal carried by the exported file."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from conftest import build_tiny_world  # noqa: E402

from hvs import checkpoint as ckpt  # noqa: E402
from hvs.cli import main  # noqa: E402
from hvs.compat import CompatError  # noqa: E402
from hvs.encoders import encoder_kind, encoder_loader, graph_sha256  # noqa: E402
from hvs.export import ExportError, export_onnx, load_onnx_encoder, measure_ort_latency, ort_session, read_metadata  # noqa: E402
from hvs.search import Searcher, SearchError, load_query_encoder  # noqa: E402

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 1-epoch gallery model, a BCT query model for it, an index, and the query model exported
    through the CLI (fp32 + int8, with the M(q->g) check)."""
    root = tmp_path_factory.mktemp("export")
    data = build_tiny_world(root, SPEC)
    assert (
        main(
            [
                "export",
                "onnx",
                "--query-model",
                str(root / "q"),
                "--out",
                str(root / "q.onnx"),
                "--int8",
                "--check-data",
                SPEC,
                "--gallery-model",
                str(root / "g"),
                "--no-latency",
                "--json",
                str(root / "report.json"),
            ]
        )
        == 0
    )
    report = json.loads((root / "report.json").read_text())
    return root, data, report


def test_parity_with_pytorch_at_batch_1_and_5(setup):
    root, data, report = setup
    parity = report["export"]["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["batch_sizes"] == [1, 5]
    assert report["export"]["opset"] == 18
    model, card = ckpt.load_model(root / "q")
    session = ort_session(root / "q.onnx")
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch axis
    for n in (1, 5):
        x = torch.randn(n, *card.input_shape)
        with torch.inference_mode():
            want = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (n, 16)
        assert np.abs(got - want).max() <= 1e-4
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # L2 normalisation is in the graph
    assert onnx.load(str(root / "q.onnx")).opset_import[0].version == 18


def test_metadata_round_trip(setup):
    root, _, _ = setup
    card = ckpt.read_card(root / "q")
    meta = read_metadata(root / "q.onnx")
    assert meta["preprocessing"] == {"channels": 1, "image_size": 12, "mean": card.mean, "std": card.std}
    assert meta["embed_dim"] == 16 and meta["model"] == "cnn-nano" and meta["role"] == "query"
    assert meta["fingerprint"] == card.fingerprint
    assert meta["compatible_with"] == card.compatible_with["fingerprint"] == ckpt.read_card(root / "g").fingerprint
    raw = {p.key: p.value for p in onnx.load(str(root / "q.onnx")).metadata_props}
    assert json.loads(raw["preprocessing"])["image_size"] == 12  # stored as JSON strings
    assert encoder_kind(root / "q.onnx") == "onnx" and encoder_kind(root / "q") == "torch"
    assert encoder_loader("onnx") is load_onnx_encoder  # hvs.export re-exports hvs.encoders' loader
    assert json.loads(raw["weights_sha256"]) == graph_sha256(onnx.load(str(root / "q.onnx")))
    onnx_enc, torch_enc = load_query_encoder(root / "q.onnx"), load_query_encoder(root / "q")
    for field in ("name", "embed_dim", "fingerprint", "compatible_with", "role", "preprocessing"):
        assert getattr(onnx_enc, field) == getattr(torch_enc, field), field


def test_search_through_onnx_matches_torch(setup):
    root, data, _ = setup
    images = data.query.images
    by_torch = Searcher(f"faiss:{root / 'idx'}", root / "q").search_images(images, k=5)
    by_onnx = Searcher(f"faiss:{root / 'idx'}", root / "q.onnx").search_images(images, k=5)
    for a, b in zip(by_torch, by_onnx):
        assert [r["id"] for r in a] == [r["id"] for r in b]
        assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)


def test_int8_copy_agrees_with_fp32(setup):
    root, data, report = setup
    q8 = root / "q.int8.onnx"
    assert q8.is_file() and report["export"]["size_bytes"]["int8"] == q8.stat().st_size
    info = report["export"]["int8"]
    assert info["format"] == "QDQ" and info["agreement"]["min_cosine"] > 0.98
    assert read_metadata(q8)["quantization"]["calibration"]["images"] == 64
    fp32, int8 = load_query_encoder(root / "q.onnx"), load_query_encoder(q8)
    a, b = fp32.embed(data.query.images), int8.embed(data.query.images)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98
    rows = report["check"]["rows"]  # M(q->g) of torch / onnx / int8 query encoders
    assert set(rows) == {"torch", "onnx", "int8"}
    assert rows["onnx"]["recall@1"] == rows["torch"]["recall@1"] and rows["onnx"]["map"] == pytest.approx(
        rows["torch"]["map"], abs=1e-6
    )
    assert measure_ort_latency(ort_session(q8, 1), (1, 12, 12), repeats=3, min_seconds=0) > 0


def test_index_refuses_an_onnx_model_made_for_another_gallery(setup, tmp_path):
    root, _, _ = setup
    other = tmp_path / "q-other"
    shutil.copytree(root / "q", other)
    config = json.loads((other / ckpt.CONFIG).read_text())
    config["compatible_with"]["fingerprint"] = "0123456789abcdef"  # trained for some other gallery model
    (other / ckpt.CONFIG).write_text(json.dumps(config))
    export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(CompatError, match="trained for gallery fingerprint 0123456789abcdef") as e:
        Searcher(f"faiss:{root / 'idx'}", tmp_path / "other.onnx")
    assert isinstance(e.value, SearchError)  # callers catching SearchError still do
    assert "0123456789abcdef" in Searcher(f"faiss:{root / 'idx'}", tmp_path / "other.onnx", force=True).warning


@pytest.mark.parametrize("tamper", ["initializer", "node"])
def test_an_altered_onnx_file_is_refused_by_name(setup, tmp_path, tamper):
    """The recorded fingerprint is of the PyTorch weights; the file's own graph digest is what
    catches weights changed after export (which would otherwise search under the old fingerprint)."""
    root, _, _ = setup
    proto = onnx.load(str(root / "q.onnx"))
    if tamper == "initializer":
        init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = onnx.numpy_helper.to_array(init).copy()
        arr.flat[0] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    else:
        proto.graph.node[-1].name += "-edited"
    bad = tmp_path / "altered.onnx"
    onnx.save(proto, str(bad))  # metadata (fingerprint, weights_sha256) left as exported
    for load in (load_query_encoder, lambda p: Searcher(f"faiss:{root / 'idx'}", p), read_metadata):
        with pytest.raises(ExportError, match=r"altered\.onnx: ONNX graph does not match the weights_sha256") as e:
            load(bad)
        assert "\n" not in str(e.value)
    assert main(["search", "--index", str(root / "idx"), "--query-model", str(bad), str(bad)]) == 2
    assert read_metadata(bad, verify=False)["model"] == "cnn-nano"  # the metadata itself is still readable


def test_failed_parity_writes_nothing(setup, tmp_path, monkeypatch):
    root, _, _ = setup
    # the exporter "produces" a graph of different weights: a genuine parity failure
    wrong = tmp_path / "g.onnx"
    export_onnx(root / "g", wrong)
    import hvs.export as ex

    def fake_export(model, example, path, opset):
        shutil.copy(wrong, path)
        return "dynamo"

    monkeypatch.setattr(ex, "_torch_export", fake_export)
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    with pytest.raises(ExportError, match="differ by .* nothing written"):
        export_onnx(root / "q", out)
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary one


def test_bad_requests_are_one_line_errors(setup, tmp_path):
    root, _, _ = setup
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(root / "q", tmp_path / "q.bin")
    with pytest.raises(ExportError, match="opset 3 is not supported"):
        export_onnx(root / "q", tmp_path / "q.onnx", opset=3)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "q.onnx")
    bare = onnx.load(str(root / "q.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ExportError, match="no hvs metadata"):
        load_query_encoder(tmp_path / "bare.onnx")
    with pytest.raises(ExportError, match="no such ONNX file"):
        load_query_encoder(tmp_path / "nope.onnx")
    assert (
        main(
            [
                "export",
                "onnx",
                "--query-model",
                str(root / "q"),
                "--out",
                str(tmp_path / "x.onnx"),
                "--check-data",
                SPEC,
            ]
        )
        == 2
    )  # --check-data without --gallery-model
