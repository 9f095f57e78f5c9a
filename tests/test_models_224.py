"""Resolution-aware architectures: from STANDARD_STEM_MIN_SIZE px on, every registered model with a
library counterpart costs what the library's architecture costs (generated from the registry);
below it, the small-input stems of before; old model folders rebuild the net they were trained as."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.models import (
    STANDARD_STEM_MIN_SIZE,
    create_model,
    list_models,
    model_entry,
    resolve_model_kwargs,
    stem_for,
)
from hvs.models.cost import count_flops, meta_flops

SHAPE = (3, 224, 224)
TOLERANCE = 0.10  # relative, backbone against backbone (the embedding head is not counted)
# hvs's own architectures: no timm / torchvision network to compare with (their large-input stem
# is checked by the stride test below instead).
NO_COUNTERPART = {
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "cnn-nano",
    "cnn-tiny",
    "cnn-small",
    "ofa-mbv3",
    "fast-cnn",
}


def library_backbone(counterpart: str) -> nn.Module:
    """The counterpart straight from its library, classifier removed, built without hvs code."""
    lib, _, arch = counterpart.partition(":")
    if lib == "timm":
        return timm.create_model(arch, pretrained=False, num_classes=0)
    net = torchvision.models.get_model(arch, weights=None)
    net.fc = nn.Identity()
    return net


def test_every_registered_model_is_listed_with_or_without_a_counterpart():
    for name in list_models():
        entry = model_entry(name)
        assert (entry.counterpart is None) == (name in NO_COUNTERPART), name
        assert entry.resolution_aware, f"{name}: every registered model follows the stem rule"


@pytest.mark.parametrize("name", [n for n in list_models() if model_entry(n).counterpart])
def test_flops_at_224_match_the_library_architecture(name):
    f_ours = meta_flops(lambda: create_model(name, in_chans=3, image_size=224).backbone, SHAPE)
    f_theirs = meta_flops(lambda: library_backbone(model_entry(name).counterpart), SHAPE)
    assert abs(f_ours - f_theirs) <= TOLERANCE * f_theirs, f"{name}: {f_ours / 1e9:.3f} G vs {f_theirs / 1e9:.3f} G"


def test_published_figures_for_two_landmarks():
    # torchvision / timm tables give MACs: resnet50 4.09 G, mobilenetv3_large_100 0.22 G at 224 px.
    def gmacs(name):
        return meta_flops(lambda: create_model(name, in_chans=3, image_size=224).backbone, SHAPE) / 2e9

    assert 3.9 < gmacs("resnet50") < 4.3
    assert 0.20 < gmacs("mobilenetv3_large") < 0.24


def test_the_stem_rule_threshold_is_one_number():
    assert stem_for(None) == "small" and stem_for(28) == "small"
    assert stem_for(STANDARD_STEM_MIN_SIZE - 1) == "small" and stem_for(STANDARD_STEM_MIN_SIZE) == "standard"
    assert resolve_model_kwargs("resnet50", 224) == {"stem": "standard"}
    assert resolve_model_kwargs("resnet8", 64, {"width": 2}) == {"width": 2, "stem": "small"}
    assert resolve_model_kwargs("resnet50", 224, {"stem": "small"}) == {"stem": "small"}  # explicit wins
    assert resolve_model_kwargs("timm:resnet50", 224) == {}  # a foreign architecture is the library's


@pytest.mark.parametrize("name", list_models())
def test_standard_stem_downsamples_4x_more_than_the_small_one(name):
    size = STANDARD_STEM_MIN_SIZE
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        small = create_model(name, in_chans=3, image_size=size - 1).backbone.eval()
        standard = create_model(name, in_chans=3, image_size=size).backbone.eval()
        x = torch.zeros(1, 3, size, size)
        assert standard(x).shape == small(x).shape
    # A library architecture: total stride 32 instead of 16, a quarter of the positions after the
    # stem and ~1/4 of the cost. hvs's own nets get a stride-4 stem (a CIFAR ResNet's was stride 1).
    ratio = count_flops(small, (3, size, size)) / count_flops(standard, (3, size, size))
    high = 5.0 if model_entry(name).counterpart else 20.0
    assert 2.5 < ratio < high, f"{name}: small/standard FLOPs ratio {ratio:.2f}"


def _card(model_kwargs, image_size):
    return ckpt.ModelCard(
        model="resnet18",
        embed_dim=16,
        in_chans=1,
        image_size=image_size,
        mean=[0.5],
        std=[0.5],
        model_kwargs=model_kwargs,
    )


@pytest.mark.parametrize("image_size", [28, 128])
def test_an_old_card_without_a_stem_rebuilds_the_small_stem_at_any_size(tmp_path, image_size):
    # Before the stem rule, hvs built the small-input stem at every size and recorded no stem.
    old = create_model("resnet18", embed_dim=16, in_chans=1).eval()
    ckpt.save_model_folder(tmp_path, old, _card({}, image_size))
    model, card = ckpt.load_model(tmp_path)
    assert card.model_kwargs == {}
    assert model.backbone.net.conv1.kernel_size == (3, 3) and model.backbone.net.conv1.stride == (1, 1)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), old(x))


def test_a_trained_model_records_its_stem_and_rebuilds_it(tmp_path):
    from hvs.train import TrainConfig, train

    for size, stem in ((24, "small"), (STANDARD_STEM_MIN_SIZE, "standard")):
        spec = f"synthetic:classes=4,train_per_class=8,test_per_class=2,size={size}"
        cfg = TrainConfig(out=str(tmp_path / stem), data=spec, model="cnn-nano", embed_dim=8, epochs=1, batch_size=16)
        card = train(cfg, progress=False, log=lambda _: None)
        assert card.model_kwargs == {"stem": stem}
        model, _ = ckpt.load_model(tmp_path / stem)
        assert model.backbone.features[0][0].stride == ((2, 2) if stem == "standard" else (1, 1))


def test_ofa_supernet_gets_ofa_strides_at_imagenet_sizes():
    from hvs.nas.train import SupernetTrainConfig, _build

    cfg = SupernetTrainConfig(out="unused", supernet={"stage_widths": [16, 24], "stage_strides": [2, 2], **_tiny()})
    for size, stride in ((28, 1), (STANDARD_STEM_MIN_SIZE, 2), (224, 2)):
        model, _ = _build(cfg, 16, 3, 4, size)
        assert model.config()["stem_stride"] == stride  # recorded in the supernet card
    explicit = SupernetTrainConfig(out="unused", supernet={**cfg.supernet, "stem_stride": 1})
    assert _build(explicit, 16, 3, 4, 224)[0].config()["stem_stride"] == 1
    # The analytic count agrees with the counter on the extracted sub-network at 224 px.
    model, _ = _build(cfg, 16, 3, 4, 224)
    arch = model.max_arch()
    model.set_active_subnet(arch)
    assert model.flops(arch, 224) == count_flops(model.get_active_subnet(), SHAPE)
    assert create_model("ofa-mbv3", in_chans=3, image_size=224).backbone.stem.conv.stride == (2, 2)


def _tiny():
    return {
        "stem_width": 8,
        "first_width": 8,
        "stage_acts": ["relu", "h_swish"],
        "stage_se": [False, True],
        "final_width": 32,
        "feature_width": 48,
    }


def test_hvs_models_at_224_lists_standard_costs(capsys):
    assert main(["models", "--role", "query", "--channels", "3", "--image-size", "224"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["mobilenetv3_large"][2] == "standard"
    mflops = float(rows["mobilenetv3_large"][3])
    expected = meta_flops(lambda: create_model("mobilenetv3_large", in_chans=3, image_size=224), SHAPE) / 1e6
    assert abs(mflops - expected) < 0.01 and 400 < mflops < 470  # ~0.22 GMACs = 0.43 GFLOPs, head included


def test_ofa_supernet_resolution_is_elastic_at_imagenet_sizes():
    from hvs.nas.train import SupernetTrainConfig, _build

    cfg = SupernetTrainConfig(out="unused", supernet={"stage_widths": [16, 24], "stage_strides": [2, 2], **_tiny()})
    assert _build(cfg, 16, 3, 4, 224)[0].config()["resolution_list"] == [160, 176, 192, 208, 224]  # OFA's
    assert _build(cfg, 16, 3, 4, 28)[0].config()["resolution_list"] == []  # small images: their own size
    off = SupernetTrainConfig(out="unused", supernet={**cfg.supernet, "resolution_list": []})
    assert _build(off, 16, 3, 4, 224)[0].config()["resolution_list"] == []


def test_search_trades_resolution_against_the_rest_under_the_budget():
    from hvs.models.ofa import OFAMobileNetV3Supernet
    from hvs.nas import Budget, regularized_evolution

    shape = {"stage_widths": [8, 16, 24], "stage_strides": [2, 2, 1], "stem_stride": 2, **_tiny()}
    shape.update(stage_acts=["relu", "h_swish", "h_swish"], stage_se=[False, True, True])
    size = STANDARD_STEM_MIN_SIZE

    def search(resolutions):
        net = OFAMobileNetV3Supernet(embed_dim=8, in_chans=3, resolution_list=resolutions, **shape)
        cost = lambda a: float(net.flops(a, size))  # noqa: E731
        limit = 0.5 * float(net.flops(net.max_arch(), size))  # the largest net at full size does not fit
        # A reward indifferent to resolution that prefers deep, wide, large-kernel networks.
        reward = lambda a: float(sum(a["d"]) + sum(a["ks"]) / 7 + sum(a["e"]) / 6)  # noqa: E731
        res = regularized_evolution(net.space, reward, Budget("flops", limit, cost), population=12, iterations=60)
        assert all(r["cost"] <= limit for r in res.history)
        return res, net

    elastic, net = search(default_resolution_list_for(size))
    fixed, _ = search([])
    seen = {r["arch"]["r"] for r in elastic.history}
    assert len(seen) >= 3  # the resolution is a searched gene
    assert elastic.best["arch"]["r"] < size  # spending less on pixels buys a bigger network
    assert elastic.best["reward"] > fixed.best["reward"]
    assert net.flops(elastic.best["arch"], size) == count_flops(_extract(net, elastic.best["arch"]), (3, size, size))


def default_resolution_list_for(size):
    from hvs.models.ofa import default_resolution_list

    return default_resolution_list(size)


def _extract(net, arch):
    net.set_active_subnet(arch)
    return net.get_active_subnet()


def test_train_refuses_a_given_module_with_the_other_stem(tmp_path):
    from hvs.train import TrainConfig, TrainError, train

    spec = f"synthetic:classes=4,train_per_class=8,test_per_class=2,size={STANDARD_STEM_MIN_SIZE}"
    cfg = TrainConfig(out=str(tmp_path / "run"), data=spec, model="mobilenetv3_small", embed_dim=8, epochs=1)
    small = create_model("mobilenetv3_small", embed_dim=8, in_chans=1)  # no image_size: the small stem
    with pytest.raises(
        TrainError, match=r"conv strides differ .* \(stem 'standard'\), first at 'backbone\.net\.conv_stem'"
    ):
        train(cfg, model=small, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()
