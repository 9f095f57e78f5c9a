"""Tests for the kanji-fonts source (hvs.data.kanji_fonts) and ``hvs data``.

Two kinds of fixture, both tiny (LIMIT characters at SIZE px):

* the CJK fonts installed on this machine, at most 4 faces (2 print, 2 handwriting): the tests
  that need them skip with the reason when fewer than one print and one handwriting face are
  installed (``make setup`` installs them);
* fonts written by fontTools' FontBuilder into tmp_path (boxes instead of strokes): a face that
  lacks a character, one with an empty outline, a corrupt file — the coverage and error paths,
  independent of what is installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hvs.cli import main
from hvs.data import DataError, create_dataset, validate
from hvs.data import kanji_fonts as kf

pytest.importorskip("fontTools", reason="kanji-fonts reads font cmaps with fontTools (pip install fonttools)")

LIMIT, SIZE, FACES = 20, 16, 4
SPEC_OPTS = f"limit={LIMIT},size={SIZE},max_faces={FACES}"


# --------------------------------------------------------------------------- no fonts needed


def test_jis_level1_is_2965_kanji_from_euc_jp():
    chars = kf.jis_level1()
    assert len(chars) == 2965 == len(set(chars))
    assert (chars[0], chars[-1]) == ("亜", "腕")  # JIS 16-01 and 47-51
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in chars)  # all CJK unified ideographs
    undecodable = []
    for lead in range(0xB0, 0xD0):
        for trail in range(0xA1, 0xFF):
            try:
                bytes((lead, trail)).decode("euc_jp")
            except UnicodeDecodeError:
                undecodable.append((lead, trail))
    # the only gaps: row 47 cells 52-94, unassigned in JIS X 0208 (32 * 94 - 43 = 2965)
    assert undecodable == [(0xCF, t) for t in range(0xD4, 0xFF)]


def test_open_set_split_is_seeded_disjoint_and_keeps_a_mated_identity():
    train, mated, non = kf.open_set_split(30, seed=3)
    assert (len(train), len(mated), len(non)) == (20, 5, 5)
    assert sorted(np.concatenate([train, mated, non]).tolist()) == list(range(30))
    again = kf.open_set_split(30, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, mated, non), again))
    assert not np.array_equal(kf.open_set_split(30, seed=4)[0], train)
    assert len(kf.open_set_split(3, nonmated_fraction=0.9)[1]) == 1  # at least one mated
    with pytest.raises(DataError, match="train_fraction"):
        kf.open_set_split(10, train_fraction=1.0)
    with pytest.raises(DataError, match="nonmated_fraction"):
        kf.open_set_split(10, nonmated_fraction=1.0)


def test_options_from_spec_and_kwargs():
    assert kf.parse_options("/tmp/x") == {"dir": "/tmp/x"}
    assert kf.parse_options("/tmp/x,limit=5,jitter=0.5") == {"dir": "/tmp/x", "limit": 5, "jitter": 0.5}
    opts = kf.resolve_options("size=16", seed=7, train_fraction=0.5)
    assert (opts["size"], opts["seed"], opts["train_fraction"], opts["dir"]) == (16, 7, 0.5, None)
    with pytest.raises(DataError, match="bad option 'colour=1'"):
        kf.parse_options("colour=1")
    with pytest.raises(DataError, match="limit must be an integer"):
        kf.parse_options("limit=many")
    with pytest.raises(DataError, match="size=16 in the spec but 32 passed"):
        kf.resolve_options("size=16", image_size=32)
    with pytest.raises(DataError, match="unknown option 'fonts'"):
        kf.resolve_options(None, fonts=3)


def test_cache_dir_honours_hvs_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HVS_CACHE", str(tmp_path))
    assert kf.default_cache_dir() == str(tmp_path / "kanji-fonts")
    assert kf.cache_path(None, 32) == str(tmp_path / "kanji-fonts" / "kanji-fonts-32px.npz")
    assert kf.cache_path("/c", 16, limit=20, max_faces=4, jitter=0.5).endswith(
        "kanji-fonts-16px-jitter0.5-limit20-faces4.npz"
    )


def test_no_fonts_is_a_one_line_error_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(kf, "discover_faces", lambda: ([], [], []))
    with pytest.raises(DataError) as err:
        create_dataset(f"kanji-fonts:{tmp_path},limit=5", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "make setup" in msg and "apt-get install fonts-" in msg
    assert not os.listdir(tmp_path)  # nothing half-written


# --------------------------------------------------------------------------- fonts written here


def make_font(path, chars, family, empty=()):
    """A TrueType font mapping ``chars`` to box glyphs (a different pattern each); characters in
    ``empty`` map to a glyph with no outline."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef"] + [f"uni{ord(c):04X}" for c in chars]
    glyphs = {}
    for i, name in enumerate(names):
        pen = TTGlyphPen(None)
        if name[3:] not in {f"{ord(c):04X}" for c in empty}:
            for bit in range(5):
                if (i + 1) >> bit & 1:  # clockwise box per set bit
                    x = 60 + 180 * bit
                    pen.moveTo((x, 100)), pen.lineTo((x, 800)), pen.lineTo((x + 120, 800))
                    pen.lineTo((x + 120, 100)), pen.closePath()
        glyphs[name] = pen.glyph()
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in chars})
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (1000, 0) for n in names})
    fb.setupHorizontalHeader(ascent=880, descent=-120)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    fb.setupPost()
    fb.save(str(path))
    return str(path)


def test_coverage_gaps_empty_outlines_and_broken_fonts_are_skipped_and_recorded(tmp_path):
    chars = kf.jis_level1()[:LIMIT]
    lacking, blank = chars[3], chars[5]
    bad = tmp_path / "broken.ttf"
    bad.write_bytes(b"\x00\x01\x00\x00 not really a font")
    faces = [
        kf.FontFace(
            "Boxes Print",
            "Regular",
            make_font(tmp_path / "p.ttf", [c for c in chars if c != lacking], "Boxes Print"),
            kind=kf.PRINT,
            package="test",
        ),
        kf.FontFace("Broken", "Regular", str(bad), kind=kf.PRINT, package="test"),
        kf.FontFace(
            "Boxes Hand",
            "Regular",
            make_font(tmp_path / "h.ttf", chars, "Boxes Hand", empty=[blank]),
            kind=kf.HANDWRITING,
            package="test",
        ),
    ]
    m = kf.build_cache(str(tmp_path / "cache"), size=SIZE, limit=LIMIT, faces=faces, progress=False)
    assert [f["key"] for f in m["faces"]] == ["Boxes Print Regular", "Boxes Hand Regular"]
    assert any(s.startswith("Broken Regular") and "cannot be read" in s for s in m["skipped"])
    arrays = kf.load_cache(kf.cache_path(str(tmp_path / "cache"), SIZE, LIMIT))
    printed = arrays["codes"][arrays["face"] == 0].tolist()
    hand = arrays["codes"][arrays["face"] == 1].tolist()
    assert ord(lacking) not in printed and len(printed) == LIMIT - 1
    assert ord(blank) not in hand and len(hand) == LIMIT - 1
    assert arrays["meta"]["faces"][0]["missing"] == [ord(lacking)]
    assert arrays["meta"]["faces"][1]["empty"] == [ord(blank)]
    assert m["faces"][0]["sha256"] == kf._sha256(faces[0].path)
    # every kept view has ink, centred: the box pattern's bounding box sits mid-canvas
    assert (arrays["images"].reshape(len(arrays["images"]), -1).max(axis=1) > 0).all()


def test_near_duplicate_faces_are_dropped(tmp_path):
    chars = kf.jis_level1()
    path = make_font(tmp_path / "a.ttf", chars, "Boxes")
    a = kf.FontFace("Boxes", "Regular", path, kind=kf.PRINT)
    b = kf.FontFace("Boxes Copy", "Regular", path, kind=kf.PRINT)
    kept, dropped = kf.select_faces([a, b])
    assert [f.key for f, _ in kept] == ["Boxes Regular"]
    assert dropped == [f"Boxes Copy Regular ({path}): near-duplicate of Boxes Regular"]


# --------------------------------------------------------------------------- fonts installed here


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Cache folder holding a LIMIT-character, FACES-face build from the installed fonts."""
    usable, _, _ = kf.discover_faces()
    kinds = [f.kind for f in usable]
    if kf.PRINT not in kinds or kf.HANDWRITING not in kinds:
        pytest.skip(
            f"needs >= 1 print and >= 1 handwriting CJK font face installed, found "
            f"{kinds.count(kf.PRINT)} print and {kinds.count(kf.HANDWRITING)} handwriting "
            f"(`make setup` or apt-get install fonts-ipaexfont-mincho fonts-seto)"
        )
    folder = str(tmp_path_factory.mktemp("kanji-cache"))
    kf.build_cache(folder, size=SIZE, limit=LIMIT, max_faces=FACES, progress=False)
    return folder


def test_build_is_deterministic(installed, tmp_path):
    path = kf.cache_path(installed, SIZE, LIMIT, FACES)
    m = kf.build_cache(str(tmp_path), size=SIZE, limit=LIMIT, max_faces=FACES, progress=False)
    with open(path, "rb") as a, open(kf.cache_path(str(tmp_path), SIZE, LIMIT, FACES), "rb") as b:
        assert a.read() == b.read()
    kinds = {f["kind"] for f in m["faces"]}
    assert kinds == {kf.PRINT, kf.HANDWRITING} and 2 <= len(m["faces"]) <= FACES
    for face in m["faces"]:
        rule = next(r for r in kf.FONT_TABLE if r.family == face["family"])
        assert (face["kind"], face["package"]) == (rule.kind, rule.package)
        assert len(face["sha256"]) == 64 and os.path.isfile(face["path"])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic: no leftovers


def load(folder, **kw):
    return create_dataset(f"kanji-fonts:{folder},{SPEC_OPTS}", protocol="open", progress=False, **kw)


def test_open_set_splits_by_style_with_nonmated_probes(installed):
    data = load(installed, seed=1)
    validate(data)
    assert data.protocol == "open" and len(data.classes) == LIMIT and data.classes[0] == "亜"
    assert data.train.images.shape[1:] == (1, SIZE, SIZE) and data.train.images.dtype == torch.uint8
    manifest = kf.read_manifest(kf.cache_path(installed, SIZE, LIMIT, FACES))
    kind = {f["key"]: f["kind"] for f in manifest["faces"]}

    def faces(split):
        return {src.split(":")[1] for src in split.sources}

    assert {kind[f] for f in faces(data.query)} == {kf.HANDWRITING}
    assert {kind[f] for f in faces(data.gallery)} == {kf.PRINT}
    assert {kind[f] for f in faces(data.train)} == {kf.PRINT, kf.HANDWRITING}  # both styles train
    train, query, gallery = (set(s.labels.tolist()) for s in (data.train, data.query, data.gallery))
    assert not train & (query | gallery)
    assert gallery < query  # every gallery identity is probed; the rest are non-mated
    train_ids, mated, nonmated = kf.open_set_split(LIMIT, 1)
    assert train == set(train_ids.tolist()) and gallery == set(mated.tolist())
    assert query - gallery == set(nonmated.tolist()) and nonmated.size >= 1
    # a different seed re-splits the same cache
    assert set(load(installed, seed=2).train.labels.tolist()) != train


def test_second_load_reuses_the_cache_without_rendering(installed, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("re-rendered although the cache exists")

    monkeypatch.setattr(kf, "render_glyph", fail)
    monkeypatch.setattr(kf, "discover_faces", fail)
    kf._load_cache.cache_clear()  # read the file again, not the in-process copy
    data = load(installed, channels=3)
    assert data.channels == 3 and len(data.query) > 0


def _copy_cache(installed, tmp_path, blob=None):
    """The installed test cache and its manifest copied into tmp_path (``blob`` replaces the .npz)."""
    good, bad = kf.cache_path(installed, SIZE, LIMIT, FACES), kf.cache_path(str(tmp_path), SIZE, LIMIT, FACES)
    with open(good, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data if blob is None else blob)
    with open(kf._manifest_path(good), "rb") as src, open(kf._manifest_path(bad), "wb") as dst:
        dst.write(src.read())
    return good, bad, data


def test_corrupt_cache_is_a_one_line_error_naming_the_file(installed, tmp_path):
    _, bad, blob = _copy_cache(installed, tmp_path)
    for damaged in (blob[: len(blob) // 2], b"PK\x03\x04 garbage"):
        with open(bad, "wb") as f:
            f.write(damaged)
        with pytest.raises(DataError) as err:
            load(tmp_path)
        assert bad in str(err.value) and "\n" not in str(err.value) and "corrupt" in str(err.value)


def test_cache_altered_since_its_build_fails_the_recorded_sha256(installed, tmp_path):
    # a well-formed cache whose images were changed after the build (np.load alone accepts it)
    arrays = dict(np.load(kf.cache_path(installed, SIZE, LIMIT, FACES), allow_pickle=False))
    arrays["images"] = 255 - arrays["images"]
    _, bad, _ = _copy_cache(installed, tmp_path, kf._npz_bytes(arrays))
    with pytest.raises(DataError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert bad in msg and "SHA-256" in msg and "\n" not in msg and "--force" in msg
    assert main(["data", "info", f"kanji-fonts:{tmp_path},{SPEC_OPTS}"]) == 2


def test_cache_without_its_manifest_is_an_interrupted_build_and_is_rebuilt(installed, tmp_path):
    good, bad, blob = _copy_cache(installed, tmp_path, b"half a build")
    os.remove(kf._manifest_path(bad))  # the manifest (with the checksum) is written last
    data = load(tmp_path)
    with open(bad, "rb") as f:
        assert f.read() == blob  # rebuilt, byte-identical to the installed build
    assert len(data.gallery) > 0 and kf.read_manifest(bad)["sha256"] == kf._sha256(bad)


def test_jitter_is_deterministic_per_view(installed):
    face = kf.discover_faces()[0][0]
    font = kf.load_font(face, SIZE)
    plain = kf.render_glyph(font, "愛", SIZE)
    a = kf.render_glyph(font, "愛", SIZE, jitter=0.8, jitter_key=1)
    assert plain.dtype == np.uint8 and plain.shape == (SIZE, SIZE)
    assert np.array_equal(a, kf.render_glyph(font, "愛", SIZE, jitter=0.8, jitter_key=1))
    assert not np.array_equal(a, plain)
    assert not np.array_equal(a, kf.render_glyph(font, "愛", SIZE, jitter=0.8, jitter_key=2))


def test_cli_build_reuses_and_info_reports_nonmated_probes(installed, capsys):
    argv = [
        "data",
        "build",
        "kanji-fonts",
        "--out",
        installed,
        "--size",
        str(SIZE),
        "--limit",
        str(LIMIT),
        "--max-faces",
        str(FACES),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("reused ") and "handwriting" in out
    assert main(["data", "info", f"kanji-fonts:{installed},{SPEC_OPTS}"]) == 0
    out = capsys.readouterr().out
    assert "[open-set]" in out and "non-mated probes" in out
    assert main(["data", "info", "synthetic:classes=4,train_per_class=2,test_per_class=2"]) == 0
    assert "[closed-set]" in capsys.readouterr().out
    assert main(["data", "build", "synthetic"]) == 2
    assert "only kanji-fonts" in capsys.readouterr().err
