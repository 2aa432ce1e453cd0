"""atelier_kernels.topk: Triton (interpreter) and torch reference vs a NumPy lexsort oracle.

The oracle orders each row by (value descending, index ascending) with
`np.lexsort`, independent of torch.topk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atelier_kernels.topk import topk, topk_reference


def oracle(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x2 = np.atleast_2d(x).astype(np.float64)
    idx = np.stack([np.lexsort((np.arange(r.size), -r))[:k] for r in x2])
    vals = np.take_along_axis(x2, idx, axis=1)
    return vals, idx


def make(rows: int, n: int, *, levels: int | None, inf_frac: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if levels is None:
        x = torch.randn(rows, n, generator=g)
    else:  # heavy ties: few distinct values
        x = torch.randint(0, levels, (rows, n), generator=g).float()
    x[torch.rand(rows, n, generator=g) < inf_frac] = float("-inf")
    return x


CASES = [  # rows, N, k, levels (None = continuous), fraction of -inf
    (1, 1, 1, None, 0.0),
    (3, 7, 7, 2, 0.3),
    (2, 300, 5, 3, 0.5),
    (5, 1031, 17, None, 0.2),
    (1, 2999, 3, 1, 0.0),  # all equal
    (2, 513, 40, 4, 0.9),  # k larger than the finite entries in some rows
    (1, 4097, 8, None, 0.0),  # several passes
    (3, 64, 64, 5, 1.0),  # all -inf
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows,n,k,levels,inf_frac", CASES)
def test_matches_oracle(backend: str, rows: int, n: int, k: int, levels: int | None, inf_frac: float) -> None:
    x = make(rows, n, levels=levels, inf_frac=inf_frac, seed=rows * 1000 + n + k)
    vals, idx = topk(x, k, backend=backend)
    ov, oi = oracle(x.numpy(), k)
    assert idx.dtype == torch.int64 and vals.dtype == x.dtype
    assert vals.shape == (rows, k) and idx.shape == (rows, k)
    np.testing.assert_array_equal(idx.numpy(), oi)
    np.testing.assert_array_equal(vals.numpy().astype(np.float64), ov)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_triton_equals_reference(dtype: torch.dtype) -> None:
    x = make(2, 777, levels=None, inf_frac=0.1, seed=7).to(dtype)
    v1, i1 = topk(x, 9, backend="triton")
    v2, i2 = topk_reference(x, 9)
    ov, oi = oracle(x.double().numpy(), 9)
    assert torch.equal(i1, i2) and torch.equal(v1, v2) and v1.dtype == dtype
    np.testing.assert_array_equal(i1.numpy(), oi)


def test_float64_close_values_keep_order() -> None:
    # distinct in float64, equal after a float32 cast: the kernel must not lose the order
    x = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12, 0.5], dtype=torch.float64)
    _, idx = topk(x, 3, backend="triton")
    assert idx.tolist() == [2, 1, 0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_dimensional(backend: str) -> None:
    x = torch.tensor([0.5, 2.0, float("-inf"), 2.0, -1.0, float("-inf")])
    vals, idx = topk(x, 6, backend=backend)
    assert idx.tolist() == [1, 3, 0, 4, 2, 5]
    assert vals.shape == (6,)


@pytest.mark.parametrize("k", [0, 5, -1])
def test_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match="k="):
        topk(torch.zeros(2, 4), k)


def test_not_float() -> None:
    with pytest.raises(ValueError, match="floating"):
        topk(torch.zeros(4, dtype=torch.int64), 1)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 3), n=st.integers(1, 600), levels=st.integers(1, 6), data=st.data())
def test_property_triton_and_reference(rows: int, n: int, levels: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, min(n, 24)))
    inf_frac = data.draw(st.sampled_from([0.0, 0.5, 0.95]))
    x = make(rows, n, levels=levels, inf_frac=inf_frac, seed=n * 7 + levels)
    _, oi = oracle(x.numpy(), k)
    for backend in ("torch", "triton"):
        _, idx = topk(x, k, backend=backend)
        np.testing.assert_array_equal(idx.numpy(), oi)
