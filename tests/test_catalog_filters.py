"""Filters over the catalogue's columns (`engine.catalog.filters`) and the scan of a selective filter's rows
alone (`engine.sketch.gathered_topk`, `atelier_kernels.cpu_topk.gather_scores`).

Oracles: a plain-Python evaluation of the filter rules written here (type-exact equality, ranges over
numbers only), and NumPy brute force in float64 for the ranked answers (score descending, lower row first
on ties). The typed views (`TypedColumns`: value codes and float64 numbers) are cached and kept current as
rows change, so every check runs after bulk loads, updates, mixed upserts, deletes, growth and compaction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from engine.catalog import Catalog, Query
from engine.catalog import scan as scan_mod
from engine.catalog.ann import HnswIndex
from engine.catalog.filters import TypedColumns, compile_filters, filter_mask
from engine.catalog.rows import _ABSENT

STORED = [0, 1, 1.0, 2, 2.5, -0.0, True, False, "1", "a", "", None, [1], 2**60, 2**60 + 1, float(2**60),
          math.nan, _ABSENT]
ASKED = [0, 1, 1.0, 2, 2.5, True, False, "1", "a", "", None, 2**60, 2**60 + 1, 7, "zz"]


def _eq(x: Any, v: Any) -> bool:
    """The rule, written out: a bool equals only a bool, a str only a str, None only None, a number any
    equal number; a missing field, a NaN and any other value equal nothing."""
    if x is _ABSENT:
        return False
    if isinstance(x, bool) or isinstance(v, bool):
        return isinstance(x, bool) and isinstance(v, bool) and x == v
    if isinstance(x, str) or isinstance(v, str):
        return isinstance(x, str) and isinstance(v, str) and x == v
    if x is None or v is None:
        return x is None and v is None
    if isinstance(x, (int, float)) and isinstance(v, (int, float)):
        return x == v
    return False


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
        return None
    return float(x)


def _passes(x: Any, c: Any) -> bool:
    if c.op == "eq":
        return _eq(x, c.value)
    if c.op == "ne":
        return not _eq(x, c.value)
    if c.op == "in":
        return any(_eq(x, v) for v in c.value)
    if c.op == "not_in":
        return not any(_eq(x, v) for v in c.value)
    f = _number(x)
    return f is not None and (f >= c.value if c.op == "min" else f <= c.value)


def _random_filter(rng: np.random.Generator) -> dict:
    op = rng.choice(["eq", "ne", "in", "not_in", "min", "max", "plain", "list"])
    pick = lambda: ASKED[rng.integers(len(ASKED))]  # noqa: E731
    if op == "plain":
        return {"f": pick()}
    if op == "list":
        return {"f": [pick() for _ in range(rng.integers(1, 4))]}
    if op in ("in", "not_in"):
        return {"f": {op: [pick() for _ in range(rng.integers(1, 4))]}}
    if op in ("min", "max"):
        return {"f": {op: [0, 1, 2.5, -1, 2**60][rng.integers(5)]}}
    return {"f": {op: pick()}}


def test_filter_mask_equals_the_rules_while_rows_change() -> None:
    rng = np.random.default_rng(0)
    cap = 64
    col = np.empty(cap, dtype=object)
    for i, j in enumerate(rng.integers(0, len(STORED), cap)):
        col[i] = STORED[j]  # one by one: a list value stays one object
    columns = {"f": col}
    typed = TypedColumns()
    for step in range(200):
        conds = compile_filters(_random_filter(rng), {"f": 1})
        n = int(rng.integers(0, cap + 1))
        got = filter_mask(columns, typed, n, conds)
        want = np.array([all(_passes(col[i], c) for c in conds) for i in range(n)], dtype=bool)
        assert got.tolist() == want.tolist(), (step, conds)
        assert filter_mask(columns, None, n, conds).tolist() == want.tolist()  # built for the call only
        pos = rng.choice(cap, size=int(rng.integers(1, 6)), replace=False)  # rows change: the views follow
        for p in pos:
            col[p] = STORED[rng.integers(len(STORED))]
        typed.touch(columns, pos if step % 2 else slice(int(pos.min()), int(pos.max()) + 1))


def _oracle_ids(rows: dict[str, dict], vecs: dict[str, np.ndarray], q: np.ndarray, conds: Any, k: int
                ) -> list[str]:
    ids = [i for i, r in rows.items() if all(_passes(r.get("f", _ABSENT), c) for c in conds)]
    if not ids:
        return []
    m = np.stack([vecs[i] for i in ids]).astype(np.float64)
    s = m @ (q / np.linalg.norm(q)).astype(np.float64)
    return [ids[j] for j in sorted(range(len(ids)), key=lambda j: -s[j])[:k]]


def test_catalogue_filters_follow_updates_deletes_growth_and_compaction() -> None:
    """Before the typed views, an update left a range filter on the old value, and an upsert mixing an
    update with a new id crashed the next range filter (a cached column one row short)."""
    rng = np.random.default_rng(1)
    dim = 8
    cat = Catalog(dim, capacity=4)
    rows: dict[str, dict] = {}
    vecs: dict[str, np.ndarray] = {}
    values = [v for v in STORED if v is not _ABSENT and not (isinstance(v, float) and v != v) and v != [1]]

    def upsert(ids: list[str]) -> None:
        batch = []
        for i in ids:
            r = {"id": i}
            if rng.random() < 0.85:
                r["f"] = values[rng.integers(len(values))]
            batch.append(r)
            rows[i] = r
            vecs[i] = rng.standard_normal(dim).astype(np.float32)
            vecs[i] /= np.linalg.norm(vecs[i])
        cat.upsert(batch, torch.from_numpy(np.stack([vecs[i] for i in ids])))

    def check() -> None:
        for _ in range(12):
            conds_raw = _random_filter(rng)
            q = rng.standard_normal(dim).astype(np.float32)
            got = [h.id for h in cat.search_many([Query(vector=torch.from_numpy(q), k=len(rows) + 1,
                                                        filters=conds_raw)])[0]]
            conds = compile_filters(conds_raw, {"f": 1})
            assert set(got) == set(_oracle_ids(rows, vecs, q, conds, len(rows) + 1)), conds_raw

    upsert([f"a{i}" for i in range(40)])  # bulk append (grows the capacity)
    check()
    upsert([f"a{i}" for i in range(0, 40, 3)])  # updates only
    check()
    upsert(["a1", "b0", "a2", "b1"])  # updates mixed with new ids
    check()
    for i in [f"a{i}" for i in range(0, 40, 4)]:
        rows.pop(i), vecs.pop(i)
    cat.delete([f"a{i}" for i in range(0, 40, 4)])
    check()
    upsert([f"c{i}" for i in range(60)])  # grows again
    check()
    cat._compact()  # rows move: the views are rebuilt
    check()


def _scored(mat: np.ndarray, q: np.ndarray, ok: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    s = mat.astype(np.float64) @ q.astype(np.float64)
    order = [int(r) for r in np.lexsort((np.arange(len(s)), -s)) if ok[r]][:k]
    return order, [float(s[r]) for r in order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_selective_filter_scans_its_rows_alone_with_the_same_answer(dtype: torch.dtype, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    n, dim = 6000, 48
    mat = rng.standard_normal((n, dim)).astype(np.float32)
    mat[100:110] = mat[50]  # equal rows: ties go to the lower row
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    dept = rng.integers(0, 100, n)
    dept[100:110] = dept[50] = 7
    cat = Catalog(dim, capacity=n, dtype=dtype)
    cat.upsert([{"id": f"i{i}", "dept": int(dept[i])} for i in range(n)], torch.from_numpy(mat))
    stored = cat._matrix[:n].float().numpy()  # the rows as stored (fp16: rounded)
    assert cat.scan_path in scan_mod.GATHER_FRACTION
    for keep, k in [(1, 5), (7, 10), (20, 3), (60, 10), (100, 4), (1, 500)]:
        filters = {"dept": {"in": list(range(keep))}} if keep > 1 else {"dept": 7}
        ok = np.isin(dept, list(range(keep))) if keep > 1 else dept == 7
        q = mat[50] + 0.3 * rng.standard_normal(dim).astype(np.float32)
        q /= np.linalg.norm(q)
        want_rows, want_scores = _scored(stored, q, ok, k)
        answers = []
        for share in (0.0, 1.0):  # every row scanned and masked / the filter's rows alone
            monkeypatch.setitem(scan_mod.GATHER_FRACTION, cat.scan_path, share)
            hits = cat.search_many([Query(vector=torch.from_numpy(q), k=k, filters=filters)])[0]
            assert [h.row for h in hits] == want_rows, (keep, k, share)
            np.testing.assert_allclose([h.score for h in hits], want_scores, rtol=0, atol=1e-6)
            answers.append([(h.id, h.score) for h in hits])
        assert answers[0] == answers[1]  # the same float64 scores, not just the same order


def test_an_unrelated_filter_on_the_graph_gets_the_exact_answer() -> None:
    """A filter that keeps 10 % of the rows and none of the query's own cluster: the graph's nearest
    candidates hold few valid items, so the plan answers it from the filter's rows alone (exactly)."""
    rng = np.random.default_rng(3)
    n, dim, clusters = 20_000, 32, 100
    centres = rng.standard_normal((clusters, dim))
    lab = rng.integers(0, clusters, n)
    x = centres[lab] + rng.standard_normal((n, dim)) * 0.3
    mat = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cat = Catalog(dim, capacity=n)
    cat.upsert([{"id": f"i{i}", "dept": int(lab[i] % 10)} for i in range(n)], torch.from_numpy(mat))
    cat.build_index(HnswIndex(dim, M=8, ef_construction=40, threads=1))
    for c in range(5):
        q = centres[c * 10 + 1] / np.linalg.norm(centres[c * 10 + 1])  # its cluster has dept 1
        got = [h.row for h in cat.search_many([Query(vector=torch.from_numpy(q.astype(np.float32)), k=10,
                                                     filters={"dept": 3})])[0]]
        assert got == _scored(mat, q, lab % 10 == 3, 10)[0]
