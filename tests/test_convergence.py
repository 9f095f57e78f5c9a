"""hvs.convergence: the schedule ladder's rule, its validation split, and the paragon it gives a benchmark."""

import json
from pathlib import Path

import pytest
import torch
from script_loader import load_script

from hvs import checkpoint as ckpt
from hvs.convergence import ConvergenceError, ConvergeOptions, Rung, check_schedules, decide, gain_ci, val_split
from hvs.data import create_dataset
from hvs.pipeline import PipelineError
from hvs.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent
SPEC = "synthetic:classes=48,train_per_class=6,test_per_class=4,size=16"


def _rung(epochs, r1, hits=()):
    return Rung(epochs, f"e{epochs}", {"recall@1": r1, "map": r1}, list(hits))


def test_the_ladder_stops_at_the_first_doubling_that_gains_less_than_min_gain():
    sched = [4, 8, 16, 32]
    d = decide([], sched, 0.01)
    assert d["next"] == 4 and not d["converged"] and d["best"] is None
    d = decide([_rung(4, 0.80)], sched, 0.01)
    assert d["next"] == 8 and not d["converged"] and d["gains"] == []
    d = decide([_rung(4, 0.80), _rung(8, 0.85)], sched, 0.01)
    assert d["next"] == 16 and not d["converged"] and d["gains"][0]["gain"] == pytest.approx(0.05)
    # 8 -> 16 gains 0.005 < 0.01: converged, stop; the better of the two is kept
    d = decide([_rung(4, 0.80), _rung(8, 0.85), _rung(16, 0.855)], sched, 0.01)
    assert d["next"] is None and d["converged"] and d["best"] == 16
    # a longer schedule that is worse: converged, and the shorter one is kept
    d = decide([_rung(4, 0.80), _rung(8, 0.79)], sched, 0.01)
    assert d["converged"] and d["best"] == 4 and d["last_gain"] == pytest.approx(-0.01)
    # every doubling still pays: the schedules run out, not converged
    rungs = [_rung(4, 0.6), _rung(8, 0.7), _rung(16, 0.8), _rung(32, 0.9)]
    d = decide(rungs, sched, 0.01)
    assert d["next"] is None and not d["converged"] and d["best"] == 32
    # ties keep the shorter schedule
    assert decide([_rung(4, 0.8), _rung(8, 0.8)], sched, 0.01)["best"] == 4


@pytest.mark.parametrize(
    "schedules, min_gain, match",
    [
        ([8], 0.01, "at least two"),
        ([8, 8], 0.01, "strictly increasing"),
        ([0, 4], 0.01, "positive"),
        (["x", 4], 0.01, "whole epoch counts"),
        ([5.7, 10], 0.01, "whole epoch counts"),
        ([4, 8], -0.1, "min_gain"),
        ([4, 8], None, "min_gain"),
    ],
)
def test_bad_schedules_are_one_line_errors(schedules, min_gain, match):
    with pytest.raises(ConvergenceError, match=match) as e:
        check_schedules(schedules, min_gain)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "conv, match",
    [
        (True, "must be a mapping"),
        ({"schedules": [1, 2], "metric": "map"}, "unknown converge option"),
        ({"min_gain": 0.1}, "needs schedules"),
        ({"schedules": [1, 2], "val_fraction": 1.5}, "val_fraction"),
        ({"schedules": [1, 2], "val_split": "classes"}, "val_split"),
        ({"schedules": [1, 2], "val_max_per_class": 1}, "val_max_per_class"),
    ],
)
def test_bad_converge_options_are_one_line_errors(conv, match):
    with pytest.raises(ConvergenceError, match=match) as e:
        ConvergeOptions.parse(conv)
    assert "\n" not in str(e.value)
    assert ConvergeOptions.parse({"schedules": [2, 4]}).as_dict()["schedules"] == [2, 4]


def test_rungs_out_of_order_are_refused():
    with pytest.raises(ConvergenceError, match="not the first schedules"):
        decide([_rung(8, 0.8)], [4, 8], 0.01)


def test_gain_ci_is_paired_over_the_same_queries():
    a = _rung(4, 0.5, [1, 0, 1, 0, 1, 0, 1, 0])
    b = _rung(8, 0.75, [1, 1, 1, 0, 1, 1, 1, 0])
    gain, lo, hi = gain_ci(a, b)
    assert gain == pytest.approx(0.25) and lo <= gain <= hi and lo >= 0  # b never misses where a hits
    assert gain_ci(a, _rung(8, 0.75)) is None


@pytest.mark.parametrize("protocol, kind", [("open", "identities"), ("closed", "images")])
def test_val_split_holds_out_identities_for_open_set_and_images_for_closed_set(protocol, kind):
    data = create_dataset(SPEC, protocol=protocol)
    rest, (vq, vq_lab), (vg, vg_lab), got = val_split(data, "auto", fraction=0.25, seed=3)
    assert got == kind
    assert len(rest.train) + len(vq_lab) + len(vg_lab) == len(data.train)
    train_ids, val_ids = set(rest.train.labels.tolist()), set(vq_lab.tolist()) | set(vg_lab.tolist())
    if kind == "identities":
        assert not train_ids & val_ids, "a held-out identity must never train"
    else:
        assert val_ids <= train_ids, "closed-set validation images are of training classes"
    assert set(vq_lab.tolist()) <= set(vg_lab.tolist()), "every val query has a positive in the val gallery"
    assert vq.dtype == torch.uint8 and len(vq) == len(vq_lab)
    # the same seed carves the same split
    again = val_split(data, "auto", fraction=0.25, seed=3)
    assert torch.equal(again[1][1], vq_lab) and torch.equal(again[2][1], vg_lab)


def test_copy_model_folder_keeps_the_card_and_refuses_tampered_weights(tmp_path):
    from hvs.models import create_model

    model = create_model("cnn-nano", embed_dim=8, in_chans=1, image_size=16)
    card = ckpt.ModelCard(model="cnn-nano", embed_dim=8, in_chans=1, image_size=16, mean=[0.5], std=[0.5])
    ckpt.save_model_folder(tmp_path / "src", model, card)
    (tmp_path / "src" / "state.pt").write_bytes(b"resumable state, not copied")
    (tmp_path / "src" / "log.csv").write_text("epoch\n0\n")
    out = ckpt.copy_model_folder(tmp_path / "src", tmp_path / "dst")
    src_card, dst_card = ckpt.read_card(tmp_path / "src"), ckpt.read_card(tmp_path / "dst")
    assert out.fingerprint == dst_card.fingerprint == src_card.fingerprint
    assert (tmp_path / "dst" / "log.csv").is_file() and not (tmp_path / "dst" / "state.pt").exists()
    ckpt.load_model(tmp_path / "dst")  # verifies the weights against the card
    weights = tmp_path / "src" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ckpt.CheckpointError, match="do not match the fingerprint"):
        ckpt.copy_model_folder(tmp_path / "src", tmp_path / "dst")
    ckpt.load_model(tmp_path / "dst")  # the earlier copy is untouched


def test_a_profile_extends_another_section_by_section(tmp_path):
    quick, _ = load_profile("quick", ROOT / "configs")
    fast, _ = load_profile("quick-fast", ROOT / "configs")
    assert "extends" not in fast
    assert fast["paragon"] == quick["paragon"] and fast["data"] == quick["data"]
    assert fast["supernet"]["space"] == "fast-cnn"
    assert "ks_list" not in fast["supernet"]["supernet"], "a section is replaced whole, never merged"
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\nseeds: [1]\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(PipelineError, match="goes round in a circle"):
        load_profile(str(tmp_path / "a.yaml"), ROOT / "configs")
    (tmp_path / "c.yaml").write_text("extends: nope\n")
    with pytest.raises(PipelineError, match="no profile 'nope'"):
        load_profile(str(tmp_path / "c.yaml"), ROOT / "configs")


def _load_benchmark():
    return load_script("benchmarks/tradeoff.py", "tradeoff_bench_conv")


def test_the_benchmark_trains_its_paragon_to_convergence_and_reports_the_curve(tmp_path):
    """tiny's paragon on a ladder of 1, 2, 3 epochs with min_gain 1.0 (no doubling can gain a whole
    R@1): the ladder stops after two rungs, keeps the better, copies it to paragon/ and reports."""
    profile = tmp_path / "conv.yaml"
    profile.write_text(
        "extends: tiny\n"
        "paragon: {model: resnet8, batch_size: 32, lr: 0.1, train_subset: null,\n"
        "          converge: {schedules: [1, 2, 3], min_gain: 1.0, val_fraction: 0.25, val_split: identities}}\n"
    )
    bench = _load_benchmark()
    args = ["--data", "kanji-fonts", "--profile", str(profile), "--out", str(tmp_path), "--only", "paragon", "--quiet"]
    assert bench.main([*args, "--plot"]) == 0
    assert (tmp_path / "kanji-fonts" / "conv_paragon_curve.png").stat().st_size > 0
    sd = tmp_path / "kanji-fonts" / "conv" / "seed0"
    curve = json.loads((sd / "paragon-curve.json").read_text())
    assert [r["epochs"] for r in curve["rungs"]] == [1, 2] and curve["converged"]
    assert curve["val_split"] == "identities" and curve["next"] is None
    kept = sd / "paragon-curve" / f"e{curve['best']}"
    assert ckpt.read_card(sd / "paragon").fingerprint == ckpt.read_card(kept).fingerprint
    assert not (sd / "paragon-curve" / "e3").exists()
    md = (tmp_path / "kanji-fonts" / "conv.md").read_text()
    assert "## The paragon's learning curve" in md and "**converged**" in md
    # a re-run reuses the paragon and its curve
    assert bench.main(args) == 0
    again = json.loads((tmp_path / "kanji-fonts" / "conv.json").read_text())
    assert [e["status"] for e in again["stages"] if e["stage"] == "paragon"] == ["reused"]
    assert again["meta"]["0"]["paragon_curve"]["best"] == curve["best"]


def _conv_profile(path, converge="{schedules: [1, 2], min_gain: 1.0, val_fraction: 0.25, val_split: identities}"):
    para = "{model: resnet8, epochs: 1, batch_size: 32, lr: 0.1" + (f", converge: {converge}" if converge else "") + "}"
    path.write_text(f"extends: tiny\nparagon: {para}\n")
    return ["--data", "kanji-fonts", "--profile", str(path), "--out", str(path.parent), "--only", "paragon", "--quiet"]


def test_a_ladder_refuses_what_it_did_not_make(tmp_path, capsys):
    """A paragon trained without the ladder, rungs trained with other options and a bad option: each a
    one-line error before anything is trained or overwritten."""
    import shutil

    bench = _load_benchmark()
    profile = tmp_path / "p.yaml"
    assert bench.main(_conv_profile(profile, converge=None)) == 0  # a plain 1-epoch paragon
    sd = tmp_path / "kanji-fonts" / "p" / "seed0"
    plain = ckpt.read_card(sd / "paragon").fingerprint
    capsys.readouterr()
    assert bench.main(_conv_profile(profile)) == 2
    err = capsys.readouterr().err.strip()
    assert "was not made by this convergence ladder" in err and len(err.splitlines()) == 1
    assert ckpt.read_card(sd / "paragon").fingerprint == plain, "the existing paragon is untouched"
    # rungs of one ladder are not reused by a ladder with other options
    shutil.rmtree(sd / "paragon")
    assert bench.main(_conv_profile(profile)) == 0
    shutil.rmtree(sd / "paragon")
    (sd / "paragon-curve.json").unlink()
    capsys.readouterr()
    args = _conv_profile(profile, "{schedules: [1, 2], min_gain: 1.0, val_fraction: 0.5, val_split: identities}")
    assert bench.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "was trained with other options" in err and len(err.splitlines()) == 1
    # an unknown converge option
    assert bench.main(_conv_profile(profile, "{schedules: [1, 2], bogus: 1}")) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown converge option(s): bogus" in err and len(err.splitlines()) == 1
