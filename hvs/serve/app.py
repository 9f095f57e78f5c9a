"""The search service: an HTTP front for :class:`hvs.search.Searcher`.

    from hvs.serve import create_app
    app = create_app("faiss:runs/index", "q.onnx")          # or a query model folder
    # uvicorn: `hvs serve --index faiss:runs/index --query-model q.onnx`

Endpoints (every error is ``{"detail": "<one line>"}``):

* ``POST /search?k=10`` multipart field ``image`` -> ``{results: [{id, label, source, score}],
  timings_ms: {decode, embed, search, total}, model, index_size}``, best first.
* ``GET /healthz``, ``GET /stats`` (index and model fingerprints, request counts by endpoint and
  status, latency percentiles over the last ``stats_window`` requests of each endpoint).
* ``POST /gallery`` (fields ``image``, ``label``) embeds the image with the *gallery* model (the
  one recorded in the index sidecar, loaded on first use and checked against the index's
  fingerprint) and adds it; ``DELETE /gallery/{id}`` removes an item. Both need
  ``Authorization: Bearer <HVS_TOKEN>``; with no token configured they are disabled (403).
* ``GET /thumb/{id}`` a PNG of a gallery item; ``GET /`` a self-contained search page.

The gallery on disk is the truth: before answering, every request checks (one ``stat``) whether
a newer index version was committed by another process (``hvs index add/remove``, a rebuild) and
loads it first, so a removal from the command line is enforced from the next request on. Removing
an item (here or with ``hvs index remove``) also deletes the image ``POST /gallery`` stored for it.

Start-up refuses a query model that was not trained for the index's gallery model (the
:class:`~hvs.search.Searcher` check) unless ``force``. Uploads are refused before decoding when the
body is over the limit (Content-Length, and counted while reading for chunked bodies), and images
over ``max_image_pixels`` are refused from their header, before any pixel is decoded
(decompression bombs). Searches run concurrently, and never wait for a gallery write or a
compaction: a write is made durable first (one fsync'ed log record) and then applied to the
index's in-memory snapshot in one short step, and a search holds one snapshot for its hits and
their records (``index.snapshot()``). Gallery writes are serialised (a lock in this process, and
the index's own writer lock across processes); each returns once it is durable.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from .. import checkpoint as ckpt
from ..compat import CompatError
from ..data.images import ImageError, load_image
from ..errors import ConfigError, HVSError
from ..gallery import embed_gallery_images, load_gallery_encoder
from ..index import IndexStoreError
from ..index.base import check_id, one_line
from ..search import QueryEncoder, Searcher
from .page import INDEX_HTML
from .thumbs import ThumbnailResolver

log = logging.getLogger("hvs.serve")

DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024 * 1024
# Pixels an uploaded image may declare in its header. Below Pillow's own MAX_IMAGE_PIXELS
# (~89 M, a warning only up to twice that), so a bomb is refused here before Pillow allocates
# anything; 40 M pixels is a 7300 x 5500 photo, more than a query needs by far.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
FORM_SLACK = 64 * 1024  # multipart boundaries, part headers and the label field on top of the image
MAX_LABEL = 256
TOKEN_ENV = "HVS_TOKEN"
_ROUTES = ("/", "/search", "/healthz", "/stats", "/gallery", "/thumb/{item_id}", "/gallery/{item_id}")
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "PPM": ".ppm"}


class RequestStats:
    """Request counts by endpoint and status, and latency percentiles over a bounded window."""

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[endpoint][str(status)] += 1
            self._latency[endpoint].append(seconds * 1000.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = {e: dict(sorted(s.items())) for e, s in sorted(self._counts.items())}
            lat = {e: np.asarray(d, dtype=np.float64) for e, d in self._latency.items()}
        latency = {}
        for e, a in sorted(lat.items()):
            if a.size:
                p50, p90, p99 = np.percentile(a, [50, 90, 99])
                latency[e] = {
                    "p50": round(float(p50), 3),
                    "p90": round(float(p90), 3),
                    "p99": round(float(p99), 3),
                    "n": int(a.size),
                }
        return {
            "requests": counts,
            "latency_ms": latency,
            "window": self.window,
            "uptime_s": round(time.time() - self.started, 1),
        }


def _endpoint_key(scope: dict) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        path = scope.get("path", "")
        path = path if path in _ROUTES else "(unmatched)"
    return f"{scope.get('method', '?')} {path}"


class _LimitAndMeasure:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (from Content-Length before
    reading anything, and counted while reading chunked bodies), and record every request's
    endpoint, status and latency in ``stats``."""

    def __init__(self, app, limit: int, stats: RequestStats) -> None:
        self.app, self.limit, self.stats = app, limit, stats

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        too_big = f"request body is over the upload limit of {self.limit - FORM_SLACK} bytes (+ form overhead)"
        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                code, detail = (413, too_big) if length.isdigit() else (400, "malformed Content-Length header")
                await JSONResponse({"detail": detail}, code)(scope, receive, send_status)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise HTTPException(413, too_big)
                return message

            await self.app(scope, limited_receive, send_status)
        finally:
            self.stats.record(_endpoint_key(scope), status[0], time.perf_counter() - started)


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    """hvs.index's one-line message, with Pillow's in-memory file names said as "the upload"."""
    return one_line(re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the upload", str(e)), limit)


class SearchService:
    """What the endpoints call: a :class:`Searcher`, the lazily loaded gallery encoder, thumbnails,
    uploads and the locks that keep searches and gallery writes consistent."""

    def __init__(
        self,
        index_spec: str,
        query_model: str | os.PathLike | QueryEncoder,
        *,
        force: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        uploads_dir: str | os.PathLike | None = None,
    ) -> None:
        self.searcher = Searcher(index_spec, query_model, force=force)
        if self.searcher.warning:
            log.warning("%s", self.searcher.warning)
        self.index = self.searcher.index
        self.encoder = self.searcher.encoder
        self.runtime = (
            "onnx"
            if str(query_model).lower().endswith(".onnx")
            else ("torch" if not isinstance(query_model, QueryEncoder) else "custom")
        )
        self.query_model_path = None if isinstance(query_model, QueryEncoder) else str(query_model)
        self.max_image_pixels = int(max_image_pixels)
        self._write_lock = threading.Lock()  # gallery writes of this service, one at a time
        self._gallery_lock = threading.Lock()
        self._gallery: QueryEncoder | None = None
        self.compat_error: str | None = None  # set by a reload whose models this query model may not search
        meta = self.index.meta
        self.thumbs = ThumbnailResolver(meta)
        if uploads_dir is None:
            uploads_dir = self.index.default_uploads_dir()  # faiss:DIR -> DIR/uploads, with the index
        self.uploads_dir = Path(uploads_dir) if uploads_dir is not None else None

    # -- freshness ------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Load a version another process committed since the last request (a cheap check when
        nothing changed). Fails closed: if the newer version cannot be loaded the request gets 503,
        not the old gallery (a takedown must not be undone by a damaged commit)."""
        try:
            if self.index.stale() and self.index.refresh():  # swapped in atomically by the index
                log.info("reloaded %s: %d items", self.index.spec, len(self.index))
                self._recheck()
        except IndexStoreError as e:
            raise HTTPException(503, f"the index on disk changed and cannot be loaded: {_one_line(e)}") from None

    def _recheck(self) -> None:
        """After a reload: the pairing rule on the gallery models now in the index (a backfill or
        another writer may have added one); a refusal fails searches closed with its message. A
        new primary gallery model (a finished backfill) embeds the next ``POST /gallery``."""
        try:
            self.searcher.check()
            self.compat_error = None
        except CompatError as e:
            self.compat_error = str(e)
            log.warning("%s", e)
        primary = (self.index.meta.get("gallery_model") or {}).get("fingerprint")
        with self._gallery_lock:
            if self._gallery is not None and self._gallery.fingerprint != primary:
                self._gallery = None

    def size(self) -> int:
        self.sync()
        return len(self.index)

    # -- images -------------------------------------------------------------------------------------
    def decode(self, data: bytes, preprocessing: dict, name: str) -> Any:
        """Bytes -> uint8 (C, H, W) exactly as the gallery images were decoded, or HTTP 400."""
        if not data:
            raise HTTPException(400, f"upload {name!r} is empty")
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                w, h = probe.size
        except Image.DecompressionBombError as e:
            raise HTTPException(400, f"upload {name!r} refused: {_one_line(e)}") from None
        except Exception as e:  # UnidentifiedImageError, truncated headers, ...
            raise HTTPException(400, f"upload {name!r} is not a readable image ({type(e).__name__})") from None
        if w * h > self.max_image_pixels:
            raise HTTPException(
                400,
                f"upload {name!r} refused: {w}x{h} = {w * h} pixels is over the limit of "
                f"{self.max_image_pixels} (decompression bomb?)",
            )
        try:
            return load_image(data, preprocessing["image_size"], preprocessing["channels"])
        except ImageError as e:
            reason = _one_line(e).split(": ", 1)[-1]
            raise HTTPException(400, f"upload {name!r} cannot be decoded: {reason}") from None

    # -- search -------------------------------------------------------------------------------------
    def search(self, data: bytes, name: str, k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        image = self.decode(data, self.encoder.preprocessing, name)
        t1 = time.perf_counter()
        emb = np.asarray(self.encoder.embed(image[None]))
        t2 = time.perf_counter()
        if not np.isfinite(emb).all():
            raise HTTPException(
                500,
                f"the query model {self.encoder.name} returned a NaN or inf embedding for "
                f"upload {name!r} (broken model weights?)",
            )
        self.sync()
        if self.compat_error:
            raise HTTPException(409, self.compat_error)
        with self.index.snapshot():  # the hits and their records from one state of the gallery
            try:
                hits = self.searcher.search_embeddings(emb, k)[0]
            except HVSError as e:
                raise HTTPException(500, f"search failed: {_one_line(e)}") from None
            size = len(self.index)
        t3 = time.perf_counter()
        ms = lambda a, b: round(1000.0 * (b - a), 3)  # noqa: E731
        return {
            "results": hits,
            "timings_ms": {"decode": ms(t0, t1), "embed": ms(t1, t2), "search": ms(t2, t3), "total": ms(t0, t3)},
            "model": self.model_info(),
            "index_size": size,
        }

    def model_info(self) -> dict[str, Any]:
        e = self.encoder
        return {"name": e.name, "fingerprint": e.fingerprint, "runtime": self.runtime}

    # -- gallery writes -----------------------------------------------------------------------------
    def gallery_encoder(self) -> QueryEncoder:
        """The index's gallery model, loaded once and checked against the index's fingerprint."""
        with self._gallery_lock:
            if self._gallery is not None:
                return self._gallery
            try:
                enc = load_gallery_encoder(self.index)
            except CompatError as e:  # the contract's own wording, as on every other path
                raise HTTPException(409, str(e)) from None
            except (HVSError, OSError) as e:
                raise HTTPException(409, f"cannot embed new gallery images: {_one_line(e)}") from None
            self._gallery = enc
            return enc

    def _store_upload(self, data: bytes, digest: str) -> Path | None:
        """Keep an added image (for its thumbnail) under a name of its own: one file per item, so
        removing the item can delete it without asking who else uses it."""
        if self.uploads_dir is None:
            return None
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
        except Exception:
            fmt = ""
        path = (self.uploads_dir / f"{digest}-{secrets.token_hex(4)}{_EXT.get(fmt, '.img')}").resolve()
        ckpt.atomic_write_bytes(path, data)
        return path

    def add(self, data: bytes, name: str, label: str | None) -> dict[str, Any]:
        enc = self.gallery_encoder()
        image = self.decode(data, enc.preprocessing, name)
        try:
            emb = embed_gallery_images(enc, image[None], [name])
        except IndexStoreError as e:
            raise HTTPException(500, _one_line(e)) from None
        digest = hashlib.sha256(data).hexdigest()[:16]
        with self._write_lock:
            stored = self._store_upload(data, digest)
            try:
                new = self.index.add(
                    emb,
                    labels=[label],
                    sources=[str(stored) if stored else f"upload:{digest}"],
                    model=enc.fingerprint,  # the model that embedded it, whatever the sidecar says by now
                )
            except IndexStoreError as e:
                if stored is not None:  # not added: keep no copy of the photo
                    stored.unlink(missing_ok=True)
                raise HTTPException(409, f"cannot add to the index: {_one_line(e)}") from None
            except BaseException:
                if stored is not None:
                    stored.unlink(missing_ok=True)
                raise
            finally:
                self.index.release_writer()  # let `hvs index add/remove` write between requests
            size = len(self.index)
        return {
            "id": int(new[0]),
            "label": label,
            "source": str(stored) if stored else f"upload:{digest}",
            "index_size": size,
        }

    def remove(self, item_id: int) -> dict[str, Any]:
        item_id = self._check_id(item_id)
        with self._write_lock:
            try:
                n, _ = self.index.remove_with_uploads([item_id], self.uploads_dir)
            except IndexStoreError as e:
                raise HTTPException(409, f"cannot remove from the index: {_one_line(e)}") from None
            finally:
                self.index.release_writer()
            size = len(self.index)
        if n == 0:
            raise HTTPException(404, f"no gallery item with id {item_id}")
        return {"removed": item_id, "index_size": size}

    @staticmethod
    def _check_id(item_id: Any) -> int:
        """An id no item can have (negative, beyond int64) is a 404, as for any unknown id."""
        try:
            return check_id(item_id)
        except IndexStoreError as e:
            raise HTTPException(404, f"no gallery item with id {item_id}: {_one_line(e)}") from None

    # -- reads ----------------------------------------------------------------------------------------
    def thumb(self, item_id: int) -> bytes:
        item_id = self._check_id(item_id)
        self.sync()
        with self.index.snapshot():
            try:
                record = self.index.records([item_id])[0]
            except IndexStoreError:
                raise HTTPException(404, f"no gallery item with id {item_id}") from None
        png = self.thumbs.png(record.get("source"))
        if png is None:
            raise HTTPException(404, f"no image available for gallery item {item_id} (source {record.get('source')!r})")
        return png

    def info(self) -> dict[str, Any]:
        self.sync()
        with self.index.snapshot():
            size = len(self.index)
            meta = self.index.meta
        g = meta.get("gallery_model") or {}
        e = self.encoder
        return {
            "index": {
                "spec": self.index.spec,
                "size": size,
                "dim": meta.get("dim"),
                "factory": meta.get("factory"),
                "data": (meta.get("data") or {}).get("spec"),
            },
            "models": {
                "query": {
                    "name": e.name,
                    "fingerprint": e.fingerprint,
                    "compatible_with": e.compatible_with,
                    "role": e.role,
                    "runtime": self.runtime,
                    "path": self.query_model_path,
                },
                "gallery": {
                    "name": g.get("model"),
                    "fingerprint": g.get("fingerprint"),
                    "path": g.get("path"),
                    "loaded": self._gallery is not None,
                },
            },
            "warning": self.searcher.warning,
        }

    def close(self) -> None:
        self.index.close()


def _resolve_token(token: str | None) -> str | None:
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    return token or None  # "" means disabled


def create_app(
    index_spec: str,
    query_model: str | os.PathLike | QueryEncoder,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    force: bool = False,
    max_k: int = 100,
    uploads_dir: str | os.PathLike | None = None,
    stats_window: int = 1000,
) -> FastAPI:
    """The FastAPI app serving ``index_spec`` with ``query_model`` (a model folder, an ``.onnx``
    export or a :class:`QueryEncoder`).

    Raises :class:`hvs.search.SearchError` at once if the query model was not made for the index's
    gallery model (``force=True`` serves it anyway, with the warning in ``/stats``). ``token``
    (default: env ``HVS_TOKEN``; empty disables) guards ``POST /gallery`` and ``DELETE /gallery``.
    ``uploads_dir`` keeps images added through ``POST /gallery`` (default ``DIR/uploads`` for a
    ``faiss:DIR`` index) so their thumbnails can be served.
    """
    if max_upload_bytes < 1 or max_k < 1:
        raise ConfigError("max_upload_bytes and max_k must be positive")
    service = SearchService(
        index_spec, query_model, force=force, max_image_pixels=max_image_pixels, uploads_dir=uploads_dir
    )
    secret = _resolve_token(token)
    stats = RequestStats(stats_window)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="hvs search",
        version="1",
        lifespan=lifespan,
        description="Heterogeneous visual search: a small query model against a big model's gallery.",
    )
    app.state.service, app.state.stats = service, stats
    app.add_middleware(_LimitAndMeasure, limit=max_upload_bytes + FORM_SLACK, stats=stats)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The API promises JSON errors: a bug still answers {"detail": ...} (and is logged in full).
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {_one_line(f'{type(exc).__name__}: {exc}')}"}, 500)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": _one_line("; ".join(parts) or "invalid request")}, 422)

    def require_token(request: Request) -> None:
        if secret is None:
            raise HTTPException(
                403, f"gallery writes are disabled: no token configured (set {TOKEN_ENV} and restart the server)"
            )
        header = request.headers.get("authorization")
        if not header:
            raise HTTPException(
                401, "missing Authorization header (expected 'Bearer <token>')", headers={"WWW-Authenticate": "Bearer"}
            )
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401,
                "malformed Authorization header (expected 'Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), secret.encode()):
            raise HTTPException(403, "invalid token")

    async def read_upload(request: Request, max_fields: int = 2) -> tuple[bytes, str, Any]:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise HTTPException(
                415,
                f"send the image as multipart/form-data field 'image' "
                f"(got Content-Type {ctype.split(';')[0] or 'none'!r})",
            )
        form = await request.form(max_files=1, max_fields=max_fields)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "multipart field 'image' (a file) is missing")
        part_type = (upload.content_type or "").split(";")[0].strip().lower()
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            raise HTTPException(415, f"field 'image' has content type {part_type!r}; expected image/*")
        data = await upload.read()
        await upload.close()
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"image is {len(data)} bytes, over the upload limit of {max_upload_bytes}")
        return data, upload.filename or "image", form

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(INDEX_HTML)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "index_size": service.size()}

    @app.get("/stats")
    def get_stats() -> dict[str, Any]:
        return {**service.info(), "gallery_writes": secret is not None, **stats.snapshot()}

    @app.post(
        "/search",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {"image": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def search(
        request: Request, k: int = Query(10, ge=1, le=max_k, description="results to return")
    ) -> dict[str, Any]:
        data, name, _ = await read_upload(request, max_fields=1)
        return await run_in_threadpool(service.search, data, name, k)

    @app.post(
        "/gallery",
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "label": {"type": "string"},
                            },
                        }
                    }
                },
            }
        },
    )
    async def add_gallery(request: Request) -> dict[str, Any]:
        require_token(request)
        data, name, form = await read_upload(request, max_fields=2)
        label = form.get("label")
        if label is not None and not isinstance(label, str):
            raise HTTPException(400, "field 'label' must be text")
        label = label.strip() if label else None
        if label and len(label) > MAX_LABEL:
            raise HTTPException(400, f"label is longer than {MAX_LABEL} characters")
        return await run_in_threadpool(service.add, data, name, label or None)

    @app.delete("/gallery/{item_id}")
    def delete_gallery(item_id: int, request: Request) -> dict[str, Any]:
        require_token(request)
        return service.remove(item_id)

    @app.get("/thumb/{item_id}")
    def thumb(item_id: int) -> Response:
        return Response(
            service.thumb(item_id), media_type="image/png", headers={"Cache-Control": "public, max-age=86400"}
        )  # ids are never reused

    return app


__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "RequestStats", "SearchService", "create_app"]
