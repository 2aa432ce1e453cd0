"""Exact top-k latency: our catalogue engine (and the recommend_topk tool in-process) vs NumPy and faiss.

    python benchmarks/recommend_bench.py            # 100 000 and 1 000 000 items x 384 dims, k = 10
    python benchmarks/recommend_bench.py --quick    # 20 000 items, smoke run
    python benchmarks/recommend_bench.py --durable  # only the change log: cost per upserted item, replay of 100k
    python benchmarks/recommend_bench.py --hnsw 200000   # only the approximate index, on N clustered rows
    python benchmarks/recommend_bench.py --filters 1000000  # a filter's exact scan: every row vs its rows alone
    nice -n 10 python benchmarks/recommend_bench.py --rows 1000000  # issue 18's figures: the index at N rows
                                                    # (FAISS HNSW baseline, usearch with --usearch) + the change log

For each size: single queries and batches of 16, best of a few repetitions
(the machine is shared). Baselines, measured in the same run on the same
vectors: NumPy (matrix product + argpartition + sort of the k) and faiss-cpu
IndexFlatIP. Ours: `engine.catalog.Catalog` in fp32 (the default: the int8
sketch scan with exact fp32 rescoring), fp32 without the sketch (the plain
BLAS scan, for reference) and fp16 (`models.embedding_dtype = "float16"`),
plus the tool (`recommend_topk` with a vector) in-process; the tool's batch is 16 concurrent calls, coalesced by
the engine. Prints GB/s of embeddings scanned against a measured copy
bandwidth, the ratio to the best baseline (target <= 1.0) and the resident
size of a fp16 catalogue (target <= 0.9 GB at 1M). Always exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

D, K, BATCH = 384, 10, 16


def best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def copy_bandwidth() -> float:
    a = np.ones(64 * 1024 * 1024, dtype=np.float32)  # 256 MB
    b = np.empty_like(a)
    ms = best_ms(lambda: np.copyto(b, a), 3)
    return 2 * a.nbytes / (ms / 1000) / 1e9  # read + write


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def np_topk(mat: np.ndarray, qs: np.ndarray) -> np.ndarray:
    s = qs @ mat.T if qs.shape[0] > 1 else (mat @ qs[0])[None]
    part = np.argpartition(-s, K, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def run_size(n: int, reps: int, bw: float) -> list[str]:
    import faiss

    from engine.catalog import Catalog, CatalogService, LoadReport, Query
    from fakectx import make_context
    from tools.recommend import TOOLS, RecommendInput

    lines = []
    rng = np.random.default_rng(0)
    mat = rng.standard_normal((n, D), dtype=np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    qs = rng.standard_normal((BATCH, D), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    rows = [{"id": str(i), "category": f"c{i % 50}"} for i in range(n)]

    index = faiss.IndexFlatIP(D)
    index.add(mat)
    ctx = make_context(None)
    results: dict[str, dict[str, float]] = {}
    # fp16 first: its resident size is measured before any other catalogue was freed (freed pages are
    # reused without showing as growth, so the later configurations' "grew" figures under-report)
    configs = [("ours fp16", torch.float16, None), ("ours fp32", torch.float32, None),
               ("fp32 no sketch", torch.float32, False)]
    for name, dtype, use_sketch in configs:
        gc.collect()
        before = rss()
        t0 = time.perf_counter()
        cat = Catalog(D, dtype=dtype, capacity=n, model="bench", source="bench", sketch=use_sketch)
        cat.upsert(rows, torch.from_numpy(mat))
        load_s = time.perf_counter() - t0
        gc.collect()
        grown = rss() - before
        tq = [torch.from_numpy(qs[i]) for i in range(BATCH)]
        # exactness against numpy on this data
        if dtype == torch.float16:  # the oracle: float64 scores of the stored fp16 rows, ties to the lower row
            s16 = mat.astype(np.float16).astype(np.float64) @ qs[0].astype(np.float64)
            ref = np.lexsort((np.arange(n), -s16))[:K].tolist()
        else:
            ref = np_topk(mat, qs[:1])[0].tolist()
        got = [h.row for h in cat.search(Query(vector=tq[0], k=K))]
        results[name] = {
            "single": best_ms(lambda: cat.search(Query(vector=tq[0], k=K)), reps),
            "batch": best_ms(lambda: cat.search_many([Query(vector=v, k=K) for v in tq]), max(1, reps // 3)),
        }
        grew = (f"process RSS grew {grown / 1e9:.3f} GB (matrix + sketch + row metadata)" if name == configs[0][0]
                else "RSS not comparable (reuses the pages of the catalogue freed before it)")
        lines.append(f"  {name}: matrix {cat.device_bytes / 1e9:.3f} GB + int8 sketch {cat.sketch_bytes / 1e9:.3f} GB, "
                     f"{grew}; loaded in "
                     f"{load_s:.1f} s; top-{K} equal to numpy's: {ref == got}")
        if dtype == torch.float16:
            lines.append(f"  fp16 catalogue resident size {grown / 1e9:.3f} GB [target <= 0.9 GB at 1M: "
                         f"{'PASS' if grown <= 0.9e9 or n < 1_000_000 else 'FAIL'}]")
        if name == "ours fp32":
            rec = TOOLS[0]
            args = [RecommendInput(vector=qs[i].tolist(), k=K) for i in range(BATCH)]
            rec.run(args[0], ctx)  # the tool configures its service and opens the default (demo) catalogue
            svc = ctx.engine.service("catalog", CatalogService)
            demo = [k for k in svc._catalogs if k[0].endswith("demo_catalog.jsonl")]
            assert len(demo) == 1, f"expected the tool's demo catalogue in the service, found keys {list(svc._catalogs)}"
            svc._catalogs[demo[0]] = (cat, LoadReport(source="bench", rows=n))  # under the service's own key
            out = rec.run(args[0], ctx).structured
            tool_ids = [int(it.id) for it in out.items]
            assert tool_ids == ref, f"the tool did not search the benchmark's catalogue: {tool_ids} vs {ref}"
            pool = ThreadPoolExecutor(BATCH)
            results["tool fp32"] = {
                "single": best_ms(lambda: rec.run(args[0], ctx), reps),
                "batch": best_ms(lambda: list(pool.map(lambda a: rec.run(a, ctx), args)), max(1, reps // 3)),
            }
            pool.shutdown()
            svc._catalogs.clear()
        cat.close()  # its query worker thread would hold it (and skew the next RSS figure) until it idles out
        del cat
        gc.collect()
    results["numpy"] = {"single": best_ms(lambda: np_topk(mat, qs[:1]), reps),
                        "batch": best_ms(lambda: np_topk(mat, qs), max(1, reps // 3))}
    results["faiss"] = {"single": best_ms(lambda: index.search(qs[:1], K), reps),
                        "batch": best_ms(lambda: index.search(qs, K), max(1, reps // 3))}
    ctx.engine.close()
    for mode in ("single", "batch"):
        base_name = min(("numpy", "faiss"), key=lambda b: results[b][mode])
        base = results[base_name][mode]
        lines.append(f"  {mode} ({'1 query' if mode == 'single' else f'{BATCH} queries'}), best baseline "
                     f"{base_name} {base:.2f} ms:")
        for name, r in results.items():
            bpe = 2 if "fp16" in name else 1 if name in ("ours fp32", "tool fp32") else 4  # the sketch: int8
            gbs = n * D * bpe / (r[mode] / 1000) / 1e9
            line = f"    {name:14s} {r[mode]:9.2f} ms  {gbs:6.1f} GB/s scanned ({gbs / bw:4.0%} of copy bw)"
            if name.startswith(("ours", "tool")):
                ratio = r[mode] / base
                line += f"  ratio {ratio:.2f}x (target <= 1.0) {'PASS' if ratio <= 1.0 else 'FAIL'}"
            lines.append(line)
    return lines


def durable(changes: int) -> list[str]:
    """The change log (issue 18.1): ms per upserted item through `CatalogService.upsert` (fsync per call) for
    calls of 1 and 100 items of 384 dims on a 10k catalogue, and the replay (fold + two bulk applies) of
    `changes` logged changes of 1 item each (80 % adds, 15 % updates, 5 % deletes) when the catalogue opens."""
    import json
    import tempfile

    from engine import Engine, EngineConfig
    from engine.catalog import CatalogService
    from engine.catalog import journal as J

    out = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR") or None) as tmp:
        src = Path(tmp) / "cat.jsonl"
        base = rng.standard_normal((10_000, D)).astype(np.float32)
        with src.open("w") as fh:
            for i in range(len(base)):
                fh.write(json.dumps({"id": f"b{i}", "category": f"c{i % 50}", "embedding": base[i].tolist()}) + "\n")
        svc = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=str(Path(tmp) / "cache"))))
        cat, rep = svc.open(src)
        journal = cat.journal
        for per_call, calls in ((1, 300), (100, 30)):
            ms = {}
            for logged in (True, False):
                cat.journal = journal if logged else None
                t = time.perf_counter()
                for c in range(calls):
                    rows = [{"id": f"u{per_call}-{logged}-{c}-{j}", "category": "new", "price": j}
                            for j in range(per_call)]
                    vecs = list(torch.from_numpy(rng.standard_normal((per_call, D)).astype(np.float32)))
                    svc.upsert(cat, rows, vecs)
                ms[logged] = (time.perf_counter() - t) * 1000 / (calls * per_call)
            out.append(f"  durable upsert, {per_call:3d} item(s) per call: {ms[True]:.3f} ms per item "
                       f"({ms[True] * per_call:.2f} ms per call, fsync included; without the log "
                       f"{ms[False]:.3f} ms per item)")
        cat.journal = journal
        # a log of `changes` single-item changes, written directly (the same frames the service writes)
        log = Path(rep.log_file)
        ids: list[str] = []
        with log.open("wb") as fh:
            for c in range(changes):
                r = rng.random()
                v = torch.from_numpy(rng.standard_normal((1, D)).astype(np.float32))
                if r < 0.05 and ids:
                    fh.write(J.encode([], None, [ids.pop(int(rng.integers(len(ids))))], []))
                elif r < 0.20 and ids:
                    fh.write(J.encode([{"id": ids[int(rng.integers(len(ids)))], "category": "upd"}], v, [], [False]))
                else:
                    ids.append(f"L{c}")
                    fh.write(J.encode([{"id": ids[-1], "category": "log", "n": c}], v, [], [True]))
        size = log.stat().st_size
        svc2 = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=str(Path(tmp) / "cache"))))
        t = time.perf_counter()
        cat2, rep2 = svc2.open(src)
        total = time.perf_counter() - t
        t = time.perf_counter()
        svc3 = CatalogService(Engine(EngineConfig(device="cpu", cache_dir=str(Path(tmp) / "cache"))))
        svc3.log_path = lambda source, model_id: (None, "bench: no log")  # type: ignore[method-assign]
        svc3.open(src)
        bare = time.perf_counter() - t
        assert rep2.replayed == changes and len(cat2) == 10_000 + len(ids)
        out.append(f"  replay of {changes} logged changes ({size / 1e6:.0f} MB log): {total - bare:.2f} s "
                   f"(open with the log {total:.2f} s, without {bare:.2f} s); {len(cat2)} rows after")
        t = time.perf_counter()
        cat2.journal.compact()
        out.append(f"  compaction of that log: {time.perf_counter() - t:.2f} s -> {log.stat().st_size / 1e6:.0f} MB")
    return out


def clustered(n: int, rng: np.random.Generator, clusters: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Realistic embeddings, not uniform noise: `clusters` centres on the sphere, each row a centre plus
    noise (cosine to its centre ~0.7), L2-normalised -> (rows [n, D] float32, cluster id [n])."""
    centres = rng.standard_normal((clusters, D)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, clusters, n)
    out = np.empty((n, D), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = centres[lab[lo:hi]] + rng.standard_normal((hi - lo, D)).astype(np.float32) * (1.0 / np.sqrt(D))
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, lab


def numpy_truth(mat: np.ndarray, qs: np.ndarray, lab: np.ndarray) -> dict[str, list[list[str]]]:
    """Exact top-K ids per query by NumPy brute force (float64 scores, ties to the lower row): plain, the
    10 % filter (dept == 3, i.e. cluster % 10 == 3), a 30 % one (dept in 3, 4, 5) and the greedy category_limit=2 walk (category =
    cluster % 50)."""
    out: dict[str, list[list[str]]] = {"plain": [], "filter 10%": [], "filter 30%": [], "category_limit=2": []}
    ok = lab % 10 == 3
    ok30 = np.isin(lab % 10, [3, 4, 5])
    cats = lab % 50
    for lo in range(0, len(qs), 16):
        s = mat.astype(np.float64) @ qs[lo:lo + 16].astype(np.float64).T  # [n, 16]
        for j in range(s.shape[1]):
            order = np.lexsort((np.arange(len(s)), -s[:, j]))
            out["plain"].append([f"i{r}" for r in order[:K]])
            out["filter 10%"].append([f"i{r}" for r in order[ok[order]][:K]])
            out["filter 30%"].append([f"i{r}" for r in order[ok30[order]][:K]])
            seen: dict[int, int] = {}
            walk = []
            for r in order:
                if seen.get(cats[r], 0) < 2:
                    seen[cats[r]] = seen.get(cats[r], 0) + 1
                    walk.append(f"i{r}")
                    if len(walk) == K:
                        break
            out["category_limit=2"].append(walk)
    return out


def hnsw(n: int, nq: int = 100, with_usearch: bool = False, clusters: int = 2000) -> Iterator[str]:
    """Issue 18.2 figures on n clustered rows, yielded line by line as measured: our Catalog with
    index='hnsw' (hnswlib, M=16, efC=200, ef = `ann.EF_SEARCH`) against the exact Catalog (the recall oracle), FAISS IndexHNSWFlat with the same M/ef, and
    usearch; recall@10 against the exact top-10, p50 single-query latency, a 10 % filter, category_limit=2,
    a batch of 16, build time and resident memory."""
    import psutil

    from engine.catalog import Catalog, Query
    from engine.catalog.ann import EF_SEARCH, HnswIndex

    rng = np.random.default_rng(18)
    mat, lab = clustered(n + nq, rng, clusters)
    qs, mat, lab = mat[n:], mat[:n], lab[:n]
    rows = [{"id": f"i{i}", "category": f"c{lab[i] % 50}", "dept": int(lab[i] % 10)} for i in range(n)]
    proc = psutil.Process()
    exact = Catalog(D, capacity=n)
    exact.upsert(rows, torch.from_numpy(mat))

    def lat(fn, qv) -> float:
        ts = []
        for q in qv:
            t = time.perf_counter()
            fn(q)
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1000)

    def ids(cat, q, **kw) -> list[str]:
        return [h.id for h in cat.search_many([Query(vector=torch.from_numpy(q), k=K, **kw)])[0]]

    cases = {"plain": {}, "filter 10%": {"filters": {"dept": 3}}, "filter 30%": {"filters": {"dept": [3, 4, 5]}},
             "category_limit=2": {"category_limit": 2}}
    truth = numpy_truth(mat, qs, lab)  # the exact answers, from NumPy (float64 scores, ties to the lower row)
    assert truth["plain"][:3] == [ids(exact, q) for q in qs[:3]]  # the exact catalogue agrees
    ex = {c: lat(lambda q: ids(exact, q, **kw), qs[:20]) for c, kw in cases.items()}
    yield ("  exact (fp32, int8 sketch + rescoring): p50 " + ", ".join(f"{c} {ms:.2f} ms" for c, ms in ex.items())
               + " per query")
    rss0 = proc.memory_info().rss
    ours = Catalog(D, capacity=n)
    ours.upsert(rows, torch.from_numpy(mat))
    rss1 = proc.memory_info().rss
    t = time.perf_counter()
    ours.build_index(HnswIndex(D, M=16, ef_construction=200, ef_search=EF_SEARCH))
    build = time.perf_counter() - t
    rss2 = proc.memory_info().rss
    yield (f"  ours hnsw (hnswlib M=16 efC=200 ef={EF_SEARCH}): build {build:.1f} s ({n / build:.0f} rows/s), index "
               f"{(rss2 - rss1) / 1e6:.0f} MB resident (catalogue {(rss1 - rss0) / 1e6:.0f} MB)")
    fell_back = [0]
    exact_one = ours._exact_one

    def counted(*a, **kw):  # noqa: ANN002, ANN003, ANN202 - how many answers the exact scan gave
        fell_back[0] += 1
        return exact_one(*a, **kw)

    ours._exact_one = counted  # type: ignore[method-assign]
    for c, kw in cases.items():
        fell_back[0] = 0
        got = [ids(ours, q, **kw) for q in qs]
        by_exact = fell_back[0]
        rec = np.mean([len(set(g) & set(w)) / max(1, len(w)) for g, w in zip(got, truth[c])])
        extra = ""
        if c == "category_limit=2":
            ok = all(max(np.unique([ours.item(i)["category"] for i in g], return_counts=True)[1]) <= 2 for g in got)
            extra = f", limit obeyed in every answer: {ok}"
        if c.startswith("filter"):
            ok = all(ours.item(i)["dept"] in ((3,) if c == "filter 10%" else (3, 4, 5)) for g in got for i in g)
            extra = f", every item passes the filter: {ok}"
        ms = lat(lambda q: ids(ours, q, **kw), qs[:100])
        yield (f"  ours hnsw {c:17s}: recall@10 {rec:.3f}, p50 {ms:.2f} ms per query{extra}; "
                   f"{by_exact}/{len(qs)} answered by the exact scan over the filtered rows")
    bq = [Query(vector=torch.from_numpy(q), k=K) for q in qs[:16]]
    bms = best_ms(lambda: ours.search_many(bq), 5)
    yield (f"  ours hnsw batch of 16: {bms / 16:.2f} ms per query ({bms:.1f} ms per batch)")
    truth_rows = [[int(i[1:]) for i in w] for w in truth["plain"]]

    def recall(found) -> float:  # noqa: ANN001
        return float(np.mean([len(set(map(int, f)) & set(w)) / K for f, w in zip(found, truth_rows)]))

    try:
        import faiss

        rss0 = proc.memory_info().rss
        fx = faiss.IndexHNSWFlat(D, 16, faiss.METRIC_INNER_PRODUCT)
        fx.hnsw.efConstruction = 200
        t = time.perf_counter()
        fx.add(mat)
        fb = time.perf_counter() - t
        fmem = proc.memory_info().rss - rss0
        for ef in (64, 128):
            fx.hnsw.efSearch = ef
            found = [fx.search(q[None], K)[1][0] for q in qs]
            ms = lat(lambda q: fx.search(q[None], K), qs[:100])
            yield (f"  faiss IndexHNSWFlat M=16 efC=200 ef={ef}: build {fb:.1f} s, {fmem / 1e6:.0f} MB, "
                       f"recall@10 {recall(found):.3f}, p50 {ms:.2f} ms per query")
        sel = faiss.IDSelectorBatch(np.flatnonzero(lab % 10 == 3).astype(np.int64))
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=64)
        found = [fx.search(q[None], K, params=params)[1][0] for q in qs]
        want = [[int(i[1:]) for i in w] for w in truth["filter 10%"]]
        rec = np.mean([len(set(map(int, f)) & set(w)) / K for f, w in zip(found, want)])
        ms = lat(lambda q: fx.search(q[None], K, params=params), qs[:100])
        yield (f"  faiss HNSW + IDSelectorBatch (10 % filter): recall@10 {rec:.3f}, p50 {ms:.2f} ms per query")
        del fx
    except ImportError:
        yield ("  faiss: not installed (pip install faiss-cpu)")
    try:
        if not with_usearch:
            raise ImportError
        from usearch.index import Index

        rss0 = proc.memory_info().rss
        ux = Index(ndim=D, metric="ip", dtype="f32", connectivity=16, expansion_add=200, expansion_search=64)
        t = time.perf_counter()
        ux.add(np.arange(n), mat)
        ub = time.perf_counter() - t
        umem = proc.memory_info().rss - rss0
        found = [ux.search(q, K).keys for q in qs]
        ms = lat(lambda q: ux.search(q, K), qs[:100])
        yield (f"  usearch connectivity=16 expansion 200/64: build {ub:.1f} s, {umem / 1e6:.0f} MB, "
                   f"recall@10 {recall(found):.3f}, p50 {ms:.2f} ms per query")
    except ImportError:
        yield ("  usearch: not measured (--usearch; pip install usearch)")


def filters(n: int, clusters: int = 2000) -> Iterator[str]:
    """A filter's cost on the exact catalogue (fp32 with the sketch, fp16): p50 of single queries with
    filters keeping 2-60 % of n clustered rows, every row scanned and masked against the filter's rows
    alone (`scan.GATHER_FRACTION` forced to 0 / 1); the crossover sets GATHER_FRACTION."""
    from engine.catalog import Catalog, Query
    from engine.catalog import scan as scan_mod

    rng = np.random.default_rng(7)
    mat, lab = clustered(n + 20, rng, clusters)
    qs, mat = mat[n:], mat[:n]
    rows = [{"id": f"i{i}", "dept": int(i % 100)} for i in range(n)]
    for dtype in (torch.float32, torch.float16):
        cat = Catalog(D, capacity=n, dtype=dtype)
        cat.upsert(rows, torch.from_numpy(mat))
        path = cat.scan_path

        def p50(**kw) -> tuple[float, list[str]]:  # noqa: ANN003
            ts, ids = [], []
            for q in qs:
                t = time.perf_counter()
                hits = cat.search_many([Query(vector=torch.from_numpy(q), k=K, **kw)])[0]
                ts.append(time.perf_counter() - t)
                ids.append([h.id for h in hits])
            return float(np.median(ts) * 1000), ids

        plain = p50()[0]
        cells = []
        saved = scan_mod.GATHER_FRACTION[path]
        try:
            for pct in (2, 10, 25, 40, 60):
                f = {"dept": {"in": list(range(pct))}}
                scan_mod.GATHER_FRACTION[path] = 0.0
                masked, a = p50(filters=f)
                scan_mod.GATHER_FRACTION[path] = 1.0
                alone, b = p50(filters=f)
                cells.append(f"{pct} % {masked:.1f} -> {alone:.1f}{'' if a == b else ' (ANSWERS DIFFER)'}")
        finally:
            scan_mod.GATHER_FRACTION[path] = saved
        yield (f"  {str(dtype).removeprefix('torch.')} ({path}): plain {plain:.1f} ms; filtered p50 ms, every row "
               f"masked -> the filter's rows alone: " + ", ".join(cells) + f" (GATHER_FRACTION {saved})")
        cat.close()
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 000 items only, few repetitions")
    ap.add_argument("--durable", action="store_true", help="only the change log figures")
    ap.add_argument("--log-changes", type=int, default=100_000, help="logged changes replayed (default 100 000)")
    ap.add_argument("--hnsw", type=int, default=0, metavar="N", help="only the approximate index, on N rows")
    ap.add_argument("--usearch", action="store_true", help="with --hnsw: usearch too (its build is slow here)")
    ap.add_argument("--rows", type=int, default=0, metavar="N",
                    help="issue 18's figures: the approximate index on N clustered rows (the issue: 1 000 000), "
                         "then the change log (cost per upserted item, replay of --log-changes changes)")
    ap.add_argument("--clusters", type=int, default=2000, help="clusters of the synthetic catalogue (default 2000)")
    ap.add_argument("--filters", type=int, default=0, metavar="N",
                    help="only a filter's cost on the exact catalogue, on N rows: every row masked vs its rows alone")
    a = ap.parse_args()
    if a.filters:
        print(f"filtered exact search on {a.filters} x {D} clustered rows, k = {K}", flush=True)
        for line in filters(a.filters, a.clusters):
            print(line, flush=True)
        return 0
    if a.rows:
        print(f"issue 18: approximate index on {a.rows} x {D} clustered rows ({a.clusters} clusters), k = {K}; "
              f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
        for line in hnsw(a.rows, with_usearch=a.usearch, clusters=a.clusters):
            print(line, flush=True)
        print("issue 18: durable upserts (change log)", flush=True)
        for line in durable(a.log_changes):
            print(line, flush=True)
        return 0
    if a.hnsw:
        print(f"approximate index on {a.hnsw} x {D} clustered rows, k = {K}")
        for line in hnsw(a.hnsw, with_usearch=a.usearch, clusters=a.clusters):
            print(line, flush=True)
        return 0
    if a.durable:
        for line in durable(a.log_changes):
            print(line)
        return 0
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')} torch threads {torch.get_num_threads()} "
          f"numpy {np.__version__} torch {torch.__version__}")
    bw = copy_bandwidth()
    print(f"measured copy bandwidth (numpy, read + write): {bw:.1f} GB/s")
    sizes = [(20_000, 5)] if a.quick else [(100_000, 15), (1_000_000, 6)]
    for n, reps in sizes:
        print(f"n = {n} x {D}, k = {K}")
        for line in run_size(n, reps, bw):
            print(line)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
