"""CPU kernels for the NumPy decode step (`engine.llm.npstep`): Numba kernels and their NumPy twins.

    out = rows_matmul(x, w)                               # x [M, K], w [N, K] -> x @ w.T  [M, N]
    out = attend(q, K, V, row_slot, row_pos, scale)       # q [R, H, hd] -> [R, H, hd]
    out = attend_q8(q, QK, SK, QV, SV, RK, RV, row_slot, row_pos, row_end, scale)   # the int8 cache's layout

`rows_matmul` is a product with few rows: one decode step, a batch of them,
or a few drafted tokens. BLAS handles the few-row shape badly on our CPUs: it
packs the weight matrix before multiplying, so 8 rows cost about 2x one row
although the product is still memory-bound. The kernel reads every weight row
once and multiplies it with four rows of `x` at a time (the four partial sums
stay in registers), parallel over weight rows. Measured on the CI's 2-core EPYC
for SmolLM2's 30 layers: 1 row 25 ms (OpenBLAS's matrix-vector product 35 ms),
8 rows 45 ms (OpenBLAS 70 ms). It is compute-bound past ~50 rows, where BLAS's
GEMM wins (prompts go to the torch forward there).

Do not interleave these kernels with BLAS calls: OpenBLAS's idle threads spin
on the same cores as Numba's, and a layer that mixes them runs several times
slower (measured: a 35-token prompt 511 ms mixed, 219 ms all-Numba).

`attend` is grouped-query attention of each row over its own slot's cached
keys: row r is the token at position `row_pos[r]` of slot `row_slot[r]` and
sees keys 0 .. row_pos[r] (so a batch of slots at different lengths and a
causal run of tokens in one slot are the same call). The K/V of the rows must
already be in the cache. One task per (row, kv head), parallel. NumPy needs a
dozen small ops per layer for this (about 0.8 ms per layer for 8 rows); the
kernel takes a few microseconds per task.

`attend_q8` is the same attention over `engine.llm.cache.Int8Cache`'s layout:
keys and values older than the slot's last `R` tokens are int8 rows with one
fp32 scale each (`QK`, `SK`, `QV`, `SV`), the last `R` sit in fp32 rings
(`RK`, `RV`, position p at ring index p % R). Key j of row r comes from the
int8 part when j < row_end[r] - R (row_end: the slot's length after this
step), else from the ring: the rule `Int8Cache._fetch` applies. The int8 rows
are read as they are (a dot with int8 keys times the scale), never expanded
to fp32 in memory: that expansion is most of what made the torch forward's
int8-cache step slower than its full-cache step.

The kernels compute in fp32 with the summation order left to the compiler
(`fastmath`), like BLAS; tests compare them with the NumPy references at fp32
tolerance. Numba is optional: without it (`available()` is False) the
references run (the product's is OpenBLAS: a matrix-vector product for one
row). `ATELIER_CPU_KERNELS=numpy` forces the references (read once, see
`atelier_kernels._numba`); `backend=` ("numba" | "numpy") on each call picks one side
for tests. Both are registered by name beside their twins in
`atelier_kernels.registry`.

Thread safety: calls are serialised by a lock (Numba's `workqueue` threading
layer, its fallback when no OpenMP or TBB runtime is present, must not be
entered from two threads at once).
"""

from __future__ import annotations

import functools

import numpy as np

from ._numba import dispatch, jit

dot = softmax = axpy = attend_q8_task = None  # the attention kernels' jitted helpers, set by _kernels()


# -- references (NumPy) ---------------------------------------------------------------------------
def rows_matmul_reference(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[M, N] = x[M, K] @ w[N, K].T by BLAS: a matrix-vector product for one row (no packing of w)."""
    if x.shape[0] == 1:
        np.matmul(w, x[0], out=out[0])
    else:
        np.matmul(x, w.T, out=out)


def _attend_row(qr: np.ndarray, kb: np.ndarray, vb: np.ndarray, scale: float) -> np.ndarray:
    """qr [H, hd]; kb, vb [KVH, T, hd] -> softmax(scale q k^T) v  [H, hd]."""
    H, hd = qr.shape
    KVH = kb.shape[0]
    sc = qr.reshape(KVH, H // KVH, hd) @ kb.transpose(0, 2, 1) * np.float32(scale)  # [KVH, G, T]
    sc -= sc.max(axis=-1, keepdims=True)
    p = np.exp(sc)
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ vb).reshape(H, hd)


def attend_reference(q: np.ndarray, K: np.ndarray, V: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray,
                     scale: float, out: np.ndarray) -> None:
    """q [R, H, hd]; K, V [slots, KVH, L, hd]; out [R, H, hd]: softmax(scale q k^T) v over keys 0..row_pos[r]."""
    for r in range(q.shape[0]):
        T = int(row_pos[r]) + 1
        out[r] = _attend_row(q[r], K[row_slot[r], :, :T], V[row_slot[r], :, :T], scale)


def _q8_keys(Q: np.ndarray, S: np.ndarray, ring: np.ndarray, T: int, cut: int) -> np.ndarray:
    """Positions 0..T-1 of one slot in fp32 [KVH, T, hd]: int8 rows x scale before `cut`, ring entries after."""
    R = ring.shape[1]
    out = np.empty((Q.shape[0], T, Q.shape[2]), np.float32)
    out[:, :cut] = Q[:, :cut].astype(np.float32) * S[:, :cut, None]
    out[:, cut:] = ring[:, np.arange(cut, T) % R]
    return out


def attend_q8_reference(q: np.ndarray, QK: np.ndarray, SK: np.ndarray, QV: np.ndarray, SV: np.ndarray,
                        RK: np.ndarray, RV: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray,
                        row_end: np.ndarray, scale: float, out: np.ndarray) -> None:
    """`attend_reference` over the int8 cache's layout. QK, QV [slots, KVH, L, hd] int8; SK, SV [slots, KVH, L]
    fp32; RK, RV [slots, KVH, R, hd] fp32 rings; key j of row r is int8 when j < row_end[r] - R, else the ring's."""
    R = RK.shape[2]
    for r in range(q.shape[0]):
        s, T = row_slot[r], int(row_pos[r]) + 1
        cut = min(max(int(row_end[r]) - R, 0), T)
        out[r] = _attend_row(q[r], _q8_keys(QK[s], SK[s], RK[s], T, cut), _q8_keys(QV[s], SV[s], RV[s], T, cut),
                             scale)


# -- Numba kernels -------------------------------------------------------------------------------
@functools.cache
def _kernels() -> dict | None:
    if jit() is None:
        return None
    njit, prange = jit()  # type: ignore[misc]
    global dot, softmax, axpy, attend_q8_task
    # the attention kernels' shared steps; module globals, not closure variables, which would keep Numba's
    # on-disk cache from matching (see atelier_kernels/cpu_qmatmul.py). Each is generic over the row's dtype (fp32,
    # or the int8 cache's rows, widened in the loop) and inlined into the kernels.

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def dot(a, b):  # pragma: no cover - compiled
        acc = np.float32(0.0)
        for d in range(a.shape[0]):
            acc += a[d] * np.float32(b[d])
        return acc

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def softmax(p):  # pragma: no cover - compiled
        best = np.float32(-np.inf)
        for j in range(p.shape[0]):
            if p[j] > best:
                best = p[j]
        tot = np.float32(0.0)
        for j in range(p.shape[0]):
            e = np.exp(p[j] - best)
            p[j] = e
            tot += e
        inv = np.float32(1.0) / tot
        for j in range(p.shape[0]):
            p[j] *= inv

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def axpy(o, w, v):  # pragma: no cover - compiled
        for d in range(o.shape[0]):
            o[d] += w * np.float32(v[d])

    # the four-rows loop is also in cpu_topk.half_scores_nb: why it is not shared is noted there (measured)
    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def rows_matmul_nb(x, w, out):  # pragma: no cover - compiled
        M, Kd = x.shape
        N = w.shape[0]
        for n in prange(N):
            row = w[n]
            m = 0
            while m + 4 <= M:
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                x0 = x[m]
                x1 = x[m + 1]
                x2 = x[m + 2]
                x3 = x[m + 3]
                for k in range(Kd):
                    r = row[k]
                    a0 += x0[k] * r
                    a1 += x1[k] * r
                    a2 += x2[k] * r
                    a3 += x3[k] * r
                out[m, n] = a0
                out[m + 1, n] = a1
                out[m + 2, n] = a2
                out[m + 3, n] = a3
                m += 4
            while m < M:
                acc = np.float32(0.0)
                xm = x[m]
                for k in range(Kd):
                    acc += xm[k] * row[k]
                out[m, n] = acc
                m += 1

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def attend_nb(q, K, V, row_slot, row_pos, scale, out):  # pragma: no cover - compiled
        R, H = q.shape[0], q.shape[1]
        KVH = K.shape[1]
        G = H // KVH
        for task in prange(R * KVH):
            r = task // KVH
            h = task - r * KVH
            T = row_pos[r] + 1
            kb = K[row_slot[r], h]
            vb = V[row_slot[r], h]
            p = np.empty(T, np.float32)
            for g in range(G):
                qh = q[r, h * G + g]
                for j in range(T):
                    p[j] = dot(qh, kb[j]) * scale
                softmax(p)
                o = out[r, h * G + g]
                o[:] = 0.0
                for j in range(T):
                    axpy(o, p[j], vb[j])

    @njit(fastmath=True, cache=True, nogil=True)
    def attend_q8_task(q, QK, SK, QV, SV, RK, RV, row_slot, row_pos, row_end, scale, out, r, h, g0, g1,
                       p):  # pragma: no cover - compiled
        # row r, kv head h of an int8 cache: its query heads g0 .. g1 - 1 over keys 0 .. row_pos[r] (also run by
        # the fused decode step, atelier_kernels/cpu_step.py). Scratch p [>= T], left zero
        KVH = QK.shape[1]
        Rr = RK.shape[2]
        G = q.shape[1] // KVH
        s = row_slot[r]
        T = row_pos[r] + 1
        cut = min(max(row_end[r] - Rr, 0), T)  # keys before cut are int8, the rest in the ring
        qk, sk, qv, sv = QK[s, h], SK[s, h], QV[s, h], SV[s, h]
        rk, rv = RK[s, h], RV[s, h]
        pt = p[:T]
        for g in range(g0, g1):
            qh = q[r, h * G + g]
            for j in range(cut):  # int8 rows as they are: the dot, then the row's scale
                pt[j] = dot(qh, qk[j]) * (sk[j] * scale)
            for j in range(cut, T):
                pt[j] = dot(qh, rk[j % Rr]) * scale
            softmax(pt)
            o = out[r, h * G + g]
            o[:] = 0.0
            for j in range(cut):
                axpy(o, pt[j] * sv[j], qv[j])
            for j in range(cut, T):
                axpy(o, pt[j], rv[j % Rr])
        pt[:] = 0.0

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def attend_q8_nb(q, QK, SK, QV, SV, RK, RV, row_slot, row_pos, row_end, scale, out):  # pragma: no cover
        R, H = q.shape[0], q.shape[1]
        KVH = QK.shape[1]
        G = H // KVH
        for task in prange(R * KVH):
            r = task // KVH
            h = task - r * KVH
            p = np.zeros(row_pos[r] + 1, np.float32)
            attend_q8_task(q, QK, SK, QV, SV, RK, RV, row_slot, row_pos, row_end, scale, out, r, h, 0, G, p)

    return {"rows_matmul": rows_matmul_nb, "attend": attend_nb, "attend_q8": attend_q8_nb}


def available() -> bool:
    """Whether the Numba kernels run (else the NumPy references do)."""
    return _kernels() is not None


# -- entry points ----------------------------------------------------------------------------------
def rows_matmul(x: np.ndarray, w: np.ndarray, backend: str | None = None) -> np.ndarray:
    """x [M, K] fp32 @ w [N, K].T -> [M, N] fp32 (w C-contiguous)."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    dispatch(_kernels, "rows_matmul", rows_matmul_reference, backend, np.ascontiguousarray(x, dtype=np.float32), w,
             out)
    return out


def attend(q: np.ndarray, K: np.ndarray, V: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray, scale: float,
           backend: str | None = None) -> np.ndarray:
    """Attention of each row over keys 0..row_pos[r] of its slot. q [R, H, hd]; K, V [slots, KVH, L, hd]
    (C-contiguous, the K/V of the rows already written) -> [R, H, hd] fp32."""
    out = np.empty(q.shape, np.float32)
    dispatch(_kernels, "attend", attend_reference, backend, np.ascontiguousarray(q, dtype=np.float32), K, V,
             np.asarray(row_slot, dtype=np.int64), np.asarray(row_pos, dtype=np.int64), np.float32(scale), out)
    return out


def attend_q8(q: np.ndarray, QK: np.ndarray, SK: np.ndarray, QV: np.ndarray, SV: np.ndarray, RK: np.ndarray,
              RV: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray, row_end: np.ndarray, scale: float,
              backend: str | None = None) -> np.ndarray:
    """`attend` over `Int8Cache`'s layout (one layer): QK, QV [slots, KVH, L, hd] int8, SK, SV [slots, KVH, L]
    fp32, RK, RV [slots, KVH, R, hd] fp32 rings (all C-contiguous, the rows' K/V already written); row_end [R]:
    each row's slot length after this step -> [R, H, hd] fp32."""
    out = np.empty(q.shape, np.float32)
    dispatch(_kernels, "attend_q8", attend_q8_reference, backend, np.ascontiguousarray(q, dtype=np.float32),
             QK, SK, QV, SV, RK, RV, np.asarray(row_slot, dtype=np.int64), np.asarray(row_pos, dtype=np.int64),
             np.asarray(row_end, dtype=np.int64), np.float32(scale), out)
    return out
