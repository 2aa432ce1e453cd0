"""Numba for the CPU kernels (`cpu_decode`, `cpu_qmatmul`, `cpu_topk`): optional, one switch, one lock.

State (process-wide, on purpose): `jit()` is decided once per process and
cached: Numba's `(njit, prange)`, or None when Numba is not installed or
`ATELIER_CPU_KERNELS=numpy` asks for the NumPy twins. That variable is a
documented input read here, once, at the first call (`engine.backends.resolve`
makes that call when the engine starts and reports the result as the
`cpu_kernels` choice); nothing writes it. `LOCK` serialises kernel calls
across threads: Numba's `workqueue` threading layer, its fallback when no
OpenMP or TBB runtime is present, must not be entered from two threads at
once. The calls it guards are short (under a few ms), so an LLM step and a
catalogue scan interleave at that grain.

Kernel modules build their compiled kernels once (`_kernels()`, cached) as a
dict name -> function, and their entry points run one by name through
`dispatch`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

LOCK = threading.Lock()


@functools.cache
def wanted() -> tuple[str, str]:
    """The CPU kernels' side for this process, and why: ("numba" | "numpy", reason). Decided once, without
    importing Numba (`engine.backends` calls it when the engine starts)."""
    import importlib.util

    setting = os.environ.get("ATELIER_CPU_KERNELS", "auto")
    if setting == "numpy":
        return "numpy", "ATELIER_CPU_KERNELS=numpy: the NumPy twins of the Numba kernels"
    if setting not in ("auto", "numba"):
        raise ValueError(f"ATELIER_CPU_KERNELS={setting!r}: expected auto, numba or numpy")
    if importlib.util.find_spec("numba") is None:
        return "numpy", "Numba is not installed: the NumPy twins of the Numba kernels"
    return "numba", "Numba kernels (compiled on first use, cached on disk)"


@functools.cache
def jit() -> tuple[Any, Any] | None:
    """Numba's `(njit, prange)`, or None when `wanted()` says numpy or Numba does not import."""
    if wanted()[0] == "numpy":
        return None
    try:
        from numba import njit, prange
    except Exception:  # installed but broken: no LLVM for this platform
        return None
    return njit, prange


@functools.cache
def half_to_float_intrinsic() -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: uint16 bits of an fp16 value -> float32, as LLVM's `fpext half to float`: exact
    (subnormals too), and vectorised into F16C's vcvtph2ps where the CPU has it. Numba has no float16 type
    of its own. Kernel modules keep it in a module global (`_h2f`): a closure variable would keep Numba from
    caching the kernels that call it."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def half_to_float(typingctx, h):  # noqa: ANN001, ANN202
        if h != types.uint16:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    return half_to_float


CPU_BACKENDS = ("numba", "numpy")


def dispatch(kernels: Callable[[], Mapping[str, Callable[..., None]] | tuple | None], name: str | int,
             reference: Callable[..., None], backend: str | None, *args: Any) -> None:
    """Run the kernel called `name` in `kernels()` (a dict name -> compiled kernel) on args, under LOCK; or
    `reference(*args)`, its NumPy twin, when Numba is absent (`kernels()` is None) or `backend == "numpy"`.
    `backend`: None or "numba" (the kernel where Numba runs), "numpy" (the twin). Kernels and twins write
    their results into arrays among args. (An int `name` indexes a tuple: for a module not yet converted.)"""
    if backend not in (None, "numba", "numpy"):
        raise ValueError(f"backend={backend!r}: expected numba or numpy")
    ks = None if backend == "numpy" else kernels()
    if ks is None:
        reference(*args)
    else:
        fn = ks[name]  # type: ignore[index]
        with LOCK:
            fn(*args)


def warm() -> list[str]:
    """Compile every Numba kernel once with the argument types the engine passes, so that Numba's
    on-disk cache (beside the sources, else its user cache dir) holds them: the first query and the
    first generation of a fresh install then skip ~12 s of compilation. Returns the kernels compiled."""
    if jit() is None:
        return []
    import numpy as np

    from . import cpu_decode, cpu_qmatmul, cpu_topk

    f32 = np.float32
    cpu_decode.rows_matmul(np.ones((2, 8), f32), np.ones((4, 8), f32))
    cpu_decode.attend(np.ones((1, 2, 4), f32), np.ones((1, 1, 3, 4), f32), np.ones((1, 1, 3, 4), f32),
                      np.array([0]), np.array([1]), 0.5)
    i8 = np.ones((1, 1, 3, 4), np.int8)
    cpu_decode.attend_q8(np.ones((1, 2, 4), f32), i8, np.ones((1, 1, 3), f32), i8, np.ones((1, 1, 3), f32),
                         np.ones((1, 1, 2, 4), f32), np.ones((1, 1, 2, 4), f32), np.array([0]), np.array([2]),
                         np.array([3]), 0.5)
    cpu_topk.filter_rows(np.ones((2, 10), f32), np.ones(10, f32), np.empty((2, 3), f32), np.zeros(2, np.int64),
                         np.empty((2, 10), f32), np.empty((2, 10), np.int64), np.empty(2, np.int64))
    cpu_topk.refine(np.ones((10, 8), f32), np.ones((2, 8)), np.arange(4), np.ones(4, f32),
                    np.array([0, 2, 4]), np.full((2, 3), -np.inf), np.zeros((2, 3), np.int64))
    cpu_topk.dots64(np.ones((10, 8), f32), np.arange(3), np.ones(8))
    cpu_topk.half_scores(np.ones((2, 8), f32), np.ones((3, 8), np.float16))
    return ["rows_matmul", "attend", "attend_q8", "filter_rows", "refine", "dots64", "half_scores", *cpu_qmatmul.warm()]
