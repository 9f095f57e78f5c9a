"""``milvus:URI`` — a gallery index in a Milvus collection (Milvus Lite file, or a server/cluster).

``URI`` is either a local file path ending in ``.db`` (Milvus Lite, embedded: no server to run,
one process per file) or ``http(s)://host:port`` of a Milvus server or cluster (a token for an
authenticated server is read from the ``HVS_MILVUS_TOKEN`` environment variable, so it never
appears in a spec, a log or a sidecar). An optional ``#name`` suffix picks the collection
(default ``hvs_gallery``), so one Milvus holds several galleries: ``milvus:g.db#shoes``.

Storage:

* collection ``NAME``: ``id`` INT64 primary key (our stable id, not auto-generated), ``vector``
  FLOAT_VECTOR(dim) with a FLAT index and metric IP, ``label`` and ``source`` VARCHAR (nullable,
  at most 65535 bytes). Consistency level Strong, so a search sees every add that returned.
* collection ``NAME_hvs_meta``: one row (``id`` 0) whose VARCHAR ``json`` field holds the same
  JSON sidecar the FAISS backend writes to meta.json. It is a collection and not the collection
  description because descriptions are immutable after creation and the sidecar changes (count,
  updated, next_id) on every write; Milvus requires a vector field in every collection, so it
  carries an unused 2-d ``vector``.

Only the ``"Flat"`` factory is accepted (Milvus index FLAT: exact search, the same results as
``faiss:DIR`` with ``Flat``). Milvus Lite supports few index types, and mapping FAISS factory
strings to server-side ANN parameters (HNSW M/efConstruction, IVF nlist/nprobe) would hide
recall changes behind a name that means something else in FAISS; ``faiss:DIR`` covers those.

Differences from ``faiss:DIR`` a user can notice: Milvus has no multi-collection transactions,
so a crash between writing vectors and updating the sidecar leaves the sidecar's count behind;
``open_index`` then reports the disagreement and ``recount(spec)`` repairs the sidecar from the
collection. Milvus itself serialises concurrent writers, so there is no writer lock; a removed
vector is deleted at once for search and query, and its storage is reclaimed by compaction.
Milvus (Lite at least) does not reject a duplicate primary key: the insert silently replaces
the row, so ``add`` looks the ids up itself first and refuses duplicates like ``faiss:DIR``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .base import (
    MAX_TEXT,
    GalleryIndex,
    IndexStoreError,
    as_ids,
    as_matrix,
    as_texts,
    check_meta,
    check_meta_patch,
    check_model,
    check_new_ids,
    new_sidecar,
    now_iso,
    one_line,
    padded,
)

FORMAT = "hvs-milvus-index/1"
DEFAULT_COLLECTION = "hvs_gallery"
META_SUFFIX = "_hvs_meta"
FACTORIES = {"Flat": "FLAT"}  # FAISS factory string -> Milvus index type
INSTALL_HINT = "the milvus backend needs pymilvus: pip install pymilvus milvus-lite"
CHUNK = 1000  # rows per insert/get call: keeps gRPC messages well under Milvus' 64 MB limit
MAX_TOPK = 16384  # Milvus' limit on k (and on queries per search call)
NO_MODELS = "recording the gallery model per item (add(model=...)) is not supported by the milvus backend"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise IndexStoreError(INSTALL_HINT) from None
    return pymilvus


def parse_location(location: str) -> tuple[str, str, bool]:
    """``URI[#collection]`` -> (uri, collection, is_lite)."""
    uri, _, collection = location.partition("#")
    collection = collection or DEFAULT_COLLECTION
    if not _NAME_RE.match(collection):
        raise IndexStoreError(f"milvus collection name {collection!r} must be letters, digits and _")
    if uri.startswith(("http://", "https://", "tcp://", "grpc://")):
        return uri, collection, False
    if uri.endswith(".db"):
        return str(Path(uri)), collection, True
    raise IndexStoreError(
        f"milvus URI {uri!r} must be a local file ending in .db (Milvus Lite) or http(s)://host:port of a Milvus server"
    )


def _connect(uri: str, lite: bool):
    pymilvus = _pymilvus()
    kwargs = {}
    if not lite and os.environ.get("HVS_MILVUS_TOKEN"):
        kwargs["token"] = os.environ["HVS_MILVUS_TOKEN"]
    try:
        return pymilvus.MilvusClient(uri=uri, **kwargs)
    except Exception as e:
        if lite:
            raise IndexStoreError(
                f"cannot open Milvus Lite file {uri} ({one_line(e)}); is another process "
                "using it? Milvus Lite allows one process per file"
            ) from None
        raise IndexStoreError(f"cannot connect to Milvus at {uri} ({one_line(e)})") from None


def _count(client, collection: str) -> int:
    rows = client.query(collection, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"])


def _read_meta(client, collection: str, where: str) -> dict:
    rows = client.get(collection + META_SUFFIX, ids=[0], output_fields=["json"])
    if not rows:
        raise IndexStoreError(f"{where}: sidecar row is missing from {collection + META_SUFFIX}")
    try:
        meta = json.loads(rows[0]["json"])
    except (json.JSONDecodeError, TypeError) as e:
        raise IndexStoreError(f"{where}: sidecar is not valid JSON ({one_line(e)})") from None
    return check_meta(meta, where)


def _write_meta(client, collection: str, meta: dict) -> None:
    client.upsert(
        collection + META_SUFFIX,
        [{"id": 0, "vector": [0.0, 0.0], "json": json.dumps(meta, sort_keys=True, default=str)}],
    )


class MilvusGalleryIndex(GalleryIndex):
    """``milvus:URI[#collection]``: see the module docstring."""

    prefix = "milvus"

    def __init__(self, client, uri: str, collection: str, meta: dict):
        self._client, self.uri, self.collection = client, uri, collection
        self.spec = f"milvus:{uri}" + ("" if collection == DEFAULT_COLLECTION else f"#{collection}")
        self._meta = meta
        self.dim = int(meta["dim"])

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def check_creatable(cls, location: str) -> None:
        uri, collection, lite = parse_location(location)
        _pymilvus()
        if lite and not Path(uri).exists():
            return
        client = _connect(uri, lite)
        try:
            if client.has_collection(collection) or client.has_collection(collection + META_SUFFIX):
                raise IndexStoreError(
                    f"index milvus:{location} already exists (collection {collection}): "
                    "drop it first, or write to another collection (milvus:URI#name)"
                )
        finally:
            client.close()

    @classmethod
    def check_factory(cls, dim: int, factory: str, n: int | None = None) -> None:
        if factory not in FACTORIES:
            raise IndexStoreError(
                f"milvus backend supports factory {', '.join(map(repr, FACTORIES))} only, got "
                f"{factory!r}; use faiss:DIR for HNSW/IVF/PQ indexes"
            )

    @classmethod
    def open(cls, location: str) -> MilvusGalleryIndex:
        uri, collection, lite = parse_location(location)
        where = f"index milvus:{location}"
        _pymilvus()
        if lite and not Path(uri).exists():
            raise IndexStoreError(
                f"no index at {where} (missing file {uri}); build one first (hvs index build --out milvus:{location})"
            )
        client = _connect(uri, lite)
        try:
            if not client.has_collection(collection) or not client.has_collection(collection + META_SUFFIX):
                raise IndexStoreError(f"no index at {where} (no collection {collection!r} with its sidecar)")
            meta = _read_meta(client, collection, where)
            if meta.get("format") != FORMAT:
                raise IndexStoreError(f"{where}: sidecar format {meta.get('format')!r} is not {FORMAT!r}")
            fields = {f["name"]: f for f in client.describe_collection(collection)["fields"]}
            if set(fields) < {"id", "vector", "label", "source"}:
                raise IndexStoreError(f"{where}: collection {collection} lacks the id/vector/label/source fields")
            dim = int(fields["vector"]["params"]["dim"])
            if dim != meta["dim"]:
                raise IndexStoreError(f"{where}: sidecar says dim {meta['dim']} but the collection has dim {dim}")
            n = _count(client, collection)
            if n != meta["count"]:
                raise IndexStoreError(
                    f"{where}: sidecar says count {meta['count']} but the collection holds {n} "
                    "vectors (interrupted write?); hvs.index.milvus_backend.recount(spec) repairs it"
                )
        except BaseException:
            client.close()
            raise
        return cls(client, uri, collection, meta)

    @classmethod
    def create(
        cls, location: str, dim: int, factory: str = "Flat", meta: dict | None = None, initial=None
    ) -> MilvusGalleryIndex:
        uri, collection, lite = parse_location(location)
        pymilvus = _pymilvus()
        cls.check_factory(dim, factory)
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise IndexStoreError(f"creating an index needs dim, a positive integer, got {dim!r}")
        dim = int(dim)
        cls.check_creatable(location)
        user = dict(meta or {})
        user.pop("search_params", None)
        sidecar = new_sidecar(
            FORMAT, "milvus", dim, factory, user, milvus_index=FACTORIES[factory], collection=collection
        )
        if lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        client = _connect(uri, lite)
        DataType = pymilvus.DataType
        try:
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("label", DataType.VARCHAR, max_length=MAX_TEXT, nullable=True)
            schema.add_field("source", DataType.VARCHAR, max_length=MAX_TEXT, nullable=True)
            params = client.prepare_index_params()
            params.add_index(field_name="vector", index_type=FACTORIES[factory], metric_type="IP")
            client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")

            mschema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            mschema.add_field("id", DataType.INT64, is_primary=True)
            mschema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # unused: Milvus requires one
            mschema.add_field("json", DataType.VARCHAR, max_length=65535)
            mparams = client.prepare_index_params()
            mparams.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            client.create_collection(
                collection + META_SUFFIX, schema=mschema, index_params=mparams, consistency_level="Strong"
            )
            _write_meta(client, collection, sidecar)
            self = cls(client, uri, collection, sidecar)
            if initial is not None:
                self.add(*initial)
        except BaseException:
            # Leave nothing half-made behind: a half-filled collection would look like an index.
            for name in (collection, collection + META_SUFFIX):
                try:
                    if client.has_collection(name):
                        client.drop_collection(name)
                except Exception:
                    pass
            client.close()
            raise
        return self

    # -- the interface ------------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(self._meta, default=str))

    def __len__(self) -> int:
        self._check_open()
        return _count(self._client, self.collection)

    def _existing(self, ids: np.ndarray) -> list[int]:
        found: list[int] = []
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK].tolist()
            found += [int(r["id"]) for r in self._client.get(self.collection, ids=chunk, output_fields=["id"])]
        return found

    def _save_meta(self, **changes) -> None:
        meta = dict(self._meta, **changes)
        meta["count"] = _count(self._client, self.collection)
        meta["updated"] = now_iso()
        _write_meta(self._client, self.collection, meta)
        self._meta = meta

    def add(self, embeddings, ids=None, labels=None, sources=None, model=None) -> np.ndarray:
        self._check_open()
        if check_model(model) is not None:
            raise IndexStoreError(NO_MODELS)
        x = as_matrix(embeddings, self.dim, "embeddings")
        n = x.shape[0]
        labels, sources = as_texts(labels, n, "labels"), as_texts(sources, n, "sources")
        if ids is None:
            start = int(self._meta["next_id"])
            new = np.arange(start, start + n, dtype=np.int64)
        else:
            new = as_ids(ids, n)
            check_new_ids(new)
        if n == 0:
            return new
        clash = self._existing(new)
        if clash:
            raise IndexStoreError(
                f"id {clash[0]} is already in index {self.spec} ({len(clash)} duplicate(s)); remove it first"
            )
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            rows = [
                {"id": i, "vector": v, "label": lab, "source": src}
                for i, v, lab, src in zip(
                    new[start:stop].tolist(), x[start:stop].tolist(), labels[start:stop], sources[start:stop]
                )
            ]
            self._client.insert(self.collection, rows)
        self._save_meta(next_id=max(int(self._meta["next_id"]), int(new.max()) + 1))
        return new

    def remove(self, ids) -> int:
        self._check_open()
        drop = np.unique(as_ids(ids, what="ids"))
        present = self._existing(drop)
        for start in range(0, len(present), CHUNK):
            self._client.delete(self.collection, ids=present[start : start + CHUNK])
        if present:
            self._save_meta()
        return len(present)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # k is already capped at the collection size; only a gallery above Milvus' limit hits this
        if k > MAX_TOPK:
            raise IndexStoreError(f"milvus backend searches at most k={MAX_TOPK}, got k={k}")
        scores, ids = padded(q.shape[0], k)
        for start in range(0, q.shape[0], CHUNK):
            hits = self._client.search(
                self.collection,
                data=q[start : start + CHUNK].tolist(),
                limit=k,
                anns_field="vector",
                search_params={"metric_type": "IP"},
            )
            for row, result in enumerate(hits, start):
                for col, hit in enumerate(result):
                    ids[row, col] = hit["id"]
                    scores[row, col] = hit["distance"]
        return scores, ids

    def records(self, ids, *, skip_missing: bool = False) -> list[dict]:
        self._check_open()
        want = as_ids(ids, what="ids")
        found: dict[int, dict] = {}
        for start in range(0, len(want), CHUNK):
            chunk = np.unique(want[start : start + CHUNK]).tolist()
            for r in self._client.get(self.collection, ids=chunk, output_fields=["id", "label", "source"]):
                found[int(r["id"])] = {
                    "id": int(r["id"]),
                    "label": r.get("label"),
                    "source": r.get("source"),
                    "model": None,  # not recorded by this backend
                }
        if skip_missing:
            want = np.asarray([i for i in want.tolist() if i in found], dtype=np.int64)
        missing = [i for i in want.tolist() if i not in found]
        if missing:
            raise IndexStoreError(f"{len(missing)} id(s) not in index {self.spec}, e.g. {missing[0]}")
        return [dict(found[i]) for i in want.tolist()]

    def referenced(self, sources) -> set[str]:
        self._check_open()
        wanted, found = sorted(set(sources)), set()
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            # a JSON list of strings is a valid Milvus string-list literal (Lite has no filter templates)
            rows = self._client.query(
                self.collection, filter=f"source in {json.dumps(chunk)}", output_fields=["source"]
            )
            found |= {r["source"] for r in rows}
        return found

    def replace(self, ids, embeddings, model) -> int:
        raise IndexStoreError("replace (new vectors and model per item) is not supported by the milvus backend")

    def model_counts(self) -> dict:
        n = len(self)
        return {None: n} if n else {}

    def ids(self, exclude_model=None) -> np.ndarray:
        self._check_open()
        if exclude_model is not None:
            return self.ids()  # no item records a model here: every model differs from exclude_model
        found: list[int] = []
        iterator = self._client.query_iterator(self.collection, batch_size=CHUNK, filter="", output_fields=["id"])
        try:
            while batch := iterator.next():
                found += [int(r["id"]) for r in batch]
        finally:
            iterator.close()
        return np.sort(np.asarray(found, dtype=np.int64))

    def update_meta(self, patch) -> dict:
        self._check_open()
        patch = check_meta_patch(patch)
        self._save_meta(**patch)
        return self.meta

    def info(self) -> dict:
        out = super().info()
        out.update(uri=self.uri, collection=self.collection)
        return out

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def _check_open(self) -> None:
        if self._client is None:
            raise IndexStoreError(f"index {self.spec} is closed")


def recount(spec: str) -> dict:
    """Repair a Milvus sidecar whose count/next_id fell behind the collection (a write that was
    interrupted between inserting vectors and updating the sidecar). Returns the new sidecar."""
    location = spec.split(":", 1)[1] if spec.startswith("milvus:") else spec
    uri, collection, lite = parse_location(location)
    client = _connect(uri, lite)
    try:
        where = f"index milvus:{location}"
        meta = _read_meta(client, collection, where)
        top = -1
        iterator = client.query_iterator(collection, batch_size=CHUNK, filter="", output_fields=["id"])
        try:
            while batch := iterator.next():
                top = max(top, max(int(r["id"]) for r in batch))
        finally:
            iterator.close()
        meta.update(count=_count(client, collection), next_id=max(int(meta["next_id"]), top + 1), updated=now_iso())
        _write_meta(client, collection, meta)
        return meta
    finally:
        client.close()
