"""Every registered kernel against its twin, by iterating `atelier_kernels.registry` (Triton in the interpreter on
CPU tensors, Numba on NumPy arrays). The per-kernel test files hold the independent oracles (scikit-image,
NumPy lexsort, float64 NumPy); this file guarantees that no kernel is registered without its twin agreeing."""

from __future__ import annotations

import pytest

from atelier_kernels import registry

ALL = registry.kernels()


def test_registry_lists_every_kernel_once_by_name():
    names = [k.name for k in ALL]
    assert len(names) == len(set(names))
    assert {"topk", "deltae2000_rgb8", "kv_quantize", "kv_dequantize"} <= set(names)
    assert {"rows_matmul", "attend", "filter_rows", "refine", "half_scores", "dots64", "gather_scores"} <= set(names)
    assert registry.get("topk").kind == "triton"
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        registry.get("nope")


@pytest.mark.parametrize("kernel", ALL, ids=[k.name for k in ALL])
def test_kernel_matches_its_twin(kernel):
    if kernel.kind == "numba":
        from atelier_kernels import _numba

        assert _numba.jit() is not None, "numba is a dependency: the kernels themselves must run here"
    cases = list(kernel.cases("cpu", False))
    assert len(cases) >= 3
    for args, label in cases:
        try:
            kernel.check(kernel.fast(*args), kernel.twin(*args))
        except AssertionError as exc:
            raise AssertionError(f"{kernel.name} [{label}]: {exc}") from None


def test_check_catches_a_wrong_answer():

    k = registry.get("rows_matmul")
    (x, w), _ = next(iter(k.cases("cpu", False)))
    with pytest.raises(AssertionError):
        k.check(k.fast(x, w) + 1.0, k.twin(x, w))


def test_cpu_kernels_dispatch_by_name():
    # every registered Numba kernel is found by its name in its module's compiled kernels (no tuple positions)
    from atelier_kernels import _numba, cpu_decode, cpu_topk

    compiled = {**cpu_decode._kernels(), **cpu_topk._kernels()}
    for k in registry.kernels("numba"):
        if k.fast.__module__ == "atelier_kernels.registry":  # the built-in entries; modules may register their own
            assert k.name in compiled, k.name
    with pytest.raises(ValueError, match="backend='fast': expected numba or numpy"):
        _numba.dispatch(cpu_decode._kernels, "rows_matmul", cpu_decode.rows_matmul_reference, "fast")


def test_register_adds_a_kernel_that_the_tests_then_iterate(monkeypatch):
    import numpy as np

    monkeypatch.setattr(registry, "_REGISTERED", {})

    def cases(device, large):
        for n in (1, 5, 33):
            yield (np.arange(n, dtype=np.float32),), f"n={n}"

    doubled = registry.Kernel("double", "numba", lambda x: x * 2, lambda x: x + x, cases,
                              lambda g, w: np.testing.assert_array_equal(g, w), "x * 2")
    assert registry.register(doubled) is doubled
    assert [k.name for k in registry.kernels("numba")][-1] == "double"
    assert registry.get("double") is doubled
    assert "double" not in [k.name for k in registry.kernels("triton")]
    with pytest.raises(ValueError, match="kernel.name='topk'"):
        registry.register(registry.Kernel("topk", "numba", doubled.fast, doubled.twin, cases, doubled.check, ""))
    with pytest.raises(ValueError, match="kernel.kind='cuda'"):
        registry.register(registry.Kernel("x", "cuda", doubled.fast, doubled.twin, cases, doubled.check, ""))
    with pytest.raises(TypeError):
        registry.register(("double", "numba"))


def test_gpu_check_lists_the_registry_and_says_no_gpu_in_one_line():
    # the GPU script iterates the registry (its plan needs no GPU) and, without CUDA, says so and exits 0
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert {r[1] for r in gpu_check.planned_kernels()} == {k.name for k in registry.kernels("triton")}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert (out.returncode, out.stderr) == (0, "")
    assert len(out.stdout.strip().splitlines()) == 1 and "no CUDA device" in out.stdout
