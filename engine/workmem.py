"""Working memory: the per-call limit, the refusal before work starts, and giving freed memory back.

Contract
- A tool (or an engine entry point) computes an upper bound of the bytes its
  call will allocate from its arguments and input sizes *before* allocating
  them, and calls `require(argument, value, need, limit, what)`: over the
  limit it raises `MemoryLimitExceeded` (an `InvalidInput`, so the client
  reads "argument=value: would need 3.1 GB; limit 2.0 GB (what)").
- `call_limit(engine, configured_mb)` is the per-call limit: `configured_mb`
  MiB when it is > 0 (the `limits.max_call_memory_mb` setting), else the
  engine's memory budget less the bytes its loaded models hold (never below
  a quarter of the budget, so a full model cache does not refuse everything:
  models are evicted under pressure).
- `release(bytes_used)`: after a call that allocated at least `TRIM_BYTES`,
  ask glibc to return freed heap pages to the OS (`malloc_trim(0)`); freed
  NumPy/torch buffers under glibc's mmap threshold otherwise stay resident.
  A no-op elsewhere (musl, macOS, Windows).
- `gb(n)`: bytes as "3.1 GB" (decimal GB, as the messages say).

The engine knows nothing about MCP; the tools map the error like any other
`InvalidInput`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

from .errors import InvalidInput

__all__ = ["MemoryLimitExceeded", "require", "call_limit", "release", "gb", "TRIM_BYTES"]

TRIM_BYTES = 32 * 1024 * 1024
_MIB = 1024 * 1024


class MemoryLimitExceeded(InvalidInput):
    """The call's upper-bound memory estimate is over the per-call limit; nothing was allocated."""

    def __init__(self, argument: str, value: object, need: int, limit: int, what: str) -> None:
        detail = f" ({what})" if what else ""
        super().__init__(argument, value, f"would need {gb(need)}; limit {gb(limit)}{detail}")
        self.need = int(need)
        self.limit = int(limit)


def gb(n: float) -> str:
    g = n / 1e9
    return f"{g:.1f} GB" if g >= 0.1 else f"{g:.3f} GB"


def require(argument: str, value: object, need: int, limit: int | None, what: str = "") -> None:
    """Raise `MemoryLimitExceeded` when `need` bytes is over `limit` (None = unlimited)."""
    if limit is not None and need > limit:
        raise MemoryLimitExceeded(argument, value, need, limit, what)


def call_limit(engine: Any, configured_mb: int = 0) -> int | None:
    """The per-call working-memory limit in bytes (see the module docstring); None when nothing is known."""
    if configured_mb and configured_mb > 0:
        return int(configured_mb) * _MIB
    registry = getattr(engine, "registry", None)
    budget = getattr(registry, "budget_bytes", None)
    if not budget:
        return None
    used = int(getattr(registry, "used_bytes", 0) or 0)
    return max(int(budget) - used, int(budget) // 4)


_libc_lock = threading.Lock()
_libc: Any = None
_libc_tried = False


def _trim_fn() -> Any:
    global _libc, _libc_tried
    with _libc_lock:
        if not _libc_tried:
            _libc_tried = True
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                fn = lib.malloc_trim
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
                _libc = fn
            except (OSError, AttributeError):
                _libc = None
        return _libc


def release(bytes_used: int = TRIM_BYTES) -> bool:
    """Return freed heap memory to the OS after a call that used >= TRIM_BYTES; True if trimmed."""
    if bytes_used < TRIM_BYTES:
        return False
    fn = _trim_fn()
    if fn is None:
        return False
    fn(0)
    return True
