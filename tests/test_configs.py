"""Every shipped config resolves into a valid configuration of the trainer that reads it."""

from pathlib import Path

import pytest

from hvs.losses import parse_compat
from hvs.models import list_models
from hvs.models.supernets import create_supernet
from hvs.nas.train import SupernetTrainConfig
from hvs.train import load_config, read_mapping

# tradeoff_*.yaml are benchmark profiles, checked by tests/test_tradeoff.py
CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml") if not p.name.startswith("tradeoff")
)


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("nas")], ids=lambda p: p.name)
def test_training_config_resolves(path):
    cfg = load_config(path, {"out": "unused"})
    assert cfg.model in list_models()
    parse_compat(cfg.compat)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("nas")], ids=lambda p: p.name)
def test_supernet_config_resolves(path):
    cfg = SupernetTrainConfig.from_dict({**read_mapping(path), "out": "unused"})
    supernet = create_supernet(cfg.space, in_chans=1, **cfg.supernet)
    assert supernet.flops(supernet.min_arch(), 28) < supernet.flops(supernet.max_arch(), 28)
