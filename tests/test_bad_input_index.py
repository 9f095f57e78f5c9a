"""Bad input to the index commands, run through the CLI as a user would (``hvs.cli.main``).

Each case must end with return code 2 and one stderr line that names the problem: no traceback,
no Python-API wording (``create=True``, ``work_dir``, ``skip_bad=True``) a CLI user cannot act on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SPEC, build_tiny_world
from PIL import Image

from hvs import checkpoint as ckpt
from hvs.cli import main

PYTHON_WORDING = ("create=True", "work_dir", "skip_bad", "Traceback")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-index")
    data = build_tiny_world(root)
    Image.fromarray(data.query.images[0, 0].numpy()).save(root / "query.png")
    for name in ("g", "q"):  # the same models with NaN weights (a diverged training run)
        model, card = ckpt.load_model(root / name)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        ckpt.save_model_folder(root / f"{name}-nan", model, card)
    return root


@pytest.fixture
def index(world, tmp_path) -> Path:
    shutil.copytree(world / "idx", tmp_path / "idx")
    return tmp_path / "idx"


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run ``hvs ARGV``: return code 2, exactly one stderr line, containing every needle."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    for needle in needles:
        assert needle in line, (needle, line)
    for wording in PYTHON_WORDING:
        assert wording not in line, (wording, line)
    return line


def _version(index: Path) -> Path:
    return index / (index / "CURRENT").read_text().strip()


def test_k_below_one(world, index, capsys):
    for k in ("0", "-3"):
        fails(
            capsys,
            ["search", "--index", str(index), "--query-model", str(world / "q"), "-k", k, str(world / "query.png")],
            "k must be a positive integer",
        )


def test_huge_k_returns_the_whole_gallery(world, index, capsys):
    """Not an error: k is capped at the index size (5e6 keeps the pre-fix failure mode affordable;
    the index tests measure that no k-sized buffer is allocated)."""
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "--index",
                str(index),
                "--query-model",
                str(world / "q"),
                "-k",
                "5000000",
                "--json",
                str(world / "query.png"),
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)[0]["results"]) == 18


def test_id_beyond_int64(index, capsys):
    fails(
        capsys,
        ["index", "remove", "--index", str(index), "99999999999999999999999"],
        "id 99999999999999999999999 is out of range",
        "int64",
    )


def test_flipped_bytes_in_index_faiss(index, capsys):
    path = _version(index) / "index.faiss"
    data = bytearray(path.read_bytes())
    # 200 bytes inside the 18 x 16 stored floats (the file ends with the 8 + 18 * 8 bytes of the id
    # map): FAISS reads such a file without complaint, and searches it with scores far beyond 1
    for i in range(len(data) - 152 - 400, len(data) - 152 - 200):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    fails(capsys, ["index", "info", "--index", str(index)], "index.faiss is corrupt", "SHA-256")


@pytest.mark.parametrize("value", [np.nan, 1000.0])
def test_bad_rows_in_vectors_npy(index, capsys, value):
    path = _version(index) / "vectors.npy"
    vectors = np.load(path)
    vectors[5] = value
    np.save(path, vectors)
    fails(capsys, ["index", "info", "--index", str(index)], "vectors.npy is corrupt")


def test_factory_needing_more_vectors_fails_before_embedding_and_flat_reuses_nothing_stale(world, tmp_path, capsys):
    out = tmp_path / "ivf"
    fails(
        capsys,
        [
            "index",
            "build",
            "--gallery-model",
            str(world / "g"),
            "--data",
            TINY_SPEC,
            "--out",
            str(out),
            "--factory",
            "IVF256,Flat",
            "--no-progress",
        ],
        "'IVF256,Flat' needs at least 256 vectors",
        "got 18",
    )
    assert not Path(f"{out}.build").exists() or not list(Path(f"{out}.build").rglob("shard_*"))
    capsys.readouterr()
    assert (
        main(
            [
                "index",
                "build",
                "--gallery-model",
                str(world / "g"),
                "--data",
                TINY_SPEC,
                "--out",
                str(out),
                "--factory",
                "Flat",
                "--no-progress",
            ]
        )
        == 0
    )


def test_nan_gallery_model_then_a_retry_with_the_fixed_model(world, tmp_path, capsys):
    out = tmp_path / "nan"
    line = fails(
        capsys,
        [
            "index",
            "build",
            "--gallery-model",
            str(world / "g-nan"),
            "--data",
            TINY_SPEC,
            "--out",
            str(out),
            "--no-progress",
        ],
        "embedding of item 0",
        "NaN",
    )
    assert "gallery model" in line
    capsys.readouterr()
    assert (
        main(
            [
                "index",
                "build",
                "--gallery-model",
                str(world / "g"),
                "--data",
                TINY_SPEC,
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )  # the failed build's (empty) shard folder does not block it


def test_nan_query_model(world, index, capsys):
    fails(
        capsys,
        ["search", "--index", str(index), "--query-model", str(world / "q-nan"), str(world / "query.png")],
        "NaN or inf",
    )


def test_missing_index_and_existing_output_use_cli_wording(world, index, tmp_path, capsys):
    line = fails(capsys, ["index", "info", "--index", str(tmp_path / "nowhere")], "no index at")
    assert "hvs index build" in line
    fails(
        capsys,
        [
            "index",
            "build",
            "--gallery-model",
            str(world / "g"),
            "--data",
            TINY_SPEC,
            "--out",
            str(index),
            "--no-progress",
        ],
        "already exists",
    )


def _log_with_records(index: Path, n: int) -> tuple[Path, bytes]:
    """Add n items through the CLI's library path (one log record each) and return the log."""
    from hvs.index import open_index

    with open_index(f"faiss:{index}") as ix:
        for i in range(n):
            ix.add(np.ones((1, ix.dim), np.float32) + i, labels=[f"new{i}"])
    log = _version(index) / "wal.log"
    return log, log.read_bytes()


def test_a_torn_log_tail_is_a_warning_and_the_acknowledged_writes_stay(index, capsys):
    import hvs.index.faiss_backend as fb

    log, data = _log_with_records(index, 3)
    log.write_bytes(data[:-10])  # the last write was killed half-way
    fb._WARNED.clear()
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"wal.log ends in 1\d\d byte\(s\) that are not a complete record") as got:
        assert main(["index", "info", "--index", str(index)]) == 0
    assert len(got) == 1 and "\n" not in str(got[0].message)
    assert json.loads(capsys.readouterr().out)["count"] == 20  # 18 + the two complete records


def test_a_corrupt_log_record_followed_by_good_ones_is_refused(index, capsys):
    log, data = _log_with_records(index, 3)
    damaged = bytearray(data)
    damaged[40] ^= 0xFF  # inside the first record
    log.write_bytes(bytes(damaged))
    fails(capsys, ["index", "info", "--index", str(index)], "wal.log is corrupt at byte", "acknowledged writes")
    fails(capsys, ["index", "compact", str(index)], "wal.log is corrupt at byte")


def test_compact_folds_the_log_and_names_a_missing_index(index, tmp_path, capsys):
    _log_with_records(index, 2)
    capsys.readouterr()
    assert main(["index", "compact", str(index)]) == 0
    out = capsys.readouterr().out
    assert "compacted" in out and "20 items" in out and "2 log record(s)" in out
    assert main(["index", "compact", str(index)]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    fails(capsys, ["index", "compact", str(tmp_path / "nowhere")], "no index at", "nowhere")


def test_duplicate_and_unknown_ids(index, capsys):
    from hvs.index import IndexStoreError, open_index

    with open_index(f"faiss:{index}") as ix:
        with pytest.raises(IndexStoreError, match="id 3 is already in index") as info:
            ix.add(np.ones((1, ix.dim), np.float32), ids=[3])
        assert "\n" not in str(info.value)
        assert ix.remove([12345]) == 0 and len(ix) == 18  # an unknown id: nothing to remove
        with pytest.raises(IndexStoreError, match="cannot replace id 12345: not in index"):
            ix.replace([12345], np.ones((1, ix.dim), np.float32), "sha256:x")
    capsys.readouterr()
    assert main(["index", "remove", "--index", str(index), "12345"]) == 0
    assert "removed 0" in capsys.readouterr().out
