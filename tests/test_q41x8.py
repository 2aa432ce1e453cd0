"""Q4_1 matrices interleaved by 8 rows (`models.llm_activations = "q8_fast"`, `cpu_qmatmul.interleave_q41`):
the layout round-trips, the kernel (`_numba.q41x8_tile_intrinsic`, with and without VNNI) computes its NumPy
twin's arithmetic bit for bit (each block's integer dot summed whole, converted once, two fp32 fused
multiply-adds per pair and block, `cpu_ggml.fma32`), the twin is the Q8 product of the float64 oracle (x
quantised to Q8 blocks, de-quantised, times the de-quantised weights), and every other path (de-quantised rows,
fp32 products, row subsets, stacking) reads the interleaved matrix as the Q4_1 one."""

from __future__ import annotations

import numpy as np
import pytest

from atelier_kernels import cpu_qmatmul as cq
from atelier_kernels._numba import has_avx2, jit


def _case(rng: np.random.Generator, n: int, nb: int):  # noqa: ANN202
    qs, d, m, _, _ = cq._random_packed("Q4_1", n, nb, rng)
    return qs, d, m


def test_interleaving_round_trips_and_keeps_the_bytes():
    rng = np.random.default_rng(0)
    qs, d, m = _case(rng, 24, 5)
    q8, d8, m8 = cq.interleave_q41(qs, d, m)
    assert q8.shape == qs.shape and d8.shape == d.shape and q8.nbytes + d8.nbytes + m8.nbytes == \
        qs.nbytes + d.nbytes + m.nbytes
    # group 1's block 2, chunk 3, row 5: bytes 12..15 of row 13's block 2
    g, b, c, t = 1, 2, 3, 5
    off = ((g * 5 + b) * 128) + 32 * c + 4 * t
    assert q8.reshape(-1)[off:off + 4].tolist() == qs[8 * g + t, b, 4 * c:4 * c + 4].tolist()
    assert d8.reshape(-1)[(g * 5 + b) * 8 + t] == d[8 * g + t, b]
    for a, want in zip(cq.deinterleave_q41(q8, d8, m8), (qs, d, m)):
        np.testing.assert_array_equal(a, want)
    with pytest.raises(ValueError, match="multiple of 8 rows"):
        cq.interleave_q41(qs[:12], d[:12], m[:12])
    with pytest.raises(ValueError, match="not whole groups of 8"):
        cq.matmul_q8(cq.X8_FORMAT, np.ones((1, 160), np.float32), qs[:12], d[:12], m[:12])


@pytest.mark.parametrize("R", [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17])
def test_kernel_is_its_twin_bit_for_bit_and_the_twin_is_the_q8_product(R):
    rng = np.random.default_rng(R)
    for n, nb in [(8, 1), (24, 3), (72, 18), (16, 48)]:
        qs, d, m = _case(rng, n, nb)
        x = (rng.standard_normal((R, nb * 32)) * rng.uniform(0.01, 50)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block of activations
        q8, d8, m8 = cq.interleave_q41(qs, d, m)
        got = cq.matmul_q8(cq.X8_FORMAT, x, q8, d8, m8)
        twin = cq.matmul_q8(cq.X8_FORMAT, x, q8, d8, m8, backend="numpy")
        np.testing.assert_array_equal(got, twin)
        for r in range(R):  # a row's bits do not depend on the rows beside it (tiles of 8, 4, 1)
            np.testing.assert_array_equal(cq.matmul_q8(cq.X8_FORMAT, x[r:r + 1], q8, d8, m8)[0], got[r])
        xq, dx, xs = cq.quantize_rows(x, "numpy")
        want = np.empty((R, n), np.float32)
        cq.matmul_q8_reference("Q4_1", xq, dx, xs, qs, d, m, want)  # float64, llama.cpp's layout
        np.testing.assert_allclose(twin, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_extreme_blocks():
    """Every nibble 15 against activations of +-127 (the largest integer dots, 60 960), large and tiny fp16
    scales and mins, negative mins: still the twin's bits and close to float64."""
    rng = np.random.default_rng(5)
    n, nb = 16, 4
    qs = np.full((n, nb, 16), 0xFF, np.uint8)
    qs[1::2] = rng.integers(0, 256, (n // 2, nb, 16), dtype=np.uint8)
    d = np.array(rng.choice([6.0e4, 1e-4, 0.5, -2.0], (n, nb)), np.float16).view(np.uint16)
    m = np.array(rng.choice([-3.0e4, 0.0, 1e-3, 7.0], (n, nb)), np.float16).view(np.uint16)
    x = np.where(rng.random((5, nb * 32)) < 0.5, -1.0, 1.0).astype(np.float32)
    q8, d8, m8 = cq.interleave_q41(qs, d, m)
    got = cq.matmul_q8(cq.X8_FORMAT, x, q8, d8, m8)
    np.testing.assert_array_equal(got, cq.matmul_q8(cq.X8_FORMAT, x, q8, d8, m8, backend="numpy"))
    xq, dx, xs = cq.quantize_rows(x, "numpy")
    assert np.abs(xq).max() == 127
    want = np.empty((5, n), np.float32)
    cq.matmul_q8_reference("Q4_1", xq, dx, xs, qs, d, m, want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not has_avx2(), reason="the tile's AVX2 code needs an AVX2 CPU")
@pytest.mark.parametrize("vnni", [False, True])
def test_both_instruction_paths_compute_the_same_bits(vnni):
    """`vpmaddubsw` + `vpmaddwd` (AVX2) and `vpdpbusd` (VNNI) sum the same exact integers: either tile, called
    directly, gives the twin's bits (the engine takes VNNI where the CPU has it)."""
    from atelier_kernels._numba import has_vnni, q41x8_tile_intrinsic

    if vnni and not has_vnni():
        pytest.skip("this CPU has no VNNI")
    njit = jit()[0]
    tile = q41x8_tile_intrinsic(4, vnni=vnni)

    @njit
    def run(qs, d, m, xq, dx, xs, nb, out):  # noqa: ANN001, ANN202
        for g in range(out.shape[1] // 8):
            a = tile(qs, g * nb * 128, d, g * nb * 8, xq, 0, nb * 32, 2 * nb * 32, 3 * nb * 32, dx, 0, nb, 2 * nb,
                     3 * nb, m, xs, nb)
            for j in range(4):
                for t in range(8):
                    out[j, g * 8 + t] = a[8 * j + t]

    rng = np.random.default_rng(9)
    n, nb = 32, 7
    q8, d8, m8 = cq.interleave_q41(*_case(rng, n, nb))
    x = rng.standard_normal((4, nb * 32)).astype(np.float32)
    xq, dx, xs = cq.quantize_rows(x)
    out = np.empty((4, n), np.float32)
    run(q8.reshape(-1), d8.reshape(-1), m8.reshape(-1), xq, dx.reshape(-1), xs.reshape(-1), nb, out)
    np.testing.assert_array_equal(out, cq.matmul_q8(cq.X8_FORMAT, x, q8, d8, m8, backend="numpy"))


def test_other_paths_read_it_as_q4_1():
    from engine.llm.qweights import Packed

    rng = np.random.default_rng(3)
    p = Packed("Q4_1", *_case(rng, 40, 3))
    x8 = p.interleaved(True)
    assert x8.fmt == cq.X8_FORMAT and x8.shape == p.shape and x8.nbytes == p.nbytes
    assert x8.interleaved(True) is x8 and p.interleaved(False) is p
    assert Packed("Q4_1", *_case(rng, 12, 3)).interleaved(True).fmt == "Q4_1"  # (12 rows: left as they are)
    for n0, n1 in [(0, 40), (3, 11), (8, 16), (37, 40), (5, 6)]:
        np.testing.assert_array_equal(x8.dequant(n0, n1), p.dequant(n0, n1))
    np.testing.assert_array_equal(x8.dequant64(), p.dequant64())
    x = rng.standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_array_equal(x8.matmul(x), p.matmul(x))  # fp32 activations: the Q4_1 kernels
    for idx in (np.array([39, 0, 17, 17, 1]), slice(3, 21), slice(None, None, -7), np.array([], np.int64)):
        got, want = x8.rows(idx), p.rows(idx)  # (the groups holding the rows de-interleaved, not the matrix)
        assert got.fmt == "Q4_1"
        for a, b in zip(got._arrays(), want._arrays(), strict=True):
            np.testing.assert_array_equal(a[1], b[1])
    both = Packed.concat([x8, p])
    assert both.fmt == "Q4_1" and both.shape == (80, 96)
    np.testing.assert_array_equal(both.dequant(), np.concatenate([p.dequant(), p.dequant()]))
