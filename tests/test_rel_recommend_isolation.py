"""Issue 17 item 1: one client's bad input never reaches another client's search.

Regression tests for the probe's findings (each failed on the code before the fix):
- a filter bound that cannot become the catalogue's number type (a 400-digit integer, NaN, inf) sent
  by 6 threads while 6 others send plain queries: the plain queries failed with the batch's
  OverflowError; now the bad ones are refused before they join a batch, naming the field;
- `catalog_upsert` stored a `price` of a 400-digit integer, after which `{"price": {"max": 30}}` failed
  for everyone; now the item is refused and nothing is stored.
Plus: an error inside a coalesced batch fails only the guilty request (the others are re-run singly),
and a property test: valid and invalid requests interleaved from many threads, every valid one gets
exactly the answer it gets alone (checked against a NumPy brute force as well), every invalid one
a clear error naming its argument.

Expected orders come from NumPy (float64 scores, np.lexsort); catalogues use one-hot rows so every
score is one exact product and ties are exact.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidInput
from engine.catalog import Catalog, CatalogService, Coalescer, Query, read_catalog

from tools.recommend import TOOLS, RecommendInput, UpsertInput
from tests.helpers import REFUSED

from fakectx import make_context

recommend, upsert, info = TOOLS
HUGE = 10 ** 400
CATS = ["a", "b", "c"]


def one_hot(n: int, d: int, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    mat = np.zeros((n, d))
    mat[np.arange(n), rng.integers(0, d, n)] = rng.choice([-1.0, 1.0], n) * rng.integers(1, 5, n)
    rows = [{"id": f"i{i}", "category": CATS[i % 3], "price": int(rng.integers(0, 60)),
             "rating": float(rng.integers(0, 10)) / 2, "in_stock": bool(rng.integers(0, 2))} for i in range(n)]
    return mat, rows


def oracle(mat: np.ndarray, rows: list[dict], q: np.ndarray, k: int, ok: Any = None,
           category_limit: int | None = None) -> list[str]:
    m = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    s = m @ (q / np.linalg.norm(q))
    out: list[str] = []
    per: dict[str, int] = {}
    for r in np.lexsort((np.arange(len(s)), -s)):
        if ok is not None and not ok(rows[r]):
            continue
        if category_limit is not None:
            c = rows[r]["category"]
            if per.get(c, 0) >= category_limit:
                continue
            per[c] = per.get(c, 0) + 1
        out.append(rows[r]["id"])
        if len(out) == k:
            break
    return out


def run_together(cat: Catalog, queries: list[Query]) -> list[Any]:
    """Every query from its own thread, all announced before any submits, so they are served as one
    batch (gather up to 5 s). Returns, per query, its hit ids and scores or the exception."""
    cat._batcher.gather_s = 5.0
    out: list[Any] = [None] * len(queries)
    ready = threading.Barrier(len(queries))

    def go(i: int) -> None:
        with cat.expect_query():
            ready.wait()
            try:
                out[i] = [(h.id, h.score) for h in cat.search(queries[i])]
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                out[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# -- the probe's reproduction, engine level -------------------------------------------------------
@pytest.mark.parametrize("bad,argument", [
    ({"price": {"min": HUGE}}, "filters.price.min"),
    ({"price": {"max": -HUGE}}, "filters.price.max"),
    ({"price": {"min": float("nan")}}, "filters.price.min"),
    ({"price": {"max": float("inf")}}, "filters.price.max"),
    ({"price": {"eq": HUGE}}, "filters.price.eq"),
    ({"price": [1, HUGE]}, "filters.price"),
    ({"rating": {"min": "3"}}, "filters.rating.min"),
])
def test_six_bad_filters_do_not_fail_six_plain_queries(bad: dict, argument: str) -> None:
    mat, rows = one_hot(60, 5, seed=1)
    cat = Catalog(5, chunk_rows=16)
    cat.upsert(rows, torch.tensor(mat, dtype=torch.float32))
    q = np.array([1.0, -2.0, 0.0, 3.0, 1.0])
    plain = Query(vector=torch.tensor(q, dtype=torch.float32), k=4, filters={"price": {"max": 30}})
    poison = Query(vector=torch.tensor(q, dtype=torch.float32), k=4, filters=bad)
    got = run_together(cat, [plain, poison] * 6)
    want = oracle(mat, rows, q, 4, ok=lambda r: r["price"] <= 30)
    for i in range(0, 12, 2):
        assert not isinstance(got[i], Exception), f"a plain query failed: {got[i]!r}"
        assert [h[0] for h in got[i]] == want
    for i in range(1, 12, 2):
        assert isinstance(got[i], InvalidInput), f"expected a clear refusal, got {got[i]!r}"
        assert str(got[i]).startswith(argument + "="), str(got[i])
    cat.close()


def test_range_bounds_are_exact_for_large_integers() -> None:
    """A bound is compared exactly with the stored float64 numbers (Python's int/float comparison is
    the oracle): 2**53 + 1 is above the stored 2**53, though float(2**53 + 1) == 2**53."""
    big = 2 ** 53
    rows = [{"id": "x", "price": float(big)}, {"id": "y", "price": float(big + 2)}, {"id": "z", "price": 1}]
    cat = Catalog(2)
    cat.upsert(rows, torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2]]))
    v = torch.tensor([1.0, 0.0])
    for bound in (big - 1, big, big + 1, big + 2, big + 3):
        for op in ("min", "max"):
            got = {h.id for h in cat.search(Query(vector=v, k=3, filters={"price": {op: bound}}))}
            want = {r["id"] for r in rows if (r["price"] >= bound if op == "min" else r["price"] <= bound)}
            assert got == want, (op, bound)
    cat.close()


# -- the probe's reproduction, tool level ---------------------------------------------------------
@pytest.fixture()
def shop(tmp_path: Path) -> tuple[Path, np.ndarray, list[dict]]:
    mat, rows = one_hot(45, 6, seed=3)
    p = tmp_path / "shop.jsonl"
    p.write_text("".join(json.dumps({**r, "embedding": mat[i].tolist()}) + "\n" for i, r in enumerate(rows)),
                 encoding="utf-8")
    return p, mat, rows


def test_tool_poison_filters_from_threads_fail_alone(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, mat, rows = shop
    ctx = make_context(tmp_path)
    q = np.array([1.0, 2.0, -1.0, 0.0, 1.0, 3.0])
    plain = dict(vector=q.tolist(), k=5, catalog=str(p))
    want = oracle(mat, rows, q, 5)
    assert [it.id for it in recommend.run(RecommendInput(**plain), ctx).structured.items] == want
    cat = ctx.engine.service("catalog", CatalogService).catalogs()[0][0]
    cat._batcher.gather_s = 2.0  # the 12 calls below meet in one batch whenever they overlap
    results: list[Any] = [None] * 12
    ready = threading.Barrier(12)

    def go(i: int) -> None:
        args = dict(plain, filters={"price": {"min": HUGE}}) if i % 2 else plain
        ready.wait()
        try:
            results[i] = [it.id for it in recommend.run(RecommendInput(**args), ctx).structured.items]
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(0, 12, 2):
        assert results[i] == want, f"plain query {i}: {results[i]!r}"
    for i in range(1, 12, 2):
        assert isinstance(results[i], REFUSED), repr(results[i])
        msg = str(results[i])
        assert msg.startswith("filters.price.min=<integer of 401 digits>: ") and "float64" in msg, msg


@pytest.mark.parametrize("item,argument", [
    ({"id": "p", "category": "a", "price": HUGE}, "items[0].price"),
    ({"id": "p", "category": "a", "price": -HUGE}, "items[0].price"),
    ({"id": "p", "category": "a", "price": float("nan")}, "items[0].price"),
    ({"id": "p", "category": "a", "rating": float("-inf")}, "items[0].rating"),
    ({"id": "p", "category": "a", "specs": {"weight": [1, HUGE]}}, "items[0].specs.weight[1]"),
    ({"id": "p", "category": "a", "blob": b"\xff"}, "items[0].blob"),
    ({"id": "p", "category": "a", "name": "cable \ud800 x"}, "items[0].name"),  # a lone surrogate
    ({"id": "p", "category": "a", "tags": ["ok", {"k\udfff": 1}]}, "items[0].tags[1]"),
    ({"id": HUGE, "category": "a"}, "items[0]: 'id'"),
])
def test_upsert_refuses_values_that_would_poison_a_column(tmp_path: Path, shop, item: dict,
                                                         argument: str) -> None:  # noqa: ANN001
    p, mat, rows = shop
    ctx = make_context(tmp_path)
    before = info.run(info.input_model(catalog=str(p)), ctx).structured
    with pytest.raises(REFUSED) as err:
        upsert.run(UpsertInput(items=[{**item, "embedding": [1.0, 0, 0, 0, 0, 0]}], catalog=str(p)), ctx)
    assert str(err.value).startswith(argument if "'id'" in argument else argument + "="), str(err.value)
    after = info.run(info.input_model(catalog=str(p)), ctx).structured
    assert after.rows == before.rows and after.fields == before.fields
    # the README's filter keeps working for everyone
    q = np.array([1.0, 0, 0, 0, 0, 0])
    out = recommend.run(RecommendInput(vector=q.tolist(), k=45, filters={"price": {"max": 30}}, catalog=str(p)), ctx)
    assert [it.id for it in out.structured.items] == oracle(mat, rows, q, 45, ok=lambda r: r["price"] <= 30)


def test_query_text_that_cannot_be_embedded_is_refused(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, _, _ = shop
    with pytest.raises(REFUSED, match=r"^text='cable \\ud800': not valid Unicode text"):
        recommend.run(RecommendInput(text="cable \ud800", catalog=str(p)), make_context(tmp_path))


def test_catalog_file_rows_with_poison_values_are_skipped_with_their_line(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "price": 3}\n{"id": "b", "price": 1' + "0" * 400 + '}\n{"id": "c", "price": 5}\n',
                 encoding="utf-8")
    rows, _, errors = read_catalog(p, max_rows=10)
    assert [r["id"] for r in rows] == ["a", "c"]
    assert errors and errors[0].startswith("line 2: price=<integer of 401 digits>: "), errors
    q = tmp_path / "c.csv"
    q.write_text("id,price\na,3\nb,1" + "0" * 400 + "\n", encoding="utf-8")
    rows, _, errors = read_catalog(q, max_rows=10)
    assert [r["id"] for r in rows] == ["a"] and errors[0].startswith("line 3: price="), errors


# -- failure isolation inside a batch -------------------------------------------------------------
def test_coalescer_error_fails_only_the_guilty_request() -> None:
    """An error that escapes validation (a bug, a memory error) while serving a batch: the batch is
    re-run one request at a time, so only the request that fails alone fails."""
    calls: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        if 13 in batch:
            raise RuntimeError("boom")
        return [x * 10 for x in batch]

    co = Coalescer(run, gather_s=5.0)
    out: dict[int, Any] = {}
    ready = threading.Barrier(8)

    def go(x: int) -> None:
        with co.expect():
            ready.wait()
            try:
                out[x] = co.submit(x)
            except RuntimeError as exc:
                out[x] = exc

    threads = [threading.Thread(target=go, args=(x,)) for x in (1, 2, 3, 13, 4, 5, 6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert co.batches == [8]
    assert {x: out[x] for x in (1, 2, 3, 4, 5, 6, 7)} == {x: x * 10 for x in (1, 2, 3, 4, 5, 6, 7)}
    assert isinstance(out[13], RuntimeError)
    assert sorted(len(c) for c in calls) == [1] * 8 + [8]
    co.close()


# -- property: interleaved valid and invalid requests from many threads ---------------------------
VALID_FILTERS = [None, {"price": {"max": 30}}, {"price": {"min": 10, "max": 40}}, {"category": ["a", "c"]},
                 {"in_stock": True}, {"rating": {"min": 2.5}}, {"category": {"eq": "b"}, "price": {"min": 5}},
                 {"price": {"min": 2 ** 60}}]
INVALID = [  # (filters, vector, k, min_score) -> the argument the error must name
    (({"price": {"min": HUGE}}, None, 3, None), "filters.price.min"),
    (({"price": {"max": float("nan")}}, None, 3, None), "filters.price.max"),
    (({"rating": {"min": float("-inf")}}, None, 3, None), "filters.rating.min"),
    (({"price": {"eq": -HUGE}}, None, 3, None), "filters.price.eq"),
    (({"category": {"in": []}}, None, 3, None), "filters.category.in"),
    (({"category": [["a"]]}, None, 3, None), "filters.category"),
    (({"colour": "red"}, None, 3, None), "filters"),
    (({"price": {"between": 3}}, None, 3, None), "filters.price"),
    (({"price": {"min": True}}, None, 3, None), "filters.price.min"),
    ((None, [0.0] * 5, 3, None), "vector"),
    ((None, [float("nan")] * 5, 3, None), "vector"),
    ((None, None, 0, None), "k"),
    ((None, None, 3, float("nan")), "min_score"),
]


def _ok(flt: dict | None) -> Any:
    def ok(r: dict) -> bool:
        for name, cond in (flt or {}).items():
            if isinstance(cond, dict):
                if "eq" in cond and r[name] != cond["eq"]:
                    return False
                if "min" in cond and not r[name] >= cond["min"]:
                    return False
                if "max" in cond and not r[name] <= cond["max"]:
                    return False
            elif isinstance(cond, list):
                if r[name] not in cond:
                    return False
            elif r[name] is not cond and r[name] != cond:
                return False
        return True
    return ok


_CAT = one_hot(80, 5, seed=7)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.one_of(
    st.tuples(st.just("ok"), st.sampled_from(range(len(VALID_FILTERS))),
              st.lists(st.integers(-3, 3), min_size=5, max_size=5).filter(any), st.integers(1, 9),
              st.sampled_from([None, 1, 2]), st.sampled_from([None, 0.0])),
    st.tuples(st.just("bad"), st.sampled_from(range(len(INVALID))))), min_size=2, max_size=14))
def test_property_interleaved_valid_and_invalid_requests(plan: list[tuple]) -> None:
    mat, rows = _CAT
    cat = Catalog(5, chunk_rows=13)
    cat.upsert(rows, torch.tensor(mat, dtype=torch.float32))
    queries, expect = [], []
    for p in plan:
        if p[0] == "ok":
            _, fi, qv, k, limit, min_score = p
            q = Query(vector=torch.tensor(qv, dtype=torch.float32), k=k, filters=VALID_FILTERS[fi],
                      category_limit=limit, min_score=min_score)
            alone = [(h.id, h.score) for h in cat.search(q)]
            want = oracle(mat, rows, np.array(qv, float), k, ok=_ok(VALID_FILTERS[fi]), category_limit=limit)
            if min_score is not None:  # the oracle's order, cut where the (exact) score drops below 0
                m = mat / np.linalg.norm(mat, axis=1, keepdims=True)
                s = m @ (np.array(qv, float) / np.linalg.norm(qv))
                want = [i for i in want if s[int(i[1:])] >= min_score]
            assert [h[0] for h in alone] == want
            queries.append(q)
            expect.append(alone)
        else:
            (flt, vec, k, min_score), argument = INVALID[p[1]]
            v = torch.tensor(vec if vec is not None else [1.0, 0, 2, 0, 1], dtype=torch.float32)
            queries.append(Query(vector=v, k=k, filters=flt, min_score=min_score))
            expect.append(argument)
    got = run_together(cat, queries)
    for g, e in zip(got, expect):
        if isinstance(e, str):
            assert isinstance(g, InvalidInput) and str(g).startswith(e + "="), (e, g)
            assert math.isfinite(len(str(g))) and len(str(g)) < 400
        else:
            assert g == e
    cat.close()
