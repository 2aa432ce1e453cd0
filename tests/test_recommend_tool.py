"""tools.recommend through a FakeContext: vector catalogues (no model), bad input, the demo + MiniLM.

Expected orders come from NumPy brute force; MiniLM embeddings are checked
against transformers' hidden states mean-pooled in NumPy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools.base import ToolError

from tools.recommend import TOOLS, InfoInput, RecommendInput, UpsertInput
from tests.helpers import REFUSED

from fakectx import FakeContext, make_context

recommend, upsert, info = TOOLS


@pytest.fixture()
def shop(tmp_path: Path) -> tuple[Path, np.ndarray, list[dict]]:
    rng = np.random.default_rng(11)
    mat = rng.standard_normal((40, 6))
    rows = [{"id": f"s{i}", "category": ["cable", "case", "charger"][i % 3], "name": f"thing {i}",
             "price": float(i), "in_stock": i % 4 != 0} for i in range(40)]
    lines = [json.dumps({**r, "embedding": mat[i].tolist()}) for i, r in enumerate(rows)]
    lines.insert(5, "{broken")
    p = tmp_path / "shop.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p, mat, rows


def brute(mat: np.ndarray, q: np.ndarray, ok: list[bool]) -> list[int]:
    m = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    s = m @ (q / np.linalg.norm(q))
    return [int(r) for r in np.lexsort((np.arange(len(s)), -s)) if ok[r]]


def test_vector_query_filters_and_warnings(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, mat, rows = shop
    ctx = make_context(tmp_path)
    q = np.random.default_rng(5).standard_normal(6)
    out = recommend.run(RecommendInput(vector=q.tolist(), k=4, catalog=str(p),
                                       filters={"price": {"min": 5, "max": 30}, "in_stock": True},
                                       exclude=["s6", "nope"]), ctx)
    ok = [5 <= r["price"] <= 30 and r["in_stock"] and r["id"] != "s6" for r in rows]
    assert [it.id for it in out.structured.items] == [f"s{r}" for r in brute(mat, q, ok)[:4]]
    assert out.structured.warnings and out.structured.warnings[0].startswith("line 6")
    assert "4 item(s)" in out.text


def test_item_id_excludes_itself_and_upsert_is_visible(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, mat, rows = shop
    ctx = make_context(tmp_path)
    out = recommend.run(RecommendInput(item_id="s3", k=3, category_limit=1, catalog=str(p)), ctx)
    order = [r for r in brute(mat, mat[3], [i != 3 for i in range(40)])]
    want, seen = [], set()
    for r in order:
        if rows[r]["category"] not in seen:
            seen.add(rows[r]["category"])
            want.append(f"s{r}")
    assert [it.id for it in out.structured.items] == want[:3]
    new_vec = (mat[3] * 2).tolist()
    res = upsert.run(UpsertInput(items=[{"id": "twin", "category": "cable", "embedding": new_vec}],
                                 delete=[want[0]], catalog=str(p)), ctx)
    assert (res.structured.added, res.structured.deleted, res.structured.rows) == (1, 1, 40)
    out2 = recommend.run(RecommendInput(item_id="s3", k=2, catalog=str(p)), ctx)
    assert out2.structured.items[0].id == "twin" and out2.structured.items[0].score == pytest.approx(1.0)
    assert want[0] not in [it.id for it in out2.structured.items]
    inf = info.run(InfoInput(catalog=str(p)), ctx).structured
    assert inf.rows == 40 and inf.dims == 6 and inf.model == "provided" and inf.categories["cable"] == 14


@pytest.mark.parametrize("args,match", [
    ({"vector": [1.0] * 6, "k": 0}, "k=0"),
    ({"vector": [1.0] * 6, "k": 1001}, "limits.max_k"),
    ({"vector": [1.0] * 5}, "expected 6 numbers"),
    ({"item_id": "missing"}, "unknown item id"),
    ({"vector": [1.0] * 6, "filters": {"colour": "red"}}, "unknown field"),
    ({"vector": [1.0] * 6, "filters": {"price": {"between": 3}}}, "filters.price"),
    ({"vector": [1.0] * 6, "text": "x"}, "exactly one"),
    ({"vector": [0.0] * 6}, "not all zero"),
])
def test_bad_input(tmp_path: Path, shop, args: dict, match: str) -> None:  # noqa: ANN001
    p, _, _ = shop
    ctx = make_context(tmp_path)
    with pytest.raises(REFUSED, match=match):
        recommend.run(RecommendInput(catalog=str(p), **args), ctx)


def test_bad_upserts_and_size_limit(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, _, _ = shop
    ctx = make_context(tmp_path)
    with pytest.raises(REFUSED, match=r"items\[0\]: 'id'"):
        upsert.run(UpsertInput(items=[{"name": "no id"}], catalog=str(p)), ctx)
    with pytest.raises(REFUSED, match="expected 6 numbers"):
        upsert.run(UpsertInput(items=[{"id": "x", "embedding": [1.0, 2.0]}], catalog=str(p)), ctx)
    with pytest.raises(REFUSED, match="unknown item id"):
        upsert.run(UpsertInput(delete=["nope"], catalog=str(p)), ctx)
    small = make_context(tmp_path, limits={"max_catalog_rows": 10})
    with pytest.raises(REFUSED, match="more than 10 rows"):
        info.run(InfoInput(catalog=str(p)), small)


def test_catalog_path_goes_through_the_sandbox(tmp_path: Path, shop) -> None:  # noqa: ANN001
    class Sandboxed(FakeContext):
        def resolve_input(self, path: str, argument: str) -> Path:
            raise ToolError.invalid(argument, path, "outside the read roots")

    base = make_context(tmp_path)
    ctx = Sandboxed(base.engine, base.settings)
    with pytest.raises(REFUSED, match="catalog='/etc/passwd': outside the read roots"):
        recommend.run(RecommendInput(vector=[1.0] * 6, catalog="/etc/passwd"), ctx)


def test_minilm_matches_numpy_mean_pooling(tmp_path: Path) -> None:
    import torch

    from engine._compat import model_libraries

    model_libraries()  # the torchvision shim first, as the engine does before any transformers import
    from transformers import AutoModel, AutoTokenizer

    from engine.embed import get_embedder, model_folder

    ctx = make_context(tmp_path)
    texts = ["usb-c charging cable", "a leather phone case", "noise-cancelling headphones"]
    ours = get_embedder(ctx.engine, "").encode(texts).numpy()
    folder = model_folder("")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    want = []
    for t in texts:  # one text at a time: no padding at all
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0].numpy().astype(np.float64)
        v = h.mean(axis=0)
        want.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(ours, np.array(want), atol=2e-5)
    sims = ours @ ours.T
    assert sims[0, 1] < 0.9 and np.allclose(np.diag(sims), 1.0, atol=1e-5)


@pytest.mark.slow
def test_demo_first_command_and_upsert(tmp_path: Path) -> None:
    ctx = make_context(tmp_path)
    accessories = ["phone case", "charger", "cable", "screen protector", "power bank", "wireless charger"]
    out = recommend.run(RecommendInput(text="accessories for a Pixel 9 phone", k=5, category_limit=2,
                                       filters={"category": accessories}), ctx)
    items = out.structured.items
    assert len(items) == 5 and all(it.category in accessories for it in items)
    assert max(sum(it.category == c for it in items) for c in accessories) <= 2
    assert [it.score for it in items] == sorted((it.score for it in items), reverse=True)
    inf = info.run(InfoInput(), ctx).structured
    assert inf.catalog == "demo" and inf.rows >= 300 and inf.dims == 384 and len(inf.categories) >= 8
    upsert.run(UpsertInput(items=[{"id": "ZZ-1", "category": "phone case", "name": "Pixel 9 armour case",
                                   "description": "tough case for the Pixel 9 phone"}]), ctx)
    out2 = recommend.run(RecommendInput(text="Pixel 9 armour case", k=3), ctx)
    assert out2.structured.items[0].id == "ZZ-1"
    upsert.run(UpsertInput(delete=["ZZ-1"]), ctx)


def test_fields_only_update_keeps_the_stored_vector_and_new_items_need_one(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, mat, rows = shop
    ctx = make_context(tmp_path)
    res = upsert.run(UpsertInput(items=[{"id": "s7", "price": 99}], catalog=str(p)), ctx)
    assert (res.structured.added, res.structured.updated) == (0, 1)
    out = recommend.run(RecommendInput(vector=mat[7].tolist(), k=1, catalog=str(p)), ctx)
    hit = out.structured.items[0]
    assert hit.id == "s7" and hit.score == pytest.approx(1.0)  # the same vector as before
    assert hit.fields["price"] == 99 and hit.fields["name"] == "thing 7"  # merged, not replaced
    with pytest.raises(REFUSED) as err:
        upsert.run(UpsertInput(items=[{"id": "f1", "price": 99}], catalog=str(p)), ctx)
    msg = str(err.value)
    assert msg.startswith("items[0]='f1': this catalogue carries its own vectors") and "'embedding' of 6" in msg
    assert "query by vector" not in msg


def test_exclusion_filters_match_numpy(tmp_path: Path, shop) -> None:  # noqa: ANN001
    p, mat, rows = shop
    ctx = make_context(tmp_path)
    q = np.random.default_rng(9).standard_normal(6)
    for filters, ok in [
        ({"category": {"not_in": ["cable", "case"]}}, [r["category"] not in ("cable", "case") for r in rows]),
        ({"category": {"ne": "cable"}, "price": {"max": 30}}, [r["category"] != "cable" and r["price"] <= 30
                                                              for r in rows]),
        ({"in_stock": {"ne": True}}, [not r["in_stock"] for r in rows]),
    ]:
        out = recommend.run(RecommendInput(vector=q.tolist(), k=5, catalog=str(p), filters=filters), ctx)
        assert [it.id for it in out.structured.items] == [f"s{r}" for r in brute(mat, q, ok)[:5]], filters
    # with the category limit: at most one per category among the non-cables, exact order
    out = recommend.run(RecommendInput(vector=q.tolist(), k=5, catalog=str(p), category_limit=1,
                                       filters={"category": {"not_in": ["cable"]}}), ctx)
    want, seen = [], set()
    for r in brute(mat, q, [row["category"] != "cable" for row in rows]):
        if rows[r]["category"] not in seen:
            seen.add(rows[r]["category"])
            want.append(f"s{r}")
    assert [it.id for it in out.structured.items] == want
    with pytest.raises(REFUSED, match="filters.category.not_in"):
        recommend.run(RecommendInput(vector=q.tolist(), k=5, catalog=str(p),
                                     filters={"category": {"not_in": []}}), ctx)
