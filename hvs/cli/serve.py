"""``hvs serve``: the search service over HTTP (a thin wrapper around :func:`hvs.serve.create_app`).

    HVS_TOKEN=secret hvs serve --index faiss:runs/index --query-model q.onnx --port 8000

Open http://127.0.0.1:8000/ for the search page. Gallery writes (``POST /gallery``,
``DELETE /gallery/{id}``) need ``Authorization: Bearer $HVS_TOKEN``; without ``HVS_TOKEN`` in the
environment they are disabled. The token is read from the environment only, never from a flag
(a command line is visible to every user of the machine).
"""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as e:
        raise UsageError(f"hvs serve needs {e.name}: pip install 'hvs[serve]'") from None
    from ..serve.app import TOKEN_ENV

    if args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    app = create_app(
        args.index,
        args.query_model,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_image_pixels=args.max_pixels,
        force=args.force,
        max_k=args.max_k,
        uploads_dir=args.uploads,
    )
    service = app.state.service
    writes = "enabled (Bearer token from HVS_TOKEN)" if os.environ.get(TOKEN_ENV) else "disabled (HVS_TOKEN not set)"
    print(
        f"hvs serve: {service.index.spec} ({len(service.index)} items) with query model "
        f"{service.encoder.name} [{service.runtime}]; gallery writes {writes}"
    )
    if service.searcher.warning:
        print(f"hvs serve: warning: {service.searcher.warning}")
    print(f"hvs serve: http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of ``hvs serve``."""
    p.add_argument("--index", required=True, help="gallery index: faiss:DIR (or a bare DIR), milvus:URI")
    p.add_argument("--query-model", required=True, help="query model folder or exported .onnx file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=5.0, help="largest accepted image upload (MiB)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="largest accepted image in pixels, checked from the header (decompression bombs)",
    )
    p.add_argument("--max-k", type=int, default=100, help="largest k a search may ask for")
    p.add_argument("--uploads", help="folder for images added with POST /gallery (default: INDEX_DIR/uploads)")
    p.add_argument("--force", action="store_true", help="serve a query model made for another gallery model")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(fn=cmd_serve)


__all__ = ["cmd_serve", "configure"]
