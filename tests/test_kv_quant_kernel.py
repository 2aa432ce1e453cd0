"""atelier_kernels/kv_quant: the Triton kernel (interpreter) against the torch reference and a NumPy oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atelier_kernels.kv_quant import dequantize, dequantize_reference, quantize, quantize_np, quantize_reference

SHAPES = [(7, 3, 50), (5, 64), (1, 1, 13), (2, 3, 17, 64), (0, 8)]


def _numpy_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float32)
    scale = (np.maximum(np.abs(x).max(axis=-1), np.float32(1e-8)) / np.float32(127)).astype(np.float32)
    q = np.clip(np.floor(x / scale[..., None] + np.float32(0.5)), -127, 127).astype(np.int8)
    return q, scale


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_numpy_oracle(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    q, s = quantize_reference(x)
    qn, sn = _numpy_quant(x.numpy())
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == x.shape[:-1]
    np.testing.assert_allclose(s.numpy(), sn, rtol=1e-6)
    assert (np.abs(q.numpy().astype(int) - qn.astype(int)) <= 1).all()
    assert (q.numpy() == qn).mean() > 0.999 if q.numel() else True
    # round-trip error is at most half a step
    err = (dequantize_reference(q, s) - x).abs()
    assert (err <= s.unsqueeze(-1) * 0.5 + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_twin_matches_reference(shape):
    # quantize_np (the NumPy decode step's int8 cache writes) against the torch reference, as the kernel is
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4
    if x.numel():
        x.view(-1, shape[-1])[0] = 0.0  # an all-zero row: scale floor, q == 0
    q, s = quantize_reference(x)
    qn, sn = quantize_np(x.numpy())
    assert qn.dtype == np.int8 and sn.dtype == np.float32 and qn.shape == x.shape and sn.shape == x.shape[:-1]
    np.testing.assert_allclose(sn, s.numpy(), rtol=1e-6, atol=0)
    assert (np.abs(q.numpy().astype(int) - qn.astype(int)) <= 1).all()
    assert (q.numpy() == qn).mean() > 0.999 if q.numel() else True


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernel_matches_reference(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 5
    if x.numel():
        x[..., 0] = 0.0
        x.view(-1, shape[-1])[0] = 0.0  # an all-zero row: scale floor, q == 0
    q_t, s_t = quantize(x, backend="triton")
    q_r, s_r = quantize(x, backend="torch")
    assert q_t.dtype == torch.int8 and q_t.shape == q_r.shape and s_t.shape == s_r.shape
    torch.testing.assert_close(s_t, s_r, rtol=1e-6, atol=0)
    assert (q_t.int() - q_r.int()).abs().max().item() <= 1 if x.numel() else True
    for dt in (torch.float32, torch.float16):
        d_t = dequantize(q_r, s_r, dt, backend="triton")
        d_r = dequantize(q_r, s_r, dt, backend="torch")
        assert d_t.dtype == dt
        torch.testing.assert_close(d_t, d_r, rtol=1e-3 if dt == torch.float16 else 1e-6, atol=1e-6)


def test_noncontiguous_input():
    x = torch.randn(4, 9, 40).transpose(0, 1)  # [9, 4, 40], not contiguous
    q_t, s_t = quantize(x, backend="triton")
    q_r, s_r = quantize(x, backend="torch")
    torch.testing.assert_close(s_t, s_r)
    assert (q_t.int() - q_r.int()).abs().max() <= 1
