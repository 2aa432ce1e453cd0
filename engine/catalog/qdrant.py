"""Catalogues held in Qdrant (`catalog.backend = "qdrant"`): the rows and vectors of a catalogue live in one
Qdrant collection that every server replica shares, with the local `Catalog`'s search and update semantics.

    client = qdrant_client_for(url="http://qdrant:6333", api_key="...")      # or path="/data/qdrant" (embedded)
    cat = QdrantCatalog(client, "atelier_shop_1a2b3c", source="shop.jsonl")
    if not cat.ready():
        cat.create(dim, model); cat.load(rows, vectors)                      # seeds the collection once
    hits = cat.search(Query(vector=v, k=5, filters={...}, category_limit=2))
    cat.apply(rows, vectors, delete=["old-id"])                               # durable once Qdrant answers

What it knows: a Qdrant collection (a named vector `v`, cosine), one point per item (id = uuid5 of the
item's id; payload = the row's fields as the local catalogue stores them, plus `_atelier_seq`, the row's
order for ties), and one metadata point without a vector (`ready`, `dim`, `model`, and a `field:<name>` key
per field ever stored — `odd:<name>` when some value of it is not a plain JSON scalar). It does not know MCP,
tools, files or embedding models: `CatalogService` reads and embeds the file and hands the rows over.

Semantics kept from the local catalogue (tests: `tests/test_catalog_qdrant.py`, the same tool tests as the
local backend):

- Filters are exact. A filter is compiled with the local `compile_filters` (same errors), pushed down to
  Qdrant only where Qdrant's match is a superset of ours (`_pushdown`: equality and membership on plain
  fields, ranges, exclusions on fields that never held a list or an object), and every returned point is
  checked again with the local `filter_mask` on its payload. So a pushed condition only narrows the search;
  what decides is our evaluation.
- `category_limit` is the same greedy walk down the score order, and the search continues until k items
  pass or the collection is exhausted: each round asks Qdrant for the next best points, excluding those
  already seen (by id) and the categories already full (by value), so a round continues the order exactly
  where the last one stopped. `exclude` and `item_id` are excluded by point id; `min_score` is Qdrant's
  `score_threshold` and checked again.
- Ties: within a round equal scores come in row order (`_atelier_seq`: file order, then arrival time of
  the upsert); across rounds Qdrant's order of equal scores decides.
- Recall: the embedded mode (tests) searches exactly; a Qdrant server searches its HNSW index unless
  `exact` is set (config `catalog.qdrant_exact`), so, as with the local HNSW index, every returned item
  obeys the filters and limits and only recall is approximate.
- Upserts and deletes are one Qdrant `batch_update_points` request with `wait=true`: when it answers, the
  change is in Qdrant's write-ahead log and visible to every replica's next query. There is no local log.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInput
from .filters import Cond, compile_filters, filter_mask
from .query import Hit, Query
from .rows import _ABSENT

_NS = uuid.UUID("6f1c2d1e-8a4b-5c3d-9e0f-a1b2c3d4e5f6")
META_ID = str(uuid.uuid5(_NS, "\x00atelier-catalogue-meta"))
SEQ = "_atelier_seq"  # payload key: the row's order (ties)
VECTOR = "v"  # the collection's named vector
UPLOAD_BATCH = 256
_INT64 = 1 << 63

_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()


def qdrant_client_for(url: str = "", api_key: str = "", path: str = "", timeout_s: float = 10.0) -> Any:
    """One client per server URL (or embedded folder) for the whole process: the embedded mode locks its
    folder, so a second client on the same folder would fail. The API key is passed to the client only."""
    from qdrant_client import QdrantClient

    key = ("url", url) if url else ("path", path or ":memory:")
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if url:
                client = QdrantClient(url=url, api_key=api_key or None, timeout=math.ceil(timeout_s))
            elif path and path != ":memory:":
                client = QdrantClient(path=path)
            else:
                client = QdrantClient(location=":memory:")
            _clients[key] = client
        return client


@atexit.register
def _close_clients() -> None:
    """Close the clients before interpreter shutdown (an embedded client closed later finds its modules gone)."""
    with _clients_lock:
        for client in _clients.values():
            with contextlib.suppress(Exception):
                client.close()
        _clients.clear()


def point_id(item_id: str) -> str:
    """The Qdrant point id of an item id (a UUID: Qdrant takes only UUIDs and unsigned integers)."""
    return str(uuid.uuid5(_NS, item_id))


def _encode(value: Any) -> Any:
    """A stored field value -> JSON for Qdrant's payload. Values JSON has no type for (Parquet dates, times,
    decimals; integers beyond 64 bits) are tagged objects, decoded back by `_decode`."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else {"$atelier": "int", "v": str(value)}
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, Decimal):
        return {"$atelier": "decimal", "v": str(value)}
    if isinstance(value, datetime.datetime):
        return {"$atelier": "datetime", "v": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"$atelier": "date", "v": value.isoformat()}
    if isinstance(value, datetime.time):
        return {"$atelier": "time", "v": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {"$atelier": "timedelta", "v": value.total_seconds()}
    raise InvalidInput("items", f"<{type(value).__name__}>", "cannot be stored in Qdrant")


_DECODE = {"int": int, "decimal": Decimal, "datetime": datetime.datetime.fromisoformat,
           "date": datetime.date.fromisoformat, "time": datetime.time.fromisoformat,
           "timedelta": lambda s: datetime.timedelta(seconds=s)}


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        tag = value.get("$atelier")
        if tag in _DECODE and len(value) == 2 and "v" in value:
            return _DECODE[tag](value["v"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> bool:
    """A value Qdrant's conditions see as ours do: a string, bool, null or a number within float64's exact
    integers (a list, an object, a tagged value or a huge integer is not)."""
    if isinstance(value, (str, bool)) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) < (1 << 53)
    return isinstance(value, float)


def _safe_key(name: str) -> bool:
    """A field name Qdrant reads as one plain key (its keys are JSON paths: dots, brackets, quotes nest)."""
    return bool(name) and all(ch.isalnum() or ch in "_-" for ch in name)


class QdrantCatalog:
    """One catalogue in a Qdrant collection, with the tool-facing interface of the local `Catalog`
    (search, search_many, check_filters, has, item, vector, row_of, apply, info, len)."""

    journal = None  # no local change log: Qdrant's write-ahead log makes the change durable
    index = None
    index_saved = None

    def __init__(self, client: Any, collection: str, *, source: str = "", hnsw_ef: int = 128,
                 exact: bool = False, embedded: bool = False) -> None:
        self.client, self.collection, self.source = client, collection, source
        self.hnsw_ef, self.exact, self.embedded = int(hnsw_ef), bool(exact), bool(embedded)
        self.dim, self.model = 0, ""
        self._fields: set[str] = {"id", "category"}
        self._odd: set[str] = set()
        # the embedded client is not thread-safe; a server client is (httpx), so calls run concurrently there
        self._lock: contextlib.AbstractContextManager[Any] = threading.RLock() if embedded else contextlib.nullcontext()

    # -- the collection ------------------------------------------------------
    def _meta(self) -> dict[str, Any] | None:
        with self._lock:
            if not self.client.collection_exists(self.collection):
                return None
            got = self.client.retrieve(self.collection, [META_ID], with_payload=True)
        return dict(got[0].payload or {}) if got else None

    def ready(self) -> bool:
        """The collection exists and was loaded completely (by this process or another replica)."""
        meta = self._meta()
        if not meta or not meta.get("ready"):
            return False
        self._read_meta(meta)
        return True

    def _read_meta(self, meta: Mapping[str, Any]) -> None:
        self.dim, self.model = int(meta["dim"]), str(meta["model"])
        self._fields |= {k[6:] for k in meta if k.startswith("field:")}
        self._odd = {k[4:] for k in meta if k.startswith("odd:")}

    def create(self, dim: int, model: str) -> None:
        """Create the collection (cosine, named vector `v`) and its metadata point (not ready yet). A
        collection a crashed or concurrent loader left is kept: loading again upserts the same points."""
        from qdrant_client import models as qm

        with self._lock:
            if not self.client.collection_exists(self.collection):
                try:
                    self.client.create_collection(
                        self.collection, vectors_config={VECTOR: qm.VectorParams(size=dim, distance=qm.Distance.COSINE)})
                except Exception:
                    if not self.client.collection_exists(self.collection):
                        raise
                with warnings.catch_warnings():  # the embedded mode has no payload indexes and says so
                    warnings.simplefilter("ignore")
                    self.client.create_payload_index(self.collection, "category", qm.PayloadSchemaType.KEYWORD)
            self.client.upsert(self.collection, [qm.PointStruct(id=META_ID, vector={}, payload={
                "ready": False, "dim": int(dim), "model": model})], wait=True)
        self.dim, self.model = int(dim), model

    def load(self, rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor,
             progress: Any = None) -> None:
        """Seed the collection with a file's rows (vectors [n, dim]) in file order, then mark it ready."""

        v = torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()
        for lo in range(0, len(rows), UPLOAD_BATCH):
            part = rows[lo:lo + UPLOAD_BATCH]
            self._note_fields(part)
            points = [self._point(r, v[lo + i], lo + i) for i, r in enumerate(part)]
            with self._lock:
                self.client.upsert(self.collection, points, wait=True)
            if progress is not None:
                progress(min(len(rows), lo + UPLOAD_BATCH), len(rows))
        with self._lock:
            self.client.set_payload(self.collection, payload={"ready": True}, points=[META_ID], wait=True)

    def _point(self, row: Mapping[str, Any], vec: np.ndarray, seq: int) -> Any:
        from qdrant_client import models as qm

        payload = {k: _encode(val) for k, val in row.items()}
        payload["id"], payload[SEQ] = str(row["id"]), int(seq)
        payload.setdefault("category", "")
        return qm.PointStruct(id=point_id(str(row["id"])), vector={VECTOR: vec.tolist()}, payload=payload)

    def _note_fields(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Record new field names (and fields that hold non-plain values) in the metadata point. Keys are
        only ever added (`set_payload` merges), so replicas adding fields at once never lose one."""
        new: dict[str, bool] = {}
        for r in rows:
            for k, val in r.items():
                if k == SEQ:
                    raise InvalidInput(f"items.{k}", k, "is a reserved field name in a Qdrant catalogue")
                if k not in self._fields and f"field:{k}" not in new:
                    new[f"field:{k}"] = True
                if k not in self._odd and not _plain(val):
                    new[f"odd:{k}"] = True
        if new:
            with self._lock:
                self.client.set_payload(self.collection, payload=new, points=[META_ID], wait=True)
            self._fields |= {k[6:] for k in new if k.startswith("field:")}
            self._odd |= {k[4:] for k in new if k.startswith("odd:")}

    # -- views ---------------------------------------------------------------
    def __len__(self) -> int:
        from qdrant_client import models as qm

        with self._lock:
            return int(self.client.count(self.collection, count_filter=qm.Filter(
                must_not=[qm.HasIdCondition(has_id=[META_ID])]), exact=True).count)

    def _records(self, ids: Sequence[str], vectors: bool = False) -> dict[str, Any]:
        with self._lock:
            got = self.client.retrieve(self.collection, [point_id(i) for i in ids], with_payload=True,
                                       with_vectors=[VECTOR] if vectors else False)
        return {str(r.payload["id"]): r for r in got if r.payload and "id" in r.payload}

    def has(self, item_id: str) -> bool:
        return item_id in self._records([item_id])

    def row_of(self, item_id: str) -> int:
        """A stable integer for an item (its point id as an integer): what `Query.exclude_rows` holds."""
        if not self.has(item_id):
            raise InvalidInput("item_id", item_id, "unknown item id in this catalogue")
        return uuid.UUID(point_id(item_id)).int

    def item(self, item_id: str) -> dict[str, Any]:
        rec = self._records([item_id]).get(item_id)
        if rec is None:
            raise InvalidInput("item_id", item_id, "unknown item id in this catalogue")
        return self._fields_of(rec.payload)

    def vector(self, item_id: str) -> torch.Tensor:
        rec = self._records([item_id], vectors=True).get(item_id)
        if rec is None:
            raise InvalidInput("item_id", item_id, "unknown item id in this catalogue")
        return torch.tensor(rec.vector[VECTOR], dtype=torch.float32)

    @staticmethod
    def _fields_of(payload: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _decode(v) for k, v in payload.items() if k != SEQ}

    def fields(self) -> list[str]:
        return sorted(self._fields)

    def categories(self) -> dict[str, int]:
        """Items per category: Qdrant's facet count (exact), else a scroll over the categories."""
        with self._lock:
            try:
                hits = self.client.facet(self.collection, key="category", limit=1_000_000, exact=True).hits
                counts = Counter({str(h.value): int(h.count) for h in hits})
            except Exception:  # noqa: BLE001 - a server without the facet API or the index: count by scrolling
                counts, offset = Counter(), None
                while True:
                    pts, offset = self.client.scroll(self.collection, limit=4096, offset=offset,
                                                     with_payload=["category"])
                    counts.update(str(p.payload.get("category", "")) for p in pts if p.id != META_ID)
                    if offset is None:
                        break
        return {c: n for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n > 0}

    def info(self) -> dict[str, Any]:
        n = len(self)
        return {"rows": n, "dims": self.dim, "model": self.model, "dtype": "float32", "device": "qdrant",
                "bytes_on_device": 0, "sketch_bytes": 0, "capacity": n, "source": self.source,
                "categories": self.categories(), "fields": self.fields(), "index": "qdrant", "index_bytes": 0,
                "collection": self.collection}

    def check_filters(self, filters: Any) -> tuple[Cond, ...]:
        """`compile_filters` against the catalogue's fields; an unknown field re-reads the metadata once
        (another replica may have added it)."""
        try:
            return compile_filters(filters, dict.fromkeys(self._fields))
        except InvalidInput:
            meta = self._meta()
            if meta:
                self._read_meta(meta)
            return compile_filters(filters, dict.fromkeys(self._fields))

    def expect_query(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    # -- updates -------------------------------------------------------------
    def upsert_need(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Memory an upsert needs here beside its input: the normalised vectors and the request's JSON."""
        return len(rows) * (self.dim * 40 + 2048)

    def apply(self, rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor | None,
              delete: Iterable[str] = (), *, journal: Any = None) -> tuple[int, int, int]:
        """Upsert `rows` (vectors [n, dim]) and delete ids in one Qdrant request (`wait=true`), everything
        checked first -> (added, updated, deleted). An update keeps the item's row order."""
        from qdrant_client import models as qm

        dels = list(dict.fromkeys(str(i) for i in delete))
        if rows and (vectors is None or vectors.dim() != 2 or vectors.shape[0] != len(rows)
                     or vectors.shape[1] != self.dim):
            raise InvalidInput("vectors", None if vectors is None else tuple(vectors.shape),
                               f"expected [{len(rows)}, {self.dim}]")
        ids = [str(r["id"]) for r in rows]
        known = self._records(list(dict.fromkeys(ids + dels)))
        for rid in dels:
            if rid not in known:
                raise InvalidInput("delete", rid, "unknown item id in this catalogue")
        ops: list[Any] = []
        added = updated = 0
        if rows:
            assert vectors is not None
            self._note_fields(rows)
            v = torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()
            now = time.time_ns()
            last: dict[str, int] = {}
            for i, rid in enumerate(ids):
                last[rid] = i  # an id given twice: its last row wins, as in the local catalogue
            points = []
            for rid, i in last.items():
                old = known.get(rid)
                seq = int(old.payload.get(SEQ, now + i)) if old is not None else now + i
                points.append(self._point(rows[i], v[i], seq))
                added, updated = added + (old is None), updated + (old is not None)
            ops.append(qm.UpsertOperation(upsert=qm.PointsList(points=points)))
        if dels:
            ops.append(qm.DeleteOperation(delete=qm.PointIdsList(points=[point_id(d) for d in dels])))
        if ops:
            with self._lock:
                self.client.batch_update_points(self.collection, ops, wait=True)
        return added, updated, len(dels)

    # -- search --------------------------------------------------------------
    def _check(self, q: Query) -> np.ndarray:
        q.check_scalars()
        v = q.vector
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != self.dim:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InvalidInput("vector", f"{shape}", f"expected {self.dim} numbers (the catalogue's dimension)")
        a = v.detach().cpu().numpy().astype(np.float64)
        if not np.isfinite(a).all() or not a.any():
            raise InvalidInput("vector", "...", "must be finite and not all zero")
        return (a / np.sqrt(a @ a)).astype(np.float32)

    def search_many(self, qs: Sequence[Query]) -> list[list[Hit]]:
        return [self.search(q) for q in qs]

    def search(self, q: Query) -> list[Hit]:
        """Top-k with exact filters, exclusions, min_score and category limit (module docstring)."""
        from qdrant_client import models as qm

        vec = self._check(q)
        conds = self.check_filters(q.filters)
        must, must_not = _pushdown(conds, self._odd)
        excluded = [str(uuid.UUID(int=r)) for r in q.exclude_rows]
        hits: list[Hit] = []
        per_cat: Counter[str] = Counter()
        full: set[str] = set()
        seen: list[str] = []  # points seen and not excluded by the category condition: never asked again
        ask = q.k if not conds and q.category_limit is None else 4 * q.k

        def params(limit: int) -> Any:  # the embedded mode always searches exactly (and warns about params)
            return None if self.embedded else qm.SearchParams(hnsw_ef=max(self.hnsw_ef, limit), exact=self.exact)
        while True:
            not_ = list(must_not)
            if excluded or seen:
                not_.append(qm.HasIdCondition(has_id=excluded + seen))
            if full:
                not_.append(qm.FieldCondition(key="category", match=qm.MatchAny(any=sorted(full))))
            flt = qm.Filter(must=must or None, must_not=not_ or None)
            with self._lock:
                res = self.client.query_points(
                    self.collection, query=vec.tolist(), using=VECTOR, query_filter=flt, limit=ask,
                    with_payload=True, score_threshold=q.min_score, search_params=params(ask)).points
            pts = sorted(res, key=lambda p: (-p.score, int((p.payload or {}).get(SEQ, 0))))
            payloads = [self._fields_of(p.payload or {}) for p in pts]
            ok = _passes(payloads, conds)
            for p, fields, good in zip(pts, payloads, ok):
                cat = fields.get("category", "")
                if q.min_score is not None and p.score < q.min_score:
                    return hits
                if cat in full:
                    continue  # a category filled earlier in this round; the condition excludes it next round
                seen.append(str(p.id))
                if not good:
                    continue
                if q.category_limit is not None:
                    per_cat[cat] += 1
                    if per_cat[cat] >= q.category_limit:
                        full.add(cat)
                hits.append(Hit(id=str(fields["id"]), score=float(p.score), row=int(p.payload.get(SEQ, 0)),
                                fields=fields))
                if len(hits) == q.k:
                    return hits
            if len(pts) < ask:
                return hits  # exhausted: every valid item was seen
            ask = min(4 * ask, 4096)


def _passes(payloads: list[dict[str, Any]], conds: Sequence[Cond]) -> np.ndarray:
    """The local `filter_mask` over the returned rows' fields: the same evaluation as the local catalogue."""
    n = len(payloads)
    if not conds or not n:
        return np.ones(n, dtype=bool)
    cols = {}
    for name in {c.field for c in conds}:
        col = np.empty(n, dtype=object)
        col[:] = [p.get(name, _ABSENT) for p in payloads]
        cols[name] = col
    return filter_mask(cols, None, n, conds)


def _pushdown(conds: Sequence[Cond], odd: set[str]) -> tuple[list[Any], list[Any]]:
    """Qdrant conditions that keep every row our conditions keep (a superset; `_passes` decides) ->
    (must, must_not). A field whose name Qdrant would read as a path, or that holds lists, objects or
    non-JSON values (`odd`), is not pushed down."""
    from qdrant_client import models as qm

    def match(key: str, value: Any) -> Any:
        if isinstance(value, (str, bool)):
            return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))
        if value is None:
            return qm.IsNullCondition(is_null=qm.PayloadField(key=key))
        if isinstance(value, (int, float)) and abs(value) < (1 << 53):
            return qm.FieldCondition(key=key, range=qm.Range(gte=float(value), lte=float(value)))
        return None

    must: list[Any] = []
    must_not: list[Any] = []
    for c in conds:
        if not _safe_key(c.field) or c.field in odd:
            continue
        if c.op == "eq":
            m = match(c.field, c.value)
            if m is not None:
                must.append(m)
        elif c.op == "in":
            ms = [match(c.field, v) for v in c.value]
            if all(m is not None for m in ms):
                must.append(qm.Filter(should=ms))
        elif c.op in ("min", "max"):
            must.append(qm.FieldCondition(key=c.field, range=qm.Range(gte=c.value) if c.op == "min"
                                          else qm.Range(lte=c.value)))
        else:  # ne / not_in: a number is not pushed (float64 rounding could exclude an unequal integer)
            for v in (c.value,) if c.op == "ne" else c.value:
                if isinstance(v, (str, bool)) or v is None:
                    must_not.append(match(c.field, v))
    return must, must_not
