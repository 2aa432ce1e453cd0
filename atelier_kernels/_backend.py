"""The one rule that picks a Triton kernel or its torch twin for a tensor.

- `triton` on CUDA tensors when Triton is importable;
- `triton` on CPU tensors only when `TRITON_INTERPRET=1` was set before the
  kernels were defined (tests use this to run kernels in the interpreter);
- the torch reference otherwise (CPU, MPS, or no Triton).

`backend=` on each launcher overrides the rule: "auto" (or None) applies it,
"triton" or "torch" forces one side. The engine decides the backend of each
operation once, at start (`engine.backends`), and passes it explicitly; this
module reads no configuration of its own (`TRITON_INTERPRET` is Triton's own
switch, read from the environment, never written).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Literal

import torch

Backend = Literal["triton", "torch"]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def runnable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on `device` (CUDA, or CPU under the interpreter)."""
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpret_mode()))


def choose(t: torch.Tensor, backend: str | None = None) -> Backend:
    """Pick the backend for work on tensor `t`: `backend` ("auto"/None, "triton", "torch") as described above."""
    want = backend or "auto"
    if want not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={want!r}: expected auto, triton or torch")
    if want == "torch":
        return "torch"
    if want == "triton":
        if not runnable(t.device):
            raise RuntimeError(
                "backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before import for CPU tensors")
        return "triton"
    return "triton" if (t.is_cuda and triton_available()) else "torch"


def default_backend(device: torch.device) -> Backend:
    """What `auto` resolves to on a device (`engine.backends`, the doctor command)."""
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def cpu_do_bench(fn, warmup: int = 1, rep: int = 3, **_: object) -> float:
    """A `do_bench` for `@triton.autotune` that works in the CPU interpreter (ms)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(max(1, rep)):
        fn()
    return (time.perf_counter() - t0) * 1000.0 / max(1, rep)


def autotune_kwargs() -> dict:
    """Extra keyword arguments for `triton.autotune`: a CPU `do_bench` under the interpreter."""
    return {"do_bench": cpu_do_bench} if interpret_mode() else {}
