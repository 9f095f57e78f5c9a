"""End to end through the CLI on synthetic data: train gallery -> train query (none, bct) -> evaluate.

The synthetic data is built so that capacity matters (see hvs.data.synthetic): the gallery model
(cnn-small, ~94k parameters) is clearly stronger than the query model (cnn-nano, ~2k parameters).

The assertions are about outcomes that hold by construction, with margin, on any CPU, thread count
or BLAS (other floats give other runs). The gallery model gets enough data (200 images a class) and
epochs (30) to be far stronger than the query model on mAP (about 0.95 against 0.84, measured on
several seeds and with 1 and 2 threads), and it is that gap which makes searching its embeddings pay
(M(q->g) > M(q->q)). A gallery model barely stronger than the query model (100 images a class, 15
epochs: mAP 0.70-0.75 against 0.60-0.67) left the criterion to the last bits of one run.
"""

import json

import pytest

from hvs.cli import main

DATA = "synthetic:classes=10,train_per_class=200,test_per_class=80"
COMMON = ["--data", DATA, "--batch-size", "64", "--lr", "0.05", "--embed-dim", "32", "--no-progress"]
GALLERY_EPOCHS, QUERY_EPOCHS = ["--epochs", "30"], ["--epochs", "15"]
ONE_EPOCH = ["--data", DATA, "--epochs", "1", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    assert main(["train", "--model", "cnn-small", "--out", str(root / "g"), *COMMON, *GALLERY_EPOCHS]) == 0
    assert main(["train", "--model", "cnn-nano", "--out", str(root / "q-none"), *COMMON, *QUERY_EPOCHS]) == 0
    assert (
        main(
            [
                "train",
                "--model",
                "cnn-nano",
                "--out",
                str(root / "q-bct"),
                "--gallery",
                str(root / "g"),
                "--compat",
                "bct",
                *COMMON,
                *QUERY_EPOCHS,
            ]
        )
        == 0
    )
    results = {}
    for name in ("q-none", "q-bct"):
        out = root / f"{name}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--gallery-model",
                    str(root / "g"),
                    "--query-model",
                    str(root / name),
                    "--data",
                    DATA,
                    "--json",
                    str(out),
                    "--bootstrap",
                    "200",
                ]
            )
            == 0
        )
        results[name] = json.loads(out.read_text())
    return root, results


def test_bct_makes_the_query_model_compatible(runs):
    _, res = runs
    none, bct = res["q-none"]["metrics"], res["q-bct"]["metrics"]
    chance = 1 / 10
    # independent training: its embeddings live in another space, near chance against the gallery model
    assert none["query->gallery"]["recall@1"] < 2 * chance
    # BCT: far above the independent model, and close to the paragon
    assert bct["query->gallery"]["recall@1"] > none["query->gallery"]["recall@1"] + 0.4
    assert bct["query->gallery"]["recall@1"] > 0.7
    # the gallery model is clearly the stronger one (the setting where compatibility pays); on mAP, which
    # ranks the whole gallery: Recall@1 of both models is near its ceiling here
    assert bct["gallery->gallery"]["map"] > none["query->query"]["map"] + 0.05


def test_bct_meets_the_compatibility_criterion(runs):
    """M(q->g) > M(q->q) on mAP, significantly (paired bootstrap over queries), with a margin (measured
    +0.05, CI about +-0.006). Recall@1 is a single-neighbour metric where the small model's
    self-consistency helps M(q->q) and both sides are near the ceiling (0.94): there the query model
    must lose at most a few points against the gallery model's embeddings."""
    _, res = runs
    crit = res["q-bct"]["compatibility_criterion"]
    m = res["q-bct"]["metrics"]
    assert m["query->gallery"]["map"] > m["query->query"]["map"] + 0.02
    assert crit["map"]["holds"] and crit["map"]["significant"] and crit["map"]["ci95"][0] > 0
    assert m["query->gallery"]["recall@1"] > m["query->query"]["recall@1"] - 0.05
    none = res["q-none"]["compatibility_criterion"]
    assert not none["map"]["holds"] and not none["recall@1"]["holds"]


def test_report_has_every_number(runs):
    _, res = runs
    r = res["q-bct"]
    for pair in ("gallery->gallery", "query->query", "query->gallery"):
        for key in ("recall@1", "recall@5", "recall@10", "map", "recall@1_ci95", "smallest_far_supported"):
            assert key in r["metrics"][pair]
        assert any(k.startswith("tar@far=") for k in r["metrics"][pair])
        assert any(k.startswith("tpir@fpir=") for k in r["metrics"][pair])
    cost = r["cost"]
    assert cost["ratio_gallery_over_query"]["flops"] > 5
    assert cost["gallery"]["latency_ms_batch1"] > 0 and "latency_batch1" in cost["ratio_gallery_over_query"]
    assert r["query_model"]["compatible_with"]["fingerprint"] == r["gallery_model"]["fingerprint"]
    assert r["gap_to_paragon"]["recall@1"]["ci95"][0] <= r["gap_to_paragon"]["recall@1"]["gap"]


def test_query_model_for_another_gallery_is_refused(runs, tmp_path, capsys):
    root, _ = runs
    # a second gallery model: the BCT query model was not trained for it
    assert main(["train", "--model", "cnn-nano", "--out", str(tmp_path / "g2"), *ONE_EPOCH, "--embed-dim", "32"]) == 0
    args = [
        "evaluate",
        "--gallery-model",
        str(tmp_path / "g2"),
        "--query-model",
        str(root / "q-bct"),
        "--data",
        DATA,
        "--no-latency",
        "--bootstrap",
        "10",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained for gallery fingerprint" in err[0] and "--force" in err[0]
    assert main(args + ["--force"]) == 0


def test_dimension_mismatch_is_refused(runs, tmp_path, capsys):
    root, _ = runs
    assert main(["train", "--model", "cnn-nano", "--out", str(tmp_path / "q16"), *ONE_EPOCH, "--embed-dim", "16"]) == 0
    assert (
        main(
            [
                "evaluate",
                "--gallery-model",
                str(root / "g"),
                "--query-model",
                str(tmp_path / "q16"),
                "--data",
                DATA,
                "--no-latency",
            ]
        )
        == 2
    )
    assert "query model embeds 16-d vectors but the gallery model uses 32-d" in capsys.readouterr().err


def test_models_command_lists_flops(capsys):
    assert main(["models", "--role", "query"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2_050" in out and "MFLOPs" in out and "resnet8 " not in out
