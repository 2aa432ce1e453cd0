"""Rows: checking one raw row (`clean_row`, every stored value `value_problem`-free), the text a row is
embedded from, and reading a catalogue file (JSONL, CSV, Parquet) into checked rows and vectors.

Knows field values and files; knows nothing of matrices, queries or devices. Malformed rows are reported
with their line (row) number and skipped; a file with more than `max_rows` rows, no valid row, or a mix of
rows with and without embeddings is refused (InvalidInput naming `catalog`).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInput

DEMO_CATALOG = Path(__file__).resolve().parent.parent / "data" / "demo_catalog.jsonl"
TEXT_FIELDS = ("name", "title", "brand", "category", "description", "text", "tags")
VECTOR_FIELDS = ("embedding", "vector")
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

