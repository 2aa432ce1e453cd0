"""Filters: `compile_filters` turns a client's `filters` object into checked conditions (`Cond`), and
`filter_mask` evaluates them over the catalogue's columns.

Every value is checked when compiled (InvalidInput: `filters.<field>=value: rule`), range bounds become exact
float64 bounds, so evaluating a compiled condition cannot fail. Equality is type-exact (a bool equals only a
bool, a str only a str); a row without the field (`_ABSENT`) matches nothing; a non-number is NaN to a range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInput
from .rows import _PLAIN, number_problem, shown

FILTER_OPS = ("eq", "ne", "in", "not_in", "min", "max")
MAX_FILTER_VALUES = 256


@dataclass(frozen=True)
class Cond:
    """One checked filter condition: `field` `op` `value`. eq / ne: a string, number, boolean or None; in /
    not_in: a tuple of those (ne and not_in are the exclusions: a row without the field passes them); min / max: a float64 bound equivalent, for float64 numbers, to the exact bound given
    (an integer bound is moved to the nearest float64 on its side: `num >= 2**53 + 1` is
    `num >= 2**53 + 2`)."""

    field: str
    op: str
    value: Any



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
    """Check `filters` (field -> value | list | {eq, ne, in, not_in, min, max}) against the known `fields` and convert
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
            if "ne" in cond:
                conds.append(Cond(name, "ne", _scalar(cond["ne"], f"filters.{name}.ne")))
            if "in" in cond:
                conds.append(Cond(name, "in", _scalars(cond["in"], f"filters.{name}.in")))
            if "not_in" in cond:
                conds.append(Cond(name, "not_in", _scalars(cond["not_in"], f"filters.{name}.not_in")))
            for op in ("min", "max"):
                if op in cond:
                    conds.append(Cond(name, op, _bound(cond[op], f"filters.{name}.{op}", op)))
        elif isinstance(cond, (list, tuple)):
            conds.append(Cond(name, "in", _scalars(cond, f"filters.{name}")))
        else:
            conds.append(Cond(name, "eq", _scalar(cond, f"filters.{name}")))
    return tuple(conds)


class TypedColumns:
    """Typed views of a catalogue's object columns, built on first use and kept current where rows change
    (`touch`): per field, float64 numbers (range filters; anything else NaN) and int32 codes of its values
    (equality and membership: one vectorised comparison instead of a Python pass over every row).

    Codes keep equality type-exact (a bool equals only a bool, a str only a str, a number any equal
    number, None only None): strings, numbers and None share one table keyed by the value itself
    (1 and 1.0 share a code, as they are equal; a str never equals a number), booleans have their own (True
    is not 1 here); a row without the field, a NaN and any other value get -1 (equal to nothing). Arrays
    have the columns' length (the capacity); the owner calls `touch(columns, positions)` after writing
    rows, `clear()` after reallocating or reordering the columns."""

    def __init__(self) -> None:
        self.numbers: dict[str, np.ndarray] = {}
        self.codes: dict[str, tuple[np.ndarray, _Codes]] = {}

    def clear(self) -> None:
        self.numbers.clear()
        self.codes.clear()

    def nbytes_missing(self, conds: Sequence[Cond], n: int) -> int:
        """Bytes the views these conditions need and are not built yet would take for n rows: 8 per row for
        numbers; for codes 4 per row plus a table entry (~64 bytes) per distinct value, at most one per row."""
        ranged = {c.field for c in conds if c.op in ("min", "max")} - set(self.numbers)
        coded = {c.field for c in conds if c.op not in ("min", "max")} - set(self.codes)
        return 8 * n * len(ranged) + 68 * n * len(coded)

    def touch(self, columns: Mapping[str, np.ndarray], positions: np.ndarray | slice) -> None:
        """Rows at `positions` changed: their entries in every built view are recomputed."""
        for name, num in self.numbers.items():
            num[positions] = [_as_float(x) for x in np.atleast_1d(columns[name][positions])]
        for name, (codes, table) in self.codes.items():
            codes[positions] = [table.code(x) for x in np.atleast_1d(columns[name][positions])]

    def number_view(self, columns: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        num = self.numbers.get(name)
        if num is None:
            num = self.numbers[name] = numbers_of(columns[name])
        return num

    def code_view(self, columns: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, _Codes]:
        got = self.codes.get(name)
        if got is None:
            table = _Codes()
            col = columns[name]
            got = self.codes[name] = (np.fromiter(map(table.code, col), dtype=np.int32, count=len(col)), table)
        return got


class _Codes:
    """Value -> code for one field (see `TypedColumns`); codes are never reused while the view lives."""

    __slots__ = ("plain", "bools")

    def __init__(self) -> None:
        self.plain: dict[Any, int] = {}  # str, int, float (not NaN), None
        self.bools: dict[bool, int] = {}

    def _table(self, x: Any) -> dict[Any, int] | None:
        if isinstance(x, bool):
            return self.bools
        if type(x) is str or x is None or (isinstance(x, (int, float)) and x == x):
            return self.plain
        return None  # a row without the field, a NaN, a value no filter can equal (a list)

    def code(self, x: Any) -> int:
        t = self._table(x)
        if t is None:
            return -1
        c = t.get(x)
        if c is None:
            c = t[x] = len(self.plain) + len(self.bools)
        return c

    def lookup(self, x: Any) -> int:
        """The code of a filter value; -2 (no row) when no row holds it."""
        t = self._table(x)
        return -2 if t is None else t.get(x, -2)


def filter_mask(columns: Mapping[str, np.ndarray], typed: TypedColumns | None, n: int,
                conds: Sequence[Cond]) -> np.ndarray:
    """Rows [n] that pass every (checked) condition. `typed`: the columns' cached typed views (None: built
    for this call only, e.g. over a few returned rows)."""
    typed = TypedColumns() if typed is None else typed
    mask = np.ones(n, dtype=bool)
    for c in conds:
        if c.op in ("min", "max"):
            num = typed.number_view(columns, c.field)[:n]
            with np.errstate(invalid="ignore"):
                mask &= (num >= c.value) if c.op == "min" else (num <= c.value)
            continue
        codes, table = typed.code_view(columns, c.field)
        wanted = [table.lookup(v) for v in ((c.value,) if c.op in ("eq", "ne") else c.value)]
        hit = codes[:n] == wanted[0] if len(wanted) == 1 else np.isin(codes[:n], wanted)
        mask &= hit if c.op in ("eq", "in") else ~hit
    return mask


def numbers_of(col: np.ndarray) -> np.ndarray:
    """A column as float64: numbers as they are, anything else NaN (matched by no range)."""
    return np.fromiter(map(_as_float, col), dtype=np.float64, count=len(col))


def _as_float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    try:
        return float(x)
    except OverflowError:
        return math.copysign(math.inf, x)
