"""An int8 sketch of a row-normalised fp32 matrix, for exact top-k by filter and refine.

    sk = Int8Sketch(dim=384, block_rows=8192)
    sk.sync(matrix, n)                       # matrix: [capacity, dim] float32 NumPy, rows 0..n used
    approx, bound = sk.scores(b, q, q_norm, query_step(q))   # q: [B, dim] -> [B, c] and [c] for block b
    # for every row r of block b and query i:  |q_i . matrix[r] - approx[i, r]| <= bound[r]
    vals, rows = exact_topk(sk, matrix, q, masks, k)           # what the catalogue calls

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

from kernels import cpu_topk

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


GROUP_ROWS = 1 << 16  # rows per filter call


def exact_topk(sk: Int8Sketch, matrix: np.ndarray, q: np.ndarray, masks: list[np.ndarray | None], kmax: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`kmax` of q @ matrix[:n].T per query by filter and refine over a synced sketch.

    q: [B, dim] float32; masks[i]: bool [n] (True = the row may be returned) or None; matrix: the fp32
    rows the sketch was synced from. Returns (values [B, kk] float32, rows [B, kk] int64), kk = min(kmax, n),
    sorted by (score desc, row asc); missing places (fewer valid rows) are -inf with row 0.

    Filter: per query, T = the kmax-th largest lower bound (approx - bound) over valid rows, raised block
    by block (`kernels.cpu_topk.filter_rows`); a row whose upper bound (approx + bound) is below T scores
    below kmax other rows. Refine (`kernels.cpu_topk.refine`): the survivors in order of upper bound,
    rescored exactly in float64 until the next upper bound is below the kk-th exact score.
    """
    n, B, br = sk._n, q.shape[0], sk.block_rows
    kk = min(kmax, n)
    q_norm = float(np.sqrt((q.astype(np.float64) ** 2).sum(axis=1)).max()) * (1 + 1e-6)
    step = query_step(q)
    heap = np.empty((B, kmax), np.float32)  # per query: the kmax largest lower bounds so far (cpu_topk)
    count = np.zeros(B, np.int64)
    cand_rows: list[list[np.ndarray]] = [[] for _ in range(B)]
    cand_up: list[list[np.ndarray]] = [[] for _ in range(B)]
    per = max(1, GROUP_ROWS // br)  # blocks per filter call: fewer calls, scores [B, per * br] stay small
    width = min(n, per * br)
    approx_buf = np.empty((B, width), np.float32)
    up_out = np.empty((B, width), np.float32)
    rows_out = np.empty((B, width), np.int64)
    n_out = np.empty(B, np.int64)
    for g in range(0, sk.blocks(), per):
        lo, hi = g * br, min(n, (g + per) * br)
        approx = approx_buf.reshape(-1)[:B * (hi - lo)].reshape(B, hi - lo)  # contiguous
        for blk in range(g, min(g + per, sk.blocks())):
            a = blk * br - lo
            approx[:, a:a + min(br, n - blk * br)] = product(q, sk._packed[blk])
        for b in range(B):
            if masks[b] is not None:
                approx[b, ~masks[b][lo:hi]] = -np.inf  # low and up become -inf: never kept
        cpu_topk.filter_rows(approx, sk.bound(lo, hi, q_norm, step), heap, count, up_out, rows_out, n_out)
        for b in range(B):
            if n_out[b]:
                cand_rows[b].append(rows_out[b, :n_out[b]] + lo)
                cand_up[b].append(up_out[b, :n_out[b]].copy())
    T = np.where(count == kmax, heap[:, 0], -np.inf)
    flat_r, flat_u, offsets = [], [], [0]
    for b in range(B):
        if cand_rows[b]:
            r, u = np.concatenate(cand_rows[b]), np.concatenate(cand_up[b])
            live = u >= T[b]  # the threshold rose after earlier blocks were collected
            flat_r.append(r[live])
            flat_u.append(u[live])
        offsets.append(offsets[-1] + (flat_r[-1].size if cand_rows[b] else 0))
    vals = np.full((B, kk), -np.inf)
    rows = np.zeros((B, kk), np.int64)
    if offsets[-1]:
        cpu_topk.refine(matrix, q.astype(np.float64), np.concatenate(flat_r), np.concatenate(flat_u),
                        np.asarray(offsets, np.int64), vals, rows)
    return vals.astype(np.float32), rows
