"""Bad input and faults around training and model folders, each through the CLI (``hvs.cli.main``):
exit status 2 and one stderr line naming the problem, and nothing left that blocks the next try.

The cases come from a probe of a new user's mistakes and of crashes: a typo in ``--data`` (the
failed start must not lock ``--out``), a start that never finished an epoch, a hand-edited or
newer ``config.json``, a truncated or altered ``state.pt``, the temporary file a killed save
leaves, and replaced weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hvs import checkpoint as ckpt
from hvs import fileio
from hvs.cli import main
from hvs.train import TrainConfig, train

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"
FLAGS = [
    "--data",
    SPEC,
    "--model",
    "cnn-nano",
    "--embed-dim",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--no-progress",
]
STALE = ".state.pt.k3x9_q2a.tmp"  # the name a killed atomic write of state.pt leaves


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A finished 1-epoch run folder (model folder + state.pt), made once; tests copy it."""
    out = tmp_path_factory.mktemp("bad-input") / "g"
    train(
        TrainConfig(out=str(out), data=SPEC, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32, lr=0.05),
        progress=False,
        log=lambda _: None,
    )
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def copy_of(folder, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def test_a_failed_start_does_not_lock_its_folder(tmp_path, capsys):
    out = tmp_path / "x"
    rc, err = run_cli(capsys, "train", *FLAGS, "--data", f"csv:{tmp_path / 'typo.csv'}", "--out", str(out))
    one_line_error(rc, err, "typo.csv")
    assert not (out / "train_config.json").exists()  # the failed start recorded nothing
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(out))  # the corrected command
    assert rc == 0, err
    assert (out / ckpt.CONFIG).is_file()


def test_a_start_that_never_finished_an_epoch_does_not_block_the_next(tmp_path, capsys):
    # what a start killed before its first checkpoint leaves: its config (another data spec),
    # a log, and the temporary file of the checkpoint it was writing
    out = tmp_path / "x"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"out": str(out), "data": "csv:typo.csv", "lr": 9.0}))
    (out / "log.csv").write_text("epoch,loss\n")
    (out / STALE).write_bytes(b"half a checkpoint")
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(out))
    assert rc == 0, err
    assert not (out / STALE).exists()
    assert json.loads((out / "train_config.json").read_text())["data"] == SPEC
    # and --resume on such a folder starts afresh instead of refusing another configuration
    again = tmp_path / "y"
    again.mkdir()
    (again / "train_config.json").write_text(json.dumps({"out": str(again), "data": "csv:typo.csv"}))
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(again), "--resume")
    assert rc == 0, err


def test_a_folder_with_a_checkpoint_still_needs_resume(gallery, tmp_path, capsys):
    run = copy_of(gallery, tmp_path)
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(run))
    one_line_error(rc, err, "already holds a run; pass --resume")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("embed_dim", "abc", "embed_dim must be an integer, got string"),
        ("mean", None, "mean must be a list of numbers, got null"),
        ("compatible_with", "runs/g", "compatible_with must be an object or null, got string"),
        ("classes", [1, 2], "classes must be a list of strings"),
        ("image_size", True, "image_size must be an integer, got boolean"),
    ],
)
def test_a_model_card_with_a_wrong_value_type(gallery, tmp_path, capsys, key, value, expected):
    g = copy_of(gallery, tmp_path)
    config = json.loads((g / ckpt.CONFIG).read_text())
    config[key] = value
    (g / ckpt.CONFIG).write_text(json.dumps(config))
    rc, err = run_cli(capsys, "train", *FLAGS, "--gallery", str(g), "--compat", "bct", "--out", str(tmp_path / "q"))
    one_line_error(rc, err, expected, str(g / ckpt.CONFIG))


def test_a_model_card_from_a_newer_hvs(gallery, tmp_path, capsys):
    g = copy_of(gallery, tmp_path)
    config = json.loads((g / ckpt.CONFIG).read_text())
    assert config["hvs_version"]  # the writing version is recorded
    config.update(hvs_version="9.1.0", normalize="none")
    (g / ckpt.CONFIG).write_text(json.dumps(config))
    rc, err = run_cli(capsys, "train", *FLAGS, "--gallery", str(g), "--compat", "bct", "--out", str(tmp_path / "q"))
    one_line_error(rc, err, "unknown key 'normalize'", "written by hvs 9.1.0", str(g / ckpt.CONFIG))
    assert "corrupt" not in err


def test_replaced_weights_are_refused_by_name(gallery, tmp_path, capsys):
    g = copy_of(gallery, tmp_path)
    raw = bytearray((g / ckpt.WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit pattern in the last weight
    (g / ckpt.WEIGHTS).write_bytes(bytes(raw))
    rc, err = run_cli(capsys, "train", *FLAGS, "--gallery", str(g), "--compat", "bct", "--out", str(tmp_path / "q"))
    one_line_error(rc, err, str(g / ckpt.WEIGHTS), "fingerprint")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_classifier_is_refused_by_name(gallery, tmp_path, capsys, damage):
    """BCT trains the query model against the gallery model's classifier rows: a changed file would train it
    into another space without a word."""
    g = copy_of(gallery, tmp_path)
    raw = bytearray((g / ckpt.CLASSIFIER).read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    (g / ckpt.CLASSIFIER).write_bytes(bytes(raw))
    rc, err = run_cli(capsys, "train", *FLAGS, "--gallery", str(g), "--compat", "bct", "--out", str(tmp_path / "q"))
    one_line_error(rc, err, str(g / ckpt.CLASSIFIER), "fingerprint")


def test_a_truncated_checkpoint_is_refused_by_name(gallery, tmp_path, capsys):
    run = copy_of(gallery, tmp_path)
    state = run / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(run), "--resume")
    one_line_error(rc, err, str(state), "truncated or corrupt")


def test_an_altered_checkpoint_fails_its_checksum(gallery, tmp_path, capsys):
    run = copy_of(gallery, tmp_path)
    state = torch.load(run / "state.pt", weights_only=True)
    assert ckpt.STATE_CHECKSUM in state
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] + 1  # loads fine, but is not what was saved
    torch.save(state, run / "state.pt")
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(run), "--resume")
    one_line_error(rc, err, str(run / "state.pt"), "checksum")


def test_resume_clears_the_temporary_file_of_a_killed_checkpoint(gallery, tmp_path, capsys):
    run = copy_of(gallery, tmp_path)
    (run / STALE).write_bytes(b"half a checkpoint")
    rc, err = run_cli(capsys, "train", *FLAGS, "--out", str(run), "--resume")
    assert rc == 0, err
    assert not (run / STALE).exists()


def test_atomic_writes_leave_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    fileio.atomic_write_json(target, {"v": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_stale_temporary_files_are_ours_only(tmp_path):
    for name in (STALE, ".model.safetensors.abcdefgh.tmp", "notes.tmp", ".hidden.tmp", "keep.json"):
        (tmp_path / name).write_text("x")
    assert fileio.remove_stale_temps(tmp_path) == [".model.safetensors.abcdefgh.tmp", STALE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "keep.json", "notes.tmp"]
