"""Search spaces by registry (hvs.models.supernets): ofa-mbv3 and fast-cnn (hvs.models.fastcnn).

Narrow supernets and tiny synthetic data; torch on one thread (as tests/test_nas.py)."""

import json
import random

import pytest
import torch
from torch import nn

from hvs import checkpoint as ckpt
from hvs.cli import main
from hvs.errors import ConfigError
from hvs.models import create_model
from hvs.models.cost import count_flops
from hvs.models.fastcnn import BLOCKS, FastCNNSupernet
from hvs.models.ofa import ArchError, OFAMobileNetV3Supernet
from hvs.models.supernets import create_supernet, list_supernets, supernet_entry
from hvs.nas import LatencyTable, compare_latency, phase_plan, regularized_evolution
from hvs.nas.common import SupernetCard, load_supernet, save_supernet
from hvs.nas.latency import latency_units

TINY = {"stem_width": 8, "stage_widths": [8, 16, 24], "stage_strides": [2, 2, 1]}
DATA = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_bn(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return net.eval()


def _fast(**kw) -> FastCNNSupernet:
    torch.manual_seed(0)
    return _perturb_bn(create_supernet("fast-cnn", embed_dim=16, in_chans=1, **{**TINY, **kw}))


def _archs(net, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [net.max_arch(), net.min_arch()] + [net.space.sample(rng) for _ in range(n)]


def test_registry_lists_both_spaces_and_names_their_static_models():
    assert {"ofa-mbv3", "fast-cnn"} <= set(list_supernets())
    assert supernet_entry("ofa-mbv3").model == "ofa-mbv3" and supernet_entry("fast-cnn").model == "fast-cnn"
    assert isinstance(
        create_supernet(
            "ofa-mbv3",
            embed_dim=8,
            stage_widths=[8, 16],
            stage_strides=[2, 2],
            stage_acts=["relu", "relu"],
            stage_se=[False, True],
            final_width=16,
            feature_width=16,
            stem_width=8,
            first_width=8,
        ),
        OFAMobileNetV3Supernet,
    )
    with pytest.raises(ConfigError, match="unknown search space 'fast-cn'.*did you mean fast-cnn"):
        create_supernet("fast-cn")
    with pytest.raises(ArchError, match="unknown fast-cnn shape argument"):
        create_supernet("fast-cnn", ks_list=[3, 5])


def test_sampled_archs_are_valid_and_cover_every_choice():
    net = _fast(resolution_list=[10, 12])
    sp = net.space
    seen = {g: set() for g in ("b", "d", "e", "w", "se", "act", "r")}
    rng = random.Random(3)
    for _ in range(40):
        arch = sp.sample(rng)
        assert sp.validate(arch) == arch
        for g in seen:
            seen[g] |= set(arch[g]) if isinstance(arch[g], list) else {arch[g]}
    assert seen["b"] == set(BLOCKS) and seen["d"] == {1, 2, 3} and seen["se"] == {False, True}
    assert seen["act"] == {"relu", "h_swish"} and seen["w"] == {0.25, 0.5, 0.75, 1.0} and seen["r"] == {10, 12}
    # mutation and crossover stay inside the space; elastic=[] keeps the largest
    a, b = sp.sample(rng), sp.sample(rng)
    assert sp.validate(sp.mutate(a, rng, 0.5)) and sp.validate(sp.crossover(a, b, rng))
    assert sp.sample(rng, elastic=[]) == sp.max_arch()
    only_block = sp.sample(random.Random(1), elastic=["block"])
    assert {k: v for k, v in only_block.items() if k != "b"} == {k: v for k, v in sp.max_arch().items() if k != "b"}
    assert sp.max_arch()["b"] == ["fused"] * 3 and sp.min_arch()["b"] == ["dw"] * 3 and sp.min_arch()["d"] == [1] * 3


def test_bad_fast_arch_is_a_one_line_error():
    net = _fast()
    arch = net.max_arch()
    arch["b"][1] = "conv"
    with pytest.raises(ArchError, match=r"arch b\[1\]=\"conv\" is not a choice of this supernet"):
        net.set_active_subnet(arch)
    with pytest.raises(ArchError, match="arch d has 2 entries; this supernet needs 3"):
        net.set_active_subnet({**net.max_arch(), "d": [1, 1]})
    with pytest.raises(ArchError, match=r"arch se\[0\]=1 is not a choice"):
        net.set_active_subnet({**net.max_arch(), "se": [1, 1, 1]})


@pytest.mark.parametrize("kw", [{}, {"resolution_list": [10, 12, 16], "head_width": 32}])
def test_extracted_subnet_equals_active_supernet(kw):
    net = _fast(**kw)
    x = torch.randn(3, 1, 12, 12)
    for arch in _archs(net, 10):
        net.set_active_subnet(arch)
        with torch.no_grad():
            expected = net(x)
            sub = net.get_active_subnet().eval()
            got = sub(x)
        assert got.shape == (3, 16)
        assert torch.allclose(expected, got, atol=1e-5), net.space.key(arch)
        # only the active layers, each of the chosen block type
        layers = [
            (s, i, next(iter(layer._modules))) for s, st in enumerate(sub.backbone.stages) for i, layer in enumerate(st)
        ]
        assert layers == [(s, i, arch["b"][s]) for s in range(3) for i in range(arch["d"][s])]
    assert net.training is False


def test_extraction_copies_weights_and_block_types_do_not_share_them():
    net = _fast()
    arch = {**net.max_arch(), "b": ["plain"] * 3}
    net.set_active_subnet(arch)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        before = net(x)
        for p in net.get_active_subnet().parameters():
            p.zero_()
        assert torch.equal(net(x), before)  # copies, not views
        for p in net.backbone.stages[1][0].fused.parameters():
            p.add_(1.0)  # another block type's weights: the plain sub-network does not read them
        assert torch.equal(net(x), before)


@pytest.mark.parametrize("kw", [{}, {"resolution_list": [8, 12, 16], "head_width": 24}])
def test_analytic_flops_equal_flop_counter(kw):
    net = _fast(**kw)
    for arch in _archs(net, 8, seed=1):
        net.set_active_subnet(arch)
        assert net.flops(arch, 12) == count_flops(net.get_active_subnet(), (1, 12, 12)), net.space.key(arch)


def test_arch_round_trips_through_json_and_model_folders(tmp_path):
    net = _fast()
    arch = net.sample_active_subnet(7)
    again = json.loads(json.dumps(arch))
    assert again == arch and net.space.key(again) == net.space.key(arch)
    sub = net.get_active_subnet().eval()
    kwargs = json.loads(json.dumps(net.subnet_kwargs()))
    card = ckpt.ModelCard(
        model="fast-cnn",
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
    rebuilt = FastCNNSupernet(**json.loads(json.dumps(net.config())))
    assert rebuilt.config() == net.config() and set(rebuilt.state_dict()) == set(net.state_dict())
    # a plain stage's expand ratio does not change the network: one canonical arch, one key
    plain = {**net.max_arch(), "b": ["plain"] * 3}
    assert net.space.key({**plain, "e": [1, 2, 4]}) == net.space.key(plain)
    assert net.subnet_kwargs({**plain, "e": [1, 2, 4]}) == net.subnet_kwargs(plain)


def test_registered_model_defaults_to_the_largest_and_takes_the_stem_rule():
    small = create_model("fast-cnn", embed_dim=32, image_size=32)
    assert [len(s) for s in small.backbone.stages] == [3, 3, 3]
    assert small.backbone.stem.conv.stride == (1, 1)
    assert create_model("fast-cnn", embed_dim=32, image_size=224).backbone.stem.conv.stride == (2, 2)


def test_supernet_card_records_the_space_and_old_cards_load_as_ofa(tmp_path):
    net = _fast()
    card = SupernetCard(net.config(), 16, 1, 12, [0.5], [0.5], ["a", "b"], "synthetic", space="fast-cnn")
    save_supernet(tmp_path / "s", net, torch.zeros(2, 16), card)
    loaded, _, got = load_supernet(tmp_path / "s")
    assert isinstance(loaded, FastCNNSupernet) and got.space == "fast-cnn"
    raw = json.loads((tmp_path / "s" / "config.json").read_text())
    raw.pop("space")
    assert SupernetCard.from_dict(raw).space == "ofa-mbv3"  # a card from before spaces had names


def test_progressive_phases_follow_the_space():
    dims = supernet_entry("fast-cnn").elastic_dims
    plan = phase_plan(["full", "block", "depth"], 3, dims=dims)
    assert [p[0] for p in plan] == ["full", "block", "depth"] and "block" in plan[2][2] and plan[0][2] == []
    with pytest.raises(Exception, match="progressive phases must be distinct names from full, block"):
        phase_plan(["full", "kernel"], 2, dims=dims)


def test_evolution_runs_on_the_fast_space_under_a_flops_budget():
    net = _fast()
    limit = 0.5 * (net.flops(net.min_arch(), 12) + net.flops(net.max_arch(), 12))
    from hvs.nas import Budget

    budget = Budget("flops", limit, lambda a: float(net.flops(a, 12)))
    result = regularized_evolution(
        net.space,
        lambda a: float(sum(b == "plain" for b in a["b"])),
        budget=budget,
        population=6,
        iterations=12,
        seed=0,
    )
    assert len(result.history) == 18 and all(net.flops(r["arch"], 12) <= limit for r in result.history)
    assert result.best["reward"] == max(r["reward"] for r in result.history)


def test_latency_table_predicts_for_the_fast_space(tmp_path):
    net = _fast(resolution_list=[10, 12])
    table = LatencyTable(net, 12, folder=tmp_path, min_seconds=0.0, repeats=2)
    archs = _archs(net, 3)
    for arch in archs:
        units = latency_units(net, arch, 12)
        assert len(units) == 2 + sum(arch["d"]) + (arch["r"] != 12)  # stem, layers, head (+ resize)
        assert table.predict(arch) > 0
    table.save()
    again = LatencyTable(net, 12, folder=tmp_path, min_seconds=0.0, repeats=2)
    assert again.predict(archs[0]) == table.predict(archs[0]) and again.measured == 0  # reused from the file


def test_table_and_measured_latency_agree_in_rank_on_the_fast_space():
    net = _fast()
    table = LatencyTable(net, 12, min_seconds=0.0, repeats=3)
    small, large = net.min_arch(), net.max_arch()
    rows = compare_latency(net, table, [small, large], min_seconds=0.02)
    assert all(r["predicted_ms"] > 0 and r["measured_ms"] > 0 for r in rows)
    # the largest sub-network (fused blocks, 3 layers per stage) costs several times the smallest
    assert rows[1]["predicted_ms"] > rows[0]["predicted_ms"] and rows[1]["measured_ms"] > rows[0]["measured_ms"]


def test_onnx_runtime_latency_table_for_the_fast_space(tmp_path):
    pytest.importorskip("onnxruntime")
    net = _fast()
    table = LatencyTable(net, 12, folder=tmp_path, min_seconds=0.0, repeats=2, runtime="ort")
    assert table.predict(net.min_arch()) > 0 and table.measured == 2 + 3 + 1  # stem, 3 layers, head, one call
    assert any(k.startswith("call:") for k in table.entries)
    table.save()
    assert table.path.name.startswith("latency_table_ort_")


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_table_counts_one_call_per_network_in_onnx_runtime(runtime):
    """Each unit's own ORT session pays one call's fixed cost; the network pays it once. With the
    units' and the call's latencies set by hand, the prediction is the sum less (units - 1) calls,
    never below the slowest unit; eager PyTorch keeps the plain sum."""
    pytest.importorskip("onnxruntime")
    net = _fast()
    table = LatencyTable(net, 12, min_seconds=0.0, repeats=2, runtime=runtime)
    arch = net.min_arch()
    units = latency_units(net, arch, 12)
    table.entries = {key: 0.01 * (i + 1) for i, (key, _, _) in enumerate(units)}
    table.entries["call:1,12,12"] = 0.004
    total, n = sum(0.01 * (i + 1) for i in range(len(units))), len(units)
    want = total - (n - 1) * 0.004 if runtime == "ort" else total
    assert table.predict(arch) == pytest.approx(want) and table.measured == 0
    table.entries["call:1,12,12"] = 1.0  # a call dearer than the units: the slowest unit is the floor
    assert table.predict(arch) == pytest.approx(0.01 * n if runtime == "ort" else total)


SUPERNET_YAML = """
embed_dim: 16
supernet:
  stem_width: 8
  stage_widths: [8, 16]
  stage_strides: [2, 2]
  depth_list: [1, 2]
  width_mult_list: [0.5, 1.0]
batch_size: 32
lr: 0.05
val_fraction: 0.2
"""


def test_train_search_export_through_the_cli_with_the_fast_space(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(SUPERNET_YAML)
    g = ["train", "--model", "cnn-nano", "--data", DATA, "--epochs", "1", "--batch-size", "32", "--embed-dim", "16"]
    assert main([*g, "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    train = ["nas", "train-supernet", "--config", str(tmp_path / "s.yaml"), "--gallery", str(tmp_path / "g")]
    train += ["--space", "fast-cnn"]
    assert main([*train, "--data", DATA, "--epochs", "1", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    card = json.loads((tmp_path / "s" / "config.json").read_text())
    assert card["space"] == "fast-cnn"
    capsys.readouterr()
    bad = [*train[:-1], "fast-cn", "--data", DATA, "--epochs", "1", "--out", str(tmp_path / "bad"), "--no-progress"]
    assert main(bad) == 2 and not (tmp_path / "bad").exists()
    err = capsys.readouterr().err.strip()
    assert "unknown search space 'fast-cn'" in err and len(err.splitlines()) == 1
    net, _, _ = load_supernet(tmp_path / "s")
    budget = 0.5 * (net.flops(net.min_arch(), 12) + net.flops(net.max_arch(), 12))
    search = [
        "nas",
        "search",
        "--supernet",
        str(tmp_path / "s"),
        "--gallery",
        str(tmp_path / "g"),
        "--flops",
        str(budget),
    ]
    search += ["--population", "3", "--iterations", "2", "--bn-images", "32", "--no-progress"]
    assert main([*search, "--out", str(tmp_path / "r")]) == 0
    best = json.loads((tmp_path / "r" / "best.json").read_text())
    assert best["flops"] <= budget
    export = ["nas", "export", "--supernet", str(tmp_path / "s"), "--arch", str(tmp_path / "r" / "best.json")]
    export += ["--gallery", str(tmp_path / "g"), "--out", str(tmp_path / "q"), "--bn-images", "32", "--no-progress"]
    assert main(export) == 0
    q = ckpt.read_card(tmp_path / "q")
    assert q.model == "fast-cnn" and q.model_kwargs["arch"]["b"] == best["arch"]["b"]
    model, _ = ckpt.load_model(tmp_path / "q")
    assert count_flops(model, (1, 12, 12)) == best["flops"]
    assert main(["nas", "info", "--supernet", str(tmp_path / "s")]) == 0
    # the exported model ships like any other: ONNX export with parity checked against PyTorch
    pytest.importorskip("onnxruntime")
    onnx = ["export", "onnx", "--query-model", str(tmp_path / "q"), "--out", str(tmp_path / "q.onnx")]
    assert main([*onnx, "--no-latency", "--json", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["export"]["parity"]
    # weight inheritance: the largest and a budgeted sub-network as a pair of fast-cnn models
    inherit = ["nas", "inherit", "--supernet", str(tmp_path / "s"), "--flops", str(budget), "--samples", "5"]
    inherit += ["--bn-images", "32", "--out-gallery", str(tmp_path / "g2"), "--out-query", str(tmp_path / "q2")]
    assert main(inherit) == 0
    assert ckpt.read_card(tmp_path / "g2").model == ckpt.read_card(tmp_path / "q2").model == "fast-cnn"


def test_sandwich_rule_trains_each_spaces_smallest_sub_network():
    from hvs.nas.train import _MinRng

    fast = _fast()
    assert fast.space.sample(_MinRng()) == fast.min_arch()
    assert fast.space.sample(_MinRng(), elastic=["depth"]) == {**fast.max_arch(), "d": [1, 1, 1]}
    ofa = create_supernet("ofa-mbv3", embed_dim=8, resolution_list=[16, 24])
    assert ofa.space.sample(_MinRng()) == ofa.min_arch()
