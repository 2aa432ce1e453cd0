"""What a search asks and answers: `Query` (the caller's), `Request` (a query checked and converted before
it joins a batch), `Hit` (one returned row). Plain data, plus the check of a query's scalar arguments that
every backend (local, Qdrant) runs first."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInput
from .filters import Cond

@dataclass
class Query:
    vector: torch.Tensor  # [dim] float, any norm (normalised here)
    k: int
    filters: Mapping[str, Any] | None = None
    category_limit: int | None = None
    exclude_rows: frozenset[int] = frozenset()
    min_score: float | None = None

    def check_scalars(self) -> None:
        """k, category_limit and min_score; InvalidInput names the argument, the value and the rule."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidInput("k", self.k, "must be an integer >= 1")
        lim = self.category_limit
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
            raise InvalidInput("category_limit", lim, "must be an integer >= 1")
        ms = self.min_score
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms)):
            raise InvalidInput("min_score", ms, "must be a finite number")


@dataclass
class Hit:
    id: str
    score: float
    row: int
    fields: dict[str, Any]



@dataclass
class Request:
    """A query checked and converted before it joins a batch (`Catalog.prepare`): nothing in it can fail
    the batch it joins."""

    query: Query
    vector: torch.Tensor  # [dim] float32, L2-normalised
    conds: tuple[Cond, ...]
    nbytes: int  # upper bound of the memory its search needs

