"""The trainer: resumable, refuses bad jobs, records compatibility."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hvs import checkpoint as ckpt
from hvs.data import create_dataset
from hvs.train import TrainConfig, TrainError, hooks, load_config, train

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


@pytest.fixture(scope="module")
def data():
    return create_dataset(SPEC)


def _cfg(out, **kw):
    base = dict(out=str(out), data=SPEC, model="cnn-nano", embed_dim=16, epochs=3, batch_size=32, lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_):
    pass


def test_interrupted_run_resumes_to_the_same_model(tmp_path, data, monkeypatch):
    full = train(_cfg(tmp_path / "full"), progress=False, data=data, log=quiet)

    class Killed(Exception):
        pass

    def kill_after_second(epoch):
        if epoch == 1:
            raise Killed

    monkeypatch.setattr(hooks, "after_epoch", kill_after_second)
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "cut"), progress=False, data=data, log=quiet)
    assert not (tmp_path / "cut" / ckpt.CONFIG).exists()  # no finished model folder yet
    assert len((tmp_path / "cut" / "log.csv").read_text().strip().splitlines()) == 1 + 2
    monkeypatch.setattr(hooks, "after_epoch", lambda epoch: None)

    logs = []
    resumed = train(_cfg(tmp_path / "cut"), resume=True, progress=False, data=data, log=logs.append)
    assert any("resuming" in line and "after epoch 2" in line for line in logs)
    assert sum(line.startswith("epoch=") for line in logs) == 1  # only the last epoch was run again
    assert resumed.fingerprint == full.fingerprint  # bit-identical weights
    assert len((tmp_path / "cut" / "log.csv").read_text().strip().splitlines()) == 1 + 3


def test_refuses_to_overwrite_and_to_resume_another_config(tmp_path, data):
    train(_cfg(tmp_path / "run", epochs=1), progress=False, data=data, log=quiet)
    with pytest.raises(TrainError, match="already holds a run; pass --resume"):
        train(_cfg(tmp_path / "run", epochs=1), progress=False, data=data, log=quiet)
    with pytest.raises(TrainError, match="configuration differs in lr"):
        train(_cfg(tmp_path / "run", epochs=1, lr=0.5), resume=True, progress=False, data=data, log=quiet)


def test_model_folder_is_self_describing_and_safe(tmp_path, data):
    card = train(_cfg(tmp_path / "g", epochs=1), progress=False, data=data, log=quiet)
    folder = tmp_path / "g"
    config = json.loads((folder / ckpt.CONFIG).read_text())
    assert config["model"] == "cnn-nano" and config["role"] == "gallery" and config["fingerprint"] == card.fingerprint
    assert config["classes"] == data.classes and config["image_size"] == 12
    assert load_file(str(folder / ckpt.CLASSIFIER))["weight"].shape == (6, 16)
    torch.load(folder / "state.pt", weights_only=True)  # resumable state loads without pickle code
    json.loads((folder / "train_config.json").read_text())
    model, _ = ckpt.load_model(folder)
    assert model(torch.zeros(1, 1, 12, 12)).shape == (1, 16)


def test_query_model_records_its_gallery(tmp_path, data):
    g = train(_cfg(tmp_path / "g", epochs=1), progress=False, data=data, log=quiet)
    q = train(
        _cfg(tmp_path / "q", epochs=1, gallery=str(tmp_path / "g"), compat=["bct", "l2=0.5", "contrastive=0.1"]),
        progress=False,
        data=data,
        log=quiet,
    )
    assert q.role == "query" and q.compatible_with["fingerprint"] == g.fingerprint
    assert q.compat == [["bct", 1.0], ["l2", 0.5], ["contrastive", 0.1]]
    log = (tmp_path / "q" / "log.csv").read_text().splitlines()[0]
    assert "bct" in log and "l2" in log and "contrastive" in log


def test_bct_synthesizes_rows_for_classes_the_gallery_never_saw(tmp_path):
    # the gallery model trains on half the classes (open protocol); the query model on all of them
    g_data = create_dataset(SPEC, protocol="open")
    q_data = create_dataset(SPEC)
    train(_cfg(tmp_path / "g", epochs=1), progress=False, data=g_data, log=quiet)
    logs = []
    train(
        _cfg(tmp_path / "q", epochs=1, gallery=str(tmp_path / "g"), compat=["bct"]),
        progress=False,
        data=q_data,
        log=logs.append,
    )
    assert any("3 of 6 classes unseen by the gallery model" in line for line in logs)


def test_bad_jobs_are_one_line_errors(tmp_path, data):
    with pytest.raises(TrainError, match="need a frozen gallery model"):
        train(_cfg(tmp_path / "a", compat=["bct"]), progress=False, data=data, log=quiet)
    train(_cfg(tmp_path / "g", epochs=1), progress=False, data=data, log=quiet)
    with pytest.raises(TrainError, match="embed_dim 8 differs from the gallery model's 16"):
        train(
            _cfg(tmp_path / "b", gallery=str(tmp_path / "g"), compat=["bct"], embed_dim=8),
            progress=False,
            data=data,
            log=quiet,
        )
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        train(
            _cfg(tmp_path / "c", gallery=str(tmp_path / "nope"), compat=["bct"]), progress=False, data=data, log=quiet
        )
    with pytest.raises(TrainError, match="unknown augmentation"):
        train(_cfg(tmp_path / "d", augment="rotate"), progress=False, data=data, log=quiet)


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: cnn-tiny\nepochs: 7\nlr: 0.2\n")
    cfg = load_config(path, {"out": "x", "lr": 0.01, "epochs": None})
    assert (cfg.model, cfg.epochs, cfg.lr) == ("cnn-tiny", 7, 0.01)
    path.write_text("modle: cnn-tiny\n")
    with pytest.raises(TrainError, match="unknown training option.*modle"):
        load_config(path, {"out": "x"})


def test_init_from_starts_where_the_folder_left_off(tmp_path, data):
    train(_cfg(tmp_path / "first", epochs=4), progress=False, data=data, log=quiet)
    logs_scratch, logs_init = [], []
    train(_cfg(tmp_path / "scratch", epochs=1, lr=0.001), progress=False, data=data, log=logs_scratch.append)
    train(
        _cfg(tmp_path / "warm", epochs=1, lr=0.001, init_from=str(tmp_path / "first")),
        progress=False,
        data=data,
        log=logs_init.append,
    )
    loss = [
        float(next(line for line in logs if line.startswith("epoch=")).split("loss=")[1].split()[0])
        for logs in (logs_scratch, logs_init)
    ]
    assert loss[1] < 0.8 * loss[0]  # the trained weights and classifier were loaded
    with pytest.raises(TrainError, match="do not fit model"):
        train(
            _cfg(tmp_path / "bad", model="cnn-tiny", init_from=str(tmp_path / "first")),
            progress=False,
            data=data,
            log=quiet,
        )


def test_train_accepts_a_module(tmp_path, data):
    from hvs.models import create_model

    torch.manual_seed(3)
    module = create_model("cnn-nano", embed_dim=16, in_chans=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    card = train(
        _cfg(tmp_path / "m", epochs=1),
        progress=False,
        data=data,
        log=quiet,
        model=module,
        extra={"note": "from python"},
    )
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the module itself was trained
    assert card.extra["note"] == "from python"
    loaded, _ = ckpt.load_model(tmp_path / "m")  # its folder loads back as the registered model
    x = torch.zeros(2, 1, 12, 12)
    module.eval()
    assert torch.allclose(loaded(x), module(x))
    with pytest.raises(TrainError, match="the given model: its weights do not fit model cnn-tiny"):
        train(
            _cfg(tmp_path / "bad", model="cnn-tiny", epochs=1),
            progress=False,
            data=data,
            log=quiet,
            model=create_model("cnn-nano", embed_dim=16, in_chans=1),
        )


def test_a_query_model_gets_the_after_training_check(tmp_path, data, monkeypatch):
    """With a gallery model the trainer runs the quick heterogeneous check and prints each verdict line
    as a warning note; --no-check (check=False) skips it. The check itself runs unpatched first."""
    import hvs.evaluate

    train(_cfg(tmp_path / "g", epochs=1), progress=False, data=data, log=quiet)
    logs = []
    train(
        _cfg(tmp_path / "q0", epochs=1, gallery=str(tmp_path / "g"), compat=["bct"]),
        progress=False,
        data=data,
        log=logs.append,
    )
    assert not any("check skipped" in line for line in logs)  # the real check ran on the real splits

    seen = {}

    def fake_evaluate(gallery, query, small, **kw):
        seen.update(gallery=gallery, query=query, n_query=len(small.query), n_gallery=len(small.gallery), **kw)
        return {"verdict": ["the gallery model is no stronger than the query model alone: (numbers)"], "notes": []}

    monkeypatch.setattr(hvs.evaluate, "evaluate", fake_evaluate)
    logs = []
    train(
        _cfg(tmp_path / "q1", epochs=1, gallery=str(tmp_path / "g"), compat=["bct"]),
        progress=False,
        data=data,
        log=logs.append,
    )
    assert "note: warning: the gallery model is no stronger than the query model alone: (numbers)" in logs
    assert seen["gallery"] == str(tmp_path / "g") and seen["query"] == str(tmp_path / "q1")
    assert (seen["n_query"], seen["n_gallery"]) == (len(data.query), len(data.gallery)) and not seen["latency"]

    assert hvs.evaluate.quick_verdict(tmp_path / "g", tmp_path / "q1", data, max_queries=5, max_gallery=7) == [
        "the gallery model is no stronger than the query model alone: (numbers)"
    ]
    assert (seen["n_query"], seen["n_gallery"]) == (5, 7)  # a sample, not the whole test split

    seen.clear()
    train(
        _cfg(tmp_path / "q2", epochs=1, gallery=str(tmp_path / "g"), compat=["bct"], check=False),
        progress=False,
        data=data,
        log=quiet,
    )
    assert not seen  # --no-check
