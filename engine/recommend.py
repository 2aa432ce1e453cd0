"""Recommendation: an embedding catalogue on the engine device with exact top-k search.

    svc = engine.service("catalog", CatalogService)
    cat, report = svc.open(path_or_None, model="", dtype="float32", max_rows=2_000_000, token=token)
    hits = cat.search(Query(vector=v, k=5, category_limit=2))      # v: [dim] float, any norm

What it knows: rows (an `id`, a `category`, any other fields), a row-major
matrix of L2-normalised embeddings `[capacity, dim]` (fp32, or fp16) on the
engine device, and cosine scores. It does not know MCP, JSON arguments or
client paths: the tool layer resolves paths and limits.

Row storage is columnar: one NumPy object array per field name (`id` and
`category` included), `capacity` long, holding references to the callers'
value objects (category strings are shared, one object per distinct
category). A row that lacks a field holds `_ABSENT` there: not None (an
explicit `null` is a value), equal to nothing else, never matched by a
filter, NaN to a numeric range. There are no per-row dicts: besides the
matrix, a row costs a few pointers plus its entry in the id -> row dict, and
`item()` and search hits rebuild a row's fields from the columns.

Exactness: results equal a brute-force sort of all valid rows by (score
descending, row ascending), where a row's position is its order in the file,
then upserts in arrival order (an update keeps its row). Filters, `exclude`
and deleted rows are masked to -inf before the top-k, so they never cost
exactness; `min_score` cuts the sorted list; `category_limit` is a greedy
walk down the sorted list, and the search widens (k' doubles) until k items
pass or every valid row was seen.

Scanning: the matrix is scanned `chunk_rows` rows at a time (never more
than one chunk of scores `[B, chunk]` in memory), each chunk's top-k merged
into a running top-k with `kernels.topk` (lower position wins ties). On the
CPU in fp32 (the default) the scan reads an int8 sketch of the matrix instead
(`engine.sketch`: a quarter of the bytes, fbgemm's int8 product) with a
rigorous per-row error bound, and rescores exactly only the rows whose bound
reaches the k-th best: the same exact answer for a quarter of the memory
traffic, at 1 + 8/dim bytes per element more memory. Upserts repack only
the sketch blocks they touch. CPU fp16 catalogues are scanned by a kernel
that widens each fp16 row in cache (`engine.sketch.half_exact_topk`), under
a rigorous rounding bound, then the same exact rescoring.
Concurrent `search` calls coalesce: requests that arrive while a product is
running are served together by the next one, on one worker thread
(`Coalescer`).

Online updates: `upsert` overwrites a row in place or appends (capacity
doubles when full); `delete` leaves a tombstone (masked); tombstones are
compacted (order kept) when they outnumber live rows. `apply` does an upsert
and deletes as one change (all checked first); `CatalogService.upsert` embeds
missing vectors in chunks (cancel checks between them) and then calls `apply`
once, so a cancelled or failed update changes nothing.

Bad input stays with its caller: `search` checks and converts a query
(`prepare`: vector, k, limits, and `compile_filters`, which turns every filter
value into a checked `Cond`, range bounds into exact float64 bounds) before it
joins a batch, and the Coalescer re-runs a failed batch one request at a time.
Stored values pass `value_problem` in `clean_row` (files and the tool): every
number finite in float64, so no stored value can fail a filter.

Memory: `search_bytes` / `upsert_bytes` (and the embedder's `estimate_bytes`)
are upper bounds computed from the arguments; over `memory_limit()` the work is
refused before it starts (`workmem.MemoryLimitExceeded`), and a batch takes
queries while their bounds sum to at most that limit.

Files: JSONL, CSV or Parquet; malformed rows are reported with their line
(row) number and skipped. Embeddings of a file are cached beside it (or in
the engine cache dir when that folder is read-only) as `.npy`, keyed by
model and a hash of the embedded texts, written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import chain, repeat
from operator import methodcaller
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.topk import topk

from . import sketch as int8_sketch
from . import workmem
from .errors import InvalidInput

DEMO_CATALOG = Path(__file__).resolve().parent / "data" / "demo_catalog.jsonl"
TEXT_FIELDS = ("name", "title", "brand", "category", "description", "text", "tags")
VECTOR_FIELDS = ("embedding", "vector")
DEFAULT_CHUNK_ROWS = 1 << 17
SKETCH_BLOCK_ROWS = 1 << 13  # rows per packed int8 block: an upsert repacks one block (a few ms)
FILTER_OPS = ("eq", "in", "min", "max")
MAX_FILTER_VALUES = 256
MAX_VALUE_DEPTH = 32  # nesting of a stored field value (lists / objects)


class _Absent:
    """The type of `_ABSENT`, the value of a field a row does not have. Equal only to itself (the
    default identity comparison, which stays in C), so it never matches a filter value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"

    def __reduce__(self) -> str:
        return "_ABSENT"  # pickling/copying keeps the one instance


_ABSENT: Any = _Absent()


# -- rows ------------------------------------------------------------------
def clean_row(raw: Any, where: str, *, argument: bool = False) -> tuple[dict[str, Any], list[float] | None]:
    """Validate one raw row -> (fields with a str `id`, its embedding or None). ValueError names `where`
    (`where.field=value: rule` for a field when `where` is an argument such as `items[3]`, else
    `where: field=value: rule`). Every field value passes `value_problem`, so nothing stored can fail a
    filter or a result later."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object with an 'id', got {type(raw).__name__}")
    row = dict(raw)
    rid = row.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and rid.bit_length() > 64:
        raise ValueError(f"{where}: 'id' must be a non-empty string or an integer of at most 64 bits, "
                         f"got {shown(rid)!r}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
    row["id"] = str(rid).strip()
    bad = text_problem(row["id"], f"{where}.id" if argument else f"{where}: id")
    if bad is not None:
        raise ValueError(bad)
    cat = row.get("category", "")
    if cat is None:
        cat = ""
    if not isinstance(cat, str):
        raise ValueError(f"{where}: 'category' must be a string, got {cat!r}")
    row["category"] = cat
    vec = None
    for name in VECTOR_FIELDS:
        if name in row:
            v = row.pop(name)
            if isinstance(v, str):
                try:
                    v = json.loads(v) if v.strip().startswith("[") else [float(t) for t in v.split()]
                except ValueError as exc:
                    raise ValueError(f"{where}: '{name}' is not a list of numbers") from exc
            if not isinstance(v, (list, tuple, np.ndarray)) or len(v) == 0:
                raise ValueError(f"{where}: '{name}' must be a non-empty list of numbers")
            try:
                vec = [float(x) for x in v]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: '{name}' must be a list of numbers") from exc
            if not all(math.isfinite(x) for x in vec) or not any(vec):
                raise ValueError(f"{where}: '{name}' must be finite and not all zero")
    for key, value in row.items():
        t = type(value)  # the common cases first, without a call (a file has millions of values)
        if (t is str and value.isascii()) or (t is float and value - value == 0.0) \
                or (t is int and value.bit_length() <= 1000) or t is bool or value is None:
            continue
        bad = value_problem(value, f"{where}.{key}" if argument else f"{where}: {key}")
        if bad is not None:
            raise ValueError(bad)
    return row, vec


class _Shown:
    """A stand-in printed instead of a value too long to show (a 400-digit integer)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def shown(value: Any) -> Any:
    """`value`, or for an integer of more than 30 digits `<integer of N digits>` (repr would be long, and
    raises beyond 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        digits = len(str(abs(value))) if value.bit_length() < 14_000 else int(value.bit_length() * 0.30103) + 1
        return _Shown(f"<{'-' if value < 0 else ''}integer of {digits} digits>")
    return value


def number_problem(x: int | float) -> str | None:
    """Why a number cannot be one of the catalogue's numbers (float64, finite), or None when it can."""
    if isinstance(x, float):
        return None if math.isfinite(x) else "must be a finite number (NaN and infinity are refused)"
    try:
        float(x)
    except OverflowError:
        return f"is outside the catalogue's number range (float64: magnitude at most {sys.float_info.max:.4g})"
    return None


def text_problem(text: str, path: str) -> str | None:
    """`path=...: rule` when `text` is not valid Unicode (a lone surrogate from a JSON escape), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{path}={text[max(0, exc.start - 10):exc.start + 10]!r}: not valid Unicode text (a lone surrogate)"
    return None


_PLAIN = (str, bool, type(None))
_OTHER_SCALARS = (datetime.date, datetime.time, datetime.timedelta, Decimal)  # Parquet's; stored as they are


def value_problem(value: Any, path: str, depth: int = 0) -> str | None:
    """`path=value: rule` when a stored field value could poison a column or a result, else None: every
    number (nested ones too) finite in float64, every string valid Unicode (no lone surrogate: it cannot be
    embedded or sent), only JSON types (and Parquet's dates, times and decimals), nesting at most
    MAX_VALUE_DEPTH levels."""
    if isinstance(value, str):
        return text_problem(value, path)
    if isinstance(value, _PLAIN):
        return None
    if isinstance(value, (int, float)):
        rule = number_problem(value)
        return None if rule is None else f"{path}={shown(value)!r}: {rule}"
    if isinstance(value, (list, tuple, Mapping)):
        if depth >= MAX_VALUE_DEPTH:
            return f"{path}=...: nested deeper than {MAX_VALUE_DEPTH} levels"
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str):
                    return f"{path}={shown(k)!r}: object keys must be strings"
                bad = text_problem(k, path) or (None if type(v) is str and v.isascii()
                                                else value_problem(v, f"{path}.{k}", depth + 1))
                if bad is not None:
                    return bad
        else:
            for i, v in enumerate(value):
                bad = None if type(v) is str and v.isascii() else value_problem(v, f"{path}[{i}]", depth + 1)
                if bad is not None:
                    return bad
        return None
    if isinstance(value, _OTHER_SCALARS):
        return None
    shown_value = f"<{type(value).__name__} of {len(value)}>" if isinstance(value, (bytes, bytearray)) else \
        f"<{type(value).__name__}>"
    return f"{path}={shown_value}: expected a string, number, boolean, null, list or object"


def row_text(row: Mapping[str, Any]) -> str:
    """The text a row is embedded from: its text fields, in TEXT_FIELDS order."""
    parts = []
    for f in TEXT_FIELDS:
        v = row.get(f)
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        if v not in (None, ""):
            parts.append(str(v))
    return ". ".join(parts) if parts else str(row["id"])


def _csv_value(v: str) -> Any:
    s = v.strip()
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    low = s.lower()
    return {"true": True, "false": False}.get(low, s) if low in ("true", "false") else s


def _raw_rows(path: Path) -> Iterable[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {i}", json.loads(line)
                except ValueError as exc:
                    yield f"line {i}", ValueError(f"line {i}: not valid JSON ({exc.msg})")
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for rec in reader:
                where = f"line {reader.line_num}"
                if None in rec or any(v is None for v in rec.values()):
                    yield where, ValueError(f"{where}: wrong number of columns")
                    continue
                yield where, {k: (v if k in ("id", "category") + VECTOR_FIELDS else _csv_value(v))
                              for k, v in rec.items() if not (v == "" and k not in ("id",))}
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=65536):
            for rec in batch.to_pylist():
                i += 1
                yield f"row {i}", rec
    else:
        raise InvalidInput("catalog", str(path), "unsupported format: expected .jsonl, .csv or .parquet")


def read_catalog(path: Path, *, max_rows: int, max_errors: int = 50
                 ) -> tuple[list[dict[str, Any]], list[list[float] | None], list[str]]:
    """Read a catalogue file -> (rows, vectors (None where absent), error messages). Raises InvalidInput
    when the file has more than `max_rows` rows or no valid row."""
    rows: list[dict[str, Any]] = []
    vecs: list[list[float] | None] = []
    errors: list[str] = []
    n_err = 0
    seen: set[str] = set()
    try:
        for where, raw in _raw_rows(path):
            try:
                if isinstance(raw, Exception):
                    raise raw
                row, vec = clean_row(raw, where)
                if row["id"] in seen:
                    raise ValueError(f"{where}: duplicate id {row['id']!r}")
            except ValueError as exc:
                n_err += 1
                if len(errors) < max_errors:
                    errors.append(str(exc))
                continue
            seen.add(row["id"])
            rows.append(row)
            vecs.append(vec)
            if len(rows) > max_rows:
                raise InvalidInput("catalog", str(path), f"has more than {max_rows} rows (limits.max_catalog_rows)")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("catalog", str(path), f"cannot be read: {exc}") from exc
    except InvalidInput:
        raise
    except Exception as exc:  # pyarrow / csv format errors
        raise InvalidInput("catalog", str(path), f"cannot be parsed: {exc}") from exc
    if n_err > len(errors):
        errors.append(f"... and {n_err - len(errors)} more malformed rows")
    if not rows:
        raise InvalidInput("catalog", str(path), "no valid rows" + (f" ({errors[0]})" if errors else ""))
    with_vec = sum(v is not None for v in vecs)
    if 0 < with_vec < len(rows):
        raise InvalidInput("catalog", str(path), f"{with_vec} of {len(rows)} rows have an embedding: "
                           "either every row or none must have one")
    if with_vec:
        dims = Counter(len(v) for v in vecs if v is not None)
        if len(dims) > 1:
            raise InvalidInput("catalog", str(path), f"embeddings of different lengths: {dict(dims)}")
    return rows, vecs, errors


# -- queries and coalescing --------------------------------------------------
@dataclass
class Query:
    vector: torch.Tensor  # [dim] float, any norm (normalised here)
    k: int
    filters: Mapping[str, Any] | None = None
    category_limit: int | None = None
    exclude_rows: frozenset[int] = frozenset()
    min_score: float | None = None


@dataclass
class Hit:
    id: str
    score: float
    row: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class Cond:
    """One checked filter condition: `field` `op` `value`. eq: a string, number, boolean or None; in: a
    tuple of those; min / max: a float64 bound equivalent, for float64 numbers, to the exact bound given
    (an integer bound is moved to the nearest float64 on its side: `num >= 2**53 + 1` is
    `num >= 2**53 + 2`)."""

    field: str
    op: str
    value: Any


@dataclass
class Request:
    """A query checked and converted before it joins a batch (`Catalog.prepare`): nothing in it can fail
    the batch it joins."""

    query: Query
    vector: torch.Tensor  # [dim] float32, L2-normalised
    conds: tuple[Cond, ...]
    nbytes: int  # upper bound of the memory its search needs


def _scalar(value: Any, argument: str) -> Any:
    if isinstance(value, (Mapping, list, tuple)):
        raise InvalidInput(argument, value, "expected a string, number, boolean or null")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rule = number_problem(value)
        if rule is not None:
            raise InvalidInput(argument, shown(value), rule)
    elif not isinstance(value, _PLAIN):
        raise InvalidInput(argument, f"<{type(value).__name__}>", "expected a string, number, boolean or null")
    return value


def _scalars(values: Any, argument: str) -> tuple[Any, ...]:
    if not isinstance(values, (list, tuple)) or not values or len(values) > MAX_FILTER_VALUES:
        raise InvalidInput(argument, values, f"expected a non-empty list of at most {MAX_FILTER_VALUES} values")
    return tuple(_scalar(v, argument) for v in values)


def _bound(value: Any, argument: str, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(argument, value, "must be a number")
    rule = number_problem(value)
    if rule is not None:
        raise InvalidInput(argument, shown(value), rule)
    f = float(value)
    if isinstance(value, int) and f != value:  # int vs float compares exactly in Python
        if op == "min" and f < value:
            f = math.nextafter(f, math.inf)
        elif op == "max" and f > value:
            f = math.nextafter(f, -math.inf)
    return f


def compile_filters(filters: Any, fields: Mapping[str, Any]) -> tuple[Cond, ...]:
    """Check `filters` (field -> value | list | {eq, in, min, max}) against the known `fields` and convert
    every value -> conditions. InvalidInput names the field, the value and the rule."""
    if filters is None:
        return ()
    if not isinstance(filters, Mapping):
        raise InvalidInput("filters", filters, "expected an object: field -> condition")
    conds: list[Cond] = []
    for name, cond in filters.items():
        if not isinstance(name, str) or name not in fields:
            raise InvalidInput("filters", shown(name), f"unknown field; known fields: {', '.join(sorted(fields))}")
        if isinstance(cond, Mapping):
            bad = [k for k in cond if k not in FILTER_OPS]
            if bad or not cond:
                raise InvalidInput(f"filters.{name}", dict(cond), f"expected a value, a list, or an object "
                                   f"with keys among {FILTER_OPS}")
            if "eq" in cond:
                conds.append(Cond(name, "eq", _scalar(cond["eq"], f"filters.{name}.eq")))
            if "in" in cond:
                conds.append(Cond(name, "in", _scalars(cond["in"], f"filters.{name}.in")))
            for op in ("min", "max"):
                if op in cond:
                    conds.append(Cond(name, op, _bound(cond[op], f"filters.{name}.{op}", op)))
        elif isinstance(cond, (list, tuple)):
            conds.append(Cond(name, "in", _scalars(cond, f"filters.{name}")))
        else:
            conds.append(Cond(name, "eq", _scalar(cond, f"filters.{name}")))
    return tuple(conds)


@dataclass
class _Slot:
    request: Any
    cost: int = 0
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    t: float = 0.0  # when it was queued (time.monotonic)


class Coalescer:
    """Serves concurrent requests in batches on one worker thread.

    `submit` queues a request and blocks until it is served. The worker takes
    everything queued (up to `max_batch`, oldest first) and runs it as one
    batch; requests that arrive meanwhile form the next batch. One thread runs
    every batch because torch and Numba keep an OpenMP team per calling
    thread: batches run from many threads leave idle teams spinning on the
    same cores (measured: a 16-query batch 21 ms from one thread, 31-37 ms
    from rotating pool threads). The worker starts on demand and exits after
    `idle_s` without work.

    Gathering: a batch about to start waits for companions, at most
    `gather_s` after its oldest request was queued, while (a) callers
    announced with `with co.expect(): ...; co.submit(r)` have not submitted
    yet (the tool announces while it builds its query vector), or (b) the
    service is under concurrent load (a batch of more than one ended less than
    `busy_s` ago) and the last request came less than `quiet_s` ago. So
    sixteen calls that arrive together run as one batch, not a batch of one
    followed by fifteen. An idle service runs a lone request at once.
    Deterministic for tests: `pending` and `wait_pending(n)` expose the queue,
    `batches` records each batch's size.

    Isolation: when `run_batch` raises (an Exception) for a batch of several
    requests, each request of it is run again alone, so only a request that
    fails alone fails; callers should still check requests before `submit`.
    Memory: `submit(r, cost=bytes)` with `max_cost()` (bytes, None = no bound):
    a batch takes the oldest requests while their costs add up to at most
    `max_cost()` (always at least one).
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 64,
                 gather_s: float = 0.01, quiet_s: float = 0.001, busy_s: float = 0.05, idle_s: float = 5.0,
                 max_cost: Callable[[], int | None] | None = None) -> None:
        self._run = run_batch
        self._max_cost = max_cost or (lambda: None)
        self.max_batch = max_batch
        self.gather_s, self.quiet_s, self.busy_s, self.idle_s = gather_s, quiet_s, busy_s, idle_s
        self._busy_until = 0.0  # time.monotonic() until which the service counts as under load
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._running = False
        self._worker: threading.Thread | None = None
        self._closing = False
        self._incoming = 0  # announced (expect) and not yet submitted
        self._mine = threading.local()  # this thread's open announcements
        self.batches: list[int] = []

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def wait_pending(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= n, timeout)

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        """Announce that this thread will `submit` soon (see the class docstring)."""
        with self._cond:
            self._incoming += 1
        self._mine.n = getattr(self._mine, "n", 0) + 1
        try:
            yield
        finally:
            if self._mine.n > 0:  # left without submitting (bad input, cancelled): withdraw
                self._mine.n -= 1
                with self._cond:
                    self._incoming -= 1
                    self._cond.notify_all()

    def submit(self, request: Any, cost: int = 0) -> Any:
        slot = _Slot(request, cost=cost, t=time.monotonic())
        announced = getattr(self._mine, "n", 0) > 0
        if announced:
            self._mine.n -= 1
        with self._cond:
            if announced:
                self._incoming -= 1
            self._queue.append(slot)
            self._cond.notify_all()
            while not slot.done:
                if self._worker is None:  # none yet, idled out, or ended by an error: start one
                    self._worker = threading.Thread(target=self._loop, name="atelier-coalescer", daemon=True)
                    self._worker.start()
                self._cond.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def close(self) -> None:
        """Let the worker go now (once the queue is served) instead of after `idle_s`: it holds `run_batch`
        and whatever that refers to (a catalogue). A later `submit` starts a new one."""
        with self._cond:
            if self._worker is not None:
                self._closing = True
                self._cond.notify_all()

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # however it ends, the next submit (or a waiting one) starts a new worker
            with self._cond:
                if self._worker is threading.current_thread():
                    self._worker = None
                self._cond.notify_all()

    def _serve(self) -> None:
        with self._cond:
            while True:
                if not self._queue:
                    if not self._closing:
                        self._cond.wait(self.idle_s)
                    if not self._queue:  # idle or closed
                        self._closing = False
                        return
                    continue
                now = time.monotonic()
                left = self._queue[0].t + self.gather_s - now
                if left > 0 and len(self._queue) < self.max_batch:  # companions on their way may join
                    if self._incoming > 0:
                        self._cond.wait(left)
                        continue
                    quiet = self._queue[-1].t + self.quiet_s - now
                    if now < self._busy_until and quiet > 0:
                        self._cond.wait(min(left, quiet))
                        continue
                take = self._take()
                batch = self._queue[:take]
                del self._queue[:take]
                self._running = True
                self._cond.release()
                try:
                    self._serve_batch(batch)
                finally:
                    self._cond.acquire()
                    for s in batch:
                        s.done = True
                    self.batches.append(len(batch))
                    if len(batch) > 1:
                        self._busy_until = time.monotonic() + self.busy_s
                    self._running = False
                    self._cond.notify_all()


    def _take(self) -> int:
        """How many of the oldest queued requests the next batch takes (max_batch, max_cost)."""
        limit = self._max_cost()
        take, total = 0, 0
        for s in self._queue[:self.max_batch]:
            if take and limit is not None and total + s.cost > limit:
                break
            take += 1
            total += s.cost
        return take

    def _serve_batch(self, batch: list[_Slot]) -> None:
        try:
            results = self._run([s.request for s in batch])
            for s, r in zip(batch, results, strict=True):
                s.result = r
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for s in batch:  # one request failed the batch: serve each alone, so only the guilty one fails
                try:
                    s.result = self._run([s.request])[0]
                except Exception as one:
                    s.error = one
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: every caller of the batch sees it
            for s in batch:
                s.error = exc


# -- the catalogue -----------------------------------------------------------
class Catalog:
    """Rows + a normalised embedding matrix on `device`. Thread-safe (one lock; queries coalesce)."""

    def __init__(self, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, model: str = "", source: str = "",
                 capacity: int = 1024, sketch: bool | None = None,
                 memory_limit: Callable[[], int | None] | None = None) -> None:
        """`sketch`: scan an int8 sketch and rescore in fp32 (CPU fp32 only; None = where available).
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
        self._numeric: dict[str, np.ndarray] = {}
        self._dead = 0
        self.version = 0
        self.memory_limit: Callable[[], int | None] = memory_limit or (lambda: None)
        self._batcher = Coalescer(self._search_batch, max_cost=lambda: self.memory_limit())
        use_sketch = self.device.type == "cpu" and dtype == torch.float32 and sketch is not False
        if sketch and not use_sketch:
            raise ValueError("the int8 sketch needs an fp32 catalogue on the CPU")
        self._sketch = (int8_sketch.Int8Sketch(self.dim, min(self.chunk_rows, SKETCH_BLOCK_ROWS))
                        if use_sketch and int8_sketch.supported() else None)
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
        self._numeric.clear()
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
            for i, (raw, rid) in enumerate(zip(rows, ids)):
                cat = self._category(raw.get("category", ""))
                self._cats[cat] += 1  # first: an unhashable category fails before the row changes
                pos = self._row_of.get(rid)
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
            self._sync_sketch(self._n, self._n)
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
        self._numeric.clear()
        self._alive_t = None
        self.version += 1
        return len(rows)

    def apply(self, rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor | None,
              delete: Iterable[str] = ()) -> tuple[int, int, int]:
        """Upsert `rows` (vectors [n, dim]) and delete the ids in `delete` as one change, under the lock:
        everything is checked before anything changes, so a search sees all of it or none of it.
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
            for rid in ids:
                pos = self._row_of.pop(rid)
                self._cats[self._columns["category"][pos]] -= 1
                self._alive[pos] = False
                for col in self._columns.values():
                    col[pos] = _ABSENT
                self._dead += 1
            self._numeric.clear()
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
        self._numeric.clear()
        self._alive[:n] = True
        self._alive[n:self._n] = False
        self._n, self._dead = n, 0
        self._refresh_views()
        self._sync_sketch()

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
        if isinstance(q.k, bool) or not isinstance(q.k, int) or q.k < 1:
            raise InvalidInput("k", q.k, "must be an integer >= 1")
        if q.category_limit is not None and (isinstance(q.category_limit, bool)
                                             or not isinstance(q.category_limit, int) or q.category_limit < 1):
            raise InvalidInput("category_limit", q.category_limit, "must be an integer >= 1")
        if q.min_score is not None and (isinstance(q.min_score, bool) or not isinstance(q.min_score, (int, float))
                                        or not math.isfinite(q.min_score)):
            raise InvalidInput("min_score", q.min_score, "must be a finite number")
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
            need += 8 * n * len({c.field for c in conds if c.op in ("min", "max") and c.field not in self._numeric})
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

    def _filter_mask(self, conds: Sequence[Cond]) -> np.ndarray:
        """Rows [n] that pass every (checked) condition."""
        n = self._n
        mask = np.ones(n, dtype=bool)
        for c in conds:
            col = self._columns[c.field][:n]
            if c.op == "eq":
                mask &= _equals(col, c.value)
            elif c.op == "in":
                mask &= _member(col, c.value)
            else:
                num = self._numeric_column(c.field)[:n]
                with np.errstate(invalid="ignore"):
                    mask &= (num >= c.value) if c.op == "min" else (num <= c.value)
        return mask

    def _numeric_column(self, name: str) -> np.ndarray:
        """Field `name` as float64 [n]: numbers as they are, anything else NaN (matched by no range)."""
        num = self._numeric.get(name)
        if num is None:
            col = self._columns[name][:self._n]
            try:
                num = np.array([float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else np.nan
                                for x in col], dtype=np.float64)
            except OverflowError:  # stored values are checked (value_problem); an engine caller may not have
                num = np.array([_as_float(x) for x in col], dtype=np.float64)
            self._numeric[name] = num
        return num

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
            mask &= self._filter_mask(req.conds)
        for r in q.exclude_rows:
            if 0 <= r < n:
                mask[r] = False
        return torch.from_numpy(mask).to(self.device), int(mask.sum())

    def _scores(self, qm: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """qm: [B, dim] in the matrix dtype -> scores [B, hi - lo] float32 for rows lo..hi."""
        if self._np is not None:  # CPU fp32: numpy's BLAS is the fastest sgemm/sgemv here
            q_np = qm.numpy()
            s = (self._np[lo:hi] @ q_np[0])[None] if q_np.shape[0] == 1 else q_np @ self._np[lo:hi].T
            return torch.from_numpy(s)
        chunk = self._matrix[lo:hi]
        if qm.shape[0] == 1:
            return (chunk @ qm[0]).float()[None]
        return (qm @ chunk.T).float()

    def _scan_numpy(self, vecs: torch.Tensor, masks: list[torch.Tensor | None], kmax: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU fp32: the same running top-k with NumPy's BLAS product and an O(n) selection per chunk
        (argpartition, then the lower-index tie rule made exact), chunk scores staying in cache."""
        assert self._np is not None
        n = self._n
        q = vecs.numpy().astype(np.float32, copy=False)
        B = q.shape[0]
        np_masks = [None if m is None else m.numpy() for m in masks]
        best_v = np.empty((B, 0), np.float32)
        best_i = np.empty((B, 0), np.int64)
        for lo in range(0, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            chunk = self._np[lo:hi]
            s = (chunk @ q[0])[None] if B == 1 else q @ chunk.T  # [B, c] float32
            for b, m in enumerate(np_masks):
                if m is not None:
                    s[b][~m[lo:hi]] = -np.inf
            kk = min(kmax, hi - lo)
            vals = np.empty((B, kk), np.float32)
            rows = np.empty((B, kk), np.int64)
            for b in range(B):
                sb = s[b]
                if kk < sb.shape[0]:
                    part = np.argpartition(sb, sb.shape[0] - kk)[sb.shape[0] - kk:]
                    t = sb[part].min()
                    above = np.flatnonzero(sb > t)
                    ties = np.flatnonzero(sb == t)[: kk - above.shape[0]]
                    cand = np.concatenate([above, ties])
                else:
                    cand = np.arange(sb.shape[0])
                order = np.lexsort((cand, -sb[cand]))  # score descending, then index ascending
                rows[b] = cand[order] + lo
                vals[b] = sb[cand[order]]
            if best_v.shape[1]:
                allv = np.concatenate([best_v, vals], 1)
                alli = np.concatenate([best_i, rows], 1)
                keep = min(kmax, allv.shape[1])
                nv = np.empty((B, keep), np.float32)
                ni = np.empty((B, keep), np.int64)
                for b in range(B):
                    order = np.lexsort((alli[b], -allv[b]))[:keep]
                    nv[b], ni[b] = allv[b][order], alli[b][order]
                best_v, best_i = nv, ni
            else:
                best_v, best_i = vals, rows
        return torch.from_numpy(best_v), torch.from_numpy(best_i)

    def _scan(self, vecs: torch.Tensor, masks: list[torch.Tensor | None], kmax: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-`kmax` over all chunks. vecs: [B, dim] float32 normalised -> (values [B, kmax'],
        rows [B, kmax']) with kmax' = min(kmax, n); masked rows score -inf."""
        if self._sketch is not None and kernel_backend_env() != "triton":
            vals, rows = int8_sketch.exact_topk(self._sketch, self._np, vecs.numpy().astype(np.float32, copy=False),
                                                [None if m is None else m.numpy() for m in masks], kmax)
            return torch.from_numpy(vals), torch.from_numpy(rows)
        if self._np is not None and kernel_backend_env() != "triton":
            return self._scan_numpy(vecs, masks, kmax)
        if self.device.type == "cpu" and self.dtype == torch.float16 and kernel_backend_env() != "triton":
            vals, rows = int8_sketch.half_exact_topk(
                self._matrix[:self._n].numpy(), vecs.numpy().astype(np.float32, copy=False),
                [None if m is None else m.numpy() for m in masks], kmax, self.chunk_rows)
            return torch.from_numpy(vals), torch.from_numpy(rows)
        n = self._n
        qm = vecs.to(self.device, self.dtype)
        best_v: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for lo in range(0, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            s = self._scores(qm, lo, hi)  # [B, c] float32
            if any(m is not None for m in masks):
                s = s.clone() if self._np is not None else s
                for b, m in enumerate(masks):
                    if m is not None:
                        s[b].masked_fill_(~m[lo:hi], float("-inf"))
            v, i = topk(s, min(kmax, hi - lo))
            i = i + lo
            if best_v is not None:
                assert best_i is not None
                v, j = topk(torch.cat([best_v, v], dim=1), min(kmax, best_v.shape[1] + v.shape[1]))
                i = torch.gather(torch.cat([best_i, i], dim=1), 1, j)
            best_v, best_i = v, i
        assert best_v is not None and best_i is not None
        return best_v.cpu(), best_i.cpu()

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
                    "categories": self.categories(), "fields": self.fields()}


def _as_float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    try:
        return float(x)
    except OverflowError:
        return math.copysign(math.inf, x)


def _equals(col: np.ndarray, value: Any) -> np.ndarray:
    """Rows equal to a checked scalar (`_scalar`): a bool only to the same bool, a str only to a str."""
    if isinstance(value, bool):
        return np.fromiter((x is value for x in col), dtype=bool, count=len(col))
    if type(value) is str:  # only a str equals a str: one C loop (a 0-d object operand keeps the str exact)
        return np.asarray(col == np.array(value, dtype=object), dtype=bool)
    return np.fromiter((x == value and not isinstance(x, bool) for x in col), dtype=bool, count=len(col))


def _member(col: np.ndarray, values: Sequence[Any]) -> np.ndarray:
    mask = np.zeros(len(col), dtype=bool)
    for v in values:
        mask |= _equals(col, v)
    return mask


# -- the per-engine service: catalogues by source, with an embedding cache ------
_TMP_PREFIX = ".atelier-tmp-emb-"


def kernel_backend_env() -> str:
    """`ATELIER_KERNEL_BACKEND`: `triton` forces the kernel path (tests of the Triton top-k)."""
    return os.environ.get("ATELIER_KERNEL_BACKEND", "auto")


def sweep_temp_files(folder: Path) -> int:
    """Remove embedding-cache temp files a crash left in `folder` (ours only, by prefix)."""
    n = 0
    try:
        for p in folder.glob(f"{_TMP_PREFIX}*"):
            if p.is_file() and not p.is_symlink():
                p.unlink()
                n += 1
    except OSError:
        pass
    return n


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write the cache file whole or not at all: temp file in the same folder, fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def content_hash(model: str, rows: Sequence[Mapping[str, Any]]) -> str:
    h = hashlib.sha256(model.encode())
    for row in rows:
        h.update(b"\x1e" + str(row["id"]).encode() + b"\x1f" + row_text(row).encode())
    return h.hexdigest()[:20]


@dataclass
class LoadReport:
    source: str
    rows: int
    errors: list[str] = field(default_factory=list)
    embedded: int = 0  # rows embedded now (0 when the cache or the file had them)
    cache_file: str | None = None


class CatalogService:
    """The engine's catalogues, keyed by (source, model, dtype). Get it with `engine.service("catalog", CatalogService)`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._catalogs: dict[tuple[str, str, str], tuple[Catalog, LoadReport]] = {}
        self.chunk_rows = DEFAULT_CHUNK_ROWS
        self.max_call_memory_mb = 0  # the per-call memory limit (0: from the engine budget; see memory_limit)

    def embedder(self, model: str) -> Any:
        from .embed import get_embedder

        return get_embedder(self.engine, model)

    def cache_path(self, source: Path | None, model_id: str, digest: str) -> Path:
        name = f"{source.name if source else 'demo_catalog.jsonl'}.{model_id}.{digest}.emb.npy"
        if source is not None and os.access(source.parent, os.W_OK):
            return source.parent / f".{name}"
        return Path(self.engine.config.cache_dir) / "catalog-embeddings" / name

    def open(self, source: Path | None, *, model: str = "", dtype: str = "float32", max_rows: int = 2_000_000,
             token: Any = None, progress: Callable[[int, int], None] | None = None) -> tuple[Catalog, LoadReport]:
        """The catalogue of `source` (None = the bundled demo), loading and embedding it on first use."""
        path = source.resolve() if source is not None else DEMO_CATALOG  # resolved once, at import
        key = (str(path), model, dtype)
        with self._lock:
            hit = self._catalogs.get(key)
            if hit is not None:
                return hit
            cat, report = self._load(path, source is None, model, dtype, max_rows, token, progress)
            self._catalogs[key] = (cat, report)
            return cat, report

    def _load(self, path: Path, is_demo: bool, model: str, dtype: str, max_rows: int, token: Any,
              progress: Callable[[int, int], None] | None) -> tuple[Catalog, LoadReport]:
        rows, vecs, errors = read_catalog(path, max_rows=max_rows)
        report = LoadReport(source="demo" if is_demo else str(path), rows=len(rows), errors=errors)
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        emb = self.embedder(model) if vecs[0] is None else None
        texts = [row_text(r) for r in rows] if emb is not None else []
        dim = emb.dim if emb is not None else len(vecs[0] or ())
        n, el = len(rows), torch_dtype.itemsize
        ncols = len({k for r in rows for k in r}) + 1
        # the vectors (fp32 twice: parsed and converted), the matrix, its sketch, the columns, the id index,
        # and the embedding's output and one batch's activations
        need = n * dim * (8 + el) + n * (dim + 9) + 8 * n * ncols + 200 * n
        need += emb.estimate_bytes(texts) if emb is not None else 0
        workmem.require("catalog", report.source, need, self.memory_limit(), f"loading {n} rows of {dim} dims")
        if emb is None:
            matrix = torch.tensor(np.asarray(vecs, dtype=np.float32))
            model_id = "provided"
        else:
            model_id = emb.name
            digest = content_hash(model_id, rows)
            cache = self.cache_path(None if is_demo else path, model_id, digest)
            report.cache_file = str(cache)
            sweep_temp_files(cache.parent)
            matrix = None
            if cache.is_file():
                try:
                    arr = np.load(cache, allow_pickle=False)
                    if arr.shape == (len(rows), emb.dim):
                        matrix = torch.from_numpy(arr)
                except (OSError, ValueError):
                    matrix = None
            if matrix is None:
                matrix = emb.encode(texts, token=token, progress=progress)
                report.embedded = len(rows)
                try:
                    _atomic_save(cache, matrix.numpy())
                except OSError:
                    fallback = self.cache_path(None, model_id, digest)
                    if fallback != cache:
                        _atomic_save(fallback, matrix.numpy())
                        report.cache_file = str(fallback)
        cat = Catalog(matrix.shape[1], device=self.engine.device, dtype=torch_dtype, chunk_rows=self.chunk_rows,
                      model=model_id, source=report.source, capacity=max(1024, len(rows)),
                      memory_limit=self.memory_limit)
        cat.upsert(rows, matrix)
        return cat, report

    def memory_limit(self) -> int | None:
        """Bytes one search or upsert may need, read at each call: `workmem.call_limit` (the configured
        per-call limit `max_call_memory_mb` when > 0, else the engine's memory budget less its models)."""
        return workmem.call_limit(self.engine, self.max_call_memory_mb)

    def _embedder_for(self, catalog: Catalog, model: str, texts: Sequence[str], argument: str) -> Any:
        emb = self.embedder(model)
        if emb.dim != catalog.dim:
            raise InvalidInput(argument, texts[0] if texts else "", f"the catalogue holds {catalog.dim}-d vectors "
                               f"but the embedding model gives {emb.dim}-d: query by vector or item_id instead")
        return emb

    def embed_texts(self, catalog: Catalog, model: str, texts: Sequence[str], argument: str,
                    token: Any = None) -> torch.Tensor:
        """Embed texts with the catalogue's model -> [n, dim] float32. A catalogue whose vectors came with
        the file can only take text when the configured model has the same dimension. Refused before any
        work when the embedding's upper bound of memory exceeds `memory_limit()`."""
        emb = self._embedder_for(catalog, model, texts, argument)
        workmem.require(argument, texts[0][:40] if len(texts) == 1 else f"<{len(texts)} texts>",
                        emb.estimate_bytes(texts), self.memory_limit(), "embedding it")
        return emb.encode(list(texts), token=token)

    def upsert(self, catalog: Catalog, rows: Sequence[Mapping[str, Any]], vectors: Sequence[torch.Tensor | None],
               delete: Sequence[str] = (), *, model: str = "", token: Any = None,
               progress: Callable[[int, int], None] | None = None) -> tuple[int, int, int]:
        """Add or update `rows` (checked by `clean_row`; vectors[i] [dim], or None to embed the row's text)
        and delete ids, all or nothing -> (added, updated, deleted).

        Order: the memory bound (embedding + commit) is checked against `memory_limit()` before any work;
        missing vectors are embedded in chunks, `token.check()` before each; the token is checked once
        more; then one `Catalog.apply` commits under the catalogue's lock. A cancel (or any error) before
        that step leaves the catalogue as it was; nothing can cancel the step itself."""
        need_text = [i for i, v in enumerate(vectors) if v is None]
        texts = [row_text(rows[i]) for i in need_text]
        emb = self._embedder_for(catalog, model, texts, "items") if texts else None
        n_new = len({str(r["id"]) for r in rows} - set(catalog._row_of))
        new_fields = len({k for r in rows for k in r} - set(catalog._columns))
        need = catalog.upsert_bytes(len(rows), n_new, new_fields) + (emb.estimate_bytes(texts) if emb else 0)
        workmem.require("items", f"<{len(rows)} items>", need, self.memory_limit(),
                        f"embedding {len(texts)} and storing {len(rows)} items of {catalog.dim} dims: send fewer "
                        "items per call")
        full = list(vectors)
        if emb is not None:
            out = emb.encode(texts, token=token, progress=progress)  # token.check() before every chunk
            for j, i in enumerate(need_text):
                full[i] = out[j]
        if token is not None:
            token.check()  # the last moment a cancel can stop the change
        stacked = torch.stack([v.float() for v in full if v is not None]) if rows else None
        del full
        try:
            return catalog.apply(rows, stacked, delete)
        finally:
            del stacked
            workmem.release(need)  # hand freed heap pages back to the OS after a large update

    def close(self) -> None:
        """Engine shutdown: release every catalogue's query worker."""
        with self._lock:
            for cat, _ in self._catalogs.values():
                cat.close()

    def catalogs(self) -> list[tuple[Catalog, LoadReport]]:
        with self._lock:
            return list(self._catalogs.values())
