"""CMP-NAS: the OFA supernet (hvs.models.ofa), search (hvs.nas.search), training, export, inheritance.

Everything runs on narrow supernets and tiny synthetic data; torch runs on one thread here (on a
shared 2-core machine two threads are ~10x slower for these tiny tensors)."""

import json
import random
import statistics

import pytest
import torch
from torch import nn

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.data import create_dataset
from hvs.models import create_model
from hvs.models.cost import count_flops
from hvs.models.ofa import ArchError, ArchSpace, OFAMobileNetV3Supernet, make_divisible
from hvs.nas import (
    Budget,
    LatencyTable,
    NASError,
    carve_identities,
    carve_validation,
    compare_latency,
    phase_plan,
    prepare_data,
    random_search,
    regularized_evolution,
    sample_under_budget,
)
from hvs.nas import train as nas_train

TINY = {
    "stem_width": 8,
    "first_width": 8,
    "stage_widths": [8, 16, 24],
    "stage_strides": [2, 2, 1],
    "stage_acts": ["relu", "h_swish", "h_swish"],
    "stage_se": [False, True, True],
    "final_width": 48,
    "feature_width": 64,
}
DATA = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _supernet(**kw) -> OFAMobileNetV3Supernet:
    net = OFAMobileNetV3Supernet(embed_dim=16, in_chans=1, **{**TINY, **kw})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
            for name, p in m.named_parameters(recurse=False):
                if name.startswith("matrix_"):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


# ---------------------------------------------------------------------------------------------
# The supernet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{}, {"kernel_transform": True, "width_mult_list": [0.5, 1.0], "resolution_list": [10, 12, 16]}]
)
def test_extracted_subnet_equals_active_supernet(kw):
    net = _supernet(**kw)
    x = torch.randn(3, 1, 12, 12)
    rng = random.Random(0)
    archs = [net.max_arch(), net.min_arch()] + [net.space.sample(rng) for _ in range(5)]
    for arch in archs:
        net.set_active_subnet(arch)
        with torch.no_grad():
            expected = net(x)
            got = net.get_active_subnet().eval()(x)
        assert got.shape == (3, 16)
        assert torch.allclose(expected, got, atol=1e-5), net.space.key(arch)
    assert net.training is False


def test_extraction_copies_weights():
    net = _supernet()
    net.set_active_subnet(net.min_arch())
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        before = net(x)
        sub = net.get_active_subnet()
        for p in sub.parameters():
            p.zero_()
        assert torch.equal(net(x), before)  # the sub-network owns copies, not views


def test_random_subnets_respect_the_choices():
    choices = {"ks_list": [3, 5], "expand_list": [2, 3], "depth_list": [1, 3]}
    net = _supernet(**choices)
    rng = random.Random(3)
    seen = {"k": set(), "e": set(), "d": set()}
    for _ in range(12):
        arch = net.sample_active_subnet(rng)
        assert set(arch["ks"]) <= {3, 5} and set(arch["e"]) <= {2, 3} and set(arch["d"]) <= {1, 3}
        sub = net.get_active_subnet()
        blocks = list(sub.backbone.blocks.items())[1:]  # block 0: the fixed first layer
        assert len(blocks) == sum(arch["d"])
        for (name, block), (_, _, slot) in zip(blocks, net.space.active_layers(arch)):
            assert int(name) == 1 + slot
            k = block.depth_conv.conv.kernel_size[0]
            cin = block.inverted_bottleneck.conv.in_channels
            mid = block.depth_conv.conv.in_channels
            assert k == arch["ks"][slot] and mid == make_divisible(round(cin * arch["e"][slot]), 8)
            seen["k"].add(k)
            seen["e"].add(arch["e"][slot])
        for s, d in enumerate(arch["d"]):
            seen["d"].add(d)
            assert sum(1 for _, _, slot in net.space.active_layers(arch) if slot // 3 == s) == d
    assert seen == {"k": {3, 5}, "e": {2, 3}, "d": {1, 3}}


@pytest.mark.parametrize("kw", [{}, {"width_mult_list": [0.5, 1.0], "resolution_list": [8, 12, 16]}])
def test_analytic_flops_equal_flop_counter(kw):
    net = _supernet(**kw)
    rng = random.Random(1)
    for arch in [net.max_arch(), net.min_arch()] + [net.space.sample(rng) for _ in range(6)]:
        net.set_active_subnet(arch)
        assert net.flops(arch, 12) == count_flops(net.get_active_subnet(), (1, 12, 12)), net.space.key(arch)


def test_arch_round_trips_through_json_and_model_folders(tmp_path):
    net = _supernet(width_mult_list=[0.5, 1.0])
    arch = net.sample_active_subnet(7)
    again = json.loads(json.dumps(arch))
    assert again == arch and net.space.key(again) == net.space.key(arch)
    sub = net.get_active_subnet().eval()
    kwargs = json.loads(json.dumps(net.subnet_kwargs()))
    card = ckpt.ModelCard(
        model="ofa-mbv3",
        embed_dim=16,
        in_chans=1,
        image_size=12,
        mean=[0.5],
        std=[0.5],
        role="query",
        model_kwargs=kwargs,
    )
    ckpt.save_model_folder(tmp_path / "q", sub, card)
    loaded, _ = ckpt.load_model(tmp_path / "q")
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(x), sub(x), atol=1e-6)
    rebuilt = OFAMobileNetV3Supernet(**json.loads(json.dumps(net.config())))
    assert rebuilt.config() == net.config()
    assert set(rebuilt.state_dict()) == set(net.state_dict())


def test_bad_arch_is_a_one_line_error():
    net = _supernet()
    arch = net.max_arch()
    arch["ks"][2] = 9
    with pytest.raises(ArchError, match=r"arch ks\[2\]=9 is not a choice of this supernet \[3, 5, 7\]"):
        net.set_active_subnet(arch)
    with pytest.raises(ArchError, match="arch d has 2 entries; this supernet needs 3"):
        net.set_active_subnet({**net.max_arch(), "d": [2, 2]})


def test_registered_model_defaults_to_the_largest_ofa_subnet():
    model = create_model("ofa-mbv3", embed_dim=32)
    assert len(model.backbone.blocks) == 1 + 5 * 4


# ---------------------------------------------------------------------------------------------
# Search: budget, evolution, determinism
# ---------------------------------------------------------------------------------------------


def _target_reward(space: ArchSpace, target: dict):
    """A known function of the arch: the share of active layers (and stage depths) matching target."""

    def reward(arch: dict) -> float:
        hits = sum(
            (arch["ks"][slot] == target["ks"][slot]) + (arch["e"][slot] == target["e"][slot])
            for _, _, slot in space.active_layers(arch)
        )
        return hits / (2 * space.num_layers) + sum(a == b for a, b in zip(arch["d"], target["d"])) / space.num_stages

    return reward


def _toy_cost(space: ArchSpace):
    return lambda a: float(sum(a["ks"][slot] ** 2 * a["e"][slot] for _, _, slot in space.active_layers(a)))


def test_evolution_beats_random_search_at_equal_evaluations():
    space = ArchSpace(num_stages=3)
    budget = Budget("flops", 1200.0, _toy_cost(space))
    gains = []
    for seed in range(4):
        rng = random.Random(100 + seed)
        target = space.sample(rng)
        while budget.cost(target) > budget.limit:
            target = space.sample(rng)
        reward = _target_reward(space, target)
        evo = regularized_evolution(
            space,
            reward,
            budget,
            population=20,
            iterations=100,
            parents=0.25,
            mutation_prob=0.1,
            mutate_ratio=0.5,
            seed=seed,
        )
        rnd = random_search(space, reward, budget, evaluations=evo.evaluations, seed=seed)
        assert rnd.evaluations == evo.evaluations
        assert all(r["cost"] <= budget.limit for r in evo.history + rnd.history)
        gains.append(evo.best["reward"] - rnd.best["reward"])
    assert statistics.mean(gains) > 0.1, gains


def test_same_seed_same_search_and_budget_in_every_candidate():
    net = _supernet()
    limit = (net.flops(net.min_arch(), 12) + net.flops(net.max_arch(), 12)) / 2
    budget = Budget("flops", limit, lambda a: float(net.flops(a, 12)))
    reward = _target_reward(net.space, net.max_arch())
    runs = [
        regularized_evolution(
            net.space, reward, budget, population=10, iterations=30, seed=5, annotate=lambda a: {"cost": budget.cost(a)}
        )
        for _ in range(2)
    ]
    assert [r["key"] for r in runs[0].history] == [r["key"] for r in runs[1].history]
    assert runs[0].best == runs[1].best
    assert all(r["cost"] <= limit for r in runs[0].history)
    other = regularized_evolution(net.space, reward, budget, population=10, iterations=30, seed=6)
    assert [r["key"] for r in other.history] != [r["key"] for r in runs[0].history]


def test_infeasible_budget_names_the_smallest_cost():
    net = _supernet()
    smallest = net.flops(net.min_arch(), 12) / 1e6
    budget = Budget("flops", 0.1e6, lambda a: float(net.flops(a, 12)))
    with pytest.raises(
        NASError,
        match=rf"^budget 0.1 MFLOPs is infeasible: the smallest sub-network needs "
        rf"{smallest:.4g} MFLOPs$",
    ):
        regularized_evolution(net.space, lambda a: 0.0, budget, population=4, iterations=2)


def test_latency_table_predicts_and_is_reused(tmp_path):
    net = _supernet()
    table = LatencyTable(net, 12, tmp_path, min_seconds=0.0, repeats=3)
    archs = [net.max_arch(), net.min_arch()]
    assert all(table.predict(a) > 0 for a in archs)
    # (no ordering of max vs min asserted: these are wall-clock timings on a shared CPU)
    table.save()
    again = LatencyTable(net, 12, tmp_path, min_seconds=0.0, repeats=3)
    again.predict(archs[0])
    assert again.measured == 0 and again.entries == table.entries
    rows = compare_latency(net, table, archs[:1], min_seconds=0.0)
    assert rows[0]["predicted_ms"] > 0 and rows[0]["measured_ms"] > 0


@pytest.mark.parametrize("runtime", ["ort", "ort-int8"])
def test_onnx_runtime_latency_table_is_its_own_file_and_is_reused(tmp_path, runtime):
    """A unit exported to ONNX and timed in ONNX Runtime: the same units as the torch table, a file of
    its own (every number depends on the runtime), reused without measuring again."""
    net = _supernet()
    table = LatencyTable(net, 12, tmp_path, min_seconds=0.0, repeats=2, runtime=runtime)
    arch = net.min_arch()
    assert table.predict(arch) > 0 and table.measured == len(table.entries) > 0
    table.save()
    assert table.path.name == f"latency_table_{runtime}_b1_t{torch.get_num_threads()}.json"
    assert json.loads(table.path.read_text())["meta"]["runtime"] == runtime
    torch_table = LatencyTable(net, 12, tmp_path, min_seconds=0.0, repeats=2)
    assert torch_table.entries == {} and torch_table.path != table.path
    again = LatencyTable(net, 12, tmp_path, min_seconds=0.0, repeats=2, runtime=runtime)
    again.predict(arch)
    assert again.measured == 0 and again.entries == table.entries
    rows = compare_latency(net, table, [arch], min_seconds=0.0)  # the sub-network in the same runtime
    assert rows[0]["predicted_ms"] > 0 and rows[0]["measured_ms"] > 0


def test_latency_agreement_against_hand_computed_ranks():
    from hvs.nas.latency import latency_agreement

    rows = [{"predicted_ms": p, "measured_ms": m} for p, m in [(1.0, 2.0), (2.0, 4.0), (3.0, 3.0), (4.0, 8.0)]]
    # ranks: predicted 0,1,2,3; measured 0,2,1,3 -> Spearman 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2/60 = 0.8
    got = latency_agreement(rows)
    assert got["n"] == 4 and got["spearman"] == pytest.approx(0.8)
    assert got["ratio_median"] == pytest.approx(0.5) and got["ratio_range"] == [0.5, 1.0]
    assert latency_agreement(rows[:2])["spearman"] is None  # too few to rank
    tied = [{"predicted_ms": 1.0, "measured_ms": m} for m in (1.0, 2.0, 3.0)]
    assert latency_agreement(tied)["spearman"] is None  # a constant side has no ranking


def test_keep_measured_fit_walks_down_the_rewards_until_a_measurement_fits():
    from hvs.nas.search import keep_measured_fit

    history = [
        {"key": "a", "arch": "A", "reward": 0.5},
        {"key": "b", "arch": "B", "reward": 0.9},
        {"key": "b", "arch": "B", "reward": 0.9},  # the same network again: measured once
        {"key": "c", "arch": "C", "reward": 0.7},
        {"key": "d", "arch": "D", "reward": 0.7},  # equal to c, later: after it
    ]
    ms = {"A": 1.0, "B": 3.0, "C": 2.5, "D": 2.0}
    calls = []

    def measure(arch):
        calls.append(arch)
        return ms[arch]

    kept, kept_ms, checks = keep_measured_fit(history, measure, limit=2.0)
    assert kept["key"] == "d" and kept_ms == 2.0 and calls == ["B", "C", "D"]  # <= the limit fits
    assert [c["key"] for c in checks] == ["b", "c", "d"]
    assert checks[0] == {"key": "b", "reward": 0.9, "measured_ms": 3.0}
    calls.clear()
    none = keep_measured_fit(history, measure, limit=0.5, max_checks=2)
    assert none[:2] == (None, None) and calls == ["B", "C", "D", "A"]  # 2 by reward, then 2 more (no prediction:
    # equal, so by reward)
    assert [c.get("by") for c in none[2]] == [None, None, "latency", "latency"]
    assert keep_measured_fit(history, measure, limit=9.0)[0]["key"] == "b"  # the table's pick fits: kept


def test_keep_measured_fit_falls_back_to_the_fastest_predicted_and_keeps_the_best_that_fits():
    """None of the best by reward fits: the fastest-predicted candidates are measured next, and of
    those that fit the one with the highest reward is kept, not the first or the fastest."""
    from hvs.nas.search import keep_measured_fit

    rewards = {"p": 0.9, "q": 0.8, "r": 0.3, "s": 0.5, "t": 0.4, "u": 0.2}
    predicted = {"p": 0.05, "q": 0.05, "r": 0.01, "s": 0.02, "t": 0.03, "u": 0.04}
    measured = {"p": 0.07, "q": 0.06, "r": 0.03, "s": 0.039, "t": 0.041, "u": 0.02}
    history = [{"key": k, "arch": k, "reward": rewards[k], "latency_ms": predicted[k]} for k in rewards]
    calls = []

    def measure(arch):
        calls.append(arch)
        return measured[arch]

    kept, kept_ms, checks = keep_measured_fit(history, measure, limit=0.04, max_checks=2)
    assert calls == ["p", "q", "r", "s"]  # by reward (p, q), then by prediction (r, s); t and u never measured
    assert kept["key"] == "s" and kept_ms == 0.039  # r and s fit; s has the higher reward
    assert [c.get("by") for c in checks] == [None, None, "latency", "latency"]
    tied = [{**h, "latency_ms": 0.01} for h in history]  # one prediction for all: best reward first
    calls.clear()
    keep_measured_fit(tied, measure, limit=0.0, max_checks=2)
    assert calls == ["p", "q", "s", "t"]
    with pytest.raises(NASError, match="latency checks must be >= 1, got 0"):
        keep_measured_fit(history, measure, limit=1.0, max_checks=0)


def test_a_latency_search_keeps_the_best_pick_that_measures_within_the_budget(nas_runs, tmp_path, monkeypatch):
    """The table's pick measured over the budget: the next best candidate that measures within it
    is kept, and best.json says how; when none of the checks fits, the table's pick stays, flagged."""
    import hvs.nas.search as nas_search

    measured = []

    def fake(supernet, arch, image_size, batch_size=1, min_seconds=0.3, runtime="torch", threads=None):
        measured.append(supernet.space.key(arch))
        return 100.0 if len(measured) == 1 else 1.0

    monkeypatch.setattr(nas_search, "measure_subnet_latency", fake)
    cfg = dict(supernet=str(nas_runs / "s"), gallery=str(nas_runs / "g"), latency_ms=50.0, latency_runtime="torch")
    cfg.update(population=6, iterations=6, bn_images=16)
    best = nas_search.run_search(nas_search.SearchConfig(out=str(tmp_path / "a"), **cfg), progress=False, log=print)
    fit = best["latency_fit"]
    assert fit["kept_by"] == "measured" and [c["measured_ms"] for c in fit["checked"]] == [100.0, 1.0]
    assert best["key"] == fit["checked"][1]["key"] != fit["checked"][0]["key"] and best["latency_ms_measured"] == 1.0
    assert json.loads((tmp_path / "a" / "best.json").read_text())["key"] == best["key"]
    monkeypatch.setattr(nas_search, "measure_subnet_latency", lambda *a, **k: 100.0)
    best = nas_search.run_search(nas_search.SearchConfig(out=str(tmp_path / "b"), **cfg), progress=False, log=print)
    assert best["latency_fit"]["kept_by"] == "table" and len(best["latency_fit"]["checked"]) >= 2
    assert best["key"] == best["latency_fit"]["checked"][0]["key"] and best["latency_ms_measured"] == 100.0
    measured.clear()  # one check by reward over the budget, then the fastest predicted fits
    monkeypatch.setattr(nas_search, "measure_subnet_latency", fake)
    one = nas_search.SearchConfig(out=str(tmp_path / "c"), latency_checks=1, **cfg)
    best = nas_search.run_search(one, progress=False, log=print)
    fit = best["latency_fit"]
    assert fit["kept_by"] == "measured, fastest predicted"
    assert [c.get("by") for c in fit["checked"]] == [None, "latency"]
    assert best["key"] == fit["checked"][1]["key"] != fit["checked"][0]["key"] and best["latency_ms_measured"] == 1.0


def test_a_budget_the_table_calls_infeasible_is_measured_end_to_end():
    from hvs.nas.common import InfeasibleBudget
    from hvs.nas.search import Budget, measured_feasibility

    class Space:  # the smallest sub-network is all a feasibility check reads
        def min_arch(self):
            return "S"

    table = {"S": 0.06, "T": 0.05}.__getitem__
    budget = Budget("latency", 0.04, table)
    same, info = measured_feasibility(Space(), Budget("latency", 0.07, table), lambda a: 1 / 0)
    assert info is None and same.limit == 0.07  # feasible on the table: nothing measured
    scaled, info = measured_feasibility(Space(), budget, lambda a: 0.03)  # the table reads it 2x high
    assert scaled.limit == pytest.approx(0.04 * 0.06 / 0.03) and scaled.ok("S") and scaled.cost is table
    assert info == {
        "limit_ms": 0.04,
        "table_limit_ms": 0.08,
        "smallest_predicted_ms": 0.06,
        "smallest_measured_ms": 0.03,
    }
    with pytest.raises(InfeasibleBudget, match="needs 0.06 ms on the latency table, 0.045 ms measured end to end"):
        measured_feasibility(Space(), budget, lambda a: 0.045)


def test_a_latency_search_the_table_calls_infeasible_runs_when_the_smallest_measures_within(
    nas_runs, tmp_path, monkeypatch
):
    import hvs.nas.search as nas_search
    from hvs.nas.common import InfeasibleBudget

    # 1 us: below any table's smallest sub-network; every measurement (faked) 0.1 us
    monkeypatch.setattr(nas_search, "measure_subnet_latency", lambda *a, **k: 1e-4)
    cfg = dict(supernet=str(nas_runs / "s"), gallery=str(nas_runs / "g"), latency_ms=1e-3, latency_runtime="torch")
    cfg.update(population=4, iterations=4, bn_images=16)
    best = nas_search.run_search(nas_search.SearchConfig(out=str(tmp_path / "a"), **cfg), progress=False, log=print)
    r = best["latency_fit"]["rescaled"]
    assert r["limit_ms"] == 1e-3 and r["smallest_measured_ms"] == 1e-4
    assert r["table_limit_ms"] == pytest.approx(10 * r["smallest_predicted_ms"], rel=1e-4)
    assert best["budget"]["limit"] == 1e-3 and best["budget"]["table_limit"] > 1e-3
    assert best["latency_fit"]["kept_by"] == "measured" and best["latency_fit"]["checked"][0]["measured_ms"] == 1e-4
    monkeypatch.setattr(nas_search, "measure_subnet_latency", lambda *a, **k: 1.0)
    with pytest.raises(InfeasibleBudget, match="measured end to end"):
        nas_search.run_search(nas_search.SearchConfig(out=str(tmp_path / "b"), **cfg), progress=False, log=print)
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_a_latency_search_measures_on_the_thread_count_it_is_given(nas_runs, tmp_path, monkeypatch):
    """--latency-threads: the table, the end-to-end checks and best.json all on the device's count,
    while the search itself keeps torch's; a count below 1 is refused before anything is written."""
    import hvs.nas.latency as lat
    import hvs.nas.search as nas_search

    seen, compared, scored = [], [], []
    monkeypatch.setattr(nas_search, "measure_subnet_latency", lambda *a, **k: seen.append(k["threads"]) or 1e-4)
    monkeypatch.setattr(lat, "measure_subnet_latency", lambda *a, **k: compared.append(k["threads"]) or 1e-4)
    scores = nas_search.SubnetScorer.scores
    monkeypatch.setattr(
        nas_search.SubnetScorer,
        "scores",
        lambda self, arch: scored.append(torch.get_num_threads()) or scores(self, arch),
    )
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2  # a count other than torch's, so a default would show
    cfg = dict(supernet=str(nas_runs / "s"), gallery=str(nas_runs / "g"), latency_ms=100.0, latency_runtime="torch")
    cfg.update(population=4, iterations=4, bn_images=16)
    best = nas_search.run_search(
        nas_search.SearchConfig(out=str(tmp_path / "a"), latency_threads=want, **cfg), progress=False, log=print
    )
    assert best["budget"]["latency_threads"] == want and seen and set(seen) == {want}
    assert compared and set(compared) == {want}  # the table's check against measurement too
    assert scored and set(scored) == {before}  # the search itself keeps torch's count
    table = json.loads((nas_runs / "s" / f"latency_table_b1_t{want}.json").read_text())
    assert table["meta"]["threads"] == want and table["entries"]
    assert torch.get_num_threads() == before  # the units were timed on `want`, torch's count put back
    with pytest.raises(NASError, match="a latency thread count must be >= 1, got 0"):
        nas_search.run_search(
            nas_search.SearchConfig(out=str(tmp_path / "b"), latency_threads=0, **cfg), progress=False, log=print
        )
    assert not (tmp_path / "b").exists()


def test_a_latency_is_timed_on_the_threads_asked_and_torchs_count_restored(monkeypatch):
    import hvs.nas.latency as lat

    seen = []
    monkeypatch.setattr(lat, "measure_latency", lambda *a, **k: seen.append(torch.get_num_threads()) or 0.5)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    assert lat.module_latency(torch.nn.Identity(), (1, 4, 4), threads=want) == 0.5 and seen == [want]
    assert torch.get_num_threads() == before
    assert lat.module_latency(torch.nn.Identity(), (1, 4, 4)) == 0.5 and seen[-1] == before  # default: torch's
    assert LatencyTable(_supernet(), 12, threads=want).meta["threads"] == want
    import hvs.encoders as enc

    sessions = []
    real = enc.ort_session
    monkeypatch.setattr(
        enc, "ort_session", lambda blob, threads: sessions.append(threads) or real(blob, threads=threads)
    )
    assert lat.module_latency(torch.nn.Conv2d(1, 2, 3), (1, 8, 8), runtime="ort", threads=want, min_seconds=0.0) > 0
    assert sessions == [want]  # ONNX Runtime's intra-op threads
    with pytest.raises(lat.LatencyError, match="^a latency thread count must be >= 1, got 0$"):
        LatencyTable(_supernet(), 12, threads=0)


def test_unknown_latency_runtime_is_a_one_line_error():
    from hvs.nas.latency import LatencyError

    with pytest.raises(LatencyError, match=r"^unknown latency runtime 'tflite'; use one of torch, ort, ort-int8$"):
        LatencyTable(_supernet(), 12, runtime="tflite")


# ---------------------------------------------------------------------------------------------
# Training pieces
# ---------------------------------------------------------------------------------------------


def test_validation_split_is_carved_from_training_images_per_class():
    labels = torch.arange(4).repeat_interleave(20)
    tr, vq, vg = carve_validation(labels, fraction=0.2, max_per_class=3, seed=0)
    assert len(set(tr.tolist()) | set(vq.tolist()) | set(vg.tolist())) == 80
    assert not set(tr.tolist()) & (set(vq.tolist()) | set(vg.tolist())) and not set(vq.tolist()) & set(vg.tolist())
    assert torch.bincount(labels[vq]).tolist() == [1] * 4 and torch.bincount(labels[vg]).tolist() == [2] * 4
    assert torch.equal(carve_validation(labels, 0.2, 3, 0)[1], vq)


def test_held_out_identity_split_never_shares_an_identity_with_training():
    """The open-set reward's split: whole classes held out (disjoint in identities from what trains),
    one query and one positive from a 2-view identity, the same split from the same seed."""
    for seed in range(3):
        labels = torch.arange(30).repeat_interleave(2)  # 30 identities, 2 views each (consumer-to-shop shape)
        tr, vq, vg = carve_identities(labels, fraction=0.2, max_per_class=50, seed=seed)
        held = set(labels[vq].tolist())
        assert len(held) == 6 and held == set(labels[vg].tolist())  # round(0.2 * 30) identities, both sides
        assert not held & set(labels[tr].tolist()), "a held-out identity trains"
        assert len(tr) + len(vq) + len(vg) == 60 and len(vq) == len(vg) == 6
        assert torch.equal(carve_identities(labels, 0.2, 50, seed)[1], vq)
    assert carve_validation(labels, 0.2, 50, 0)[1].numel() == 0  # the per-class carve cannot use 2 views
    with pytest.raises(NASError, match="needs 2 classes with >= 2 images; the training split has 0"):
        carve_identities(torch.arange(5), fraction=0.1)


def test_prepare_data_drops_held_out_identities_from_the_classifier_rows():
    data = create_dataset("synthetic:classes=48,train_per_class=6,test_per_class=2,size=8", protocol="open")
    nd = prepare_data(data, 0.25, 50, 0, "auto")  # open-set with >= 20 training classes: identities
    held = set(nd.val_query_labels.tolist())
    assert len(held) == 6 and not held & {data.classes.index(c) for c in nd.classes}  # round(0.25 * 24) held out
    assert len(nd.classes) == len(torch.unique(data.train.labels)) - len(held)
    assert int(nd.train_targets.max()) == len(nd.classes) - 1
    closed = prepare_data(create_dataset("synthetic:classes=24,train_per_class=6,test_per_class=2,size=8"), 0.25)
    assert set(closed.val_query_labels.tolist()) <= {closed.data.classes.index(c) for c in closed.classes}


def test_progressive_shrinking_phases():
    plan = phase_plan(["full", "kernel", "depth", "expand"], 6)
    assert [(n, e) for n, e, _ in plan] == [("full", 1), ("kernel", 1), ("depth", 2), ("expand", 2)]
    assert plan[0][2] == [] and plan[1][2] == ["width", "resolution", "kernel"]
    assert plan[3][2] == ["width", "resolution", "kernel", "depth", "expand"]
    assert phase_plan([], 3) == [("all", 3, None)]
    with pytest.raises(NASError, match="needs at least 3 epochs"):
        phase_plan(["kernel", "depth", "expand"], 2)


# ---------------------------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------------------------

SUPERNET_YAML = """
supernet:
  stem_width: 8
  first_width: 8
  stage_widths: [8, 16]
  stage_strides: [2, 2]
  stage_acts: [relu, h_swish]
  stage_se: [false, true]
  final_width: 32
  feature_width: 32
  depth_list: [1, 2]
batch_size: 32
lr: 0.05
val_fraction: 0.2
"""


@pytest.fixture(scope="module")
def nas_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nas")
    (root / "supernet.yaml").write_text(SUPERNET_YAML)
    assert (
        main(
            [
                "train",
                "--model",
                "cnn-nano",
                "--data",
                DATA,
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--embed-dim",
                "16",
                "--out",
                str(root / "g"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "nas",
                "train-supernet",
                "--config",
                str(root / "supernet.yaml"),
                "--gallery",
                str(root / "g"),
                "--data",
                DATA,
                "--epochs",
                "1",
                "--distill",
                "0.5",
                "--sandwich",
                "--out",
                str(root / "s"),
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def test_train_supernet_writes_a_resumable_folder(nas_runs, tmp_path):
    root = nas_runs
    card = json.loads((root / "s" / "config.json").read_text())
    assert card["format"] == "hvs-ofa-supernet" and card["epochs_done"] == 1 and card["bct_weight"] == 1.0
    assert card["gallery"]["fingerprint"] == ckpt.read_card(root / "g").fingerprint
    assert (root / "s" / "log.csv").read_text().startswith("epoch,phase,loss,own,bct,distill")
    # an interrupted 2-epoch run, resumed, ends with the weights of an uninterrupted one
    args = [
        "nas",
        "train-supernet",
        "--config",
        str(root / "supernet.yaml"),
        "--data",
        DATA,
        "--epochs",
        "2",
        "--subnets-per-step",
        "1",
        "--progressive",
        "full,kernel",
        "--no-progress",
    ]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0

    def kill(epoch):
        raise KeyboardInterrupt

    nas_train.hooks.after_epoch = kill
    try:
        assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    finally:
        nas_train.hooks.after_epoch = staticmethod(lambda epoch: None)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 2  # refuses to overwrite without --resume
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    cut = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert full["fingerprint"] == cut["fingerprint"] and cut["epochs_done"] == 2
    assert cut["gallery"] is None and cut["bct_weight"] == 0.0
    log = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in log[1:]] == ["full", "kernel"]


def test_search_export_evaluate(nas_runs, capsys):
    root = nas_runs
    common = [
        "nas",
        "search",
        "--supernet",
        str(root / "s"),
        "--gallery",
        str(root / "g"),
        "--population",
        "4",
        "--iterations",
        "4",
        "--bn-images",
        "32",
        "--no-progress",
    ]
    search = [*common, "--flops", "0.3M"]
    assert main([*search, "--out", str(root / "r")]) == 0
    best = json.loads((root / "r" / "best.json").read_text())
    history = json.loads((root / "r" / "history.json").read_text())
    assert len(history) == 8 and all(r["flops"] <= 0.3e6 for r in history)
    assert best["flops"] <= 0.3e6 and best["reward"] == max(r["reward"] for r in history)
    assert best["reward"] == best["scores"]["query->gallery/recall@1"]
    header = (root / "r" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"iteration", "arch", "flops", "reward"} <= set(header)
    # same seed, same search
    assert main([*search, "--out", str(root / "r2")]) == 0
    assert json.loads((root / "r2" / "history.json").read_text()) == history
    # infeasible budget: one clear line
    capsys.readouterr()
    assert main([*common, "--flops", "0.1M", "--out", str(root / "r3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hvs nas: error: budget 0.1 MFLOPs is infeasible: the smallest sub-network needs ")
    assert len(err.splitlines()) == 1

    assert (
        main(
            [
                "nas",
                "export",
                "--supernet",
                str(root / "s"),
                "--arch",
                str(root / "r" / "best.json"),
                "--gallery",
                str(root / "g"),
                "--out",
                str(root / "q"),
                "--finetune-epochs",
                "1",
                "--batch-size",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    q = ckpt.read_card(root / "q")
    g = ckpt.read_card(root / "g")
    assert q.role == "query" and q.model == "ofa-mbv3" and q.compatible_with["fingerprint"] == g.fingerprint
    assert q.classes == json.loads((root / "s" / "config.json").read_text())["classes"]
    assert q.model_kwargs["arch"]["d"] == best["arch"]["d"]
    model, _ = ckpt.load_model(root / "q")
    assert count_flops(model, (1, 12, 12)) == best["flops"]
    assert (
        main(
            [
                "evaluate",
                "--gallery-model",
                str(root / "g"),
                "--query-model",
                str(root / "q"),
                "--data",
                DATA,
                "--no-latency",
                "--bootstrap",
                "10",
                "--json",
                str(root / "eval.json"),
            ]
        )
        == 0
    )
    result = json.loads((root / "eval.json").read_text())
    assert not result["notes"][0].startswith("query model")  # no 'independent/incompatible' warning
    # 6 balanced classes: ranking the gallery at random gives mAP near 1/6; the exported BCT
    # query model must search the gallery model's embeddings well above that
    assert result["metrics"]["query->gallery"]["map"] > 1.5 / 6


def test_homo_reward_needs_no_gallery_and_hetero_does(nas_runs, capsys):
    root = nas_runs
    base = [
        "nas",
        "search",
        "--supernet",
        str(root / "s"),
        "--flops",
        "0.3M",
        "--population",
        "3",
        "--iterations",
        "1",
        "--bn-images",
        "16",
        "--no-progress",
    ]
    assert main([*base, "--out", str(root / "homo"), "--reward", "homo"]) == 0
    best = json.loads((root / "homo" / "best.json").read_text())
    assert best["reward"] == best["scores"]["query->query/recall@1"] and best["gallery"] is None
    capsys.readouterr()
    assert main([*base, "--out", str(root / "het")]) == 2
    assert "the hetero reward needs a gallery model: pass --gallery DIR" in capsys.readouterr().err


def test_weight_inheritance_exports_a_compatible_pair(nas_runs):
    root = nas_runs
    assert (
        main(
            [
                "nas",
                "inherit",
                "--supernet",
                str(root / "s"),
                "--out-gallery",
                str(root / "ig"),
                "--out-query",
                str(root / "iq"),
                "--flops",
                "0.3M",
                "--bn-images",
                "32",
            ]
        )
        == 0
    )
    g, q = ckpt.read_card(root / "ig"), ckpt.read_card(root / "iq")
    assert g.role == "gallery" and q.role == "query" and q.compatible_with["fingerprint"] == g.fingerprint
    assert q.extra["compatibility"] == "weight-inheritance"
    assert (
        main(
            [
                "evaluate",
                "--gallery-model",
                str(root / "ig"),
                "--query-model",
                str(root / "iq"),
                "--data",
                DATA,
                "--no-latency",
                "--bootstrap",
                "10",
                "--json",
                str(root / "inherit.json"),
            ]
        )
        == 0
    )
    result = json.loads((root / "inherit.json").read_text())
    assert result["cost"]["ratio_gallery_over_query"]["flops"] > 1
    # inherited weights, no training: the small sub-network still searches the largest one's
    # embeddings well above chance (mAP of a random ranking over 6 balanced classes is ~1/6)
    assert result["metrics"]["query->gallery"]["map"] > 1.5 / 6
    assert main(["nas", "info", "--supernet", str(root / "s")]) == 0


def test_export_refuses_a_gallery_the_supernet_was_not_trained_for(nas_runs, capsys):
    root = nas_runs
    assert (
        main(
            [
                "train",
                "--model",
                "cnn-nano",
                "--data",
                DATA,
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--embed-dim",
                "16",
                "--seed",
                "1",
                "--out",
                str(root / "g-other"),
                "--no-progress",
            ]
        )
        == 0
    )
    args = [
        "nas",
        "export",
        "--supernet",
        str(root / "s"),
        "--arch",
        '{"ks": [3, 3, 3, 3], "e": [3, 3, 3, 3], "d": [1, 1]}',
        "--gallery",
        str(root / "g-other"),
        "--bn-images",
        "16",
        "--no-progress",
    ]
    capsys.readouterr()
    assert main([*args, "--out", str(root / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the supernet was trained for gallery fingerprint" in err
    assert "--finetune-epochs" in err
    assert main([*args, "--out", str(root / "forced"), "--force"]) == 0
    assert ckpt.read_card(root / "forced").compat == []  # no claim of BCT training for that gallery


def test_a_tight_budget_still_yields_varied_candidates():
    """Just above the smallest sub-network, uniform draws almost never fit: the sampler walks up
    from the smallest one instead, staying under the budget."""
    import random

    net = _supernet()
    smallest = net.flops(net.min_arch(), 12)
    budget = Budget("flops", smallest * 1.05, lambda a: float(net.flops(a, 12)))
    rng = random.Random(0)
    archs = [sample_under_budget(net.space, rng, budget, max_tries=5) for _ in range(8)]
    assert all(budget.ok(a) for a in archs)
    assert len({net.space.key(a) for a in archs}) > 1


def _mean_cosine_to_gallery(supernet_dir, gallery_dir) -> float:
    """Mean cosine between the largest sub-network's embedding and the gallery model's, per image."""
    from hvs.data import create_dataset
    from hvs.embed import embed_images
    from hvs.nas.common import load_supernet, recalibrate_bn

    data = create_dataset(DATA)
    sn, _, card = load_supernet(supernet_dir)
    sn.set_active_subnet(sn.space.max_arch())
    g_model, g_card = ckpt.load_model(gallery_dir)
    images = data.train.images[:96]
    sub = recalibrate_bn(sn.get_active_subnet(), images, card.mean, card.std)  # as export and search do
    q = embed_images(sub, images, card.mean, card.std)
    g = embed_images(g_model, images, g_card.mean, g_card.std)
    return float(torch.nn.functional.cosine_similarity(q, g, dim=-1).mean())


def test_supernet_feature_regression_pulls_embeddings_onto_the_gallery_models(nas_runs, tmp_path, capsys):
    root = nas_runs
    args = [
        "nas",
        "train-supernet",
        "--config",
        str(root / "supernet.yaml"),
        "--data",
        DATA,
        "--epochs",
        "3",
        "--seed",
        "3",
        "--embed-dim",
        "16",
        "--no-progress",
    ]
    assert (
        main(
            [
                *args,
                "--gallery",
                str(root / "g"),
                "--bct-weight",
                "0",
                "--regress-weight",
                "2",
                "--out",
                str(tmp_path / "reg"),
            ]
        )
        == 0
    )
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    card = json.loads((tmp_path / "reg" / "config.json").read_text())
    assert card["regress_weight"] == 2.0 and card["bct_weight"] == 0.0
    assert card["gallery"]["fingerprint"] == ckpt.read_card(root / "g").fingerprint
    log = (tmp_path / "reg" / "log.csv").read_text().splitlines()
    col = log[0].split(",").index("regress")
    assert float(log[-1].split(",")[col]) < float(log[1].split(",")[col])
    # the plain supernet's space is unrelated to the gallery model's (cosine near 0); regression
    # alone, without BCT, aligns them
    reg, plain = (_mean_cosine_to_gallery(tmp_path / n, root / "g") for n in ("reg", "plain"))
    assert reg > 0.35 and reg > plain + 0.3, (reg, plain)
    # an exported sub-network records what made it compatible
    arch = '{"ks": [3, 3, 3, 3], "e": [3, 3, 3, 3], "d": [1, 1]}'
    assert (
        main(
            [
                "nas",
                "export",
                "--supernet",
                str(tmp_path / "reg"),
                "--arch",
                arch,
                "--gallery",
                str(root / "g"),
                "--bn-images",
                "16",
                "--out",
                str(tmp_path / "q"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert ckpt.read_card(tmp_path / "q").compat == [["l2", 2.0]]
    # a further compatibility loss of the registry (distillation of the gallery model's similarities)
    out = tmp_path / "rel"
    assert (
        main([*args, "--gallery", str(root / "g"), "--compat", "relational=4", "--epochs", "1", "--out", str(out)]) == 0
    )
    card = json.loads((out / "config.json").read_text())
    assert card["extra"]["compat"] == [["relational", 4.0]] and card["extra"]["final"]
    assert "relational" in (out / "log.csv").read_text().splitlines()[0]
    # regression needs a gallery model: one line
    capsys.readouterr()
    assert main([*args, "--regress-weight", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --gallery DIR" in err
    assert main([*args, "--gallery", str(root / "g"), "--compat", "kd", "--out", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown compatibility loss 'kd'" in err


def test_export_fine_tunes_with_the_compatibility_losses_asked_for(nas_runs, tmp_path, capsys):
    root = nas_runs
    base = [
        "nas",
        "export",
        "--supernet",
        str(root / "s"),
        "--arch",
        '{"ks": [3, 3, 3, 3], "e": [3, 3, 3, 3], "d": [1, 1]}',
        "--gallery",
        str(root / "g"),
        "--bn-images",
        "16",
        "--finetune-epochs",
        "1",
        "--batch-size",
        "32",
        "--no-progress",
    ]
    assert main([*base, "--compat", "bct,l2=0.5", "--out", str(tmp_path / "q")]) == 0
    cfg = json.loads((tmp_path / "q" / "train_config.json").read_text())
    assert cfg["compat"] == ["bct=1.0", "l2=0.5"]
    history = (tmp_path / "q" / "log.csv").read_text().splitlines()
    assert {"bct", "l2"} <= set(history[0].split(","))
    capsys.readouterr()
    assert main([*base, "--compat", "bct,l3", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown compatibility loss 'l3'" in err
    assert main([*base, "--compat", "l2", "--bct-weight", "2", "--out", str(tmp_path / "bad2")]) == 2
    assert "either bct_weight or compat" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_regression_feeds_the_gallery_model_its_own_normalisation():
    from types import SimpleNamespace

    raw = torch.rand(4, 2, 5, 5)
    data = SimpleNamespace(mean=(0.2, 0.4), std=(0.3, 0.5))
    card = SimpleNamespace(mean=[0.5, 0.1], std=[0.25, 0.2])
    shape = (1, -1, 1, 1)
    norm = lambda m, s: (raw - torch.tensor(m).view(shape)) / torch.tensor(s).view(shape)  # noqa: E731
    x = norm(data.mean, data.std)
    assert torch.allclose(nas_train._renormalizer(data, card)(x), norm(card.mean, card.std), atol=1e-6)
    same = SimpleNamespace(mean=list(data.mean), std=list(data.std))
    assert nas_train._renormalizer(data, same)(x) is x


def test_both_trainers_are_made_of_the_trainer_core():
    """The supernet trainer uses hvs.training, never the model trainer's module (nor its private
    helpers); NAS export fine-tunes in process (no temporary model folder)."""
    import ast
    from pathlib import Path

    import hvs

    root = Path(hvs.__file__).parent
    for rel in ("nas/train.py", "nas/export.py", "train.py"):
        tree = ast.parse((root / rel).read_text())
        imported = {
            (node.module or "", node.level, alias.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert not any(name.startswith("_") for _, _, name in imported), rel
        if rel != "nas/export.py":
            assert any(m.startswith("training") for m, _, _ in imported), rel
        if rel == "nas/train.py":
            assert not any(m == "train" and level == 2 for m, level, _ in imported)
    assert "init_from" not in (root / "nas/export.py").read_text()


def test_export_finetune_rows_cover_the_held_out_identities(tmp_path):
    """A supernet trained with a held-out-identity split has no classifier rows for those classes; the
    export fine-tune trains on every training class, so the trainer takes the supernet's rows by class
    name where they exist and fresh ones for the rest, in its own order (it crashed on a shape mismatch
    before). lr 0: the saved classifier is the starting one."""
    from hvs.train import TrainConfig, TrainError, train

    data = create_dataset("synthetic:classes=60,train_per_class=4,test_per_class=2,size=16", protocol="open")
    nd = prepare_data(data, 0.25, 50, 0, "auto")
    ids = torch.unique(data.train.labels).tolist()
    assert len(nd.classes) < len(ids)
    head_w = torch.nn.functional.normalize(torch.randn(len(nd.classes), 8), dim=1)
    cfg = TrainConfig(
        out=str(tmp_path / "q"),
        model="cnn-nano",
        embed_dim=8,
        epochs=1,
        batch_size=32,
        lr=0.0,
        weight_decay=0.0,
        warmup_epochs=0.0,
        augment="none",
        check=False,
    )
    card = train(
        cfg, data=data, classifier=head_w, classifier_classes=list(nd.classes), progress=False, log=lambda s: None
    )
    rows = ckpt.load_classifier(tmp_path / "q")
    assert rows.shape == (len(ids), 8) and card.classes == [data.classes[i] for i in ids]
    for j, name in enumerate(card.classes):
        if name in nd.classes:
            assert torch.allclose(rows[j], head_w[nd.classes.index(name)])
    with pytest.raises(TrainError, match="is given 3 class names"):
        train(
            TrainConfig(out=str(tmp_path / "bad"), model="cnn-nano", embed_dim=8, epochs=1),
            data=data,
            classifier=head_w,
            classifier_classes=nd.classes[:3],
            progress=False,
            log=lambda s: None,
        )


# ---------------------------------------------------------------------------------------------
# Export recipes: from scratch, validation held out, the best recipe chosen on validation
# ---------------------------------------------------------------------------------------------

ARCH = {"ks": [3, 3, 3, 3], "e": [3, 3, 3, 3], "d": [1, 1]}


def _export(root, out, **kw):
    from hvs.nas.export import export_subnet

    opts = {"bn_images": 16, "batch_size": 32, "progress": False, "log": lambda _: None, **kw}
    return export_subnet(root / "s", ARCH, out, gallery=root / "g", **opts)


def test_export_from_scratch_trains_the_architecture_from_random_weights(nas_runs, tmp_path):
    """init=scratch: the same architecture and card, but random starting weights and the trainer's
    warm-up; lr 0 keeps the starting weights, so they are seen to be the random ones."""
    from hvs.train import TrainConfig

    sup = _export(nas_runs, tmp_path / "sup")  # no fine-tune: the supernet's weights
    card = _export(nas_runs, tmp_path / "scr", init="scratch", finetune_epochs=1, lr=0.0, seed=3)
    assert card.model_kwargs["arch"] == ckpt.read_card(tmp_path / "sup").model_kwargs["arch"]
    assert card.extra["nas"]["init"] == "scratch" and card.extra["nas"]["bn_images"] == 0
    cfg = json.loads((tmp_path / "scr" / "train_config.json").read_text())
    assert cfg["warmup_epochs"] == TrainConfig.warmup_epochs and cfg["compat"] == ["bct=1.0"]
    a = ckpt.load_model(tmp_path / "sup")[0].state_dict()
    b = ckpt.load_model(tmp_path / "scr")[0].state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # the same network
    convs = [k for k, v in a.items() if v.dim() == 4]
    assert convs and all(not torch.equal(a[k], b[k]) for k in convs)
    assert sup.extra["nas"]["init"] == "supernet"
    with pytest.raises(NASError, match="needs finetune_epochs >= 1"):
        _export(nas_runs, tmp_path / "bad", init="scratch")
    with pytest.raises(NASError, match="init must be one of supernet, scratch"):
        _export(nas_runs, tmp_path / "bad", init="random", finetune_epochs=1)
    assert not (tmp_path / "bad").exists()


def test_hold_out_val_fine_tunes_on_the_supernets_training_images_only(nas_runs, tmp_path, monkeypatch):
    import hvs.nas.export as nas_export
    from hvs.nas.common import load_supernet

    seen = []
    real = nas_export.train
    monkeypatch.setattr(nas_export, "train", lambda cfg, **kw: seen.append(kw["data"]) or real(cfg, **kw))
    _export(nas_runs, tmp_path / "q", finetune_epochs=1, hold_out_val=True)
    _export(nas_runs, tmp_path / "all", finetune_epochs=1)
    card = load_supernet(nas_runs / "s")[2]
    data = create_dataset(DATA)
    nd = prepare_data(data, card.val_fraction, card.val_max_per_class, card.data_seed, card.val_split)
    assert len(nd.val_query_labels) > 0
    assert torch.equal(seen[0].train.images, nd.train_images)  # the validation images left out
    assert len(seen[1].train) == len(data.train) > len(seen[0].train)
    assert ckpt.read_card(tmp_path / "q").extra["nas"]["hold_out_val"] is True


def test_finetune_compat_is_the_one_rule_for_the_exports_losses():
    from hvs.nas.export import finetune_compat

    assert finetune_compat(None, None, 0.5) == [("bct", 0.5)]
    assert finetune_compat(None, None, 0.0) == [("bct", 1.0)]  # a plain supernet: BCT at 1
    assert finetune_compat(None, 2.0, 0.5) == [("bct", 2.0)]
    assert finetune_compat(None, 0.0, 0.5) == []
    assert finetune_compat("bct,l2=0.5", None, 0.5) == [("bct", 1.0), ("l2", 0.5)]
    assert finetune_compat([], None, 0.5) == []
    with pytest.raises(NASError, match="either bct_weight or compat"):
        finetune_compat(["l2"], 1.0)
    with pytest.raises(NASError, match="unknown compatibility loss 'l3'"):
        finetune_compat(["l3"])


def test_convergence_score_against_a_gallery_model_is_heterogeneous_recall(nas_runs, tmp_path):
    """score(gallery=G): query embeddings of the model against G's gallery embeddings, checked
    against recall@1 by brute force."""
    from hvs.convergence import score
    from hvs.embed import embed_images

    _export(nas_runs, tmp_path / "q")
    data = create_dataset(DATA)
    vq, vg = (data.query.images, data.query.labels), (data.gallery.images, data.gallery.labels)
    s = score(tmp_path / "q", vq, vg, gallery=nas_runs / "g")
    (qm, qc), (gm, gc) = ckpt.load_model(tmp_path / "q"), ckpt.load_model(nas_runs / "g")
    q = torch.nn.functional.normalize(embed_images(qm, vq[0], qc.mean, qc.std), dim=1)
    g = torch.nn.functional.normalize(embed_images(gm, vg[0], gc.mean, gc.std), dim=1)
    hits = (vg[1][(q @ g.T).argmax(1)] == vq[1]).float()
    assert s["hits"] == hits.tolist() and s["recall@1"] == pytest.approx(float(hits.mean()))
    own = score(tmp_path / "q", vq, vg)  # its own embeddings on both sides
    g_own = torch.nn.functional.normalize(embed_images(qm, vg[0], qc.mean, qc.std), dim=1)
    assert own["hits"] == (vg[1][(q @ g_own.T).argmax(1)] == vq[1]).float().tolist()


def _fake_scores(monkeypatch, by_recipe):
    """convergence.score replaced: each recipe folder's hits set by hand (so the winner is known)."""
    import hvs.convergence as conv

    def fake(folder, vq, vg, gallery=None):
        assert gallery is not None  # the choice is on heterogeneous search
        hits = [float(i < by_recipe[folder.name] * len(vq[1])) for i in range(len(vq[1]))]
        return {"recall@1": sum(hits) / len(hits), "map": 0.0, "hits": hits}

    monkeypatch.setattr(conv, "score", fake)


def test_export_best_recipe_keeps_the_best_on_validation_and_refuses_mixing(nas_runs, tmp_path, monkeypatch):
    from hvs.nas.export import DECISION, check_decision, export_best_recipe, recipes_folder

    root, out = nas_runs, tmp_path / "pick"
    recipes = {"ft": {"lr": 0.0}, "scratch": {"init": "scratch", "lr": 0.0}}
    common = {"finetune_epochs": 1, "batch_size": 32, "bn_images": 16}
    _fake_scores(monkeypatch, {"ft": 0.25, "scratch": 0.75})
    kw = {"gallery": root / "g", "progress": False, "log": lambda _: None, **common}
    rd = recipes_folder(out)
    (rd / "scratch").mkdir(parents=True)
    (rd / "scratch" / "stray").write_text("an interrupted recipe")  # redone, not refused
    decision = export_best_recipe(root / "s", ARCH, out, recipes=recipes, **kw)
    assert decision["best"] == "scratch"
    assert ckpt.read_card(out).fingerprint == ckpt.read_card(rd / "scratch").fingerprint == decision["fingerprint"]
    assert ckpt.read_card(out).extra["nas"]["hold_out_val"] is True
    rows = {r["recipe"]: r for r in decision["recipes"]}
    assert rows["ft"]["val"]["recall@1"] == pytest.approx(0.25) and rows["ft"]["vs_best"][2] < 0
    assert rows["scratch"]["vs_best"] == [0.0, 0.0, 0.0]
    assert json.loads((rd / DECISION).read_text())["best"] == "scratch"
    assert check_decision(out, recipes, common, supernet=root / "s")["best"] == "scratch"
    from hvs.pipeline import Pipeline, PipelineError

    with pytest.raises(PipelineError, match="was chosen among export recipes"):  # not reused as a plain export
        Pipeline(log=lambda _: None).export(out, root / "s", ARCH, gallery=root / "g", data=None)
    import types

    import hvs.nas.export as nas_export

    with monkeypatch.context() as m:  # the supernet retrained since: the choice is stale
        m.setattr(nas_export, "read_supernet_card", lambda _: types.SimpleNamespace(fingerprint="other"))
        with pytest.raises(NASError, match="chosen among other export recipes or for another pick"):
            check_decision(out, recipes, common, supernet=root / "s")
    with pytest.raises(NASError, match="chosen among other export recipes"):
        check_decision(out, {"ft": {"lr": 0.1}}, common)
    # the finished recipes are reused; a tie goes to the first listed
    _fake_scores(monkeypatch, {"ft": 0.5, "scratch": 0.5})
    before = (rd / "ft" / ckpt.WEIGHTS).stat().st_mtime_ns
    with pytest.raises(NASError, match="already holds files"):
        export_best_recipe(root / "s", ARCH, out, recipes=recipes, **kw)
    import shutil

    shutil.rmtree(out)
    assert export_best_recipe(root / "s", ARCH, out, recipes=recipes, **kw)["best"] == "ft"
    assert (rd / "ft" / ckpt.WEIGHTS).stat().st_mtime_ns == before
    shutil.rmtree(out)  # listed the other way round: the same trained recipes, the tie to the other
    flipped = {"scratch": recipes["scratch"], "ft": recipes["ft"]}
    assert export_best_recipe(root / "s", ARCH, out, recipes=flipped, **kw)["best"] == "scratch"
    assert (rd / "ft" / ckpt.WEIGHTS).stat().st_mtime_ns == before
    assert check_decision(out, flipped, common)["best"] == "scratch"
    with pytest.raises(NASError, match="chosen among other export recipes"):  # the order decided the tie
        check_decision(out, recipes, common)
    shutil.rmtree(out)
    with pytest.raises(NASError, match="made for other recipes"):
        export_best_recipe(root / "s", ARCH, out, recipes={"ft": {"lr": 0.1}}, **kw)


@pytest.mark.parametrize(
    "recipes, message",
    [
        ({}, "must be a mapping of name -> export options"),
        ([{"lr": 0.1}], "must be a mapping of name -> export options"),
        ({"a/b": {}}, "plain folder names"),
        ({"a": 0.1}, "options must be a mapping"),
        ({"a": {"epochs": 3}}, r"unknown options \['epochs'\]"),
        # each recipe as it will run, with the common options: refused before any trains
        ({"ok": {}, "a": {"init": "scratch"}}, "export recipe a: init scratch needs finetune_epochs >= 1"),
        ({"a": {"init": "random"}}, "export recipe a: init must be one of supernet, scratch"),
        ({"ok": {}, "a": {"compat": ["l2"], "bct_weight": 1.0}}, "export recipe a: pass either bct_weight"),
        ({"a": {"compat": ["l3"]}}, "export recipe a: unknown compatibility loss 'l3'"),
        ({"a": {"finetune_epochs": "5"}}, "export recipe a: finetune_epochs must be an integer, got '5'"),
        ({"a": {"lr": True}}, "export recipe a: lr must be a number, got True"),
        ({"decision.json": {}}, "is taken by a file of the recipes folder"),
    ],
)
def test_export_recipes_refuse_bad_specs(nas_runs, tmp_path, recipes, message, monkeypatch):
    import hvs.nas.export as nas_export

    monkeypatch.setattr(nas_export, "export_subnet", lambda *a, **k: pytest.fail("a recipe trained"))
    with pytest.raises(NASError, match=message):
        nas_export.export_best_recipe(nas_runs / "s", ARCH, tmp_path / "q", gallery=nas_runs / "g", recipes=recipes)
    assert not (tmp_path / "q").exists()


def test_cli_export_from_scratch_and_its_refusal(nas_runs, tmp_path, capsys):
    base = ["nas", "export", "--supernet", str(nas_runs / "s"), "--arch", json.dumps(ARCH)]
    base += ["--gallery", str(nas_runs / "g"), "--batch-size", "32", "--no-progress", "--init", "scratch"]
    assert main([*base, "--finetune-epochs", "1", "--hold-out-val", "--out", str(tmp_path / "q")]) == 0
    nas = ckpt.read_card(tmp_path / "q").extra["nas"]
    assert nas["init"] == "scratch" and nas["hold_out_val"] is True
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs finetune_epochs >= 1" in err
    assert not (tmp_path / "bad").exists()
