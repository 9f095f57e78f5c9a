"""Every registered model, generated from the registry (as timm tests its zoo)."""

import pytest
import torch
from torch import nn

from hvs.models import create_model, list_models
from hvs.models.cost import count_flops, count_params, measure_latency


@pytest.mark.parametrize("name", list_models())
def test_registered_model_embeds_small_inputs(name):
    model = create_model(name, embed_dim=32, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert count_flops(model, (1, 28, 28)) > 0
    assert count_params(model) > 0


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv3_small", "shufflenetv2_05", "cnn-tiny"])
def test_three_channel_and_64px(name):
    model = create_model(name, embed_dim=16, in_chans=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 16)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*resnet8"):
        create_model("resnet9000")


def test_role_filter():
    assert "resnet8" in list_models("gallery") and "resnet8" not in list_models("query")
    assert "mobilenetv2_050" in list_models("query")


def test_flops_match_hand_count():
    # conv 1->4, 3x3, 8x8 output, no bias: 2 * (4*1*9) * 64 MACs; linear 4->2: 2 * 8
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2, bias=False)
    )
    assert count_flops(model, (1, 8, 8)) == 2 * 4 * 9 * 64 + 2 * 8


def test_width_scales_resnet_cost():
    narrow = count_flops(create_model("resnet8", width=1.0), (1, 28, 28))
    wide = count_flops(create_model("resnet8", width=2.0), (1, 28, 28))
    assert 3.0 < wide / narrow < 4.5  # conv FLOPs grow with width squared


def test_latency_is_positive_and_restores_mode():
    model = create_model("cnn-nano").train()
    assert measure_latency(model, (1, 28, 28), batch_size=2, repeats=3, min_seconds=0.0) > 0
    assert model.training
