"""CPU products with GGUF-packed weights (Q8_0, Q4_0, Q4_1): Numba kernels and their NumPy twins.

    out = matmul(fmt, x, qs, d, m)          # x [R, K] fp32, W packed [N, K] -> x @ W.T  [R, N] fp32
    w = dequant(fmt, qs, d, m, n0, n1)      # rows n0..n1 of W as fp32 [n1 - n0, K]

The weights stay in llama.cpp's blocks of 32 values along K (`engine.llm.qweights`
holds them, split once at load into separate arrays, no byte added):

| fmt  | qs                       | d (fp16 bits)  | m (fp16 bits) | value j of block b         |
|------|--------------------------|----------------|---------------|----------------------------|
| Q8_0 | int8  [N, K/32, 32]      | uint16 [N, K/32] | -           | d * qs[j]                  |
| Q4_0 | uint8 [N, K/32, 16]      | uint16 [N, K/32] | -           | d * (nibble_j - 8)         |
| Q4_1 | uint8 [N, K/32, 16]      | uint16 [N, K/32] | uint16 [N, K/32] | d * nibble_j + m     |

where nibble_j is the low nibble of qs[j] for j < 16 and the high nibble of
qs[j - 16] for j >= 16. Bytes read per product: Q4_1 20 per 32 weights
(0.625 B/weight, against 4 for fp32), Q4_0 18, Q8_0 34.

The kernels read every weight block once for all R rows of x and de-quantise
it in registers: per block, s_r = sum_j x[r, j] * q_j in fp32, then
acc_r += d * s_r + m * sum_j x[r, j] (Q4_1; the block sums of x are computed
once per call), acc_r += d * (s_r - 8 * sum_j x[r, j]) (Q4_0), acc_r += d * s_r
(Q8_0). The q_j are small integers, exact in fp32, so this is the de-quantised
product up to summation order (`fastmath`), like BLAS. Work is split over
chunks of output rows, parallel. The NumPy twins de-quantise to float64 and
multiply (the oracle the tests use, beside `gguf.quants.dequantize`).

Numba is optional (`_numba.jit()`); without it the references run. Calls are
serialised by `_numba.LOCK` (see `_numba`).
"""

from __future__ import annotations

import functools

import numpy as np

from ._numba import dispatch, half_to_float_intrinsic, jit

FORMATS = ("Q8_0", "Q4_0", "Q4_1")
BLOCK = 32


# -- references (NumPy, float64) ------------------------------------------------------------------
def dequant_reference(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Packed rows -> float64 [N, K]."""
    dd = d.view(np.float16).astype(np.float64)[..., None]  # [N, nb, 1]
    if fmt == "Q8_0":
        w = dd * qs.view(np.int8).astype(np.float64)
    else:
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)  # [N, nb, 32]
        if fmt == "Q4_0":
            w = dd * (q - 8.0)
        else:
            w = dd * q + m.view(np.float16).astype(np.float64)[..., None]
    return w.reshape(w.shape[0], -1)


def matmul_reference(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None,
                     out: np.ndarray) -> None:
    """out[R, N] = x[R, K] @ dequant(W)[N, K].T in float64, stored as fp32."""
    out[...] = x.astype(np.float64) @ dequant_reference(fmt, qs, d, m).T


def dequant_rows_reference(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, out: np.ndarray) -> None:
    """out [n, K] fp32 = the de-quantised rows of (qs, d, m) (already sliced to n rows)."""
    out[...] = dequant_reference(fmt, qs, d, m)


# -- Numba kernels -------------------------------------------------------------------------------
_h2f = None  # set by _kernels()


@functools.cache
def _kernels() -> tuple | None:
    if jit() is None:
        return None
    njit, prange = jit()  # type: ignore[misc]
    global _h2f
    _h2f = half_to_float_intrinsic()  # a module global: a closure variable would keep Numba from caching

    @njit(fastmath=True, cache=True, nogil=True)
    def block_sums(x, xs):  # pragma: no cover - compiled
        R, nb = xs.shape
        for r in range(R):
            for b in range(nb):
                s = np.float32(0.0)
                for j in range(32):
                    s += x[r, b * 32 + j]
                xs[r, b] = s

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def q4_nb(x, qs, d, m, kind, out):  # pragma: no cover - compiled
        # kind 0: Q4_0 (offset -8), 1: Q4_1 (min m)
        R, K = x.shape
        N, nb, H = qs.shape  # H = 16, read at run time: a constant trip count gets the j loop fully unrolled
        # and the block loop vectorised instead (gathers of x; measured 15x slower)
        xs = np.empty((R, nb), np.float32)
        block_sums(x, xs)
        nchunk = min(N, 64)
        for c in prange(nchunk):
            n0 = c * N // nchunk
            n1 = (c + 1) * N // nchunk
            acc = np.empty(R, np.float32)
            w = np.empty(2 * H, np.float32)
            for n in range(n0, n1):
                for r in range(R):
                    acc[r] = 0.0
                qn = qs[n]
                for b in range(nb):
                    q = qn[b]
                    db = _h2f(d[n, b])
                    if kind == 1:
                        mb = _h2f(m[n, b])
                    else:
                        mb = np.float32(-8.0) * db
                    base = b * 32
                    if R <= 2:  # unpack inside the dot product: d * sum(x q) + m * sum(x)
                        for r in range(R):
                            xr = x[r]
                            s = np.float32(0.0)
                            for j in range(H):
                                v = np.int32(q[j])
                                s += xr[base + j] * np.float32(v & 15) + xr[base + H + j] * np.float32(v >> 4)
                            acc[r] += db * s + mb * xs[r, b]
                    else:  # unpack once into 32 floats (L1), then one dot per row
                        for j in range(H):
                            v = np.int32(q[j])
                            w[j] = db * np.float32(v & 15) + mb
                            w[H + j] = db * np.float32(v >> 4) + mb
                        for r in range(R):
                            xr = x[r]
                            s = np.float32(0.0)
                            for j in range(2 * H):
                                s += xr[base + j] * w[j]
                            acc[r] += s
                for r in range(R):
                    out[r, n] = acc[r]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def q8_nb(x, qs, d, out):  # pragma: no cover - compiled
        R, K = x.shape
        N, nb, W = qs.shape  # W = 32 at run time (see q4_nb)
        nchunk = min(N, 64)
        for c in prange(nchunk):
            n0 = c * N // nchunk
            n1 = (c + 1) * N // nchunk
            acc = np.empty(R, np.float32)
            for n in range(n0, n1):
                for r in range(R):
                    acc[r] = 0.0
                qn = qs[n]
                for b in range(nb):
                    q = qn[b]
                    db = _h2f(d[n, b])
                    base = b * 32
                    for r in range(R):
                        xr = x[r]
                        s = np.float32(0.0)
                        for j in range(W):
                            s += xr[base + j] * np.float32(q[j])
                        acc[r] += db * s
                for r in range(R):
                    out[r, n] = acc[r]

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def dequant_nb(qs, d, m, kind, out):  # pragma: no cover - compiled
        # kind 0: Q4_0, 1: Q4_1, 2: Q8_0 (qs int8)
        N, nb = d.shape
        for n in prange(N):
            for b in range(nb):
                db = _h2f(d[n, b])
                base = b * 32
                if kind == 2:
                    for j in range(32):
                        out[n, base + j] = db * np.float32(qs[n, b, j])
                else:
                    mb = _h2f(m[n, b]) if kind == 1 else np.float32(-8.0) * db
                    for j in range(16):
                        v = np.int32(qs[n, b, j])
                        out[n, base + j] = db * np.float32(v & 15) + mb
                        out[n, base + 16 + j] = db * np.float32(v >> 4) + mb

    return q4_nb, q8_nb, dequant_nb


def available() -> bool:
    """Whether the Numba kernels run (else the NumPy references do)."""
    return _kernels() is not None


_KIND = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}


def _check(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> None:
    if fmt not in _KIND:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
    width = 32 if fmt == "Q8_0" else 16
    want = np.int8 if fmt == "Q8_0" else np.uint8
    if qs.dtype != want or qs.ndim != 3 or qs.shape[2] != width or d.dtype != np.uint16 \
            or d.shape != qs.shape[:2] or (fmt == "Q4_1" and (m is None or m.shape != d.shape)):
        raise ValueError(f"fmt={fmt}: qs {qs.dtype}{qs.shape} / d {d.dtype}{d.shape} are not {fmt} blocks")


# -- entry points ----------------------------------------------------------------------------------
def matmul(fmt: str, x: np.ndarray, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None = None,
           backend: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """x [R, K] fp32 @ W.T where W [N, K] is packed in `fmt` -> [R, N] fp32 (`out` if given, C-contiguous)."""
    _check(fmt, qs, d, m)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != qs.shape[1] * BLOCK:
        raise ValueError(f"x {x.shape}: expected [R, {qs.shape[1] * BLOCK}]")
    if out is None:
        out = np.empty((x.shape[0], qs.shape[0]), np.float32)
    kind = _KIND[fmt]
    if kind == 2:
        dispatch(_kernels, 1, lambda x, qs, d, out: matmul_reference(fmt, x, qs, d, None, out), backend,
                 x, qs, d, out)
    else:
        mm = m if m is not None else d
        dispatch(_kernels, 0, lambda x, qs, d, m, k, out: matmul_reference(fmt, x, qs, d, m, out), backend,
                 x, qs, d, mm, kind, out)
    return out


def dequant(fmt: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None = None, n0: int = 0,
            n1: int | None = None, backend: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rows n0..n1 of the packed W as fp32 [n1 - n0, K] (into `out` if given: C-contiguous, that shape)."""
    _check(fmt, qs, d, m)
    n1 = qs.shape[0] if n1 is None else n1
    qs, d = qs[n0:n1], d[n0:n1]
    mm = (m if m is not None else d)[n0:n1] if fmt != "Q8_0" else d
    if out is None:
        out = np.empty((n1 - n0, qs.shape[1] * BLOCK), np.float32)
    kind = _KIND[fmt]
    dispatch(_kernels, 2,
             lambda qs, d, m, k, out: dequant_rows_reference(fmt, qs, d, m if fmt == "Q4_1" else None, out),
             backend, qs, d, mm, kind, out)
    return out
