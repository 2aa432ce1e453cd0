"""engine.catalog.ann + Catalog with an HNSW index (issue 18.2), on small clustered catalogues.

Oracles: NumPy brute force over the same normalised vectors (the exact top-k, the exact filtered top-k, the
greedy category-limited walk). Recall is approximate by design and held to a floor; what must be exact is
checked exactly: every returned item passes the filter, the category limit is obeyed, deleted and excluded
items never come back, an upsert is found by the next query, a very selective filter falls back to the
exact answer, and a saved index is reloaded only when it fits.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, EngineConfig
from engine.catalog import Catalog, CatalogService, Query
from engine.catalog.ann import HnswIndex

N, DIM, K = 3000, 32, 10


def _clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, DIM))
    lab = rng.integers(0, 60, n)
    x = centres[lab] + rng.standard_normal((n, DIM)) * 0.35
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), lab


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mat, lab = _clustered(N + 40, 18)
    return mat[:N], lab[:N], mat[N:]


def _rows(lab: np.ndarray) -> list[dict]:
    return [{"id": f"i{i}", "category": f"c{lab[i] % 12}", "dept": int(i % 10), "rare": i % 100 == 0}
            for i in range(len(lab))]


def _catalog(mat: np.ndarray, lab: np.ndarray, index: bool = True) -> Catalog:
    cat = Catalog(DIM, capacity=len(mat))
    cat.upsert(_rows(lab), torch.from_numpy(mat))
    if index:
        cat.build_index(HnswIndex(DIM, M=16, ef_construction=100, ef_search=64, threads=1))
    return cat


def _order(mat: np.ndarray, q: np.ndarray, ok: np.ndarray | None = None) -> list[int]:
    s = mat.astype(np.float64) @ (q / np.linalg.norm(q)).astype(np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return [int(r) for r in order if ok is None or ok[r]]


def _walk(order: list[int], cats: list[str], limit: int, k: int) -> list[int]:
    seen: Counter[str] = Counter()
    out = []
    for r in order:
        if seen[cats[r]] < limit:
            seen[cats[r]] += 1
            out.append(r)
            if len(out) == k:
                break
    return out


def _ids(hits) -> list[int]:  # noqa: ANN001
    return [int(h.id[1:]) for h in hits]


def test_recall_filters_and_limits_against_numpy(data) -> None:  # noqa: ANN001
    mat, lab, qs = data
    cat = _catalog(mat, lab)
    rows = _rows(lab)
    cats = [r["category"] for r in rows]
    dept3 = np.array([r["dept"] == 3 for r in rows])
    rec = {"plain": [], "filter": [], "limit": []}
    for q in qs:
        qt = torch.from_numpy(q)
        got = _ids(cat.search(Query(vector=qt, k=K)))
        rec["plain"].append(len(set(got) & set(_order(mat, q)[:K])) / K)
        got = _ids(cat.search(Query(vector=qt, k=K, filters={"dept": 3})))
        assert len(got) == K and all(rows[r]["dept"] == 3 for r in got)  # exact: every item passes
        rec["filter"].append(len(set(got) & set(_order(mat, q, dept3)[:K])) / K)
        got = _ids(cat.search(Query(vector=qt, k=K, category_limit=2)))
        assert len(got) == K and max(Counter(cats[r] for r in got).values()) <= 2  # exact: the limit holds
        rec["limit"].append(len(set(got) & set(_walk(_order(mat, q), cats, 2, K))) / K)
    means = {k: float(np.mean(v)) for k, v in rec.items()}
    print(f"\nhnsw recall@10 on {N} clustered rows: {means}")
    assert means["plain"] >= 0.9 and means["filter"] >= 0.85 and means["limit"] >= 0.85


def test_very_selective_filter_and_min_score_stay_exact(data) -> None:  # noqa: ANN001
    mat, lab, qs = data
    cat, ref = _catalog(mat, lab), _catalog(mat, lab, index=False)
    rows = _rows(lab)
    for q in qs[:10]:
        qt = torch.from_numpy(q)
        for query in (Query(vector=qt, k=K, filters={"rare": True}),  # 1 % of rows: the exact scan answers
                      Query(vector=qt, k=200, filters={"rare": True}),  # more than exist: all of them, exactly
                      Query(vector=qt, k=K, filters={"rare": True}, min_score=0.2)):
            assert [(h.id, h.score) for h in cat.search(query)] == [(h.id, h.score) for h in ref.search(query)]
        query = Query(vector=qt, k=K, exclude_rows=frozenset(range(0, N, 2)), filters={"dept": {"in": [1, 3]}})
        got = cat.search(query)
        assert len(got) == K and all(h.row % 2 == 1 and rows[h.row]["dept"] in (1, 3) for h in got)


def test_upserts_and_deletes_visible_without_rebuild(data) -> None:  # noqa: ANN001
    mat, lab, qs = data
    cat = _catalog(mat, lab)
    index = cat.index
    q = qs[0]
    cat.apply([{"id": "fresh", "category": "new"}], torch.from_numpy(q[None]))
    assert cat.search(Query(vector=torch.from_numpy(q), k=1))[0].id == "fresh"
    top = cat.search(Query(vector=torch.from_numpy(q), k=3))
    victim = top[1].id
    cat.apply([{"id": victim, "category": "moved"}], torch.from_numpy(-q[None]))  # an update moves it away
    assert victim not in [h.id for h in cat.search(Query(vector=torch.from_numpy(q), k=20))]
    assert cat.search(Query(vector=torch.from_numpy(-q), k=1))[0].id == victim
    cat.apply([], None, ["fresh"])
    got = [h.id for h in cat.search(Query(vector=torch.from_numpy(q), k=K))]
    assert "fresh" not in got
    live = [r for r in range(N) if f"i{r}" != victim]
    want = [f"i{live[r]}" for r in _order(mat[live], q)[:K]]
    assert len(set(got) & set(want)) >= 8
    assert cat.index is index  # no rebuild


def test_compaction_rebuilds_and_answers_stay_valid(data) -> None:  # noqa: ANN001
    mat, lab, qs = data
    cat = _catalog(mat, lab)
    gone = [f"i{i}" for i in range(0, N) if i % 3 != 0]  # 2000 of 3000: tombstones are compacted
    cat.delete(gone)
    assert cat._dead == 0  # compacted: positions moved, the graph was rebuilt with the new labels
    keep = np.arange(0, N, 3)
    for q in qs[:10]:
        got = [h.id for h in cat.search(Query(vector=torch.from_numpy(q), k=K))]
        want = [f"i{keep[r]}" for r in _order(mat[keep], q)[:K]]
        assert set(got) <= {f"i{i}" for i in keep}
        assert len(set(got) & set(want)) >= 8


def _write(path: Path, mat: np.ndarray, lab: np.ndarray) -> None:
    with path.open("w") as fh:
        for r, v in zip(_rows(lab), mat):
            fh.write(json.dumps({**r, "embedding": v.tolist()}) + "\n")


def _svc(cache: Path) -> CatalogService:
    svc = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=str(cache))))
    svc.index, svc.hnsw_ef_construction = "hnsw", 100
    return svc


def test_index_saved_atomically_and_reloaded_only_when_it_fits(tmp_path: Path, data) -> None:  # noqa: ANN001
    mat, lab, qs = data
    src = tmp_path / "cat.jsonl"
    _write(src, mat[:1500], lab[:1500])
    svc = _svc(tmp_path / "cache")
    cat, rep = svc.open(src)
    assert rep.index == "hnsw" and not rep.index_loaded and Path(rep.index_file).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []  # no temp file left
    first = [[h.id for h in cat.search(Query(vector=torch.from_numpy(q), k=K))] for q in qs[:5]]
    cat2, rep2 = _svc(tmp_path / "cache").open(src)  # a restart: the saved graph fits, it is loaded
    assert rep2.index_loaded and rep2.index_build_s == 0.0
    assert [[h.id for h in cat2.search(Query(vector=torch.from_numpy(q), k=K))] for q in qs[:5]] == first
    svc2 = _svc(tmp_path / "cache")
    cat3, _ = svc2.open(src)
    svc2.upsert(cat3, [{"id": "late", "category": "x"}], [torch.from_numpy(qs[0])])  # logged, index not saved
    cat4, rep4 = _svc(tmp_path / "cache").open(src)  # kill -9 before a save: the old graph does not fit
    assert not rep4.index_loaded and cat4.search(Query(vector=torch.from_numpy(qs[0]), k=1))[0].id == "late"
    svc2.close()  # shutdown saves the changed index
    cat5, rep5 = _svc(tmp_path / "cache").open(src)
    assert rep5.index_loaded and cat5.search(Query(vector=torch.from_numpy(qs[0]), k=1))[0].id == "late"
    # a damaged index file is not used: rebuilt
    Path(rep5.index_file).write_bytes(b"\0" * 100)
    cat6, rep6 = _svc(tmp_path / "cache").open(src)
    assert not rep6.index_loaded and cat6.search(Query(vector=torch.from_numpy(qs[0]), k=1))[0].id == "late"


def test_tools_with_the_index(tmp_path: Path, data) -> None:  # noqa: ANN001
    """models.catalog_index = "hnsw" through the tools: info says so, filters and limits hold, upserts show."""
    from tools.recommend import TOOLS, InfoInput, RecommendInput, UpsertInput

    from fakectx import make_context

    recommend, upsert, info = TOOLS
    mat, lab, qs = data
    src = tmp_path / "cat.jsonl"
    _write(src, mat[:1200], lab[:1200])
    ctx = make_context(tmp_path, models={"catalog_index": "hnsw"})
    inf = info.run(InfoInput(catalog=str(src)), ctx).structured
    assert inf.index == "hnsw" and inf.index_bytes > 0
    out = recommend.run(RecommendInput(vector=qs[1].tolist(), k=6, category_limit=1, filters={"dept": {"min": 5}},
                                       catalog=str(src)), ctx).structured.items
    assert len(out) == 6 and len({it.category for it in out}) == 6 and all(it.fields["dept"] >= 5 for it in out)
    upsert.run(UpsertInput(items=[{"id": "new", "category": "z", "embedding": qs[1].tolist()}], catalog=str(src)), ctx)
    assert recommend.run(RecommendInput(vector=qs[1].tolist(), k=1, catalog=str(src)), ctx).structured.items[0].id \
        == "new"
    exact = make_context(tmp_path)  # the default stays the exact scan
    assert info.run(InfoInput(catalog=str(src)), exact).structured.index == "exact"


def test_filter_and_category_recall_on_a_hard_clustered_set() -> None:
    """The hard case of issue 18's benchmark, small: 20 000 rows of 64 dims in 1 000 clusters (20 rows each,
    cosine ~0.7 to their centre, centres nearly orthogonal), a 10 % filter and 50 categories that are
    functions of the cluster, so for most queries the valid items and the other categories lie outside the
    query's own cluster, deep in the graph's order, where an HNSW graph is least accurate. The graph is
    deliberately coarse (M = 5) so that the pool and ef sizing decide the recall. Oracle: NumPy float64
    brute force over the valid rows, and the greedy category walk over NumPy's order. Recall >= 0.90 both as
    configured (where the exact scan over the filtered rows is cheaper, it answers) and with the graph forced
    for every query (`ann_exact_ratio = 1`: only widening past the catalogue falls back)."""
    n, dim, ncl, nq = 20_000, 64, 1000, 60
    rng = np.random.default_rng(18)
    centres = rng.standard_normal((ncl, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, ncl, n + nq)
    x = centres[lab] + rng.standard_normal((n + nq, dim)) / np.sqrt(dim)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    mat, qs, lab = x[:n], x[n:], lab[:n]
    rows = [{"id": f"i{i}", "category": f"c{lab[i] % 50}", "dept": int(lab[i] % 10)} for i in range(n)]
    cat = Catalog(dim, capacity=n)
    cat.upsert(rows, torch.from_numpy(mat))
    cat.build_index(HnswIndex(dim, M=5, ef_construction=24, ef_search=64, threads=1))
    ok = lab % 10 == 3
    cats = [r["category"] for r in rows]
    truth = {"filter": [set(_order(mat, q, ok)[:K]) for q in qs],
             "limit": [set(_walk(_order(mat, q), cats, 2, K)) for q in qs]}
    for ratio in ("as configured", 1):
        if ratio == 1:
            cat.ann_exact_ratio = 1
        rec = {"filter": [], "limit": []}
        for q, tf, tl in zip(qs, truth["filter"], truth["limit"]):
            qt = torch.from_numpy(q)
            got = [h.row for h in cat.search(Query(vector=qt, k=K, filters={"dept": 3}))]
            assert len(got) == K and all(ok[r] for r in got)
            rec["filter"].append(len(set(got) & tf) / K)
            got = [h.row for h in cat.search(Query(vector=qt, k=K, category_limit=2))]
            assert len(got) == K and max(Counter(cats[r] for r in got).values()) <= 2
            rec["limit"].append(len(set(got) & tl) / K)
        means = {k: float(np.mean(v)) for k, v in rec.items()}
        print(f"\nann_exact_ratio={ratio}: recall@10 {means}")
        assert means["filter"] >= 0.90 and means["limit"] >= 0.90, (ratio, means)
