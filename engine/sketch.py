"""Exact top-k by filter and refine on the CPU: over an int8 sketch of a row-normalised fp32 matrix, and
over fp16 rows.

    sk = Int8Sketch(dim=384, block_rows=8192)
    sk.sync(matrix, n)                       # matrix: [capacity, dim] float32 NumPy, rows 0..n used
    approx, bound = sk.scores(b, q, q_norm, query_step(q))   # q: [B, dim] -> [B, c] and [c] for block b
    # for every row r of block b and query i:  |q_i . matrix[r] - approx[i, r]| <= bound[r]
    vals, rows = exact_topk(sk, matrix, q, masks, k)           # what the catalogue calls (fp32)
    vals, rows = half_exact_topk(mat16, q, masks, k)           # fp16 rows (see its docstring)

Both hand approximate scores and their bound to `Survivors` (the filter, a
Numba kernel in `atelier_kernels.cpu_topk`) and rescore the survivors exactly.

What it knows: each row v is stored as s * v8 with v8 in [-63, 63] (int8,
one scale per row), packed per block of rows for fbgemm's dynamic quantised
linear (`torch.ops.quantized.linear_dynamic`), which quantises the queries to
uint8 (per tensor, 256 levels) and multiplies in integers. It does not know
catalogues, masks or ids: the catalogue uses the bound to keep every row that
could be in the exact top-k, then rescores those few rows exactly (float64 sums
of the fp32 rows).

The bound (rigorous, per row, for a batch of queries q with norm <= qn):
  |q.v - q~.v~| <= |q.(v - v~)| + |(q - q~).v~| <= qn * ||v - v~||_2 + sq * ||v~||_1
where v~ = s v8 (||v - v~|| measured in float64 when the block is packed), and
sq bounds the per-element error of fbgemm's query quantisation: with the range
[min(q, 0), max(q, 0)] cut into 255 steps, round-to-nearest plus a clamp at
either end is off by at most one step, taken here with a 1 % margin. Integer
accumulation is exact (|v8| <= 63 keeps vpmaddubsw's int16 pair sums below
2**15 with uint8 queries: 2 * 255 * 63 = 32130), and `EPS` covers the float32
rounding of the result. Reading 1 byte per element instead of 4 is the point:
the scan is memory-bound.

`invalidate` marks the blocks of changed rows and `sync` repacks only those
(the catalogue syncs right after each update), so an upsert costs one block,
not the whole matrix.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np
import torch

from atelier_kernels import cpu_topk

LEVELS = 63  # |v8| <= LEVELS (see the module docstring: no int16 saturation with uint8 queries)
Q_STEPS = 255  # fbgemm's uint8 query quantisation with reduce_range=False
EPS = 1e-5  # float32 rounding of the dequantised product (|score| <= ~1) and of the bound itself

_support: bool | None = None
_support_lock = threading.Lock()


def pack_rows(rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """rows: [c, dim] float32 -> (fbgemm packed int8 weights, err [c] >= ||v - v~||_2, l1 [c] >= ||v~||_1),
    both float32. Computed in float32; the relative margin covers float32 rounding (< 1e-6 relative
    for dim <= 65536) and the float64 scale the kernel uses."""
    w = np.ascontiguousarray(rows, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(LEVELS), np.float32(1.0)).astype(np.float32)
    v8 = np.clip(np.rint(w / scale[:, None]), -LEVELS, LEVELS)
    deq = v8 * scale[:, None]
    diff = w - deq
    err = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    l1 = np.abs(v8).sum(axis=1) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantised tensors are marked "deprecated" (present in torch 2.13)
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(v8.astype(np.int8)),
                                                      torch.from_numpy(scale.astype(np.float64)),
                                                      torch.zeros(len(scale), dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    up = np.float32(1.0 + 1e-4)
    tiny = np.float32(1e-7)
    return packed, (err * up + tiny).astype(np.float32), (l1 * up + tiny).astype(np.float32)


def product(q: np.ndarray, packed: Any) -> np.ndarray:
    """q: [B, dim] float32 -> approximate q @ v~.T: [B, c] float32 (fbgemm, uint8 queries, int8 rows)."""
    return torch.ops.quantized.linear_dynamic(torch.from_numpy(q), packed, False).numpy()


def query_step(q: np.ndarray) -> float:
    """An upper bound of fbgemm's per-element query quantisation error for the batch q [B, dim]."""
    lo, hi = min(float(q.min()), 0.0), max(float(q.max()), 0.0)
    return (hi - lo) / Q_STEPS * 1.01


def supported() -> bool:
    """Whether fbgemm's dynamic int8 linear works here and honours the bound (checked once on random rows)."""
    global _support
    with _support_lock:
        if _support is None:
            try:
                rng = np.random.default_rng(0)
                rows = rng.standard_normal((67, 48)).astype(np.float32)
                rows /= np.linalg.norm(rows, axis=1, keepdims=True)
                q = rng.standard_normal((3, 48)).astype(np.float32)
                q /= np.linalg.norm(q, axis=1, keepdims=True)
                packed, err, l1 = pack_rows(rows)
                got = product(q, packed)
                exact = q.astype(np.float64) @ rows.astype(np.float64).T
                bound = err + query_step(q) * l1 + EPS
                _support = bool(got.shape == exact.shape and np.all(np.abs(got - exact) <= bound))
            except Exception:  # no quantized engine in this build (or it misbehaves): the fp32 scan is used
                _support = False
        return _support


class Int8Sketch:
    """Per-block packed int8 rows plus their error terms (see the module docstring)."""

    def __init__(self, dim: int, block_rows: int) -> None:
        self.dim = int(dim)
        self.block_rows = max(1, int(block_rows))
        self._packed: list[Any] = []
        self._count: list[int] = []  # rows packed in each block
        self._err = np.zeros(0, np.float32)
        self._l1 = np.zeros(0, np.float32)
        self._dirty: set[int] = set()
        self._n = 0

    @property
    def nbytes(self) -> int:
        """Bytes held: int8 rows (packed) plus two float32 terms per row."""
        return self._n * (self.dim + 8)

    def invalidate(self, lo: int, hi: int | None = None) -> None:
        """Rows lo..hi (hi = lo + 1 when None) changed: their blocks are repacked at the next sync."""
        hi = lo + 1 if hi is None else hi
        if hi > lo:
            self._dirty.update(range(lo // self.block_rows, (hi - 1) // self.block_rows + 1))

    def invalidate_all(self) -> None:
        self._dirty.update(range(len(self._packed)))

    def sync(self, matrix: np.ndarray, n: int) -> None:
        """Make the blocks reflect matrix[:n] (matrix: [capacity, dim] float32); repacks changed blocks."""
        br = self.block_rows
        nb = -(-n // br)
        if len(self._err) < n:
            grow = max(n, 2 * len(self._err))
            self._err = np.concatenate([self._err, np.zeros(grow - len(self._err), np.float32)])
            self._l1 = np.concatenate([self._l1, np.zeros(grow - len(self._l1), np.float32)])
        del self._packed[nb:], self._count[nb:]
        while len(self._packed) < nb:
            self._packed.append(None)
            self._count.append(-1)
        for b in range(nb):
            lo, hi = b * br, min(n, (b + 1) * br)
            if b in self._dirty or self._count[b] != hi - lo:
                self._packed[b], self._err[lo:hi], self._l1[lo:hi] = pack_rows(matrix[lo:hi])
                self._count[b] = hi - lo
        self._dirty.clear()
        self._n = n

    def blocks(self) -> int:
        return len(self._packed)

    def scores(self, block: int, q: np.ndarray, q_norm: float, q_step: float) -> tuple[np.ndarray, np.ndarray]:
        """(approx [B, c] float32, bound [c] float32) for rows of `block`; q: [B, dim] float32 with every
        row's norm <= q_norm and `q_step` = query_step(q) of the whole batch."""
        lo = block * self.block_rows
        hi = min(self._n, lo + self.block_rows)
        return product(q, self._packed[block]), self.bound(lo, hi, q_norm, q_step)

    def bound(self, lo: int, hi: int, q_norm: float, q_step: float) -> np.ndarray:
        """The per-row error bound [hi - lo] float32 for queries of norm <= q_norm quantised with q_step."""
        return self._err[lo:hi] * np.float32(q_norm) + self._l1[lo:hi] * np.float32(q_step) + np.float32(EPS)


class Survivors:
    """The filter half of exact top-k by filter and refine, shared by the int8 sketch scan (`exact_topk`) and
    the fp16 scan (`half_exact_topk`). Per query: the kmax largest lower bounds seen so far (a heap; its
    root is the threshold) and the rows whose upper bound reached the threshold when their block was
    filtered (`atelier_kernels.cpu_topk.filter_rows`)."""

    def __init__(self, B: int, kmax: int, width: int) -> None:
        self.kmax = kmax
        self.heap = np.empty((B, kmax), np.float32)
        self.count = np.zeros(B, np.int64)
        self._up = np.empty((B, width), np.float32)
        self._rows = np.empty((B, width), np.int64)
        self._n = np.empty(B, np.int64)
        self._kept: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(B)]

    def add(self, approx: np.ndarray, bound: np.ndarray, lo: int) -> None:
        """approx [B, c] float32 (C-contiguous; -inf = never return) for rows lo..lo + c, bound [c]."""
        cpu_topk.filter_rows(approx, bound, self.heap, self.count, self._up, self._rows, self._n)
        for b in np.flatnonzero(self._n):
            k = self._n[b]
            self._kept[b].append((self._rows[b, :k] + lo, self._up[b, :k].copy()))

    def refine(self, matrix: np.ndarray, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-kk of the survivors still above their query's final threshold, rescored in float64
        against matrix (float32 rows, or for other storage a callable rows -> (float32 sub-matrix, local rows
        in it, the map from local back to global rows))
        -> (values float32, rows int64) [B, kk], missing places -inf / 0."""
        B = len(self._kept)
        T = np.where(self.count == self.kmax, self.heap[:, 0], -np.inf)
        rows_l, ups_l, offsets = [], [], [0]
        for b in range(B):
            if self._kept[b]:
                r = np.concatenate([k[0] for k in self._kept[b]])
                u = np.concatenate([k[1] for k in self._kept[b]])
                live = u >= T[b]  # the threshold rose after earlier blocks were filtered
                rows_l.append(r[live])
                ups_l.append(u[live])
                offsets.append(offsets[-1] + int(live.sum()))
            else:
                offsets.append(offsets[-1])
        vals = np.full((B, kk), -np.inf)
        rows = np.zeros((B, kk), np.int64)
        if offsets[-1]:
            cand = np.concatenate(rows_l)
            if callable(matrix):
                matrix, cand, back = matrix(cand)
            else:
                back = None
            cpu_topk.refine(matrix, q.astype(np.float64), cand, np.concatenate(ups_l),
                            np.asarray(offsets, np.int64), vals, rows)
            if back is not None:
                rows = back[rows]
                rows[np.isneginf(vals)] = 0
        return vals.astype(np.float32), rows


GROUP_ROWS = 1 << 16  # rows per filter call


def exact_topk(sk: Int8Sketch, matrix: np.ndarray, q: np.ndarray, masks: list[np.ndarray | None], kmax: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`kmax` of q @ matrix[:n].T per query by filter and refine over a synced sketch.

    q: [B, dim] float32; masks[i]: bool [n] (True = the row may be returned) or None; matrix: the fp32
    rows the sketch was synced from. Returns (values [B, kk] float32, rows [B, kk] int64), kk = min(kmax, n),
    sorted by (score desc, row asc); missing places (fewer valid rows) are -inf with row 0.

    Filter: per query, T = the kmax-th largest lower bound (approx - bound) over valid rows, raised block
    by block (`atelier_kernels.cpu_topk.filter_rows`); a row whose upper bound (approx + bound) is below T scores
    below kmax other rows. Refine (`atelier_kernels.cpu_topk.refine`): the survivors in order of upper bound,
    rescored exactly in float64 until the next upper bound is below the kk-th exact score.
    """
    n, B, br = sk._n, q.shape[0], sk.block_rows
    kk = min(kmax, n)
    q_norm = float(np.sqrt((q.astype(np.float64) ** 2).sum(axis=1)).max()) * (1 + 1e-6)
    step = query_step(q)
    per = max(1, GROUP_ROWS // br)  # blocks per filter call: fewer calls, scores [B, per * br] stay small
    width = min(n, per * br)
    keep = Survivors(B, kmax, width)
    approx_buf = np.empty((B, width), np.float32)
    for g in range(0, sk.blocks(), per):
        lo, hi = g * br, min(n, (g + per) * br)
        approx = approx_buf.reshape(-1)[:B * (hi - lo)].reshape(B, hi - lo)  # contiguous
        for blk in range(g, min(g + per, sk.blocks())):
            a = blk * br - lo
            approx[:, a:a + min(br, n - blk * br)] = product(q, sk._packed[blk])
        for b in range(B):
            if masks[b] is not None:
                approx[b, ~masks[b][lo:hi]] = -np.inf  # low and up become -inf: never kept
        keep.add(approx, sk.bound(lo, hi, q_norm, step), lo)
    return keep.refine(matrix, q, kk)


_F32_U = 2.0 ** -24  # fp32 unit roundoff
_HALF_ROWS = 8192  # fp16 rows scored per filter call


def half_exact_topk(mat16: np.ndarray, q: np.ndarray, masks: list[np.ndarray | None], kmax: int,
                    chunk_rows: int = _HALF_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`kmax` over fp16 rows on the CPU by filter and refine: mat16 [n, d] float16 (rows of norm
    <= 1.001: normalised in fp32, then rounded), q [B, d] float32 -> (values float32, rows int64) [B, kk],
    sorted by (score desc, row asc), missing places -inf / 0; scores are float64 sums over the stored rows.

    Filter: `atelier_kernels.cpu_topk.half_scores` widens each fp16 row exactly in cache and multiplies it with
    every query in fp32 (the fp16 bytes read once, no fp32 copy of the matrix). Its error has a rigorous
    bound, so `Survivors` keeps every row that can reach the top k, and the refine rescores those exactly
    in float64. With qn >= |q|_2, vn = 1.001 >= |v|_2:
      |q.v - s| <= d u qn vn / (1 - d u)     fp32 sums in any order, u = 2**-24, d dims
                 + 1e-6                      rounding of the bound itself"""
    n, d = mat16.shape
    B = q.shape[0]
    qn = float(np.sqrt((q.astype(np.float64) ** 2).sum(axis=1)).max()) * (1 + 1e-6)
    bound = d * _F32_U / (1 - d * _F32_U) * qn * 1.001 + 1e-6
    rows16 = max(1, min(chunk_rows, _HALF_ROWS))
    width = min(n, rows16)
    keep = Survivors(B, kmax, width)
    bounds = np.full(width, bound, np.float32)
    for lo in range(0, n, rows16):
        hi = min(n, lo + rows16)
        s = cpu_topk.half_scores(q, mat16[lo:hi])  # [B, c] float32
        for b in range(B):
            if masks[b] is not None:
                s[b, ~masks[b][lo:hi]] = -np.inf
        keep.add(s, bounds[:hi - lo], lo)

    def widen(cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        uniq, local = np.unique(cand, return_inverse=True)  # ascending: local order keeps the row order (ties)
        return mat16[uniq].astype(np.float32), local.astype(np.int64), uniq

    return keep.refine(widen, q, min(kmax, n))


def gathered_topk(matrix: np.ndarray, rows: np.ndarray, q: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`kmax` of one query over the selected rows only (a selective filter's rows), by filter
    and refine like `exact_topk`: matrix [n, d] float32 (the catalogue's rows) or float16, rows int64
    ascending (the rows a filter kept), q [d] float32 -> (values float32, rows int64) [kk], kk = min(kmax,
    len(rows)), sorted by (score desc, row asc); the scores are the same float64 sums as `exact_topk`'s and
    `half_exact_topk`'s, so the answer is the one the masked scan of every row gives.

    Filter: `atelier_kernels.cpu_topk.gather_scores` scores each selected row in fp32 where it lies, with the sum
    a = sum |x_j q_j| that bounds its rounding error in any summation order: |x.q - s| <= gamma_d a,
    gamma_d = d u / (1 - d u); the computed a is itself within gamma_d of the true one, hence the bound
    gamma_d / (1 - gamma_d) a (x 1.001), + 1e-6 for the fp32 rounding of s +- bound in the filter."""
    n, d = rows.shape[0], q.shape[0]
    kk = min(kmax, n)
    if kk == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    g = d * _F32_U / (1 - d * _F32_U)
    scale = np.float32(g / (1 - g) * 1.001)
    width = min(n, GROUP_ROWS)
    keep = Survivors(1, kmax, width)
    for lo in range(0, n, GROUP_ROWS):
        s, a = cpu_topk.gather_scores(matrix, rows[lo:lo + GROUP_ROWS], q)
        keep.add(s[None], a * scale + np.float32(1e-6), lo)

    def widen(cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        uniq, local = np.unique(cand, return_inverse=True)  # ascending, like the rows: ties keep the row order
        return matrix[rows[uniq]].astype(np.float32), local.astype(np.int64), rows[uniq]

    vals, got = keep.refine(widen, q[None], kk)
    return vals[0], got[0]
