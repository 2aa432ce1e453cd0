"""Every registered kernel against its twin, by iterating `kernels.registry` (Triton in the interpreter on
CPU tensors, Numba on NumPy arrays). The per-kernel test files hold the independent oracles (scikit-image,
NumPy lexsort, float64 NumPy); this file guarantees that no kernel is registered without its twin agreeing."""

from __future__ import annotations

import pytest

from kernels import registry

ALL = registry.kernels()


def test_registry_lists_every_kernel_once_by_name():
    names = [k.name for k in ALL]
    assert len(names) == len(set(names))
    assert {"topk", "deltae2000_rgb8", "kv_quantize", "kv_dequantize"} <= set(names)
    assert {"rows_matmul", "attend", "filter_rows", "refine", "half_scores", "dots64"} <= set(names)
    assert registry.get("topk").kind == "triton"
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        registry.get("nope")


@pytest.mark.parametrize("kernel", ALL, ids=[k.name for k in ALL])
def test_kernel_matches_its_twin(kernel):
    if kernel.kind == "numba":
        from kernels import _numba

        assert _numba.jit() is not None, "numba is a dependency: the kernels themselves must run here"
    cases = list(kernel.cases("cpu", False))
    assert len(cases) >= 3
    for args, label in cases:
        try:
            kernel.check(kernel.fast(*args), kernel.twin(*args))
        except AssertionError as exc:
            raise AssertionError(f"{kernel.name} [{label}]: {exc}") from None


def test_check_catches_a_wrong_answer():
    import numpy as np

    k = registry.get("rows_matmul")
    (x, w), _ = next(iter(k.cases("cpu", False)))
    with pytest.raises(AssertionError):
        k.check(k.fast(x, w) + 1.0, k.twin(x, w))
