"""atelier_kernels.cpu_topk: the Numba filter and refine kernels against their NumPy references and a float64 oracle.

The filter's heap is compared as a multiset (the K largest lower bounds are unique as values, not as a
heap layout); survivors as row sets; refine's output exactly, ties included (duplicated rows).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atelier_kernels import cpu_topk


def test_numba_kernels_are_live() -> None:
    assert cpu_topk.available()


def _run_filter(backend, blocks, bound_of, B, K):
    heap = np.empty((B, K), np.float32)
    count = np.zeros(B, np.int64)
    kept = [[] for _ in range(B)]
    for lo, approx in blocks:
        c = approx.shape[1]
        up = np.empty((B, c), np.float32)
        rows = np.empty((B, c), np.int64)
        n = np.empty(B, np.int64)
        cpu_topk.filter_rows(approx, bound_of(lo, c), heap, count, up, rows, n, backend=backend)
        for b in range(B):
            kept[b].append((rows[b, :n[b]] + lo, up[b, :n[b]].copy()))
    return heap, count, kept


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 5), K=st.integers(1, 12), n=st.integers(1, 700),
       block=st.integers(1, 300), ties=st.booleans())
def test_filter_kernel_equals_reference(seed, B, K, n, block, ties) -> None:
    rng = np.random.default_rng(seed)
    approx_all = rng.standard_normal((B, n)).astype(np.float32)
    if ties:  # few distinct values: heavy ties in lower and upper bounds
        approx_all = np.round(approx_all * 2) / 2
    approx_all[rng.random((B, n)) < 0.2] = -np.inf  # masked rows
    bound_all = (rng.random(n) * 0.3).astype(np.float32)
    blocks = [(lo, np.ascontiguousarray(approx_all[:, lo:lo + block])) for lo in range(0, n, block)]
    got = _run_filter(None, blocks, lambda lo, c: bound_all[lo:lo + c], B, K)
    want = _run_filter("numpy", blocks, lambda lo, c: bound_all[lo:lo + c], B, K)
    low = approx_all - bound_all
    up_all = approx_all + bound_all
    for b in range(B):
        assert got[1][b] == want[1][b] == min(K, int(np.isfinite(low[b]).sum()))
        cnt = got[1][b]
        assert sorted(got[0][b, :cnt].tolist()) == sorted(want[0][b, :cnt].tolist())
        # the oracle: the K largest finite lower bounds
        assert sorted(got[0][b, :cnt].tolist()) == sorted(np.sort(low[b][np.isfinite(low[b])])[::-1][:cnt].tolist())
        T = got[0][b, :cnt].min() if cnt == K else -np.inf
        # survivors: per block, every finite row whose upper bound reaches that block's final threshold
        for (rg, ug), (rw, uw) in zip(got[2][b], want[2][b]):
            assert rg.tolist() == rw.tolist()
            np.testing.assert_array_equal(ug, uw)
        allr = np.concatenate([r for r, _ in got[2][b]]) if got[2][b] else np.empty(0, np.int64)
        must = np.flatnonzero((up_all[b] >= T) & np.isfinite(up_all[b]))
        assert set(must.tolist()) <= set(allr.tolist())  # nothing that can reach the top K is dropped


@pytest.mark.parametrize("dup", [False, True])
def test_refine_equals_reference_and_oracle(dup) -> None:
    rng = np.random.default_rng(3 + dup)
    n, d, B, kk = 500, 24, 4, 7
    m = rng.standard_normal((n, d)).astype(np.float32)
    if dup:
        m[rng.integers(0, n, 100)] = m[rng.integers(0, n, 100)]
    q = rng.standard_normal((B, d))
    exact = m.astype(np.float64) @ q.T  # [n, B]
    rows, ups, offsets = [], [], [0]
    for b in range(B):
        cand = rng.choice(n, rng.integers(0, 60), replace=False)
        slack = rng.random(cand.size) * 0.5  # an upper bound: exact score plus something
        rows.append(cand)
        ups.append((exact[cand, b] + slack).astype(np.float32))
        offsets.append(offsets[-1] + cand.size)
    cr, cu, off = np.concatenate(rows).astype(np.int64), np.concatenate(ups), np.asarray(offsets, np.int64)
    out = {}
    for backend in (None, "numpy"):
        v = np.full((B, kk), -np.inf)
        r = np.zeros((B, kk), np.int64)
        cpu_topk.refine(m, q, cr, cu, off, v, r, backend=backend)
        out[backend] = (v, r)
    np.testing.assert_array_equal(out[None][1], out["numpy"][1])
    np.testing.assert_allclose(out[None][0], out["numpy"][0], rtol=0, atol=1e-12)
    for b in range(B):
        cand = rows[b]
        s = (m[cand].astype(np.float64) * q[b]).sum(axis=1)
        order = np.lexsort((cand, -s))[:kk]
        assert out[None][1][b, :order.size].tolist() == cand[order].tolist()
        assert np.all(np.isneginf(out[None][0][b, order.size:]))


def test_dots64_matches_float64_and_ties_exactly() -> None:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((50, 37)).astype(np.float32)
    m[10] = m[3]
    q = rng.standard_normal(37)
    rows = np.array([3, 10, 0, 49, 10, 3])
    got = cpu_topk.dots64(m, rows, q)
    np.testing.assert_allclose(got, m[rows].astype(np.float64) @ q, rtol=0, atol=1e-12)
    assert got[0] == got[1] == got[4] == got[5]  # equal rows, equal scores, wherever they sit


@pytest.mark.parametrize("M", [1, 3, 4, 16])
def test_half_scores_match_float64(M) -> None:
    rng = np.random.default_rng(M)
    w = (rng.standard_normal((301, 37)) * 0.05).astype(np.float16)
    w[0, :6] = [0.0, -0.0, 1e-6, -3e-5, 6.2e-5, -1.0]  # zero, subnormals, the smallest normals, a large one
    x = rng.standard_normal((M, 37)).astype(np.float32)
    w64 = w.astype(np.float64)
    want = x.astype(np.float64) @ w64.T
    tol = 37 * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w64).T).max() + 1e-12  # fp32 sums
    for backend in (None, "numpy"):
        got = cpu_topk.half_scores(x, w, backend=backend)
        assert got.shape == (M, 301) and got.dtype == np.float32
        assert np.abs(got - want).max() <= tol, backend
    # widening is exact, subnormals included: a unit row of x reads one value back
    eye = np.eye(37, dtype=np.float32)[:6]
    np.testing.assert_array_equal(cpu_topk.half_scores(eye, w[:1])[:, 0], w[0, :6].astype(np.float32))
