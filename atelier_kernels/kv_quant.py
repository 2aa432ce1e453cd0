"""Row-wise absmax int8 quantisation for the KV cache: a Triton kernel and its torch twin.

    q, scale = quantize(x)                  # x: [..., D] float -> q: [..., D] int8, scale: [...] fp32
    x_hat = dequantize(q, scale, dtype)     # -> [..., D] dtype
    q, scale = quantize_np(x)               # the same on NumPy fp32 arrays (the NumPy decode step)

One row is one token of one head (per-token, per-head scales):
scale = max(|x|) / 127 (at least 1e-8 / 127), q = clamp(floor(x / scale + 0.5), -127, 127).
Both backends compute the same fp32 arithmetic, so they agree exactly (up to
the rare x / scale landing on a .5 tie after different rounding of the
division, which the tests tolerate as one unit).

Memory traffic: quantise reads 4D bytes and writes D + 4 per row; dequantise
reads D + 4 and writes 4D.
"""

from __future__ import annotations

import numpy as np
import torch

from ._backend import choose, triton_available

_EPS = 1e-8


def quantize_reference(x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=_EPS) / 127.0
    q = torch.floor(xf / scale.unsqueeze(-1) + 0.5).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_reference` on a NumPy fp32 array (the NumPy decode step's int8 cache writes): the same
    fp32 operations in the same order: the same scales, and the same int8 values up to the rare .5 tie that
    torch's division rounds the other way (one unit; tested against the reference like the kernel is)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1), np.float32(_EPS)) / np.float32(127.0)
    q = np.clip(np.floor(x / scale[..., None] + np.float32(0.5)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def evict_ring_np(ring: np.ndarray, Q: np.ndarray, S: np.ndarray, slot: int, st: int, n: int) -> None:
    """One layer of an int8 cache (ring [slots, KVH, Rr, hd], Q [slots, KVH, L, hd], S [slots, KVH, L]) before
    tokens st .. n - 1 of `slot` are written: the ring positions they push out that stay below the ring after
    the write (max(st - Rr, 0) .. min(st, n - Rr) - 1) quantised into Q / S (`quantize_np`)."""
    Rr = ring.shape[2]
    old = np.arange(max(st - Rr, 0), min(st, max(n - Rr, 0)))
    if old.size:
        Q[slot][:, old], S[slot][:, old] = quantize_np(ring[slot][:, old % Rr])


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                         backend: str | None = None) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, s_ptr, D, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / 127.0
        q = tl.floor(x / scale + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * D + cols, q.to(tl.int8), mask=m)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, o_ptr, D, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        q = tl.load(q_ptr + row * D + cols, mask=m, other=0).to(tl.float32)
        s = tl.load(s_ptr + row)
        tl.store(o_ptr + row * D + cols, (q * s).to(o_ptr.dtype.element_ty), mask=m)


def _quantize_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    n = x2.shape[0]
    q = torch.empty((n, D), dtype=torch.int8, device=x.device)
    s = torch.empty((n,), dtype=torch.float32, device=x.device)
    if n:
        _quant_kernel[(n,)](x2, q, s, D, BLOCK=triton.next_power_of_2(D))
    return q.view(x.shape), s.view(x.shape[:-1])


def _dequantize_triton(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    D = q.shape[-1]
    q2 = q.reshape(-1, D).contiguous()
    s2 = scale.reshape(-1).contiguous().float()
    out = torch.empty(q2.shape, dtype=dtype, device=q.device)
    if q2.shape[0]:
        _dequant_kernel[(q2.shape[0],)](q2, s2, out, D, BLOCK=triton.next_power_of_2(D))
    return out.view(q.shape)


def quantize(x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] float -> (q [..., D] int8, scale [...] fp32)."""
    if choose(x, backend) == "triton":
        return _quantize_triton(x)
    return quantize_reference(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               backend: str | None = None) -> torch.Tensor:
    """q: [..., D] int8, scale: [...] -> [..., D] `dtype`."""
    if choose(q, backend) == "triton":
        return _dequantize_triton(q, scale, dtype)
    return dequantize_reference(q, scale, dtype)
