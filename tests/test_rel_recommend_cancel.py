"""Issue 17 item 3 (the catalogue's part): a cancelled catalog_upsert commits fully or not at all.

The server cancels a call's CancelToken when its client goes away; here the token is cancelled from the
progress callback, i.e. mid-embedding, as a disconnect would. A 20,000-item upsert (new ids, an update
of an existing item and a delete) cancelled after two embedding chunks must leave the catalogue exactly
as it was (rows, fields, version, search answers), and must stop embedding within a chunk. Cancelling at
the last moment (after the last chunk) also changes nothing; an uncancelled call commits everything in
one step. The embedder is the packaged MiniLM (the real `encode`, which checks the token per chunk).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine.errors import Cancelled, InvalidInput
from engine.catalog import Catalog, CatalogService, Query
from tools.recommend import TOOLS, RecommendInput, UpsertInput

from fakectx import FakeContext, make_context

recommend, upsert, info = TOOLS
WORDS = ["usb-c cable", "leather case", "wall charger", "screen protector", "power bank", "car mount"]


@pytest.fixture()
def texts_catalog(tmp_path: Path) -> Path:
    p = tmp_path / "shop.jsonl"
    p.write_text("".join(json.dumps({"id": f"t{i}", "category": WORDS[i % 6].split()[-1],
                                     "name": f"{WORDS[i % 6]} model {i}", "price": i}) + "\n" for i in range(24)),
                 encoding="utf-8")
    return p


class CancelAt(FakeContext):
    """Cancels its token when embedding progress reaches `at` items (a client that went away)."""

    def __init__(self, base: FakeContext, at: int) -> None:
        super().__init__(base.engine, base.settings)
        self.at = at

    def report(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        super().report(progress, total, message)
        if message and message.startswith("embedded") and progress >= self.at:
            self.token.cancel("client disconnected")


def snapshot(cat: Catalog) -> dict[str, Any]:
    q = Query(vector=cat.vector("t3"), k=10, filters={"price": {"max": 30}})
    return {"rows": len(cat), "version": cat.version, "fields": cat.fields(), "t3": cat.item("t3"),
            "t5": cat.item("t5"), "ids": sorted(cat._row_of), "hits": [(h.id, h.score) for h in cat.search(q)],
            "categories": cat.categories()}


def big_upsert(catalog: str) -> UpsertInput:
    items = [{"id": f"new{i}", "category": "cable", "name": f"braided cable {i}", "price": i % 97}
             for i in range(20_000)]
    items.append({"id": "t3", "name": "renamed leather case", "price": 999})
    return UpsertInput(items=items, delete=["t5"], catalog=catalog)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeContext]:
    """One engine for the module: MiniLM is loaded once (each test opens its own catalogue file)."""
    ctx = make_context(tmp_path_factory.mktemp("engine"))
    yield ctx
    ctx.engine.close()


@pytest.mark.parametrize("last", [False, True])  # after the first chunk of 64; after the last chunk
def test_cancelled_20000_item_upsert_leaves_the_catalogue_unchanged(base: FakeContext, texts_catalog: Path,
                                                                    last: bool) -> None:
    info.run(info.input_model(catalog=str(texts_catalog)), base)
    cat = next(c for c, _ in base.engine.service("catalog", CatalogService).catalogs()
               if c.source == str(texts_catalog.resolve()))
    before = snapshot(cat)
    if last:  # embedding all 20,000 texts takes minutes on 2 cores: the same path with 70 items
        args = UpsertInput(items=big_upsert(str(texts_catalog)).items[-70:], delete=["t5"],
                           catalog=str(texts_catalog))
        ctx = CancelAt(base, 70)
    else:
        args = big_upsert(str(texts_catalog))
        ctx = CancelAt(base, 64)
    with pytest.raises(Cancelled):
        upsert.run(args, ctx)
    embedded = [p for p, _, m in ctx.progress if m and m.startswith("embedded")]
    assert max(embedded) == (70 if last else 64), embedded  # not 20,000: stopped at the next chunk
    assert snapshot(cat) == before
    # the same call, not cancelled, commits all of it at once
    small = UpsertInput(items=args.items[-40:], delete=["t5"], catalog=str(texts_catalog))
    out = upsert.run(small, base).structured
    assert (out.added, out.updated, out.deleted, out.rows) == (39, 1, 1, 24 + 39 - 1)
    assert cat.item("t3")["name"] == "renamed leather case" and not cat.has("t5")
    got = recommend.run(RecommendInput(text="renamed leather case", k=1, catalog=str(texts_catalog)), base)
    assert got.structured.items[0].id == "t3"


def test_apply_checks_everything_before_changing_anything() -> None:
    """Catalog.apply: an unknown id to delete refuses the whole change (rows not added either)."""
    cat = Catalog(3)
    cat.upsert([{"id": "a", "price": 1}, {"id": "b", "price": 2}], torch.eye(3)[:2])
    v0 = cat.version
    with pytest.raises(InvalidInput, match="delete='zz': unknown item id"):
        cat.apply([{"id": "c", "price": 3}], torch.eye(3)[2:], delete=["a", "zz"])
    assert (len(cat), cat.version, cat.has("c"), cat.has("a")) == (2, v0, False, True)
    with pytest.raises(InvalidInput, match="vectors"):
        cat.apply([{"id": "c"}], torch.eye(3)[:2])
    assert cat.apply([{"id": "c", "price": 3}], torch.eye(3)[2:], delete=["a"]) == (1, 0, 1)
    assert sorted(cat._row_of) == ["b", "c"]
    cat.close()
