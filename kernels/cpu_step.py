"""One decode step of a Llama-family decoder in a single Numba call, on Q8 activations (issue 13).

    layers_out = step_q8(x, tables..., caches..., rows...)     # every layer, no Python in between

`engine.llm.npstep.NumpyStep` runs a step layer by layer from Python: per layer
about 25 NumPy operations and 8 kernel calls, ~8 ms of a 23.5 ms step on
SmolLM2 (30 layers) with Q8 activations, where llama.cpp's whole step is
13.8 ms. This kernel runs the same layers inside one compiled function:
RMSNorm, the Q8 products (`cpu_qmatmul`'s `quantize_rows` and `q8a_matmul`
kernels, called from here), the optional biases, RoPE on the interleaved pairs,
the K/V writes into the full cache, the attention (`cpu_decode`'s `attend`
kernel), the output projection, SwiGLU and the residuals. Its twin is
NumpyStep's own path (the same products and attention kernels; the norms,
RoPE and SiLU there are NumPy expressions, summed in another order), which the
tests compare it with.

What it serves (`supports` in `engine.llm.npstep`): Llama/Qwen2 layers (RMSNorm,
RoPE, SwiGLU) whose four products are each one Q4_0/Q4_1/Q8_0 matrix with Q8
activations, a full KV cache on the CPU, Numba and AVX2. Anything else takes the
layer-by-layer path.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

from . import cpu_decode, cpu_qmatmul
from ._numba import jit

_quant = _q8a = _attend = product = rmsnorm = None  # set by _kernels(): module globals, as a closure variable
# (even a jitted function) would keep Numba's on-disk cache from ever matching (see cpu_qmatmul._kernels)


def _drop_stale_cache() -> None:
    """Numba's on-disk cache of this module's kernels is keyed on this file alone, but they compile in the
    kernels they call from cpu_qmatmul, cpu_decode and _numba: cached entries older than any of those files
    are removed, so a changed callee is compiled in again (the cache beside the sources; a cache elsewhere,
    NUMBA_CACHE_DIR, is not checked)."""
    here = Path(__file__)
    with contextlib.suppress(OSError):
        newest = max(here.with_name(f).stat().st_mtime for f in ("cpu_qmatmul.py", "cpu_decode.py", "_numba.py"))
        for f in (here.parent / "__pycache__").glob(f"{here.stem}.*.nb[ic]"):
            if f.stat().st_mtime < newest:
                f.unlink(missing_ok=True)


@functools.cache
def _kernels() -> dict | None:
    if jit() is None or not cpu_qmatmul.q8_available():
        return None
    _drop_stale_cache()
    # the cached step calls parallel kernels: their scheduler symbols (allocate_sched, ...) must be known to
    # LLVM before the cached code is linked, or loading it aborts the process ("Symbol not found"); they are
    # registered when Numba's threading layer starts, which a fresh process has not done yet
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()
    njit, _prange = jit()  # type: ignore[misc]
    global _quant, _q8a, _attend, product, rmsnorm
    qk = cpu_qmatmul._kernels()
    _quant, _q8a = qk["quantize_rows"], qk["q8a_matmul"]
    _attend = cpu_decode._kernels()["attend"]

    @njit(cache=True, nogil=True)
    def product(x, qs, d, m, kind, bias, out):  # pragma: no cover - compiled
        R, K = x.shape
        nb = K // 32
        xq = np.empty(R * K, np.int8)
        dx = np.empty((R, nb), np.float32)
        xs = np.empty((R, nb), np.float32)
        _quant(x, xq, dx, xs)
        _q8a(xq, dx, xs, qs, d, m, kind, out)
        if bias.shape[0]:
            for r in range(R):
                for n in range(out.shape[1]):
                    out[r, n] += bias[n]

    @njit(cache=True, nogil=True)
    def rmsnorm(x, w, eps, out):  # pragma: no cover - compiled
        R, D = x.shape
        for r in range(R):
            ss = np.float32(0.0)
            for i in range(D):
                ss += x[r, i] * x[r, i]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + eps)
            for i in range(D):
                out[r, i] = x[r, i] * inv * w[i]

    @njit(cache=True, nogil=True)
    def step_nb(x, ln1, ln2, qkv_qs, qkv_d, qkv_m, qkv_b, wo_qs, wo_d, wo_m, wo_b, w13_qs, w13_d, w13_m, w13_b,
                w2_qs, w2_d, w2_m, w2_b, kinds, K, V, cos, sin, row_slot, row_pos, H, KVH, hd, inter, eps,
                scale):  # pragma: no cover - compiled
        R, D = x.shape
        L = kinds.shape[0]
        nq, nk = H * hd, KVH * hd
        half = hd // 2
        h = np.empty((R, D), np.float32)
        qkv = np.empty((R, nq + 2 * nk), np.float32)
        q = np.empty((R, H, hd), np.float32)
        att = np.empty((R, H, hd), np.float32)
        o = np.empty((R, D), np.float32)
        gu = np.empty((R, 2 * inter), np.float32)
        act = np.empty((R, inter), np.float32)
        for layer in range(L):
            rmsnorm(x, ln1[layer], eps, h)
            product(h, qkv_qs[layer], qkv_d[layer], qkv_m[layer], kinds[layer, 0], qkv_b[layer], qkv)
            Kl = K[layer]
            Vl = V[layer]
            for r in range(R):
                p = row_pos[r]
                s = row_slot[r]
                for hh in range(H):  # RoPE on the pairs (2j, 2j + 1)
                    base = hh * hd
                    for j in range(half):
                        x0 = qkv[r, base + 2 * j]
                        x1 = qkv[r, base + 2 * j + 1]
                        q[r, hh, 2 * j] = x0 * cos[p, j] - x1 * sin[p, j]
                        q[r, hh, 2 * j + 1] = x0 * sin[p, j] + x1 * cos[p, j]
                for hh in range(KVH):
                    base = nq + hh * hd
                    for j in range(half):
                        x0 = qkv[r, base + 2 * j]
                        x1 = qkv[r, base + 2 * j + 1]
                        Kl[s, hh, p, 2 * j] = x0 * cos[p, j] - x1 * sin[p, j]
                        Kl[s, hh, p, 2 * j + 1] = x0 * sin[p, j] + x1 * cos[p, j]
                    for i in range(hd):
                        Vl[s, hh, p, i] = qkv[r, nq + nk + hh * hd + i]
            _attend(q, Kl, Vl, row_slot, row_pos, scale, att)
            product(att.reshape(R, nq), wo_qs[layer], wo_d[layer], wo_m[layer], kinds[layer, 1], wo_b[layer], o)
            for r in range(R):
                for i in range(D):
                    x[r, i] += o[r, i]
            rmsnorm(x, ln2[layer], eps, h)
            product(h, w13_qs[layer], w13_d[layer], w13_m[layer], kinds[layer, 2], w13_b[layer], gu)
            for r in range(R):
                for i in range(inter):
                    g = gu[r, i]
                    act[r, i] = g / (np.float32(1.0) + np.exp(-g)) * gu[r, inter + i]
            product(act, w2_qs[layer], w2_d[layer], w2_m[layer], kinds[layer, 3], w2_b[layer], o)
            for r in range(R):
                for i in range(D):
                    x[r, i] += o[r, i]

    return {"step_q8": step_nb}


def available() -> bool:
    """Whether the fused step runs here (Numba and the AVX2 Q8 kernels)."""
    return _kernels() is not None


KIND = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}


class Q8Layers:
    """The per-layer arrays `step_q8` reads, gathered once (views of the model's packed arrays: no copy)."""

    def __init__(self, layers: list[tuple], eps: float) -> None:
        from numba.typed import List

        def lst(items: list[np.ndarray]) -> List:
            out = List()
            for a in items:
                out.append(a)
            return out

        empty = np.zeros(0, np.float32)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ln1", "ln2")}
        kinds = []
        for ln1, ln2, lins in layers:
            cols["ln1"].append(np.ascontiguousarray(ln1, np.float32))
            cols["ln2"].append(np.ascontiguousarray(ln2, np.float32))
            row = []
            for name, lin in zip(("qkv", "wo", "w13", "w2"), lins):
                p = lin.parts[0]
                cols.setdefault(f"{name}_qs", []).append(p.qs.reshape(-1).view(np.uint8))
                cols.setdefault(f"{name}_d", []).append(p.d)
                cols.setdefault(f"{name}_m", []).append(p.m if p.m is not None else p.d)
                b = lin.bias
                cols.setdefault(f"{name}_b", []).append(empty if b is None else b.detach().numpy())
                row.append(KIND[p.fmt])
            kinds.append(row)
        self.lists = {k: lst(v) for k, v in cols.items()}
        self.kinds = np.asarray(kinds, np.int64)
        self.eps = np.float32(eps)


def step_q8(layers: Q8Layers, x: np.ndarray, K: np.ndarray, V: np.ndarray, cos: np.ndarray, sin: np.ndarray,
            row_slot: np.ndarray, row_pos: np.ndarray, H: int, KVH: int, hd: int, inter: int, scale: float
            ) -> np.ndarray:
    """Run every layer on x [R, D] (changed in place and returned): rows are (slot, position) pairs whose K/V
    are written into K, V [layers, slots, KVH, L, hd] (the full cache) before each layer's attention."""
    from ._numba import LOCK

    fn = _kernels()["step_q8"]  # type: ignore[index]
    t = layers.lists
    x = np.ascontiguousarray(x, dtype=np.float32)
    with LOCK:
        fn(x, t["ln1"], t["ln2"], t["qkv_qs"], t["qkv_d"], t["qkv_m"], t["qkv_b"], t["wo_qs"], t["wo_d"], t["wo_m"],
           t["wo_b"], t["w13_qs"], t["w13_d"], t["w13_m"], t["w13_b"], t["w2_qs"], t["w2_d"], t["w2_m"], t["w2_b"],
           layers.kinds, K, V, cos, sin, np.asarray(row_slot, np.int64), np.asarray(row_pos, np.int64), H, KVH, hd,
           inter, layers.eps, np.float32(scale))
    return x


def warm() -> list[str]:
    """Compile the fused step once with the argument types the engine passes (one tiny Q4_1 layer and one
    Q8_0 layer); Numba's on-disk cache keeps it. Returns its name, or nothing where it does not run."""
    if not available():
        return []
    from types import SimpleNamespace

    D, hd, inter = 32, 32, 32

    def lin(fmt: str, n: int, k: int) -> SimpleNamespace:
        width = 32 if fmt == "Q8_0" else 16
        dt = np.int8 if fmt == "Q8_0" else np.uint8
        d = np.full((n, k // 32), 0x2000, np.uint16)
        part = SimpleNamespace(fmt=fmt, qs=np.zeros((n, k // 32, width), dt), d=d, m=None if fmt == "Q8_0" else d)
        return SimpleNamespace(parts=[part], bias=None)

    layers = [(np.ones(D, np.float32), np.ones(D, np.float32),
               (lin(f, 3 * hd, D), lin(f, D, hd), lin(f, 2 * inter, D), lin(f, D, inter))) for f in ("Q4_1", "Q8_0")]
    K = np.zeros((2, 1, 1, 4, hd), np.float32)
    step_q8(Q8Layers(layers, 1e-5), np.ones((1, D), np.float32), K, K.copy(), np.ones((4, hd // 2), np.float32),
            np.zeros((4, hd // 2), np.float32), np.array([0]), np.array([0]), 1, 1, hd, inter, 0.5)
    return ["step_q8"]
