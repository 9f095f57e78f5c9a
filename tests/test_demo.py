"""The main job's code path, on synthetic data (the real run is `make demo`)."""

import json

import pytest

from hvs.cli import main

DATA = "synthetic:classes=6,train_per_class=24,test_per_class=8,size=12"


@pytest.mark.slow
def test_demo_trains_evaluates_and_reuses_finished_stages(tmp_path, capsys):
    args = [
        "demo",
        "--out",
        str(tmp_path),
        "--data",
        DATA,
        "--gallery-model",
        "cnn-small",
        "--query-model",
        "cnn-nano",
        "--gallery-epochs",
        "2",
        "--query-epochs",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| paragon cnn-small (g->g)" in out and "cnn-nano independent" in out and "cnn-nano bct" in out
    assert "wall time:" in out
    summary = json.loads((tmp_path / "demo.json").read_text())
    bct = summary["results"]["query-bct"]
    assert bct["query_model"]["compatible_with"]["fingerprint"] == bct["gallery_model"]["fingerprint"]
    indep = json.loads((tmp_path / "query-independent" / "config.json").read_text())
    assert indep["role"] == "query" and indep["compatible_with"] is None
    # a second run reuses the three trained models
    assert main(args) == 0
    assert capsys.readouterr().out.count("[reuse]") == 3
