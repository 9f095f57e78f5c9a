"""Kanji rendered from real CJK fonts: an open-set identity dataset, ``kanji-fonts[:DIR]``.

What it stands in for. IJB-C face 1:N identification (Maze et al. 2018) is the benchmark a
heterogeneous search system is judged on: many identities, a few views of each, probes taken in
a different "style" (video frames, wild photos) than the enrolled gallery (mugshot-like stills),
identities never seen in training, and *non-mated* probes whose identity is not enrolled at all,
so that an open-set system is scored by TPIR at a fixed FPIR. No face data can be had offline;
kanji rendered from the fonts Debian ships reproduce that structure with real (not procedural)
variation:

* **identities** = the 2,965 JIS X 0208 level-1 kanji (:func:`jis_level1`);
* **views** = one glyph per font face that has it: with the Debian set ``make setup`` installs,
  37 faces (21 print, 16 handwriting), 107,652 views, 33–37 per identity;
* **the style gap**: the gallery holds *print* faces (Mincho/Gothic, e.g. IPAex, Noto CJK JP,
  BIZ UD), the queries *handwriting and brush* faces (Seto, Klee One, Kouzan brush, Aoyagi,
  kiloji, Kaiti, ...). A query model has to map a brush-written 永 onto a printed 永 it never
  saw, as a face model maps a video frame onto an enrolment photo. Which face is which is an
  explicit table (:data:`FONT_TABLE`) keyed on the font family and its Debian package, never a
  guess from the name or the pixels.

Splits (always the open protocol; ``protocol="closed"`` is not supported and is ignored, as for
DeepFashion2, so the registry-wide contract tests still load it):

* a seeded ``train_fraction`` (default 2/3) of the characters trains, with *all* their views
  (print and handwriting: a query model must see both styles to learn the mapping);
* of the remaining test characters a seeded ``nonmated_fraction`` (default 1/2, as each of
  IJB-C's two disjoint galleries G1/G2 leaves about half the probe subjects non-mated) are held
  out of the gallery: their handwriting views are *non-mated probes*;
* gallery = print views of the other (mated) test characters; query = handwriting views of all
  test characters. A test character that a print face happens to lack stays mated through the
  others; one with no print view at all is a non-mated probe by necessity.

Rendering is done once into a cache (``hvs data build kanji-fonts``, or on first use): every
(face, character) pair whose face's cmap has the character (checked with fontTools) is drawn by
FreeType (Pillow's ``ImageFont``) in grayscale, white on black, at an em of 7/8 of the canvas,
and its ink box is centred on a ``size`` x ``size`` canvas (shrunk only if it would not fit).
Faces that cannot be opened or raise FreeType errors are skipped and recorded, as are empty
outlines. The table already excludes known siblings (proportional "P" variants, Noto CJK
KR/SC/TC/HK next to JP); any other face whose glyphs are (near-)identical to one already kept
(Takao = IPA, WenQuanYi Micro Hei = Droid Sans Fallback) is dropped by :func:`select_faces`.
The cache is a compressed ``.npz`` (images, code points, face ids, a JSON face table with
package, family, path, class and the font file's sha256) plus a manifest, written atomically
and byte-for-byte deterministic for a given font set, so a cache built once can be copied (with
its ``.json`` manifest) to a machine without the fonts. The manifest, written last, records the
cache's SHA-256, checked at every open: an altered or damaged cache is a one-line error, and a
cache without its manifest is an interrupted build, built again. Its name depends only on the render
settings, not on the fonts found: after installing or removing fonts, rebuild with
``hvs data build kanji-fonts --force``.

    hvs data fonts --all                          what is installed and how it is classified
    hvs data build kanji-fonts                    ~20 s on one core, 32 MiB at 32 px
    hvs data info kanji-fonts                     splits, views per identity, non-mated probes
    hvs train --data kanji-fonts --protocol open ...

Spec: ``kanji-fonts`` (cache in ``$HVS_CACHE/kanji-fonts``, default ``~/.cache/hvs/kanji-fonts``),
``kanji-fonts:DIR`` (cache folder), and options as ``KEY=VAL`` after the colon, comma-separated,
alone or after the folder (``kanji-fonts:limit=50,size=16``, ``kanji-fonts:/data/kf,seed=1``) or
as keyword arguments: ``size`` (32), ``seed``, ``train_fraction`` (2/3), ``nonmated_fraction``
(0.5), ``limit`` (first N characters), ``max_faces`` (at most N faces, half print, half
handwriting), ``jitter`` (0: off; e.g. 0.5 applies a small deterministic per-view rotation,
scale and shift), ``dir`` (the cache folder).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..fileio import atomic_write_bytes, sha256_file
from .base import SPLITS, DataError, RetrievalData, Split
from .images import channel_stats
from .registry import register_source
from .splits import check_nonempty

PRINT, HANDWRITING, EXCLUDE = "print", "handwriting", "exclude"
N_JIS_LEVEL1 = 2965
CACHE_FORMAT = 1
# The em is drawn at 7/8 of the canvas: JIS kanji fill most of their em box, so this leaves a
# pixel or two of margin at 32 px while keeping relative glyph size (一 stays a thin bar).
EM_FRACTION = 0.875
# Two faces are near-duplicates when their probe glyphs differ by less than this mean absolute
# difference relative to their mean ink. Measured at 32 px over 47 faces: re-releases (Takao vs.
# IPA, WenQuanYi Micro Hei vs. Droid Sans Fallback) sit at 0.000-0.002; the closest distinct
# pair, IPAGothic vs. IPAexGothic, at 0.097; every other pair above 0.2.
DUPLICATE_THRESHOLD = 0.02
JITTER_SEED = 0x6B616E6A  # "kanj": the per-view jitter is a fixed function of (face, character)
INSTALL_HINT = (
    "run `make setup`, or apt-get install fonts-ipaexfont-mincho fonts-ipaexfont-gothic "
    "fonts-noto-cjk fonts-seto fonts-klee fonts-kouzan-mouhitsu fonts-kiloji"
)

DEFAULTS: dict[str, object] = {
    "dir": None,
    "size": 32,
    "seed": None,
    "train_fraction": 2 / 3,
    "nonmated_fraction": 0.5,
    "limit": None,
    "max_faces": None,
    "jitter": 0.0,
}
_INT_KEYS = {"size", "seed", "limit", "max_faces"}
_FLOAT_KEYS = {"train_fraction", "nonmated_fraction", "jitter"}


@dataclass(frozen=True)
class FontRule:
    """One row of :data:`FONT_TABLE`: a font family (as fontconfig names it) and what it is."""

    family: str
    package: str  # the Debian package that ships it
    kind: str  # PRINT (gallery), HANDWRITING (query) or EXCLUDE
    note: str
    styles: tuple[str, ...] | None = None  # only these styles (None: every style installed)


# The explicit print / handwriting classification. Order matters: it is the order faces are
# considered in, so when two faces are near-duplicates the earlier one is kept, and max_faces
# takes the first ones. Families found on the machine but absent here are reported as
# unclassified and never used.
FONT_TABLE: tuple[FontRule, ...] = (
    # --- print: gallery views (Mincho = serif, Gothic = sans, plus Chinese Ming/Hei) ---
    FontRule("IPAexMincho", "fonts-ipaexfont-mincho", PRINT, "Mincho, IPA (revised)"),
    FontRule("IPAexGothic", "fonts-ipaexfont-gothic", PRINT, "Gothic, IPA (revised)"),
    FontRule("Noto Serif CJK JP", "fonts-noto-cjk", PRINT, "Mincho, Adobe/Google"),
    FontRule("Noto Sans CJK JP", "fonts-noto-cjk", PRINT, "Gothic, Adobe/Google"),
    FontRule("BIZ UDMincho", "fonts-morisawa-bizud-mincho", PRINT, "Mincho, Morisawa UD"),
    FontRule("BIZ UDGothic", "fonts-morisawa-bizud-gothic", PRINT, "Gothic, Morisawa UD"),
    FontRule("IPAMincho", "fonts-ipafont-mincho", PRINT, "Mincho, IPA"),
    FontRule("IPAGothic", "fonts-ipafont-gothic", PRINT, "Gothic, IPA"),
    FontRule("TakaoMincho", "fonts-takao-mincho", PRINT, "IPA Mincho re-release: a duplicate when IPA is installed"),
    FontRule("TakaoGothic", "fonts-takao-gothic", PRINT, "IPA Gothic re-release: a duplicate when IPA is installed"),
    FontRule("Sawarabi Mincho", "fonts-sawarabi-mincho", PRINT, "Mincho, Sawarabi"),
    FontRule("Sawarabi Gothic", "fonts-sawarabi-gothic", PRINT, "Gothic, Sawarabi"),
    FontRule("HanaMinA", "fonts-hanazono", PRINT, "Mincho, Hanazono (KAGE)"),
    FontRule("Dejima", "fonts-dejima-mincho", PRINT, "antique Mincho"),
    FontRule("Oradano-mincho-GSRR", "fonts-oradano-mincho-gsrr", PRINT, "Meiji-era Mincho"),
    FontRule("MotoyaLCedar", "fonts-motoya-l-cedar", PRINT, "Gothic, Motoya"),
    FontRule("MotoyaLMaru", "fonts-motoya-l-maruberi", PRINT, "rounded Gothic, Motoya"),
    FontRule("VL Gothic", "fonts-vlgothic", PRINT, "Gothic, Vine Linux"),
    FontRule("UmePlus Gothic", "fonts-umeplus", PRINT, "Gothic, Ume + M+"),
    FontRule("M PLUS 1", "fonts-mplus", PRINT, "Gothic, M+", ("Regular", "Bold")),
    FontRule("Droid Sans Fallback", "fonts-droid-fallback", PRINT, "Hei (Gothic), Android"),
    FontRule("WenQuanYi Zen Hei", "fonts-wqy-zenhei", PRINT, "Hei (Gothic), WenQuanYi"),
    FontRule("WenQuanYi Micro Hei", "fonts-wqy-microhei", PRINT, "Hei (Gothic), from Droid"),
    FontRule("AR PL UMing CN", "fonts-arphic-uming", PRINT, "Ming (Mincho), Arphic"),
    # --- handwriting and brush: query views ---
    FontRule("SetoFont", "fonts-seto", HANDWRITING, "pen handwriting"),
    FontRule("Klee One", "fonts-klee", HANDWRITING, "pencil / pen handwriting"),
    FontRule("kiloji", "fonts-kiloji", HANDWRITING, "longhand"),
    FontRule("kiloji - B", "fonts-kiloji", HANDWRITING, "longhand, bold"),
    FontRule("kiloji - D", "fonts-kiloji", HANDWRITING, "longhand, thin"),
    FontRule("Yusei Magic", "fonts-yusei-magic", HANDWRITING, "permanent marker"),
    FontRule("KouzanBrushFont", "fonts-kouzan-mouhitsu", HANDWRITING, "brush, regular script"),
    FontRule("KouzanBrushFontGyousyo", "fonts-kouzan-mouhitsu", HANDWRITING, "brush, semi-cursive"),
    FontRule("KouzanBrushFontSousyo", "fonts-kouzan-mouhitsu", HANDWRITING, "brush, cursive (grass)"),
    FontRule("AoyagiKouzanFontT", "fonts-aoyagi-kouzan-t", HANDWRITING, "brush"),
    FontRule("AoyagiSosekiFont2", "fonts-aoyagi-soseki", HANDWRITING, "brush"),
    FontRule("AR PL UKai CN", "fonts-arphic-ukai", HANDWRITING, "brush regular script (Kaiti)"),
    FontRule("AR PL KaitiM GB", "fonts-arphic-gkai00mp", HANDWRITING, "brush regular script (Kaiti)"),
    FontRule("AR PL KaitiM Big5", "fonts-arphic-bkai00mp", HANDWRITING, "brush regular script (Kaiti)"),
    FontRule("cwTeXKai", "fonts-cwtex-kai", HANDWRITING, "brush regular script (Kaiti)"),
    FontRule("LXGW WenKai", "fonts-lxgw-wenkai", HANDWRITING, "Kaiti-style pen, from Klee One"),
    # --- known and deliberately unused ---
    *(
        FontRule(f"Noto {s} CJK {r}", "fonts-noto-cjk", EXCLUDE, "regional sibling of the JP face: near-duplicate")
        for s in ("Sans", "Serif", "Sans Mono")
        for r in ("KR", "SC", "TC", "HK")
    ),
    FontRule("Noto Sans Mono CJK JP", "fonts-noto-cjk", EXCLUDE, "monospaced Latin; same kanji as Noto Sans CJK JP"),
    *(
        FontRule(f, p, EXCLUDE, "proportional/monospaced variant: same kanji")
        for f, p in (
            ("IPAPMincho", "fonts-ipafont-mincho"),
            ("IPAPGothic", "fonts-ipafont-gothic"),
            ("TakaoPMincho", "fonts-takao-mincho"),
            ("TakaoPGothic", "fonts-takao-gothic"),
            ("BIZ UDPMincho", "fonts-morisawa-bizud-mincho"),
            ("BIZ UDPGothic", "fonts-morisawa-bizud-gothic"),
            ("VL PGothic", "fonts-vlgothic"),
            ("UmePlus P Gothic", "fonts-umeplus"),
            ("kiloji - P", "fonts-kiloji"),
            ("Konatu Tohaba", "fonts-konatu"),
            ("WenQuanYi Micro Hei Mono", "fonts-wqy-microhei"),
            ("WenQuanYi Zen Hei Mono", "fonts-wqy-zenhei"),
            ("WenQuanYi Zen Hei Sharp", "fonts-wqy-zenhei"),
            ("LXGW WenKai Mono", "fonts-lxgw-wenkai"),
            ("M PLUS 2", "fonts-mplus"),
            ("M PLUS 1 Code", "fonts-mplus"),
        )
    ),
    *(
        FontRule(f"AR PL {s} {r}", p, EXCLUDE, "regional sibling in the same TTC: identical glyphs")
        for s, p in (("UKai", "fonts-arphic-ukai"), ("UMing", "fonts-arphic-uming"))
        for r in ("HK", "TW", "TW MBE")
    ),
    FontRule("SetoFont-ex", "fonts-seto", EXCLUDE, "extension glyphs only: JIS level-1 outlines are empty"),
    *(
        FontRule(f, "fonts-misaki", EXCLUDE, "8x8 pixel font")
        for f in ("MisakiGothic", "MisakiGothic2nd", "MisakiMincho")
    ),
    FontRule("DotGothic16", "fonts-dotgothic16", EXCLUDE, "16x16 pixel font"),
    FontRule("Reggae One", "fonts-reggae", EXCLUDE, "display face (neither print body text nor handwriting)"),
    FontRule("Train One", "fonts-train", EXCLUDE, "outline display face"),
    FontRule("Konatu", "fonts-konatu", EXCLUDE, "casual display face: neither class"),
    FontRule("Monapo", "fonts-monapo", EXCLUDE, "IPA Gothic kanji with Mona kana: duplicate"),
    FontRule("KanjiStrokeOrders", "fonts-kanjistrokeorders", EXCLUDE, "stroke-order diagrams"),
)
_RULES = {r.family: (i, r) for i, r in enumerate(FONT_TABLE)}
# Faces of packages in FONT_TABLE live here when fc-list is missing (a bare container).
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")


@functools.lru_cache(maxsize=1)
def jis_level1() -> tuple[str, ...]:
    """The 2,965 JIS X 0208 level-1 kanji in JIS order (亜 … 腕), from Python's ``euc_jp`` codec.

    Level 1 is rows 16–47 of JIS X 0208, EUC-JP lead bytes 0xB0–0xCF with trail bytes
    0xA1–0xFE: 32 x 94 = 3,008 code points, of which the last 43 (0xCFD4–0xCFFE, row 47 cells
    52–94) are unassigned in the standard (row 47 ends at 腕), so the codec rejects them:
    3,008 − 43 = 2,965.
    """
    chars = []
    for lead in range(0xB0, 0xD0):
        for trail in range(0xA1, 0xFF):
            try:
                chars.append(bytes((lead, trail)).decode("euc_jp"))
            except UnicodeDecodeError:
                if lead != 0xCF or trail < 0xD4:  # anything else missing would be a codec change
                    raise DataError(f"euc_jp cannot decode {lead:02X}{trail:02X}, a JIS level-1 code point") from None
    if len(chars) != N_JIS_LEVEL1:
        raise DataError(f"euc_jp gave {len(chars)} JIS level-1 kanji, expected {N_JIS_LEVEL1}")
    return tuple(chars)


# --------------------------------------------------------------------------- fonts


@dataclass
class FontFace:
    """One face of one font file (a .ttc holds several), classified by :data:`FONT_TABLE`."""

    family: str
    style: str
    path: str
    index: int = 0  # face index inside a .ttc collection
    package: str = ""
    kind: str = PRINT
    note: str = ""
    sha256: str = ""  # of the font file; filled in when the face is built

    @property
    def key(self) -> str:
        """A stable name for the face: ``"IPAexMincho Regular"``."""
        return f"{self.family} {self.style}".strip()


def _fc_list(pattern: str = "") -> list[tuple[list[str], str, str, int]] | None:
    """(family names, style, file, index) per face known to fontconfig; None without fc-list."""
    if shutil.which("fc-list") is None:
        return None
    cmd = ["fc-list", "--format", "%{family}\t%{style[0]}\t%{file}\t%{index}\n"]
    if pattern:
        cmd.insert(1, pattern)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    faces = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        families = [f.replace("\\", "").strip() for f in parts[0].split(",") if f.strip()]
        try:
            index = int(parts[3] or 0)
        except ValueError:
            index = 0
        faces.append((families, parts[1].replace("\\", "").strip(), parts[2], index))
    return faces


def _scan_font_dirs() -> list[tuple[list[str], str, str, int]]:
    """The fc-list fallback: read family/style names from every font file under FONT_DIRS."""
    TTFont, TTCollection = _fonttools()
    faces = []
    for root in FONT_DIRS:
        root = os.path.expanduser(root)
        for dirpath, _, files in sorted(os.walk(root)):
            for fname in sorted(files):
                if not fname.lower().endswith((".ttf", ".otf", ".ttc", ".otc")):
                    continue
                path = os.path.join(dirpath, fname)
                try:
                    fonts = (
                        TTCollection(path, lazy=True).fonts
                        if fname.lower().endswith((".ttc", ".otc"))
                        else [TTFont(path, lazy=True)]
                    )
                except Exception:  # noqa: BLE001 - an unreadable file is not a face
                    continue
                for index, tt in enumerate(fonts):
                    name = tt["name"]
                    family = name.getDebugName(16) or name.getDebugName(1) or ""
                    style = name.getDebugName(17) or name.getDebugName(2) or ""
                    faces.append(([family], style, path, index))
    return faces


def discover_faces() -> tuple[list[FontFace], list[FontFace], list[str]]:
    """Installed faces, classified: ``(usable, excluded, unclassified)``.

    ``usable`` are PRINT and HANDWRITING faces in :data:`FONT_TABLE` order (then style, path);
    ``excluded`` the table's EXCLUDE rows found here and usable families in a style the table
    does not take; ``unclassified`` names Japanese-capable faces (``fc-list :lang=ja``) that the
    table does not know: they are never guessed at.
    """
    listed = _fc_list()
    if listed is None:
        listed = _scan_font_dirs()
    seen: set[tuple[str, int]] = set()
    usable: list[tuple[tuple, FontFace]] = []
    excluded: list[FontFace] = []
    for families, style, path, index in listed:
        match = next((_RULES[f] for f in families if f in _RULES), None)
        if match is None:
            continue
        pos, rule = match
        real = (os.path.realpath(path), index)
        if real in seen:  # e.g. fonts-japanese-gothic.ttf -> TakaoPGothic.ttf (alternatives)
            continue
        seen.add(real)
        face = FontFace(rule.family, style, real[0], index, rule.package, rule.kind, rule.note)
        if rule.kind == EXCLUDE or (rule.styles is not None and style not in rule.styles):
            if rule.kind != EXCLUDE:
                face.note = f"{rule.family}: only {', '.join(rule.styles or ())} used"
            excluded.append(face)
            continue
        style_rank = (0 if style.lower() in ("regular", "book", "medium", "w3 mono") else 1, style)
        usable.append(((pos, style_rank, face.path, index), face))
    unclassified = sorted(
        {
            f"{families[0]} {style} ({path})"
            for families, style, path, _ in (_fc_list(":lang=ja") or [])
            if not any(f in _RULES for f in families)
        }
    )
    return [f for _, f in sorted(usable, key=lambda t: t[0])], excluded, unclassified


def _fonttools():
    try:
        from fontTools.ttLib import TTCollection, TTFont
    except ImportError:
        raise DataError("kanji-fonts needs fontTools to read font cmaps: pip install fonttools") from None
    return TTFont, TTCollection


def font_cmap(face: FontFace) -> set[int]:
    """Code points the face maps to a glyph (its best Unicode cmap, read with fontTools)."""
    TTFont, _ = _fonttools()
    with TTFont(face.path, fontNumber=face.index, lazy=True) as tt:
        return set((tt.getBestCmap() or {}).keys())


def load_font(face: FontFace, size: int):
    """Pillow's FreeType font for ``face`` with its em at ``EM_FRACTION`` of a ``size`` canvas."""
    from PIL import ImageFont

    em = max(4, round(size * EM_FRACTION))
    # BASIC layout: one glyph needs no shaping, and raqm's presence must not change the pixels
    return ImageFont.truetype(face.path, size=em, index=face.index, layout_engine=ImageFont.Layout.BASIC)


def render_glyph(font, char: str, size: int, jitter: float = 0.0, jitter_key: int = 0) -> np.ndarray | None:
    """``char`` drawn white on black, its ink box centred on a ``size`` x ``size`` uint8 canvas.

    Returns None when the outline is empty. A glyph too large for the canvas (brush faces can
    overshoot their em) is shrunk to fit; others keep the face's own scale. ``jitter`` > 0
    applies a rotation of up to ±10°·jitter, a scale of 1 ± 0.15·jitter and a shift of up to
    ±size/10·jitter, drawn from a generator seeded by (``jitter_key``, code point): the same
    view always gets the same jitter.
    """
    from PIL import Image, ImageDraw

    big = 2 * size  # room for glyphs that overshoot the em box before cropping to their ink
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).text((size, size), char, fill=255, font=font, anchor="mm")
    arr = np.asarray(canvas)
    rows, cols = np.flatnonzero(arr.any(axis=1)), np.flatnonzero(arr.any(axis=0))
    if rows.size == 0:
        return None
    ink = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = ink.shape
    if max(h, w) > size:
        scale = size / max(h, w)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        ink = np.asarray(Image.fromarray(ink).resize((w, h), Image.Resampling.LANCZOS))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = ink
    if jitter > 0:
        rng = np.random.default_rng([JITTER_SEED, jitter_key, ord(char)])
        angle, zoom, dx, dy = rng.uniform(-1.0, 1.0, 4)
        angle, zoom = math.radians(10.0 * jitter * angle), 1.0 + 0.15 * jitter * zoom
        dx, dy = dx * jitter * size / 10, dy * jitter * size / 10
        # inverse map output -> input about the centre (PIL's AFFINE takes the inverse matrix)
        c, s, ctr = math.cos(angle) / zoom, math.sin(angle) / zoom, (size - 1) / 2
        matrix = (c, s, ctr - c * (ctr + dx) - s * (ctr + dy), -s, c, ctr + s * (ctr + dx) - c * (ctr + dy))
        out = np.asarray(
            Image.fromarray(out).transform(
                (size, size), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR
            )
        )
    return np.ascontiguousarray(out)


def _sha256(path: str) -> str:
    return sha256_file(path)


def _probe_chars() -> list[str]:
    chars = jis_level1()
    return list(chars[:: len(chars) // 16][:16])  # 16 characters spread over the table


def _probe(face: FontFace, cmap: set[int]) -> dict[str, np.ndarray]:
    font = load_font(face, 32)
    out = {}
    for ch in _probe_chars():
        if ord(ch) in cmap:
            img = render_glyph(font, ch, 32)
            if img is not None:
                out[ch] = img.astype(np.float32)
    return out


def face_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Mean |a − b| over the probe glyphs both faces have, relative to their mean ink (inf if
    they share fewer than 8)."""
    common = sorted(set(a) & set(b))
    if len(common) < 8:
        return math.inf
    x, y = np.stack([a[c] for c in common]), np.stack([b[c] for c in common])
    return float(np.abs(x - y).mean() / max(1e-6, (x.mean() + y.mean()) / 2))


def select_faces(
    faces: Sequence[FontFace], max_faces: int | None = None, threshold: float = DUPLICATE_THRESHOLD
) -> tuple[list[tuple[FontFace, set[int]]], list[str]]:
    """Open each face in order; keep those that load, render and are no near-duplicate of a kept
    face of the same class. Returns ``([(face, cmap), ...], ["face: reason", ...])``.

    ``max_faces`` keeps at most ``ceil(max_faces / 2)`` print and ``floor(max_faces / 2)``
    handwriting faces (at least one of each), the first in table order.
    """
    quota = {PRINT: math.inf, HANDWRITING: math.inf}
    if max_faces is not None:
        quota = {PRINT: max(1, math.ceil(max_faces / 2)), HANDWRITING: max(1, max_faces // 2)}
    kept: list[tuple[FontFace, set[int]]] = []
    probes: list[dict[str, np.ndarray]] = []
    dropped: list[str] = []
    for face in faces:
        if face.kind not in quota:
            continue
        if sum(f.kind == face.kind for f, _ in kept) >= quota[face.kind]:
            continue
        try:
            cmap = font_cmap(face)
            probe = _probe(face, cmap)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - fontTools/FreeType raise many types
            dropped.append(f"{face.key} ({face.path}): cannot be read: {_reason(err)}")
            continue
        if not probe and not cmap:
            dropped.append(f"{face.key} ({face.path}): no Unicode cmap")
            continue
        dup = next(
            (f for (f, _), p in zip(kept, probes) if f.kind == face.kind and face_distance(probe, p) < threshold), None
        )
        if dup is not None:
            dropped.append(f"{face.key} ({face.path}): near-duplicate of {dup.key}")
            continue
        kept.append((face, cmap))
        probes.append(probe)
    return kept, dropped


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split()) or 'no message'}"


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> str:
    """``$HVS_CACHE/kanji-fonts``, else ``$XDG_CACHE_HOME/hvs/kanji-fonts`` (``~/.cache``)."""
    if os.environ.get("HVS_CACHE"):
        return os.path.join(os.path.expanduser(os.environ["HVS_CACHE"]), "kanji-fonts")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hvs", "kanji-fonts")


def cache_path(
    folder: str | None, size: int, limit: int | None = None, max_faces: int | None = None, jitter: float = 0.0
) -> str:
    """The ``.npz`` for these render settings (the split options do not change it)."""
    name = f"kanji-fonts-{size}px"
    if jitter:
        name += f"-jitter{jitter:g}"
    if limit is not None:
        name += f"-limit{limit}"
    if max_faces is not None:
        name += f"-faces{max_faces}"
    return os.path.join(os.path.abspath(os.path.expanduser(folder or default_cache_dir())), name + ".npz")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A ``np.load``-able compressed archive with fixed timestamps (np.savez stamps the current
    time into every member, so two identical builds would differ by bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=6)
    return buf.getvalue()


def build_cache(
    folder: str | None = None,
    *,
    size: int = 32,
    limit: int | None = None,
    max_faces: int | None = None,
    jitter: float = 0.0,
    faces: Sequence[FontFace] | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Render every (face, character) pair once into the cache; returns the manifest.

    ``faces``: use these instead of :func:`discover_faces` (tests, custom fonts). An existing
    cache is reused unless ``force``. Raises :class:`DataError` with an install hint when fewer
    than one print and one handwriting face are usable.
    """
    _check_render_options(size, limit, max_faces, jitter)
    path = cache_path(folder, size, limit, max_faces, jitter)
    if is_built(path) and not force:
        return read_manifest(path)
    t0 = time.perf_counter()
    excluded: list[FontFace] = []
    if faces is None:
        faces, excluded, _ = discover_faces()
    chosen, skipped = select_faces(faces, max_faces)
    n_print = sum(f.kind == PRINT for f, _ in chosen)
    n_hand = sum(f.kind == HANDWRITING for f, _ in chosen)
    if n_print == 0 or n_hand == 0:
        raise DataError(
            f"kanji-fonts: {n_print} print and {n_hand} handwriting font faces usable "
            f"(need at least one of each): {INSTALL_HINT}"
        )
    chars = jis_level1()[:limit] if limit is not None else jis_level1()

    from tqdm.auto import tqdm

    blocks, codes, face_ids, table = [], [], [], []  # one (views, size, size) block per face
    hashes: dict[str, str] = {}
    bar = tqdm(total=len(chosen) * len(chars), disable=not progress, unit="glyph", desc=f"render kanji-fonts {size}px")
    for face, cmap in chosen:
        missing, empty, errors, n_views = [], [], [], 0
        try:
            font = load_font(face, size)
            face.sha256 = hashes.get(face.path) or _sha256(face.path)
            hashes[face.path] = face.sha256
        except Exception as err:  # noqa: BLE001
            skipped.append(f"{face.key} ({face.path}): cannot be read: {_reason(err)}")
            bar.update(len(chars))
            continue
        fid = len(table)
        jitter_key = zlib.crc32(face.key.encode())
        block = np.empty((len(chars), size, size), np.uint8)
        for ch in chars:
            if ord(ch) not in cmap:
                missing.append(ord(ch))
                continue
            try:
                img = render_glyph(font, ch, size, jitter, jitter_key)
            except Exception as err:  # noqa: BLE001 - FreeType errors surface as OSError etc.
                errors.append(f"U+{ord(ch):04X}: {_reason(err)}")
                continue
            if img is None:
                empty.append(ord(ch))
                continue
            block[n_views] = img
            codes.append(ord(ch))
            face_ids.append(fid)
            n_views += 1
        bar.update(len(chars))
        if errors:
            skipped.append(f"{face.key} ({face.path}): FreeType error on {len(errors)} glyph(s), e.g. {errors[0]}")
        if n_views == 0:
            skipped.append(f"{face.key} ({face.path}): no renderable glyph")
            continue
        blocks.append(block[:n_views])
        table.append(
            {**asdict(face), "key": face.key, "views": n_views, "missing": missing, "empty": empty, "errors": errors}
        )
    bar.close()
    kinds = [t["kind"] for t in table]
    if PRINT not in kinds or HANDWRITING not in kinds:
        raise DataError(
            f"kanji-fonts: no {PRINT if PRINT not in kinds else HANDWRITING} face rendered anything: {INSTALL_HINT}"
        )
    meta = {
        "format": CACHE_FORMAT,
        "size": size,
        "jitter": jitter,
        "limit": limit,
        "max_faces": max_faces,
        "em_fraction": EM_FRACTION,
        "duplicate_threshold": DUPLICATE_THRESHOLD,
        "characters": len(chars),
        "views": len(codes),
        "faces": table,
        "skipped": skipped,
        "excluded": sorted(f"{f.key} ({f.path}): {f.note}" for f in excluded),
    }
    arrays = {
        "images": np.concatenate(blocks),
        "codes": np.asarray(codes, np.int32),
        "face": np.asarray(face_ids, np.int16),
        "chars": np.asarray([ord(c) for c in chars], np.int32),
        "meta": np.asarray(json.dumps(meta, ensure_ascii=False, sort_keys=True)),
    }
    blob = _npz_bytes(arrays)
    atomic_write_bytes(path, blob)
    manifest = {
        **{k: v for k, v in meta.items() if k != "faces"},
        "faces": [
            {k: v for k, v in t.items() if k not in ("missing", "empty")}
            | {"missing": len(t["missing"]), "empty": len(t["empty"])}
            for t in table
        ],
        "print_faces": kinds.count(PRINT),
        "handwriting_faces": kinds.count(HANDWRITING),
        "cache": os.path.basename(path),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "fonttools": _version("fontTools"),
        "pillow": _version("PIL"),
    }
    atomic_write_bytes(_manifest_path(path), (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    if log is not None:
        log(f"wrote {path}")
    return manifest


def _version(module: str) -> str:
    try:
        return str(getattr(__import__(module), "__version__", "?"))
    except ImportError:
        return "missing"


def _manifest_path(npz_path: str) -> str:
    return os.path.splitext(npz_path)[0] + ".json"


def is_built(npz_path: str) -> bool:
    """True when the cache and its manifest both exist. The manifest (with the cache's SHA-256)
    is written last, so a cache without one is an interrupted build, and is built again."""
    return os.path.isfile(npz_path) and os.path.isfile(_manifest_path(npz_path))


def read_manifest(npz_path: str) -> dict:
    """The manifest next to a cache file (a one-line :class:`DataError` if missing or corrupt)."""
    manifest = _manifest_path(npz_path)
    try:
        with open(manifest, encoding="utf-8") as f:
            out = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{npz_path}: kanji-fonts cache has no manifest {os.path.basename(manifest)} "
            f"(an interrupted build, or copied without it); {_REBUILD}"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{manifest}: corrupt kanji-fonts manifest ({_reason(err)}); {_REBUILD}") from None
    if not isinstance(out, dict):
        raise DataError(f"{manifest}: corrupt kanji-fonts manifest (not a JSON object); {_REBUILD}")
    return out


_REBUILD = "delete it, or rebuild with `hvs data build kanji-fonts --force`"


def load_cache(path: str) -> dict:
    """``{"images", "codes", "face", "chars", "meta"}`` from a cache file (``meta`` parsed).

    The file's SHA-256 is checked against the one its manifest recorded at build time (once
    per process and file version), so a cache altered or damaged since is refused rather than
    trained on. Any unreadable, unverifiable or inconsistent file raises a one-line
    :class:`DataError` naming it.
    """
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"{path}: kanji-fonts cache not found") from None
    return _load_cache(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _load_cache(path: str, mtime_ns: int, nbytes: int) -> dict:
    hint = _REBUILD
    recorded = read_manifest(path).get("sha256")
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise DataError(f"{_manifest_path(path)}: no SHA-256 of the cache recorded (written by an older hvs?); {hint}")
    try:
        actual = _sha256(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read kanji-fonts cache ({_reason(err)})") from None
    if actual != recorded:
        raise DataError(
            f"{path}: corrupt kanji-fonts cache (SHA-256 {actual[:12]}... differs from "
            f"{recorded[:12]}... recorded in {os.path.basename(_manifest_path(path))}); {hint}"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("images", "codes", "face", "chars")}
            meta = json.loads(str(z["meta"].item()))
    except Exception as err:  # noqa: BLE001 - zip, zlib, numpy and json errors all mean corrupt
        raise DataError(f"{path}: corrupt kanji-fonts cache ({_reason(err)}); {hint}") from None
    n = len(out["codes"])
    if (
        meta.get("format") != CACHE_FORMAT
        or out["images"].dtype != np.uint8
        or out["images"].ndim != 3
        or len(out["images"]) != n
        or len(out["face"]) != n
        or not meta.get("faces")
        or (n and int(out["face"].max()) >= len(meta["faces"]))
    ):
        raise DataError(f"{path}: not a kanji-fonts cache of format {CACHE_FORMAT} (inconsistent arrays); {hint}")
    for arr in out.values():
        arr.setflags(write=False)  # shared by every dataset made from this file
    out["meta"] = meta
    return out


# --------------------------------------------------------------------------- splits and source


def open_set_split(
    n_identities: int, seed: int = 0, train_fraction: float = 2 / 3, nonmated_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded ``(train, mated, nonmated)`` identity indices (sorted, disjoint, covering all).

    ``round(train_fraction * K)`` identities train (at least 1, leaving at least 1 to test);
    of the test identities ``round(nonmated_fraction * n_test)`` are non-mated, leaving at least
    one mated.
    """
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"kanji-fonts: train_fraction must be in (0, 1), got {train_fraction}")
    if not 0.0 <= nonmated_fraction < 1.0:
        raise DataError(f"kanji-fonts: nonmated_fraction must be in [0, 1), got {nonmated_fraction}")
    if n_identities < 2:
        raise DataError(f"kanji-fonts: the open protocol needs at least 2 characters, got {n_identities}")
    perm = np.random.default_rng(seed).permutation(n_identities)
    n_train = min(max(1, math.floor(train_fraction * n_identities + 0.5)), n_identities - 1)
    test = perm[n_train:]
    n_non = min(math.floor(nonmated_fraction * len(test) + 0.5), len(test) - 1)
    return np.sort(perm[:n_train]), np.sort(test[n_non:]), np.sort(test[:n_non])


def parse_options(arg: str | None) -> dict[str, object]:
    """``"DIR"``, ``"KEY=VAL,..."`` or ``"DIR,KEY=VAL,..."`` → options (``dir`` for the folder)."""
    opts: dict[str, object] = {}
    for i, part in enumerate((arg or "").split(",")):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep:
            if i != 0:
                raise DataError(
                    f"kanji-fonts: bad option {part!r}; expected DIR first, then KEY=VALUE "
                    f"with KEY in {', '.join(DEFAULTS)}"
                )
            opts["dir"] = part
            continue
        if key not in DEFAULTS:
            raise DataError(f"kanji-fonts: bad option {part!r}; expected KEY=VALUE with KEY in {', '.join(DEFAULTS)}")
        opts[key] = _convert(key, val)
    return opts


def _convert(key: str, val):
    if val is None or key == "dir":
        return val
    try:
        if key in _INT_KEYS:
            if isinstance(val, float) and not val.is_integer():
                raise ValueError
            return int(val)
        return float(val)
    except (TypeError, ValueError):
        kind = "an integer" if key in _INT_KEYS else "a number"
        raise DataError(f"kanji-fonts: {key} must be {kind}, got {val!r}") from None


def _check_render_options(size: int, limit: int | None, max_faces: int | None, jitter: float) -> None:
    if size < 8:
        raise DataError(f"kanji-fonts: size must be >= 8, got {size}")
    if limit is not None and not 2 <= limit <= N_JIS_LEVEL1:
        raise DataError(f"kanji-fonts: limit must be in 2..{N_JIS_LEVEL1}, got {limit}")
    if max_faces is not None and max_faces < 2:
        raise DataError(f"kanji-fonts: max_faces must be >= 2 (one print, one handwriting), got {max_faces}")
    if not 0.0 <= jitter <= 1.0:
        raise DataError(f"kanji-fonts: jitter must be in [0, 1], got {jitter}")


def resolve_options(arg: str | None, image_size: int | None = None, seed: int = 0, **kwargs) -> dict[str, object]:
    """Spec options over keyword options over ``create_dataset``'s ``image_size``/``seed``."""
    opts = dict(DEFAULTS)
    for key, val in kwargs.items():
        if key not in DEFAULTS:
            raise DataError(f"kanji-fonts: unknown option {key!r}; valid: {', '.join(DEFAULTS)}")
        opts[key] = _convert(key, val)
    spec = parse_options(arg)
    if image_size is not None:
        if "size" in spec and spec["size"] != image_size:
            raise DataError(f"kanji-fonts: size={spec['size']} in the spec but {image_size} passed")
        opts["size"] = image_size
    opts.update(spec)
    if opts["seed"] is None:
        opts["seed"] = seed
    _check_render_options(int(opts["size"]), opts["limit"], opts["max_faces"], float(opts["jitter"]))
    return opts


def load_arrays(opts: dict[str, object], progress: bool = True) -> tuple[str, dict]:
    """``(cache path, arrays)`` for resolved options, building the cache when it is missing."""
    path = cache_path(opts["dir"], int(opts["size"]), opts["limit"], opts["max_faces"], float(opts["jitter"]))
    if not is_built(path):
        build_cache(
            opts["dir"],
            size=int(opts["size"]),
            limit=opts["limit"],
            max_faces=opts["max_faces"],
            jitter=float(opts["jitter"]),
            progress=progress,
        )
    return path, load_cache(path)


@register_source(
    "kanji-fonts",
    arg="DIR|KEY=VAL,...",
    help="JIS level-1 kanji from installed CJK fonts: print gallery, handwriting queries (open set)",
)
def kanji_fonts(
    arg: str | None,
    *,
    protocol: str = "open",
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    seed: int = 0,
    progress: bool = True,
    splits: Sequence[str] | None = None,
    **kwargs,
) -> RetrievalData:
    """Open-set kanji identities: train on 2/3 of the characters, search the rest (IJB-C stand-in)."""
    opts = resolve_options(arg, image_size, seed, **kwargs)
    name = "kanji-fonts" if arg is None else f"kanji-fonts:{arg}"
    path, arrays = load_arrays(opts, progress)
    meta = arrays["meta"]
    chars = [chr(int(c)) for c in arrays["chars"]]
    label_of = {int(c): i for i, c in enumerate(arrays["chars"])}
    codes = arrays["codes"]
    labels = np.fromiter((label_of[int(c)] for c in codes), np.int64, len(codes))
    faces = meta["faces"]
    kind = np.asarray([faces[f]["kind"] == PRINT for f in range(len(faces))])[arrays["face"]]
    train_ids, mated, nonmated = open_set_split(
        len(chars), int(opts["seed"]), float(opts["train_fraction"]), float(opts["nonmated_fraction"])
    )
    if strict and meta["skipped"]:
        raise DataError(f"{path}: {meta['skipped'][0]} (strict)")
    index = {
        "train": np.flatnonzero(np.isin(labels, train_ids)),
        "query": np.flatnonzero(np.isin(labels, np.concatenate([mated, nonmated])) & ~kind),
        "gallery": np.flatnonzero(np.isin(labels, mated) & kind),
    }
    ch = channels or 1
    wanted = set(SPLITS if splits is None else splits)
    parts: dict[str, Split | None] = {}
    for role, idx in index.items():
        if role not in wanted:
            parts[role] = None
            continue
        images = torch.from_numpy(arrays["images"][idx]).unsqueeze(1)  # fancy indexing copies
        if ch == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        sources = [
            f"kanji-fonts:{faces[f]['key']}:U+{c:04X}"
            for f, c in zip(arrays["face"][idx].tolist(), codes[idx].tolist())
        ]
        parts[role] = Split(images, torch.from_numpy(labels[idx]), sources, role)
    check_nonempty(name, **parts)
    mean, std = channel_stats(parts["train"].images) if parts["train"] is not None else ((), ())
    return RetrievalData(
        name, parts["train"], parts["query"], parts["gallery"], chars, "open", mean, std, list(meta["skipped"])
    )


kanji_fonts.supported_protocols = ("open",)  # read by `hvs data info` to pick its default
