"""Every shipped config resolves into a valid training configuration."""

from pathlib import Path

import pytest

from hvs.losses import parse_compat
from hvs.models import list_models
from hvs.train import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves(path):
    if path.name.startswith("nas"):
        pytest.skip("NAS configs are read by hvs nas")
    cfg = load_config(path, {"out": "unused"})
    assert cfg.model in list_models()
    parse_compat(cfg.compat)
