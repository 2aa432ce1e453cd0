"""Numba for the CPU kernels (`cpu_decode`, `cpu_topk`): optional, one switch, one lock.

`jit()` returns Numba's `(njit, prange)`, or None when Numba is not installed
or `ATELIER_CPU_KERNELS=numpy` asks for the NumPy references. `LOCK`
serialises kernel calls across threads: Numba's `workqueue` threading layer,
its fallback when no OpenMP or TBB runtime is present, must not be entered
from two threads at once. The calls it guards are short (under a few ms), so
an LLM step and a catalogue scan interleave at that grain.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

LOCK = threading.Lock()


@functools.cache
def jit() -> tuple[Any, Any] | None:
    if os.environ.get("ATELIER_CPU_KERNELS", "auto") == "numpy":
        return None
    try:
        from numba import njit, prange
    except Exception:  # not installed, or no LLVM for this platform
        return None
    return njit, prange
