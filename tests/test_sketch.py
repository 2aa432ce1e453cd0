"""engine.sketch: the int8 filter-and-refine top-k is exact against a float64 NumPy brute force.

The oracle scores in float64 and orders by (score desc, row asc) with np.lexsort. Ties are exact
where rows are duplicated (identical fp32 rows give identical fp32 scores in the refine and identical
float64 scores in the oracle).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine import sketch
from engine.sketch import Int8Sketch, exact_topk
from atelier_kernels import cpu_topk


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    m = rng.standard_normal((n, d)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def oracle(m: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None) -> list[int]:
    s = (m.astype(np.float64) * q.astype(np.float64)).sum(axis=1)  # row by row: equal rows tie exactly
    order = np.lexsort((np.arange(len(s)), -s))
    if mask is not None:
        order = order[mask[order]]
    return order[:k].tolist()


def test_supported_here() -> None:
    # x86 and ARM builds of torch ship a quantized engine: the fast path must be live in CI
    assert sketch.supported()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 400), d=st.integers(1, 40), k=st.integers(1, 30),
       block=st.integers(1, 128), batch=st.integers(1, 4), dup=st.booleans())
@example(seed=1, n=22, d=24, k=1, block=1, batch=1, dup=True)  # equal rows: BLAS once summed them differently
def test_exact_against_numpy(seed: int, n: int, d: int, k: int, block: int, batch: int, dup: bool) -> None:
    _check_exact(seed, n, d, k, block, batch, dup)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 300), d=st.integers(1, 40), k=st.integers(1, 30),
       block=st.integers(1, 128), batch=st.integers(1, 4), dup=st.booleans())
def test_exact_against_numpy_without_numba(seed: int, n: int, d: int, k: int, block: int, batch: int,
                                           dup: bool) -> None:
    # the NumPy twins of atelier_kernels.cpu_topk (what runs where Numba is missing) give the same exact answer
    with mock.patch.object(cpu_topk, "_kernels", lambda: None):
        assert not cpu_topk.available()
        _check_exact(seed, n, d, k, block, batch, dup)


def _check_exact(seed: int, n: int, d: int, k: int, block: int, batch: int, dup: bool) -> None:
    rng = np.random.default_rng(seed)
    m = unit(rng, n, d)
    if dup and n > 3:  # exact ties: copies of a few rows scattered through the matrix
        src = rng.integers(0, n, n // 3)
        dst = rng.integers(0, n, n // 3)
        m[dst] = m[src]
    q = unit(rng, batch, d)
    masks = [None if i == 0 else rng.random(n) < 0.6 for i in range(batch)]
    sk = Int8Sketch(d, block)
    sk.sync(m, n)
    vals, rows = exact_topk(sk, m, q, masks, k)
    assert rows.shape == (batch, min(k, n))
    for b in range(batch):
        want = oracle(m, q[b], k, masks[b])
        got = rows[b, :len(want)].tolist()
        assert got == want
        assert np.all(np.isneginf(vals[b, len(want):]))
        np.testing.assert_allclose(vals[b, :len(want)], m[want].astype(np.float64) @ q[b], atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 300), d=st.integers(1, 64), batch=st.integers(1, 5))
def test_bound_holds(seed: int, n: int, d: int, batch: int) -> None:
    rng = np.random.default_rng(seed)
    m = unit(rng, n, d) * rng.uniform(0.2, 1.0, (n, 1)).astype(np.float32)  # norms <= 1 also bounded
    q = unit(rng, batch, d)
    sk = Int8Sketch(d, 64)
    sk.sync(m, n)
    step = sketch.query_step(q)
    for blk in range(sk.blocks()):
        approx, bound = sk.scores(blk, q, 1.0 + 1e-6, step)
        lo = blk * 64
        exact = q.astype(np.float64) @ m[lo:lo + approx.shape[1]].astype(np.float64).T
        assert np.all(np.abs(approx - exact) <= bound)


def test_updates_repack_changed_blocks_only() -> None:
    rng = np.random.default_rng(3)
    cap, d = 600, 24
    m = np.zeros((cap, d), np.float32)
    m[:500] = unit(rng, 500, d)
    sk = Int8Sketch(d, 100)
    sk.sync(m, 500)
    packed = list(sk._packed)
    q = unit(rng, 1, d)
    target = oracle(m[:500], q[0], 1, None)[0]
    m[250] = q[0]  # row 250 becomes the best match
    sk.invalidate(250)
    m[500:520] = unit(rng, 20, d)  # appended rows
    sk.sync(m, 520)
    assert sk._packed[0] is packed[0] and sk._packed[1] is packed[1] and sk._packed[3] is packed[3]
    assert sk._packed[2] is not packed[2] and sk.blocks() == 6
    _, rows = exact_topk(sk, m, q, [None], 2)
    assert rows[0].tolist() == oracle(m[:520], q[0], 2, None)
    assert rows[0, 0] == 250 and target != 250
    sk.sync(m, 130)  # shrink (compaction): the last block is repacked with its new row count
    _, rows = exact_topk(sk, m, q, [None], 3)
    assert rows[0].tolist() == oracle(m[:130], q[0], 3, None)


def test_all_rows_masked_and_zero_rows() -> None:
    rng = np.random.default_rng(5)
    m = unit(rng, 50, 8)
    m[10:20] = 0.0  # zero rows score 0 and are still valid rows
    sk = Int8Sketch(8, 16)
    sk.sync(m, 50)
    q = unit(rng, 2, 8)
    vals, rows = exact_topk(sk, m, q, [np.zeros(50, bool), None], 50)
    assert np.all(np.isneginf(vals[0]))
    assert rows[1].tolist() == oracle(m, q[1], 50, None)
