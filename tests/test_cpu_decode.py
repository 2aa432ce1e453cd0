"""The Numba CPU decode kernels against float64 NumPy (the oracle) and against their NumPy references.

Irregular sizes: row counts around the kernel's blocks of four, odd widths,
slots in any order at different lengths, a causal run of rows in one slot,
and one key only.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atelier_kernels import cpu_decode


def test_numba_kernels_are_installed_and_used():
    # numba is a dependency: CI must run the kernels, not silently the fallback
    assert cpu_decode.available()


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 16, 35])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 13), (129, 64), (960, 576)])
def test_rows_matmul_matches_float64(M, N, K):
    rng = np.random.default_rng(M * 1000 + N + K)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    tol = K * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w).T).max()  # fp32 dot-product error bound
    for backend in (None, "numpy"):
        got = cpu_decode.rows_matmul(x, w, backend=backend)
        assert got.dtype == np.float32 and got.shape == (M, N)
        assert np.abs(got - want).max() <= tol, backend


def test_rows_matmul_accepts_a_strided_input():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((6, 40), dtype=np.float32)
    x = big[::2, 3:35]  # not contiguous
    w = rng.standard_normal((11, 32), dtype=np.float32)
    np.testing.assert_allclose(cpu_decode.rows_matmul(x, w), x.astype(np.float64) @ w.T, rtol=0, atol=1e-4)


def _attention_f64(q, K, V, row_slot, row_pos, scale):
    R, H, hd = q.shape
    KVH = K.shape[1]
    G = H // KVH
    out = np.zeros((R, H, hd))
    for r in range(R):
        for h in range(H):
            keys = K[row_slot[r], h // G, :row_pos[r] + 1].astype(np.float64)
            vals = V[row_slot[r], h // G, :row_pos[r] + 1].astype(np.float64)
            s = keys @ q[r, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[r, h] = (p / p.sum()) @ vals
    return out


@pytest.mark.parametrize("case", ["batch", "causal", "one_key"])
def test_attend_matches_float64(case):
    rng = np.random.default_rng({"batch": 1, "causal": 2, "one_key": 3}[case])
    slots, KVH, L, hd, H = 5, 3, 50, 16, 9
    K = rng.standard_normal((slots, KVH, L, hd), dtype=np.float32)
    V = rng.standard_normal((slots, KVH, L, hd), dtype=np.float32)
    if case == "batch":  # slots in any order, different lengths
        row_slot, row_pos = np.array([4, 0, 2, 1]), np.array([49, 0, 17, 33])
    elif case == "causal":  # one slot, consecutive positions (a prompt or drafted tokens)
        row_slot, row_pos = np.full(7, 3), np.arange(20, 27)
    else:
        row_slot, row_pos = np.array([2]), np.array([0])
    q = rng.standard_normal((len(row_slot), H, hd), dtype=np.float32)
    want = _attention_f64(q, K, V, row_slot, row_pos, 0.25)
    for backend in (None, "numpy"):
        got = cpu_decode.attend(q, K, V, row_slot, row_pos, 0.25, backend=backend)
        assert got.dtype == np.float32 and got.shape == q.shape
        assert np.abs(got - want).max() < 1e-5, backend


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 3), st.integers(1, 3), st.sampled_from([4, 8, 64]), st.data())
def test_attend_kernel_equals_reference(R, KVH, G, hd, data):
    # property: any rows, any grouping; the kernel and the NumPy reference agree at fp32 tolerance
    slots, L = 4, 32
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((slots, KVH, L, hd), dtype=np.float32)
    V = rng.standard_normal((slots, KVH, L, hd), dtype=np.float32)
    row_slot = rng.integers(0, slots, R)
    row_pos = rng.integers(0, L, R)
    q = rng.standard_normal((R, KVH * G, hd), dtype=np.float32) * 3
    got = cpu_decode.attend(q, K, V, row_slot, row_pos, hd ** -0.5)
    ref = cpu_decode.attend(q, K, V, row_slot, row_pos, hd ** -0.5, backend="numpy")
    assert np.abs(got - ref).max() < 1e-4


def test_warm_compiles_every_kernel():
    # `make install` runs this so that a fresh install's first query and generation skip the compilation
    from atelier_kernels import _numba, cpu_qmatmul

    assert _numba.warm() == ["rows_matmul", "attend", "attend_q8", "filter_rows", "refine", "dots64", "half_scores",
                             "gather_scores", "q4_matmul",
                             "q8_matmul", "q_dequant", "q4k_matmul", "q6k_matmul", "kx_matmul", "qk_dequant"] \
        + (["q8a_matmul"] if cpu_qmatmul.q8_available() else []) \
        + ["ggml_rmsnorm", "ggml_swiglu", "ggml_rope", "ggml_attend"] \
        + (["step_q8"] if cpu_qmatmul.q8_available() else [])  # the Q8 kernels need AVX2


@pytest.mark.parametrize("text,ident,choice", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
     "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\n", ("AuthenticAMD", 23), (0, 1, 16)),
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n", ("AuthenticAMD", 25), (2, 8, 16)),
    ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", ("GenuineIntel", 6), (3, 2, 2)),
    ("processor\t: 0\nvendor_id\t: HygonGenuine\ncpu family\t: 24\n", ("HygonGenuine", 24), (2, 8, 16)),
    ("processor\t: 0\n", ("", 0), (2, 8, 16)),  # an ARM /proc/cpuinfo has neither field
])
def test_weight_stream_prefetch_is_chosen_from_proc_cpuinfo(tmp_path, text, ident, choice):
    # the Q8 products' prefetch locality and distances per CPU (`_numba.stream_prefetch`): Zen 1 (family 23)
    # takes prefetchnta one tile ahead, other AMD CPUs prefetcht1 8 ahead, Intel prefetcht0 2 / 2
    from atelier_kernels import _numba

    f = tmp_path / "cpuinfo"
    f.write_text(text)
    assert _numba._cpu_id(str(f)) == ident
    assert _numba.prefetch_for(*ident) == choice
    assert _numba._cpu_id(str(tmp_path / "missing")) == ("", 0)
    assert _numba.stream_prefetch() == _numba.prefetch_for(*_numba._cpu_id())
