"""CPU kernels for the catalogue's exact top-k (`engine.sketch`): Numba kernels and their NumPy twins.
Five entry points, each registered by name beside its twin in `atelier_kernels.registry`:

    filter_rows(approx, bound, heap, count, up_out, rows_out, n_out)   # one block of rows, B queries
    refine(matrix, q, cand_rows, cand_up, offsets, vals_out, rows_out) # exact top-k from the survivors
    dots64(matrix, rows, q)                                            # exact float64 scores
    half_scores(x, w16)                                                # fp32 queries @ fp16 rows (fp16 scan)
    gather_scores(matrix, rows, q)                                     # one query @ selected rows (filters)

`filter_rows` is the filter pass over approximate scores approx [B, c] with a
per-row error bound [c] (rows a query must not return are -inf in approx). For
each query b it keeps, in `heap[b]` (a binary min-heap of `count[b]` entries,
at most K = heap.shape[1]), the K largest lower bounds approx - bound seen so
far over all blocks; its root is the threshold T (-inf until K are seen). A
row whose upper bound approx + bound is below T scores below K other rows, so
it cannot be in the top K. The block's survivors, its rows whose upper bound
is >= the threshold after the block, go to rows_out[b, :n_out[b]] with their
upper bounds in up_out: one pass for the heap, one for the survivors, per
query (the NumPy twin needs about ten array passes and a partition). The
threshold keeps rising over later blocks, so callers drop earlier survivors
below the final threshold before refining.

`refine` rescoring takes each query's survivors in order of upper bound and
scores them exactly (`dots64`) until the next upper bound is below the K-th
exact score: nothing after it can enter. Ties: higher score first, then the
lower row. The NumPy twin rescores the first 64 by upper bound, then every
remaining one whose bound reaches their K-th score: the same answer.

`dots64` scores matrix[rows] against q in float64, summing each row in the
same fixed order (four interleaved chains in the kernel, NumPy's pairwise sum
in the twin), so a row's score does not depend on where it sits in `rows`:
equal rows tie exactly, and float32 products are exact in float64. The two
backends agree to float64 rounding.

`half_scores` is the fp16 catalogue's filter product: each fp16 row is widened
to fp32 once, in L1, and multiplied with four query rows at a time (see the
note at `half_scores_nb` on why that loop is not shared with
`cpu_decode.rows_matmul`).

`gather_scores` is the filter product of a selective filter's exact scan: one
query against the rows a filter kept (fp32 rows, or fp16 rows as their uint16
bits), reading each selected row once where it lies (no gathered copy), in
parallel. It also returns each row's sum of |x_i q_i|, which bounds the fp32
sum's rounding error in any order (|s - x.q| <= gamma_d sum |x_i q_i|), so the
caller can filter and refine exactly. Numba is optional (`atelier_kernels._numba`); `backend=`
("numba" | "numpy") on each entry point picks one side for tests.
"""

from __future__ import annotations

import functools

import numpy as np

from ._numba import dispatch, half_to_float_intrinsic, jit


# -- references (NumPy) ---------------------------------------------------------------------------
def filter_rows_reference(approx: np.ndarray, bound: np.ndarray, heap: np.ndarray, count: np.ndarray,
                          up_out: np.ndarray, rows_out: np.ndarray, n_out: np.ndarray) -> None:
    B, c = approx.shape
    K = heap.shape[1]
    low = approx - bound
    up = approx + bound
    for b in range(B):
        have = heap[b, :count[b]]
        new = low[b][low[b] > (have.min() if count[b] == K else -np.inf)]
        allv = np.concatenate([have, new])
        if allv.size > K:
            allv = np.partition(allv, allv.size - K)[allv.size - K:]
        count[b] = allv.size
        heap[b, :allv.size] = np.sort(allv)  # a sorted array is a valid min-heap
        T = heap[b, 0] if count[b] == K else -np.inf  # the threshold after this block
        keep = np.flatnonzero((up[b] >= T) & (up[b] > -np.inf))
        n_out[b] = keep.size
        rows_out[b, :keep.size] = keep
        up_out[b, :keep.size] = up[b, keep]


def half_scores_reference(x: np.ndarray, w16: np.ndarray, out: np.ndarray) -> None:
    """out[M, N] = x[M, K] (float32) @ w[N, K].T, w the fp16 values whose bits w16 (uint16) holds."""
    np.matmul(x, w16.view(np.float16).astype(np.float32).T, out=out)


def dots64_reference(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """out[i] = matrix[rows[i]] . q in float64 (q float64)."""
    out[:] = (matrix[rows].astype(np.float64) * q).sum(axis=1)


def refine_reference(matrix: np.ndarray, q: np.ndarray, cand_rows: np.ndarray, cand_up: np.ndarray,
                     offsets: np.ndarray, vals_out: np.ndarray, rows_out: np.ndarray) -> None:
    """Exact top-kk per query b from its candidates cand_rows[offsets[b]:offsets[b + 1]] (upper bounds in
    cand_up): rescored in float64 in order of upper bound until the next bound is below the kk-th exact
    score. vals_out, rows_out [B, kk]: (score desc, row asc); places without a candidate keep their values."""
    B, kk = vals_out.shape
    for b in range(B):
        r = cand_rows[offsets[b]:offsets[b + 1]]
        u = cand_up[offsets[b]:offsets[b + 1]]
        if r.size == 0:
            continue
        by_up = np.argsort(-u, kind="stable")
        first = by_up[:max(4 * kk, 64)]
        head = r[first]
        sc = np.empty(head.size, np.float64)
        dots64_reference(matrix, head, q[b], sc)
        if by_up.size > first.size:
            S = np.partition(sc, sc.size - kk)[sc.size - kk] if sc.size >= kk else -np.inf
            tail = by_up[first.size:]
            tail = r[tail[u[tail] >= S]]
            if tail.size:
                more = np.empty(tail.size, np.float64)
                dots64_reference(matrix, tail, q[b], more)
                head, sc = np.concatenate([head, tail]), np.concatenate([sc, more])
        order = np.lexsort((head, -sc))[:kk]
        vals_out[b, :order.size] = sc[order]
        rows_out[b, :order.size] = head[order]


def gather_scores_reference(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray, out: np.ndarray,
                            abs_out: np.ndarray) -> None:
    """out[i] = matrix[rows[i]] . q and abs_out[i] = sum_j |matrix[rows[i], j] q[j]| in float32; matrix
    float32, or uint16 holding fp16 bits; q float32."""
    x = matrix[rows]
    x = x.view(np.float16).astype(np.float32) if x.dtype == np.uint16 else x
    out[:] = x @ q
    abs_out[:] = np.abs(x) @ np.abs(q)


# -- Numba kernels -------------------------------------------------------------------------------
_h2f = None  # set by _kernels()


@functools.cache
def _kernels() -> dict | None:
    if jit() is None:
        return None
    njit, prange = jit()  # type: ignore[misc]

    # serial: it runs right after fbgemm's product, whose torch threads still spin on the other core
    @njit(cache=True, nogil=True)
    def filter_nb(approx, bound, heap, count, up_out, rows_out, n_out):  # pragma: no cover - compiled
        B, c = approx.shape
        K = heap.shape[1]
        for b in range(B):
            h = heap[b]
            cnt = count[b]
            T = h[0] if cnt == K else -np.inf
            for r in range(c):
                low = approx[b, r] - bound[r]
                if low > T:
                    if cnt < K:  # append and sift up
                        i = cnt
                        h[i] = low
                        cnt += 1
                        while i > 0:
                            p = (i - 1) // 2
                            if h[p] <= h[i]:
                                break
                            h[p], h[i] = h[i], h[p]
                            i = p
                        if cnt == K:
                            T = h[0]
                    else:  # replace the root and sift down
                        h[0] = low
                        i = 0
                        while True:
                            j = 2 * i + 1
                            if j >= K:
                                break
                            if j + 1 < K and h[j + 1] < h[j]:
                                j += 1
                            if h[i] <= h[j]:
                                break
                            h[i], h[j] = h[j], h[i]
                            i = j
                        T = h[0]
            count[b] = cnt
            m = 0
            for r in range(c):  # survivors against the threshold after this block
                u = approx[b, r] + bound[r]
                if u >= T and u > -np.inf:
                    rows_out[b, m] = r
                    up_out[b, m] = u
                    m += 1
            n_out[b] = m

    @njit(cache=True, nogil=True)
    def dots64_nb(matrix, rows, q, out):  # pragma: no cover - compiled
        d = q.shape[0]
        d4 = d - d % 4
        for i in range(rows.shape[0]):
            row = matrix[rows[i]]
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            for j in range(0, d4, 4):  # four chains in a fixed order: fast, and the same for every row
                a0 += np.float64(row[j]) * q[j]
                a1 += np.float64(row[j + 1]) * q[j + 1]
                a2 += np.float64(row[j + 2]) * q[j + 2]
                a3 += np.float64(row[j + 3]) * q[j + 3]
            for j in range(d4, d):
                a0 += np.float64(row[j]) * q[j]
            out[i] = (a0 + a1) + (a2 + a3)

    @njit(cache=True, nogil=True)
    def refine_nb(matrix, q, cand_rows, cand_up, offsets, vals_out, rows_out):  # pragma: no cover - compiled
        B, kk = vals_out.shape
        d = q.shape[1]
        d4 = d - d % 4
        for b in range(B):
            lo, hi = offsets[b], offsets[b + 1]
            if hi == lo:
                continue
            order = np.argsort(-cand_up[lo:hi]) + lo
            bv = np.full(kk, -np.inf)  # the best kk so far, unsorted; worst found by a scan (kk is small)
            br = np.full(kk, -1, np.int64)
            have = 0
            worst = 0
            touch = 0.0
            for t in range(order.shape[0]):
                i = order[t]
                if have == kk and cand_up[i] < bv[worst]:
                    break  # every later bound is lower still: none of them can enter
                if t + 1 < order.shape[0]:  # start loading the next row now: the rows are far apart in memory
                    nxt = matrix[cand_rows[order[t + 1]]]
                    for j in range(0, d, 16):
                        touch += nxt[j]
                r = cand_rows[i]
                row = matrix[r]
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                a3 = 0.0
                for j in range(0, d4, 4):  # the same fixed order as dots64_nb
                    a0 += np.float64(row[j]) * q[b, j]
                    a1 += np.float64(row[j + 1]) * q[b, j + 1]
                    a2 += np.float64(row[j + 2]) * q[b, j + 2]
                    a3 += np.float64(row[j + 3]) * q[b, j + 3]
                for j in range(d4, d):
                    a0 += np.float64(row[j]) * q[b, j]
                s = (a0 + a1) + (a2 + a3)
                if have < kk:
                    bv[have] = s
                    br[have] = r
                    have += 1
                elif s > bv[worst] or (s == bv[worst] and r < br[worst]):
                    bv[worst] = s
                    br[worst] = r
                else:
                    continue
                if have == kk:  # the new worst: lowest score, then highest row
                    worst = 0
                    for j in range(1, kk):
                        if bv[j] < bv[worst] or (bv[j] == bv[worst] and br[j] > br[worst]):
                            worst = j
            # sort the kept ones by (score desc, row asc)
            for x in range(have):
                for y in range(x + 1, have):
                    if bv[y] > bv[x] or (bv[y] == bv[x] and br[y] < br[x]):
                        bv[x], bv[y] = bv[y], bv[x]
                        br[x], br[y] = br[y], br[x]
            for x in range(have):
                vals_out[b, x] = bv[x]
                rows_out[b, x] = br[x]
            if touch == 1.2345e300:  # keeps the prefetching loads alive; never true
                vals_out[b, 0] = touch

    global _h2f
    _h2f = half_to_float_intrinsic()  # a module global: a closure variable would keep Numba from caching

    # The four-rows loop below is also in cpu_decode.rows_matmul_nb, written out in both on purpose (issue 16
    # measured sharing it as one njit helper, inline="always": benchmarks/four_rows_timing.py, 1 Numba thread,
    # 2-core EPYC under load, best of 3 medians): rows_matmul 1 row 0.18-0.23 ms written out vs 0.21-0.30 ms
    # shared (20-25 % slower in the decode step's commonest case), 4 and 8 rows within noise; half_scores with
    # 1 row must keep its own branch (widening inside the dot product: 12-16 ms vs 20-22 ms widening first).
    # And Numba's on-disk cache (cache=True) is keyed on the caller's own file only: a helper in another module
    # could change without the cached kernels that inline it being recompiled.
    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def half_scores_nb(x, w16, out):  # pragma: no cover - compiled
        M, Kd = x.shape
        N = w16.shape[0]
        for blk in prange((N + 255) // 256):
            f = np.empty(Kd, np.float32)
            for n in range(blk * 256, min(N, blk * 256 + 256)):
                row = w16[n]
                if M < 4:  # widen inside the dot product
                    for m in range(M):
                        acc = np.float32(0.0)
                        xm = x[m]
                        for k in range(Kd):
                            acc += xm[k] * _h2f(row[k])
                        out[m, n] = acc
                    continue
                for k in range(Kd):  # widen once, use for every row of x
                    f[k] = _h2f(row[k])
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
                        r = f[k]
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
                        acc += xm[k] * f[k]
                    out[m, n] = acc
                    m += 1

    # Rows of a selective filter lie scattered over the catalogue: each is read once, where it lies (a
    # gathered copy first costs twice the memory traffic: 88 ms against 36 ms for 100 000 of 1M x 384 rows).
    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def gather_nb(matrix, rows, q, out, abs_out):  # pragma: no cover - compiled
        d = q.shape[0]
        qa = np.abs(q)
        for i in prange(rows.shape[0]):
            row = matrix[rows[i]]
            acc = np.float32(0.0)
            mag = np.float32(0.0)
            for j in range(d):
                acc += row[j] * q[j]
                mag += abs(row[j]) * qa[j]
            out[i] = acc
            abs_out[i] = mag

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def gather_half_nb(bits, rows, q, out, abs_out):  # pragma: no cover - compiled
        d = q.shape[0]
        qa = np.abs(q)
        for i in prange(rows.shape[0]):
            row = bits[rows[i]]
            acc = np.float32(0.0)
            mag = np.float32(0.0)
            for j in range(d):
                x = _h2f(row[j])
                acc += x * q[j]
                mag += abs(x) * qa[j]
            out[i] = acc
            abs_out[i] = mag

    return {"filter_rows": filter_nb, "dots64": dots64_nb, "refine": refine_nb, "half_scores": half_scores_nb,
            "gather_scores": gather_nb, "gather_half": gather_half_nb}


def available() -> bool:
    return _kernels() is not None


# -- entry points ----------------------------------------------------------------------------------
def filter_rows(approx: np.ndarray, bound: np.ndarray, heap: np.ndarray, count: np.ndarray, up_out: np.ndarray,
                rows_out: np.ndarray, n_out: np.ndarray, backend: str | None = None) -> None:
    """See the module docstring. approx [B, c] float32 (C-contiguous), bound [c] float32, heap [B, K] float32
    and count [B] int64 (state carried across blocks), up_out [B, >= c] float32, rows_out [B, >= c] int64,
    n_out [B] int64 (written)."""
    dispatch(_kernels, "filter_rows", filter_rows_reference, backend, approx, bound, heap, count, up_out, rows_out,
             n_out)


def refine(matrix: np.ndarray, q: np.ndarray, cand_rows: np.ndarray, cand_up: np.ndarray, offsets: np.ndarray,
           vals_out: np.ndarray, rows_out: np.ndarray, backend: str | None = None) -> None:
    """Exact top-kk per query from its candidates (see `refine_reference`). matrix float32 [n, d]; q float64
    [B, d]; cand_rows int64, cand_up float32, offsets int64 [B + 1]; vals_out float64 [B, kk] (-inf) and
    rows_out int64 [B, kk] (0) written where a query has candidates."""
    dispatch(_kernels, "refine", refine_reference, backend, matrix, q, cand_rows, cand_up, offsets, vals_out, rows_out)


def half_scores(x: np.ndarray, w16: np.ndarray, backend: str | None = None) -> np.ndarray:
    """x [M, K] float32 @ w16 [N, K].T -> [M, N] float32, where w16 holds fp16 values (float16 or their uint16
    bits, C-contiguous). The kernel widens each row to fp32 (exactly, with F16C where the CPU has it) once,
    in L1, for all M rows of x: the fp16 bytes are read once and no fp32 copy of the matrix is made. Sums
    in fp32, in any order."""
    bits = w16.view(np.uint16)
    out = np.empty((x.shape[0], bits.shape[0]), np.float32)
    dispatch(_kernels, "half_scores", half_scores_reference, backend, np.ascontiguousarray(x, dtype=np.float32),
             bits, out)
    return out


def dots64(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray, backend: str | None = None) -> np.ndarray:
    """Scores of matrix[rows] (float32 [n, d]) against q (float64 [d]), each row summed in float64."""
    out = np.empty(rows.shape[0], np.float64)
    dispatch(_kernels, "dots64", dots64_reference, backend, matrix, np.asarray(rows, dtype=np.int64),
             np.ascontiguousarray(q, dtype=np.float64), out)
    return out


def gather_scores(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray, backend: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the selected rows matrix[rows] (float32 or float16 [n, d], C-contiguous rows) against q
    (float32 [d]) -> (scores, sums of |x_j q_j|), both float32 [len(rows)], summed in fp32 in any order."""
    rows = np.asarray(rows, dtype=np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty(rows.shape[0], np.float32)
    mag = np.empty(rows.shape[0], np.float32)
    if matrix.dtype == np.float16:
        dispatch(_kernels, "gather_half", gather_scores_reference, backend, matrix.view(np.uint16), rows, q, out,
                 mag)
    else:
        dispatch(_kernels, "gather_scores", gather_scores_reference, backend, matrix, rows, q, out, mag)
    return out, mag
