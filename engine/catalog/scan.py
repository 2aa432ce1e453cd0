"""The scan: exact running top-k of normalised query vectors over the first `n` rows of the matrix. One
entry point, `scan`, makes the one choice of path; every path returns the same answer (score descending,
row ascending on ties; masked rows score -inf):

- CPU fp32 with an int8 sketch: `engine.sketch.exact_topk` (int8 filter under a rigorous error bound,
  exact fp32 rescoring of the rows that can still reach the top-k);
- CPU fp32 without one: NumPy's BLAS product and an O(n) selection per chunk (`_scan_numpy`);
- CPU fp16: `engine.sketch.half_exact_topk` (fp16 rows widened in cache, under a rounding bound);
- anything else (GPU, or `ATELIER_KERNEL_BACKEND=triton`): torch products per chunk merged with
  `kernels.topk`.

Knows the matrix and the masks; knows nothing of rows, ids, filters or categories. Never more than one
chunk of scores `[B, chunk_rows]` is in memory.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from kernels.topk import topk

from .. import sketch as int8_sketch


def kernel_backend_env() -> str:
    """`ATELIER_KERNEL_BACKEND`: `triton` forces the kernel path (tests of the Triton top-k)."""
    return os.environ.get("ATELIER_KERNEL_BACKEND", "auto")


def scan(matrix: torch.Tensor, np_view: np.ndarray | None, sketch: int8_sketch.Int8Sketch | None, n: int,
         chunk_rows: int, vecs: torch.Tensor, masks: list[torch.Tensor | None], kmax: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-`kmax` over rows 0..n of `matrix` [capacity, dim] (fp32 or fp16, on its device;
    `np_view`: its zero-copy NumPy view when CPU fp32, else None; `sketch`: its int8 sketch, synced, or
    None). vecs: [B, dim] float32 normalised; masks[b]: bool [n] on the device or None (every row valid)
    -> (values [B, kmax'] float32, rows [B, kmax'] int64) on the CPU, kmax' = min(kmax, n)."""
    forced = kernel_backend_env() == "triton"
    if sketch is not None and not forced:
        vals, rows = int8_sketch.exact_topk(sketch, np_view, vecs.numpy().astype(np.float32, copy=False),
                                            [None if m is None else m.numpy() for m in masks], kmax)
        return torch.from_numpy(vals), torch.from_numpy(rows)
    if np_view is not None and not forced:
        return _scan_numpy(np_view, n, chunk_rows, vecs, masks, kmax)
    if matrix.device.type == "cpu" and matrix.dtype == torch.float16 and not forced:
        vals, rows = int8_sketch.half_exact_topk(
            matrix[:n].numpy(), vecs.numpy().astype(np.float32, copy=False),
            [None if m is None else m.numpy() for m in masks], kmax, chunk_rows)
        return torch.from_numpy(vals), torch.from_numpy(rows)
    qm = vecs.to(matrix.device, matrix.dtype)
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        s = _scores(matrix, np_view, qm, lo, hi)  # [B, c] float32
        if any(m is not None for m in masks):
            s = s.clone() if np_view is not None else s
            for b, m in enumerate(masks):
                if m is not None:
                    s[b].masked_fill_(~m[lo:hi], float("-inf"))
        v, i = topk(s, min(kmax, hi - lo))
        i = i + lo
        if best_v is not None:
            assert best_i is not None
            v, j = topk(torch.cat([best_v, v], dim=1), min(kmax, best_v.shape[1] + v.shape[1]))
            i = torch.gather(torch.cat([best_i, i], dim=1), 1, j)
        best_v, best_i = v, i
    assert best_v is not None and best_i is not None
    return best_v.cpu(), best_i.cpu()


def _scores(matrix: torch.Tensor, np_view: np.ndarray | None, qm: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """qm: [B, dim] in the matrix dtype -> scores [B, hi - lo] float32 for rows lo..hi."""
    if np_view is not None:  # CPU fp32: numpy's BLAS is the fastest sgemm/sgemv here
        q_np = qm.numpy()
        s = (np_view[lo:hi] @ q_np[0])[None] if q_np.shape[0] == 1 else q_np @ np_view[lo:hi].T
        return torch.from_numpy(s)
    chunk = matrix[lo:hi]
    if qm.shape[0] == 1:
        return (chunk @ qm[0]).float()[None]
    return (qm @ chunk.T).float()


def _scan_numpy(np_view: np.ndarray, n: int, chunk_rows: int, vecs: torch.Tensor,
                masks: list[torch.Tensor | None], kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU fp32: the same running top-k with NumPy's BLAS product and an O(n) selection per chunk
    (argpartition, then the lower-index tie rule made exact), chunk scores staying in cache."""
    q = vecs.numpy().astype(np.float32, copy=False)
    B = q.shape[0]
    np_masks = [None if m is None else m.numpy() for m in masks]
    best_v = np.empty((B, 0), np.float32)
    best_i = np.empty((B, 0), np.int64)
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        chunk = np_view[lo:hi]
        s = (chunk @ q[0])[None] if B == 1 else q @ chunk.T  # [B, c] float32
        for b, m in enumerate(np_masks):
            if m is not None:
                s[b][~m[lo:hi]] = -np.inf
        kk = min(kmax, hi - lo)
        vals = np.empty((B, kk), np.float32)
        rows = np.empty((B, kk), np.int64)
        for b in range(B):
            sb = s[b]
            if kk < sb.shape[0]:
                part = np.argpartition(sb, sb.shape[0] - kk)[sb.shape[0] - kk:]
                t = sb[part].min()
                above = np.flatnonzero(sb > t)
                ties = np.flatnonzero(sb == t)[: kk - above.shape[0]]
                cand = np.concatenate([above, ties])
            else:
                cand = np.arange(sb.shape[0])
            order = np.lexsort((cand, -sb[cand]))  # score descending, then index ascending
            rows[b] = cand[order] + lo
            vals[b] = sb[cand[order]]
        if best_v.shape[1]:
            allv = np.concatenate([best_v, vals], 1)
            alli = np.concatenate([best_i, rows], 1)
            keep = min(kmax, allv.shape[1])
            nv = np.empty((B, keep), np.float32)
            ni = np.empty((B, keep), np.int64)
            for b in range(B):
                order = np.lexsort((alli[b], -allv[b]))[:keep]
                nv[b], ni[b] = allv[b][order], alli[b][order]
            best_v, best_i = nv, ni
        else:
            best_v, best_i = vals, rows
    return torch.from_numpy(best_v), torch.from_numpy(best_i)
