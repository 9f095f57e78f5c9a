"""Gallery indexes: embed the gallery once with the big model, search it with the small one.

    from hvs.index import open_index, build_index

    index = open_index("faiss:runs/gallery_idx", create=True, dim=256, factory="HNSW32",
                       meta={"gallery_model": {"name": "...", "fingerprint": "sha256:..."}})
    ids = index.add(gallery_embeddings, labels=labels, sources=paths)
    scores, ids = index.search(query_embeddings, k=10)   # cosine similarity, (q, k) each
    index.records(ids[0])                                # [{"id", "label", "source", "model"}, ...]

Specs carry a backend prefix: ``faiss:DIR`` (the default choice: a folder searched in-process;
any FAISS factory string; a bare ``DIR`` means ``faiss:DIR``) or ``milvus:URI`` (a Milvus Lite ``.db``
file or an ``http(s)://`` Milvus server; ``Flat`` only; needs ``pip install pymilvus milvus-lite``).
Both implement :class:`GalleryIndex` and behave the same: vectors are L2-normalised on add and on
search, ids are stable int64 (0 .. 2**63-1), removal is real, k is capped at the index size
(results are -1/-inf padded to k, but never wider than ``max(len(index), MAX_PADDED_K)``), and a
long-lived reader picks up other processes' commits with ``stale()`` / ``refresh()``. A FAISS
write appends one checksummed, fsync'ed record to a write-ahead log beside an immutable base
version (O(items written), not O(gallery)); ``compact()`` (automatic past a size ratio, or
``hvs index compact SPEC``) folds the log into a new base. Base files are SHA-256 checksummed
and verified at open; ``mmap=True`` maps a base too large for RAM read-only. ``build_index`` embeds a gallery in
resumable, checksummed shards and writes the index in one step.
"""

from __future__ import annotations

import os

from .base import (
    GalleryIndex,
    IndexLockedError,
    IndexStoreError,
    backend_class,
    list_backends,
    parse_spec,
    register_backend,
)
from .build import build_index

register_backend("faiss", "hvs.index.faiss_backend:FaissGalleryIndex")
register_backend("milvus", "hvs.index.milvus_backend:MilvusGalleryIndex")


def open_index(
    spec: str | os.PathLike,
    *,
    create: bool = False,
    dim: int | None = None,
    factory: str = "Flat",
    meta: dict | None = None,
    mmap: bool | None = None,
) -> GalleryIndex:
    """Open the gallery index at ``spec`` (``faiss:DIR``, a bare ``DIR`` meaning the same, or ``milvus:URI``).

    With ``create=True`` a new, empty index is made (``dim`` required; ``factory`` is a FAISS
    factory string such as ``"Flat"``, ``"HNSW32"``, ``"IVF64,Flat"``, ``"IVF16,PQ8"``; ``meta`` is
    merged into the sidecar, by convention ``gallery_model`` and ``preprocessing``); it is an
    error if one already exists there. Without it, the index must exist and is validated.
    ``mmap=True`` (``faiss:DIR`` only) memory-maps the base index read-only, for galleries past
    RAM; at creation it is recorded in the sidecar, so later opens map it too.
    """
    prefix, location = parse_spec(spec)
    cls = backend_class(prefix)
    extra = {} if mmap is None else {"mmap": bool(mmap)}
    if extra and prefix != "faiss":
        raise IndexStoreError(f"mmap= is a faiss:DIR option; the {prefix} backend manages its own memory")
    if create:
        if dim is None:
            raise IndexStoreError(f"creating index {spec} needs dim=")
        return cls.create(location, dim, factory, meta, **extra)
    return cls.open(location, **extra)


__all__ = [
    "GalleryIndex",
    "IndexLockedError",
    "IndexStoreError",
    "build_index",
    "list_backends",
    "open_index",
    "register_backend",
]
