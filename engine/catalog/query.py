"""What a search asks and answers: `Query` (the caller's), `Request` (a query checked and converted before
it joins a batch), `Hit` (one returned row). Plain data; no behaviour."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .filters import Cond

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



@dataclass
class Request:
    """A query checked and converted before it joins a batch (`Catalog.prepare`): nothing in it can fail
    the batch it joins."""

    query: Query
    vector: torch.Tensor  # [dim] float32, L2-normalised
    conds: tuple[Cond, ...]
    nbytes: int  # upper bound of the memory its search needs

