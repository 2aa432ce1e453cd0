"""The Qdrant catalogue backend (catalog.backend = "qdrant", issue 18.3) against the same tool tests as the
local backend, plus what only a shared store has.

These tests use qdrant-client's embedded local mode (`QdrantClient(path=...)`: the vendor's own
implementation of the server's API, in-process, on disk in the test's folder), not a Qdrant server; the
production set-up (a server or cluster at `catalog.qdrant_url`) is in the README. Expected values come from
NumPy brute force, as in the local backend's tests.

The tool tests of `tests/test_recommend_tool.py` (and the MCP-client story of `test_server_recommend.py`)
are collected here a second time, with `make_context` / `make_settings` giving them a Qdrant-backed
configuration: the same assertions hold for both backends.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import test_recommend_tool as T
import test_server_recommend as S
from fakectx import make_context
from test_recommend_tool import (  # noqa: F401 - collected again here, against Qdrant
    shop,
    test_bad_input,
    test_bad_upserts_and_size_limit,
    test_catalog_path_goes_through_the_sandbox,
    test_exclusion_filters_match_numpy,
    test_fields_only_update_keeps_the_stored_vector_and_new_items_need_one,
    test_item_id_excludes_itself_and_upsert_is_visible,
    test_vector_query_filters_and_warnings,
)
from test_server_recommend import test_accessories_for_a_phone_then_upsert  # noqa: F401 - slow: the MCP client

from tests.helpers import REFUSED, make_settings
from tools.recommend import TOOLS, InfoInput, RecommendInput, UpsertInput

recommend, upsert, info = TOOLS


def _qdrant(tmp_path: Path, **kw):
    catalog = {"backend": "qdrant", "qdrant_path": str(tmp_path / "qdrant"), **kw.pop("catalog", {})}
    return make_context(tmp_path, catalog=catalog, **kw)


@pytest.fixture(autouse=True)
def qdrant_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every make_context in the collected tool tests opens catalogues in embedded Qdrant."""
    monkeypatch.setattr(T, "make_context", lambda tmp_path=None, **kw: _qdrant(tmp_path, **kw))
    monkeypatch.setattr(S, "make_settings", lambda tmp_path, **kw: make_settings(
        tmp_path, catalog={"backend": "qdrant", "qdrant_path": str(tmp_path / "qdrant")}, **kw))


def _write(path: Path, rows: list[dict], mat: np.ndarray) -> None:
    path.write_text("".join(json.dumps({**r, "embedding": v.tolist()}) + "\n" for r, v in zip(rows, mat)))


def _brute(mat: np.ndarray, q: np.ndarray, ok: list[bool]) -> list[int]:
    m = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    s = m @ (q / np.linalg.norm(q))
    return [int(r) for r in np.lexsort((np.arange(len(s)), -s)) if ok[r]]


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Path, np.ndarray, list[dict]]:
    rng = np.random.default_rng(3)
    mat = rng.standard_normal((400, 8))
    rows = [{"id": f"p{i}", "category": f"k{i % 7}", "price": [5, 12.5, 30, 99][i % 4] if i % 11 else None,
             "colour": ["red", "blue", "green"][i % 3], "tags": ["a", "b"] if i % 5 == 0 else "a",
             "stock": i % 6 != 0, **({"rare": "yes"} if i % 40 == 0 else {})} for i in range(400)]
    p = tmp_path / "store.jsonl"
    _write(p, rows, mat)
    return p, mat, rows


def test_filters_limits_and_exclusions_match_numpy(tmp_path: Path, store) -> None:
    """Every filter form on plain fields, a field holding lists (not pushed down to Qdrant: decided by our
    evaluation), absent fields, nulls, min_score, exclude and the category limit, against NumPy."""
    p, mat, rows = store
    ctx = _qdrant(tmp_path)
    qv = np.random.default_rng(4).standard_normal(8)
    cases = [
        ({"colour": "red"}, lambda r: r["colour"] == "red"),
        ({"colour": {"not_in": ["red", "blue"]}, "stock": True}, lambda r: r["colour"] == "green" and r["stock"]),
        ({"price": {"min": 10, "max": 30}}, lambda r: r["price"] is not None and 10 <= r["price"] <= 30),
        ({"price": 12.5}, lambda r: r["price"] == 12.5),
        ({"price": None}, lambda r: r["price"] is None),
        ({"price": {"ne": 99}}, lambda r: r["price"] != 99),
        ({"tags": "a"}, lambda r: r["tags"] == "a"),  # a list ["a", "b"] is not equal to "a"
        ({"tags": {"ne": "a"}}, lambda r: r["tags"] != "a"),
        ({"rare": {"ne": "no"}}, lambda r: r.get("rare") != "no"),  # a row without the field passes
        ({"rare": "yes"}, lambda r: r.get("rare") == "yes"),
        ({"category": ["k1", "k3"], "colour": {"ne": "blue"}}, lambda r: r["category"] in ("k1", "k3")
         and r["colour"] != "blue"),
    ]
    for filters, pred in cases:
        out = recommend.run(RecommendInput(vector=qv.tolist(), k=7, filters=filters, catalog=str(p)), ctx)
        want = [f"p{r}" for r in _brute(mat, qv, [pred(r) for r in rows])[:7]]
        assert [it.id for it in out.structured.items] == want, filters
    # category limit with a filter and exclusions: the greedy walk over NumPy's order
    excl = [f"p{r}" for r in _brute(mat, qv, [True] * 400)[:3]]
    out = recommend.run(RecommendInput(vector=qv.tolist(), k=9, category_limit=1, exclude=excl, catalog=str(p),
                                       filters={"stock": True}), ctx)
    seen, want = set(), []
    for r in _brute(mat, qv, [row["stock"] and row["id"] not in excl for row in rows]):
        if rows[r]["category"] not in seen:
            seen.add(rows[r]["category"])
            want.append(f"p{r}")
    assert [it.id for it in out.structured.items] == want[:9] and len(want[:9]) == 7  # 7 categories only
    # min_score: exactly the items at or above it
    s = (mat / np.linalg.norm(mat, axis=1, keepdims=True)) @ (qv / np.linalg.norm(qv))
    out = recommend.run(RecommendInput(vector=qv.tolist(), k=50, min_score=0.5, catalog=str(p)), ctx)
    assert [it.id for it in out.structured.items] == [f"p{r}" for r in _brute(mat, qv, list(s >= 0.5))][:50]


def test_replicas_share_one_collection_and_changes_survive_a_restart(tmp_path: Path, store) -> None:
    """Two engines (two replicas) on one Qdrant: the second opens the collection the first loaded without
    reading the file; an upsert on one is seen by the other's next query; after the client is closed and
    reopened (a restart), the changes are still there."""
    from engine.catalog import qdrant as Q

    p, mat, rows = store
    a, b = _qdrant(tmp_path), _qdrant(tmp_path)
    inf = info.run(InfoInput(catalog=str(p)), a).structured
    assert inf.backend == "qdrant" and inf.index == "qdrant" and inf.collection.startswith("atelier_store_")
    assert inf.rows == 400 and inf.categories == dict(Counter(r["category"] for r in rows).most_common())
    p.write_text("not a catalogue any more\n")  # the second replica must not need the file
    assert info.run(InfoInput(catalog=str(p)), b).structured.rows == 400
    v = mat[17] * 3
    res = upsert.run(UpsertInput(items=[{"id": "new", "category": "k9", "embedding": v.tolist()}],
                                 delete=["p18"], catalog=str(p)), a)
    assert res.structured.durable and res.structured.collection == inf.collection and res.structured.log_file is None
    got = recommend.run(RecommendInput(vector=v.tolist(), k=3, catalog=str(p)), b).structured.items
    assert [it.id for it in got[:2]] == ["new", "p17"] or [it.id for it in got[:2]] == ["p17", "new"]
    assert "p18" not in [it.id for it in recommend.run(RecommendInput(vector=mat[18].tolist(), k=5, catalog=str(p)),
                                                       b).structured.items]
    Q._close_clients()  # a restart: the embedded store is reopened from its folder
    c = _qdrant(tmp_path)
    assert info.run(InfoInput(catalog=str(p)), c).structured.rows == 400  # +1 -1
    got = recommend.run(RecommendInput(item_id="new", k=1, catalog=str(p)), c).structured.items
    assert got[0].id == "p17" and got[0].score == pytest.approx(1.0, abs=1e-5)


def test_in_memory_qdrant_says_changes_are_not_durable_and_keys_are_checked(tmp_path: Path, store) -> None:
    from mcp_server.config import ConfigError, load_settings

    p, _, _ = store
    ctx = make_context(tmp_path, catalog={"backend": "qdrant", "qdrant_path": ":memory:",
                                          "qdrant_api_key": "s3cr3t-key"})
    res = upsert.run(UpsertInput(items=[{"id": "x", "category": "k", "embedding": [1.0] * 8}], catalog=str(p)), ctx)
    assert not res.structured.durable and "in-memory Qdrant" in res.structured.warning and "NOT durable" in res.text
    assert "s3cr3t" not in repr(ctx.settings) and "s3cr3t" not in ctx.settings.model_dump_json()
    with pytest.raises(REFUSED, match=r"items\.seq|reserved"):
        upsert.run(UpsertInput(items=[{"id": "y", "_atelier_seq": 1, "embedding": [1.0] * 8}], catalog=str(p)), ctx)
    # the error names the key and the rule, and hides the URL's credentials (config._mask_secret)
    with pytest.raises(ConfigError, match=r"catalog.qdrant_url = 'http://<hidden>@q:6333': must not carry "
                                          r"credentials") as ei:
        load_settings(None, catalog={"backend": "qdrant", "qdrant_url": "http://u:pw@q:6333"})
    assert "u:pw" not in str(ei.value)
