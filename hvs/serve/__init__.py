"""The hvs search service (FastAPI): ``create_app(index_spec, query_model)``; see :mod:`hvs.serve.app`.

Needs the ``serve`` extra (``pip install 'hvs[serve]'``: fastapi, uvicorn, python-multipart). The
library never imports this package; ``hvs serve`` and tests do.
"""

try:
    from .app import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, RequestStats, SearchService, create_app
except ImportError as e:  # pragma: no cover - depends on the environment
    if e.name in ("fastapi", "starlette", "multipart", "python_multipart"):
        raise ImportError(f"the search service needs {e.name}: pip install 'hvs[serve]'", name=e.name) from None
    raise

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "RequestStats", "SearchService", "create_app"]
