"""timm:NAME / torchvision:NAME architectures and local pretrained weights (nothing downloaded:
every weights file here is written from a model the test builds)."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.errors import ConfigError
from hvs.models import build_backbone, create_model
from hvs.models.pretrained import PretrainedError, file_sha256, load_pretrained, target_module

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=16"
TIMM = "timm:mobilenetv3_small_050"  # ~4 MFLOPs at 64 px: a cheap real timm architecture


def _timm_state(seed=1, in_chans=3):
    torch.manual_seed(seed)
    donor = create_model(TIMM, embed_dim=8, in_chans=in_chans)
    return {k: v.clone() for k, v in target_module(donor).state_dict().items()}


def _backbone_equal(model, state):
    own = target_module(model).state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items())


def test_safetensors_in_timm_layout_round_trips_and_the_classifier_is_ignored(tmp_path):
    state = _timm_state()
    path = tmp_path / "w.safetensors"
    save_file({**state, "classifier.weight": torch.randn(1000, 1024), "classifier.bias": torch.zeros(1000)}, path)
    model = create_model(TIMM, embed_dim=8, in_chans=3)
    neck = model.neck.weight.clone()
    assert not _backbone_equal(model, state)
    assert load_pretrained(model, path) == file_sha256(path)
    assert _backbone_equal(model, state)
    assert torch.equal(model.neck.weight, neck)  # the embedding head is not touched


def test_torch_checkpoint_with_state_dict_key_and_ddp_prefix(tmp_path):
    state = _timm_state()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = build_backbone(TIMM, in_chans=3)
    load_pretrained(backbone, path)
    assert _backbone_equal(backbone, state)


def test_torchvision_layout_loads_into_registered_resnet_and_timm_resnet(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)  # fc.* included: ignored
    tv_state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    for name, kwargs in (("resnet18", {"stem": "standard"}), ("timm:resnet18", {}), ("torchvision:resnet18", {})):
        model = create_model(name, embed_dim=8, in_chans=3, **kwargs)
        load_pretrained(model, path)
        assert _backbone_equal(model, tv_state), name
    # The small-input stem has a 3x3 first conv: a 7x7 file does not fit it, and the error says so.
    small = create_model("resnet18", embed_dim=8, in_chans=3, image_size=32)
    with pytest.raises(PretrainedError, match=r"shape mismatch.*conv1\.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        load_pretrained(small, path)


def test_torchvision_mobilenet_goes_with_torchvision_architecture(tmp_path):
    tv = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mbv3.safetensors"
    save_file(tv.state_dict(), path)
    model = create_model("torchvision:mobilenet_v3_small", embed_dim=8, in_chans=3)
    load_pretrained(model, path)  # classifier.3 (the logits) ignored; classifier.0 is the feature layer
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)
    timm_layout = create_model("mobilenetv3_small", embed_dim=8, in_chans=3)
    with pytest.raises(PretrainedError, match=r"missing \d+ key\(s\) conv_stem\.weight.*unexpected.*features\.0"):
        load_pretrained(timm_layout, path)


def test_three_channel_file_adapts_to_a_grey_stem(tmp_path):
    state = _timm_state(in_chans=3)
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    model = create_model(TIMM, embed_dim=8, in_chans=1)
    load_pretrained(model, path)
    stem = target_module(model).conv_stem.weight
    assert torch.allclose(stem, state["conv_stem.weight"].sum(1, keepdim=True))


def test_missing_unexpected_and_corrupt_files_are_one_line_errors(tmp_path):
    state = _timm_state()
    model = create_model(TIMM, embed_dim=8, in_chans=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["bn1.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    save_file({**state, "blocks.9.conv.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    full = tmp_path / "full.safetensors"
    save_file(state, full)
    (tmp_path / "cut.safetensors").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    torch.save(state, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {
        "missing.safetensors": r"missing 1 key\(s\) bn1\.weight",
        "extra.safetensors": r"unexpected 1 key\(s\) blocks\.9\.conv\.weight",
        "cut.safetensors": r"cannot read, truncated or corrupt",
        "cut.pt": r"cannot read, truncated or corrupt",
        "list.pt": r"not a state dict of tensors",
        "absent.pt": r"no such file",
    }
    for name, pattern in cases.items():
        with pytest.raises(PretrainedError, match=pattern) as e:
            load_pretrained(model, tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a refused file changes nothing


def test_foreign_names_are_checked_with_close_suggestions():
    with pytest.raises(ConfigError, match=r"unknown timm architecture 'resnet5O'.*did you mean.*resnet50"):
        create_model("timm:resnet5O")
    with pytest.raises(ConfigError, match=r"unknown torchvision architecture 'resnet_18'.*resnet18"):
        create_model("torchvision:resnet_18")
    with pytest.raises(ConfigError, match=r"unknown model .keras:resnet50.*\(or timm:NAME, torchvision:NAME\)"):
        create_model("keras:resnet50")


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "timm:mobilenetv4_conv_small", "timm:resnet10t"])
def test_timm_architectures_embed_with_in_chans_and_embed_dim(name):
    model = create_model(name, embed_dim=24, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 24) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def _train(args, capsys):
    rc = main(
        ["train", "--data", SPEC, "--embed-dim", "8", "--epochs", "1", "--batch-size", "32", "--no-progress"] + args
    )
    out = capsys.readouterr()
    return rc, out


def test_hvs_train_timm_gallery_with_pretrained_and_timm_query(tmp_path, capsys):
    weights = tmp_path / "mbv3.safetensors"
    save_file({**_timm_state(in_chans=3), "classifier.weight": torch.zeros(10, 1024)}, weights)
    g = tmp_path / "g"
    rc, out = _train(["--model", TIMM, "--pretrained", str(weights), "--out", str(g)], capsys)
    assert rc == 0, out.err
    card = ckpt.read_card(g)
    assert card.model == TIMM and card.extra["pretrained"]["sha256"] == file_sha256(weights)
    assert json.loads((g / "train_config.json").read_text())["pretrained_sha256"] == file_sha256(weights)
    model, _ = ckpt.load_model(g)
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 8)

    q = tmp_path / "q"
    rc, out = _train(
        ["--model", "timm:resnet10t", "--gallery-model", str(g), "--compat", "bct", "--out", str(q)], capsys
    )
    assert rc == 0, out.err
    assert ckpt.read_card(q).compatible_with["fingerprint"] == card.fingerprint

    # The file changed under an interrupted run: the resumption is refused by name.
    save_file(_timm_state(seed=7, in_chans=3), weights)
    rc, out = _train(["--model", TIMM, "--pretrained", str(weights), "--out", str(g), "--resume"], capsys)
    assert rc == 2 and "configuration differs in pretrained_sha256" in out.err


def test_hvs_train_refuses_a_bad_pretrained_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    rc, out = _train(["--model", TIMM, "--pretrained", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "truncated or corrupt" in out.err and len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
