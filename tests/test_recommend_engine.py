"""engine.catalog: exact search vs a NumPy brute force, online updates, coalescing, catalogue files.

The oracle normalises in float64, sorts every valid row by (score desc, row
asc) with np.lexsort, then applies min_score and the greedy category limit.
Tie tests use rows that are positive multiples of +-e_j: normalised they are
exactly +-e_j, so every score is one product and ties are exact in fp32 too.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidInput
from engine.catalog import Catalog, CatalogService, Coalescer, Query, read_catalog

CATS = ["a", "b", "c"]


def oracle(mat: np.ndarray, rows: list[dict], q: np.ndarray, k: int, *, valid: np.ndarray | None = None,
           category_limit: int | None = None, min_score: float | None = None) -> tuple[list[int], np.ndarray]:
    m = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    s = m @ (q / np.linalg.norm(q))
    order = np.lexsort((np.arange(len(s)), -s))
    out: list[int] = []
    per: Counter = Counter()
    for r in order:
        if valid is not None and not valid[r]:
            continue
        if min_score is not None and s[r] < min_score:
            break
        if category_limit is not None:
            if per[rows[r]["category"]] >= category_limit:
                continue
            per[rows[r]["category"]] += 1
        out.append(int(r))
        if len(out) == k:
            break
    return out, s


def one_hot_catalog(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, list[dict]]:
    j = rng.integers(0, d, n)
    sign = rng.choice([-1.0, 1.0], n)
    scale = rng.integers(1, 5, n)
    mat = np.zeros((n, d))
    mat[np.arange(n), j] = sign * scale
    rows = [{"id": f"i{i}", "category": CATS[rng.integers(0, 3)], "price": int(rng.integers(0, 10)),
             "in_stock": bool(rng.integers(0, 2))} for i in range(n)]
    return mat, rows


def build(mat: np.ndarray, rows: list[dict], chunk_rows: int = 7, capacity: int = 4,
          sketch: bool | None = None) -> Catalog:
    cat = Catalog(mat.shape[1], chunk_rows=chunk_rows, capacity=capacity, sketch=sketch)
    cat.upsert(rows, torch.tensor(mat, dtype=torch.float32))
    return cat


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 60), d=st.integers(2, 6), k=st.integers(1, 12),
       limit=st.sampled_from([None, 1, 2]), use_filter=st.booleans(), n_excl=st.integers(0, 5),
       min_score=st.sampled_from([None, 0.0, 0.3]), sketch=st.booleans())
def test_property_exact_with_ties(seed: int, n: int, d: int, k: int, limit: int | None, use_filter: bool,
                                  n_excl: int, min_score: float | None, sketch: bool) -> None:
    rng = np.random.default_rng(seed)
    mat, rows = one_hot_catalog(rng, n, d)
    cat = build(mat, rows, chunk_rows=int(rng.integers(1, 20)), sketch=sketch)
    assert (cat._sketch is not None) == sketch
    q = rng.integers(-3, 4, d).astype(np.float64)
    if not q.any():
        q[0] = 1.0
    excl = set(rng.integers(0, n, n_excl).tolist())
    valid = np.array([i not in excl for i in range(n)])
    filters = None
    if use_filter:
        filters = {"price": {"max": 6}, "category": ["a", "b"]}
        valid &= np.array([r["price"] <= 6 and r["category"] in ("a", "b") for r in rows])
    want, s = oracle(mat, rows, q, k, valid=valid, category_limit=limit, min_score=min_score)
    hits = cat.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=k, filters=filters, category_limit=limit,
                            exclude_rows=frozenset(excl), min_score=min_score))
    assert [h.row for h in hits] == want
    assert [h.id for h in hits] == [f"i{r}" for r in want]
    np.testing.assert_allclose([h.score for h in hits], s[want], atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 80), k=st.integers(1, 10), limit=st.sampled_from([None, 1, 3]),
       sketch=st.booleans())
def test_property_gaussian(seed: int, n: int, k: int, limit: int | None, sketch: bool) -> None:
    rng = np.random.default_rng(seed)
    mat = rng.standard_normal((n, 8))
    rows = [{"id": str(i), "category": CATS[rng.integers(0, 3)]} for i in range(n)]
    cat = build(mat, rows, chunk_rows=int(rng.integers(1, 30)), sketch=sketch)
    q = rng.standard_normal(8)
    want, s = oracle(mat, rows, q, k, category_limit=limit)
    hits = cat.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=k, category_limit=limit))
    np.testing.assert_allclose([h.score for h in hits], s[want], atol=1e-5)
    gaps = np.diff(np.sort(s))
    if gaps.size == 0 or gaps.min() > 1e-5:  # no near-ties: the ids must agree exactly
        assert [h.row for h in hits] == want


def test_category_limit_needs_widening() -> None:
    # the 30 best rows are all category "a": a limit of 1 must reach far down the list
    n = 40
    mat = np.zeros((n, 2))
    mat[:, 0] = np.linspace(2.0, 1.0, n)
    mat[:, 1] = np.linspace(0.0, 1.0, n)
    rows = [{"id": str(i), "category": "a" if i < 30 else f"c{i}"} for i in range(n)]
    cat = build(mat, rows, chunk_rows=8)
    hits = cat.search(Query(vector=torch.tensor([1.0, 0.0]), k=4, category_limit=1))
    want, _ = oracle(mat, rows, np.array([1.0, 0.0]), 4, category_limit=1)
    assert [h.row for h in hits] == want == [0, 30, 31, 32]


def test_upsert_delete_visible_and_growth() -> None:
    rng = np.random.default_rng(1)
    mat, rows = one_hot_catalog(rng, 10, 3)
    cat = build(mat, rows, capacity=2)
    q = torch.tensor([1.0, 0.0, 0.0])
    cat.upsert([{"id": "new", "category": "z", "name": "x"}], torch.tensor([[5.0, 0.0, 0.0]]))
    assert cat.capacity >= 11 and len(cat) == 11
    top = cat.search(Query(vector=q, k=20))
    assert top[0].score == pytest.approx(1.0)
    first_tie = [h for h in top if h.score == top[0].score]
    assert first_tie[-1].id == "new"  # ties: earlier rows first, the new row last
    cat.upsert([{"id": "i0", "category": "z"}], torch.tensor([[0.0, 0.0, -1.0]]))  # update in place
    hits = cat.search(Query(vector=torch.tensor([0.0, 0.0, -1.0]), k=1))
    assert hits[0].id == "i0" and hits[0].row == 0 and hits[0].fields.get("price") is None
    cat.delete(["new", "i0"])
    ids = [h.id for h in cat.search(Query(vector=q, k=20))]
    assert "new" not in ids and "i0" not in ids and len(ids) == 9
    assert cat.categories().get("z") is None
    with pytest.raises(InvalidInput, match="unknown item id"):
        cat.delete(["i0"])


def test_compaction_keeps_order() -> None:
    rng = np.random.default_rng(2)
    n = 2600
    mat = rng.standard_normal((n, 4))
    rows = [{"id": str(i), "category": CATS[i % 3]} for i in range(n)]
    cat = build(mat, rows, chunk_rows=500)
    gone = [str(i) for i in range(0, n, 2)] + [str(i) for i in range(1, 600, 2)]
    cat.delete(gone)
    assert cat.capacity >= len(cat) == n - len(set(gone))
    assert cat._dead == 0  # compacted
    keep = np.array([str(i) not in set(gone) for i in range(n)])
    q = rng.standard_normal(4)
    want, _ = oracle(mat, rows, q, 15, valid=keep)
    assert [h.id for h in cat.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=15))] == \
        [str(r) for r in want]


# -- row storage: present, explicit None and absent fields -----------------------
def expected_fields(row: dict) -> dict:
    """What a row should read back as: its own fields, `id` as a str, `category` "" when it has none."""
    out = dict(row)
    out["id"] = str(row["id"])
    out.setdefault("category", "")
    return out


def filter_oracle(rows: dict[str, dict], name: str, cond: object) -> set[str]:
    """The ids a filter should keep, by plain Python: a row without the field never matches."""
    def eq(x: object, v: object) -> bool:
        if isinstance(v, bool):
            return x is v
        return x == v and not isinstance(x, bool)

    def num(x: object) -> float | None:
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    out = set()
    for rid, row in rows.items():
        if name not in row:
            continue
        x = row[name]
        if isinstance(cond, dict):
            ok = True
            if "eq" in cond:
                ok &= eq(x, cond["eq"])
            if "in" in cond:
                ok &= any(eq(x, v) for v in cond["in"])
            if "min" in cond:
                ok &= num(x) is not None and num(x) >= cond["min"]
            if "max" in cond:
                ok &= num(x) is not None and num(x) <= cond["max"]
        elif isinstance(cond, list):
            ok = any(eq(x, v) for v in cond)
        else:
            ok = eq(x, cond)
        if ok:
            out.add(rid)
    return out


def all_hits(cat: Catalog, filters: dict | None = None) -> list:
    return cat.search(Query(vector=torch.ones(cat.dim), k=max(1, len(cat)), filters=filters))


SPARSE_ROWS = [
    {"id": "a", "category": "x", "color": None, "price": 3},
    {"id": "b", "category": "y", "price": 5.5, "tags": ["t1", "t2"]},
    {"id": "c", "color": "red"},
    {"id": "d", "category": "x", "color": "red", "price": "cheap", "in_stock": True},
    {"id": "e", "category": "y", "price": 1, "in_stock": False, "tags": []},
]
SPARSE_FILTERS = [("color", None), ("color", "red"), ("color", ["red", None]), ("color", {"in": ["blue"]}),
                  ("price", {"min": 0}), ("price", {"max": 4}), ("price", 1), ("price", "cheap"),
                  ("in_stock", True), ("in_stock", False), ("category", "x"), ("category", ["", "y"]),
                  ("price", {"eq": 3, "min": 2})]


@pytest.mark.parametrize("one_by_one", [False, True])  # the bulk append, and the row-by-row upsert
def test_explicit_none_kept_missing_fields_stay_absent(one_by_one: bool) -> None:
    rng = np.random.default_rng(5)
    mat = rng.standard_normal((len(SPARSE_ROWS), 4))
    cat = Catalog(4, capacity=2)
    if one_by_one:
        for row, vec in zip(SPARSE_ROWS, mat):
            cat.upsert([row], torch.tensor(vec[None], dtype=torch.float32))
    else:
        cat.upsert(SPARSE_ROWS, torch.tensor(mat, dtype=torch.float32))
    want = {r["id"]: expected_fields(r) for r in SPARSE_ROWS}
    for rid, fields in want.items():
        assert cat.item(rid) == fields
    assert "color" in cat.item("a") and cat.item("a")["color"] is None  # an explicit null is a value
    assert "color" not in cat.item("b") and "price" not in cat.item("c")  # a missing field is not added
    assert cat.item("b")["tags"] == ["t1", "t2"] and cat.item("e")["tags"] == []
    hits = all_hits(cat)
    assert sorted(h.id for h in hits) == sorted(want)
    for h in hits:
        assert h.fields == want[h.id]
    assert set(cat.fields()) == {k for r in SPARSE_ROWS for k in r} | {"category"}
    assert cat.categories() == dict(Counter(f["category"] for f in want.values()))
    for name, cond in SPARSE_FILTERS:
        got = {h.id for h in all_hits(cat, {name: cond})}
        assert got == filter_oracle(want, name, cond), (name, cond)
    assert {h.id for h in all_hits(cat, {"color": None})} == {"a"}  # b, c, e lack the field or hold a value


def test_filters_never_match_absent_values_random() -> None:
    rng = np.random.default_rng(6)
    values = ["red", "blue", None, 0, 1, 2.5, True, False, "", ["red"]]
    for trial in range(20):
        n = int(rng.integers(1, 40))
        rows = []
        for i in range(n):
            row: dict = {"id": f"r{i}", "category": CATS[int(rng.integers(0, 3))]}
            for name in ("color", "size"):
                if rng.random() < 0.6:
                    row[name] = values[int(rng.integers(0, len(values)))]
            rows.append(row)
        rows[0]["color"] = "red"  # both fields exist as columns
        rows[0]["size"] = 1
        cat = build(rng.standard_normal((n, 3)), rows, chunk_rows=int(rng.integers(1, 10)))
        want = {r["id"]: expected_fields(r) for r in rows}
        for name in ("color", "size"):
            for cond in ["red", "", 0, 1, 2.5, True, False, None, ["red", None], ["", 0],
                         {"min": 0}, {"max": 1}, {"min": 0.5, "max": 3}, {"in": [None, False]}]:
                got = {h.id for h in all_hits(cat, {name: cond})}
                assert got == filter_oracle(want, name, cond), (trial, name, cond)


def test_update_replaces_all_fields_and_categories() -> None:
    rng = np.random.default_rng(7)
    cat = build(rng.standard_normal((len(SPARSE_ROWS), 4)), SPARSE_ROWS)
    want = {r["id"]: expected_fields(r) for r in SPARSE_ROWS}
    rows_before = {rid: cat.row_of(rid) for rid in want}
    # an update of b (fields not given disappear) and a new row f: the row-by-row path
    new_rows = [{"id": "b", "category": "z", "color": "blue"}, {"id": "f", "category": "y", "note": None}]
    assert cat.upsert(new_rows, torch.tensor(rng.standard_normal((2, 4)), dtype=torch.float32)) == (1, 1)
    want["b"] = expected_fields(new_rows[0])
    want["f"] = expected_fields(new_rows[1])
    assert cat.item("b") == {"id": "b", "category": "z", "color": "blue"}
    assert cat.row_of("b") == rows_before["b"]  # in place
    assert cat.row_of("f") == len(SPARSE_ROWS)
    for h in all_hits(cat):
        assert h.fields == want[h.id]
    assert cat.categories() == dict(sorted(Counter(f["category"] for f in want.values()).items(),
                                           key=lambda kv: (-kv[1], kv[0])))
    assert "y" in cat.categories() and cat.categories()["y"] == 2  # e and f; b left y
    for name, cond in SPARSE_FILTERS + [("color", "blue"), ("note", None), ("tags", {"min": 0})]:
        assert {h.id for h in all_hits(cat, {name: cond})} == filter_oracle(want, name, cond), (name, cond)
    # an update that drops every optional field: only id and category remain ("" when not given)
    cat.upsert([{"id": "d"}], torch.ones(1, 4))
    assert cat.item("d") == {"id": "d", "category": ""}
    assert cat.categories()["x"] == 1


@pytest.mark.parametrize("bulk", [True, False])
def test_delete_then_readd_same_id(bulk: bool) -> None:
    rng = np.random.default_rng(8)
    mat = rng.standard_normal((len(SPARSE_ROWS), 4))
    cat = build(mat, SPARSE_ROWS)
    cat.delete(["a", "d"])
    assert not cat.has("a") and len(cat) == len(SPARSE_ROWS) - 2
    with pytest.raises(InvalidInput, match="unknown item id"):
        cat.item("a")
    assert {h.id for h in all_hits(cat)} == {"b", "c", "e"}
    assert all_hits(cat, {"color": None}) == []  # the tombstone's None is gone, not matched
    assert {h.id for h in all_hits(cat, {"color": "red"})} == {"c"}
    assert cat.categories() == {"y": 2, "": 1}
    readd = [{"id": "a", "category": "w", "size": 2}]
    if not bulk:  # together with an update: the row-by-row path
        readd.append({"id": "c", "category": "w"})
    vecs = torch.tensor(rng.standard_normal((len(readd), 4)), dtype=torch.float32)
    assert cat.upsert(readd, vecs) == (1, 0 if bulk else 1)
    assert cat.row_of("a") == len(SPARSE_ROWS)  # appended after the tombstones
    assert cat.item("a") == {"id": "a", "category": "w", "size": 2}  # nothing of the old row a
    want = {"a": readd[0], "b": SPARSE_ROWS[1], "c": SPARSE_ROWS[2] if bulk else readd[1], "e": SPARSE_ROWS[4]}
    want = {rid: expected_fields(r) for rid, r in want.items()}
    hits = all_hits(cat)
    assert sorted(h.id for h in hits) == sorted(want)
    for h in hits:
        assert h.fields == want[h.id]
    assert cat.categories() == dict(sorted(Counter(f["category"] for f in want.values()).items(),
                                           key=lambda kv: (-kv[1], kv[0])))
    for name, cond in SPARSE_FILTERS + [("size", 2), ("size", {"min": 1})]:
        assert {h.id for h in all_hits(cat, {name: cond})} == filter_oracle(want, name, cond), (name, cond)


def test_compaction_keeps_fields_ids_and_counts() -> None:
    rng = np.random.default_rng(9)
    n = 3000
    mat = rng.standard_normal((n, 4))
    rows: list[dict] = []
    for i in range(n):
        row: dict = {"id": f"r{i}", "category": f"c{i % 4}", "price": i}
        if i % 5 == 0:
            row["color"] = "red" if i % 10 == 0 else None
        if i % 7 == 0:
            row["tags"] = [f"t{i}"]
        rows.append(row)
    cat = build(mat, rows, chunk_rows=700)
    gone = [f"r{i}" for i in range(n) if i % 3 != 0]
    assert len(gone) == 2000
    cat.delete(gone[:1000])
    assert cat._dead == 1000  # not yet: 1000 tombstones do not outnumber 2000 live rows
    cat.delete(gone[1000:])
    assert cat._dead == 0 and len(cat) == 1000  # compacted
    kept = [i for i in range(n) if i % 3 == 0]
    want = {f"r{i}": expected_fields(rows[i]) for i in kept}
    for pos, i in enumerate(kept):  # order kept, positions renumbered, fields intact
        assert cat.row_of(f"r{i}") == pos
        assert cat.item(f"r{i}") == want[f"r{i}"]
    for rid in gone[::97]:
        assert not cat.has(rid)
    assert cat.categories() == dict(sorted(Counter(f["category"] for f in want.values()).items(),
                                           key=lambda kv: (-kv[1], kv[0])))
    q = rng.standard_normal(4)
    want_rows, _ = oracle(mat[kept], [rows[i] for i in kept], q, 25)
    hits = cat.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=25))
    assert [h.row for h in hits] == want_rows
    assert [h.id for h in hits] == [f"r{kept[r]}" for r in want_rows]
    for h in hits:
        assert h.fields == want[h.id]
    for name, cond in [("color", "red"), ("color", None), ("price", {"min": 2900}), ("price", {"max": 30}),
                       ("category", "c1"), ("price", [0, 3, 4, 2997])]:
        assert {h.id for h in all_hits(cat, {name: cond})} == filter_oracle(want, name, cond), (name, cond)
    # the compacted catalogue still takes updates and new rows
    cat.upsert([{"id": "r3", "category": "c9"}, {"id": "new", "price": 1}], torch.ones(2, 4))
    assert cat.item("r3") == {"id": "r3", "category": "c9"} and cat.row_of("r3") == 1
    assert cat.item("new") == {"id": "new", "price": 1, "category": ""} and cat.row_of("new") == 1000


def test_bad_queries() -> None:
    cat = build(np.eye(3), [{"id": str(i), "category": "a", "price": i} for i in range(3)])
    with pytest.raises(InvalidInput, match="vector"):
        cat.search(Query(vector=torch.ones(4), k=1))
    with pytest.raises(InvalidInput, match="not all zero"):
        cat.search(Query(vector=torch.zeros(3), k=1))
    with pytest.raises(InvalidInput, match="unknown field"):
        cat.search(Query(vector=torch.ones(3), k=1, filters={"colour": "red"}))
    with pytest.raises(InvalidInput, match="must be a number"):
        cat.search(Query(vector=torch.ones(3), k=1, filters={"price": {"max": "9"}}))
    with pytest.raises(InvalidInput, match="k"):
        cat.search(Query(vector=torch.ones(3), k=0))


def test_fp16_matrix_halves_bytes_and_ranks() -> None:
    rng = np.random.default_rng(3)
    mat = rng.standard_normal((50, 16))
    rows = [{"id": str(i), "category": "a"} for i in range(50)]
    c32 = Catalog(16, capacity=50)
    c16 = Catalog(16, dtype=torch.float16, capacity=50)
    for c in (c32, c16):
        c.upsert(rows, torch.tensor(mat, dtype=torch.float32))
    assert c16.device_bytes * 2 == c32.device_bytes
    q = rng.standard_normal(16)
    want, s = oracle(mat, rows, q, 5)
    hits = c16.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=5))
    np.testing.assert_allclose([h.score for h in hits], s[want], atol=5e-3)


@pytest.mark.parametrize("n", [1, 7, 3000, 20000])
def test_fp16_catalogue_is_exact_over_its_fp16_rows(n: int) -> None:
    # the oracle: float64 scores of the stored fp16 rows (normalised in fp32, then rounded) against the
    # normalised fp32 query, ties to the lower row; single queries and a batch give the same answers
    rng = np.random.default_rng(n)
    d = 40
    mat = rng.standard_normal((n, d)).astype(np.float32)
    mat[rng.integers(0, n, n // 4)] = mat[rng.integers(0, n, n // 4)]  # exact ties
    mat[:, 0] *= 1e-4  # some fp16 subnormals
    rows = [{"id": str(i), "category": CATS[i % 3]} for i in range(n)]
    cat = Catalog(d, dtype=torch.float16, capacity=n, chunk_rows=4096)
    cat.upsert(rows, torch.from_numpy(mat))
    unit = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    m16 = torch.from_numpy(unit).to(torch.float16).double().numpy()
    qs = rng.standard_normal((5, d)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    k = min(10, n)
    many = cat.search_many([Query(vector=torch.from_numpy(q), k=k) for q in qs])
    for i, q in enumerate(qs):
        s = m16 @ q.astype(np.float64)
        want = np.lexsort((np.arange(n), -s))[:k].tolist()
        one = cat.search(Query(vector=torch.from_numpy(q), k=k))
        assert [h.row for h in one] == want
        assert [h.row for h in many[i]] == want
        np.testing.assert_allclose([h.score for h in one], s[want], rtol=0, atol=1e-6)


def test_coalescer_serves_waiting_requests_together() -> None:
    started, release = threading.Event(), threading.Event()

    def run(batch: list[int]) -> list[int]:
        if batch == [0]:
            started.set()
            release.wait(10)
        return [x * 10 for x in batch]

    co = Coalescer(run)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, co.submit(i))) for i in range(6)]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    assert co.wait_pending(5)
    release.set()
    for t in threads:
        t.join(10)
    assert results == {i: i * 10 for i in range(6)}
    assert co.batches == [1, 5]


def test_coalescer_waits_for_announced_callers() -> None:
    # B submits while A has announced (expect) but not submitted: B's batch waits for A, one batch of 2
    co = Coalescer(lambda batch: [x * 10 for x in batch], gather_s=60)
    a_in, a_go = threading.Event(), threading.Event()
    results: dict[str, int] = {}

    def a() -> None:
        with co.expect():
            a_in.set()
            a_go.wait(10)
            results["a"] = co.submit(1)

    ta = threading.Thread(target=a)
    ta.start()
    assert a_in.wait(10)
    tb = threading.Thread(target=lambda: results.__setitem__("b", co.submit(2)))
    tb.start()
    assert co.wait_pending(1)
    a_go.set()
    ta.join(10)
    tb.join(10)
    assert results == {"a": 10, "b": 20}
    assert co.batches == [2]


def test_coalescer_does_not_wait_for_a_withdrawn_caller() -> None:
    # A announces, then leaves without submitting (bad input): B must not wait out the 60 s gather cap
    co = Coalescer(lambda batch: [x * 10 for x in batch], gather_s=60)
    a_in, a_go = threading.Event(), threading.Event()

    def a() -> None:
        try:
            with co.expect():
                a_in.set()
                a_go.wait(10)
                raise ValueError("bad input")
        except ValueError:
            pass

    ta = threading.Thread(target=a)
    ta.start()
    assert a_in.wait(10)
    got: list[int] = []
    tb = threading.Thread(target=lambda: got.append(co.submit(3)))
    tb.start()
    assert co.wait_pending(1)
    a_go.set()
    tb.join(10)
    assert not tb.is_alive() and got == [30]
    ta.join(10)


def test_coalescer_runs_every_batch_on_one_worker_thread_that_idles_out() -> None:
    threads: list[threading.Thread] = []  # thread objects: a dead thread's ident can be reused

    def run(batch: list[int]) -> list[int]:
        if threading.current_thread() not in threads:
            threads.append(threading.current_thread())
        return batch

    co = Coalescer(run, idle_s=0.05)
    for i in range(3):  # from three different submitting threads, one after another
        t = threading.Thread(target=co.submit, args=(i,))
        t.start()
        t.join(10)
    assert len(threads) == 1 and threading.current_thread() not in threads
    deadline = time.monotonic() + 10
    while co._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert co._worker is None  # idle: the worker left
    assert co.submit(7) == 7  # and a new one starts on demand
    assert len(threads) == 2
    co.idle_s = 600
    co.close()  # close lets the worker go at once (it holds the catalogue through run_batch)
    deadline = time.monotonic() + 10
    while co._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert co._worker is None
    assert co.submit(8) == 8


def test_catalog_queries_coalesce_into_one_product() -> None:
    rng = np.random.default_rng(4)
    mat = rng.standard_normal((100, 8))
    rows = [{"id": str(i), "category": CATS[i % 3]} for i in range(100)]
    cat = build(mat, rows, chunk_rows=64)
    qs = rng.standard_normal((5, 8))
    got: dict[int, list[str]] = {}
    with cat._lock:  # a writer holds the catalogue: the first query blocks inside its product
        t0 = threading.Thread(target=lambda: got.__setitem__(0, [h.id for h in cat.search(
            Query(vector=torch.tensor(qs[0], dtype=torch.float32), k=3))]))
        t0.start()
        deadline = time.monotonic() + 10
        while not cat._batcher._running and time.monotonic() < deadline:
            time.sleep(0.001)
        others = [threading.Thread(target=lambda i=i: got.__setitem__(i, [h.id for h in cat.search(
            Query(vector=torch.tensor(qs[i], dtype=torch.float32), k=3, category_limit=1))])) for i in range(1, 5)]
        for t in others:
            t.start()
        assert cat._batcher.wait_pending(4)
    for t in [t0, *others]:
        t.join(10)
    assert cat._batcher.batches == [1, 4]
    for i in range(5):
        want, _ = oracle(mat, rows, qs[i], 3, category_limit=None if i == 0 else 1)
        assert got[i] == [str(r) for r in want]


# -- files ---------------------------------------------------------------------
def test_read_jsonl_reports_malformed_lines(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "category": "x", "name": "A"}\n'
                 'not json\n'
                 '\n'
                 '{"name": "no id"}\n'
                 '{"id": "a", "name": "dup"}\n'
                 '[1, 2]\n'
                 '{"id": 7, "category": 3}\n'
                 '{"id": "b", "price": 2.5}\n', encoding="utf-8")
    rows, vecs, errors = read_catalog(p, max_rows=100)
    assert [r["id"] for r in rows] == ["a", "b"] and vecs == [None, None]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 4", "line 5", "line 6", "line 7"]
    with pytest.raises(InvalidInput, match="more than 1 rows"):
        read_catalog(p, max_rows=1)


def test_read_csv_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = tmp_path / "c.csv"
    c.write_text('id,category,price,embedding\nx,a,3,"[1, 0]"\ny,b,oops,"[0, 1]"\n,b,1,"[1,1]"\nz,a,2,"bad"\n',
                 encoding="utf-8")
    rows, vecs, errors = read_catalog(c, max_rows=10)
    assert [r["id"] for r in rows] == ["x", "y"] and rows[0]["price"] == 3 and rows[1]["price"] == "oops"
    assert vecs == [[1.0, 0.0], [0.0, 1.0]]
    assert [e.split(":")[0] for e in errors] == ["line 4", "line 5"]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["p", "q"], "category": ["a", "b"], "embedding": [[1.0, 2.0], [3.0, 4.0]]}), p)
    rows, vecs, errors = read_catalog(p, max_rows=10)
    assert [r["id"] for r in rows] == ["p", "q"] and vecs[1] == [3.0, 4.0] and not errors


class _FakeEmbedder:
    """Deterministic bag-of-letters embedder: lets the cache be tested without a model."""

    name, dim = "fake-letters", 26

    def __init__(self) -> None:
        self.calls = 0

    def estimate_bytes(self, texts, batch_size=64):  # noqa: ANN001, ANN201
        return len(texts) * self.dim * 4  # its output: it holds nothing else

    def encode(self, texts, *, token=None, progress=None, batch_size=64):  # noqa: ANN001, ANN201
        self.calls += 1
        out = torch.zeros(len(texts), 26)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        if progress:
            progress(len(texts), len(texts))
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)


def test_embedding_cache_survives_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import Engine, EngineConfig

    p = tmp_path / "shop.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "category": "c", "name": w}) + "\n"
                         for i, w in enumerate(["red cable", "blue case", "green charger"])), encoding="utf-8")
    fake = _FakeEmbedder()
    monkeypatch.setattr(CatalogService, "embedder", lambda self, model: fake)
    eng = Engine(EngineConfig(device="cpu", cache_dir=tmp_path / "cache"))
    try:
        progress: list[tuple[int, int]] = []
        cat, rep = CatalogService(eng).open(p, progress=lambda d, t: progress.append((d, t)))
        assert rep.embedded == 3 and fake.calls == 1 and progress[-1] == (3, 3)
        assert rep.cache_file and Path(rep.cache_file).parent == tmp_path
        cat2, rep2 = CatalogService(eng).open(p)  # a fresh service = a restart
        assert rep2.embedded == 0 and fake.calls == 1
        assert torch.equal(cat._matrix[:3], cat2._matrix[:3])
        p.write_text(p.read_text() + json.dumps({"id": "r9", "name": "pink cable"}) + "\n")
        _, rep3 = CatalogService(eng).open(p)  # content changed: new key, recomputed
        assert rep3.embedded == 4 and fake.calls == 2
    finally:
        eng.close()


def test_sketch_follows_upserts_deletes_and_compaction() -> None:
    # every update path keeps the int8 sketch in step with the fp32 rows: the answer stays the brute force
    rng = np.random.default_rng(11)
    n, d = 3000, 32
    mat = rng.standard_normal((n, d))
    rows = [{"id": f"r{i}", "category": CATS[i % 3]} for i in range(n)]
    cat = build(mat, rows, chunk_rows=257, capacity=16, sketch=True)
    q = rng.standard_normal(d)
    mat[1234] = q * 3.0  # an update in place makes row 1234 the best match
    cat.upsert([{"id": "r1234", "category": "a"}], torch.tensor(mat[1234:1235], dtype=torch.float32))
    extra = rng.standard_normal((5, d))
    cat.upsert([{"id": f"x{i}", "category": "b"} for i in range(5)], torch.tensor(extra, dtype=torch.float32))
    all_mat = np.concatenate([mat, extra])
    all_rows = rows + [{"id": f"x{i}", "category": "b"} for i in range(5)]
    want, _ = oracle(all_mat, all_rows, q, 8)
    assert [h.row for h in cat.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=8))] == want
    assert want[0] == 1234
    cat.delete([f"r{i}" for i in range(2000)])  # triggers compaction: rows move, the sketch is rebuilt
    keep = list(range(2000, n + 5))
    want, _ = oracle(all_mat[keep], [all_rows[i] for i in keep], q, 8)
    hits = cat.search(Query(vector=torch.tensor(q, dtype=torch.float32), k=8))
    assert [h.id for h in hits] == [all_rows[keep[i]]["id"] for i in want]
    assert cat.sketch_bytes == len(keep) * (d + 8)
