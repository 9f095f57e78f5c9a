"""hvs.pipeline (reuse-or-run stages), hvs.profiles (benchmark profiles), hvs.results (readers, paired differences)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import hvs.evaluate
import hvs.train
from hvs import checkpoint as ckpt
from hvs.data import create_dataset
from hvs.errors import HVSError
from hvs.metrics import paired_bootstrap_ci, resample_weights, tpir_bootstrap
from hvs.pipeline import (
    FingerprintTable,
    Pipeline,
    PipelineError,
    evaluation_is_current,
    fastest_thread_count,
    folder_latency,
)
from hvs.profiles import data_entry, load_dataset, load_profile, profile_metrics
from hvs.results import ci_cell, cost_block, diff_cell, load_q2g, metric_block, paired_difference, pct, per_query_array

SPEC = "synthetic:classes=4,train_per_class=12,test_per_class=4,size=8"
ROOT = Path(__file__).resolve().parent.parent


def _cfg(out, **kw):
    return hvs.train.TrainConfig(
        out=str(out), data=SPEC, model="cnn-nano", embed_dim=8, epochs=1, batch_size=16, lr=0.05, **kw
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gallery model, a BCT query model for it, and an evaluation of the pair, made through a Pipeline."""
    root = tmp_path_factory.mktemp("pipe")
    data = create_dataset(SPEC)
    pipe = Pipeline(log=lambda _: None)
    assert pipe.train("train", _cfg(root / "g"), data=data)
    assert pipe.train("train", _cfg(root / "q", gallery=str(root / "g"), compat=["bct"]), data=data)
    assert pipe.evaluate("eval", root / "g", root / "q", root / "eval-q.json", data, n_boot=20, latency=False)
    assert [e["status"] for e in pipe.events] == ["ran", "ran", "ran"]
    return root, data


# -- the stage mechanism ------------------------------------------------------------------------


def test_stage_runs_once_then_reuses_and_respects_only(tmp_path):
    lines, calls = [], []
    out = tmp_path / "out"

    def run():
        calls.append(1)
        out.mkdir()
        (out / "done").write_text("x")

    pipe = Pipeline(log=lines.append)
    done = (out / "done").is_file
    assert pipe.stage("s", "a", done=done, run=run) and pipe.stage("s", "a", done=done, run=run)
    assert calls == [1] and [e["status"] for e in pipe.events] == ["ran", "reused"]
    assert lines[0].startswith("[ran] s a (") and lines[1] == "[reused] s a"
    # a stage outside `only` is skipped when missing, reused when there
    limited = Pipeline(only={"other"}, log=lines.append)
    assert not limited.stage("s", "b", done=lambda: False, run=run)
    assert limited.stage("s", "a", done=done, run=run)
    assert [e["status"] for e in limited.events] == ["skipped", "reused"] and calls == [1]
    assert lines[-2] == "[skipped] s b: not in --only"


def test_stage_redo_clears_a_partial_output_first(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    (out / "partial.json").write_text("{}")
    seen = []
    pipe = Pipeline(log=lambda _: None)
    pipe.stage("nas", "search", done=lambda: False, redo=out, run=lambda: seen.append(out.exists()))
    assert seen == [False]


def test_event_line_can_be_replaced_or_silenced(tmp_path):
    lines = []
    pipe = Pipeline(log=lines.append, event_line=lambda e: None if e["status"] == "ran" else f"<{e['name']}>")
    pipe.stage("s", "a", done=lambda: False, run=lambda: None)
    pipe.stage("s", "a", done=lambda: True, run=lambda: None)
    assert lines == ["<a>"]


# -- hvs's stages ---------------------------------------------------------------------------------


def test_finished_training_and_evaluation_are_reused(world, monkeypatch):
    root, data = world

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(hvs.train, "train", boom)
    monkeypatch.setattr(hvs.evaluate, "evaluate", boom)
    pipe = Pipeline(log=lambda _: None)
    assert pipe.train("train", _cfg(root / "g"), data=data)
    assert pipe.train("train", _cfg(root / "q", gallery=str(root / "g"), compat=["bct"]), data=data)
    r = pipe.evaluate("eval", root / "g", root / "q", root / "eval-q.json", data, n_boot=20, latency=False)
    assert r["query_model"]["fingerprint"] == ckpt.read_card(root / "q").fingerprint
    assert {e["status"] for e in pipe.events} == {"reused"}


def test_a_query_model_made_for_other_gallery_weights_is_refused_not_reused(world, tmp_path):
    root, data = world
    shutil.copytree(root / "g", tmp_path / "g")
    shutil.copytree(root / "q", tmp_path / "q")
    card = json.loads((tmp_path / "g" / ckpt.CONFIG).read_text())
    card["fingerprint"] = "0" * 16  # the gallery folder was retrained since
    (tmp_path / "g" / ckpt.CONFIG).write_text(json.dumps(card))
    pipe = Pipeline(log=lambda _: None)
    with pytest.raises(PipelineError) as e:
        pipe.train("train", _cfg(tmp_path / "q", gallery=str(tmp_path / "g"), compat=["bct"]), data=data)
    msg = str(e.value)
    assert isinstance(e.value, HVSError) and len(msg.splitlines()) == 1
    assert "is stale" in msg and "0" * 16 in msg and str(tmp_path / "q") in msg
    assert (tmp_path / "q" / ckpt.CONFIG).is_file()  # kept: the user decides


def test_an_evaluation_of_other_weights_is_redone(world, tmp_path):
    root, data = world
    ev = tmp_path / "eval-q.json"
    shutil.copy(root / "eval-q.json", ev)
    shutil.copy(root / "eval-q.npz", ev.with_suffix(".npz"))
    assert evaluation_is_current(ev, root / "g", root / "q")
    stale = json.loads(ev.read_text())
    stale["query_model"]["fingerprint"] = "f" * 16
    ev.write_text(json.dumps(stale))
    assert not evaluation_is_current(ev, root / "g", root / "q")
    assert not evaluation_is_current(tmp_path / "missing.json", root / "g", root / "q")
    pipe = Pipeline(log=lambda _: None)
    r = pipe.evaluate("eval", root / "g", root / "q", ev, data, n_boot=20, latency=False)
    assert pipe.events[-1]["status"] == "ran" and r["query_model"]["fingerprint"] != "f" * 16
    # the JSON without its per-query arrays: redone when allowed, reused when the stage may not run
    ev.with_suffix(".npz").unlink()
    only = Pipeline(only={"other"}, log=lambda _: None)
    assert only.evaluate("eval", root / "g", root / "q", ev, data) is not None
    assert only.events[-1]["status"] == "reused"


def test_fingerprint_table_keeps_entries_for_one_fingerprint(tmp_path):
    path = tmp_path / "latency.json"
    t = FingerprintTable(path)
    assert t.get("m", "aa") is None
    t.put("m", "aa", {"ms": 1.5})
    t.save()
    again = FingerprintTable(path)
    assert again.get("m", "aa") == {"fingerprint": "aa", "ms": 1.5}
    assert again.get("m", "bb") is None  # retrained: measure again
    mtime = path.stat().st_mtime_ns
    again.save()  # nothing changed: nothing written
    assert path.stat().st_mtime_ns == mtime


def test_fastest_thread_count_alternates_rounds_that_share_the_time():
    calls = []
    ms = {1: iter([3.0, 1.0, 2.0]), 4: iter([2.5, 2.5, 0.5])}
    by, fastest = fastest_thread_count(lambda t, sec: calls.append((t, sec)) or next(ms[t]), [1, 4], 0.6)
    assert by == {1: 2.0, 4: 2.5} and fastest == 1  # medians, not the single fastest reading
    assert calls == [(1, pytest.approx(0.2)), (4, pytest.approx(0.2))] * 3
    calls.clear()
    assert fastest_thread_count(lambda t, sec: calls.append((t, sec)) or 7.0, [2], 0.6) == ({2: 7.0}, 2)
    assert calls == [(2, 0.6)]  # one count: one round with the whole time


@pytest.mark.slow  # an ONNX export: ~20 s on 2 loaded cores
def test_folder_latency_times_torch_and_onnx_runtime(world):
    pytest.importorskip("onnxruntime")
    root, _ = world
    row = folder_latency(root / "q", threads=1, min_seconds=0.01)
    assert row["threads"] == 1 and row["torch_ms_batch1"] > 0
    assert row.get("ort_ms_batch1", 0) > 0, row.get("ort_error")
    both = folder_latency(root / "q", threads=2, min_seconds=0.03, ort_threads=[1])  # and at `threads`
    assert "ort_error" not in both, both["ort_error"]
    assert set(both["ort_ms_batch1_by_threads"]) == {"1", "2"} and both["threads"] == 2
    assert both["ort_ms_batch1"] == min(both["ort_ms_batch1_by_threads"].values())
    assert both["ort_ms_batch1"] == both["ort_ms_batch1_by_threads"][str(both["ort_threads"])]
    with pytest.raises(PipelineError, match="thread counts must be >= 1"):
        folder_latency(root / "q", ort_threads=[0])


# -- profiles ---------------------------------------------------------------------------------------


def test_profiles_load_and_map_data(tmp_path):
    profile, path = load_profile("tiny", ROOT / "configs")
    assert path.name == "tradeoff_tiny.yaml" and "paragon" in profile
    with pytest.raises(PipelineError, match="no profile 'nope'"):
        load_profile("nope", ROOT / "configs")
    assert data_entry({}, "kanji-fonts") == {"spec": "kanji-fonts", "protocol": "open"}
    assert data_entry({"data": {"x": "synthetic:classes=2"}}, "x") == {
        "spec": "synthetic:classes=2",
        "protocol": "closed",
    }
    assert profile_metrics({}, "fashion-mnist")[0] == "recall@1"
    assert profile_metrics({}, "other", ["map"]) == ["map"]
    full, train = load_dataset({"data": {"x": SPEC}, "train_subset": 10}, "x")
    assert len(train.train) == 10 < len(full.train) and len(train.query) == len(full.query)


# -- results ----------------------------------------------------------------------------------------


def test_metric_and_cost_blocks_read_an_evaluation(world):
    root, _ = world
    r = json.loads((root / "eval-q.json").read_text())
    b = metric_block(r, "recall@1")
    assert b["q->g"] == r["metrics"]["query->gallery"]["recall@1"]
    assert b["g->g_ci95"] == r["metrics"]["gallery->gallery"]["recall@1_ci95"]
    assert b["gap"] == r["gap_to_paragon"]["recall@1"]["gap"] and "holds" in b["criterion"]
    assert metric_block(r, "recall@999")["q->g"] is None
    c = cost_block(r, "query")
    assert c["flops"] == r["cost"]["query"]["flops"] and c["latency_ms_batch1"] is None  # latency=False


def test_paired_difference_is_the_paired_bootstrap_of_the_right_arrays():
    rng = np.random.default_rng(0)
    a = {"hit@1": rng.integers(0, 2, 50).astype(float), "ap": rng.random(50)}
    b = {"hit@1": rng.integers(0, 2, 50).astype(float), "ap": rng.random(50)}
    for metric, arr in (("recall@1", "hit@1"), ("map", "ap")):
        assert per_query_array(metric) == arr
        d, ci = paired_difference(a, b, metric, n_boot=100)
        ref = paired_bootstrap_ci(a[arr], b[arr], n_boot=100)
        assert (d, ci) == (ref[0], [ref[1], ref[2]])
    assert paired_difference(a, a, "map", n_boot=50) == (0.0, [0.0, 0.0])
    assert paired_difference(None, b, "map") is None and paired_difference(a, b, "tar@far=1e-02") is None


def test_paired_tpir_difference_uses_the_same_resamples_for_both():
    def probes(seed):
        rng = np.random.default_rng(seed)
        return {
            "probe_mated_score": rng.random(20),
            "probe_mated_query": np.arange(20),
            "probe_nonmated_score": rng.random(20),
            "probe_nonmated_query": np.arange(20),
        }

    a, b = probes(1), probes(2)
    d, ci = paired_difference(a, b, "tpir@fpir=1e-01", n_boot=200)
    strip = lambda x: {k.removeprefix("probe_"): v for k, v in x.items()}  # noqa: E731
    ones = np.ones((1, 20), np.int32)
    assert d == pytest.approx(tpir_bootstrap(strip(a), 0.1, ones)[0] - tpir_bootstrap(strip(b), 0.1, ones)[0])
    w = resample_weights(20, 200, 0)
    reps = tpir_bootstrap(strip(a), 0.1, w) - tpir_bootstrap(strip(b), 0.1, w)
    assert ci == [pytest.approx(np.quantile(reps, 0.025)), pytest.approx(np.quantile(reps, 0.975))]


def test_load_q2g_reads_the_per_query_arrays(world, tmp_path):
    root, _ = world
    q2g = load_q2g(root / "eval-q.npz")
    assert "hit@1" in q2g and "ap" in q2g
    assert load_q2g(tmp_path / "none.npz") is None and load_q2g(None) is None


def test_cells_format_points_intervals_and_significance():
    assert pct(0.81234) == "81.23" and pct(0.01, True) == "+1.00" and pct(None) == "-" and pct(float("nan")) == "-"
    assert ci_cell([0.1, 0.2]) == " [10.00,20.00]" and ci_cell(None) == ""
    assert diff_cell((0.02, [0.01, 0.03])) == "+2.00 [+1.00,+3.00] *"
    assert diff_cell((0.0, [-0.01, 0.01])) == "+0.00 [-1.00,+1.00]" and diff_cell(None) == "-"
