"""CPU products with GGUF-packed weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): Numba
kernels and NumPy twins.

    out = matmul(fmt, x, qs, d, m)          # x [R, K] fp32, W packed [N, K] -> x @ W.T  [R, N] fp32
    out = matmul_q8(fmt, x, qs, d, m)       # the same with x in Q8 blocks (llama.cpp's arithmetic, AVX2)
    out = matmul(fmt, x, qs, d, m, sc=sc, qh=qh)   # the K formats (super-blocks of 256)
    w = dequant(fmt, qs, d, m, n0, n1)      # rows n0..n1 of W as fp32 [n1 - n0, K]

The weights stay in llama.cpp's blocks of 32 values along K (`engine.llm.qweights`
holds them, split once at load into separate arrays, no byte added):

| fmt  | qs                       | d (fp16 bits)  | m (fp16 bits) | value j of block b         |
|------|--------------------------|----------------|---------------|----------------------------|
| Q8_0 | int8  [N, K/32, 32]      | uint16 [N, K/32] | -           | d * qs[j]                  |
| Q4_0 | uint8 [N, K/32, 16]      | uint16 [N, K/32] | -           | d * (nibble_j - 8)         |
| Q4_1 | uint8 [N, K/32, 16]      | uint16 [N, K/32] | uint16 [N, K/32] | d * nibble_j + m     |
| Q5_0 | uint8 [N, K/32, 20]      | uint16 [N, K/32] | -           | d * (q5_j - 16)            |
| Q5_1 | uint8 [N, K/32, 20]      | uint16 [N, K/32] | uint16 [N, K/32] | d * q5_j + m         |

where nibble_j is the low nibble of qs[j] for j < 16 and the high nibble of
qs[j - 16] for j >= 16, and q5_j = nibble_j | (bit j of the block's 32-bit qh) << 4,
qh being bytes 16..19 of the block (little-endian; in the file they come before
the nibbles). Bytes read per product: Q4_1 20 per 32 weights (0.625 B/weight,
against 4 for fp32), Q4_0 18, Q5_0 22, Q5_1 24, Q8_0 34.

The K formats (llama.cpp's `block_q4_K` / `block_q6_K`) use super-blocks of 256 along K:

| fmt  | arrays (per row n, super-block b)                                   | value p of super-block b |
|------|---------------------------------------------------------------------|--------------------------|
| Q4_K | qs uint8 [.., 128], sc uint8 [.., 12], d, m = dmin (fp16 bits)      | d * s_j * q_p - dmin * m_j, j = p // 32 |
| Q5_K | qs uint8 [.., 160] (Q4_K's 128 + 32 high-bit bytes), sc, d, m       | the same, q_p + 16 * high bit |
| Q6_K | qs = ql uint8 [.., 128], qh uint8 [.., 64], sc int8 [.., 16], d     | d * sc[p // 16] * (q_p - 32) |
| Q3_K | qs uint8 [.., 96] (64 + 32 hmask bytes), sc uint8 [.., 12], d        | d * (s_g - 32) * q_p, g = p // 16 |
| Q2_K | qs uint8 [.., 64], sc uint8 [.., 16], d, m = dmin                    | d (sc_g & 15) q_p - dmin (sc_g >> 4) |

Q4_K: the 8 six-bit scales s_j and mins m_j are packed in 12 bytes (j < 4:
s = sc[j] & 63, m = sc[j+4] & 63; j >= 4: s = (sc[j+4] & 15) | (sc[j-4] >> 6) << 4,
m = (sc[j+4] >> 4) | (sc[j] >> 6) << 4); q_p for p = 64c + l (l < 32) is the low
nibble of qs[32c + l], for p = 64c + 32 + l its high nibble. 144 bytes per 256
weights (0.5625 B/weight). Q5_K (`block_q5_K`): Q4_K's scales, mins and nibbles,
and value p of sub-block j = p // 32 adds 16 x bit j of qh[p % 32], the 32 qh
bytes kept after the 128 nibble bytes in qs (in the file they come before them;
as for Q5_0 / Q5_1, one stream per super-block); 176 bytes per 256 weights
(0.6875 B/weight). Q3_K and Q2_K (`block_q3_K`, `block_q2_K`): for p = 128h + 32j + l
(l < 32), the 2 low bits q2 = (qs[32h + l] >> 2j) & 3 and the scale of group g = 8h + 2j + (l >= 16);
Q3_K's q_p = q2 - 4 where bit 4h + j of hmask[l] (bytes 64..95 of qs here; first in the file) is clear,
else q2, its 16 six-bit scales packed in 12 bytes (low nibbles of sc[0..7], then their high nibbles, each
with two more bits from sc[8..11]); Q2_K's q_p = q2 with a 4-bit scale and a 4-bit min per group.
110 and 84 bytes per 256 weights (on Q8_K activations with llama.cpp's arithmetic, like the other K types:
`_numba._q8k_low2_codegen`). Q6_K: for p = 128h + 32g + l (g = 0..3, l < 32),
q_p = (nibble of ql[64h + 32(g & 1) + l], low for g < 2, high for g >= 2)
| ((qh[32h + l] >> 2g) & 3) << 4. 210 bytes per 256 weights (0.82 B/weight).
The kernels decode a super-block's scales once per 256 values (Q4_K: s and m
per 32 values; Q6_K: one int8 scale per 16 values).

The kernels read every weight block once for all R rows of x. Output rows are
taken 4 at a time (a tile; the last one repeats row N - 1): the tile's 4 rows
are de-quantised once into an fp32 scratch [4, K] (`unpack_*`: d * q + m per
block, in L1/L2), then `tile_dot` runs a register tile of 2 rows of x x the 4
rows of W over k (8 sums, vectorised along k and reduced once per tile; an odd
last row of x runs 1 x 4), so each x value loaded serves 4 outputs and each
de-quantised weight every row of x. Per weight this costs one unpack plus R
multiply-adds, instead of re-reading and re-unpacking per row (measured on
SmolLM2's shapes, 8 rows: 2.6-3x faster than the former per-row 32-value
dots; 1 row: 1.1-1.4x). All in fp32 from the exact fp16 scales and small
integer q, so this is the de-quantised product up to summation order
(`fastmath`), like BLAS; no activation quantisation. Work is split over chunks
of tiles, parallel. The NumPy twins de-quantise to float64 and multiply (the
oracle the tests use, beside `gguf.quants.dequantize`).

Q8 activations (`matmul_q8`, `models.llm_activations = "q8"`; every format
here): x is first quantised per row to Q8 blocks of 32 (`quantize_rows`,
llama.cpp's `quantize_row_q8_1`: fp16 scale max|x| / 127, int8 values, the
block's de-quantised sum) or, for Q4_K / Q6_K, to llama.cpp's Q8_K blocks of
256 (`quantize_rows(k=True)`: fp32 scale, int8 values, int16 sums of 16), then
each (weight row, x row) is one AVX2 row dot
(`_numba.q8_row_dot_intrinsic`; tiles of 8 or 4 x rows per weight row and of
4 weight rows per x row with `q8_tile_dot_intrinsic`, the weights' stream
prefetched ahead): integer multiply-adds per block, scaled in fp32 (the K
types: llama.cpp's own integer sums and fp32 steps on x86, `_numba._q8k_rows_codegen`,
so its bits). The twin computes the same quantised product in float64.

Numba is optional (`_numba.jit()`); without it the references run. Calls are
serialised by `_numba.LOCK` (see `_numba`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np

from ._numba import (IQ4NL_VALUES, dispatch, drop_stale_cache, float_bits_intrinsics, half_to_float_intrinsic,
                     has_avx2, has_vnni, jit, prefetch_intrinsic, q8_tile_dot_intrinsic, q41x8_tile_intrinsic,
                     round_to_half_intrinsic, stream_prefetch)

FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")  # blocks of 32 along K
K_FORMATS = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS")  # super-blocks of 256 along K
ALL_FORMATS = FORMATS + K_FORMATS
BLOCK = 32
QK_K = 256
BLOCK_VALUES = {"Q8_0": BLOCK, "Q4_0": BLOCK, "Q4_1": BLOCK, "Q5_0": BLOCK, "Q5_1": BLOCK, "IQ4_NL": BLOCK,
                "Q4_K": QK_K, "Q6_K": QK_K, "Q5_K": QK_K, "Q3_K": QK_K, "Q2_K": QK_K, "IQ4_XS": QK_K}
# with Q8 activations (`matmul_q8`): every format
Q8A_FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS")
Q8A_KIND = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q5_0": 5, "Q5_1": 6, "IQ4_NL": 4, "Q4_K": 7, "Q6_K": 8, "Q5_K": 13,
            "Q3_K": 15, "Q2_K": 17, "IQ4_XS": 19}  # q8a_span's (13 and up: _kx_kind's)
# Q4_1 with its rows interleaved by 8 (`interleave_q41`): not a GGUF block type, the engine's layout of a Q4_1
# matrix for Q8 activations (`models.llm_activations = "q8_fast"`); q8a_span's kind X8
X8_FORMAT, X8 = "Q4_1x8", 23
BLOCK_VALUES[X8_FORMAT] = BLOCK


def interleave_q41(qs: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 rows (qs uint8 [N, nb, 16], d / m uint16 [N, nb]; N a multiple of 8) -> the same bytes with each
    group of 8 rows interleaved (new copies, the same shapes): group g's block b is 128 bytes at (g nb + b) 128,
    4 chunks of 32, chunk c holding bytes 4c .. 4c + 3 of rows 8g .. 8g + 7 in turn; its 8 scales (and mins) at
    (g nb + b) 8, row by row. A group takes the bytes its 8 rows took (`_numba.q41x8_tile_intrinsic` reads it)."""
    N, nb = d.shape
    if N % 8 or qs.shape != (N, nb, 16):
        raise ValueError(f"Q4_1 rows [{N}, {nb} blocks]: interleaving takes a multiple of 8 rows of 16-byte blocks")
    q = np.ascontiguousarray(qs.reshape(N // 8, 8, nb, 4, 4).transpose(0, 2, 3, 1, 4)).reshape(N, nb, 16)

    def rows8(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(N // 8, 8, nb).transpose(0, 2, 1)).reshape(N, nb)

    return q, rows8(d), rows8(m)


def deinterleave_q41(qs: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`interleave_q41` undone (new copies): Q4_1 rows in llama.cpp's layout."""
    N, nb = d.shape
    q = np.ascontiguousarray(qs.reshape(N // 8, nb, 4, 8, 4).transpose(0, 3, 1, 2, 4)).reshape(N, nb, 16)

    def rows8(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(N // 8, nb, 8).transpose(0, 2, 1)).reshape(N, nb)

    return q, rows8(d), rows8(m)


def matmul_q41x8_twin(xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, qs: np.ndarray, d: np.ndarray,
                      m: np.ndarray, out: np.ndarray) -> None:
    """The Q4_1x8 product's NumPy twin, bit for bit (`_numba.q41x8_tile_intrinsic`): per (activation row,
    weight row), block by block in order, acc = fma(float(integer dot), fp32(d_w x d_x), acc), then
    acc = fma(m_w, xs, acc), each rounded once (`cpu_ggml.fma32`); the integer dots exact (int64)."""
    from .cpu_ggml import fma32

    R, nb = dx.shape
    q, dd, mm = deinterleave_q41(qs, d, m)
    N = q.shape[0]
    w = np.concatenate([q & 0x0F, q >> 4], axis=-1).astype(np.int64)  # [N, nb, 32]
    x = xq.reshape(R, nb, BLOCK).astype(np.int64)
    dw = dd.view(np.float16).astype(np.float32)
    mw = mm.view(np.float16).astype(np.float32)
    acc = np.zeros((R, N), np.float32)
    for b in range(nb):
        dots = (x[:, b] @ w[:, b].T).astype(np.float32)  # [R, N], exact (|dot| < 2**24)
        acc = fma32(dots, (dx[:, b, None] * dw[None, :, b]).astype(np.float32), acc)
        acc = fma32(np.broadcast_to(mw[None, :, b], (R, N)), np.broadcast_to(xs[:, b, None], (R, N)), acc)
    out[...] = acc


# -- references (NumPy, float64) ------------------------------------------------------------------
def q4k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes [..., 12] -> six-bit (scales, mins) as int64 [..., 8] (ggml's get_scale_min_k4)."""
    sc = sc.astype(np.int64)
    lo_s, lo_m = sc[..., 0:4] & 63, sc[..., 4:8] & 63
    hi_s = (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)
    hi_m = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return np.concatenate([lo_s, hi_s], -1), np.concatenate([lo_m, hi_m], -1)


def q3k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 packed bytes [..., 12] -> its 16 scales as int64 [..., 16], minus 32 (ggml's dequantize_row_q3_K)."""
    sc = sc.astype(np.int64)
    lo, hi = sc[..., 0:8], sc[..., 8:12]
    top = np.concatenate([hi & 3, (hi >> 2) & 3, (hi >> 4) & 3, (hi >> 6) & 3], -1)  # [..., 16]
    low = np.concatenate([lo & 15, lo >> 4], -1)
    return (low | (top << 4)) - 32


def iq4xs_scales(sc: np.ndarray) -> np.ndarray:
    """IQ4_XS's 6 scale bytes [..., 6] (scales_h as a little-endian uint16, then scales_l[4]) -> its 8 sub-block
    scales as int64 [..., 8], minus 32 (ggml's dequantize_row_iq4_xs)."""
    sc = sc.astype(np.int64)
    sh = sc[..., 0] | (sc[..., 1] << 8)
    k = np.arange(8)
    return (((sc[..., 2 + k // 2] >> (4 * (k % 2))) & 15) | (((sh[..., None] >> (2 * k)) & 3) << 4)) - 32


def _q2_bits(qs: np.ndarray) -> np.ndarray:
    """[N, nb, 64] bytes -> the 256 two-bit values per super-block, in value order (p = 128h + 32j + l)."""
    q = qs.reshape(*qs.shape[:2], 2, 1, 32).astype(np.int64)  # [.., h, 1, l]
    return ((q >> (2 * np.arange(4)[:, None])) & 3).reshape(*qs.shape[:2], 256)


def _dequant_k_reference(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, sc: np.ndarray,
                         qh: np.ndarray | None) -> np.ndarray:
    N, nb = d.shape
    dd = d.view(np.float16).astype(np.float64)[..., None, None]  # [N, nb, 1, 1]
    if fmt == "IQ4_XS":  # sub-block k: bytes 16k .. 16k + 15, low nibbles then high, each a table value
        q = qs.reshape(N, nb, 8, 16)
        v = np.asarray(IQ4NL_VALUES, np.float64)[np.concatenate([q & 15, q >> 4], -1).astype(np.int64)]
        return (dd * iq4xs_scales(sc)[..., None] * v).reshape(N, nb * QK_K)
    if fmt in ("Q3_K", "Q2_K"):
        q = _q2_bits(qs[..., :64]).reshape(N, nb, 16, 16).astype(np.float64)
        if fmt == "Q3_K":  # bit 4h + j of hmask[l]: clear -> q - 4
            hm = qs[..., 64:96].astype(np.int64)  # [N, nb, 32]
            bits = (hm[:, :, None, :] >> np.arange(8)[:, None]) & 1  # [N, nb, 8 (= 4h + j), 32]
            q -= 4.0 * (1 - bits.reshape(N, nb, 16, 16))  # bit index 4h + j, then l: value order
            return (dd * q3k_scales(sc)[..., None] * q).reshape(N, nb * QK_K)
        s = sc.astype(np.int64)
        dm = m.view(np.float16).astype(np.float64)[..., None, None]
        return (dd * (s & 15)[..., None] * q - dm * (s >> 4)[..., None]).reshape(N, nb * QK_K)
    if fmt in ("Q4_K", "Q5_K"):
        s, mn = q4k_scale_min(sc)  # [N, nb, 8]
        q4 = qs[..., :128].reshape(N, nb, 4, 32)
        q = np.stack([q4 & 15, q4 >> 4], axis=3).reshape(N, nb, 8, 32).astype(np.float64)
        if fmt == "Q5_K":  # sub-block j's value l: + 16 x bit j of qh[l] (bytes 128..159 of qs)
            qh = qs[..., 128:160]
            q += 16.0 * ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1)
        dm = m.view(np.float16).astype(np.float64)[..., None, None]
        w = dd * s[..., None] * q - dm * mn[..., None]
    else:
        ql = qs.reshape(N, nb, 2, 2, 32).astype(np.int64)  # [.., h, g & 1, l]
        hb = qh.reshape(N, nb, 2, 1, 32).astype(np.int64)  # [.., h, 1, l]
        q = np.empty((N, nb, 2, 4, 32), np.int64)  # [.., h, g, l]
        for g in range(4):
            nib = ql[:, :, :, g & 1] & 15 if g < 2 else ql[:, :, :, g & 1] >> 4
            q[:, :, :, g] = nib | (((hb[:, :, :, 0] >> (2 * g)) & 3) << 4)
        scales = sc.view(np.int8).astype(np.float64).reshape(N, nb, 16, 1)
        w = dd * scales * (q.reshape(N, nb, 16, 16) - 32.0)
    return w.reshape(N, nb * QK_K)


def dequant_reference(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, sc: np.ndarray | None = None,
                      qh: np.ndarray | None = None) -> np.ndarray:
    """Packed rows -> float64 [N, K]."""
    if fmt == X8_FORMAT:
        return dequant_reference("Q4_1", *deinterleave_q41(qs, d, m))
    if fmt in K_FORMATS:
        return _dequant_k_reference(fmt, qs, d, m, sc, qh)
    dd = d.view(np.float16).astype(np.float64)[..., None]  # [N, nb, 1]
    if fmt == "Q8_0":
        w = dd * qs.view(np.int8).astype(np.float64)
    else:
        q = np.concatenate([qs[..., :16] & 0x0F, qs[..., :16] >> 4], axis=-1).astype(np.float64)  # [N, nb, 32]
        if fmt in ("Q5_0", "Q5_1"):  # bit j of the block's 32-bit qh (bytes 16..19) is value j's bit 4
            qh = np.ascontiguousarray(qs[..., 16:20]).view("<u4")  # [N, nb, 1]
            q += 16.0 * ((qh >> np.arange(32, dtype=np.uint32)) & 1)
        if fmt == "Q4_0":
            w = dd * (q - 8.0)
        elif fmt == "IQ4_NL":
            w = dd * np.asarray(IQ4NL_VALUES, np.float64)[q.astype(np.int64)]
        elif fmt == "Q5_0":
            w = dd * (q - 16.0)
        else:
            w = dd * q + m.view(np.float16).astype(np.float64)[..., None]
    return w.reshape(w.shape[0], -1)


def matmul_reference(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None,
                     out: np.ndarray, sc: np.ndarray | None = None, qh: np.ndarray | None = None) -> None:
    """out[R, N] = x[R, K] @ dequant(W)[N, K].T in float64, stored as fp32."""
    out[...] = x.astype(np.float64) @ dequant_reference(fmt, qs, d, m, sc, qh).T


def quantize_rows_reference(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray) -> None:
    """Activations to Q8 blocks of 32, as llama.cpp's `quantize_row_q8_1` (AVX2): per row r and block b,
    d = max|x| / 127, xq = rint(x x (127 / max|x|)) (0 where d is 0; ties to even; 127 / max|x|, not 1 / d,
    which differs in the last bit and moves a value across a rounding boundary now and then), dx = d rounded
    to fp16 (the block stores it as fp16), xs = fp16(d x the sum of xq), the de-quantised block's sum (the Q4_1 min's
    term: with the sum of the exact x instead, the min's term and the nibbles' term no longer cancel alike,
    and the product's error triples on SmolLM2). x [R, K] fp32 -> xq int8 [R * K] (flat), dx, xs fp32
    [R, K / 32] (fp16 values)."""
    R, K = x.shape
    xb = x.reshape(R, K // BLOCK, BLOCK)
    amax = np.abs(xb).max(axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, np.float32(1.0)), np.float32(0.0)
                   ).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    xq[:] = q.reshape(-1)
    dx[...] = d.astype(np.float16).astype(np.float32)
    xs[...] = (d * q.astype(np.int32).sum(axis=-1).astype(np.float32)).astype(np.float16).astype(np.float32)


def quantize_rows_k_reference(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray) -> None:
    """Activations to llama.cpp's Q8_K blocks of 256 (`quantize_row_q8_K_ref`, the activations of its Q4_K /
    Q6_K dot products), in `quantize_rows`' arrays: per row r and super-block, inv = 127 / max|x| in fp32,
    xq = rint(x x inv) (ties to even), d = 1 / inv in fp32 (not rounded to fp16), 0 where max|x| is 0; dx = d
    for each of its 8 blocks of 32; xs holds the block's bsums (the int16 sums of xq over each 16 values, 16
    per super-block) in its bytes: xs.view(np.int16) [R, K / 16]. llama.cpp takes iscale = -127 / max with
    max the value of largest magnitude, and d = 1 / iscale: its xq, d and bsums are ours or all three negated
    (negating is exact, rint symmetric), so every product d xq, and every integer dot product and bsum term
    scaled by d, is the same. x [R, K] fp32 (K a multiple of 256) -> xq int8 [R * K] (flat), dx, xs fp32
    [R, K / 32]."""
    R, K = x.shape
    xb = x.reshape(R, K // QK_K, QK_K)
    amax = np.abs(xb).max(axis=-1)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, np.float32(1.0)), np.float32(0.0)
                   ).astype(np.float32)
    d = np.where(amax > 0, np.float32(1.0) / np.where(amax > 0, inv, np.float32(1.0)), np.float32(0.0)
                 ).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    xq[:] = q.reshape(-1)
    dx[...] = np.repeat(d, QK_K // BLOCK, axis=1)
    xs.view(np.int16)[...] = q.reshape(R, K // 16, 16).astype(np.int16).sum(axis=-1, dtype=np.int16)


def matmul_q8_reference(fmt: str, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, qs: np.ndarray, d: np.ndarray,
                        m: np.ndarray | None, out: np.ndarray, sc: np.ndarray | None = None,
                        qh: np.ndarray | None = None) -> None:
    """out[R, N] = the Q8 product in float64: the de-quantised activations (xq x dx) @ W.T (a Q4_1 / Q5_1
    weight d q + m: d q x the de-quantised x, plus m x xs, the de-quantised block's sum; Q4_K's d s_j q -
    the K types: the de-quantised Q8_K activations @ W.T, xs unread)."""
    if fmt == X8_FORMAT:
        fmt, (qs, d, m) = "Q4_1", deinterleave_q41(qs, d, m)
    R, nb = dx.shape
    xd = (xq.reshape(R, nb, BLOCK).astype(np.float64) * dx[..., None].astype(np.float64)).reshape(R, -1)
    if fmt in ("Q4_1", "Q5_1"):  # d q against the de-quantised x, the min against the blocks' sums
        out[...] = xd @ dequant_reference(fmt, qs, d, np.zeros_like(m)).T \
            + xs.astype(np.float64) @ m.view(np.float16).astype(np.float64).T
    else:
        out[...] = xd @ dequant_reference(fmt, qs, d, m, sc, qh).T


def dequant_rows_reference(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, out: np.ndarray,
                           sc: np.ndarray | None = None, qh: np.ndarray | None = None) -> None:
    """out [n, K] fp32 = the de-quantised rows of (qs, d, m, sc, qh) (already sliced to n rows)."""
    out[...] = dequant_reference(fmt, qs, d, m, sc, qh)


# -- Numba kernels -------------------------------------------------------------------------------
_IQ4NL_F32 = np.array(IQ4NL_VALUES, np.float32)  # a global array: a constant of the compiled code
_h2f = q4k_scales = tile_dot = unpack_q4 = unpack_q5 = unpack_q8 = unpack_q4k = unpack_q5k = unpack_q6k = None
unpack_iq4 = unpack_iq4xs = None
k_tiles = unpack_q3k = unpack_q2k = q3k_scale = None


@functools.cache
def _kernels() -> dict | None:
    if jit() is None:
        return None
    drop_stale_cache(__file__, ("_numba.py",))
    njit, prange = jit()  # type: ignore[misc]
    global _h2f, q4k_scales, tile_dot, unpack_q4, unpack_q5, unpack_q8, unpack_q4k, unpack_q5k, unpack_q6k, k_tiles
    global unpack_iq4, unpack_iq4xs
    global unpack_q3k, unpack_q2k, q3k_scale
    # helpers are module globals: a closure variable (even another jitted function) would keep Numba's
    # on-disk cache from ever matching (a new index entry, and a recompile, in every process)
    _h2f = half_to_float_intrinsic()

    @njit(fastmath=True, cache=True, nogil=True)
    def tile_dot(x, wt, n0, N, out):  # pragma: no cover - compiled
        # out[r, n0 + t] = x[r] . wt[t] for every row r of x and the NT = 4 de-quantised rows t of wt (those
        # with n0 + t < N). Register tile: 2 rows of x x 4 rows of W, 8 accumulators that the k loop
        # vectorises (8 ymm sums along k, reduced once per tile): each x value loaded serves 4 outputs, each
        # weight 2; an odd last row of x runs 1 x 4.
        R, K = x.shape
        w0, w1, w2, w3 = wt[0], wt[1], wt[2], wt[3]
        nt = min(4, N - n0)
        r = 0
        while r + 1 < R:
            x0, x1 = x[r], x[r + 1]
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            for k in range(K):
                u0, u1, u2, u3 = w0[k], w1[k], w2[k], w3[k]
                v = x0[k]
                a00 += v * u0
                a01 += v * u1
                a02 += v * u2
                a03 += v * u3
                v = x1[k]
                a10 += v * u0
                a11 += v * u1
                a12 += v * u2
                a13 += v * u3
            out[r, n0] = a00
            out[r + 1, n0] = a10
            if nt > 1:
                out[r, n0 + 1] = a01
                out[r + 1, n0 + 1] = a11
            if nt > 2:
                out[r, n0 + 2] = a02
                out[r + 1, n0 + 2] = a12
            if nt > 3:
                out[r, n0 + 3] = a03
                out[r + 1, n0 + 3] = a13
            r += 2
        if r < R:
            x0 = x[r]
            a00 = a01 = a02 = a03 = np.float32(0.0)
            for k in range(K):
                v = x0[k]
                a00 += v * w0[k]
                a01 += v * w1[k]
                a02 += v * w2[k]
                a03 += v * w3[k]
            out[r, n0] = a00
            if nt > 1:
                out[r, n0 + 1] = a01
            if nt > 2:
                out[r, n0 + 2] = a02
            if nt > 3:
                out[r, n0 + 3] = a03

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q4(qs, d, m, kind, n, wt, t):  # pragma: no cover - compiled
        # row n of W (kind 0: Q4_0, 1: Q4_1) -> wt[t] fp32. H = 16 read at run time: the j loop then
        # vectorises (8 bytes -> 16 values per step); a constant 16 gets it fully unrolled into scalar code
        nb, H = qs.shape[1], qs.shape[2]
        for b in range(nb):
            db = _h2f(d[n, b])
            mb = _h2f(m[n, b]) if kind == 1 else np.float32(-8.0) * db
            base = b * 2 * H
            for j in range(H):
                v = np.int32(qs[n, b, j])
                wt[t, base + j] = db * np.float32(v & 15) + mb
                wt[t, base + H + j] = db * np.float32(v >> 4) + mb

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q5(qs, d, m, kind, n, wt, t):  # pragma: no cover - compiled
        # row n of W (kind 5: Q5_0, 6: Q5_1) -> wt[t] fp32: unpack_q4's nibbles, bit j of the block's qh (bytes
        # 16..19) as value j's bit 4
        nb, H = qs.shape[1], qs.shape[2] - 4  # H = 16 at run time (see unpack_q4)
        for b in range(nb):
            db = _h2f(d[n, b])
            mb = _h2f(m[n, b]) if kind == 6 else np.float32(-16.0) * db
            qh = (np.uint32(qs[n, b, H]) | (np.uint32(qs[n, b, H + 1]) << 8) | (np.uint32(qs[n, b, H + 2]) << 16)
                  | (np.uint32(qs[n, b, H + 3]) << 24))
            base = b * 2 * H
            for j in range(H):
                v = np.int32(qs[n, b, j])
                lo = (v & 15) | np.int32(((qh >> j) & 1) << 4)
                hi = (v >> 4) | np.int32(((qh >> (j + H)) & 1) << 4)
                wt[t, base + j] = db * np.float32(lo) + mb
                wt[t, base + H + j] = db * np.float32(hi) + mb

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_iq4(qs, d, n, wt, t):  # pragma: no cover - compiled
        # row n of W (IQ4_NL) -> wt[t] fp32: each nibble's value from the table
        nb, H = qs.shape[1], qs.shape[2]  # H = 16 at run time (see unpack_q4)
        lut = _IQ4NL_F32
        for b in range(nb):
            db = _h2f(d[n, b])
            base = b * 2 * H
            for j in range(H):
                v = np.int32(qs[n, b, j])
                wt[t, base + j] = db * lut[v & 15]
                wt[t, base + H + j] = db * lut[v >> 4]

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q8(qs, d, n, wt, t):  # pragma: no cover - compiled
        nb, W = qs.shape[1], qs.shape[2]  # W = 32 at run time (see unpack_q4)
        for b in range(nb):
            db = _h2f(d[n, b])
            base = b * W
            for j in range(W):
                wt[t, base + j] = db * np.float32(qs[n, b, j])

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def q4_nb(x, qs, d, m, kind, out):  # pragma: no cover - compiled
        # kind 0: Q4_0 (offset -8), 1: Q4_1 (min m), 5: Q5_0 (offset -16), 6: Q5_1 (min m), 10: IQ4_NL. Tiles of NT = 4
        # output rows: de-quantised once into wt (fp32, 4 x K, L1/L2), then tile_dot for all rows of x; the
        # last tile repeats row N - 1
        K = x.shape[1]
        N = qs.shape[0]
        ntile = (N + 3) // 4
        nchunk = min(ntile, 64)
        for c in prange(nchunk):
            t0 = c * ntile // nchunk
            t1 = (c + 1) * ntile // nchunk
            wt = np.empty((4, K), np.float32)
            for tl in range(t0, t1):
                n0 = tl * 4
                for t in range(4):
                    if kind == 10:
                        unpack_iq4(qs, d, min(n0 + t, N - 1), wt, t)
                    elif kind >= 5:
                        unpack_q5(qs, d, m, kind, min(n0 + t, N - 1), wt, t)
                    else:
                        unpack_q4(qs, d, m, kind, min(n0 + t, N - 1), wt, t)
                tile_dot(x, wt, n0, N, out)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def q8_nb(x, qs, d, out):  # pragma: no cover - compiled
        K = x.shape[1]
        N = qs.shape[0]
        ntile = (N + 3) // 4
        nchunk = min(ntile, 64)
        for c in prange(nchunk):
            t0 = c * ntile // nchunk
            t1 = (c + 1) * ntile // nchunk
            wt = np.empty((4, K), np.float32)
            for tl in range(t0, t1):
                n0 = tl * 4
                for t in range(4):
                    unpack_q8(qs, d, min(n0 + t, N - 1), wt, t)
                tile_dot(x, wt, n0, N, out)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def dequant_nb(qs, d, m, kind, out):  # pragma: no cover - compiled
        # kind 0: Q4_0, 1: Q4_1, 2: Q8_0 (qs int8), 5: Q5_0, 6: Q5_1, 10: IQ4_NL (through its tile unpacking, into
        # the output row)
        N, nb = d.shape
        for n in prange(N):
            if kind == 10:
                unpack_iq4(qs, d, n, out, n)
                continue
            for b in range(nb):
                db = _h2f(d[n, b])
                base = b * 32
                if kind == 2:
                    for j in range(32):
                        out[n, base + j] = db * np.float32(qs[n, b, j])
                elif kind >= 5:
                    mb = _h2f(m[n, b]) if kind == 6 else np.float32(-16.0) * db
                    qh = (np.uint32(qs[n, b, 16]) | (np.uint32(qs[n, b, 17]) << 8)
                          | (np.uint32(qs[n, b, 18]) << 16) | (np.uint32(qs[n, b, 19]) << 24))
                    for j in range(16):
                        v = np.int32(qs[n, b, j])
                        out[n, base + j] = db * np.float32((v & 15) | np.int32(((qh >> j) & 1) << 4)) + mb
                        out[n, base + 16 + j] = db * np.float32((v >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)) + mb
                else:
                    mb = _h2f(m[n, b]) if kind == 1 else np.float32(-8.0) * db
                    for j in range(16):
                        v = np.int32(qs[n, b, j])
                        out[n, base + j] = db * np.float32(v & 15) + mb
                        out[n, base + 16 + j] = db * np.float32(v >> 4) + mb

    @njit(inline="always", cache=True)
    def q4k_scales(scb, dd, dm, s8, m8):  # pragma: no cover - compiled
        # 12 packed bytes -> s8[j] = d * scale_j, m8[j] = dmin * min_j (float32)
        for j in range(4):
            s8[j] = dd * np.float32(np.int32(scb[j]) & 63)
            m8[j] = dm * np.float32(np.int32(scb[j + 4]) & 63)
            s8[j + 4] = dd * np.float32((np.int32(scb[j + 8]) & 15) | ((np.int32(scb[j]) >> 6) << 4))
            m8[j + 4] = dm * np.float32((np.int32(scb[j + 8]) >> 4) | ((np.int32(scb[j + 4]) >> 6) << 4))

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q4k(qs, sc, d, dm, n, wt, t, s8, m8):  # pragma: no cover - compiled
        nb, L = qs.shape[1], qs.shape[2] // 4  # L = 32 read at run time (see unpack_q4)
        for b in range(nb):
            q4k_scales(sc[n, b], _h2f(d[n, b]), _h2f(dm[n, b]), s8, m8)
            for g in range(4):  # 64 values: low nibbles (sub-block 2g), high nibbles (2g + 1)
                base = b * 256 + g * 64
                sa, sb = s8[2 * g], s8[2 * g + 1]
                ma, mb = m8[2 * g], m8[2 * g + 1]
                for l in range(L):
                    v = np.int32(qs[n, b, g * L + l])
                    wt[t, base + l] = sa * np.float32(v & 15) - ma
                    wt[t, base + L + l] = sb * np.float32(v >> 4) - mb

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q5k(qs, sc, d, dm, n, wt, t, s8, m8):  # pragma: no cover - compiled
        nb, L = qs.shape[1], qs.shape[2] // 5  # L = 32 at run time; qs: 128 nibble bytes, then 32 of high bits
        for b in range(nb):
            q4k_scales(sc[n, b], _h2f(d[n, b]), _h2f(dm[n, b]), s8, m8)
            for g in range(4):  # 64 values: low nibbles + bit 2g of qh, high nibbles + bit 2g + 1
                base = b * 256 + g * 64
                sa, sb = s8[2 * g], s8[2 * g + 1]
                ma, mb = m8[2 * g], m8[2 * g + 1]
                for l in range(L):
                    v = np.int32(qs[n, b, g * L + l])
                    h = np.int32(qs[n, b, 4 * L + l]) >> (2 * g)
                    wt[t, base + l] = sa * np.float32((v & 15) | ((h & 1) << 4)) - ma
                    wt[t, base + L + l] = sb * np.float32((v >> 4) | ((h & 2) << 3)) - mb

    @njit(inline="always", cache=True)
    def q3k_scale(scb, g):  # pragma: no cover - compiled
        # Q3_K's six-bit scale of group g (0..15) from its 12 packed bytes, minus 32 (ggml's dequantize_row_q3_K)
        low = (np.int32(scb[g]) & 15) if g < 8 else (np.int32(scb[g - 8]) >> 4)
        top = (np.int32(scb[8 + (g & 3)]) >> (2 * (g >> 2))) & 3
        return (low | (top << 4)) - 32

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q3k(qs, sc, d, n, wt, t):  # pragma: no cover - compiled
        # qs: 64 bytes of 2-bit values, then the 32 hmask bytes; value 128h + 32j + l (see the module docstring)
        nb, L = qs.shape[1], qs.shape[2] // 3  # L = 32 at run time
        for b in range(nb):
            dd = _h2f(d[n, b])
            for h in range(2):
                for j in range(4):
                    base = b * 256 + h * 128 + j * L
                    s0 = dd * np.float32(q3k_scale(sc[n, b], 8 * h + 2 * j))
                    s1 = dd * np.float32(q3k_scale(sc[n, b], 8 * h + 2 * j + 1))
                    for l in range(L):
                        v = (np.int32(qs[n, b, h * L + l]) >> (2 * j)) & 3
                        if not (np.int32(qs[n, b, 2 * L + l]) >> (4 * h + j)) & 1:
                            v -= 4
                        wt[t, base + l] = np.float32(v) * (s0 if l < 16 else s1)

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_iq4xs(qs, sc, d, n, wt, t):  # pragma: no cover - compiled
        # qs: the 128 nibble bytes (sub-block k: bytes 16k .. 16k + 15), sc: the 6 scale bytes (see iq4xs_scales)
        nb, H = qs.shape[1], qs.shape[2] // 8  # H = 16 at run time
        lut = _IQ4NL_F32
        for b in range(nb):
            dd = _h2f(d[n, b])
            sh = np.int32(sc[n, b, 0]) | (np.int32(sc[n, b, 1]) << 8)
            for k in range(8):
                ls = ((np.int32(sc[n, b, 2 + k // 2]) >> (4 * (k % 2))) & 15) | (((sh >> (2 * k)) & 3) << 4)
                dl = dd * np.float32(ls - 32)
                base = b * 256 + k * 2 * H
                for j in range(H):
                    v = np.int32(qs[n, b, k * H + j])
                    wt[t, base + j] = dl * lut[v & 15]
                    wt[t, base + H + j] = dl * lut[v >> 4]

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q2k(qs, sc, d, dm, n, wt, t):  # pragma: no cover - compiled
        nb, L = qs.shape[1], qs.shape[2] // 2  # L = 32 at run time
        for b in range(nb):
            dd, dmn = _h2f(d[n, b]), _h2f(dm[n, b])
            for h in range(2):
                for j in range(4):
                    base = b * 256 + h * 128 + j * L
                    c0, c1 = np.int32(sc[n, b, 8 * h + 2 * j]), np.int32(sc[n, b, 8 * h + 2 * j + 1])
                    s0, m0 = dd * np.float32(c0 & 15), dmn * np.float32(c0 >> 4)
                    s1, m1 = dd * np.float32(c1 & 15), dmn * np.float32(c1 >> 4)
                    for l in range(L):
                        v = np.float32((np.int32(qs[n, b, h * L + l]) >> (2 * j)) & 3)
                        wt[t, base + l] = s0 * v - m0 if l < 16 else s1 * v - m1

    @njit(fastmath=True, cache=True, nogil=True)
    def unpack_q6k(qs, qh, sc, d, n, wt, t):  # pragma: no cover - compiled
        nb, L = qs.shape[1], qs.shape[2] // 4  # L = 32 at run time
        for b in range(nb):
            dd = _h2f(d[n, b])
            for h in range(2):
                for g in range(4):
                    base = b * 256 + h * 128 + g * L
                    lo = h * 2 * L + (g & 1) * L
                    shift = 4 * (g >> 1)
                    hs = 2 * g
                    s0 = dd * np.float32(sc[n, b, h * 8 + 2 * g])
                    s1 = dd * np.float32(sc[n, b, h * 8 + 2 * g + 1])
                    for l in range(L):  # 32 values (two groups of 16, two scales)
                        v = ((np.int32(qs[n, b, lo + l]) >> shift) & 15) \
                            | (((np.int32(qh[n, b, h * L + l]) >> hs) & 3) << 4)
                        wt[t, base + l] = np.float32(v - 32) * (s0 if l < 16 else s1)

    @njit(fastmath=True, cache=True, nogil=True)
    def k_tiles(x, qs, sc, qh, d, dm, kind, t0, t1, wt, s8, m8, out):  # pragma: no cover - compiled
        # tiles t0 .. t1 - 1 of 4 output rows (the last one repeats row N - 1), kind 3: Q4_K (dm: its dmin),
        # 4: Q6_K (qh: its high bits), 7: Q5_K (dm; its high bits in qs), 8: Q3_K (its hmask in qs), 9: Q2_K
        # (dm), 11: IQ4_XS, each de-quantised into wt [4, >= K], then tile_dot for all rows of x
        N = qs.shape[0]
        for tl in range(t0, t1):
            n0 = tl * 4
            for t in range(4):
                if kind == 3:
                    unpack_q4k(qs, sc, d, dm, min(n0 + t, N - 1), wt, t, s8, m8)
                elif kind == 7:
                    unpack_q5k(qs, sc, d, dm, min(n0 + t, N - 1), wt, t, s8, m8)
                elif kind == 8:
                    unpack_q3k(qs, sc, d, min(n0 + t, N - 1), wt, t)
                elif kind == 9:
                    unpack_q2k(qs, sc, d, dm, min(n0 + t, N - 1), wt, t)
                elif kind == 11:
                    unpack_iq4xs(qs, sc, d, min(n0 + t, N - 1), wt, t)
                else:
                    unpack_q6k(qs, qh, sc, d, min(n0 + t, N - 1), wt, t)
            tile_dot(x, wt, n0, N, out)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def q4k_nb(x, qs, sc, d, dm, out):  # pragma: no cover - compiled
        K = x.shape[1]
        ntile = (qs.shape[0] + 3) // 4
        nchunk = min(ntile, 64)
        for c in prange(nchunk):
            k_tiles(x, qs, sc, qs, d, dm, 3, c * ntile // nchunk, (c + 1) * ntile // nchunk,
                    np.empty((4, K), np.float32), np.empty(8, np.float32), np.empty(8, np.float32), out)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def q6k_nb(x, qs, qh, sc, d, out):  # pragma: no cover - compiled
        K = x.shape[1]
        ntile = (qs.shape[0] + 3) // 4
        nchunk = min(ntile, 64)
        for c in prange(nchunk):
            k_tiles(x, qs, sc, qh, d, d, 4, c * ntile // nchunk, (c + 1) * ntile // nchunk,
                    np.empty((4, K), np.float32), np.empty(8, np.float32), np.empty(8, np.float32), out)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def kx_nb(x, qs, sc, d, dm, kind, out):  # pragma: no cover - compiled
        # kind 7: Q5_K, 8: Q3_K (dm unused), 9: Q2_K (their high bits, if any, in qs), 11: IQ4_XS (dm unused)
        K = x.shape[1]
        ntile = (qs.shape[0] + 3) // 4
        nchunk = min(ntile, 64)
        for c in prange(nchunk):
            k_tiles(x, qs, sc, qs, d, dm, kind, c * ntile // nchunk, (c + 1) * ntile // nchunk,
                    np.empty((4, K), np.float32), np.empty(8, np.float32), np.empty(8, np.float32), out)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def dequant_k_nb(qs, qh, sc, d, dm, kind, out):  # pragma: no cover - compiled
        # kind 3: Q4_K (qh unused), 4: Q6_K (dm unused), 7: Q5_K, 8: Q3_K, 9: Q2_K, 11: IQ4_XS (one row at a time
        # through their tile unpacking, into the output row)
        N, nb = d.shape
        for n in prange(N):
            s8 = np.empty(8, np.float32)
            m8 = np.empty(8, np.float32)
            if kind == 8:
                unpack_q3k(qs, sc, d, n, out, n)
                continue
            if kind == 9:
                unpack_q2k(qs, sc, d, dm, n, out, n)
                continue
            if kind == 11:
                unpack_iq4xs(qs, sc, d, n, out, n)
                continue
            for b in range(nb):
                dd = _h2f(d[n, b])
                if kind == 3 or kind == 7:
                    q4k_scales(sc[n, b], dd, _h2f(dm[n, b]), s8, m8)
                    for g in range(4):
                        base = b * 256 + g * 64
                        for l in range(32):
                            v = np.int32(qs[n, b, g * 32 + l])
                            lo, hi = v & 15, v >> 4
                            if kind == 7:
                                h = np.int32(qs[n, b, 128 + l]) >> (2 * g)
                                lo, hi = lo | ((h & 1) << 4), hi | ((h & 2) << 3)
                            out[n, base + l] = s8[2 * g] * np.float32(lo) - m8[2 * g]
                            out[n, base + 32 + l] = s8[2 * g + 1] * np.float32(hi) - m8[2 * g + 1]
                else:
                    for h in range(2):
                        for g in range(4):
                            base = b * 256 + h * 128 + g * 32
                            lo = h * 64 + (g & 1) * 32
                            shift = 4 * (g >> 1)
                            for l in range(32):
                                v = ((np.int32(qs[n, b, lo + l]) >> shift) & 15) \
                                    | (((np.int32(qh[n, b, h * 32 + l]) >> (2 * g)) & 3) << 4)
                                s = np.float32(sc[n, b, h * 8 + 2 * g + (l >> 4)])
                                out[n, base + l] = dd * s * np.float32(v - 32)

    ks = {"q4_matmul": q4_nb, "q8_matmul": q8_nb, "q_dequant": dequant_nb, "q4k_matmul": q4k_nb,
          "q6k_matmul": q6k_nb, "kx_matmul": kx_nb, "qk_dequant": dequant_k_nb}
    if has_avx2():
        ks.update(_q8a_kernels(njit, prange))
    return ks


# the AVX2 row dots (module globals: see above)
_rd_q41 = _rd_q40 = _rd_q80 = _r4_q41 = _r4_q40 = _r4_q80 = _w4_q41 = _w4_q40 = _w4_q80 = _rh = _fbits = _ffrom = None
_r8_q41 = _r8_q40 = _r8_q80 = _pf = prefetch_rows = flip_rows = side_prefetch = side_wanted = None
_rd_q4r = _r4_q4r = _w4_q4r = _r8_q4r = None
_rd_iq4 = _r4_iq4 = _w4_iq4 = _r8_iq4 = None
_rd_iqd = _r4_iqd = _w4_iqd = _r8_iqd = _rd_iqp = _r4_iqp = _w4_iqp = _r8_iqp = None
_rd_q50 = _rd_q51 = _r4_q50 = _r4_q51 = _w4_q50 = _w4_q51 = _r8_q50 = _r8_q51 = None
_rd_q4k = _r4_q4k = _w4_q4k = _r8_q4k = _rd_q6k = _r4_q6k = _w4_q6k = _r8_q6k = None
_rd_q5k = _r4_q5k = _w4_q5k = _r8_q5k = _rd_q5t = _r4_q5t = _w4_q5t = _r8_q5t = None
_rd_q3k = _r4_q3k = _w4_q3k = _r8_q3k = _rd_q3t = _r4_q3t = _w4_q3t = _r8_q3t = None
_rd_q2k = _r4_q2k = _w4_q2k = _r8_q2k = _rd_q2t = _r4_q2t = _w4_q2t = _r8_q2t = None
_rd_ix4 = _r4_ix4 = _w4_ix4 = _r8_ix4 = _rd_ixt = _r4_ixt = _w4_ixt = _r8_ixt = None
# VNNI: Q4_0 / Q8_0's tiles of rows take the activations with their sign bit flipped (`xu`, see
# `_numba._q8_rows_codegen`'s ux: no vpsignb per pair); elsewhere they take xq and xu is unused
UX = False
# how q8a_span prefetches the weights' stream (`_numba.stream_prefetch`: measured per CPU): the locality, PF1
# tiles of 4 weight rows ahead for the last rows of x (one row: decoding), PF weight rows ahead when rows of x
# come in tiles; the prefetch runs on past the span's end (the next span's rows, up to the matrix's end)
PF_LOC, PF1, PF = stream_prefetch()
# the Q8 kernels' bodies over a span of rows (atelier_kernels.cpu_step calls them too): q8a_span runs each kind's
# compiled body (_q8a_kind; Q5_K's, Q3_K's, Q2_K's and IQ4_XS's loops, _kx_kind, written apart: inside one body,
# Q5_K's code made the other kinds' 2-4 % slower, measured on a decode step of SmolLM2)
quantize_span = quantize_span_k = q8a_span = _q8a_kind = _kx_kind = literally = None
_x8_r1 = _x8_r4 = _x8_r8 = _x8_kind = None  # Q4_1x8's tiles (1, 4, 8 rows of x) and body


def _tile_set(kind: int, ux: bool = False, **how: bool) -> tuple:
    """One kind's tile intrinsics (`_numba.q8_tile_dot_intrinsic`): (1 x 1, 4 weight rows x 1, 1 x 4, 1 x 8 rows of
    activations). ux: the tiles of rows read the sign-flipped activations (a signed 32-value kind, VNNI); the
    32-value kinds' tiles of rows take xs transposed (tmin: Q4_1 / Q5_1's min terms as one vector chain); how:
    chain / acc2 (IQ4_NL and Q4_0's other arithmetics)."""
    tmin = kind < 5 or kind == 17  # the 32-value kinds (the K types read no xs)
    return (q8_tile_dot_intrinsic(kind, 1, 1, **how), q8_tile_dot_intrinsic(kind, 4, 1, **how),
            *(q8_tile_dot_intrinsic(kind, 1, r, tmin=tmin, ux=ux, **how) for r in (4, 8)))


def _q8a_kernels(njit, prange) -> dict:  # noqa: ANN001
    """The Q8-activation kernels (AVX2 only): `quantize_rows` and `q8a_matmul` (see `matmul_q8`)."""
    global _rd_q41, _rd_q40, _rd_q80, _r4_q41, _r4_q40, _r4_q80, _w4_q41, _w4_q40, _w4_q80, _rh
    global _r8_q41, _r8_q40, _r8_q80, _pf, prefetch_rows, flip_rows, side_prefetch, side_wanted, UX
    global _rd_q50, _rd_q51, _r4_q50, _r4_q51, _w4_q50, _w4_q51, _r8_q50, _r8_q51, _rd_q4k, _r4_q4k, _w4_q4k, _r8_q4k
    global _rd_q6k, _r4_q6k, _w4_q6k, _r8_q6k, _rd_q6p, _r4_q6p, _w4_q6p, _r8_q6p, _r4_q4p, _r8_q4p
    global _rd_q4d, _w4_q4d, _r4_q4d, _r8_q4d, _rd_q4t, _w4_q4t, _r4_q4t, _r8_q4t
    _pf = prefetch_intrinsic(PF_LOC)
    UX = has_vnni()
    global quantize_span, quantize_span_k, q8a_span, _q8a_kind, _kx_kind, literally
    from numba import literally
    global _fbits, _ffrom
    _rh = round_to_half_intrinsic()
    _fbits, _ffrom = float_bits_intrinsics()
    # each kind's four tiles (`_tile_set`): 1 x 1, 4 weight rows x 1, 1 x 4 and 1 x 8 rows of x (a batch of 8);
    # the 32-value kinds' tiles of rows: Q4_1's min terms as one vector chain over the rows (xs transposed), the
    # signed kinds on sign-flipped activations where UX
    _rd_q41, _w4_q41, _r4_q41, _r8_q41 = _tile_set(0)
    _rd_q40, _w4_q40, _r4_q40, _r8_q40 = _tile_set(1, UX)
    _rd_q80, _w4_q80, _r4_q80, _r8_q80 = _tile_set(2, UX)
    # Q4_0 as llama.cpp repacks it (q8a_span's kind 3): one scalar chain per pair (`_q8_rows_codegen`'s chain)
    global _rd_q4r, _r4_q4r, _w4_q4r, _r8_q4r
    _rd_q4r, _w4_q4r, _r4_q4r, _r8_q4r = _tile_set(1, UX, chain=True)
    # IQ4_NL (q8a_span's kind 4; the intrinsics' kind 17): as llama.cpp repacks it, Q4_0's chains on the looked-up
    # values; not repacked (kinds 21 / 22): llama.cpp's plain dot product for a token (two sets of lanes),
    # tinyBLAS's for a prompt's rows (one, as Q8_0's)
    global _rd_iq4, _r4_iq4, _w4_iq4, _r8_iq4, _rd_iqd, _r4_iqd, _w4_iqd, _r8_iqd, _rd_iqp, _r4_iqp, _w4_iqp, _r8_iqp
    _rd_iq4, _w4_iq4, _r4_iq4, _r8_iq4 = _tile_set(17, UX, chain=True)
    _rd_iqd, _w4_iqd, _r4_iqd, _r8_iqd = _tile_set(17, UX, acc2=True)
    _rd_iqp, _w4_iqp, _r4_iqp, _r8_iqp = _tile_set(17, UX)
    # Q5_1 / Q5_0 (the intrinsics' kinds 3 / 4): the same tiles
    _rd_q51, _w4_q51, _r4_q51, _r8_q51 = _tile_set(3)
    _rd_q50, _w4_q50, _r4_q50, _r8_q50 = _tile_set(4, UX)
    # Q4_K / Q6_K (the intrinsics' kinds 5 / 6): llama.cpp's arithmetic on Q8_K activations (_q8k_rows_codegen);
    # Q6_K's high bits ride in the m argument
    _rd_q4k, _w4_q4k, _r4_q4k, _r8_q4k = _tile_set(5)
    _rd_q6k, _w4_q6k, _r4_q6k, _r8_q6k = _tile_set(6)
    # Q6_K in a prompt of 8 tokens or more (kind 7 of the intrinsics): llama.cpp's tiled matmul arithmetic
    _rd_q6p, _w4_q6p, _r4_q6p, _r8_q6p = _tile_set(7)
    # Q4_K on a prompt's rows in fours (kind 8): llama.cpp's 4-row repacked kernel (the rest: its 1-row one)
    _r4_q4p, _r8_q4p = (q8_tile_dot_intrinsic(8, 1, r) for r in (4, 8))
    # Q4_K not repacked (kinds 9 / 10): llama.cpp's AVX2 dot product, its tiled matmul in a prompt of 8 or more
    _rd_q4d, _w4_q4d, _r4_q4d, _r8_q4d = _tile_set(9)
    _rd_q4t, _w4_q4t, _r4_q4t, _r8_q4t = _tile_set(10)
    # Q5_K (kinds 11 / 12 of the intrinsics): as llama.cpp runs it on x86 (not repacked), its AVX2 dot product,
    # its tiled matmul in a prompt of 8 or more
    global _rd_q5k, _r4_q5k, _w4_q5k, _r8_q5k, _rd_q5t, _r4_q5t, _w4_q5t, _r8_q5t
    _rd_q5k, _w4_q5k, _r4_q5k, _r8_q5k = _tile_set(11)
    _rd_q5t, _w4_q5t, _r4_q5t, _r8_q5t = _tile_set(12)
    # Q3_K (kinds 13 / 14 of the intrinsics) and Q2_K (15 / 16): llama.cpp's AVX2 dot products, its tiled matmul
    # in a prompt of 8 or more (`_numba._q8k_low2_codegen`)
    global _rd_q3k, _r4_q3k, _w4_q3k, _r8_q3k, _rd_q3t, _r4_q3t, _w4_q3t, _r8_q3t
    global _rd_q2k, _r4_q2k, _w4_q2k, _r8_q2k, _rd_q2t, _r4_q2t, _w4_q2t, _r8_q2t
    _rd_q3k, _w4_q3k, _r4_q3k, _r8_q3k = _tile_set(13)
    _rd_q3t, _w4_q3t, _r4_q3t, _r8_q3t = _tile_set(14)
    _rd_q2k, _w4_q2k, _r4_q2k, _r8_q2k = _tile_set(15)
    _rd_q2t, _w4_q2t, _r4_q2t, _r8_q2t = _tile_set(16)
    # IQ4_XS (kinds 18 / 19 of the intrinsics): llama.cpp's AVX2 dot product, its tiled matmul in a prompt of 8 or
    # more (`_iq4xs_rows_codegen`)
    global _rd_ix4, _r4_ix4, _w4_ix4, _r8_ix4, _rd_ixt, _r4_ixt, _w4_ixt, _r8_ixt
    _rd_ix4, _w4_ix4, _r4_ix4, _r8_ix4 = _tile_set(18)
    _rd_ixt, _w4_ixt, _r4_ixt, _r8_ixt = _tile_set(19)
    # Q4_1 interleaved by 8 rows (kind X8, `interleave_q41`): 1, 4 and 8 rows of x
    global _x8_r1, _x8_r4, _x8_r8, _x8_kind
    _x8_r1, _x8_r4, _x8_r8 = (q41x8_tile_intrinsic(n) for n in (1, 4, 8))

    @njit(cache=True, nogil=True, inline="always")
    def flip_rows(xq, xu, K, r0, r1):  # pragma: no cover - compiled
        # rows r0 .. r1 - 1 of the quantised activations (row stride K) with their sign bit flipped: x + 128
        for i in range(r0 * K, r1 * K):
            xu[i] = xq[i] ^ np.int8(-128)

    @njit(cache=True, nogil=True, inline="always")
    def prefetch_rows(qs, df, mf, kind, bw, nb, dn, n, rows):  # pragma: no cover - compiled
        # weight rows n .. n + rows - 1 (contiguous): their bytes, fp16 scales (dn per row) and (Q4_1 / Q5_1 /
        # Q4_K) mins asked for
        for off in range(0, rows * nb * bw, 64):
            _pf(qs, n * nb * bw + off)
        for off in range(0, rows * dn, 32):
            _pf(df, n * dn + off)
            if kind == 1 or kind == 6 or kind == 7 or 10 <= kind <= 20:
                # (Q6_K's high bits: the hardware's stream prefetch)
                _pf(mf, n * dn + off)

    @njit(cache=True, nogil=True, inline="always")
    def side_prefetch(a, b, plan, cur):  # pragma: no cover - compiled
        # (a, b, plan, cur) = the spans' kv: another stream asked for beside the weights' (the decode step: the
        # next layer's keys and values its attention reads, while the products run compute-bound on rows of x in
        # tiles). plan [2 n]: n runs (first element, 64-byte lines) of a and b alike; cur: (run, line, lines per
        # call, runs). Asks for the next cur[2] lines of both and moves the cursor on. The loops call it only
        # where cur asks for lines (`side_wanted`), its arrays taken out of kv once: taking them out of the
        # tuple at every weight row cost 0.23 cycles per (block, row) pair of an 8-row Q4_1 product, 14 % (Zen 4,
        # one thread, K = 576, kv empty)
        k, i, ln, nrun = cur[2], cur[0], cur[1], cur[3]
        while k > 0 and i < nrun:
            off = plan[2 * i] + ln * 16
            _pf(a, off)
            _pf(b, off)
            ln += 1
            k -= 1
            if ln >= plan[2 * i + 1]:
                i += 1
                ln = 0
        cur[0] = i
        cur[1] = ln

    @njit(cache=True, nogil=True, inline="always")
    def side_wanted(cur):  # pragma: no cover - compiled
        return cur.size == 4 and cur[2] > 0

    @njit(cache=True, nogil=True)  # no fastmath: the same fp32 arithmetic as the NumPy twin
    def quantize_span(x, xq, dxf, xsf, r0, r1):  # pragma: no cover - compiled
        # rows r0 .. r1 - 1 of x [R, K]: xq flat [R * K], dxf / xsf flat [R * K / 32] (row stride K / 32)
        K = x.shape[1]
        nb = K // 32
        for r in range(r0, r1):
            for b in range(nb):
                # the block's largest |x| as the largest of the values' bits with the sign cleared (the same
                # order for finite and infinite floats; NaN's bits count as 0, as a comparison skips NaN): an
                # integer maximum, which vectorises, where a float one (no fastmath here) is a chain of
                # compare-selects (the whole quantiser 3.1 -> 2.9 cycles per value, Zen 4, one thread)
                mb = np.int64(0)
                for j in range(32):
                    u = _fbits(x[r, b * 32 + j]) & 0x7FFFFFFF
                    mb = max(mb, u if u <= 0x7F800000 else 0)
                amax = _ffrom(mb)
                d = amax / np.float32(127.0)
                inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
                s = 0
                for j in range(32):
                    q = np.int8(np.rint(x[r, b * 32 + j] * inv))
                    xq[(r * nb + b) * 32 + j] = q
                    s += np.int32(q)
                dxf[r * nb + b] = _rh(d)
                xsf[r * nb + b] = _rh(d * np.float32(s))

    @njit(cache=True, nogil=True)  # no fastmath: the same fp32 arithmetic as the NumPy twin
    def quantize_span_k(x, xq, dxf, xsf, r0, r1):  # pragma: no cover - compiled
        # rows r0 .. r1 - 1 of x [R, K] (K a multiple of 256) to Q8_K blocks in quantize_span's layout, the
        # bsums in xsf's bytes (`quantize_rows_k_reference`)
        K = x.shape[1]
        nb = K // 32
        bs = xsf.view(np.int16)
        for r in range(r0, r1):
            for sb in range(K // 256):
                mb = np.int64(0)  # max |x| through the bits (see quantize_span)
                for j in range(256):
                    u = _fbits(x[r, sb * 256 + j]) & 0x7FFFFFFF
                    mb = max(mb, u if u <= 0x7F800000 else 0)
                amax = _ffrom(mb)
                inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
                d = np.float32(1.0) / inv if amax > 0 else np.float32(0.0)
                for b in range(sb * 8, sb * 8 + 8):
                    for h in range(2):
                        s = 0
                        for j in range(h * 16, h * 16 + 16):
                            q = np.int8(np.rint(x[r, b * 32 + j] * inv))
                            xq[(r * nb + b) * 32 + j] = q
                            s += np.int32(q)
                        bs[(r * nb + b) * 2 + h] = np.int16(s)
                    dxf[r * nb + b] = d

    @njit(cache=True, nogil=True)
    def _kx_kind(kind, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv):  # pragma: no cover - compiled
        # q8a_span's body for Q5_K (kind 13: llama.cpp's AVX2 dot product; 14: its tiled matmul, a prompt of 8
        # or more), Q3_K (15, 16), Q2_K (17, 18) and IQ4_XS (19, 20), compiled once per kind (a literal, as
        # _q8a_kind)
        literally(kind)
        # the same tiles and prefetch as _q8a_kind, weights 160 / 96 / 64 / 128 bytes per super-block (20 / 12 / 8 /
        # 16 per block of 32)
        bw = 20 if kind <= 14 else 12 if kind <= 16 else 8 if kind <= 18 else 16
        dn, xr = nb // 8, nb * 32
        n0, n1 = np.int64(n0), np.int64(n1)
        ka, kb, kplan, kcur = kv  # (the side stream's arrays, taken out once: see side_prefetch)
        side = side_wanted(kcur)
        N = qs.size // (nb * bw)
        R8 = R - R % 8
        R4 = R8 + (R - R8) // 4 * 4
        tail = n1
        if R4 < R:  # rows past the last four: four weight rows at a time
            w = n0
            while w + 4 <= n1:
                wo, do = w * nb * bw, w * dn
                if w + 4 * PF1 + 4 <= N:
                    prefetch_rows(qs, df, mf, kind, bw, nb, dn, w + 4 * PF1, 4)
                for r in range(R4, R):
                    o = (qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn, do + 2 * dn,
                         do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    if kind == 13:
                        a = _w4_q5k(*o)
                    elif kind == 14:
                        a = _w4_q5t(*o)
                    elif kind == 15:
                        a = _w4_q3k(*o)
                    elif kind == 16:
                        a = _w4_q3t(*o)
                    elif kind == 17:
                        a = _w4_q2k(*o)
                    elif kind == 18:
                        a = _w4_q2t(*o)
                    elif kind == 19:
                        a = _w4_ix4(*o)
                    else:
                        a = _w4_ixt(*o)
                    for t in range(4):
                        out[r, w + t] = a[t]
                w += 4
            tail = w
        for n in range(n0, n1):
            wo, do = n * nb * bw, n * dn
            if R4 >= 4 and n + PF < N:
                prefetch_rows(qs, df, mf, kind, bw, nb, dn, n + PF, 1)
            if side:
                side_prefetch(ka, kb, kplan, kcur)
            r = 0
            while r + 8 <= R:
                o8 = (qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                      (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb, (r + 3) * nb,
                      (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                if kind == 13:
                    a8 = _r8_q5k(*o8)
                elif kind == 14:
                    a8 = _r8_q5t(*o8)
                elif kind == 15:
                    a8 = _r8_q3k(*o8)
                elif kind == 16:
                    a8 = _r8_q3t(*o8)
                elif kind == 17:
                    a8 = _r8_q2k(*o8)
                elif kind == 18:
                    a8 = _r8_q2t(*o8)
                elif kind == 19:
                    a8 = _r8_ix4(*o8)
                else:
                    a8 = _r8_ixt(*o8)
                for j in range(8):
                    out[r + j, n] = a8[j]
                r += 8
            while r + 4 <= R:
                o4 = (qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                      (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                if kind == 13:
                    a4 = _r4_q5k(*o4)
                elif kind == 14:
                    a4 = _r4_q5t(*o4)
                elif kind == 15:
                    a4 = _r4_q3k(*o4)
                elif kind == 16:
                    a4 = _r4_q3t(*o4)
                elif kind == 17:
                    a4 = _r4_q2k(*o4)
                elif kind == 18:
                    a4 = _r4_q2t(*o4)
                elif kind == 19:
                    a4 = _r4_ix4(*o4)
                else:
                    a4 = _r4_ixt(*o4)
                for j in range(4):
                    out[r + j, n] = a4[j]
                r += 4
            if n < tail:
                r = R  # done above, four weight rows at a time
            while r < R:
                o1 = (qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                if kind == 13:
                    out[r, n] = _rd_q5k(*o1)
                elif kind == 14:
                    out[r, n] = _rd_q5t(*o1)
                elif kind == 15:
                    out[r, n] = _rd_q3k(*o1)
                elif kind == 16:
                    out[r, n] = _rd_q3t(*o1)
                elif kind == 17:
                    out[r, n] = _rd_q2k(*o1)
                elif kind == 18:
                    out[r, n] = _rd_q2t(*o1)
                elif kind == 19:
                    out[r, n] = _rd_ix4(*o1)
                else:
                    out[r, n] = _rd_ixt(*o1)
                r += 1

    @njit(cache=True, nogil=True)
    def _x8_kind(xq, dxf, xsf, qs, df, mf, R, nb, n0, n1, out, kv):  # pragma: no cover - compiled
        # q8a_span's body for Q4_1x8 (kind X8): weight rows n0 .. n1 - 1 (multiples of 8) a group of 8 at a
        # time, each group's blocks unpacked once for all rows of x (in eights, a four, then one by one: the same
        # arithmetic per pair in every tile); the weights' stream prefetched PF1 tiles of 4 rows ahead for fewer
        # than 4 rows of x (memory-bound), PF rows ahead for more (compute-bound), rounded up to whole groups
        n0, n1 = np.int64(n0), np.int64(n1)
        N = qs.size // (nb * 16)
        xr = nb * 32
        ahead = ((4 * PF1 if R < 4 else PF) + 7) // 8 * 8  # whole groups
        ka, kb, kplan, kcur = kv  # (the side stream's arrays, taken out once: see side_prefetch)
        side = side_wanted(kcur)
        for g in range(n0 // 8, n1 // 8):
            n = g * 8
            wo, do = n * nb * 16, n * nb
            if n + ahead + 8 <= N:
                prefetch_rows(qs, df, mf, 1, 16, nb, nb, n + ahead, 8)
            if side:
                for _ in range(8):  # (the side stream's budget is per weight row)
                    side_prefetch(ka, kb, kplan, kcur)
            r = 0
            while r + 8 <= R:
                a8 = _x8_r8(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                            (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                            (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, nb)
                for j in range(8):
                    for t in range(8):
                        out[r + j, n + t] = a8[8 * j + t]
                r += 8
            while r + 4 <= R:
                a4 = _x8_r4(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                            (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, nb)
                for j in range(4):
                    for t in range(8):
                        out[r + j, n + t] = a4[8 * j + t]
                r += 4
            while r < R:
                a1 = _x8_r1(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, nb)
                for t in range(8):
                    out[r, n + t] = a1[t]
                r += 1

    @njit(cache=True, nogil=True)
    def _q8a_kind(kind, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv):  # pragma: no cover - compiled
        # q8a_span's body, compiled once per kind (a literal: the other kinds' branches pruned, see q8a_span)
        literally(kind)
        # out[r, n] for every row r of the quantised activations and weight rows n0 .. n1 - 1. qs: the weight
        # bytes flat (uint8), df / mf: fp16 bits flat [N * nb]; rows of x four at a time (each weight block
        # unpacked once for them), the rest one by one: the same arithmetic per row either way. xu: xq with
        # the sign bits flipped (`flip_rows`) where UX (the Q4_0 / Q5_0 / Q8_0 tiles of rows read it), else
        # unused. kind: 0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4_0 as llama.cpp repacks it, 4 IQ4_NL (as it repacks it;
        # 21 / 22: not repacked, a token / a prompt's rows), 5 Q5_0, 6 Q5_1, 7 Q4_K, 8 Q6_K
        # (`Q8A_KIND`), 9 Q6_K in a prompt of 8 rows or more, 10 Q4_K in a prompt (its rows in fours, the rest as
        # 7), 11 Q4_K not repacked, 12 that in a prompt of 8 rows or more (`part_kind`, `prompt_kind`; 13 .. 20:
        # `_kx_kind`); scf: the K formats' scale bytes; Q6_K's high bits come as mf, its 64 bytes per super-block
        # viewed as uint16
        bw = 32 if kind == 2 else 20 if kind == 5 or kind == 6 else 16  # weight bytes per block of 32
        dn = nb // 8 if 7 <= kind <= 20 else nb  # scales per weight row (K formats: one d per 8 blocks)
        ka, kb, kplan, kcur = kv  # (the side stream's arrays, taken out once: see side_prefetch)
        side = side_wanted(kcur)
        mn = kind == 1 or kind == 6  # a min per block: xs read transposed by the tiles of rows
        xr = nb * 32
        n0, n1 = np.int64(n0), np.int64(n1)  # a prange index is unsigned: n + 1 would be a float
        N = qs.size // (nb * bw)  # the matrix's rows (the prefetch's bound)
        R8 = R - R % 8
        R4 = R8 + (R - R8) // 4 * 4
        # rows in groups of eight first (`_r8_*`), then one of four (`_r4_*`); Q4_1 reads their xs transposed:
        # group r0's (row j, block b) at r0 nb + b g + j for a group of g (the same values, so the same sums)
        xst = np.empty(R4 * nb if mn else 0, np.float32)
        for r0 in range(0, R4, 8):
            g = 8 if r0 < R8 else 4
            for b in range(nb if mn else 0):
                for j in range(g):
                    xst[r0 * nb + b * g + j] = xsf[(r0 + j) * nb + b]
        if R4 < R:  # rows past the last four: four weight rows at a time (four independent chains)
            w = n0
            while w + 4 <= n1:
                wo, do = w * nb * bw, w * dn
                if w + 4 * PF1 + 4 <= N:  # the weights' stream: the tile PF1 ahead prefetched
                    prefetch_rows(qs, df, mf, kind, bw, nb, dn, w + 4 * PF1, 4)
                for r in range(R4, R):
                    if kind == 1:
                        a = _w4_q41(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 0:
                        a = _w4_q40(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 3:
                        a = _w4_q4r(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 4:
                        a = _w4_iq4(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 21:
                        a = _w4_iqd(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 22:
                        a = _w4_iqp(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 5:
                        a = _w4_q50(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 6:
                        a = _w4_q51(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 7 or kind == 10:  # (10: rows past the last four take the 1-row kernel)
                        a = _w4_q4k(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 8:
                        a = _w4_q6k(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 9:
                        a = _w4_q6p(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 11:
                        a = _w4_q4d(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    elif kind == 12:
                        a = _w4_q4t(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    else:
                        a = _w4_q80(qs, wo, wo + nb * bw, wo + 2 * nb * bw, wo + 3 * nb * bw, df, do, do + dn,
                                    do + 2 * dn, do + 3 * dn, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                    out[r, w] = a[0]
                    out[r, w + 1] = a[1]
                    out[r, w + 2] = a[2]
                    out[r, w + 3] = a[3]
                w += 4
            tail = w  # weight rows from here still need every row of x
        else:
            tail = n1
        # what the tiles of rows read (the K types: llama.cpp's arithmetic, no sign-flipped activations)
        xa = xu if UX and not mn and (kind < 7 or kind > 20) else xq
        for n in range(n0, n1):
            wo = n * nb * bw
            do = n * dn
            if R4 >= 4 and n + PF < N:  # rows of x in tiles: compute-bound, the weights' stream prefetched
                prefetch_rows(qs, df, mf, kind, bw, nb, dn, n + PF, 1)
            if side:  # (and another stream the caller asks for)
                side_prefetch(ka, kb, kplan, kcur)
            r = 0
            while r + 8 <= R:
                if kind == 1:
                    a8 = _r8_q41(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xst, scf, nb)
                elif kind == 0:
                    a8 = _r8_q40(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 3:
                    a8 = _r8_q4r(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 4:
                    a8 = _r8_iq4(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 21:
                    a8 = _r8_iqd(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 22:
                    a8 = _r8_iqp(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 5:
                    a8 = _r8_q50(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 6:
                    a8 = _r8_q51(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xst, scf, nb)
                elif kind == 7:
                    a8 = _r8_q4k(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 8:
                    a8 = _r8_q6k(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 11:
                    a8 = _r8_q4d(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 12:
                    a8 = _r8_q4t(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 10:
                    a8 = _r8_q4p(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                elif kind == 9:
                    a8 = _r8_q6p(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                else:
                    a8 = _r8_q80(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, (r + 4) * xr,
                                 (r + 5) * xr, (r + 6) * xr, (r + 7) * xr, dxf, r * nb, (r + 1) * nb, (r + 2) * nb,
                                 (r + 3) * nb, (r + 4) * nb, (r + 5) * nb, (r + 6) * nb, (r + 7) * nb, mf, xsf, scf, nb)
                for j in range(8):
                    out[r + j, n] = a8[j]
                r += 8
            while r + 4 <= R:
                if kind == 1:
                    a = _r4_q41(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xst, scf, nb)
                elif kind == 0:
                    a = _r4_q40(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 3:
                    a = _r4_q4r(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 4:
                    a = _r4_iq4(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 21:
                    a = _r4_iqd(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 22:
                    a = _r4_iqp(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 5:
                    a = _r4_q50(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 6:
                    a = _r4_q51(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xst, scf, nb)
                elif kind == 7:
                    a = _r4_q4k(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 8:
                    a = _r4_q6k(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 11:
                    a = _r4_q4d(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 12:
                    a = _r4_q4t(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 10:
                    a = _r4_q4p(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                elif kind == 9:
                    a = _r4_q6p(qs, wo, df, do, xq, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                else:
                    a = _r4_q80(qs, wo, df, do, xa, r * xr, (r + 1) * xr, (r + 2) * xr, (r + 3) * xr, dxf, r * nb,
                                (r + 1) * nb, (r + 2) * nb, (r + 3) * nb, mf, xsf, scf, nb)
                out[r, n] = a[0]
                out[r + 1, n] = a[1]
                out[r + 2, n] = a[2]
                out[r + 3, n] = a[3]
                r += 4
            if n < tail:
                r = R  # done above, four weight rows at a time
            while r < R:
                if kind == 1:
                    out[r, n] = _rd_q41(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 0:
                    out[r, n] = _rd_q40(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 3:
                    out[r, n] = _rd_q4r(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 4:
                    out[r, n] = _rd_iq4(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 21:
                    out[r, n] = _rd_iqd(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 22:
                    out[r, n] = _rd_iqp(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 5:
                    out[r, n] = _rd_q50(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 6:
                    out[r, n] = _rd_q51(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 7 or kind == 10:
                    out[r, n] = _rd_q4k(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 8:
                    out[r, n] = _rd_q6k(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 9:
                    out[r, n] = _rd_q6p(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 11:
                    out[r, n] = _rd_q4d(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                elif kind == 12:
                    out[r, n] = _rd_q4t(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                else:
                    out[r, n] = _rd_q80(qs, wo, df, do, xq, r * xr, dxf, r * nb, mf, xsf, scf, nb)
                r += 1

    @njit(cache=True, nogil=True)
    def q8a_span(xq, xu, dxf, xsf, qs, df, mf, scf, kind, R, nb, n0, n1, out, kv):  # pragma: no cover - compiled
        # out[r, n] for every row r of the quantised activations and weight rows n0 .. n1 - 1 (`_q8a_kind`; Q5_K,
        # Q3_K, Q2_K and IQ4_XS, kinds 13 .. 20: `_kx_kind`, their Q8_K activations in xq, dxf, xsf, xu unread).
        # Each kind's loops are a function of their own: one function holding every kind's tiles (their
        # constants hoisted out of the shared loops, one register allocation for all) ran them slower (Zen 4,
        # one thread, weights streamed, the old and new code alternating in one process: one row of activations
        # 1.65x (Q4_1) / 1.81x (Q8_0), eight rows 1.08x / 1.29x)
        if kind == 1:
            _q8a_kind(1, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 0:
            _q8a_kind(0, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 2:
            _q8a_kind(2, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 3:
            _q8a_kind(3, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 4:
            _q8a_kind(4, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 5:
            _q8a_kind(5, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 6:
            _q8a_kind(6, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 7:
            _q8a_kind(7, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 8:
            _q8a_kind(8, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 9:
            _q8a_kind(9, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 10:
            _q8a_kind(10, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 11:
            _q8a_kind(11, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 12:
            _q8a_kind(12, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 21:
            _q8a_kind(21, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 13:
            _kx_kind(13, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 14:
            _kx_kind(14, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 15:
            _kx_kind(15, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 16:
            _kx_kind(16, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 17:
            _kx_kind(17, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 18:
            _kx_kind(18, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 19:
            _kx_kind(19, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 20:
            _kx_kind(20, xq, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)
        elif kind == 23:  # X8: Q4_1 interleaved by 8 rows (n0, n1 multiples of 8)
            _x8_kind(xq, dxf, xsf, qs, df, mf, R, nb, n0, n1, out, kv)
        else:
            _q8a_kind(22, xq, xu, dxf, xsf, qs, df, mf, scf, R, nb, n0, n1, out, kv)

    @njit(cache=True, nogil=True)
    def quantize_nb(x, xq, dx, xs):  # pragma: no cover - compiled
        quantize_span(x, xq, dx.reshape(-1), xs.reshape(-1), 0, x.shape[0])

    @njit(cache=True, nogil=True)
    def quantize_k_nb(x, xq, dx, xs):  # pragma: no cover - compiled
        quantize_span_k(x, xq, dx.reshape(-1), xs.reshape(-1), 0, x.shape[0])

    @njit(parallel=True, cache=True, nogil=True)
    def q8a_nb(xq, dx, xs, qs, d, m, sc, kind, out):  # pragma: no cover - compiled
        R, nb = dx.shape
        N = d.shape[0]
        dxf, xsf, df, mf = dx.reshape(-1), xs.reshape(-1), d.reshape(-1), m.reshape(-1)
        xu = np.empty(R * nb * 32 if UX and (kind == 0 or kind == 2 or kind == 3 or kind == 4 or kind == 5
                                             or kind == 21 or kind == 22) and R >= 4 else 0,
                      np.int8)
        if xu.size:
            flip_rows(xq, xu, nb * 32, 0, R)
        e = np.empty(0, np.int64)
        kv = (dxf[:0], dxf[:0], e, e)  # no other stream
        for c in prange((N + 63) // 64):  # runs of 64 weight rows: q8a_span's tiles, its setup shared
            q8a_span(xq, xu, dxf, xsf, qs, df, mf, sc, kind, R, nb, c * 64, min(N, c * 64 + 64), out, kv)

    return {"quantize_rows": quantize_nb, "quantize_rows_k": quantize_k_nb, "q8a_matmul": q8a_nb}


def _q8_kernels() -> dict | None:
    """The kernels when the Q8-activation ones are among them (Numba and an AVX2 CPU), else None (for
    `dispatch`: the twins run)."""
    ks = _kernels()
    return ks if ks is not None and "q8a_matmul" in ks else None


def q8_available() -> bool:
    """Whether the Q8-activation kernels run here (Numba and an AVX2 CPU); else `matmul_q8` runs its twins."""
    return _q8_kernels() is not None


def quantize_rows(x: np.ndarray, backend: str | None = None,
                  k: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [R, K] fp32 (K a multiple of 32; of 256 with k) -> (xq int8 [R * K], dx, xs fp32 [R, K / 32]): Q8
    blocks of 32 (`quantize_rows_reference`, the activations of llama.cpp's 32-value block types) or, with k,
    Q8_K blocks of 256 in the same layout (`quantize_rows_k_reference`, those of its K types)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    R, K = x.shape
    unit = QK_K if k else BLOCK
    if x.ndim != 2 or K % unit:
        raise ValueError(f"x {x.shape}: rows must be whole blocks of {unit}")
    xq = np.empty(R * K, np.int8)
    dx = np.empty((R, K // BLOCK), np.float32)
    xs = np.empty((R, K // BLOCK), np.float32)
    if k:
        dispatch(_q8_kernels, "quantize_rows_k", quantize_rows_k_reference, backend, x, xq, dx, xs)
    else:
        dispatch(_q8_kernels, "quantize_rows", quantize_rows_reference, backend, x, xq, dx, xs)
    return xq, dx, xs


_Q4K_REPACK = [True]  # which llama.cpp Q4_K arithmetic is reproduced (`llama_q4k_repack`)


@contextlib.contextmanager
def llama_q4k_repack(on: bool) -> Iterator[None]:
    """Within the block, Q4_K and Q4_0 parts built or multiplied take llama.cpp's arithmetic with those weights
    repacked (on, the default: what llama.cpp runs on an x86 CPU with AVX2, for matrices whose rows are a
    multiple of 8) or not (off: llama.cpp without its extra weight buffers, `use_extra_bufts = False`, as
    `tests/llama_ref.py` sets where the CPU has AMX).
    Process-wide while it lasts: for the tests and benchmarks that compare against such a llama.cpp."""
    old = _Q4K_REPACK[0]
    _Q4K_REPACK[0] = on
    try:
        yield
    finally:
        _Q4K_REPACK[0] = old


def part_kind(fmt: str, rows: int) -> int:
    """The q8a_span kind of a `fmt` matrix of `rows` output rows (one token per activation row): Q8A_KIND, but
    Q4_K as llama.cpp runs a matrix it does not repack (kind 11: rows not a multiple of 8, or its extra weight
    buffers off, `llama_q4k_repack`), Q4_0 as it runs one it repacks (kind 3: rows a multiple of 8, the buffers
    on; its `ggml_gemv` / `ggml_gemm_q4_0_8x8_q8_0`). IQ4_NL: kind 4 where llama.cpp repacks it (the same
    rule; `ggml_gemv` / `ggml_gemm_iq4_nl_8x8_q8_0`), else kind 21 (its `ggml_vec_dot_iq4_nl_q8_0`: two sets of
    8 lanes). Q5_K, Q3_K, Q2_K, IQ4_XS (kinds 13, 15, 17, 19): llama.cpp 0.3.36's AVX2 build repacks none of
    them. Q4_1x8 (not a llama.cpp type): kind X8."""
    if fmt == X8_FORMAT:
        return X8
    kind = Q8A_KIND[fmt]
    if kind == 0 and rows % 8 == 0 and _Q4K_REPACK[0]:  # Q4_0 repacked (llama.cpp's q4_0_8x8 kernels)
        return 3
    if kind == 4 and (rows % 8 or not _Q4K_REPACK[0]):  # IQ4_NL not repacked: its plain dot product
        return 21
    return 11 if kind == 7 and (rows % 8 or not _Q4K_REPACK[0]) else kind


def prompt_kind(kind: int, rows: int) -> int:
    """The q8a_span kind of a part of kind `kind` in a prompt's micro-batch of `rows` tokens of one sequence,
    what llama.cpp computes for such a micro-batch: Q6_K from 8 rows on its tiled matmul (kind 9), a repacked
    Q4_K from 4 rows on its 4-row kernel on the rows in fours and its 1-row one on the rest (kind 10), a Q4_K
    it does not repack, a Q5_K, Q3_K, Q2_K or IQ4_XS from 8 rows on its tiled matmul (kinds 12, 14, 16, 18, 20),
    an IQ4_NL it does not repack from 2 rows on llamafile's tinyBLAS (kind 22).
    Decoding steps, whatever their batch, take the one-token arithmetic: a request's bits do not depend on the
    requests beside it."""
    if kind == 8 and rows >= 8:
        return 9
    if kind == 11 and rows >= 8:
        return 12
    if kind in (13, 15, 17, 19) and rows >= 8:  # Q5_K, Q3_K, Q2_K, IQ4_XS
        return kind + 1
    if kind == 21 and rows >= 2:  # IQ4_NL not repacked: llamafile's tinyBLAS for any micro-batch of 2 or more
        return 22
    return 10 if kind == 7 and rows >= 4 else kind


def matmul_q8(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None = None,
              backend: str | None = None, out: np.ndarray | None = None, sc: np.ndarray | None = None,
              qh: np.ndarray | None = None, prompt: bool = False) -> np.ndarray:
    """x [R, K] fp32 @ W.T with W in `fmt` blocks (`Q8A_FORMATS`), llama.cpp's way: x quantised to Q8
    blocks of 32 first (`quantize_rows`), then integer dot products per block (AVX2, see
    `_numba.q8_row_dot_intrinsic`) scaled in fp32 -> [R, N] fp32. Each row of the result depends only on
    its row of x (the same bits alone or in a batch). Where the kernels do not run (no Numba, no AVX2,
    backend="numpy") the float64 twin computes the same quantised product. Q4_K (with `sc`) and Q6_K (`sc`,
    `qh`): x quantised as llama.cpp quantises it for them, to Q8_K blocks of 256 (`quantize_rows(k=True)`:
    one fp32 scale per 256 values), then llama.cpp's own arithmetic on x86 (`_numba._q8k_rows_codegen`:
    Q4_K as its repacked 8-row kernels, Q6_K / Q5_K / Q3_K / Q2_K as its AVX2 dot products), so the same bits;
    Q4_0 as llama.cpp runs it (`part_kind`: its repacked kernels where the rows are a multiple of 8). prompt: the
    rows are a prompt's micro-batch (tokens of one sequence): the K types from 8 rows on (Q4_K: from 4) then
    take the arithmetic llama.cpp runs for such batches (`prompt_kind`)."""
    _check(fmt, qs, d, m, sc, qh)
    if fmt not in Q8A_FORMATS and fmt != X8_FORMAT:
        raise ValueError(f"fmt={fmt!r}: Q8 activations take {', '.join(Q8A_FORMATS)}, {X8_FORMAT}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    K = qs.shape[1] * BLOCK_VALUES.get(fmt, BLOCK)
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x {x.shape}: expected [R, {K}]")
    if out is None:
        out = np.empty((x.shape[0], qs.shape[0]), np.float32)
    xq, dx, xs = quantize_rows(x, backend, k=fmt in K_FORMATS)
    scf = sc.reshape(-1).view(np.uint8) if sc is not None else np.zeros(0, np.uint8)
    mm = qh.reshape(d.shape[0], -1).view(np.uint16) if fmt == "Q6_K" else d if m is None else m
    kind = part_kind(fmt, qs.shape[0])
    if prompt:
        kind = prompt_kind(kind, x.shape[0])
    if fmt == X8_FORMAT:  # the twin: the kernel's arithmetic bit for bit
        def twin(xq, dx, xs, _q, _d, _m, _s, _k, out):  # noqa: ANN001, ANN202
            matmul_q41x8_twin(xq, dx, xs, qs, d, m, out)
    else:  # the float64 twin
        def twin(xq, dx, xs, _q, _d, _m, _s, _k, out):  # noqa: ANN001, ANN202
            matmul_q8_reference(fmt, xq, dx, xs, qs, d, m, out, sc, qh)
    dispatch(_q8_kernels, "q8a_matmul", twin, backend, xq, dx, xs, qs.reshape(-1).view(np.uint8), d, mm, scf, kind,
             out)
    return out


def available() -> bool:
    """Whether the Numba kernels run (else the NumPy references do)."""
    return _kernels() is not None


_KIND = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q6_K": 4, "Q5_0": 5, "Q5_1": 6, "Q5_K": 7, "Q3_K": 8, "Q2_K": 9,
         "IQ4_NL": 10, "IQ4_XS": 11}
# fmt -> (qs dtype, qs bytes per block); the K formats' sc / qh are checked in _check. Q5_0 / Q5_1: the 16
# nibble bytes, then the block's 32 high bits (4 bytes, little-endian)
_LAYOUT = {"Q8_0": (np.int8, 32), "Q4_0": (np.uint8, 16), "Q4_1": (np.uint8, 16), "IQ4_NL": (np.uint8, 16),
           "Q4_K": (np.uint8, 128), "IQ4_XS": (np.uint8, 128),
           "Q6_K": (np.uint8, 128), "Q5_0": (np.uint8, 20), "Q5_1": (np.uint8, 20), "Q5_K": (np.uint8, 160),
           "Q3_K": (np.uint8, 96), "Q2_K": (np.uint8, 64)}
# the K formats' uint8 scale bytes per super-block
_SC_WIDTH = {"Q4_K": 12, "Q5_K": 12, "Q3_K": 12, "Q2_K": 16, "IQ4_XS": 6}


def _check(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, sc: np.ndarray | None = None,
           qh: np.ndarray | None = None) -> None:
    if fmt == X8_FORMAT:  # Q4_1's arrays, whole groups of 8 rows
        _check("Q4_1", qs, d, m)
        if qs.shape[0] % 8:
            raise ValueError(f"fmt={fmt}: {qs.shape[0]} rows, not whole groups of 8")
        return
    if fmt not in _KIND:
        raise ValueError(f"fmt={fmt!r}: expected one of {ALL_FORMATS}")
    want, width = _LAYOUT[fmt]
    bad = (qs.dtype != want or qs.ndim != 3 or qs.shape[2] != width or d.dtype != np.uint16
           or d.shape != qs.shape[:2]
           or (fmt in ("Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q2_K") and (m is None or m.shape != d.shape)))
    if fmt in _SC_WIDTH:
        bad = bad or sc is None or sc.dtype != np.uint8 or sc.shape != (*d.shape, _SC_WIDTH[fmt])
    if fmt == "Q6_K":
        bad = bad or sc is None or sc.dtype != np.int8 or sc.shape != (*d.shape, 16)
    if fmt == "Q6_K":
        bad = bad or qh is None or qh.dtype != np.uint8 or qh.shape != (*d.shape, 64)
    if bad:
        raise ValueError(f"fmt={fmt}: qs {qs.dtype}{qs.shape} / d {d.dtype}{d.shape} are not {fmt} blocks")


# -- entry points ----------------------------------------------------------------------------------
def matmul(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None = None,
           backend: str | None = None, out: np.ndarray | None = None, sc: np.ndarray | None = None,
           qh: np.ndarray | None = None) -> np.ndarray:
    """x [R, K] fp32 @ W.T where W [N, K] is packed in `fmt` -> [R, N] fp32 (`out` if given, C-contiguous).
    The K formats also take `sc` (and Q6_K `qh`); Q4_1x8 (`interleave_q41`) runs as Q4_1 on a de-interleaved
    copy (the engine multiplies it with Q8 activations: `matmul_q8`)."""
    _check(fmt, qs, d, m, sc, qh)
    if fmt == X8_FORMAT:
        return matmul("Q4_1", x, *deinterleave_q41(qs, d, m), backend=backend, out=out)
    x = np.ascontiguousarray(x, dtype=np.float32)
    K = qs.shape[1] * BLOCK_VALUES[fmt]
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x {x.shape}: expected [R, {K}]")
    if out is None:
        out = np.empty((x.shape[0], qs.shape[0]), np.float32)
    kind = _KIND[fmt]
    if kind == 2:
        dispatch(_kernels, "q8_matmul", lambda x, qs, d, out: matmul_reference(fmt, x, qs, d, None, out), backend,
                 x, qs, d, out)
    elif kind == 3:
        dispatch(_kernels, "q4k_matmul", lambda x, qs, sc, d, m, out: matmul_reference(fmt, x, qs, d, m, out, sc),
                 backend, x, qs, sc, d, m, out)
    elif kind == 4:
        dispatch(_kernels, "q6k_matmul",
                 lambda x, qs, qh, sc, d, out: matmul_reference(fmt, x, qs, d, None, out, sc, qh),
                 backend, x, qs, qh, sc, d, out)
    elif kind in (7, 8, 9, 11):  # Q5_K, Q3_K, Q2_K, IQ4_XS
        dispatch(_kernels, "kx_matmul",
                 lambda x, qs, sc, d, m, k, out: matmul_reference(fmt, x, qs, d, m if k in (7, 9) else None, out, sc),
                 backend, x, qs, sc, d, m if m is not None else d, kind, out)
    else:
        mm = m if m is not None else d
        dispatch(_kernels, "q4_matmul", lambda x, qs, d, m, k, out: matmul_reference(fmt, x, qs, d, m, out), backend,
                 x, qs, d, mm, kind, out)
    return out


def dequant(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None = None, n0: int = 0,
            n1: int | None = None, backend: str | None = None, out: np.ndarray | None = None,
            sc: np.ndarray | None = None, qh: np.ndarray | None = None) -> np.ndarray:
    """Rows n0..n1 of the packed W as fp32 [n1 - n0, K] (into `out` if given: C-contiguous, that shape).
    Q4_1x8: the groups of 8 rows holding them de-interleaved first (a copy of those groups' bytes)."""
    _check(fmt, qs, d, m, sc, qh)
    n1 = qs.shape[0] if n1 is None else n1
    if fmt == X8_FORMAT:
        g0, g1 = n0 // 8 * 8, (n1 + 7) // 8 * 8
        q, dd, mm = deinterleave_q41(qs[g0:g1], d[g0:g1], m[g0:g1])
        return dequant("Q4_1", q, dd, mm, n0 - g0, n1 - g0, backend=backend, out=out)
    qs, d = qs[n0:n1], d[n0:n1]
    if out is None:
        out = np.empty((n1 - n0, qs.shape[1] * BLOCK_VALUES[fmt]), np.float32)
    kind = _KIND[fmt]
    if fmt in K_FORMATS:
        sc = sc[n0:n1]
        qh2 = qh[n0:n1] if qh is not None else qs
        mm = m[n0:n1] if m is not None else d
        dispatch(_kernels, "qk_dequant",
                 lambda qs, qh, sc, d, m, k, out: dequant_rows_reference(
                     fmt, qs, d, m if fmt in ("Q4_K", "Q5_K", "Q2_K") else None, out, sc,
                     qh if fmt == "Q6_K" else None),
                 backend, qs, qh2, sc, d, mm, kind, out)
        return out
    mm = (m if m is not None else d)[n0:n1] if fmt != "Q8_0" else d
    dispatch(_kernels, "q_dequant",
             lambda qs, d, m, k, out: dequant_rows_reference(fmt, qs, d, m if fmt in ("Q4_1", "Q5_1") else None,
                                                             out),
             backend, qs, d, mm, kind, out)
    return out


def warm() -> list[str]:
    """Compile every kernel here once (Numba's on-disk cache keeps them); returns their names."""
    if not available():
        return []
    f32, u16 = np.float32, np.zeros((3, 2), np.uint16)
    for fmt in ALL_FORMATS:
        qs = np.zeros((3, 2, _LAYOUT[fmt][1]), _LAYOUT[fmt][0])
        sc = np.zeros((3, 2, 16), np.int8) if fmt == "Q6_K" else np.zeros((3, 2, _SC_WIDTH.get(fmt, 12)), np.uint8)
        qh = np.zeros((3, 2, 64), np.uint8)
        x = np.ones((2, 2 * BLOCK_VALUES[fmt]), f32)
        matmul(fmt, x, qs, u16, u16, sc=sc, qh=qh)
        matmul(fmt, np.ones((3, x.shape[1]), f32), qs, u16, u16, sc=sc, qh=qh)
        dequant(fmt, qs, u16, u16, sc=sc, qh=qh)
    if q8_available():
        for fmt in Q8A_FORMATS:
            for r in (1, 3):
                matmul_q8(fmt, np.ones((r, BLOCK_VALUES[fmt]), f32), np.zeros((3, 1, _LAYOUT[fmt][1]),
                                                                               _LAYOUT[fmt][0]),
                          u16[:, :1].copy(), u16[:, :1].copy(),
                          sc=np.zeros((3, 1, 16), np.int8) if fmt == "Q6_K"
                          else np.zeros((3, 1, _SC_WIDTH.get(fmt, 12)), np.uint8),
                          qh=np.zeros((3, 1, 64), np.uint8))
        return ["q4_matmul", "q8_matmul", "q_dequant", "q4k_matmul", "q6k_matmul", "kx_matmul",
                "qk_dequant", "q8a_matmul"]
    return ["q4_matmul", "q8_matmul", "q_dequant", "q4k_matmul", "q6k_matmul", "kx_matmul",
            "qk_dequant"]


# -- registry (issue 13): each product and de-quantisation beside its NumPy twin ---------------------
def _random_packed(fmt: str, n: int, nb: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(qs, d, m, sc, qh) of n rows x nb blocks: random bytes, finite fp16 scales."""
    def half(shape: tuple[int, ...]) -> np.ndarray:
        return rng.uniform(1e-3, 0.05, shape).astype(np.float16).view(np.uint16)

    dt, width = _LAYOUT[fmt]
    qs = rng.integers(0, 256, (n, nb, width), dtype=np.uint8).view(dt)
    sc = rng.integers(-128, 128, (n, nb, 16), dtype=np.int8) if fmt == "Q6_K" else \
        rng.integers(0, 256, (n, nb, _SC_WIDTH.get(fmt, 12)), dtype=np.uint8)
    qh = rng.integers(0, 256, (n, nb, 64), dtype=np.uint8)
    return qs, half((n, nb)), half((n, nb)), sc, qh


def _matmul_cases(fmt: str):  # noqa: ANN202
    def cases(device: str, large: bool):  # noqa: ANN202
        rng = np.random.default_rng(13)
        shapes = [(1, 1, 1), (3, 7, 3), (8, 130, 2), (9, 33, 5)] + ([(8, 4096, 16)] if large else [])
        for R, n, nb in shapes:
            x = rng.standard_normal((R, nb * BLOCK_VALUES[fmt]), dtype=np.float32)
            yield (x, *_random_packed(fmt, n, nb, rng)), f"{fmt} {R} x [{n}, {nb * BLOCK_VALUES[fmt]}]"
    return cases


def _dequant_cases(fmt: str):  # noqa: ANN202
    def cases(device: str, large: bool):  # noqa: ANN202
        rng = np.random.default_rng(14)
        for n, nb in [(1, 1), (7, 3), (130, 2)]:
            yield _random_packed(fmt, n, nb, rng), f"{fmt} [{n}, {nb * BLOCK_VALUES[fmt]}]"
    return cases


def _register() -> None:
    from .registry import Kernel, register

    def rel(rtol: float):  # noqa: ANN202
        def check(got: np.ndarray, want: np.ndarray) -> None:
            scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
        return check

    for fmt in ALL_FORMATS:
        def mm(x, qs, d, m, sc, qh, _f=fmt, _b=None):  # noqa: ANN001, ANN202
            return matmul(_f, x, qs, d, m, backend=_b, sc=sc, qh=qh)

        def dq(qs, d, m, sc, qh, _f=fmt, _b=None):  # noqa: ANN001, ANN202
            return dequant(_f, qs, d, m, backend=_b, sc=sc, qh=qh)

        name = fmt.lower()
        register(Kernel(f"qmatmul_{name}", "numba", mm, lambda *a, _mm=mm: _mm(*a, _b="numpy"), _matmul_cases(fmt),
                        rel(1e-4), f"x @ W.T with W in GGUF {fmt} blocks, de-quantised per tile of 4 rows"))
        register(Kernel(f"qdequant_{name}", "numba", dq, lambda *a, _dq=dq: _dq(*a, _b="numpy"),
                        _dequant_cases(fmt), rel(1e-6), f"GGUF {fmt} rows to fp32"))
    for fmt in Q8A_FORMATS:
        def mq(x, qs, d, m, sc, qh, _f=fmt, _b=None):  # noqa: ANN001, ANN202
            return matmul_q8(_f, x, qs, d, m, backend=_b, sc=sc, qh=qh)

        register(Kernel(f"q8a_matmul_{fmt.lower()}", "numba", mq, lambda *a, _mq=mq: _mq(*a, _b="numpy"),
                        _matmul_cases(fmt), rel(1e-5), f"x @ W.T with W in GGUF {fmt} blocks and x in Q8 blocks "
                        "(AVX2 integer dot products)"))
    def mx8(x, qs, d, m, _b=None):  # noqa: ANN001, ANN202
        return matmul_q8(X8_FORMAT, x, qs, d, m, backend=_b)

    register(Kernel("q8a_matmul_q4_1x8", "numba", mx8, lambda *a: mx8(*a, _b="numpy"), _x8_cases,
                    np.testing.assert_array_equal,
                    "x @ W.T with W in Q4_1 blocks interleaved by 8 rows and x in Q8 blocks (each block's integer "
                    "dot summed whole, then fp32): bit for bit its NumPy twin"))
    register(Kernel("q8_quantize_rows", "numba", lambda x: quantize_rows(x), lambda x: quantize_rows(x, "numpy"),
                    _quantize_cases, _exact_arrays, "activations to Q8 blocks of 32 (llama.cpp's rounding)"))
    register(Kernel("q8k_quantize_rows", "numba", lambda x: quantize_rows(x, k=True),
                    lambda x: quantize_rows(x, "numpy", k=True), _quantize_k_cases, _exact_arrays,
                    "activations to Q8_K blocks of 256 (llama.cpp's, for its K types)"))


def _x8_cases(device: str, large: bool):  # noqa: ANN202
    rng = np.random.default_rng(23)
    for R, n, nb in [(1, 8, 1), (3, 16, 3), (8, 24, 2), (13, 40, 5)] + ([(8, 4096, 18)] if large else []):
        qs, d, m, _, _ = _random_packed("Q4_1", n, nb, rng)
        x = rng.standard_normal((R, nb * BLOCK), dtype=np.float32)
        yield (x, *interleave_q41(qs, d, m)), f"Q4_1x8 {R} x [{n}, {nb * BLOCK}]"


def _quantize_cases(device: str, large: bool):  # noqa: ANN202
    rng = np.random.default_rng(15)
    for R, nb in [(1, 1), (3, 5), (8, 18)]:
        x = rng.standard_normal((R, nb * BLOCK), dtype=np.float32) * rng.uniform(0.01, 100)
        x[0, :BLOCK] = 0.0  # an all-zero block: scale 0, values 0
        if nb > 1:
            x[0, BLOCK:2 * BLOCK] = np.float32(127.0) * np.arange(BLOCK, dtype=np.float32) / 2  # ties at .5
        yield (x,), f"{R} x {nb * BLOCK}"


def _quantize_k_cases(device: str, large: bool):  # noqa: ANN202
    rng = np.random.default_rng(16)
    for R, nb in [(1, 1), (3, 2), (8, 6)]:
        x = rng.standard_normal((R, nb * QK_K), dtype=np.float32) * rng.uniform(0.01, 100)
        x[0, :QK_K] = 0.0  # an all-zero super-block: scale 0, values 0
        if nb > 1:  # max|x| = 63.5: 127 / max|x| = 2 exactly, and every other x x 2 a tie at .5
            x[0, QK_K:2 * QK_K] = (np.arange(QK_K) % 127 - 63 + 0.5).astype(np.float32) / 2
            x[0, QK_K] = np.float32(63.5)
        yield (x,), f"{R} x {nb * QK_K}"


def _exact_arrays(got: tuple, want: tuple) -> None:
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


_register()
