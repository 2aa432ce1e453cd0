"""Filters: `compile_filters` turns a client's `filters` object into checked conditions (`Cond`), and
`filter_mask` evaluates them over the catalogue's columns.

Every value is checked when compiled (InvalidInput: `filters.<field>=value: rule`), range bounds become exact
float64 bounds, so evaluating a compiled condition cannot fail. Equality is type-exact (a bool equals only a
bool, a str only a str); a row without the field (`_ABSENT`) matches nothing; a non-number is NaN to a range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
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


def filter_mask(columns: Mapping[str, np.ndarray], numeric: MutableMapping[str, np.ndarray], n: int,
                conds: Sequence[Cond]) -> np.ndarray:
    """Rows [n] that pass every (checked) condition. `numeric` caches float64 copies of range-filtered
    columns (the caller clears it when rows change)."""
    mask = np.ones(n, dtype=bool)
    for c in conds:
        col = columns[c.field][:n]
        if c.op == "eq":
            mask &= _equals(col, c.value)
        elif c.op == "ne":
            mask &= ~_equals(col, c.value)
        elif c.op == "in":
            mask &= _member(col, c.value)
        elif c.op == "not_in":
            mask &= ~_member(col, c.value)
        else:
            num = numeric_column(columns, numeric, n, c.field)[:n]
            with np.errstate(invalid="ignore"):
                mask &= (num >= c.value) if c.op == "min" else (num <= c.value)
    return mask


def numeric_column(columns: Mapping[str, np.ndarray], numeric: MutableMapping[str, np.ndarray], n: int,
                   name: str) -> np.ndarray:
    """Field `name` as float64 [n]: numbers as they are, anything else NaN (matched by no range)."""
    num = numeric.get(name)
    if num is None:
        col = columns[name][:n]
        try:
            num = np.array([float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else np.nan
                            for x in col], dtype=np.float64)
        except OverflowError:  # stored values are checked (value_problem); an engine caller may not have
            num = np.array([_as_float(x) for x in col], dtype=np.float64)
        numeric[name] = num
    return num


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

