"""Bad input data, run through the CLI (``hvs.cli.main``) as a user would meet it.

Each case asserts the return code and what reaches stderr: one ``hvs ...: error: ...`` line, or
one ``hvs: warning: ...`` line per problem, naming it (counts, folder, file). Warnings are routed
to stderr as Python prints them outside pytest (``warnings.formatwarning``), so the test sees the
exact lines a user sees. Fixtures are tiny (16 px images, untrained cnn-nano models): the file
runs in seconds.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from hvs.checkpoint import ModelCard, save_model_folder
from hvs.cli import main
from hvs.models import create_model

SIZE = 16
CLASSES = ("a", "b", "c", "d")


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run(argv, capsys):
    """``(return code, stdout, non-empty stderr lines)`` of ``hvs ARGV``, warnings on stderr."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_warning  # as outside pytest: formatwarning, then stderr
        rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def rgb_files(root, per_class=4):
    """RGB PNGs root/img/<class>_<i>.png, each a distinct seeded pattern."""
    rng = np.random.default_rng(0)
    rows = []
    for c, cls in enumerate(CLASSES):
        for i in range(per_class):
            path = root / "img" / f"{cls}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            arr[..., c % 3] = 40 * c  # some class signal
            Image.fromarray(arr).save(path)
            rows.append((f"img/{cls}_{i}.png", cls))
    return rows


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return f"csv:{path}"


def clean_rows(files):
    """Per class: 2 train, 1 query, 1 gallery."""
    rows = []
    for k, (rel, cls) in enumerate(files):
        rows.append((rel, cls, ("train", "train", "query", "gallery")[k % 4]))
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained 1-channel gallery model and a query model made for it (no training needed:
    the cases are about what data reaches the models, not how well they do)."""
    root = tmp_path_factory.mktemp("models")
    g = create_model("cnn-nano", embed_dim=8, in_chans=1)
    g_card = save_model_folder(root / "g", g, ModelCard("cnn-nano", 8, 1, SIZE, [0.5], [0.25], classes=list(CLASSES)))
    q = create_model("cnn-nano", embed_dim=8, in_chans=1)
    save_model_folder(
        root / "q",
        q,
        ModelCard(
            "cnn-nano",
            8,
            1,
            SIZE,
            [0.5],
            [0.25],
            role="query",
            compatible_with={"fingerprint": g_card.fingerprint, "model": "cnn-nano", "path": str(root / "g")},
        ),
    )
    return root / "g", root / "q"


def evaluate_argv(models, spec, *extra):
    g, q = models
    return [
        "evaluate",
        "--gallery-model",
        g,
        "--query-model",
        q,
        "--data",
        spec,
        "--no-latency",
        "--bootstrap",
        "20",
        *extra,
    ]


# --------------------------------------------------------------------------- leaks and channels


def test_evaluate_reads_a_3_channel_csv_for_1_channel_models(models, tmp_path, capsys):
    # the channels conversion of `hvs index build` (create_dataset(channels=card.in_chans))
    spec = write_manifest(tmp_path / "m.csv", clean_rows(rgb_files(tmp_path)))
    rc, out, err = run(evaluate_argv(models, spec), capsys)
    assert (rc, err) == (0, [])
    assert "M(q->g)" in out and "4 queries, 4 gallery items" in out
    rc, out, err = run(
        [
            "index",
            "build",
            "--gallery-model",
            models[0],
            "--data",
            spec,
            "--out",
            f"faiss:{tmp_path / 'idx'}",
            "--no-progress",
        ],
        capsys,
    )
    assert (rc, err) == (0, []) and "4 vectors" in out


def test_query_files_listed_again_in_the_gallery_warn_with_the_count_and_strict_refuses(models, tmp_path, capsys):
    rows = clean_rows(rgb_files(tmp_path))
    leaked = rows + [(rel, cls, "gallery") for rel, cls, split in rows if split == "query"]
    spec = write_manifest(tmp_path / "leak.csv", leaked)
    rc, out, err = run(evaluate_argv(models, spec), capsys)
    assert rc == 0
    assert err == [
        f"hvs: warning: {spec}: 4 query item(s) are also in the gallery (same source and pixels), "
        f"e.g. {tmp_path / 'img' / 'a_2.png'}; every model finds them at rank 1"
    ]
    assert "note: data: " in out  # the report carries it too
    rc, out, err = run(evaluate_argv(models, spec, "--strict"), capsys)
    assert rc == 2 and len(err) == 1 and out == ""
    assert err[0].startswith(f"hvs evaluate: error: {spec}: 4 query item(s) are also in the gallery")
    assert err[0].endswith("refused in strict mode")


def test_a_copied_query_file_in_the_gallery_is_found_by_its_pixels(models, tmp_path, capsys):
    rows = clean_rows(rgb_files(tmp_path))
    copy = tmp_path / "img" / "copy_of_a_2.png"
    copy.write_bytes((tmp_path / "img" / "a_2.png").read_bytes())
    spec = write_manifest(tmp_path / "copy.csv", rows + [("img/copy_of_a_2.png", "a", "gallery")])
    rc, _, err = run(evaluate_argv(models, spec), capsys)
    assert rc == 0 and len(err) == 1
    assert f"{spec}: 1 query image(s) are pixel-identical to a gallery image" in err[0]
    assert "copy_of_a_2.png" in err[0]


def test_a_row_repeated_within_a_split_is_one_warning_line_per_split(models, tmp_path, capsys):
    rows = clean_rows(rgb_files(tmp_path))
    gallery = [r for r in rows if r[2] == "gallery"]
    spec = write_manifest(tmp_path / "twice.csv", rows + gallery[:3])
    rc, _, err = run(evaluate_argv(models, spec), capsys)
    assert rc == 0
    assert err == [
        f"hvs: warning: {spec}: 3 gallery item(s) are listed more than once in the gallery split "
        f"(same source and pixels), e.g. {tmp_path / 'img' / 'a_3.png'}"
    ]
    rc, _, err = run(evaluate_argv(models, spec, "--strict"), capsys)
    assert rc == 2 and len(err) == 1 and "3 gallery item(s) are listed more than once" in err[0]


# --------------------------------------------------------------------------- imagefolder, splits


def test_an_empty_imagefolder_class_is_left_out_with_one_line_naming_it(tmp_path, capsys):
    for rel, cls in rgb_files(tmp_path):
        dst = tmp_path / "tree" / cls / os.path.basename(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((tmp_path / rel).read_bytes())
    (tmp_path / "tree" / "empty").mkdir()
    (tmp_path / "tree" / "empty" / "README.txt").write_text("not an image")
    rc, out, err = run(["data", "info", f"imagefolder:{tmp_path / 'tree'}", "--json"], capsys)
    assert rc == 0
    assert err == [
        f"hvs: warning: imagefolder:{tmp_path / 'tree'}: 1 class folder(s) hold no images and "
        f"are not used as classes: {tmp_path / 'tree' / 'empty'}"
    ]
    assert '"classes": 4' in out


def test_index_build_decodes_only_the_gallery(models, tmp_path, capsys):
    rows = clean_rows(rgb_files(tmp_path))
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    rows.append(("img/broken.png", "a", "train"))  # only a train row is unreadable
    spec = write_manifest(tmp_path / "m.csv", rows)
    rc, out, err = run(
        [
            "index",
            "build",
            "--gallery-model",
            models[0],
            "--data",
            spec,
            "--strict",
            "--out",
            f"faiss:{tmp_path / 'idx'}",
            "--no-progress",
        ],
        capsys,
    )
    assert (rc, err) == (0, []) and "4 vectors" in out
    # evaluate needs query and gallery only, too; the train row is still read by training
    rc, _, err = run(evaluate_argv(models, spec, "--strict"), capsys)
    assert (rc, err) == (0, [])
    rc, _, err = run(["data", "info", spec], capsys)
    assert rc == 0 and len(err) == 1 and "skipped 1 item(s)" in err[0] and "broken.png" in err[0]


# --------------------------------------------------------------------------- caches and formatting


def test_an_altered_kanji_fonts_cache_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("fontTools")
    from test_kanji_fonts import make_font

    from hvs.data import kanji_fonts as kf

    chars = kf.jis_level1()[:6]
    faces = [
        kf.FontFace(
            "Boxes Print", "Regular", make_font(tmp_path / "p.ttf", chars, "Boxes Print"), kind=kf.PRINT, package="test"
        ),
        kf.FontFace(
            "Boxes Hand",
            "Regular",
            make_font(tmp_path / "h.ttf", chars, "Boxes Hand"),
            kind=kf.HANDWRITING,
            package="test",
        ),
    ]
    kf.build_cache(str(tmp_path / "kf"), size=SIZE, limit=6, faces=faces, progress=False)
    spec = f"kanji-fonts:{tmp_path / 'kf'},size={SIZE},limit=6"
    assert run(["data", "info", spec], capsys)[0] == 0
    path = kf.cache_path(str(tmp_path / "kf"), SIZE, 6)
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["images"] = arrays["images"] // 2  # still a well-formed cache, not the one built
    with open(path, "wb") as f:
        f.write(kf._npz_bytes(arrays))
    rc, out, err = run(["data", "info", spec], capsys)
    assert rc == 2 and out == "" and len(err) == 1
    assert err[0].startswith(f"hvs data: error: {path}: corrupt kanji-fonts cache (SHA-256 ")


def test_data_warnings_print_as_one_line_through_pythons_own_formatter():
    """Outside pytest, Python prints a warning as ``warnings._formatwarnmsg`` formats it (file:line,
    category, then the source line by default); a DataWarning must come out as its one line."""
    from hvs.data import DataWarning

    def printed(message, category):
        return warnings._formatwarnmsg(warnings.WarningMessage(message, category, __file__, 1))

    text = "csv:m.csv: 2 query item(s) are also in the gallery"
    assert printed(DataWarning(text), DataWarning) == f"hvs: warning: {text}\n"
    assert "UserWarning: other" in printed(UserWarning("other"), UserWarning)  # others unchanged


def test_evaluate_checks_a_dataset_passed_in_memory_too(models, tmp_path):
    from hvs.data import DataError, DataWarning, create_dataset
    from hvs.evaluate import evaluate

    rows = clean_rows(rgb_files(tmp_path))
    leaked = rows + [(rel, cls, "gallery") for rel, cls, split in rows if split == "query"]
    with pytest.warns(DataWarning, match="4 query item"):
        data = create_dataset(write_manifest(tmp_path / "leak.csv", leaked), image_size=SIZE, channels=1)
    with pytest.warns(DataWarning, match="4 query item"):
        result = evaluate(*models, data, latency=False, n_boot=20)
    assert len(result["data_duplicates"]) == 1 and "4 query item(s)" in result["data_duplicates"][0]
    with pytest.raises(DataError, match="refused in strict mode"):
        evaluate(*models, data, latency=False, n_boot=20, strict=True)
