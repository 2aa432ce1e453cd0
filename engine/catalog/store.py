"""The Catalog: rows + a normalised embedding matrix on the engine device, updated online and searched
exactly. Storage (columns, the id index, the matrix and its int8 sketch), updates (`upsert`, `apply`,
`delete`, compaction), views (`item`, `vector`, `info`) and the search entry (`prepare` a query, batch it
through the `Coalescer`, mask, `scan`, walk the category limit).

Row storage is columnar: one NumPy object array per field name (`id` and `category` included), `capacity`
long, holding references to the callers' value objects (category strings are shared, one object per
distinct category). A row that lacks a field holds `_ABSENT` there. There are no per-row dicts.

Exactness: results equal a brute-force sort of all valid rows by (score descending, row ascending).
Filters, `exclude` and deleted rows are masked to -inf before the top-k; `min_score` cuts the sorted list;
`category_limit` is a greedy walk down the sorted list, and the search widens (k' doubles) until k items
pass or every valid row was seen.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, repeat
from operator import methodcaller
from typing import Any

import numpy as np
import torch

from .. import sketch as int8_sketch
from .. import workmem
from ..errors import InvalidInput
from .coalescer import Coalescer
from .filters import Cond, TypedColumns, compile_filters, filter_mask
from .query import Hit, Query, Request
from .rows import _ABSENT
from .scan import GATHER_FRACTION, choose_path, scan

DEFAULT_CHUNK_ROWS = 1 << 17
SKETCH_BLOCK_ROWS = 1 << 13  # rows per packed int8 block: an upsert repacks one block (a few ms)


class Catalog:
    """Rows + a normalised embedding matrix on `device`. Thread-safe (one lock; queries coalesce)."""

    def __init__(self, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, model: str = "", source: str = "",
                 capacity: int = 1024, sketch: bool | None = None,
                 memory_limit: Callable[[], int | None] | None = None, backends: Any = None) -> None:
        """`sketch`: scan an int8 sketch and rescore in fp32 (CPU fp32 only; None = where available).
        `backends`: the engine's `engine.backends.Backends` (the scan path and top-k it decided; None = decided
        here by the same rule, `scan.choose_path`).
        `memory_limit()`: bytes one search or update may need (None = no limit); a search whose upper
        bound exceeds it is refused before it starts, and batches are kept under it."""
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"dtype={dtype}: expected float32 or float16")
        self.dim = int(dim)
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_rows = int(chunk_rows)
        self.model = model
        self.source = source
        self._lock = threading.RLock()
        self._matrix = torch.zeros((max(1, capacity), self.dim), dtype=dtype, device=self.device)
        self._np: np.ndarray | None = None  # zero-copy view for the CPU fp32 product
        self._n = 0  # rows used, tombstones included
        self._alive = np.zeros(max(1, capacity), dtype=bool)
        self._alive_t: torch.Tensor | None = None  # device copy of _alive[:n], rebuilt on change
        self._row_of: dict[str, int] = {}
        self._cats: Counter[str] = Counter()
        self._cat_names: dict[str, str] = {}  # one shared string object per category ever seen
        self._columns: dict[str, np.ndarray] = {}  # field -> object array [capacity], _ABSENT where missing
        self._typed = TypedColumns()  # numbers and value codes of filtered fields, kept current
        self._dead = 0
        self.version = 0
        self.journal: Any = None  # the change log `CatalogService.upsert` writes through (`Journal`), or None
        self.index_saved: Any = None  # (version, path) when the index was last saved (CatalogService)
        self.index: Any = None  # the approximate index (`ann.HnswIndex`) kept in step with every change, or None
        self.ann_min_selectivity = 0.02  # a query whose filter keeps fewer of the live rows scans exactly
        self.ann_max_candidates = 8192  # widening past this many candidates falls back to the exact scan
        self.ann_exact_ratio = 128  # a filtered graph search with ef x this >= the rows the exact scan reads: exact
        self.memory_limit: Callable[[], int | None] = memory_limit or (lambda: None)
        self._batcher = Coalescer(self._search_batch, max_cost=lambda: self.memory_limit())
        # issue 16 (H4): one scan path per catalogue, chosen here (engine.backends / scan.choose_path)
        self.topk_backend = backends.topk.impl if backends is not None else "auto"
        if backends is not None and sketch is None and str(self.device) == backends.device:
            self.scan_path = backends.catalog_scan(dtype).impl
        else:
            self.scan_path = choose_path(self.device, dtype, sketch=sketch, topk_backend=self.topk_backend)[0]
        self._sketch = (int8_sketch.Int8Sketch(self.dim, min(self.chunk_rows, SKETCH_BLOCK_ROWS))
                        if self.scan_path == "sketch" else None)
        self._refresh_views()

    # -- size and info -------------------------------------------------------
    def __len__(self) -> int:
        return self._n - self._dead

    @property
    def capacity(self) -> int:
        return self._matrix.shape[0]

    @property
    def device_bytes(self) -> int:
        return self._matrix.numel() * self._matrix.element_size()

    @property
    def sketch_bytes(self) -> int:
        return self._sketch.nbytes if self._sketch is not None else 0

    def _sync_sketch(self, lo: int | None = None, hi: int | None = None) -> None:
        """Rows lo..hi of the matrix changed (None: all of them moved): repack their sketch blocks."""
        if self._sketch is None:
            return
        assert self._np is not None
        if lo is None:
            self._sketch.invalidate_all()
        else:
            self._sketch.invalidate(lo, hi)
        self._sketch.sync(self._np, self._n)

    def categories(self) -> dict[str, int]:
        with self._lock:
            return {c: n for c, n in sorted(self._cats.items(), key=lambda kv: (-kv[1], kv[0])) if n > 0}

    def fields(self) -> list[str]:
        with self._lock:
            return sorted(self._columns)

    def has(self, item_id: str) -> bool:
        return item_id in self._row_of

    def row_of(self, item_id: str) -> int:
        row = self._row_of.get(item_id)
        if row is None:
            raise InvalidInput("item_id", item_id, "unknown item id in this catalogue")
        return row

    def vector(self, item_id: str) -> torch.Tensor:
        """The stored (normalised) vector of an item: [dim] float32."""
        with self._lock:
            return self._matrix[self.row_of(item_id)].float().clone()

    def item(self, item_id: str) -> dict[str, Any]:
        with self._lock:
            return self._fields_at(self.row_of(item_id))

    def _fields_at(self, pos: int) -> dict[str, Any]:
        """The fields row `pos` has (every present column, `id` and `category` included), as a new dict."""
        out: dict[str, Any] = {}
        for name, col in self._columns.items():
            value = col[pos]
            if value is not _ABSENT:
                out[name] = value
        return out

    def _fill(self, name: str, lo: int, hi: int, values: Iterable[Any]) -> None:
        """Column `name`[lo:hi] = values (hi - lo of them), creating the column when new."""
        col = self._columns.get(name)
        if col is None:
            cap = self.capacity
            self._columns[name] = np.fromiter(chain(repeat(_ABSENT, lo), values, repeat(_ABSENT, cap - hi)),
                                              dtype=object, count=cap)
        else:
            col[lo:hi] = np.fromiter(values, dtype=object, count=hi - lo)

    def _column(self, name: str) -> np.ndarray:
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = np.full(self.capacity, _ABSENT, dtype=object)
        return col

    def _category(self, value: Any) -> Any:
        """The shared object for a category string (the rows' own copies can then be freed)."""
        return self._cat_names.setdefault(value, value) if type(value) is str else value

    # -- updates -------------------------------------------------------------
    def _refresh_views(self) -> None:
        self._np = self._matrix.numpy() if (self.device.type == "cpu" and self.dtype == torch.float32) else None
        self._alive_t = None

    def _grow(self, need: int) -> None:
        cap = self.capacity
        if need <= cap:
            return
        new_cap = self._grown(need)
        m = torch.zeros((new_cap, self.dim), dtype=self.dtype, device=self.device)
        m[:self._n] = self._matrix[:self._n]
        alive = np.zeros(new_cap, dtype=bool)
        alive[:self._n] = self._alive[:self._n]
        cols = {name: np.concatenate([col, np.full(new_cap - len(col), _ABSENT, dtype=object)])
                for name, col in self._columns.items()}
        self._matrix, self._alive, self._columns = m, alive, cols  # all or nothing: nothing changed before
        self._typed.clear()
        self._refresh_views()

    def _grown(self, need: int) -> int:
        cap = self.capacity
        return cap if need <= cap else max(need, 2 * cap if cap < (1 << 20) else cap + cap // 4)

    def upsert_bytes(self, n_rows: int, n_new: int, new_fields: int = 0) -> int:
        """Upper bound of the memory an upsert of `n_rows` rows (`n_new` of them new ids, bringing
        `new_fields` new columns) needs beside its input: the vectors normalised and converted, a grown
        matrix, mask and columns while the old ones are copied, the sketch of the new rows."""
        el = self._matrix.element_size()
        need = n_rows * self.dim * (4 + 4 + el)  # stacked input, normalised fp32, converted
        cap = self._grown(self._n + n_new)
        ncols = len(self._columns) + new_fields + 1
        if cap > self.capacity:
            need += cap * (self.dim * el + 1 + 8 * ncols)
        else:
            need += 8 * self.capacity * new_fields
        if self._sketch is not None:
            touched = min(n_rows, self._n + n_new)
            need += touched * (self.dim + 8) + 8 * (self._n + n_new)  # packed rows, error terms growing
            need += 16 * self.dim * min(touched, self._sketch.block_rows) * 4  # one block's packing temporaries
        return need + n_rows * 200  # the id index and category counts

    def upsert_need(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """`upsert_bytes` for these rows (how many are new ids, how many new fields they bring)."""
        n_new = len({str(r["id"]) for r in rows} - set(self._row_of))
        new_fields = len({k for r in rows for k in r} - set(self._columns))
        return self.upsert_bytes(len(rows), n_new, new_fields)

    def upsert(self, rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor) -> tuple[int, int]:
        """Add or replace rows (each with a str `id`); vectors: [n, dim] any float (normalised here).
        Returns (added, updated). The next search sees the change."""
        if vectors.dim() != 2 or vectors.shape[0] != len(rows) or vectors.shape[1] != self.dim:
            raise InvalidInput("vectors", tuple(vectors.shape), f"expected [{len(rows)}, {self.dim}]")
        v = torch.nn.functional.normalize(vectors.float(), dim=-1).to(self.device, self.dtype)
        added = updated = 0
        with self._lock:
            ids = [str(r["id"]) for r in rows]
            distinct = set(ids)
            new = sum(1 for r in distinct if r not in self._row_of) if self._row_of else len(distinct)
            del distinct
            self._grow(self._n + new)
            if new == len(rows):  # every id new and distinct: bulk append (a file load)
                return self._append(rows, ids, v), 0
            positions: list[int] = []
            fresh: list[bool] = []
            for i, (raw, rid) in enumerate(zip(rows, ids)):
                cat = self._category(raw.get("category", ""))
                self._cats[cat] += 1  # first: an unhashable category fails before the row changes
                pos = self._row_of.get(rid)
                positions.append(self._n if pos is None else pos)
                fresh.append(pos is None)
                if pos is None:
                    pos = self._n
                    self._n += 1
                    self._row_of[rid] = pos
                    added += 1
                else:  # an update: the new fields replace the old row's fields, all of them
                    self._cats[self._columns["category"][pos]] -= 1
                    for col in self._columns.values():
                        col[pos] = _ABSENT
                    updated += 1
                self._alive[pos] = True
                for name, value in raw.items():  # the row's order: new columns keep it
                    self._column(name)[pos] = rid if name == "id" else cat if name == "category" else value
                self._column("category")[pos] = cat  # "" when the row has none
                self._matrix[pos] = v[i]
                if self._sketch is not None:
                    self._sketch.invalidate(pos)
            self._typed.touch(self._columns, np.asarray(positions, np.int64))
            self._sync_sketch(self._n, self._n)
            if self.index is not None:
                self.index.update(v.float().cpu().numpy(), np.asarray(positions, np.int64), np.asarray(fresh))
            self._alive_t = None
            self.version += 1
        return added, updated

    def _append(self, rows: Sequence[Mapping[str, Any]], ids: list[str], v: torch.Tensor) -> int:
        """Bulk append of new, distinct ids: one C-level pass over the rows per column, no per-row dicts
        and no per-column lists. np.fromiter(..., object) stores every value as one object (a list value
        such as tags stays a list, where `col[lo:hi] = values` would try to broadcast it); a new column is
        built whole, an existing one through one temporary slice."""
        lo, hi = self._n, self._n + len(rows)
        get_cat = methodcaller("get", "category", "")
        for c in set(map(get_cat, rows)):  # first: an unhashable category fails before anything changes
            self._category(c)
        # the id index first: the columns allocated next reuse the memory its growth freed
        self._row_of.update(zip(ids, range(lo, hi)))
        names = dict.fromkeys(name for row in rows for name in row)  # first-seen order: new columns keep it
        names.setdefault("category", None)
        for name in names:
            if name == "id":
                values: Iterable[Any] = ids
            elif name == "category":  # the shared string objects (non-str values as they are)
                values = map(self._cat_names.get, map(get_cat, rows), map(get_cat, rows))
            else:
                values = map(methodcaller("get", name, _ABSENT), rows)
            self._fill(name, lo, hi, values)
        self._cats.update(self._columns["category"][lo:hi])
        self._matrix[lo:hi] = v
        self._alive[lo:hi] = True
        self._n = hi
        self._sync_sketch(lo, hi)
        if self.index is not None:
            self.index.update(v.float().cpu().numpy(), np.arange(lo, hi, dtype=np.int64), np.ones(hi - lo, bool))
        self._typed.touch(self._columns, slice(lo, hi))
        self._alive_t = None
        self.version += 1
        return len(rows)

    def apply(self, rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor | None,
              delete: Iterable[str] = (), *, journal: Callable[..., None] | None = None) -> tuple[int, int, int]:
        """Upsert `rows` (vectors [n, dim]) and delete the ids in `delete` as one change, under the lock:
        everything is checked before anything changes, so a search sees all of it or none of it.
        `journal(rows, vectors, dels, inserted)` (the catalogue's log, `Journal.append`) is called after the
        checks and before any change, under the same lock: when it raises, nothing changed.
        Returns (added, updated, deleted)."""
        dels = list(dict.fromkeys(str(i) for i in delete))
        if rows and (vectors is None or vectors.dim() != 2 or vectors.shape[0] != len(rows)
                     or vectors.shape[1] != self.dim):
            raise InvalidInput("vectors", None if vectors is None else tuple(vectors.shape),
                               f"expected [{len(rows)}, {self.dim}]")
        with self._lock:
            for rid in dels:
                if rid not in self._row_of:
                    raise InvalidInput("delete", rid, "unknown item id in this catalogue")
            if journal is not None:
                seen: set[str] = set()
                inserted = []
                for r in rows:
                    rid = str(r["id"])
                    inserted.append(rid not in self._row_of and rid not in seen)
                    seen.add(rid)
                journal(rows, vectors, dels, inserted)
            added = updated = 0
            if rows:
                assert vectors is not None
                added, updated = self.upsert(rows, vectors)
            return added, updated, self.delete(dels) if dels else 0

    def delete(self, ids: Iterable[str]) -> int:
        """Remove items by id (unknown ids raise InvalidInput before anything changes)."""
        with self._lock:
            ids = list(dict.fromkeys(str(i) for i in ids))
            for rid in ids:
                if rid not in self._row_of:
                    raise InvalidInput("delete", rid, "unknown item id in this catalogue")
            gone = np.asarray([self._row_of[rid] for rid in ids], np.int64)
            if self.index is not None:
                self.index.delete(gone)
            for rid in ids:
                pos = self._row_of.pop(rid)
                self._cats[self._columns["category"][pos]] -= 1
                self._alive[pos] = False
                for col in self._columns.values():
                    col[pos] = _ABSENT
                self._dead += 1
            self._typed.touch(self._columns, gone)
            self._alive_t = None
            self.version += 1
            if self._dead > 1024 and self._dead * 2 > self._n:
                self._compact()
            return len(ids)

    def _compact(self) -> None:
        keep = np.flatnonzero(self._alive[:self._n])
        keep_t = torch.from_numpy(keep).to(self.device)
        n = len(keep)
        self._matrix[:n] = self._matrix[keep_t].clone()
        self._matrix[n:self._n] = 0
        for col in self._columns.values():
            col[:n] = col[keep]
            col[n:self._n] = _ABSENT
        self._row_of = dict(zip(self._columns["id"][:n].tolist(), range(n)))
        self._typed.clear()
        self._alive[:n] = True
        self._alive[n:self._n] = False
        self._n, self._dead = n, 0
        self._refresh_views()
        self._sync_sketch()
        if self.index is not None:  # row positions moved: the graph's labels are rebuilt
            self.build_index(type(self.index)(self.dim, M=self.index.M, ef_construction=self.index.ef_construction,
                                              ef_search=self.index.ef_search, threads=self.index.threads))

    # -- the approximate index -------------------------------------------------
    def build_index(self, index: Any) -> None:
        """Fill `index` (an empty `ann.HnswIndex`) with the live rows and search through it from now on."""
        with self._lock:
            rows = np.flatnonzero(self._alive[:self._n]).astype(np.int64)
            for lo in range(0, len(rows), 1 << 16):
                part = rows[lo:lo + (1 << 16)]
                index.build(self._matrix[torch.from_numpy(part)].float().cpu().numpy(), part)
            self.index = index

    def fingerprint(self) -> str:
        """A hash of the live rows' ids, positions and stored vectors: an index saved under it fits."""
        import hashlib

        with self._lock:
            h = hashlib.blake2b(digest_size=16)
            h.update(np.asarray([self._n, self.dim], np.int64).tobytes())
            h.update(self._alive[:self._n].tobytes())
            h.update("\x1f".join(map(str, self._columns["id"][:self._n])).encode("utf-8", "surrogatepass"))
            m = self._matrix[:self._n].cpu().numpy()
            h.update(memoryview(np.ascontiguousarray(m)).cast("B"))
            return h.hexdigest()

    def _ann_rows(self, q: Query, vec: torch.Tensor, mask: torch.Tensor | None, n_valid: int, want: int,
                  rows: np.ndarray) -> tuple[list[Hit], bool]:
        """Candidates `rows` from the index -> the mask applied, exact scores, sorted (score desc, row asc),
        walked -> (hits, final)."""
        rows = rows[(rows >= 0) & (rows < self._n)]
        if mask is not None:
            rows = rows[mask.cpu().numpy()[rows]]
        else:
            rows = rows[self._alive[rows]]
        if self._np is not None:
            s = self._np[rows] @ vec.numpy()
        else:
            s = (self._matrix[torch.from_numpy(rows).to(self.device)].float() @ vec.to(self.device)).cpu().numpy()
        order = np.lexsort((rows, -s))
        return self._walk(q, s[order].tolist(), rows[order].tolist())

    def _ann_plan(self, req: Request, n_valid: int, want: int) -> tuple[int, int]:
        """The candidate pool for one query -> (kk, ef), or (0, 0) when the exact scan is cheaper.

        The filter's selectivity is known exactly (`n_valid` of the live rows pass it: filters are evaluated
        on the rows' metadata before the search), so the pool is sized for k valid items: k_eff / selectivity
        candidates, times 8 for a filter (its valid items sit deeper in the graph's order, where its recall
        is lower) and times 4 x the categories needed (ceil(k / category_limit)) for a category limit; the
        graph is searched with ef = 2 x the pool (measured on 100 000 clustered rows with a filter and
        categories correlated with the clusters: ef = pool gives recall 0.81 / 0.88, ef = 2 x pool 0.92 /
        0.94). The exact scan answers instead when the selectivity is below `ann_min_selectivity`, or when
        ef x `ann_exact_ratio` reaches the rows that scan would read (`_exact_rows`: a selective filter's
        rows alone). One graph step costs ~70 rows of that scan (1M x 384 fp32: ef 64 p50 0.88 ms; 100 000
        filtered rows 22 ms); the ratio of 128 leans to the exact answer, as a filter unrelated to the
        query's neighbourhood leaves the graph's pool short of the true top k (recall 0.73 with a 10 %
        filter on 1M rows). A plain query always uses the graph."""
        alive = max(1, len(self))
        q = req.query
        filtered = n_valid < alive
        factor = 8 if filtered else 1
        if q.category_limit is not None:
            factor *= 4 * -(-q.k // q.category_limit)
        kk = min(alive, int(math.ceil(want * alive / max(1, n_valid))) * factor + (16 if factor > 1 else 0))
        ef = max(self.index.ef_search, kk * (2 if factor > 1 else 1))
        if n_valid < self.ann_min_selectivity * alive or (factor > 1 and ef * self.ann_exact_ratio >=
                                                                 self._exact_rows(n_valid, filtered)):
            return 0, 0
        return kk, ef

    def _exact_rows(self, n_valid: int, filtered: bool) -> int:
        """Rows the exact scan reads for a query that n_valid live rows pass: those rows alone when the
        scan path answers a selective filter from them (`scan.GATHER_FRACTION`), else every row."""
        share = GATHER_FRACTION.get(self.scan_path, 0.0) if filtered else 0.0
        return n_valid if n_valid <= share * self._n else self._n

    def _ann_search(self, reqs: list[Request], valid: list[tuple[torch.Tensor | None, int]], want: list[int]
                    ) -> list[list[Hit]]:
        """Approximate candidates per request (pool and ef from `_ann_plan`), then: exact rescoring of those
        its mask keeps, the walk, and widening (x4 pool and ef) until the walk is final; past
        `ann_max_candidates`, past what the exact scan costs, or when the graph cannot return the pool, the
        exact scan answers. Returned items always satisfy the filters and the limits. Plain queries (no
        filter, no limit) share one graph search."""
        alive = max(1, len(self))
        plans = [self._ann_plan(req, nv, w) for req, (_, nv), w in zip(reqs, valid, want)]
        plain = [j for j, (kk, ef) in enumerate(plans) if 0 < kk <= self.ann_max_candidates
                 and ef == self.index.ef_search]
        cand: dict[int, np.ndarray] = {}
        if plain:
            try:
                got, _ = self.index.candidates(torch.stack([reqs[j].vector for j in plain]).numpy(),
                                               max(plans[j][0] for j in plain))
                cand = dict(zip(plain, got))
            except RuntimeError:  # the graph could not return that many (deleted elements): exact for these
                pass
        out = []
        for j, req in enumerate(reqs):
            mask, n_valid = valid[j]
            kk, ef = plans[j]
            hits, final = [], False
            while 0 < kk <= self.ann_max_candidates:
                c = cand.pop(j, None)
                if c is None:
                    try:
                        c = self.index.candidates(req.vector[None].numpy(), kk, ef=ef)[0][0]
                    except RuntimeError:
                        break
                hits, final = self._ann_rows(req.query, req.vector, mask, n_valid, want[j], c[:kk])
                if final or kk >= alive:
                    break
                kk, ef = min(alive, 4 * kk), 4 * ef
                if ef * self.ann_exact_ratio >= self._exact_rows(n_valid, n_valid < alive):
                    break
            if not final:  # the graph did not give k valid items (or would cost more): the exact scan does
                hits = self._exact_one(req, mask, n_valid, want[j])
            out.append(hits)
        return out

    def _exact_one(self, req: Request, mask: torch.Tensor | None, n_valid: int, k_b: int) -> list[Hit]:
        vals, rows = self._scan(req.vector[None], [mask], k_b)
        hits, final = self._walk(req.query, vals[0].tolist(), rows[0].tolist())
        while not final and k_b < n_valid:
            k_b = min(n_valid, 2 * k_b)
            vals, rows = self._scan(req.vector[None], [mask], k_b)
            hits, final = self._walk(req.query, vals[0].tolist(), rows[0].tolist())
        return hits

    # -- search --------------------------------------------------------------
    def search(self, q: Query) -> list[Hit]:
        """Exact top-k for one query; concurrent callers share one matrix product. The query is checked
        and converted first (`prepare`): bad input raises InvalidInput here, before it joins a batch."""
        req = self.prepare(q)
        return self._batcher.submit(req, cost=req.nbytes)

    def prepare(self, q: Query) -> Request:
        """Check and convert a query: vector, k, category_limit, min_score, filters (fields and values)
        -> a Request; InvalidInput names the argument, the value and the rule. Its upper bound of memory
        is checked against `memory_limit()` (`workmem.MemoryLimitExceeded`: 'would need N GB; limit M GB')."""
        q.check_scalars()
        vec = self._check_vector(q.vector)
        conds = compile_filters(q.filters, self._columns)
        need = self.search_bytes(q, conds)
        if q.category_limit is not None:
            workmem.require("category_limit", q.category_limit, need, self.memory_limit(),
                            f"a search with a category limit may walk all {self._n} rows")
        else:
            workmem.require("k", q.k, need, self.memory_limit(), f"a search over {self._n} rows")
        return Request(q, vec, conds, need)

    def check_filters(self, filters: Any) -> tuple[Cond, ...]:
        """`compile_filters` against this catalogue's fields (InvalidInput names field, value and rule)."""
        return compile_filters(filters, self._columns)

    def search_bytes(self, q: Query, conds: Sequence[Cond] = ()) -> int:
        """Upper bound of the memory one query adds to a batch: its row mask and filter temporaries (and
        a float64 copy of each range-filtered field not converted yet), its rows of the chunk scores, the
        survivors of the int8 / fp16 filter (at most every row), the candidates walked (k, or every valid
        row when a category limit makes the search widen) as Python numbers."""
        n = self._n
        need = 0
        if conds or q.exclude_rows:
            need += n * (2 + 2 * len(conds))
            need += self._typed.nbytes_missing(conds, self.capacity)
            if self.device.type != "cpu":
                need += n
        need += 16 * min(n, max(self.chunk_rows, int8_sketch.GROUP_ROWS))  # its row of the chunk scores
        if self._sketch is not None or (self.device.type == "cpu" and self.dtype == torch.float16):
            need += 24 * n  # survivors of the filter: at most every row (row + upper bound, kept and joined)
        kb = n if q.category_limit is not None else min(n, 2 * q.k)
        need += 200 * kb  # candidates: the running top-k and its merges (~100 B), walked as Python numbers
        return need + 4096

    def expect_query(self) -> contextlib.AbstractContextManager[None]:
        """`with cat.expect_query(): ... cat.search(q)`: announce a query while building it, so that
        concurrent callers are served in one batch (`Coalescer.expect`)."""
        return self._batcher.expect()

    def close(self) -> None:
        """Release the query worker thread now (it holds this catalogue until it idles out)."""
        self._batcher.close()

    def search_many(self, qs: Sequence[Query]) -> list[list[Hit]]:
        """Exact top-k for several queries in one product (no queueing)."""
        return self._search_batch([self.prepare(q) for q in qs])

    def _check_vector(self, v: Any) -> torch.Tensor:
        """A query vector -> [dim] float32, L2-normalised (the norm taken in float64: no overflow)."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != self.dim:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InvalidInput("vector", f"{shape}", f"expected {self.dim} numbers (the catalogue's dimension)")
        if v.device.type == "cpu":  # NumPy: a dozen torch ops per query cost more than the scan's share
            a = v.detach().numpy().astype(np.float32)
            if not np.isfinite(a).all() or not a.any():
                raise InvalidInput("vector", "...", "must be finite and not all zero")
            a64 = a.astype(np.float64)
            return torch.from_numpy((a64 / float(np.sqrt(a64 @ a64))).astype(np.float32))
        v = v.float()
        if not bool(torch.isfinite(v).all()) or float(v.abs().max()) == 0.0:
            raise InvalidInput("vector", "...", "must be finite and not all zero")
        return torch.nn.functional.normalize(v / v.abs().max(), dim=0)

    def _valid(self, req: Request) -> tuple[torch.Tensor | None, int]:
        """(bool mask [n] on device, or None when every row is valid; number of valid rows)."""
        q = req.query
        n = self._n
        if not req.conds and not q.exclude_rows:
            if self._dead == 0:
                return None, n
            if self._alive_t is None:
                self._alive_t = torch.from_numpy(self._alive[:n].copy()).to(self.device)
            return self._alive_t, n - self._dead
        mask = self._alive[:n].copy()
        if req.conds:
            mask &= filter_mask(self._columns, self._typed, n, req.conds)
        for r in q.exclude_rows:
            if 0 <= r < n:
                mask[r] = False
        return torch.from_numpy(mask).to(self.device), int(mask.sum())

    def _scan(self, vecs: torch.Tensor, masks: list[torch.Tensor | None], kmax: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return scan(self._matrix, self._np, self._sketch, self._n, self.chunk_rows, vecs, masks, kmax,
                    path=self.scan_path, topk_backend=self.topk_backend)

    def _walk(self, q: Query, vals: list[float], rows: list[int]) -> tuple[list[Hit], bool]:
        """Greedy pass down the sorted candidates -> (hits, final). Not final: more candidates needed."""
        hits: list[Hit] = []
        per_cat: Counter[str] = Counter()
        id_col, cat_col = self._columns["id"], self._columns["category"]
        for v, r in zip(vals, rows):
            if v == float("-inf") or (q.min_score is not None and v < q.min_score):
                return hits, True
            if q.category_limit is not None:
                cat = cat_col[r]
                if per_cat[cat] >= q.category_limit:
                    continue
                per_cat[cat] += 1
            hits.append(Hit(id=id_col[r], score=float(v), row=r, fields=self._fields_at(r)))
            if len(hits) == q.k:
                return hits, True
        return hits, False

    def _search_batch(self, reqs: list[Request]) -> list[list[Hit]]:
        qs = [r.query for r in reqs]
        vecs = [r.vector for r in reqs]
        with self._lock:
            if self._n == 0 or len(self) == 0:
                return [[] for _ in qs]
            valid = [self._valid(r) for r in reqs]
            want = [min(nv, q.k if q.category_limit is None else 2 * q.k) for q, (_, nv) in zip(qs, valid)]
            out: list[list[Hit]] = [[] for _ in qs]
            live = [b for b in range(len(qs)) if want[b] > 0]
            if self.index is not None:  # approximate, except for very selective filters (few valid rows)
                approx = [b for b in live if valid[b][1] >= self.ann_min_selectivity * len(self)]
                if approx:
                    for b, hits in zip(approx, self._ann_search([reqs[b] for b in approx],
                                                                [valid[b] for b in approx],
                                                                [want[b] for b in approx])):
                        out[b] = hits
                    live = [b for b in live if b not in set(approx)]
            if not live:
                return out
            vals, rows = self._scan(torch.stack([vecs[b] for b in live]), [valid[b][0] for b in live],
                                    max(want[b] for b in live))
            for j, b in enumerate(live):
                q, (mask, n_valid), k_b = qs[b], valid[b], want[b]
                hits, final = self._walk(q, vals[j, :k_b].tolist(), rows[j, :k_b].tolist())
                while not final and k_b < n_valid:  # the category limit skipped some: widen, stay exact
                    k_b = min(n_valid, 2 * k_b)
                    v1, r1 = self._scan(vecs[b][None], [mask], k_b)
                    hits, final = self._walk(q, v1[0].tolist(), r1[0].tolist())
                out[b] = hits
            return out

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"rows": len(self), "dims": self.dim, "model": self.model,
                    "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                    "bytes_on_device": self.device_bytes, "sketch_bytes": self.sketch_bytes,
                    "capacity": self.capacity, "source": self.source,
                    "categories": self.categories(), "fields": self.fields(),
                    "index": "exact" if self.index is None else "hnsw",
                    "index_bytes": 0 if self.index is None else self.index.nbytes}
