"""The Triton weight-only products (`atelier_kernels/wq_matmul.py`, issue 13) under TRITON_INTERPRET=1 on the CPU:
on blocks the engine itself makes (`Packed.quantize`: `models.llm_weights = "int8"` / `"int4"`) against the
product of the `gguf` package's own de-quantisation of the same bytes (an independent decoder) in float64,
and bad input refused naming the argument."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it before any import of triton

import gguf  # noqa: E402
from gguf import quants  # noqa: E402

from engine.llm.qweights import Packed  # noqa: E402
from atelier_kernels import wq_matmul


def _gguf_bytes(p: Packed) -> np.ndarray:
    """The blocks back in GGUF's on-disk layout (d, [m], qs per block), for gguf's own decoder."""
    N, nb = p.d.shape
    parts = [p.d.view(np.uint8).reshape(N, nb, 2)]
    if p.m is not None:
        parts.append(p.m.view(np.uint8).reshape(N, nb, 2))
    parts.append(p.qs.view(np.uint8).reshape(N, nb, -1))
    return np.concatenate(parts, axis=-1).reshape(N, -1)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
def test_triton_product_on_engine_blocks_matches_gguf_decoder(fmt):
    rng = np.random.default_rng(21)
    w = (rng.standard_normal((70, 96)) * 0.05).astype(np.float32)
    p = Packed.quantize(w, fmt)
    want_w = quants.dequantize(_gguf_bytes(p), getattr(gguf.GGMLQuantizationType, fmt)).astype(np.float64)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    qs = torch.from_numpy(np.ascontiguousarray(p.qs))
    d = torch.from_numpy(p.d.view(np.float16).copy())
    m = None if p.m is None else torch.from_numpy(p.m.view(np.float16).copy())
    got = wq_matmul.matmul(torch.from_numpy(x), fmt, qs, d, m, backend="triton")
    want = x.astype(np.float64) @ want_w.T
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bad_input_is_refused_naming_the_argument():
    qs = torch.zeros((4, 2, 16), dtype=torch.uint8)
    d = torch.zeros((4, 2), dtype=torch.float16)
    with pytest.raises(ValueError, match="fmt='Q5_0'"):
        wq_matmul.matmul(torch.zeros(1, 64), "Q5_0", qs, d, d)
    with pytest.raises(ValueError, match=r"x \(1, 63\)"):
        wq_matmul.matmul(torch.zeros(1, 63), "Q4_1", qs, d, d)
    with pytest.raises(ValueError, match="mins None"):
        wq_matmul.matmul(torch.zeros(1, 64), "Q4_1", qs, d, None)
    with pytest.raises(ValueError, match=r"qs \(4, 2, 16\)"):
        wq_matmul.matmul(torch.zeros(1, 64), "Q8_0", qs, d)
