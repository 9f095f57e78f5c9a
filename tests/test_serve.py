"""The search service in-process (FastAPI TestClient): search, stats, bad input, size limits,
decompression bombs, the write token, gallery add/delete, thumbnails, start-up refusal."""

import io
import json
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from conftest import build_tiny_world  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import hvs.serve.app as serve_app  # noqa: E402
from hvs import checkpoint as ckpt  # noqa: E402
from hvs.index import open_index  # noqa: E402
from hvs.search import SearchError  # noqa: E402
from hvs.serve import create_app  # noqa: E402

SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


def png_of(x) -> bytes:
    """uint8 (1, H, W) tensor -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(x[0].numpy(), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = build_tiny_world(root, SPEC)
    # a query model made for another gallery model: same card, other compatible_with fingerprint
    shutil.copytree(root / "q", root / "q-other")
    config = json.loads((root / "q-other" / ckpt.CONFIG).read_text())
    config["compatible_with"]["fingerprint"] = "0123456789abcdef"
    (root / "q-other" / ckpt.CONFIG).write_text(json.dumps(config))
    return root, data


@pytest.fixture
def index(world, tmp_path):
    """A private copy of the index for tests that write to it."""
    root, _ = world
    shutil.copytree(root / "idx", tmp_path / "idx")
    return f"faiss:{tmp_path / 'idx'}"


@pytest.fixture(scope="module")
def client(world):
    root, _ = world
    return TestClient(create_app(f"faiss:{root / 'idx'}", root / "q", token=""))


def upload(data: bytes, name: str = "q.png", ctype: str = "image/png") -> dict:
    return {"files": {"image": (name, data, ctype)}}


def test_search_returns_k_results_best_first(world, client):
    _, data = world
    r = client.post("/search?k=5", **upload(png_of(data.query.images[0])))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 5 and body["index_size"] == 18
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    assert set(body["results"][0]) == {"id", "label", "source", "model", "score"}
    assert set(body["timings_ms"]) == {"decode", "embed", "search", "total"}
    assert body["model"]["name"] == "cnn-nano" and body["model"]["runtime"] == "torch"
    assert len(client.post("/search?k=50", **upload(png_of(data.query.images[0]))).json()["results"]) == 18


def test_healthz_and_stats(world, client):
    root, data = world
    assert client.get("/healthz").json() == {"status": "ok", "index_size": 18}
    client.post("/search", **upload(png_of(data.query.images[1])))
    stats = client.get("/stats").json()
    assert stats["index"]["size"] == 18 and stats["gallery_writes"] is False
    assert stats["models"]["query"]["fingerprint"] == ckpt.read_card(root / "q").fingerprint
    assert stats["models"]["gallery"]["fingerprint"] == ckpt.read_card(root / "g").fingerprint
    assert stats["requests"]["POST /search"]["200"] >= 1
    lat = stats["latency_ms"]["POST /search"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert "<input" in client.get("/").text  # the search page


def test_bad_input_is_refused_with_one_line(client):
    cases = [
        (client.post("/search", **upload(b"this is not an image")), 400),
        (client.post("/search", **upload(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)), 400),  # truncated PNG
        (client.post("/search", **upload(b"")), 400),
        (client.post("/search", content=b'{"image": 1}', headers={"content-type": "application/json"}), 415),
        (client.post("/search", **upload(b"abc", "q.txt", "text/plain")), 415),
        (client.post("/search", files={"other": ("q.png", b"abc", "image/png")}), 400),
        (client.post("/search?k=0", **upload(b"abc")), 422),
        (client.post("/search?k=101", **upload(b"abc")), 422),
        (client.post("/search?k=ten", **upload(b"abc")), 422),
    ]
    for r, code in cases:
        assert r.status_code == code, (code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and detail


def test_oversize_upload_is_413_before_decoding(world, monkeypatch):
    root, _ = world
    app = create_app(f"faiss:{root / 'idx'}", root / "q", token="", max_upload_bytes=1000)
    client = TestClient(app)

    def never(*a, **k):
        raise AssertionError("an oversize upload must not be decoded")

    monkeypatch.setattr(serve_app, "load_image", never)
    monkeypatch.setattr(serve_app.Image, "open", never)
    big = b"\x89PNG" + b"\0" * 200_000
    r = client.post("/search", **upload(big))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    # no Content-Length (chunked): counted while reading
    boundary = "hvsboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def chunks():
        yield head
        for _ in range(20):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert app.state.stats.snapshot()["requests"]["POST /search"]["413"] == 2


def test_decompression_bombs_are_refused(world, client):
    root, data = world
    r = client.post("/search", **upload(bomb_png(100_000, 100_000)))
    assert r.status_code == 400 and "pixels" in r.json()["detail"]
    r = client.post("/search", **upload(bomb_png(8_000, 6_000)))  # under Pillow's own limit, over ours
    assert r.status_code == 400 and "over the limit" in r.json()["detail"]
    small_limit = TestClient(create_app(f"faiss:{root / 'idx'}", root / "q", token="", max_image_pixels=100))
    assert small_limit.post("/search", **upload(png_of(data.query.images[0]))).status_code == 400  # 144 px


def test_write_token(world, index, monkeypatch):
    _, data = world
    img = upload(png_of(data.train.images[0]))
    monkeypatch.delenv("HVS_TOKEN", raising=False)
    disabled = TestClient(create_app(index, world[0] / "q"))
    for r in (disabled.post("/gallery", **img), disabled.delete("/gallery/1", headers={"Authorization": "Bearer x"})):
        assert r.status_code == 403 and "disabled" in r.json()["detail"]
    monkeypatch.setenv("HVS_TOKEN", "s3cret")
    client = TestClient(create_app(index, world[0] / "q"))
    r = client.post("/gallery", **img)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.delete("/gallery/1", headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
    assert client.delete("/gallery/1", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/gallery", headers={"Authorization": "Bearer wrong"}, **img).status_code == 403
    assert client.delete("/gallery/1", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert len(open_index(index)) == 17


def test_add_then_search_then_delete(world, index):
    root, data = world
    # the gallery model as the query model: the added image must come back first with score ~1
    client = TestClient(create_app(index, root / "g", token="tok"))
    auth = {"Authorization": "Bearer tok"}
    image = png_of(data.train.images[5])  # not in the gallery
    r = client.post("/gallery", headers=auth, data={"label": "added"}, **upload(image))
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] == 18 and new["label"] == "added" and new["index_size"] == 19
    top = client.post("/search?k=1", **upload(image)).json()["results"][0]
    assert top["id"] == 18 and top["label"] == "added" and top["score"] > 0.999
    thumb = client.get("/thumb/18")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (12, 12)
    assert len(open_index(index)) == 19  # persisted, visible to a fresh reader
    assert client.delete("/gallery/18", headers=auth).json() == {"removed": 18, "index_size": 18}
    hits = client.post("/search?k=100", **upload(image)).json()["results"]
    assert 18 not in [h["id"] for h in hits] and len(hits) == 18
    assert client.get("/thumb/18").status_code == 404
    assert client.delete("/gallery/18", headers=auth).status_code == 404
    assert len(open_index(index)) == 18
    # the service gives the writer lock back after each write: another writer can commit meanwhile
    with open_index(index) as other:
        other.remove([17])
    assert client.delete("/gallery/16", headers=auth).json() == {"removed": 16, "index_size": 16}


def test_searches_run_while_the_gallery_changes(world, index):
    root, data = world
    service = create_app(index, root / "g", token="tok").state.service
    query = png_of(data.query.images[0])
    errors = []

    def search_many():
        try:
            for _ in range(15):
                hits = service.search(query, "q.png", 5)["results"]
                assert len(hits) == 5 and len({h["id"] for h in hits}) == 5
        except Exception as e:  # reported below: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=search_many) for _ in range(3)]
    for t in threads:
        t.start()
    ids = [service.add(png_of(data.train.images[i]), "x.png", f"new-{i}")["id"] for i in range(4)]
    service.remove(ids[0])
    for t in threads:
        t.join()
    assert errors == []
    assert ids == [18, 19, 20, 21] and len(open_index(index)) == 18 + 3


def test_thumbnails_render_in_memory_sources(world, client):
    _, data = world
    r = client.get("/thumb/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    assert np.array_equal(got, data.gallery.images[0, 0].numpy())  # gallery row 0 is item 0
    assert client.get("/thumb/12345").status_code == 404


def test_gallery_model_must_match_the_index(world, tmp_path):
    root, data = world
    g = ckpt.read_card(root / "g")
    meta = {
        "gallery_model": {
            "model": g.model,
            "fingerprint": g.fingerprint,
            "embed_dim": 16,
            "path": str(root / "q"),
        },  # the wrong weights at the recorded path
        "preprocessing": {"channels": 1, "image_size": 12, "mean": g.mean, "std": g.std},
    }
    idx = open_index(f"faiss:{tmp_path / 'idx'}", create=True, dim=16, meta=meta)
    idx.add(np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    idx.close()
    client = TestClient(create_app(f"faiss:{tmp_path / 'idx'}", root / "g", token="tok"))
    r = client.post("/gallery", headers={"Authorization": "Bearer tok"}, **upload(png_of(data.train.images[0])))
    assert r.status_code == 409 and "fingerprint" in r.json()["detail"]


def test_incompatible_query_model_is_refused_at_start(world):
    root, _ = world
    with pytest.raises(SearchError, match="trained for gallery fingerprint 0123456789abcdef"):
        create_app(f"faiss:{root / 'idx'}", root / "q-other")
    forced = TestClient(create_app(f"faiss:{root / 'idx'}", root / "q-other", force=True))
    assert "0123456789abcdef" in forced.get("/stats").json()["warning"]


def test_a_removal_from_the_command_line_is_enforced_at_once(world, index):
    """The running service must not keep serving an item `hvs index remove` took down."""
    from hvs.cli import main

    root, data = world
    client = TestClient(create_app(index, root / "g", token=""))
    query = png_of(data.gallery.images[3])  # gallery item 3 itself: it comes back first
    assert client.post("/search?k=1", **upload(query)).json()["results"][0]["id"] == 3
    assert client.get("/thumb/3").status_code == 200
    assert main(["index", "remove", "--index", index, "3"]) == 0
    hits = client.post("/search?k=100", **upload(query)).json()["results"]
    assert 3 not in [h["id"] for h in hits] and len(hits) == 17
    assert client.get("/thumb/3").status_code == 404
    assert client.get("/healthz").json()["index_size"] == 17
    assert client.get("/stats").json()["index"]["size"] == 17
    with open_index(index) as other:  # an add by another process shows up too
        other.add(np.ones((1, 16), np.float32), labels=["cli"])
    assert client.get("/healthz").json()["index_size"] == 18


def test_a_damaged_newer_version_is_refused_not_served_stale(world, index):
    root, data = world
    client = TestClient(create_app(index, root / "g", token=""))
    with open_index(index) as other:
        other.remove([0])
        other.compact()  # a new base version (a log record alone leaves the base files as they were)
    folder = index.split(":", 1)[1]
    current = (Path(folder) / "CURRENT").read_text().strip()
    (Path(folder) / current / "ids.jsonl").write_text("{}\n")
    r = client.post("/search", **upload(png_of(data.query.images[0])))
    assert r.status_code == 503 and "ids.jsonl" in r.json()["detail"]


def test_deleting_an_item_deletes_its_uploaded_image(world, index):
    from hvs.cli import main

    root, data = world
    client = TestClient(create_app(index, root / "g", token="tok"))
    auth = {"Authorization": "Bearer tok"}
    added = [
        client.post("/gallery", headers=auth, data={"label": "mine"}, **upload(png_of(data.train.images[0]))).json()
        for _ in range(2)
    ]  # the same photo twice: two items, two files
    paths = [Path(a["source"]) for a in added]
    assert all(p.is_file() for p in paths) and paths[0] != paths[1]
    assert paths[0].parent == Path(index.split(":", 1)[1]) / "uploads"
    assert client.delete(f"/gallery/{added[0]['id']}", headers=auth).status_code == 200
    assert not paths[0].exists() and paths[1].is_file()
    assert main(["index", "remove", "--index", index, str(added[1]["id"])]) == 0  # the CLI path too
    assert not paths[1].exists()
    assert sorted(p.name for p in paths[0].parent.iterdir()) == []


def test_out_of_range_ids_are_404_not_409(world, index):
    root, _ = world
    client = TestClient(create_app(index, root / "g", token="tok"))
    auth = {"Authorization": "Bearer tok"}
    for path in ("/gallery/99999999999999999999999", "/gallery/-1"):
        r = client.delete(path, headers=auth)
        assert r.status_code == 404 and "no gallery item" in r.json()["detail"], r.text
    r = client.get("/thumb/99999999999999999999999")
    assert r.status_code == 404 and "out of range" in r.json()["detail"]


def test_a_nan_embedding_is_a_json_error(world):
    from hvs.search import load_query_encoder

    root, data = world
    real = load_query_encoder(root / "q")
    broken = serve_app.QueryEncoder(**{**real.__dict__, "embed": lambda x: np.full((len(x), 16), np.nan, np.float32)})
    client = TestClient(create_app(f"faiss:{root / 'idx'}", broken, token=""), raise_server_exceptions=False)
    r = client.post("/search", **upload(png_of(data.query.images[0])))
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert "NaN or inf embedding" in r.json()["detail"]

    def crash(x):
        raise RuntimeError("model exploded")

    crashing = serve_app.QueryEncoder(**{**real.__dict__, "embed": crash})
    client = TestClient(create_app(f"faiss:{root / 'idx'}", crashing, token=""), raise_server_exceptions=False)
    r = client.post("/search", **upload(png_of(data.query.images[0])))
    assert r.status_code == 500 and r.json()["detail"] == "internal error: RuntimeError: model exploded"


def test_serve_takes_a_bare_index_folder_like_search(world, monkeypatch, capsys):
    """`hvs serve --index DIR` opens the same FAISS index as `hvs search --index DIR`."""
    from hvs.cli import main

    root, data = world
    client = TestClient(create_app(str(root / "idx"), root / "q", token=""))
    r = client.post("/search?k=3", **upload(png_of(data.query.images[0])))
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert client.get("/stats").json()["index"]["spec"] == f"faiss:{root / 'idx'}"

    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app.state.service))
    assert main(["serve", "--index", str(root / "idx"), "--query-model", str(root / "q")]) == 0
    assert len(served) == 1 and len(served[0].index) == len(data.gallery)
    assert f"faiss:{root / 'idx'}" in capsys.readouterr().out
