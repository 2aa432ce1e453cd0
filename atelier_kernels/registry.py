"""Every kernel by name, beside its twin: the one list that tests and `benchmarks/gpu_check.py` iterate.

An entry names a kernel (`kind` "triton": runs on CUDA tensors, or on CPU
tensors under `TRITON_INTERPRET=1`; `kind` "numba": runs on NumPy arrays on
the CPU), how to call it with the fast path forced (`fast`) and how to call
its reference with the same arguments (`twin`), a few input cases including
odd sizes and tails (`cases(device, large)`; `large` gives GPU-sized inputs),
and how two outputs are compared (`check`, raising AssertionError with the
largest difference). Kernels are found by name, never by position.

Adding a kernel: describe it with `Kernel` and call `register(kernel)` from its
module at import (a kernel module under `atelier_kernels/` is imported by `kernels()`,
so its entries are listed without anyone naming it here), or add it to the
lists below. Names are unique; `kernels()` lists the built-in entries first,
then the registered ones in the order they were added. A CPU kernel's `fast`
runs the Numba side (`backend="numba"` or None) and its `twin` the NumPy side
(`backend="numpy"`); a Triton kernel's `fast` passes `backend="triton"` and its
`twin` is the torch reference.

This module only describes kernels; which backend runs in the engine is the
engine's decision (`engine.backends`, made once at start).
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Kind = Literal["triton", "numba"]
Case = tuple[tuple[Any, ...], str]  # (arguments, a label for reports)


@dataclass(frozen=True)
class Kernel:
    name: str
    kind: Kind
    fast: Callable[..., Any]
    twin: Callable[..., Any]
    cases: Callable[[str, bool], Iterable[Case]]
    check: Callable[[Any, Any], None]
    doc: str


def _close(rtol: float, atol: float) -> Callable[[Any, Any], None]:
    def check(got: Any, want: Any) -> None:
        for g, w in zip(_flat(got), _flat(want), strict=True):
            g64, w64 = _np(g).astype(np.float64), _np(w).astype(np.float64)
            assert g64.shape == w64.shape, f"shape {g64.shape} != {w64.shape}"
            finite = np.isfinite(w64)
            assert np.array_equal(np.isfinite(g64), finite), "non-finite entries differ"
            np.testing.assert_allclose(g64[finite], w64[finite], rtol=rtol, atol=atol)
    return check


def _exact(got: Any, want: Any) -> None:
    for g, w in zip(_flat(got), _flat(want), strict=True):
        np.testing.assert_array_equal(_np(g), _np(w))


def _flat(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _np(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 \
        else (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))


def _gen(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# -- Triton kernels --------------------------------------------------------------------------------
def _topk_cases(device: str, large: bool) -> Iterator[Case]:
    shapes = [(1, 1, 1), (3, 7, 7), (5, 1031, 17), (2, 4097, 8)]
    if large:
        shapes += [(64, 100_003, 10), (1, 1_000_000, 100)]
    for i, (rows, n, k) in enumerate(shapes):
        x = torch.randn(rows, n, generator=_gen(i, device), device=device)
        x[:, ::5] = x[:, :1].clone()  # ties
        yield (x, k), f"{rows}x{n} k={k}"


# sRGB pairs whose CIEDE2000 hues are within 1e-6 rad of 180° apart, where the formula jumps (module docstring of
# atelier_kernels.deltae): the first came out 57.11 instead of 78.78 from the kernel on an H200, the others from a
# float64 scan of all 2^24 colours against 80 random ones (3.7e-10 to 7e-8 rad from the tie); inputs only, the
# tests take the expected values from scikit-image.
HUE_TIE_PAIRS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((161, 62, 234), (165, 212, 146)), ((214, 127, 156), (74, 255, 225)), ((31, 185, 25), (149, 49, 206)),
    ((65, 202, 58), (154, 59, 201)), ((103, 50, 105), (5, 40, 13)), ((121, 34, 228), (69, 171, 10)),
    ((98, 32, 181), (124, 198, 83)), ((84, 105, 76), (153, 74, 205)), ((116, 162, 29), (101, 91, 202)),
    ((236, 200, 71), (37, 160, 254)), ((131, 6, 189), (22, 226, 33)), ((140, 178, 44), (146, 140, 243)),
    ((250, 22, 130), (96, 204, 187)), ((250, 22, 130), (21, 244, 219)), ((201, 214, 118), (121, 131, 216)),
    ((65, 202, 58), (236, 209, 246)), ((15, 224, 151), (255, 45, 202)), ((31, 218, 12), (227, 198, 241)),
    ((185, 139, 213), (53, 248, 3)), ((192, 23, 230), (151, 211, 149)), ((191, 197, 53), (11, 99, 203)),
    ((251, 17, 151), (46, 245, 205)), ((70, 226, 87), (121, 5, 151)), ((79, 212, 47), (93, 54, 120)),
    ((79, 212, 47), (152, 25, 242)), ((31, 185, 25), (121, 6, 180)), ((115, 226, 213), (253, 27, 122)),
    ((107, 206, 89), (174, 37, 248)), ((185, 210, 242), (233, 219, 196)), ((127, 140, 252), (229, 240, 164)),
    ((198, 212, 180), (49, 28, 121)), ((34, 80, 142), (169, 162, 16)), ((197, 213, 140), (0, 56, 169)),
    ((31, 218, 12), (163, 63, 226)), ((36, 231, 164), (155, 55, 121)), ((84, 105, 76), (130, 72, 167)),
    ((183, 241, 109), (168, 158, 187)), ((124, 53, 121), (41, 146, 78)), ((135, 81, 160), (19, 229, 36)),
    ((185, 139, 213), (103, 189, 78)), ((15, 246, 36), (156, 43, 213)),
)


def _deltae_cases(device: str, large: bool) -> Iterator[Case]:
    sizes = [1, 7, 1000, 4099] + ([8_000_000] if large else [])
    for i, n in enumerate(sizes):
        g = _gen(100 + i, device)
        a = torch.randint(0, 256, (n, 3), generator=g, device=device, dtype=torch.uint8)
        b = torch.randint(0, 256, (n, 3), generator=g, device=device, dtype=torch.uint8)
        yield (a, b), f"N={n}"
    # the hue ties, both ways round, scattered among 3000 random pairs
    g = _gen(150, device)
    a = torch.randint(0, 256, (3000, 3), generator=g, device=device, dtype=torch.uint8)
    b = torch.randint(0, 256, (3000, 3), generator=g, device=device, dtype=torch.uint8)
    t1 = torch.tensor([p[0] for p in HUE_TIE_PAIRS] + [p[1] for p in HUE_TIE_PAIRS], dtype=torch.uint8)
    t2 = torch.tensor([p[1] for p in HUE_TIE_PAIRS] + [p[0] for p in HUE_TIE_PAIRS], dtype=torch.uint8)
    at = torch.randperm(3000, generator=_gen(151, "cpu"))[:len(t1)].to(device)
    a[at], b[at] = t1.to(device), t2.to(device)
    yield (a, b), f"N=3000 with {len(t1)} hue ties"


def _kvq_cases(device: str, large: bool) -> Iterator[Case]:
    shapes = [(7, 3, 50), (1, 1, 13), (2, 3, 17, 64)] + ([(32, 8, 4096, 128)] if large else [])
    for i, s in enumerate(shapes):
        yield (torch.randn(s, generator=_gen(200 + i, device), device=device) * 3,), "x".join(map(str, s))


def _kvdq_cases(device: str, large: bool) -> Iterator[Case]:
    from .kv_quant import quantize_reference

    for (x,), label in _kvq_cases(device, large):
        q, s = quantize_reference(x)
        yield (q, s, torch.float32), label


def _kvq_check(got: Any, want: Any) -> None:
    (qg, sg), (qw, sw) = got, want
    np.testing.assert_allclose(_np(sg), _np(sw), rtol=1e-6, atol=0)
    # x / scale rounds the same way up to one step where fp32 division differs in the last bit
    assert np.abs(_np(qg).astype(int) - _np(qw).astype(int)).max(initial=0) <= 1


def _triton_entries() -> list[Kernel]:
    from . import deltae, kv_quant, topk

    return [
        Kernel("topk", "triton", lambda x, k: topk.topk(x, k, backend="triton"),
               lambda x, k: topk.topk_reference(x, k), _topk_cases, _exact,
               "row-wise top-k, (value desc, index asc) order"),
        Kernel("deltae2000_rgb8", "triton", lambda a, b: deltae.deltae2000_rgb8(a, b, backend="triton"),
               lambda a, b: deltae.deltae2000_rgb8_reference(a, b), _deltae_cases, _close(1e-4, 1e-4),
               "fused sRGB8 -> Lab -> CIEDE2000"),
        Kernel("kv_quantize", "triton", lambda x: kv_quant.quantize(x, backend="triton"),
               lambda x: kv_quant.quantize_reference(x), _kvq_cases, _kvq_check,
               "per-row absmax int8 quantisation of K/V"),
        Kernel("kv_dequantize", "triton", lambda q, s, dt: kv_quant.dequantize(q, s, dt, backend="triton"),
               lambda q, s, dt: kv_quant.dequantize_reference(q, s, dt), _kvdq_cases, _close(1e-6, 1e-6),
               "int8 K/V back to float"),
    ]


# -- Numba kernels (CPU) ---------------------------------------------------------------------------
def _rows_matmul_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(0)
    for m, n, k in [(1, 1, 1), (3, 7, 13), (5, 129, 64), (8, 960, 576)]:
        yield (rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)), \
            f"{m}x{k} @ {n}x{k}"


def _attend_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(1)
    for rows, heads, kvh, length, hd in [(1, 2, 1, 1, 4), (3, 9, 3, 37, 64), (5, 4, 2, 130, 16)]:
        q = rng.standard_normal((rows, heads, hd), dtype=np.float32)
        K = rng.standard_normal((rows, kvh, length, hd), dtype=np.float32)
        V = rng.standard_normal((rows, kvh, length, hd), dtype=np.float32)
        pos = rng.integers(0, length, rows)
        yield (q, K, V, np.arange(rows)[::-1].copy(), pos, 1.0 / np.sqrt(hd)), f"{rows} rows, L={length}"


def _attend_q8_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(5)
    # (rows, heads, kv heads, length, ring, head dim): rows shorter than the ring (ring only), longer (int8 then
    # ring), and rows of one slot checked causally before its end (row_end past row_pos + 1)
    for rows, heads, kvh, length, ring, hd, causal in [(1, 2, 1, 3, 4, 4, False), (4, 9, 3, 70, 16, 64, False),
                                                       (5, 4, 2, 40, 8, 16, True)]:
        slots = 1 if causal else rows
        q = rng.standard_normal((rows, heads, hd), dtype=np.float32)
        QK, QV = (rng.integers(-127, 128, (slots, kvh, length, hd)).astype(np.int8) for _ in range(2))
        SK, SV = (rng.uniform(0.001, 0.05, (slots, kvh, length)).astype(np.float32) for _ in range(2))
        RK, RV = (rng.standard_normal((slots, kvh, ring, hd), dtype=np.float32) for _ in range(2))
        if causal:  # rows are positions end-5 .. end-1 of slot 0
            pos = np.arange(length - rows, length)
            slot, end = np.zeros(rows, np.int64), np.full(rows, length)
        else:
            pos = rng.integers(0, length, rows)
            pos[0] = min(ring - 2, length - 1)  # a row that fits in its ring
            slot, end = np.arange(rows)[::-1].copy(), pos + 1
        yield (q, QK, SK, QV, SV, RK, RV, slot, pos, end, 1.0 / np.sqrt(hd)), \
            f"{rows} rows, L={length}, ring {ring}{', causal' if causal else ''}"


def _half_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(2)
    for m, n, k in [(1, 1, 1), (2, 33, 17), (7, 300, 384)]:
        w = rng.standard_normal((n, k)).astype(np.float16)
        w[0, 0] = np.float16(6e-8)  # a subnormal
        yield (rng.standard_normal((m, k), dtype=np.float32), w), f"{m} x {n}x{k} fp16"


def _dots64_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(3)
    for n, d, r in [(1, 1, 1), (50, 7, 9), (1000, 384, 100)]:
        yield (rng.standard_normal((n, d), dtype=np.float32), rng.integers(0, n, r), rng.standard_normal(d)), \
            f"{r} of {n}x{d}"


def _gather_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(6)
    for n, d, r, dt in [(1, 1, 1, np.float32), (50, 7, 9, np.float32), (1000, 384, 300, np.float32),
                        (40, 33, 17, np.float16), (1000, 384, 300, np.float16)]:
        m = rng.standard_normal((n, d)).astype(dt)
        yield (m, rng.integers(0, n, r), rng.standard_normal(d, dtype=np.float32)), \
            f"{r} of {n}x{d} {np.dtype(dt).name}"


def _filter_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(4)
    for B, c, K in [(1, 1, 1), (3, 37, 5), (4, 2000, 10)]:
        approx = rng.standard_normal((B, c), dtype=np.float32)
        approx[:, ::7] = -np.inf  # rows a query must not return
        yield (approx, np.abs(rng.standard_normal(c, dtype=np.float32)) * 0.1, K), f"B={B} c={c} K={K}"


def _filter_call(backend: str | None) -> Callable[..., Any]:
    from . import cpu_topk

    def run(approx: np.ndarray, bound: np.ndarray, K: int) -> tuple[np.ndarray, ...]:
        B, c = approx.shape
        heap, count = np.empty((B, K), np.float32), np.zeros(B, np.int64)
        up, rows, n = np.empty((B, c), np.float32), np.empty((B, c), np.int64), np.empty(B, np.int64)
        halves = (slice(0, c // 2), slice(c // 2, c))  # two blocks: the heap carries over
        outs = []
        for h in halves:
            cpu_topk.filter_rows(np.ascontiguousarray(approx[:, h]), bound[h], heap, count, up, rows, n,
                                 backend=backend)
            outs += [n.copy()] + [np.concatenate([rows[b, :n[b]] for b in range(B)]),
                                  np.concatenate([up[b, :n[b]] for b in range(B)])]
        return (*outs, count.copy(), np.sort(heap, axis=1))
    return run


def _refine_cases(device: str, large: bool) -> Iterator[Case]:
    rng = np.random.default_rng(5)
    for n, d, B, kk in [(1, 1, 1, 1), (300, 17, 3, 5), (5000, 64, 2, 20)]:
        matrix = rng.standard_normal((n, d), dtype=np.float32)
        matrix[1 % n] = matrix[0]  # equal rows tie exactly
        q = rng.standard_normal((B, d))
        rows, ups, offsets = [], [], [0]
        for b in range(B):
            r = rng.choice(n, size=max(1, n // 2), replace=False)
            exact = matrix[r].astype(np.float64) @ q[b]
            rows.append(r)
            ups.append((exact + np.abs(rng.standard_normal(r.size)) * 0.05).astype(np.float32))
            offsets.append(offsets[-1] + r.size)
        yield (matrix, q, np.concatenate(rows).astype(np.int64), np.concatenate(ups), np.array(offsets), kk), \
            f"n={n} d={d} B={B} k={kk}"


def _refine_call(backend: str | None) -> Callable[..., Any]:
    from . import cpu_topk

    def run(matrix: np.ndarray, q: np.ndarray, rows: np.ndarray, ups: np.ndarray, offsets: np.ndarray,
            kk: int) -> tuple[np.ndarray, np.ndarray]:
        vals, out_rows = np.full((q.shape[0], kk), -np.inf), np.zeros((q.shape[0], kk), np.int64)
        cpu_topk.refine(matrix, q, rows, ups, offsets, vals, out_rows, backend=backend)
        return vals, out_rows
    return run


def _numba_entries() -> list[Kernel]:
    from . import cpu_decode, cpu_topk

    return [
        Kernel("rows_matmul", "numba", lambda x, w: cpu_decode.rows_matmul(x, w),
               lambda x, w: cpu_decode.rows_matmul(x, w, backend="numpy"), _rows_matmul_cases,
               _close(1e-4, 1e-4), "few-row fp32 weight product, each weight row read once"),
        Kernel("attend", "numba", lambda *a: cpu_decode.attend(*a),
               lambda *a: cpu_decode.attend(*a, backend="numpy"), _attend_cases, _close(1e-4, 1e-5),
               "per-row attention over its own slot's length"),
        Kernel("attend_q8", "numba", lambda *a: cpu_decode.attend_q8(*a),
               lambda *a: cpu_decode.attend_q8(*a, backend="numpy"), _attend_q8_cases, _close(1e-4, 1e-5),
               "per-row attention over the int8 cache: int8 rows x scale, then the fp32 ring"),
        Kernel("filter_rows", "numba", _filter_call(None), _filter_call("numpy"), _filter_cases, _exact,
               "sketch filter: running K-best lower bounds, survivors by upper bound"),
        Kernel("refine", "numba", _refine_call(None), _refine_call("numpy"), _refine_cases, _close(1e-12, 1e-12),
               "exact float64 top-k from the survivors, in order of upper bound"),
        Kernel("half_scores", "numba", lambda x, w: cpu_topk.half_scores(x, w),
               lambda x, w: cpu_topk.half_scores(x, w, backend="numpy"), _half_cases, _close(1e-4, 1e-4),
               "fp32 queries against fp16 rows widened in cache"),
        Kernel("dots64", "numba", lambda m, r, q: cpu_topk.dots64(m, r, q),
               lambda m, r, q: cpu_topk.dots64(m, r, q, backend="numpy"), _dots64_cases, _close(1e-12, 1e-12),
               "float64 rescoring of selected rows"),
        Kernel("gather_scores", "numba", lambda m, r, q: cpu_topk.gather_scores(m, r, q),
               lambda m, r, q: cpu_topk.gather_scores(m, r, q, backend="numpy"), _gather_cases, _close(1e-4, 1e-4),
               "one query against a filter's rows where they lie (fp32 or fp16), with |x||q| sums"),
    ]


_REGISTERED: dict[str, Kernel] = {}  # name -> entry, added by `register` (kernel modules at import)
_REG_LOCK = threading.Lock()
KINDS = ("triton", "numba")


def register(kernel: Kernel) -> Kernel:
    """Add `kernel` to the registry (call it at import from the kernel's module); returns it. A name already
    built in is refused (ValueError); registering a name again replaces the entry (a module reloaded)."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel={kernel!r}: expected a registry.Kernel")
    if kernel.kind not in KINDS:
        raise ValueError(f"kernel.kind={kernel.kind!r}: expected one of {', '.join(KINDS)}")
    if not kernel.name or kernel.name in {k.name for k in _builtin()}:
        raise ValueError(f"kernel.name={kernel.name!r}: empty or already a built-in entry")
    with _REG_LOCK:
        _REGISTERED[kernel.name] = kernel
    return kernel


def _builtin() -> list[Kernel]:
    return [*_triton_entries(), *_numba_entries()]


def _import_kernel_modules() -> None:
    """Import every module of the `kernels` package, so that the entries they `register` are listed."""
    import atelier_kernels as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "registry":
            importlib.import_module(f"atelier_kernels.{mod.name}")


def kernels(kind: Kind | None = None) -> list[Kernel]:
    """All registered kernels (of one kind): the built-in entries, then those added by `register`."""
    _import_kernel_modules()
    with _REG_LOCK:
        extra = list(_REGISTERED.values())
    out = [*_builtin(), *extra]
    return [k for k in out if kind is None or k.kind == kind]


def get(name: str) -> Kernel:
    for k in kernels():
        if k.name == name:
            return k
    raise KeyError(f"no kernel named {name!r}; registered: {', '.join(k.name for k in kernels())}")
