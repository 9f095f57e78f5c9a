"""The pairing rule (hvs.compat.check_pair): its refusals, and every entry point refusing through it.

Each entry point that pairs a query side with a gallery side is driven with a mismatched pair; it
must refuse with a :class:`CompatError` whose message is exactly what ``check_pair`` says for
that pair, and a spy on ``check_pair`` (patched wherever a module holds it) must have seen the
refusing call: a path that re-implemented the rule, or skipped it, fails here.
"""

import importlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import build_tiny_world
from PIL import Image

from hvs import checkpoint as ckpt
from hvs import compat
from hvs.cli import main
from hvs.compat import CompatError, GallerySide, Preprocessing, QuerySide, check_pair
from hvs.errors import HVSError, SearchError

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"
OTHER = "0123456789abcdef"  # the fingerprint of some other gallery model
TINY_SUPERNET = {
    "embed_dim": 16,
    "in_chans": 1,
    "stem_width": 8,
    "first_width": 8,
    "stage_widths": [8, 16, 24],
    "stage_strides": [2, 2, 1],
    "stage_acts": ["relu", "h_swish", "h_swish"],
    "stage_se": [False, True, True],
    "final_width": 48,
    "feature_width": 64,
}


# ------------------------------------------------------------------------------------------------
# The rule on records alone.
PRE = Preprocessing(1, 12, (0.5,), (0.25,))


def _q(**kw):
    return QuerySide(
        **{
            "name": "cnn-nano",
            "fingerprint": "qqq",
            "compatible_with": "ggg",
            "embed_dim": 16,
            "preprocessing": PRE,
            **kw,
        }
    )


def _g(**kw):
    return GallerySide(**{"fingerprint": "ggg", "embed_dim": 16, "preprocessing": PRE, "model": "resnet8", **kw})


def test_compatible_pairs_pass_silently():
    assert check_pair(_q(), _g()) is None  # trained for it
    assert check_pair(_q(fingerprint="ggg", compatible_with=None), _g()) is None  # the gallery model itself
    assert check_pair(_q(fingerprint="ggg"), _g(kind=compat.INDEX), same_model=True) is None


@pytest.mark.parametrize(
    "query, gallery, kw, message",
    [
        (_q(embed_dim=8), _g(), {}, "query model embeds 8-d vectors but the gallery model uses 16-d vectors"),
        (_q(embed_dim=8), _g(kind=compat.INDEX), {}, "query model embeds 8-d vectors but the index holds 16-d vectors"),
        (
            _q(preprocessing=Preprocessing(3, 12)),
            _g(kind=compat.INDEX),
            {},
            "query model reads 3x12px images but the index was built from 1x12px images",
        ),
        (
            _q(compatible_with=OTHER),
            _g(),
            {},
            f"query model cnn-nano was trained for gallery fingerprint {OTHER}, but gallery model resnet8 has "
            "fingerprint ggg; pass --force to search anyway",
        ),
        (
            _q(compatible_with=None),
            _g(kind=compat.INDEX),
            {"action": "measure"},
            "query model cnn-nano was trained for gallery fingerprint none (independent), but the index's gallery "
            "model resnet8 has fingerprint ggg; pass --force to measure anyway",
        ),
        (
            _q(),
            _g(fingerprint=None, kind=compat.INDEX),
            {},
            "the index has no recorded fingerprint, so query model cnn-nano cannot be checked for compatibility; "
            "pass --force to search anyway",
        ),
        (
            _q(path="runs/q"),
            _g(kind=compat.INDEX),
            {"same_model": True},  # compatible, but not the same model
            "runs/q (fingerprint qqq) is not the gallery model that built this index (ggg): its vectors would live in "
            "another embedding space",
        ),
        (
            _q(label="the supernet", name="", compatible_with=OTHER),
            _g(),
            {"remedy": "fine-tune it"},
            f"the supernet was trained for gallery fingerprint {OTHER}, but gallery model resnet8 has fingerprint ggg; "
            "fine-tune it",
        ),
    ],
)
def test_each_refusal_has_one_wording(query, gallery, kw, message):
    with pytest.raises(CompatError) as e:
        check_pair(query, gallery, **kw)
    assert str(e.value) == message
    assert isinstance(e.value, SearchError) and isinstance(e.value, HVSError)


def test_force_turns_only_the_fingerprint_refusal_into_a_warning():
    warning = check_pair(_q(compatible_with=OTHER), _g(), force=True)
    assert warning.startswith(f"query model cnn-nano was trained for gallery fingerprint {OTHER}")
    assert "--force" not in warning
    assert "no recorded fingerprint" in check_pair(_q(), _g(fingerprint=None), force=True)
    with pytest.raises(CompatError, match="embeds 8-d"):
        check_pair(_q(embed_dim=8), _g(), force=True)  # vectors of two sizes cannot be compared, forced or not
    with pytest.raises(CompatError, match="reads 3x12px"):
        check_pair(_q(preprocessing=Preprocessing(3, 12)), _g(), force=True)
    # evaluation measures an independent model's (in)compatibility: a warning, no --force needed
    assert "trained independently" in check_pair(_q(compatible_with=None), _g(), allow_independent=True)
    with pytest.raises(CompatError):
        check_pair(_q(compatible_with=OTHER), _g(), allow_independent=True)


def test_records_round_trip_through_an_index_sidecar(tmp_path):
    card = ckpt.ModelCard(
        model="resnet8", embed_dim=16, in_chans=1, image_size=12, mean=[0.5], std=[0.25], fingerprint="ggg"
    )
    side = GallerySide.of_card(card, tmp_path)
    back = GallerySide.of_index_meta(compat.index_meta(card, tmp_path))
    assert back.fingerprint == side.fingerprint == "ggg" and back.embed_dim == 16 and back.kind == compat.INDEX
    assert back.preprocessing == side.preprocessing == PRE and back.path == str(tmp_path.resolve())
    assert GallerySide.of_index_meta({"dim": 8}).embed_dim == 8  # the index's own dim wins


# ------------------------------------------------------------------------------------------------
# Every entry point refuses through the contract.
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gallery model g, its BCT query model q, an index of g's vectors; q-other (q made for
    another gallery), g2 (another gallery model); a supernet trained for another gallery."""
    root = tmp_path_factory.mktemp("compat")
    data = build_tiny_world(root, SPEC)
    shutil.copytree(root / "q", root / "q-other")
    config = json.loads((root / "q-other" / ckpt.CONFIG).read_text())
    config["compatible_with"]["fingerprint"] = OTHER
    (root / "q-other" / ckpt.CONFIG).write_text(json.dumps(config))

    model, card = ckpt.load_model(root / "g")  # g2: g with other weights, so another fingerprint
    with torch.no_grad():
        next(model.parameters()).mul_(-1.0)
    ckpt.save_model_folder(root / "g2", model, card)

    from hvs.models.ofa import OFAMobileNetV3Supernet
    from hvs.nas.common import SupernetCard, save_supernet

    net = OFAMobileNetV3Supernet(**TINY_SUPERNET)
    g_card = ckpt.read_card(root / "g")
    save_supernet(
        root / "s",
        net,
        torch.zeros(len(data.classes), 16),
        SupernetCard(
            supernet=net.config(),
            embed_dim=16,
            in_chans=1,
            image_size=12,
            mean=g_card.mean,
            std=g_card.std,
            classes=list(data.classes),
            data=SPEC,
            gallery={"fingerprint": OTHER, "model": "resnet8", "path": "x"},
            bct_weight=1.0,
        ),
    )
    image = root / "query.png"
    Image.fromarray(data.query.images[0, 0].numpy(), mode="L").save(image)
    return root, data, image


@pytest.fixture
def spy(monkeypatch):
    """Record every check_pair call (and whether it refused), wherever a module holds the function."""
    # import every pairing module first: one imported mid-test would keep the patched function
    for name in (
        "hvs.evaluate",
        "hvs.search",
        "hvs.gallery",
        "hvs.cli.export",
        "hvs.index.build",
        "hvs.index.distributed_build",
        "hvs.export",
        "hvs.nas.export",
        "hvs.nas.search",
        "hvs.serve.app",
    ):
        try:
            importlib.import_module(name)
        except ImportError:  # the server's optional extras
            pass
    original = compat.check_pair
    calls = []

    def recording(query, gallery, **kw):
        try:
            result = original(query, gallery, **kw)
        except CompatError as e:
            calls.append(("refused", str(e)))
            raise
        calls.append(("passed", result))
        return result

    for name, module in list(sys.modules.items()):
        if (name == "hvs" or name.startswith("hvs.")) and getattr(module, "check_pair", None) is original:
            monkeypatch.setattr(module, "check_pair", recording)
    return calls


def _evaluate(root, image, tmp_path):
    from hvs.evaluate import evaluate

    evaluate(root / "g", root / "q-other", SPEC, latency=False, n_boot=0)


def _searcher(root, image, tmp_path):
    from hvs.search import Searcher

    Searcher(f"faiss:{root / 'idx'}", root / "q-other")


def _search_cli(root, image, tmp_path):
    return main(["search", "--index", str(root / "idx"), "--query-model", str(root / "q-other"), str(image)])


def _index_add_cli(root, image, tmp_path):
    shutil.copytree(root / "idx", tmp_path / "idx")
    return main(
        [
            "index",
            "add",
            "--index",
            str(tmp_path / "idx"),
            "--gallery-model",
            str(root / "q"),
            "--label",
            "x",
            str(image),
        ]
    )


def _started_build(root, tmp_path):
    """A build of g's gallery killed after its first shard (the shards a resume would reuse)."""
    from hvs.index.build import build_index
    from hvs.search import gallery_inputs

    _, _, images, labels, sources, meta = gallery_inputs(root / "g", SPEC)
    out = f"faiss:{tmp_path / 'new-idx'}"
    assert (
        build_index(
            out,
            images,
            labels,
            sources,
            lambda b: np.ones((len(b), 16), np.float32),
            meta=meta,
            shard_size=16,
            only_shards=[0],
            progress=False,
        )
        is None
    )
    return out


def _index_build_resumed(root, image, tmp_path):
    from hvs.search import build_gallery_index

    build_gallery_index(root / "g2", SPEC, _started_build(root, tmp_path), shard_size=16, progress=False)


def _distributed_build_resumed(root, image, tmp_path):
    from hvs.index.distributed_build import build_gallery_index_distributed

    build_gallery_index_distributed(
        root / "g2", SPEC, _started_build(root, tmp_path), shard_size=16, progress=False, device="cpu"
    )


def _serve_start(root, image, tmp_path):
    pytest.importorskip("fastapi")
    from hvs.serve import create_app

    create_app(f"faiss:{root / 'idx'}", root / "q-other")


def _serve_post_gallery(root, image, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from hvs.index import open_index
    from hvs.serve import create_app

    with open_index(f"faiss:{root / 'idx'}") as index:
        meta = {k: index.meta[k] for k in ("gallery_model", "preprocessing")}
    meta["gallery_model"] = dict(meta["gallery_model"], path=str(root / "g2"))  # other weights at the path
    spec = f"faiss:{tmp_path / 'idx'}"
    with open_index(spec, create=True, dim=16, meta=meta) as index:
        index.add(np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    client = TestClient(create_app(spec, root / "q", token="tok"))
    r = client.post(
        "/gallery",
        headers={"Authorization": "Bearer tok"},
        files={"image": ("x.png", image.read_bytes(), "image/png")},
        data={"label": "x"},
    )
    assert r.status_code == 409
    return r.json()["detail"]


def _export_check(root, image, tmp_path):
    from hvs.export import check_export

    # the torch query model is checked first: the refusal comes before any ONNX file is read
    check_export(
        {"model_folder": str(root / "q"), "onnx": str(tmp_path / "unused.onnx")}, root / "g2", SPEC, latency=False
    )


def _export_cli(root, image, tmp_path):
    code = main(
        [
            "export",
            "onnx",
            "--query-model",
            str(root / "q"),
            "--out",
            str(tmp_path / "q.onnx"),
            "--check-data",
            SPEC,
            "--gallery-model",
            str(root / "g2"),
            "--no-latency",
        ]
    )
    assert not (tmp_path / "q.onnx").exists()  # refused before minutes of export, not after
    return code


def _nas_export(root, image, tmp_path):
    from hvs.nas.common import load_supernet
    from hvs.nas.export import export_subnet

    net, _, _ = load_supernet(root / "s")
    export_subnet(root / "s", net.min_arch(), tmp_path / "sub", gallery=root / "g", progress=False, log=lambda _: None)


def _nas_search(root, image, tmp_path):
    from hvs.nas.search import SearchConfig, run_search

    run_search(
        SearchConfig(supernet=str(root / "s"), out=str(tmp_path / "search"), gallery=str(root / "g"), flops="1G"),
        progress=False,
        log=lambda _: None,
    )


ENTRY_POINTS = {
    "evaluate": _evaluate,
    "Searcher": _searcher,
    "search CLI": _search_cli,
    "index add CLI": _index_add_cli,
    "index build (resumed)": _index_build_resumed,
    "distributed build (resumed)": _distributed_build_resumed,
    "serve start-up": _serve_start,
    "serve POST /gallery": _serve_post_gallery,
    "ONNX export check": _export_check,
    "export onnx CLI": _export_cli,
    "nas export": _nas_export,
    "nas search": _nas_search,
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_through_the_contract(world, spy, tmp_path, capsys, entry):
    root, _, image = world
    capsys.readouterr()
    try:
        result = ENTRY_POINTS[entry](root, image, tmp_path)
    except CompatError as e:
        message = str(e)
    else:  # the CLI prints the refusal as one line and exits 2; the server answers 409 with it
        if isinstance(result, int):
            assert result == 2, f"{entry} did not refuse"
            err = capsys.readouterr().err.strip()
            assert "\n" not in err
            message = err.split(": error: ", 1)[1]
        else:
            message = result
    refusals = [msg for outcome, msg in spy if outcome == "refused"]
    assert refusals == [message], f"{entry} refused outside hvs.compat.check_pair: {message!r}"
    assert "\n" not in message
