"""Issue 16 item 2: is the four-rows-at-a-time product loop worth sharing between cpu_decode.rows_matmul and
cpu_topk.half_scores? The loop as one shared njit helper (inline="always") vs written out in each kernel, timed
in turn (3 rounds, best median). Run with NUMBA_NUM_THREADS=1 to compare code generation, not thread wake-ups:

    NUMBA_NUM_THREADS=1 python benchmarks/four_rows_timing.py
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atelier_kernels import cpu_decode, cpu_topk  # noqa: E402
from atelier_kernels._numba import half_to_float_intrinsic  # noqa: E402

h2f = half_to_float_intrinsic()

@njit(fastmath=True, nogil=True, inline="always")
def dot_rows(x, row, out, n):
    M, Kd = x.shape
    m = 0
    while m + 4 <= M:
        a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
        x0 = x[m]; x1 = x[m + 1]; x2 = x[m + 2]; x3 = x[m + 3]
        for k in range(Kd):
            r = row[k]
            a0 += x0[k] * r; a1 += x1[k] * r; a2 += x2[k] * r; a3 += x3[k] * r
        out[m, n] = a0; out[m + 1, n] = a1; out[m + 2, n] = a2; out[m + 3, n] = a3
        m += 4
    while m < M:
        acc = np.float32(0.0)
        xm = x[m]
        for k in range(Kd):
            acc += xm[k] * row[k]
        out[m, n] = acc
        m += 1

@njit(parallel=True, fastmath=True, nogil=True)
def rows_matmul_shared(x, w, out):
    for n in prange(w.shape[0]):
        dot_rows(x, w[n], out, n)

@njit(parallel=True, fastmath=True, nogil=True)
def half_shared(x, w16, out):
    M, Kd = x.shape
    N = w16.shape[0]
    for blk in prange((N + 255) // 256):
        f = np.empty(Kd, np.float32)
        for n in range(blk * 256, min(N, blk * 256 + 256)):
            row = w16[n]
            for k in range(Kd):
                f[k] = h2f(row[k])
            dot_rows(x, f, out, n)

def med(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)

rng = np.random.default_rng(1)
w = rng.standard_normal((3072, 576), dtype=np.float32)
w16 = rng.standard_normal((50_000, 384)).astype(np.float16)
ks = cpu_decode._kernels(); kt = cpu_topk._kernels()
for M in (1, 4, 8):
    x = rng.standard_normal((M, 576), dtype=np.float32)
    o1 = np.empty((M, 3072), np.float32); o2 = o1.copy()
    x16 = rng.standard_normal((M, 384), dtype=np.float32)
    p1 = np.empty((M, 50_000), np.float32); p2 = p1.copy()
    bits = w16.view(np.uint16)
    res = []
    for rnd in range(3):  # interleave to share the noise
        a = med(lambda: ks["rows_matmul"](x, w, o1), 40)
        b = med(lambda: rows_matmul_shared(x, w, o2), 40)
        c = med(lambda: kt["half_scores"](x16, bits, p1), 15)
        d = med(lambda: half_shared(x16, bits, p2), 15)
        res.append((a, b, c, d))
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-4)
    a, b, c, d = (min(r[i] for r in res) for i in range(4))
    print(f"M={M}: rows_matmul written-out {a:.3f} ms, shared helper {b:.3f} ms; "
          f"half_scores written-out {c:.3f} ms, shared helper {d:.3f} ms", flush=True)
