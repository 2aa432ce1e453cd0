"""The scan: exact running top-k of normalised query vectors over the first `n` rows of the matrix.

One choice of path per catalogue, made when it is created (`choose_path`; the engine's is reported by
`engine.backends` as catalog_scan_float32 / catalog_scan_float16); `scan` runs the path it is given. Every
path returns the same answer (score descending, row ascending on ties; masked rows score -inf):

- `sketch` (CPU fp32 where fbgemm's int8 product works): `engine.sketch.exact_topk` (int8 filter under a
  rigorous error bound, exact fp32 rescoring of the rows that can still reach the top-k);
- `numpy` (CPU fp32 without the sketch: fbgemm missing or misbehaving here, the one fallback, or a catalogue
  made with `sketch=False`): NumPy's BLAS product and an O(n) selection per chunk (`_scan_numpy`);
- `half` (CPU fp16): `engine.sketch.half_exact_topk` (fp16 rows widened in cache, under a rounding bound);
- `torch` (GPU and MPS, or the Triton top-k forced on the CPU under the interpreter by
  `engine.kernel_backend=triton`): torch products per chunk merged with `atelier_kernels.topk`.

On the two CPU paths that rescore in float64 (`sketch`, `half`), a query whose mask keeps at most
`GATHER_FRACTION[path]` of the rows is answered from those rows alone (`engine.sketch.gathered_topk`: the
same float64 scores, so the same answer), instead of scoring every row and masking most of them.

Knows the matrix and the masks; knows nothing of rows, ids, filters or categories. Never more than one
chunk of scores `[B, chunk_rows]` is in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from atelier_kernels.topk import topk

from .. import sketch as int8_sketch

PATHS = ("sketch", "numpy", "half", "torch")
# A mask keeping at most this share of the rows is scanned over its rows alone. Measured on 1M x 384 clustered
# rows, 2 cores (benchmarks/recommend_bench.py --filters 1000000), p50 ms every row masked -> the rows alone:
# fp32 (sketch) 2 % 78.7 -> 12.9, 10 % 81.3 -> 23.5, 25 % 82.5 -> 40.3, 40 % 81.6 -> 65.7, 60 % 74.3 -> 86.5;
# fp16 (half) 2 % 73.6 -> 12.8, 10 % 76.9 -> 16.6, 25 % 75.6 -> 25.8, 40 % 82.3 -> 40.3, 60 % 84.4 -> 52.1.
GATHER_FRACTION = {"sketch": 0.45, "half": 0.6}


def choose_path(device: torch.device | str, dtype: torch.dtype, *, sketch: bool | None = None,
                topk_backend: str = "auto") -> tuple[str, str]:
    """The scan path for a catalogue on `device` in `dtype`, and why. `sketch`: None = where it works,
    False = never (the `numpy` path), True = required (ValueError where it cannot run). `topk_backend`:
    the engine's top-k choice; "triton" on the CPU (the interpreter) takes the `torch` path."""
    dev = torch.device(device)
    cpu = dev.type == "cpu" and topk_backend != "triton"
    if sketch and not (cpu and dtype == torch.float32):
        raise ValueError("sketch=True: the int8 sketch needs an fp32 catalogue on the CPU")
    if not cpu:
        why = ("engine.kernel_backend=triton: torch products merged by the Triton top-k (interpreter)"
               if dev.type == "cpu" else f"torch products on {dev.type}, merged by atelier_kernels.topk ({topk_backend})")
        return "torch", why
    if dtype == torch.float16:
        return "half", "fp16 rows widened in cache (atelier_kernels.cpu_topk.half_scores) under a rounding bound"
    if sketch is False:
        return "numpy", "sketch=False: NumPy's BLAS product and an O(n) selection per chunk"
    if int8_sketch.supported():
        return "sketch", "int8 sketch filter (fbgemm) under an error bound, exact fp32 rescoring"
    if sketch:
        raise ValueError("sketch=True: fbgemm's int8 product does not work (or honour its bound) here")
    return "numpy", "fbgemm's int8 product is unavailable here: NumPy's BLAS product and an O(n) selection"


def scan(matrix: torch.Tensor, np_view: np.ndarray | None, sketch: int8_sketch.Int8Sketch | None, n: int,
         chunk_rows: int, vecs: torch.Tensor, masks: list[torch.Tensor | None], kmax: int, *,
         path: str | None = None, topk_backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-`kmax` over rows 0..n of `matrix` [capacity, dim] (fp32 or fp16, on its device;
    `np_view`: its zero-copy NumPy view when CPU fp32, else None; `sketch`: its int8 sketch, synced, or
    None) along `path` (`choose_path`; None: the one the arguments imply, as `choose_path` with the sketch
    present or not). vecs: [B, dim] float32 normalised; masks[b]: bool [n] on the device or None (every row
    valid) -> (values [B, kmax'] float32, rows [B, kmax'] int64) on the CPU, kmax' = min(kmax, n)."""
    if path is None:
        path = ("sketch" if sketch is not None else "numpy" if np_view is not None
                else "half" if matrix.device.type == "cpu" and matrix.dtype == torch.float16 else "torch")
    if path in ("sketch", "half") and any(m is not None for m in masks):
        gathered = _gathered(matrix, np_view, n, vecs, masks, kmax, path)
        if gathered is not None:
            vals, rows, rest = gathered
            if rest:
                v, r = scan(matrix, np_view, sketch, n, chunk_rows, vecs[rest], [masks[b] for b in rest], kmax,
                            path=path, topk_backend=topk_backend)
                vals[rest], rows[rest] = v.numpy(), r.numpy()
            return torch.from_numpy(vals), torch.from_numpy(rows)
    if path == "sketch":
        if sketch is None or np_view is None:
            raise ValueError("path='sketch' needs the catalogue's int8 sketch and its fp32 NumPy view")
        vals, rows = int8_sketch.exact_topk(sketch, np_view, vecs.numpy().astype(np.float32, copy=False),
                                            [None if m is None else m.numpy() for m in masks], kmax)
        return torch.from_numpy(vals), torch.from_numpy(rows)
    if path == "numpy":
        if np_view is None:
            raise ValueError("path='numpy' needs the catalogue's fp32 NumPy view")
        return _scan_numpy(np_view, n, chunk_rows, vecs, masks, kmax)
    if path == "half":
        vals, rows = int8_sketch.half_exact_topk(
            matrix[:n].numpy(), vecs.numpy().astype(np.float32, copy=False),
            [None if m is None else m.numpy() for m in masks], kmax, chunk_rows)
        return torch.from_numpy(vals), torch.from_numpy(rows)
    if path != "torch":
        raise ValueError(f"path={path!r}: expected one of {', '.join(PATHS)}")
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
        v, i = topk(s, min(kmax, hi - lo), backend=topk_backend)
        i = i + lo
        if best_v is not None:
            assert best_i is not None
            v, j = topk(torch.cat([best_v, v], dim=1), min(kmax, best_v.shape[1] + v.shape[1]),
                        backend=topk_backend)
            i = torch.gather(torch.cat([best_i, i], dim=1), 1, j)
        best_v, best_i = v, i
    assert best_v is not None and best_i is not None
    return best_v.cpu(), best_i.cpu()


def _gathered(matrix: torch.Tensor, np_view: np.ndarray | None, n: int, vecs: torch.Tensor,
              masks: list[torch.Tensor | None], kmax: int, path: str
              ) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """The queries whose mask keeps at most GATHER_FRACTION[path] of the n rows, answered from those rows alone
    -> (values [B, kk], rows [B, kk] with their places filled, the other queries' indices), or None when
    no query's mask is that selective."""
    sel = {}
    for b, m in enumerate(masks):
        if m is not None:
            mb = m.numpy()[:n]
            if np.count_nonzero(mb) <= GATHER_FRACTION[path] * n:
                sel[b] = np.flatnonzero(mb)
    if not sel:
        return None
    src = np_view if path == "sketch" else matrix[:n].numpy()
    assert src is not None
    B, kk = vecs.shape[0], min(kmax, n)
    vals = np.full((B, kk), -np.inf, np.float32)
    rows = np.zeros((B, kk), np.int64)
    q = vecs.numpy().astype(np.float32, copy=False)
    for b, r in sel.items():
        v, i = int8_sketch.gathered_topk(src, r, q[b], kmax)
        vals[b, :v.shape[0]], rows[b, :i.shape[0]] = v, i
    return vals, rows, [b for b in range(B) if b not in sel]


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
