"""Issue 17 item 4 (the catalogue's part): recommend_topk and catalog_upsert bound their memory before
they start, refuse with "would need N GB; limit M GB", and the bounds hold.

The bounds are checked against measurements, not against our own numbers: the peak resident-set growth
of the process (Linux VmHWM, reset through /proc/self/clear_refs) while the work runs, and for searches
also tracemalloc's peak (NumPy arrays and Python objects). Refusals are checked with a small engine
budget (the per-call limit is the budget less loaded models, `engine.workmem.call_limit`); nothing
changes when a call is refused. The Coalescer keeps each batch's summed bounds under the limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.catalog import Catalog, CatalogService, Coalescer, Query
from engine.workmem import MemoryLimitExceeded

from tools.recommend import TOOLS, RecommendInput, UpsertInput
from tests.helpers import REFUSED

from fakectx import make_context

recommend, upsert, info = TOOLS


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture()
def fresh_pages() -> Iterator[None]:
    """Every allocation of 64 KiB or more gets its own pages, returned when freed (glibc's fixed mmap
    threshold), so the peak RSS growth of a call is the peak of what it holds, not what the heap had
    left over from earlier calls."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    assert libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024) == 1
    yield
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def peak_rss_growth(fn: Any) -> tuple[int, Any]:
    """(peak RSS during fn() minus RSS before it, fn's result)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    out = fn()
    return _status("VmHWM") - before, out


def catalogue(n: int, d: int, *, sketch: bool, seed: int = 0) -> tuple[Catalog, np.ndarray]:
    rng = np.random.default_rng(seed)
    mat = rng.standard_normal((n, d)).astype(np.float32)
    rows = [{"id": f"r{i}", "category": "abc"[i % 3], "price": int(i % 500)} for i in range(n)]
    cat = Catalog(d, chunk_rows=1 << 14, capacity=n, sketch=sketch)
    cat.upsert(rows, torch.from_numpy(mat))
    return cat, mat


@pytest.mark.parametrize("sketch", [False, True])
def test_search_bound_holds_for_the_widest_search(sketch: bool, fresh_pages: None) -> None:
    """A category limit with 3 categories and k=5: the search widens until every valid row was walked (the
    worst case the bound allows for); measured peaks stay under the bound."""
    n = 8_000 if sketch else 30_000
    cat, mat = catalogue(n, 16, sketch=sketch)
    q = Query(vector=torch.from_numpy(mat[7] + 0.5), k=5, category_limit=1, filters={"price": {"min": 1}})
    cat.search_many([Query(vector=torch.from_numpy(mat[3]), k=5, category_limit=1)])  # warm-up (kernels)
    bound = cat.prepare(q).nbytes
    rss, hits = peak_rss_growth(lambda: cat.search_many([q]))
    tracemalloc.start()
    cat._typed.clear()  # the float64 price column is built again, counted
    cat.search_many([q])
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"search bound {bound / 1e6:.1f} MB; peak RSS growth {rss / 1e6:.1f} MB; tracemalloc peak "
          f"{traced / 1e6:.1f} MB")
    assert len(hits[0]) == 3  # one per category: the walk went far enough to know there is no fourth
    assert traced <= bound and rss <= bound
    cat.close()


def test_search_over_the_limit_is_refused_before_it_starts() -> None:
    cat, mat = catalogue(30_000, 8, sketch=False)
    v = torch.from_numpy(mat[0])
    small = cat.prepare(Query(vector=v, k=5)).nbytes
    wide = cat.prepare(Query(vector=v, k=5, category_limit=1)).nbytes
    assert wide > 4 * small
    cat.memory_limit = lambda: (small + wide) // 2
    with pytest.raises(MemoryLimitExceeded) as err:
        cat.search(Query(vector=v, k=5, category_limit=1))
    msg = str(err.value)
    assert msg.startswith("category_limit=1: would need ") and " GB; limit " in msg, msg
    assert [h.id for h in cat.search(Query(vector=v, k=5))][0] == "r0"  # a small search still runs
    cat.close()


def test_coalescer_keeps_each_batch_under_the_limit() -> None:
    co = Coalescer(lambda batch: [x * 10 for x in batch], gather_s=5.0, max_cost=lambda: 100)
    out: dict[int, int] = {}
    ready = threading.Barrier(7)

    def go(x: int) -> None:
        with co.expect():
            ready.wait()
            out[x] = co.submit(x, cost=40 if x < 6 else 250)  # the 250 one runs alone

    threads = [threading.Thread(target=go, args=(x,)) for x in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {x: 10 * x for x in range(7)}
    assert sorted(co.batches) == [1, 2, 2, 2] and sum(co.batches) == 7
    co.close()


# -- through the tools ------------------------------------------------------------------------------
@pytest.fixture()
def shop(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    mat = rng.standard_normal((3000, 8))
    p = tmp_path / "shop.jsonl"
    p.write_text("".join(json.dumps({"id": f"s{i}", "category": "xyz"[i % 3], "price": i % 50,
                                     "embedding": mat[i].tolist()}) + "\n" for i in range(3000)), encoding="utf-8")
    return p


def test_tools_refuse_over_the_engine_budget(tmp_path: Path, shop: Path) -> None:
    ctx = make_context(tmp_path)
    base = info.run(info.input_model(catalog=str(shop)), ctx).structured
    cat = ctx.engine.service("catalog", CatalogService).catalogs()[0][0]
    assert not ctx.engine.registry.used_bytes  # vectors came with the file: no model loaded
    v = [1.0] + [0.0] * 7
    wide = cat.prepare(Query(vector=torch.tensor(v), k=5, category_limit=1)).nbytes
    items = [{"id": f"n{i}", "category": "x", "price": 1, "embedding": [1.0] * 8} for i in range(5000)]
    up = cat.upsert_bytes(5000, 5000, 0)
    ctx.engine.registry.budget_bytes = min(wide, up) - 1  # over both
    with pytest.raises(REFUSED) as err:
        recommend.run(RecommendInput(vector=v, k=5, category_limit=1, catalog=str(shop)), ctx)
    assert str(err.value).startswith("category_limit=1: would need "), str(err.value)
    with pytest.raises(REFUSED) as err:
        upsert.run(UpsertInput(items=items, catalog=str(shop)), ctx)
    msg = str(err.value)
    assert msg.startswith("items='<5000 items>': would need ") and "; limit " in msg, msg
    after = info.run(info.input_model(catalog=str(shop)), ctx).structured
    assert (after.rows, after.capacity) == (base.rows, base.capacity)
    # within the limit both run
    ctx.engine.registry.budget_bytes = 4 * max(wide, up)
    assert len(recommend.run(RecommendInput(vector=v, k=5, category_limit=1, catalog=str(shop)),
                             ctx).structured.items) == 3
    assert upsert.run(UpsertInput(items=items, catalog=str(shop)), ctx).structured.added == 5000


def test_opening_a_catalogue_over_the_limit_is_refused(tmp_path: Path, shop: Path) -> None:
    ctx = make_context(tmp_path)
    ctx.engine.registry.budget_bytes = 1_000_000  # 3000 rows x 8 dims need more than 1 MB
    with pytest.raises(REFUSED) as err:
        info.run(info.input_model(catalog=str(shop)), ctx)
    msg = str(err.value)
    assert msg.startswith(f"catalog={str(shop.resolve())!r}: would need ") and "loading 3000 rows of 8 dims" in msg, msg
    assert ctx.engine.service("catalog", CatalogService).catalogs() == []
    ctx.engine.registry.budget_bytes = 100_000_000
    assert info.run(info.input_model(catalog=str(shop)), ctx).structured.rows == 3000


def test_upsert_and_embedding_bounds_hold(tmp_path: Path, fresh_pages: None) -> None:
    """Measured peak RSS growth of a 20,000-item vector upsert (the catalogue grows: the matrix, mask and
    columns are copied) and of embedding 128 short texts and 16 long ones stays under the estimates."""
    cat, _ = catalogue(20_000, 64, sketch=True, seed=4)
    rng = np.random.default_rng(5)
    vecs = torch.from_numpy(rng.standard_normal((20_000, 64)).astype(np.float32))
    rows = [{"id": f"u{i}", "category": "d", "price": i, "note": "x"} for i in range(20_000)]
    bound = cat.upsert_bytes(20_000, 20_000, 1)
    rss, res = peak_rss_growth(lambda: cat.apply(rows, vecs))
    print(f"upsert of 20,000 x 64: bound {bound / 1e6:.1f} MB; peak RSS growth {rss / 1e6:.1f} MB")
    assert res == (20_000, 0, 0) and rss <= bound
    cat.close()

    from engine.embed import get_embedder

    ctx = make_context(tmp_path)
    emb = get_embedder(ctx.engine, "")
    texts = [f"{w} number {i} with a braided nylon jacket" for i, w in
             enumerate(["usb-c cable", "phone case", "wall charger", "power bank"] * 32)]
    emb.encode(texts[:64])  # warm-up: the first forward sets up kernels and thread pools
    est = emb.estimate_bytes(texts)
    rss, out = peak_rss_growth(lambda: emb.encode(texts))
    print(f"embedding 128 texts: bound {est / 1e6:.1f} MB; peak RSS growth {rss / 1e6:.1f} MB")
    assert out.shape == (128, 384) and rss <= est
    long = [f"{' '.join(['cable'] * 300)} {i}" for i in range(16)]  # truncated at max_length (256) tokens
    est = emb.estimate_bytes(long)
    rss, out = peak_rss_growth(lambda: emb.encode(long))
    print(f"embedding 16 long texts: bound {est / 1e6:.1f} MB; peak RSS growth {rss / 1e6:.1f} MB")
    assert out.shape == (16, 384) and rss <= est
