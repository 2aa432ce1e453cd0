"""Custom kernels, each beside its twin, and nothing that imports `mcp`.

- Triton kernels (`topk`, `deltae`, `kv_quant`): one file per kernel with the
  Triton kernel, its launcher and a pure-torch reference of the same
  signature; `_backend.choose` applies the one rule (or the launcher's
  `backend=`) that picks one side.
- Numba kernels for the CPU (`cpu_decode`, `cpu_topk`, `cpu_qmatmul`): each
  entry point runs its compiled kernel by name or its NumPy twin
  (`_numba.dispatch`).
- `registry`: every kernel by name with its twin, input cases and comparison;
  the tests and `benchmarks/gpu_check.py` iterate it.

Process-wide state, on purpose and only this: `_numba.LOCK` (one lock that
serialises Numba kernel calls across threads), `_numba.jit()` and each
module's `_kernels()` (compiled once, cached), `cpu_topk._h2f` and
`cpu_qmatmul`'s (a compiled intrinsic kept in a module global so that Numba
can cache the kernels calling it), Triton's autotuning caches, and the
kernels that other modules add to `registry` with `registry.register`.
Which backend the engine runs is decided by `engine.backends`, not here.
"""
