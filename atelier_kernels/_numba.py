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
# IQ4_NL's 16 signed values (ggml's kvalues_iq4nl): a block's value j is d x IQ4NL_VALUES[nibble j]
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


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


def drop_stale_cache(module_file: str, deps: tuple[str, ...]) -> None:
    """Numba's on-disk cache of a module's kernels is keyed on that file alone, but they compile in code from
    other files of this package (this one's intrinsics, other modules' kernels): cached entries older than any
    of `deps` (file names beside module_file) are removed, so a changed callee is compiled in again. Only the
    cache beside the sources is checked (not one under NUMBA_CACHE_DIR)."""
    import contextlib
    from pathlib import Path

    here = Path(module_file)
    with contextlib.suppress(OSError):
        newest = max(here.with_name(f).stat().st_mtime for f in deps)
        for f in (here.parent / "__pycache__").glob(f"{here.stem}.*.nb[ic]"):
            if f.stat().st_mtime < newest:
                f.unlink(missing_ok=True)


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


@functools.cache
def _target_features() -> frozenset[str]:
    """The CPU features Numba compiles for, as its codegen takes them: those named in NUMBA_CPU_FEATURES where
    it is set, else LLVM's host features. Empty where llvmlite cannot tell."""
    try:
        from numba.core import config

        if config.CPU_FEATURES is not None:
            return frozenset(f[1:] for f in (config.CPU_FEATURES or "").split(",") if f.startswith("+"))
        import llvmlite.binding as llvm

        return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)
    except Exception:  # no llvmlite, or it cannot read the features
        return frozenset()


def has_avx2() -> bool:
    """Whether the CPU Numba compiles for has AVX2 (`_target_features`): the Q8-activation products use its
    byte and word multiply-adds (`q8_row_dot_intrinsic`)."""
    return "avx2" in _target_features()


def has_vnni() -> bool:
    """Whether the CPU Numba compiles for has a 256-bit `vpdpbusd` (AVX512-VNNI with AVX512-VL, or AVX-VNNI):
    the Q8 products' byte dot (`_q8_rows_codegen`) is then one instruction instead of two (the same integers).
    Numba's on-disk cache keys compiled code by the CPU's features, so a cache from another CPU is not
    reused."""
    f = _target_features()
    return "avx2" in f and ("avxvnni" in f or {"avx512vnni", "avx512vl"} <= f)


def _emit_prefetch(builder: Any, ptr: Any, locality: int = 3) -> None:  # pragma: no cover - compiled
    """LLVM code asking for the cache line at ptr (a read): a hint, no fault. locality 3 = into every level
    (`prefetcht0`), 2 = into L2 and below (`prefetcht1`)."""
    from llvmlite import ir

    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = builder.module.declare_intrinsic("llvm.prefetch.p0", fnty=ir.FunctionType(ir.VoidType(),
                                                                                 [i8p, i32, i32, i32]))
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality),
                      ir.Constant(i32, 1)])


@functools.cache
def stream_prefetch() -> tuple[int, int, int]:
    """How the Q8 products prefetch the weights' stream on this CPU: (locality, tiles of 4 weight rows ahead
    for one row of activations, weight rows ahead for tiles of rows). Measured per CPU: on an AMD Zen 4,
    `prefetcht0` (into L1, bounded by its ~two dozen outstanding misses) streamed a Q8_0 matrix from memory
    at 6 GB/s per core and `prefetcht1` (into L2) 8 tiles ahead at 16-17 GB/s; on an Intel Xeon (Sapphire
    Rapids) `prefetcht0` 2 tiles / 2 rows ahead was as good as any distance tried (1-8); on an AMD Zen 1
    (family 23; 2 vCPUs) `prefetchnta` 1 tile ahead streamed the Q8_0 output head (49152 x 576) at 12.5 GB/s
    where the Zen 4 setting reached 10.2 (2.26 vs 2.78 ms, 3 alternating rounds), the Q4_1 layers' shapes
    within 3 %, and SmolLM2's decode step took 12.4 ms instead of 13.5."""
    return prefetch_for(*_cpu_id())


def prefetch_for(vendor: str, family: int) -> tuple[int, int, int]:
    """`stream_prefetch`'s choice for a CPU of this vendor_id and family (/proc/cpuinfo's fields)."""
    if vendor == "GenuineIntel":
        return 3, 2, 2
    if vendor == "AuthenticAMD" and family == 23:  # Zen 1 / Zen+ / Zen 2
        return 0, 1, 16
    return 2, 8, 16


def _cpu_id(path: str = "/proc/cpuinfo") -> tuple[str, int]:
    """(vendor_id, cpu family) of the first processor in /proc/cpuinfo; ("", 0) where it cannot be read."""
    vendor, family = "", 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("cpu family") and not family:
                    family = int(line.split(":", 1)[1].strip() or 0)
                if vendor and family:
                    break
    except (OSError, ValueError):
        pass
    return vendor, family


def _ggml_reduce4(builder: Any, a0: Any, a1: Any, a2: Any, a3: Any) -> Any:  # pragma: no cover - compiled
    """GGML_F32x8_REDUCE of four 8-lane accumulators, in its order: (0 + 2) + (1 + 3), the halves added,
    then (0 + 1) + (2 + 3) -> one float."""
    from llvmlite import ir

    i32 = ir.IntType(32)
    s = builder.fadd(builder.fadd(a0, a2), builder.fadd(a1, a3))
    t = builder.fadd(builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(i32, 4), [0, 1, 2, 3])),
                     builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(i32, 4), [4, 5, 6, 7])))
    e = [builder.extract_element(t, ir.Constant(i32, k)) for k in range(4)]
    return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))


def _lane_sum(builder: Any, v: Any, add: Callable) -> Any:  # pragma: no cover - compiled
    """The lanes of v (8 or 4) summed as ggml's hsum_float_8 (and its 4-lane tail) does: the high half added to
    the low one until one lane is left, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) for 8. add:
    builder.fadd, or builder.add for integer lanes (exact in any order)."""
    from llvmlite import ir

    i32 = ir.IntType(32)
    width = v.type.count
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, width), list(range(width, 2 * width))))
        v = add(lo, hi)
    return builder.extract_element(v, ir.Constant(i32, 0))


def _splat(builder: Any, x: Any, width: int) -> Any:  # pragma: no cover - compiled
    """The scalar x in every one of `width` lanes (an insert, then a zero shuffle: LLVM's broadcast)."""
    from llvmlite import ir

    vty = ir.VectorType(x.type, width)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), _mask(width, [0] * width))


def _halves8(builder: Any, ptr: Any, off: Any) -> Any:  # pragma: no cover - compiled
    """8 consecutive fp16 values (uint16 bits) at ptr[off] as 8 float lanes (one conversion)."""
    from llvmlite import ir

    p = builder.bitcast(builder.gep(ptr, [off]), ir.VectorType(ir.IntType(16), 8).as_pointer())
    return builder.fpext(builder.bitcast(builder.load(p, align=2), ir.VectorType(ir.HalfType(), 8)),
                         ir.VectorType(ir.FloatType(), 8))


def _q41x8_codegen(n: int, vnni: bool) -> Any:  # pragma: no cover - compiled
    """The LLVM code of `q41x8_tile_intrinsic` (n rows of activations; see there)."""
    from llvmlite import ir
    from numba.core import cgutils

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    v32i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i16, 16)
    v8i32, v8f32 = ir.VectorType(i32, 8), ir.VectorType(f32, 8)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        def data(i: int) -> Any:
            return context.make_array(signature.args[i])(context, builder, args[i]).data

        wa, wo, da, do, xa = data(0), args[1], data(2), args[3], data(4)
        xoffs = args[5:5 + n]
        dxa, dxoffs = data(5 + n), args[6 + n:6 + 2 * n]
        ma, xsa, nb = data(6 + 2 * n), data(7 + 2 * n), args[8 + 2 * n]
        intp = nb.type
        mod = builder.module
        maddubs, maddwd, _, _, fma, _ = _x86_intrinsics(mod)
        dpbusd = mod.declare_intrinsic("llvm.x86.avx512.vpdpbusd.256",
                                       fnty=ir.FunctionType(v8i32, [v8i32, v8i32, v8i32])) if vnni else None
        zero = ir.Constant(v8i32, [0] * 8)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(n)]

        def dot4(acc: Any, w: Any, x4: Any) -> Any:  # acc + lane t's four unsigned w bytes . the four x bytes
            if vnni:
                return builder.call(dpbusd, [acc, builder.bitcast(w, v8i32), x4])
            p = builder.call(maddwd, [builder.call(maddubs, [w, builder.bitcast(x4, v32i8)]),
                                      ir.Constant(v16i16, [1] * 16)])
            return builder.add(acc, p)

        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            base = builder.add(wo, builder.mul(b, ir.Constant(intp, 128)))
            wk = [None] * 8
            for c in range(4):  # chunk c: lane t = bytes 4c .. 4c + 3 of weight row t's block: values 4c.. (low
                # nibbles) and 16 + 4c.. (high nibbles)
                p = builder.gep(wa, [builder.add(base, ir.Constant(intp, 32 * c))])
                ch = builder.load(builder.bitcast(p, v32i8.as_pointer()), align=1)
                wk[c] = builder.and_(ch, ir.Constant(v32i8, [15] * 32))
                hi = builder.bitcast(builder.lshr(builder.bitcast(ch, v16i16), ir.Constant(v16i16, [4] * 16)), v32i8)
                wk[c + 4] = builder.and_(hi, ir.Constant(v32i8, [15] * 32))
            sb = builder.add(do, builder.mul(b, ir.Constant(intp, 8)))
            d8, m8 = _halves8(builder, da, sb), _halves8(builder, ma, sb)
            for j in range(n):
                xb = builder.bitcast(builder.gep(xa, [builder.add(xoffs[j], builder.mul(b, ir.Constant(intp, 32)))]),
                                     i32.as_pointer())
                # wk[k] pairs with the activations' bytes 4k .. 4k + 3 (values 4k.. for k < 4, 16 + 4(k - 4)..)
                xk = [_splat(builder, builder.load(builder.gep(xb, [ir.Constant(i32, k)]), align=1), 8)
                      for k in range(8)]
                i0 = dot4(zero, wk[0], xk[0])
                i1 = dot4(zero, wk[1], xk[1])
                for k in range(2, 8, 2):
                    i0 = dot4(i0, wk[k], xk[k])
                    i1 = dot4(i1, wk[k + 1], xk[k + 1])
                f = builder.sitofp(builder.add(i0, i1), v8f32)  # the block's integer dots, exact in fp32
                dxv = builder.load(builder.gep(dxa, [builder.add(dxoffs[j], b)]))
                xsv = builder.load(builder.gep(xsa, [builder.add(dxoffs[j], b)]))
                acc = builder.call(fma, [f, builder.fmul(d8, _splat(builder, dxv, 8)), builder.load(accs[j])])
                builder.store(builder.call(fma, [m8, _splat(builder, xsv, 8), acc]), accs[j])
        outs = []
        for j in range(n):
            v = builder.load(accs[j])
            outs += [builder.extract_element(v, ir.Constant(i32, t)) for t in range(8)]
        return context.make_tuple(builder, signature.return_type, outs)

    return codegen


def q41x8_tile_intrinsic(n: int, vnni: bool | None = None) -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic (AVX2; `vpdpbusd` where VNNI runs): Q4_1 weights interleaved by 8 rows
    (`cpu_qmatmul.interleave_q41`) against n rows of Q8 activations (blocks of 32, `quantize_rows`).
    Arguments: (w uint8 flat, the group's byte offset, d uint16 flat (fp16 bits), the group's d offset (m's
    too), x int8 flat, n x offsets, dx float32 flat, n dx offsets (xs's too), m uint16 flat, xs float32 flat,
    blocks) -> 8 n float32, activation row j's 8 weight rows at 8 j .. 8 j + 7.

    A group's block b is 128 bytes: 4 chunks of 32, chunk c holding bytes 4c .. 4c + 3 of each of the 8 rows'
    16 nibble bytes (row t at bytes 4t ..). So a chunk's low nibbles are values 4c .. 4c + 3 of every row, lane t
    row t, and its high nibbles values 16 + 4c ..: 8 vectors, each paired with 4 activation bytes broadcast to
    every lane (one `vpdpbusd`, or `vpmaddubsw` + `vpmaddwd`): each lane ends with its row's whole integer dot
    of the block, exact. Then per (row t, activation row j), in this order, in fp32:
    acc = fma(float(dot), d_w x d_x, acc); acc = fma(m_w, xs, acc) — no lanes to sum at the end, one
    conversion and two fused multiply-adds per 8 pairs (llama.cpp's Q4_1 dot product: 8 lanes per pair, a
    conversion and a fused multiply-add per pair). Every pair's arithmetic is the same in any tile, so its
    result has the same bits for any n."""
    if vnni is None:
        vnni = has_vnni()
    from numba import types
    from numba.extending import intrinsic

    names = (["w", "wo", "d", "do", "x"] + [f"xo{j}" for j in range(n)] + ["dx"] + [f"dxo{j}" for j in range(n)]
             + ["m", "xs", "nb"])

    def typer(typingctx, *args):  # noqa: ANN001, ANN202
        arrays = {0, 2, 4, 5 + n, 6 + 2 * n, 7 + 2 * n}
        sig = types.UniTuple(types.float32, 8 * n)(*[a if i in arrays else types.intp for i, a in enumerate(args)])
        return sig, _q41x8_codegen(n, vnni)

    src = f"def tile_x8(typingctx, {', '.join(names)}):\n    return typer(typingctx, {', '.join(names)})\n"
    scope: dict = {"typer": typer}
    exec(src, scope)  # noqa: S102 - names generated above, no outside input
    return intrinsic(scope["tile_x8"])


def _tile_args(context: Any, builder: Any, signature: Any, args: Any, nw: int,
               n: int) -> tuple:  # pragma: no cover - compiled
    """A tile intrinsic's arguments (see `q8_tile_dot_intrinsic`: w, nw w offsets, d, nw d offsets, x, n x
    offsets, dx, n dx offsets, m, xs, sc, blocks) -> the 7 arrays' data pointers (w, d, x, dx, m, xs, sc), the
    four offset lists (w, d, x, dx) and the block count."""
    iw, idd, ix = 0, 1 + nw, 2 + 2 * nw
    idx, im = ix + 1 + n, ix + 2 + 2 * n
    ptrs = tuple(context.make_array(signature.args[i])(context, builder, args[i]).data
                 for i in (iw, idd, ix, idx, im, im + 1, im + 2))
    return (*ptrs, args[iw + 1:iw + 1 + nw], args[idd + 1:idd + 1 + nw], args[ix + 1:ix + 1 + n],
            args[idx + 1:idx + 1 + n], args[im + 3])


def _mask(k: int, idx: list[int]) -> Any:  # pragma: no cover - compiled
    """A shuffle mask of k lanes (llvmlite's <k x i32> constant)."""
    from llvmlite import ir

    return ir.Constant(ir.VectorType(ir.IntType(32), k), idx)


def _x86_intrinsics(mod: Any) -> tuple[Any, ...]:  # pragma: no cover - compiled
    """The intrinsics the Q8 row-dot codegens share, declared in `mod`: (vpmaddubsw, vpmaddwd, vpsignb, vpshufb
    on 256 bits, fma on 8 floats, fma on one float)."""
    from llvmlite import ir

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    v32i8, v16i16, v8i32, v8f32 = (ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8),
                                   ir.VectorType(f32, 8))
    return (mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(v16i16, [v32i8, v32i8])),
            mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(v8i32, [v16i16, v16i16])),
            mod.declare_intrinsic("llvm.x86.avx2.psign.b", fnty=ir.FunctionType(v32i8, [v32i8, v32i8])),
            mod.declare_intrinsic("llvm.x86.avx2.pshuf.b", fnty=ir.FunctionType(v32i8, [v32i8, v32i8])),
            mod.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8f32, [v8f32, v8f32, v8f32])),
            mod.declare_intrinsic("llvm.fma.f32", fnty=ir.FunctionType(f32, [f32, f32, f32])))


def _q8_rows_codegen(kind: int, n: int, nw: int = 1, tmin: bool = False, vnni: bool = False, ux: bool = False,
                     chain: bool = False, acc2: bool = False) -> Any:  # pragma: no cover - compiled
    """The LLVM code of the Q8 row dots (see `q8_row_dot_intrinsic`) for a tile of nw weight rows x n rows of
    activations. Arguments: (w, nw w offsets, d, nw d offsets (m's too), x, n x offsets, dx, n dx offsets, m,
    xs, blocks); xs shares dx's offsets. Returns the nw x n sums, weight row by weight row. One body for every
    tile: each (weight row, activation row) pair gets the same operations in the same order, in accumulators
    of its own, so its result has the same bits in any tile. A tile shares loads (an activation block serves
    nw weight rows, an unpacked weight block n activation rows) and interleaves independent chains: a fused
    multiply-add waits ~5 cycles for the previous one of its chain, so one chain per call leaves the core
    mostly idle.

    tmin (Q4_1, one weight row): xs is the tile's activation rows' xs transposed, value (row j, block b) at
    dx offset of row 0 + b n + j, so that the n min terms of a block are one vector fused multiply-add (lane j
    has the bits of row j's scalar chain) instead of n scalar ones.

    vnni: each block's byte dot is one `vpdpbusd` (unsigned x signed bytes, four products summed into each
    int32 lane) instead of `vpmaddubsw` + `vpmaddwd`: lane i sums the same four products (bytes 4i .. 4i + 3)
    exactly, in 32 bits, so every integer and every float after it is the same as without.

    ux (VNNI, the signed kinds Q4_0 / Q5_0 / Q8_0 / Q6_K, one weight row): the x argument holds the
    activations with their sign bit flipped (x ^ 0x80 = x + 128 as an unsigned byte), and the signed weights
    are `vpdpbusd`'s signed operand: lane i = c_i + sum (x + 128) w over its four bytes, with c_i = -128 x
    (the four weights' sum), one `vpdpbusd` of 128s into the weights and one subtraction per weight block,
    shared by the tile's n rows. The same
    exact integer as w's sign moved onto x by `vpsignb` (twice per pair, once per block: the operand must be
    unsigned), without a `vpsignb` per pair: 3 vector operations per (block, row) instead of 4.

    kind 17 (IQ4_NL): Q4_0's nibbles, each looked up in IQ4NL_VALUES (`vpshufb`), then the signed kinds' dot.

    chain (Q4_0, IQ4_NL): llama.cpp's arithmetic on the Q4_0 (IQ4_NL) matrices it repacks (rows a multiple of
    8, its extra weight buffers on: `ggml_gemv_q4_0_8x8_q8_0` for a token, `ggml_gemm_q4_0_8x8_q8_0` for rows in
    fours, the same per pair): each block's integer dot summed whole (exact), converted to fp32 and
    fused-multiply-added times d_w x d_x into one scalar chain per pair; no lanes, no final sum (IQ4_NL:
    `ggml_gemv` / `ggml_gemm_iq4_nl_8x8_q8_0`, the same template with its lookup table).

    acc2 (IQ4_NL, a matrix llama.cpp does not repack, one token: its `ggml_vec_dot_iq4_nl_q8_0`): the even blocks
    into one set of 8 float lanes, the odd ones into another, the two added lane by lane before the final sum;
    an odd last block then joins the sum as one scalar step, fma(d_w x d_x, float(its integer dot), sum)."""
    from llvmlite import ir
    from numba.core import cgutils

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    v16i8, v32i8, v16i16 = ir.VectorType(i8, 16), ir.VectorType(i8, 32), ir.VectorType(i16, 16)
    v8i32, v8f32, v8i16 = ir.VectorType(i32, 8), ir.VectorType(f32, 8), ir.VectorType(i16, 8)
    assert kind in (0, 1, 2, 3, 4, 17), "the K types: _q8k_rows_codegen"
    mn = kind in (0, 3)  # unsigned weights and a min per block (Q4_1, Q5_1)
    q5 = kind in (3, 4)  # 5-bit weights: the nibbles' 16 bytes, then the block's 32 high bits
    bw = 32 if kind == 2 else 20 if q5 else 16
    assert not ux or (vnni and not mn and nw == 1), "ux: VNNI, a signed kind, one weight row"
    assert not acc2 or (kind == 17 and not chain), "acc2: IQ4_NL's plain dot product"
    # where the codegen's arguments are: (w, nw w offsets, d, nw d offsets, x, n x offsets, dx, n dx offsets, m,
    # xs, sc, blocks)

    mask = _mask

    def half(builder: Any, ptr: Any, index: Any) -> Any:
        return builder.fpext(builder.bitcast(builder.load(builder.gep(ptr, [index])), ir.HalfType()), f32)

    def hsum(builder: Any, v: Any, extra: Any) -> Any:  # the 8 lanes in a fixed order, then + extra
        return builder.fadd(_lane_sum(builder, v, builder.fadd), extra)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        wa, da, xa, dxa, ma, xsa, sca, woffs, doffs, xoffs, dxoffs, nb = _tile_args(context, builder, signature,
                                                                                      args, nw, n)
        mod = builder.module
        maddubs, maddwd, psign, pshufb, fma, fma1 = _x86_intrinsics(mod)
        dpbusd = mod.declare_intrinsic("llvm.x86.avx512.vpdpbusd.256",
                                       fnty=ir.FunctionType(v8i32, [v8i32, v8i32, v8i32])) if vnni else None
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(n)]
                for _ in range(nw)]
        accs2 = [[cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(n)]
                 for _ in range(nw)] if acc2 else None
        npair = nw * n
        if chain:  # the tile's pairs' chains as one vector (lane t n + j), or one scalar for a 1 x 1 tile
            vpf = ir.VectorType(f32, npair) if npair > 1 else f32
            vacc = cgutils.alloca_once_value(builder, ir.Constant(vpf, [0.0] * npair if npair > 1 else 0.0))
            fmap = fma1 if npair == 1 else (
                fma if npair == 8 else mod.declare_intrinsic(f"llvm.fma.v{npair}f32",
                                                             fnty=ir.FunctionType(vpf, [vpf, vpf, vpf])))
        maccs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in range(n)] for _ in range(nw)]
        vt = tmin and mn and nw == 1
        if vt:
            vnf = ir.VectorType(f32, n)
            fman = mod.declare_intrinsic(f"llvm.fma.v{n}f32", fnty=ir.FunctionType(vnf, [vnf, vnf, vnf]))
            vmacc = cgutils.alloca_once_value(builder, ir.Constant(vnf, [0.0] * n))
        # Q4_1, one activation row, several weight rows: the rows' min chains as one vector (lane t = row t's
        # scalar chain, the same bits)
        vw = mn and n == 1 and nw > 1
        if vw:
            vwf = ir.VectorType(f32, nw)
            fmaw = mod.declare_intrinsic(f"llvm.fma.v{nw}f32", fnty=ir.FunctionType(vwf, [vwf, vwf, vwf]))
            vwacc = cgutils.alloca_once_value(builder, ir.Constant(vwf, [0.0] * nw))
        intp = nb.type

        splat1 = functools.partial(_splat, builder)  # a scalar in every lane

        def block(b: Any, scale_v: Callable, m_s: Callable, m_v: Callable, scale_p: Callable = None,
                  odd: bool = False, sink: Callable = None) -> None:
            # block b of every pair: scale_v(t, j) = d_w x d_x of the pair (a scalar), m_s(t) = the weight row's
            # min (Q4_1) as a float, m_v() = the nw rows' mins as one vector (vw); chain: scale_p() = the pairs'
            # d_w x d_x as one vector (lane t n + j); acc2: odd = into the odd blocks' lanes; sink(t, j, p32):
            # takes the pair's integer lanes instead of a step of its chains
            cur = []
            xvs, xss = [], []
            for xo, dxo in zip(xoffs, dxoffs):  # the activation rows' block b, loaded once for the tile
                xp = builder.gep(xa, [builder.add(xo, builder.mul(b, ir.Constant(intp, 32)))])
                xvs.append(builder.load(builder.bitcast(xp, v32i8.as_pointer()), align=1))
                xss.append(builder.load(builder.gep(xsa, [builder.add(dxo, b)])) if mn and not vt else None)
            if vw:
                builder.store(builder.call(fmaw, [m_v(), splat1(xss[0], nw), builder.load(vwacc)]), vwacc)
            for t in range(nw):
                wp = builder.gep(wa, [builder.add(woffs[t], builder.mul(b, ir.Constant(intp, bw)))])
                if bw != 32:  # nibbles: low = values 0..15, high = 16..31: the 16 bytes, then their words shifted
                    # right by 4 (one 128-bit shift), joined, every byte's low nibble kept: ggml's
                    # bytes_from_nibbles_32. (A 256-bit variable shift of the bytes in both halves did the same
                    # in ~0.8 more cycles per block and weight row on an AVX2-only Zen 1.)
                    packed = builder.load(builder.bitcast(wp, v16i8.as_pointer()), align=1)
                    hi = builder.bitcast(builder.lshr(builder.bitcast(packed, v8i16), ir.Constant(v8i16, [4] * 8)),
                                         v16i8)
                    wq = builder.and_(builder.shuffle_vector(packed, hi, mask(32, list(range(32)))),
                                      ir.Constant(v32i8, [15] * 32))
                    if kind == 1:
                        wq = builder.sub(wq, ir.Constant(v32i8, [8] * 32))
                    elif kind == 17:  # IQ4_NL: each nibble indexes its 16 signed values (`vpshufb`, the table
                        # in both 128-bit halves: ggml's kvalues_iq4nl lookup)
                        wq = builder.call(pshufb, [ir.Constant(v32i8, list(IQ4NL_VALUES) * 2), wq])
                    if q5:  # bit j of the 32-bit qh selects for byte j (a mask register and one masked byte
                        # operation with AVX512-BW/VL; llama.cpp's bytes_from_bits_32 expansion with AVX2 alone):
                        # Q5_1: | 0x10 where set (q 0..31); Q5_0: | 0xF0 where clear (q - 16 as a signed byte)
                        hp = builder.gep(wa, [builder.add(woffs[t], builder.add(builder.mul(b, ir.Constant(intp, bw)),
                                                                                ir.Constant(intp, 16)))])
                        h32 = builder.load(builder.bitcast(hp, i32.as_pointer()), align=1)
                        set_ = builder.bitcast(h32, ir.VectorType(ir.IntType(1), 32))  # element j = bit j
                        if kind == 3:
                            wq = builder.or_(wq, builder.select(set_, ir.Constant(v32i8, [0x10] * 32),
                                                                ir.Constant(v32i8, [0] * 32)))
                        else:
                            wq = builder.or_(wq, builder.select(set_, ir.Constant(v32i8, [0] * 32),
                                                                ir.Constant(v32i8, [-16] * 32)))
                else:
                    wq = builder.load(builder.bitcast(wp, v32i8.as_pointer()), align=1)
                if ux:  # -128 x the sum of each lane's four weights: the offset the flipped x adds
                    c128 = builder.call(dpbusd, [ir.Constant(v8i32, [0] * 8), ir.Constant(v8i32, [0x80808080] * 8),
                                                 builder.bitcast(wq, v8i32)])
                    corr = builder.sub(ir.Constant(v8i32, [0] * 8), c128)
                wabs = wq if mn or ux else builder.call(psign, [wq, wq])
                mf = m_s(t) if mn and not vw else None
                if vt:  # the n rows' min terms of block b at once
                    xp = builder.gep(xsa, [builder.add(dxoffs[0], builder.mul(b, ir.Constant(intp, n)))])
                    xsv = builder.load(builder.bitcast(xp, vnf.as_pointer()), align=4)
                    builder.store(builder.call(fman, [splat1(mf, n), xsv, builder.load(vmacc)]), vmacc)
                for j in range(n):
                    xsg = xvs[j] if mn or ux else builder.call(psign, [xvs[j], wq])
                    if ux:
                        p32 = builder.call(dpbusd, [corr, builder.bitcast(xsg, v8i32), builder.bitcast(wq, v8i32)])
                    elif vnni:
                        p32 = builder.call(dpbusd, [ir.Constant(v8i32, [0] * 8), builder.bitcast(wabs, v8i32),
                                                    builder.bitcast(xsg, v8i32)])
                    else:
                        p32 = builder.call(maddwd, [builder.call(maddubs, [wabs, xsg]), ir.Constant(v16i16, [1] * 16)])
                    acc = accs2[t][j] if odd else accs[t][j]
                    if sink is not None:
                        sink(t, j, p32)
                    elif chain:
                        cur.append(p32)
                    else:
                        pf = builder.sitofp(p32, v8f32)
                        builder.store(builder.call(fma, [pf, splat1(scale_v(t, j), 8), builder.load(acc)]), acc)
                    if mn and not vt and not vw:  # Q4_1 / Q5_1: + m_b x xs_b, a scalar chain beside the vector one
                        macc = maccs[t][j]
                        builder.store(builder.call(fma1, [mf, xss[j], builder.load(macc)]), macc)
            if chain:  # each pair's whole integer dot of the block, one fp32 step of its chain
                tot = pair_totals(cur)
                builder.store(builder.call(fmap, [builder.sitofp(tot, vpf), scale_p(), builder.load(vacc)]), vacc)

        # blocks 8 at a time: the 8 fp16 scales (and mins) of a weight row converted as one vector, times the 8
        # d_x of each activation row in one vector multiply (each lane the scalar product: the same bits), then
        # lane k serves block k; the blocks past the last 8 one by one
        def gather(xs: list) -> Any:  # scalars -> one vector
            v = ir.Constant(ir.VectorType(f32, len(xs)), ir.Undefined)
            for i, x in enumerate(xs):
                v = builder.insert_element(v, x, ir.Constant(i32, i))
            return v

        def vec8(ptr: Any, off: Any, ty: Any) -> Any:
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=2)

        halves8 = functools.partial(_halves8, builder)

        # the group's scale products (and mins) go through a stack buffer that an empty asm statement is told
        # it may read and write: each block's scale is then broadcast from memory (a load, or the fused
        # multiply-add's broadcast operand), where splatting lane k of a register costs one or two shuffles per
        # pair (Zen 4, weights in L2, one thread, interleaved: the 1x8 and 4x1 tiles 5-10 % faster). Same values,
        # same bits.
        nbuf = nw * n + (nw if mn else 0)
        buf = cgutils.alloca_once(builder, v8f32, size=nbuf)
        fence = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [buf.type]), "", "r,~{memory}", side_effect=True)

        def lane(i: int, k: int) -> Any:  # lane k of buffer vector i as a scalar, loaded from memory
            return builder.load(builder.gep(builder.bitcast(buf, f32.as_pointer()), [ir.Constant(i32, 8 * i + k)]))

        phadd = mod.declare_intrinsic("llvm.x86.avx2.phadd.d", fnty=ir.FunctionType(v8i32, [v8i32, v8i32]))

        def shuf(a: Any, b: Any, idx: list[int]) -> Any:
            return builder.shuffle_vector(a, b, mask(len(idx), idx))

        def pair_totals(ps: list) -> Any:
            # chain: the pairs' 8 integer lanes -> their totals, lane i = pair i's (a `vphaddd` tree, then the
            # 128-bit halves added: exact in any order); one pair: the scalar total
            if len(ps) == 1:
                return _lane_sum(builder, ps[0], builder.add)
            h = [builder.call(phadd, [ps[i], ps[i + 1]]) for i in range(0, len(ps), 2)]
            if len(ps) == 4:
                g = builder.call(phadd, [h[0], h[1]])
                return builder.add(shuf(g, g, [0, 1, 2, 3]), shuf(g, g, [4, 5, 6, 7]))
            g0, g1 = builder.call(phadd, [h[0], h[1]]), builder.call(phadd, [h[2], h[3]])
            return builder.add(shuf(g0, g1, [0, 1, 2, 3, 8, 9, 10, 11]), shuf(g0, g1, [4, 5, 6, 7, 12, 13, 14, 15]))

        def transpose(rows: list) -> list:
            # chain: 4 or 8 vectors over a group's 8 blocks -> 8 vectors over them (out[k][i] = rows[i][k])
            u = []
            for q in range(0, len(rows), 4):
                r = rows[q:q + 4]
                t = [shuf(r[0], r[1], [0, 8, 1, 9, 4, 12, 5, 13]), shuf(r[0], r[1], [2, 10, 3, 11, 6, 14, 7, 15]),
                     shuf(r[2], r[3], [0, 8, 1, 9, 4, 12, 5, 13]), shuf(r[2], r[3], [2, 10, 3, 11, 6, 14, 7, 15])]
                # u[c]: rows q .. q + 3 of block c (lanes 0..3) and block c + 4 (lanes 4..7)
                u.append([shuf(t[0], t[2], [0, 1, 8, 9, 4, 5, 12, 13]), shuf(t[0], t[2], [2, 3, 10, 11, 6, 7, 14, 15]),
                          shuf(t[1], t[3], [0, 1, 8, 9, 4, 5, 12, 13]), shuf(t[1], t[3], [2, 3, 10, 11, 6, 7, 14, 15])])
            out = [None] * 8
            for c in range(4):
                if len(rows) == 4:
                    out[c], out[c + 4] = shuf(u[0][c], u[0][c], [0, 1, 2, 3]), shuf(u[0][c], u[0][c], [4, 5, 6, 7])
                else:
                    out[c] = shuf(u[0][c], u[1][c], [0, 1, 2, 3, 8, 9, 10, 11])
                    out[c + 4] = shuf(u[0][c], u[1][c], [4, 5, 6, 7, 12, 13, 14, 15])
            return out

        ng = builder.sdiv(nb, ir.Constant(intp, 8))
        with cgutils.for_range(builder, ng) as loop:
            b0 = builder.mul(loop.index, ir.Constant(intp, 8))
            d8 = [halves8(da, builder.add(doffs[t], b0)) for t in range(nw)]
            dx8 = [vec8(dxa, builder.add(dxoffs[j], b0), v8f32) for j in range(n)]
            prods = []
            for t in range(nw):
                for j in range(n):
                    prods.append(builder.fmul(d8[t], dx8[j]))
                    builder.store(prods[-1], builder.gep(buf, [ir.Constant(i32, t * n + j)]))
                if mn:
                    builder.store(halves8(ma, builder.add(doffs[t], b0)),
                                  builder.gep(buf, [ir.Constant(i32, nw * n + t)]))
            builder.call(fence, [buf])
            # chain: each block's scales over the pairs (a transpose of the products; one pair: its lane)
            per_k = transpose(prods) if chain and npair > 1 else None
            for k in range(8):
                block(builder.add(b0, ir.Constant(intp, k)), lambda t, j, k=k: lane(t * n + j, k),
                      lambda t, k=k: lane(nw * n + t, k), lambda k=k: gather([lane(nw * n + t, k) for t in range(nw)]),
                      lambda k=k: per_k[k] if npair > 1 else lane(0, k), odd=acc2 and k % 2 == 1)

        def scale1(t: int, j: int, b: Any) -> Any:
            dw = half(builder, da, builder.add(doffs[t], b))
            return builder.fmul(dw, builder.load(builder.gep(dxa, [builder.add(dxoffs[j], b)])))

        def tail_block(b: Any, odd: bool = False, sink: Callable = None) -> None:
            block(b, lambda t, j: scale1(t, j, b), lambda t: half(builder, ma, builder.add(doffs[t], b)),
                  lambda: gather([half(builder, ma, builder.add(doffs[t], b)) for t in range(nw)]),
                  lambda: (gather([scale1(t, j, b) for t in range(nw) for j in range(n)]) if npair > 1
                           else scale1(0, 0, b)), odd=odd, sink=sink)

        tail0 = builder.mul(ng, ir.Constant(intp, 8))
        if acc2:  # the blocks past the last 8 in pairs (even, odd), as llama.cpp's loop; an odd last one apart
            nb2 = builder.sub(nb, builder.and_(nb, ir.Constant(intp, 1)))
            with cgutils.for_range_slice(builder, tail0, nb2, ir.Constant(intp, 2)) as (b, _):
                tail_block(b)
                tail_block(builder.add(b, ir.Constant(intp, 1)), odd=True)
        else:
            with cgutils.for_range_slice(builder, tail0, nb, ir.Constant(intp, 1)) as (b, _):
                tail_block(b)
        if acc2:
            sums = [cgutils.alloca_once_value(builder, _lane_sum(builder, builder.fadd(
                builder.load(accs[t][j]), builder.load(accs2[t][j])), builder.fadd))
                for t in range(nw) for j in range(n)]
            last = builder.sub(nb, ir.Constant(intp, 1))
            with builder.if_then(builder.icmp_signed("!=", builder.and_(nb, ir.Constant(intp, 1)),
                                                     ir.Constant(intp, 0))):
                def sink(t: int, j: int, p32: Any) -> None:  # sumf += d x (sumi1 + sumi2): one fused step
                    tot = builder.sitofp(_lane_sum(builder, p32, builder.add), f32)
                    builder.store(builder.call(fma1, [scale1(t, j, last), tot, builder.load(sums[t * n + j])]),
                                  sums[t * n + j])

                tail_block(last, sink=sink)
            outs = [builder.load(a) for a in sums]
        elif chain:
            v = builder.load(vacc)
            outs = [builder.extract_element(v, ir.Constant(i32, i)) for i in range(npair)] if npair > 1 else [v]
        elif vw:
            outs = [hsum(builder, builder.load(accs[t][0]),
                         builder.extract_element(builder.load(vwacc), ir.Constant(i32, t))) for t in range(nw)]
        elif vt:
            outs = [hsum(builder, builder.load(accs[0][j]),
                         builder.extract_element(builder.load(vmacc), ir.Constant(i32, j))) for j in range(n)]
        else:
            outs = [hsum(builder, builder.load(accs[t][j]), builder.load(maccs[t][j])) for t in range(nw)
                    for j in range(n)]
        return outs[0] if n * nw == 1 else context.make_tuple(builder, signature.return_type, outs)

    return codegen


def _q8k_rows_codegen(kind: int, n: int, nw: int = 1, prompt: bool = False,
                      plain: bool = False, q5: bool = False) -> Any:  # pragma: no cover - compiled
    """The LLVM code of the K types' row dots on Q8_K activations (kinds 5 Q4_K, 6 Q6_K of
    `q8_tile_dot_intrinsic`), with llama.cpp's arithmetic, for a tile of nw weight rows x n activation rows.
    Arguments as `_q8_rows_codegen`'s, the activations as `cpu_qmatmul.quantize_rows(k=True)` lays them out:
    x int8, dx one fp32 scale per super-block (read at each super-block's first block), xs its 16 bsums
    (int16 sums of 16 values) in the float32 array's bytes, 8 "floats" per super-block.

    Q4_K (llama.cpp's `ggml_gemv_q4_K_8x8_q8_K` / `gemm`, the AVX2 path it repacks Q4_K into where a matrix's
    rows come in eights): per super-block the integer sum of scale_j x (the byte dot of block j) and the
    integer sum of min_j x (block j's sum of x, from the bsums), each converted to fp32 once and multiplied
    into its own fused multiply-add chain, d_w x d_x and dmin_w x d_x rounded to fp32 first; the result is the
    first chain minus the second. Q6_K (`ggml_vec_dot_q6_K_q8_K`, AVX2): 8 int32 lanes, lane l summing
    scale x (q x x) over bytes 4l .. 4l + 3 of every block of 32 (q unsigned, 0 .. 63; a block's first 16
    values take its first scale), minus 32 x (bsum_2l scale_2l + bsum_2l+1 scale_2l+1); the lanes converted to
    fp32 and fused-multiply-added times d_w x d_x into 8 float lanes, summed at the end as ggml's
    `hsum_float_8`. Q6_K with prompt (kind 7 of the intrinsics: what llama.cpp computes for a micro-batch of 8
    or more tokens, its tiled K-quant matmul, `ggml_compute_forward_mul_mat_tiled`): per super-block the
    lanes' integer total, converted once, times d_w (rounded to fp32), fused-multiply-added times d_x into
    one chain. Q4_K with prompt (kind 8: the rows of a micro-batch that llama.cpp's repacked kernels take four
    at a time, `ggml_gemm_q4_K_8x8_q8_K`): the two chains step per 64 values (two blocks' integer sums) instead
    of per super-block. Q4_K plain (kinds 9 / 10: llama.cpp's arithmetic on a Q4_K matrix it does not repack,
    one whose rows are not a multiple of 8 or any without its extra weight buffers): `ggml_vec_dot_q4_K_q8_K`
    (AVX2: the scale x dot sums in 8 int32 lanes into 8 fp32 chains times d_w x d_x, the min sums in 4 lanes
    into 4 chains times -(dmin_w x d_x), then hsum_float_8 plus the 4 lanes' sum) or, in a prompt of 8 rows or
    more, its tiled matmul (per super-block r = d_w x the scale x dot total, r - dmin_w x the min total in one
    fused step, then r x d_x fused-multiply-added into one chain). Integer sums are exact in any order: a
    pair's result is llama.cpp's bits in any tile.

    q5 (with kind 5 and plain): Q5_K, Q4_K's layout with each super-block's 32 high-bit bytes after its 128
    nibble bytes (160 bytes; sub-block k's value l adds 16 x bit k of high byte l), as llama.cpp 0.3.36 runs it
    on x86, not repacked: one token with `ggml_vec_dot_q5_K_q8_K` (AVX2: Q4_K's 8 lanes into 8 chains times
    d_w x d_x, the mins' integer total fused-multiply-added times -(d_x x dmin_w) into one scalar chain, then
    hsum_float_8 plus that chain; checked bit for bit against the compiled function through ctypes), a prompt
    of 8 or more with Q4_K's tiled-matmul arithmetic (checked end to end against llama.cpp's logits)."""
    from llvmlite import ir
    from numba.core import cgutils

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    v32i8, v16i16, v8i32, v8f32 = (ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8),
                                   ir.VectorType(f32, 8))
    q6 = kind == 6
    sbw = 160 if q5 else 128  # weight bytes per super-block (Q5_K: the high bits after the nibbles)

    mask = _mask

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        wa, da, xa, dxa, ma, xsa, sca, woffs, doffs, xoffs, dxoffs, nb = _tile_args(context, builder, signature,
                                                                                      args, nw, n)
        intp = nb.type
        mod = builder.module
        maddubs, maddwd, _, _, fma, fma1 = _x86_intrinsics(mod)
        zero8 = ir.Constant(v8i32, [0] * 8)
        lanes8 = (q6 or plain) and not prompt  # 8 float chains per pair (the AVX2 dot products)
        if lanes8:
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(n)]
                    for _ in range(nw)]
            if q5:  # Q5_K's min chain: one scalar
                maccs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in range(n)]
                         for _ in range(nw)]
            elif not q6:  # Q4_K's min chains: 4 lanes
                v4f32 = ir.VectorType(f32, 4)
                fma4 = mod.declare_intrinsic("llvm.fma.v4f32", fnty=ir.FunctionType(v4f32, [v4f32, v4f32, v4f32]))
                maccs = [[cgutils.alloca_once_value(builder, ir.Constant(v4f32, [0.0] * 4)) for _ in range(n)]
                         for _ in range(nw)]
        else:  # one chain per pair (and the repacked Q4_K's min chain)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in range(n)] for _ in range(nw)]
            if not (q6 or plain):
                maccs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in range(n)]
                         for _ in range(nw)]

        def c(v: int, ty: Any = intp) -> Any:
            return ir.Constant(ty, v)

        def half(ptr: Any, index: Any) -> Any:
            return builder.fpext(builder.bitcast(builder.load(builder.gep(ptr, [index])), ir.HalfType()), f32)

        splat = functools.partial(_splat, builder)

        def load(ptr: Any, off: Any, ty: Any) -> Any:
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)

        def hsum_i(v: Any) -> Any:  # 8 int32 lanes -> their (exact) sum
            return _lane_sum(builder, v, builder.add)

        def hsum_f8(v: Any) -> Any:  # ggml's hsum_float_8
            return _lane_sum(builder, v, builder.fadd)

        def q4k_scales(t: int, sb: Any) -> tuple[Any, Any]:
            # super-block sb of weight row t: its 8 six-bit scales and 8 mins as <8 x i16> (ggml's
            # get_scale_min_k4 through llama.cpp's utmp masks on three dwords)
            so = builder.mul(builder.add(doffs[t], sb), c(12))
            u = [load(sca, builder.add(so, c(4 * i)), i32) for i in range(3)]
            lo6, lo4, hi2 = c(0x3F3F3F3F, i32), c(0x0F0F0F0F, i32), c(0x03030303, i32)
            s_lo, m_lo = builder.and_(u[0], lo6), builder.and_(u[1], lo6)
            s_hi = builder.or_(builder.and_(u[2], lo4),
                               builder.shl(builder.and_(builder.lshr(u[0], c(6, i32)), hi2), c(4, i32)))
            m_hi = builder.or_(builder.and_(builder.lshr(u[2], c(4, i32)), lo4),
                               builder.shl(builder.and_(builder.lshr(u[1], c(6, i32)), hi2), c(4, i32)))
            v2 = ir.VectorType(i32, 2)

            def bytes8(a: Any, b_: Any) -> Any:
                v = builder.insert_element(builder.insert_element(ir.Constant(v2, ir.Undefined), a, c(0, i32)), b_,
                                           c(1, i32))
                return builder.zext(builder.bitcast(v, ir.VectorType(i8, 8)), ir.VectorType(i16, 8))

            return bytes8(s_lo, s_hi), bytes8(m_lo, m_hi)

        ns = builder.sdiv(nb, c(8))
        with cgutils.for_range(builder, ns) as loop:
            sb = loop.index
            b0 = builder.mul(sb, c(8))
            # the activation rows' super-block: d_x, the 16 bsums, the 8 blocks (loaded once for the tile)
            dxs = [builder.load(builder.gep(dxa, [builder.add(dxoffs[j], b0)])) for j in range(n)]
            bss = [load(xsa, builder.add(dxoffs[j], b0), v16i16) for j in range(n)]
            xvs = [[load(xa, builder.add(xoffs[j], builder.mul(builder.add(b0, c(k)), c(32))), v32i8)
                    for k in range(8)] for j in range(n)]
            for t in range(nw):
                dw = half(da, builder.add(doffs[t], sb))
                sumi = [zero8] * n
                if q6:
                    s16 = load(sca, builder.mul(builder.add(doffs[t], sb), c(16)), ir.VectorType(i8, 16))
                    sc16 = builder.sext(s16, v16i16)  # the 16 scales as int16 (lane 2l, 2l + 1: block l's)
                    qhb = builder.bitcast(ma, i8.as_pointer())  # the high bits ride in m's slot, as bytes
                else:
                    scl, mins = q4k_scales(t, sb)
                    m16 = builder.shuffle_vector(mins, mins, mask(16, [i // 2 for i in range(16)]))
                    mm = [builder.call(maddwd, [bss[j], m16]) for j in range(n)]  # lane k: min_k x block k's sum
                    dmw = half(ma, builder.add(doffs[t], sb))
                    if q5:  # the super-block's 32 high-bit bytes
                        hb = load(wa, builder.add(woffs[t], builder.add(builder.mul(sb, c(sbw)), c(128))), v32i8)
                for k in range(8):
                    if q6:  # block k = 4 h + g: ggml's q = (nibble of ql[64 h + 32 (g & 1) + l], the high one for
                        # g >= 2) | ((qh[32 h + l] >> 2 g) & 3) << 4, unsigned (0 .. 63)
                        h_, g_ = k // 4, k % 4
                        lo_off = builder.add(builder.mul(sb, c(128)), c(64 * h_ + 32 * (g_ & 1)))
                        lo = load(wa, builder.add(woffs[t], lo_off), v32i8)
                        if g_ >= 2:
                            lo = builder.lshr(lo, ir.Constant(v32i8, [4] * 32))
                        lo = builder.and_(lo, ir.Constant(v32i8, [15] * 32))
                        hp = builder.add(builder.sdiv(woffs[t], c(2)), builder.add(builder.mul(sb, c(64)), c(32 * h_)))
                        hi = builder.load(builder.bitcast(builder.gep(qhb, [hp]), v32i8.as_pointer()), align=1)
                        if g_:
                            hi = builder.lshr(hi, ir.Constant(v32i8, [2 * g_] * 32))
                        hi = builder.shl(builder.and_(hi, ir.Constant(v32i8, [3] * 32)), ir.Constant(v32i8, [4] * 32))
                        wq = builder.or_(lo, hi)
                        # its two scales, 8 int16 lanes each (lanes 0..3 of the product: values 0..15)
                        sv = builder.shuffle_vector(sc16, sc16, mask(16, [2 * k] * 8 + [2 * k + 1] * 8))
                    else:  # block k: the low (k even) or high nibbles of bytes 32 (k // 2) .. + 31 of its 128
                        wq = load(wa, builder.add(woffs[t], builder.add(builder.mul(sb, c(sbw)), c(32 * (k // 2)))),
                                  v32i8)
                        if k % 2:
                            wq = builder.lshr(wq, ir.Constant(v32i8, [4] * 32))
                        wq = builder.and_(wq, ir.Constant(v32i8, [15] * 32))
                        if q5:  # + 16 x bit k of the high bytes
                            hk = builder.lshr(hb, ir.Constant(v32i8, [k] * 32)) if k else hb
                            hk = builder.shl(builder.and_(hk, ir.Constant(v32i8, [1] * 32)),
                                             ir.Constant(v32i8, [4] * 32))
                            wq = builder.or_(wq, hk)
                        sv = builder.shuffle_vector(scl, scl, mask(16, [k] * 16))
                    for j in range(n):
                        p16 = builder.call(maddubs, [wq, xvs[j][k]])
                        sumi[j] = builder.add(sumi[j], builder.call(maddwd, [p16, sv]))
                        if prompt and not q6 and not plain and k % 2:  # the 4-row kernel: per 64 values
                            d = builder.fmul(dw, dxs[j])
                            fi = builder.sitofp(hsum_i(sumi[j]), f32)
                            builder.store(builder.call(fma1, [fi, d, builder.load(accs[t][j])]), accs[t][j])
                            im = builder.add(builder.extract_element(mm[j], c(k - 1, i32)),
                                             builder.extract_element(mm[j], c(k, i32)))
                            dm = builder.fmul(dmw, dxs[j])
                            builder.store(builder.call(fma1, [builder.sitofp(im, f32), dm,
                                                              builder.load(maccs[t][j])]), maccs[t][j])
                            sumi[j] = zero8
                for j in range(n):
                    d = builder.fmul(dw, dxs[j])  # llama.cpp: d_w x d_x rounded to fp32, then the fma
                    if q6:  # minus 32 x (bsum x scale) per lane: lane l, the bsums 2l, 2l + 1 of the super-block
                        corr = builder.shl(builder.call(maddwd, [bss[j], sc16]), ir.Constant(v8i32, [5] * 8))
                        if prompt:  # the tiled matmul: (d_w x the integer total) then x d_x into one chain
                            res = builder.fmul(dw, builder.sitofp(hsum_i(builder.sub(sumi[j], corr)), f32))
                            builder.store(builder.call(fma1, [res, dxs[j], builder.load(accs[t][j])]), accs[t][j])
                        else:
                            fi = builder.sitofp(builder.sub(sumi[j], corr), v8f32)
                            builder.store(builder.call(fma, [splat(d, 8), fi, builder.load(accs[t][j])]),
                                          accs[t][j])
                    elif q5 and not prompt:  # Q5_K's AVX2 dot: 8 lanes times d; the mins' total times
                        # -(d_x dmin_w), one chain
                        fi = builder.sitofp(sumi[j], v8f32)
                        builder.store(builder.call(fma, [splat(d, 8), fi, builder.load(accs[t][j])]), accs[t][j])
                        dm = builder.fneg(builder.fmul(dxs[j], dmw))
                        builder.store(builder.call(fma1, [dm, builder.sitofp(hsum_i(mm[j]), f32),
                                                          builder.load(maccs[t][j])]), maccs[t][j])
                    elif plain and prompt:  # the tiled matmul: r = d_w s1, r - dmin_w s2 (fused), then x d_x
                        res = builder.fmul(dw, builder.sitofp(hsum_i(sumi[j]), f32))
                        res = builder.call(fma1, [builder.fneg(dmw), builder.sitofp(hsum_i(mm[j]), f32), res])
                        builder.store(builder.call(fma1, [res, dxs[j], builder.load(accs[t][j])]), accs[t][j])
                    elif plain:  # the AVX2 dot: 8 lanes times d; the mins' 4 lanes (lane i: blocks 2i, 2i + 1)
                        fi = builder.sitofp(sumi[j], v8f32)
                        builder.store(builder.call(fma, [splat(d, 8), fi, builder.load(accs[t][j])]), accs[t][j])
                        m4 = builder.add(builder.shuffle_vector(mm[j], mm[j], mask(4, [0, 2, 4, 6])),
                                         builder.shuffle_vector(mm[j], mm[j], mask(4, [1, 3, 5, 7])))
                        dm4 = splat(builder.fneg(builder.fmul(dxs[j], dmw)), 4)
                        builder.store(builder.call(fma4, [dm4, builder.sitofp(m4, v4f32), builder.load(maccs[t][j])]),
                                      maccs[t][j])
                    elif not prompt:  # the super-block's sum of min_j x (bsum_2j + bsum_2j+1), one step each
                        fi = builder.sitofp(hsum_i(sumi[j]), f32)
                        builder.store(builder.call(fma1, [fi, d, builder.load(accs[t][j])]), accs[t][j])
                        dm = builder.fmul(dmw, dxs[j])
                        builder.store(builder.call(fma1, [builder.sitofp(hsum_i(mm[j]), f32), dm,
                                                          builder.load(maccs[t][j])]), maccs[t][j])
        if (q6 or plain) and prompt:
            outs = [builder.load(accs[t][j]) for t in range(nw) for j in range(n)]
        elif q6:
            outs = [hsum_f8(builder.load(accs[t][j])) for t in range(nw) for j in range(n)]
        elif q5:  # hsum_float_8 of the 8 chains + the min chain
            outs = [builder.fadd(hsum_f8(builder.load(accs[t][j])), builder.load(maccs[t][j]))
                    for t in range(nw) for j in range(n)]
        elif plain:  # hsum_float_8 of the 8 chains + ((m0 + m2) + (m1 + m3))
            outs = [builder.fadd(hsum_f8(builder.load(accs[t][j])), hsum_f8(builder.load(maccs[t][j])))
                    for t in range(nw) for j in range(n)]
        else:
            outs = [builder.fsub(builder.load(accs[t][j]), builder.load(maccs[t][j])) for t in range(nw)
                    for j in range(n)]
        return outs[0] if n * nw == 1 else context.make_tuple(builder, signature.return_type, outs)

    return codegen


def _q8k_low2_codegen(fmt: str, n: int, nw: int = 1, prompt: bool = False) -> Any:  # pragma: no cover - compiled
    """The LLVM code of Q3_K's and Q2_K's row dots on Q8_K activations with llama.cpp's arithmetic (kinds 13 /
    14 Q3_K and 15 / 16 Q2_K of `q8_tile_dot_intrinsic`), for a tile of nw weight rows x n activation rows;
    arguments and the activations' layout as `_q8k_rows_codegen`'s. Weights (`cpu_qmatmul`'s layout): per
    super-block the 64 bytes of 2-bit values (value p = 128h + 32j + l: bits 2j of byte 32h + l), then Q3_K's 32
    hmask bytes (bit 4h + j of byte l clear: the value minus 4); sc: Q3_K's 12 packed six-bit scales (minus 32),
    Q2_K's 16 bytes (a 4-bit scale, a 4-bit min); d (Q2_K's dmin in m) one fp16 per super-block.

    One token (`ggml_vec_dot_q3_K_q8_K` / `ggml_vec_dot_q2_K_q8_K`, AVX2, as llama.cpp 0.3.36 runs them on x86,
    neither repacked by its AVX2 build): 8 int32 lanes per super-block, lane l summing scale x (q x x) over bytes
    4l .. 4l + 3 of each run of 32 values (a run's first 16 values take its sub-block 2k's scale, the next 16
    sub-block 2k + 1's), converted to fp32 and fused-multiply-added times d_x x d_w into 8 float lanes, summed
    at the end as ggml's hsum_float_8. Q3_K's signed values (-4 .. 3) go through `vpsignb` (|q| times x with
    q's sign: the same int16 pair sums as llama.cpp's two `vpmaddubsw` and a subtraction, both exact); Q2_K's
    mins first, per super-block: the 8 lanes of min_2l bsum_2l + min_2l+1 bsum_2l+1 (`vpmaddwd`) converted and
    fused-multiply-added times -(d_x x dmin_w) into the same 8 lanes, before the scales' sum. A prompt of 8
    tokens or more (prompt: llama.cpp's tiled K-quant matmul, `tiled_run_microtile`): per super-block the lanes'
    integer total s1 (and Q2_K's min total s2), r = d_w x s1 (Q2_K: r - dmin_w x s2 in one fused step), then
    r x d_x fused-multiply-added into one chain. Integer sums are exact in any order: a pair's result is
    llama.cpp's bits in any tile (checked against its compiled dot products through ctypes and end to end
    against its logits)."""
    from llvmlite import ir
    from numba.core import cgutils

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    v16i8, v32i8, v16i16, v8i32, v8f32 = (ir.VectorType(i8, 16), ir.VectorType(i8, 32), ir.VectorType(i16, 16),
                                          ir.VectorType(i32, 8), ir.VectorType(f32, 8))
    q3 = fmt == "Q3_K"
    sbw = 96 if q3 else 64  # weight bytes per super-block

    mask = _mask

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        wa, da, xa, dxa, ma, xsa, sca, woffs, doffs, xoffs, dxoffs, nb = _tile_args(context, builder, signature,
                                                                                      args, nw, n)
        intp = nb.type
        mod = builder.module
        maddubs, maddwd, psign, _, fma, fma1 = _x86_intrinsics(mod)
        zero8 = ir.Constant(v8i32, [0] * 8)
        acc0 = ir.Constant(f32, 0.0) if prompt else ir.Constant(v8f32, [0.0] * 8)
        accs = [[cgutils.alloca_once_value(builder, acc0) for _ in range(n)] for _ in range(nw)]

        def c(v: int, ty: Any = intp) -> Any:
            return ir.Constant(ty, v)

        def half(ptr: Any, index: Any) -> Any:
            return builder.fpext(builder.bitcast(builder.load(builder.gep(ptr, [index])), ir.HalfType()), f32)

        def splat(x: Any) -> Any:
            return _splat(builder, x, 8)

        def load(ptr: Any, off: Any, ty: Any) -> Any:
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)

        def bytes_(v: int) -> ir.Constant:
            return ir.Constant(v32i8, [v] * 32)

        def hsum_i(v: Any) -> Any:
            return _lane_sum(builder, v, builder.add)

        def q3k_scales(so: Any) -> Any:
            # the 16 six-bit scales minus 32 as <16 x i16> (llama.cpp's kmask1 / kmask2 on three dwords)
            u = [load(sca, builder.add(so, c(4 * i)), i32) for i in range(3)]
            k1, k2 = c(0x03030303, i32), c(0x0F0F0F0F, i32)

            def part(lo: Any, lo_shift: int, hi_shift: int) -> Any:
                low = builder.and_(builder.lshr(lo, c(lo_shift, i32)) if lo_shift else lo, k2)
                top = builder.and_(builder.lshr(u[2], c(hi_shift, i32)) if hi_shift else u[2], k1)
                return builder.or_(low, builder.shl(top, c(4, i32)))

            es = [part(u[0], 0, 0), part(u[1], 0, 2), part(u[0], 4, 4), part(u[1], 4, 6)]
            v = ir.Constant(ir.VectorType(i32, 4), ir.Undefined)
            for i, e in enumerate(es):
                v = builder.insert_element(v, e, c(i, i32))
            s8 = builder.sub(builder.bitcast(v, v16i8), ir.Constant(v16i8, [32] * 16))
            return builder.sext(s8, v16i16)

        ns = builder.sdiv(nb, c(8))
        with cgutils.for_range(builder, ns) as loop:
            sb = loop.index
            b0 = builder.mul(sb, c(8))
            dxs = [builder.load(builder.gep(dxa, [builder.add(dxoffs[j], b0)])) for j in range(n)]
            bss = [load(xsa, builder.add(dxoffs[j], b0), v16i16) for j in range(n)] if not q3 else []
            xvs = [[load(xa, builder.add(xoffs[j], builder.mul(builder.add(b0, c(k)), c(32))), v32i8)
                    for k in range(8)] for j in range(n)]
            for t in range(nw):
                sbi = builder.add(doffs[t], sb)
                dw = half(da, sbi)
                wo = builder.add(woffs[t], builder.mul(sb, c(sbw)))
                if q3:
                    sc16 = q3k_scales(builder.mul(sbi, c(12)))
                    hb = load(wa, builder.add(wo, c(64)), v32i8)
                else:
                    s16 = load(sca, builder.mul(sbi, c(16)), v16i8)
                    sc16 = builder.zext(builder.and_(s16, ir.Constant(v16i8, [15] * 16)), v16i16)
                    mins16 = builder.zext(builder.lshr(s16, ir.Constant(v16i8, [4] * 16)), v16i16)
                    mm = [builder.call(maddwd, [mins16, bss[j]]) for j in range(n)]
                    dmw = half(ma, sbi)
                    if not prompt:  # llama.cpp: the mins' lanes first, times -(d_x x dmin_w)
                        for j in range(n):
                            dm = builder.fmul(builder.fneg(dxs[j]), dmw)
                            builder.store(builder.call(fma, [splat(dm), builder.sitofp(mm[j], v8f32),
                                                             builder.load(accs[t][j])]), accs[t][j])
                sumi = [zero8] * n
                raws = [load(wa, builder.add(wo, c(32 * h_)), v32i8) for h_ in range(2)]
                for k in range(8):
                    h_, j_ = k // 4, k % 4
                    low = builder.lshr(raws[h_], bytes_(2 * j_)) if j_ else raws[h_]
                    low = builder.and_(low, bytes_(3))
                    if q3:  # q = low | 4 x bit (4h + j) of hmask, minus 4: -4 .. 3
                        bit = builder.lshr(hb, bytes_(k)) if k else hb
                        wq = builder.sub(builder.or_(low, builder.shl(builder.and_(bit, bytes_(1)), bytes_(2))),
                                         bytes_(4))
                        wabs = builder.call(psign, [wq, wq])
                    sv = builder.shuffle_vector(sc16, sc16, mask(16, [2 * k] * 8 + [2 * k + 1] * 8))
                    for j in range(n):
                        if q3:
                            p16 = builder.call(maddubs, [wabs, builder.call(psign, [xvs[j][k], wq])])
                        else:
                            p16 = builder.call(maddubs, [low, xvs[j][k]])
                        sumi[j] = builder.add(sumi[j], builder.call(maddwd, [p16, sv]))
                for j in range(n):
                    if prompt:  # the tiled matmul: r = d_w s1 (Q2_K: r - dmin_w s2, fused), then r x d_x
                        res = builder.fmul(dw, builder.sitofp(hsum_i(sumi[j]), f32))
                        if not q3:
                            res = builder.call(fma1, [builder.fneg(dmw), builder.sitofp(hsum_i(mm[j]), f32), res])
                        builder.store(builder.call(fma1, [res, dxs[j], builder.load(accs[t][j])]), accs[t][j])
                    else:  # the AVX2 dot: 8 lanes times d_x x d_w
                        d = builder.fmul(dxs[j], dw)
                        builder.store(builder.call(fma, [splat(d), builder.sitofp(sumi[j], v8f32),
                                                         builder.load(accs[t][j])]), accs[t][j])
        if prompt:
            outs = [builder.load(accs[t][j]) for t in range(nw) for j in range(n)]
        else:
            outs = [_lane_sum(builder, builder.load(accs[t][j]), builder.fadd) for t in range(nw) for j in range(n)]
        return outs[0] if n * nw == 1 else context.make_tuple(builder, signature.return_type, outs)

    return codegen


def _iq4xs_rows_codegen(n: int, nw: int = 1, prompt: bool = False) -> Any:  # pragma: no cover - compiled
    """The LLVM code of IQ4_XS's row dots on Q8_K activations (kinds 18 / 19 of `q8_tile_dot_intrinsic`) for a
    tile of nw weight rows x n activation rows, llama.cpp 0.3.36's `ggml_vec_dot_iq4_xs_q8_K` (AVX2; it repacks
    no IQ4_XS matrix on x86) or, with prompt, its tiled matmul's (a micro-batch of 8 tokens or more). Weights:
    per super-block of 256 the 128 nibble bytes (sub-block k: bytes 16k .. 16k + 15, low nibbles values 0..15,
    high 16..31), d (fp16) one per super-block, sc its 6 scale bytes (scales_h, a little-endian uint16, then the
    4 scales_l bytes): sub-block k's scale ls_k = ((scales_l[k / 2] >> 4 (k % 2)) & 15 | ((scales_h >> 2k) & 3)
    << 4) - 32.
    Activations as `_q8k_rows_codegen`'s. Per super-block and pair: each sub-block's nibbles looked up in
    IQ4NL_VALUES (`vpshufb`), `vpmaddubsw` of |w| and x with w's sign (`vpsignb`), `vpmaddwd` by ls_k into 8
    int32 lanes summed over the 8 sub-blocks (exact), converted to fp32 and fused-multiply-added times d_w x d_x
    (rounded to fp32 first) into 8 float lanes; `hsum_float_8` at the end. prompt (`tiled_run_microtile`): the
    super-block's integer total r = d_w x float(total), then r x d_x fused-multiply-added into one chain. Integer
    sums are exact in any order: a pair's result is llama.cpp's bits in any tile."""
    from llvmlite import ir
    from numba.core import cgutils

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    v16i8, v32i8, v8i16, v8i32, v8f32 = (ir.VectorType(i8, 16), ir.VectorType(i8, 32), ir.VectorType(i16, 8),
                                         ir.VectorType(i32, 8), ir.VectorType(f32, 8))

    mask = _mask

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        wa, da, xa, dxa, ma, xsa, sca, woffs, doffs, xoffs, dxoffs, nb = _tile_args(context, builder, signature,
                                                                                      args, nw, n)
        intp = nb.type
        mod = builder.module
        maddubs, maddwd, psign, pshufb, fma, fma1 = _x86_intrinsics(mod)
        zero8 = ir.Constant(v8i32, [0] * 8)
        lut = ir.Constant(v32i8, list(IQ4NL_VALUES) * 2)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0) if prompt else
                                           ir.Constant(v8f32, [0.0] * 8)) for _ in range(n)] for _ in range(nw)]

        def c(v: int, ty: Any = intp) -> Any:
            return ir.Constant(ty, v)

        def load(ptr: Any, off: Any, ty: Any) -> Any:
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)

        splat = functools.partial(_splat, builder)

        ns = builder.sdiv(nb, c(8))
        with cgutils.for_range(builder, ns) as loop:
            sb = loop.index
            b0 = builder.mul(sb, c(8))
            dxs = [builder.load(builder.gep(dxa, [builder.add(dxoffs[j], b0)])) for j in range(n)]
            xvs = [[load(xa, builder.add(xoffs[j], builder.mul(builder.add(b0, c(k)), c(32))), v32i8)
                    for k in range(8)] for j in range(n)]
            for t in range(nw):
                dw = builder.fpext(builder.bitcast(builder.load(builder.gep(da, [builder.add(doffs[t], sb)])),
                                                   ir.HalfType()), f32)
                so = builder.mul(builder.add(doffs[t], sb), c(6))
                sh = builder.zext(load(sca, so, i16), i32)
                sl = [builder.zext(builder.load(builder.gep(sca, [builder.add(so, c(2 + i))])), i32)
                      for i in range(4)]
                sumi = [zero8] * n
                for k in range(8):
                    packed = load(wa, builder.add(woffs[t], builder.add(builder.mul(sb, c(128)), c(16 * k))), v16i8)
                    hi = builder.bitcast(builder.lshr(builder.bitcast(packed, v8i16), ir.Constant(v8i16, [4] * 8)),
                                         v16i8)
                    nib = builder.and_(builder.shuffle_vector(packed, hi, mask(32, list(range(32)))),
                                       ir.Constant(v32i8, [15] * 32))
                    wq = builder.call(pshufb, [lut, nib])
                    wabs = builder.call(psign, [wq, wq])
                    lo4 = builder.and_(builder.lshr(sl[k // 2], c(4 * (k % 2), i32)), c(15, i32))
                    hi2 = builder.shl(builder.and_(builder.lshr(sh, c(2 * k, i32)), c(3, i32)), c(4, i32))
                    ls = builder.trunc(builder.sub(builder.or_(lo4, hi2), c(32, i32)), i16)
                    sv = splat(ls, 16)
                    for j in range(n):
                        p16 = builder.call(maddubs, [wabs, builder.call(psign, [xvs[j][k], wq])])
                        sumi[j] = builder.add(sumi[j], builder.call(maddwd, [p16, sv]))
                for j in range(n):
                    if prompt:  # the tiled matmul: d_w x the integer total, then x d_x into the chain
                        res = builder.fmul(dw, builder.sitofp(_lane_sum(builder, sumi[j], builder.add), f32))
                        builder.store(builder.call(fma1, [res, dxs[j], builder.load(accs[t][j])]), accs[t][j])
                        continue
                    d = builder.fmul(dw, dxs[j])  # llama.cpp: d_w x d_x rounded to fp32, then the fma
                    fi = builder.sitofp(sumi[j], v8f32)
                    builder.store(builder.call(fma, [splat(d, 8), fi, builder.load(accs[t][j])]), accs[t][j])
        outs = [builder.load(accs[t][j]) if prompt else _lane_sum(builder, builder.load(accs[t][j]), builder.fadd)
                for t in range(nw) for j in range(n)]
        return outs[0] if n * nw == 1 else context.make_tuple(builder, signature.return_type, outs)

    return codegen


def q8_row_dot_intrinsic(kind: int) -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic (AVX2): one weight row in blocks of 32 against one row of int8 activations ->
    float32 sum over the row's blocks of d_w[b] * d_x[b] * (integer dot of block b), llama.cpp's Q8
    product. kind 0: Q4_1 nibbles q (0..15) plus the min's term sum_b m[b] x xs[b], 1: Q4_0 nibbles
    q - 8, 2: Q8_0 int8 q, 3: Q5_1 (5-bit q 0..31, the min's term as Q4_1's), 4: Q5_0 (q - 16), 17: IQ4_NL
    (IQ4NL_VALUES[nibble]); Q5's
    blocks are 20 bytes: the 16 nibble bytes, then 32 high bits (value j's bit 4 = bit j), which select
    bytes as a 32-lane mask (a mask register with AVX512-BW/VL; with AVX2, LLVM expands it as llama.cpp's
    `bytes_from_bits_32` does). Arguments: (w uint8 [..] flat, w offset
    in bytes, d uint16 fp16 bits flat, d offset (m's too), x int8 flat, x offset, dx float32 flat, dx offset
    (xs's too), m uint16 flat, xs float32 flat, sc uint8 flat (Q4_K's scale bytes; unread by the others),
    blocks).

    kinds 5 / 6: Q4_K / Q6_K on llama.cpp's Q8_K activations (x in `quantize_rows(k=True)`'s layout: one
    fp32 scale per super-block in dx, its bsums in xs's bytes), with llama.cpp's own arithmetic on x86
    (`_q8k_rows_codegen`): w = the row's bytes [K/256, 128] (Q6_K: its ql; its qh [K/256, 64] ride in m, viewed
    as uint16 and read as bytes at half w's offset), d (and Q4_K's dmin, in m) one per super-block (d offset =
    row x K/256), sc the 12 (Q4_K) or 16 int8 (Q6_K) scale bytes per super-block. Kinds 7 / 8: Q6_K / Q4_K as
    llama.cpp computes them in a prompt's micro-batch (its tiled and its 4-row repacked kernels).

    Per block: the 16 (32) weight bytes and 32 activation bytes are loaded as vectors, nibbles split
    (low = values 0..15, high = 16..31: llama.cpp's layout), `vpmaddubsw` multiplies unsigned by signed
    bytes into 16-bit pair sums (|15 x 127 x 2| and |127 x 127 x 2| fit; signed weights go through
    `vpsignb`: |w| times x with w's sign), `vpmaddwd` sums those into 8 int32, which are exact in fp32
    (|sum| <= 32 x 127 x 127 < 2**24) and added, times the block's fp32 scale d_w x d_x, into 8 float
    lanes; the lanes are summed once per row, in a fixed order (Q4_1's min term runs as a scalar fma chain
    beside them and is added last). So a row's result does not depend on the other rows of the call."""
    return q8_tile_dot_intrinsic(kind, 1, 1)


def q8_rows4_dot_intrinsic(kind: int) -> Any:  # pragma: no cover - compiled into the kernels
    """`q8_row_dot_intrinsic` for four rows of activations at once: (w, w offset, d, d offset, x, four x
    offsets, dx, four dx offsets, m, xs, sc, blocks) -> a 4-tuple of float32. Each weight block is loaded and
    unpacked once for the four rows; every row's arithmetic is exactly the one-row intrinsic's (the same
    generated code, `_q8_rows_codegen`), so its result has the same bits."""
    return q8_tile_dot_intrinsic(kind, 1, 4)


@functools.cache
def q8_tile_dot_intrinsic(kind: int, nw: int, n: int, tmin: bool = False,
                          vnni: bool | None = None, ux: bool = False,
                          chain: bool = False, acc2: bool = False) -> Any:  # pragma: no cover - compiled
    """`q8_row_dot_intrinsic` for nw weight rows x n activation rows: (w, nw w offsets, d, nw d offsets, x,
    n x offsets, dx, n dx offsets, m, xs, sc, blocks) -> an (nw x n)-tuple of float32, weight row by weight row
    (one float32 for 1 x 1). Every pair's arithmetic is the same (`_q8_rows_codegen`), so its result has the
    same bits in any tile. vnni: None = where the CPU has it (`has_vnni`). ux (needs VNNI, a signed kind,
    nw = 1): x is the activations with their sign bit flipped (see `_q8_rows_codegen`); the same bits. chain
    (Q4_0, IQ4_NL): the arithmetic of llama.cpp's repacked Q4_0 kernels (one scalar chain per pair); acc2
    (IQ4_NL): its plain dot product's (even and odd blocks in two sets of lanes)."""
    if vnni is None:
        vnni = has_vnni()
    from numba import types
    from numba.extending import intrinsic

    names = (["w"] + [f"wo{i}" for i in range(nw)] + ["d"] + [f"do{i}" for i in range(nw)] + ["x"]
             + [f"xo{j}" for j in range(n)] + ["dx"] + [f"dxo{j}" for j in range(n)] + ["m", "xs", "sc", "nb"])

    def typer(typingctx, *args):  # noqa: ANN001, ANN202
        ip = types.intp
        arrays = {0, 1 + nw, 2 + 2 * nw, 3 + 2 * nw + n, 4 + 2 * nw + 2 * n, 5 + 2 * nw + 2 * n, 6 + 2 * nw + 2 * n}
        out = types.float32 if nw * n == 1 else types.UniTuple(types.float32, nw * n)
        sig = out(*[a if i in arrays else ip for i, a in enumerate(args)])
        if kind in (18, 19):  # IQ4_XS on Q8_K activations: one token / a prompt of 8 or more
            return sig, _iq4xs_rows_codegen(n, nw, prompt=kind == 19)
        if kind in (13, 14, 15, 16):  # Q3_K / Q2_K on Q8_K activations: one token / a prompt of 8 or more
            return sig, _q8k_low2_codegen("Q3_K" if kind < 15 else "Q2_K", n, nw, prompt=kind in (14, 16))
        if kind in (5, 6, 7, 8, 9, 10, 11, 12):  # the K types: llama.cpp's arithmetic on Q8_K activations (no
            # VNNI, no ux); 7 / 8: Q6_K / Q4_K as llama.cpp computes them in a prompt's micro-batch; 9 / 10: Q4_K
            # not repacked, one token / a prompt of 8 or more; 11 / 12: Q5_K (not repacked), the same two
            return sig, _q8k_rows_codegen({7: 6, 8: 5, 9: 5, 10: 5, 11: 5, 12: 5}.get(kind, kind), n, nw,
                                          prompt=kind in (7, 8, 10, 12), plain=kind in (9, 10, 11, 12),
                                          q5=kind in (11, 12))
        return sig, _q8_rows_codegen(kind, n, nw, tmin, vnni, ux, chain, acc2)

    # an intrinsic's parameters are read from its signature: spell them out (Numba takes no *args there)
    src = f"def tile_dot(typingctx, {', '.join(names)}):\n    return typer(typingctx, {', '.join(names)})\n"
    scope: dict = {"typer": typer}
    exec(src, scope)  # noqa: S102 - names generated above, no outside input
    return intrinsic(scope["tile_dot"])


def round_to_half_intrinsic() -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: float32 -> the nearest fp16 value (ties to even), as float32 again: LLVM's
    `fptrunc` to half then `fpext`, i.e. NumPy's `x.astype(np.float16).astype(np.float32)`."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def round_half(typingctx, v):  # noqa: ANN001, ANN202
        if v != types.float32:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.float32), codegen

    return round_half


@functools.cache
def fma_intrinsic() -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: fma(a, b, c) = a x b + c in float32 with one rounding (LLVM's `llvm.fma.f32`; the
    vfmadd of an AVX2 CPU). Kernels that reproduce another engine's float arithmetic (`atelier_kernels.cpu_ggml`) call
    it where that engine fuses a multiply-add: without `fastmath`, LLVM never fuses one by itself."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def fma32(typingctx, a, b, c):  # noqa: ANN001, ANN202
        if not (a == b == c == types.float32):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            f32 = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma.f32", fnty=ir.FunctionType(f32, [f32, f32, f32]))
            return builder.call(fn, list(args))

        return types.float32(types.float32, types.float32, types.float32), codegen

    return fma32


@functools.cache
def float_bits_intrinsics() -> tuple[Any, Any]:  # pragma: no cover - compiled into the kernels
    """Two Numba intrinsics: `bits(x)`, a float32's 32 bits as an int64 in 0 .. 2**32 - 1, and `from_bits(i)`,
    the float32 whose bits are the low 32 bits of the int64 i (so integer arithmetic on bits can wrap as
    32-bit SIMD integer lanes do)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def bits(typingctx, x):  # noqa: ANN001, ANN202
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

        return types.int64(types.float32), codegen

    @intrinsic
    def from_bits(typingctx, i):  # noqa: ANN001, ANN202
        if i != types.int64:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

        return types.float32(types.int64), codegen

    return bits, from_bits


@functools.cache
def atomic_intrinsics() -> tuple[Any, Any, Any]:  # pragma: no cover - compiled into the kernels
    """Three Numba intrinsics for threads that share one parallel region (`atelier_kernels.cpu_step`):
    `fetch_add(a, i, v)`: a[i] += v atomically (a: int64 array), returns the old value; `load(a, i)`: a[i]
    read atomically; `pause()`: the spin-wait hint (x86 `pause`; nothing elsewhere). All sequentially
    consistent: a thread that reads a counter another thread raised also sees what that thread wrote first."""
    import platform

    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    def ptr(context: Any, builder: Any, aty: Any, arr: Any, i: Any) -> Any:
        data = context.make_array(aty)(context, builder, arr).data
        return builder.gep(data, [i])

    @intrinsic
    def fetch_add(typingctx, a, i, v):  # noqa: ANN001, ANN202
        if not (isinstance(a, types.Array) and a.dtype == types.int64):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            p = ptr(context, builder, signature.args[0], args[0], args[1])
            return builder.atomic_rmw("add", p, context.cast(builder, args[2], signature.args[2], types.int64),
                                      "seq_cst")

        return types.int64(a, types.intp, types.int64), codegen

    @intrinsic
    def load(typingctx, a, i):  # noqa: ANN001, ANN202
        if not (isinstance(a, types.Array) and a.dtype == types.int64):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.load_atomic(ptr(context, builder, signature.args[0], args[0], args[1]), "seq_cst", 8)

        return types.int64(a, types.intp), codegen

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

    @intrinsic
    def pause(typingctx):  # noqa: ANN001, ANN202
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            if x86:
                fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
                builder.call(fn, [])
            return context.get_dummy_value()

        return types.none(), codegen

    return fetch_add, load, pause


@functools.cache
def ggml_dot_intrinsic() -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: `dot(x, xo, y, yo, n)`, float32 arrays read flat from offsets xo, yo -> ggml_vec_dot_f32
    (AVX2) of their n values: four 8-lane fused multiply-add accumulators over 32 values at a time, reduced
    (0 + 2) + (1 + 3), the halves added, then (0 + 1) + (2 + 3); values past the last 32 one fused multiply-add
    each after that. The same bits as `atelier_kernels.cpu_ggml.vec_dot_reference`."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    f32 = ir.FloatType()
    v8f32 = ir.VectorType(f32, 8)

    @intrinsic
    def dot(typingctx, x, xo, y, yo, n):  # noqa: ANN001, ANN202
        if not (isinstance(x, types.Array) and x.dtype == types.float32 and isinstance(y, types.Array)
                and y.dtype == types.float32):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            xa = context.make_array(signature.args[0])(context, builder, args[0]).data
            ya = context.make_array(signature.args[2])(context, builder, args[2]).data
            xo_, yo_, n_ = args[1], args[3], args[4]
            mod = builder.module
            fma = mod.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8f32, [v8f32, v8f32, v8f32]))
            fma1 = mod.declare_intrinsic("llvm.fma.f32", fnty=ir.FunctionType(f32, [f32, f32, f32]))
            intp = n_.type
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(4)]
            whole = builder.udiv(n_, ir.Constant(intp, 32))
            with cgutils.for_range(builder, whole) as loop:
                base = builder.mul(loop.index, ir.Constant(intp, 32))
                for j in range(4):
                    off = builder.add(base, ir.Constant(intp, 8 * j))
                    xv = builder.load(builder.bitcast(builder.gep(xa, [builder.add(xo_, off)]), v8f32.as_pointer()),
                                      align=4)
                    yv = builder.load(builder.bitcast(builder.gep(ya, [builder.add(yo_, off)]), v8f32.as_pointer()),
                                      align=4)
                    builder.store(builder.call(fma, [xv, yv, builder.load(accs[j])]), accs[j])
            res = cgutils.alloca_once_value(builder, _ggml_reduce4(builder, *(builder.load(a) for a in accs)))
            start = builder.mul(whole, ir.Constant(intp, 32))
            with cgutils.for_range(builder, builder.sub(n_, start)) as loop:
                k = builder.add(start, loop.index)
                xs = builder.load(builder.gep(xa, [builder.add(xo_, k)]))
                ys = builder.load(builder.gep(ya, [builder.add(yo_, k)]))
                builder.store(builder.call(fma1, [xs, ys, builder.load(res)]), res)
            return builder.load(res)

        return types.float32(x, types.intp, y, types.intp, types.intp), codegen

    return dot


def prefetch_intrinsic(locality: int = 3) -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: `prefetch(a, i)` asks for the cache line holding a.flat[i] (a read; locality as in
    `_emit_prefetch`); a hint with no result and no fault (an address past the end is fine)."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, a, i):  # noqa: ANN001, ANN202
        if not isinstance(a, types.Array):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            _emit_prefetch(builder, builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data,
                                                [args[1]]), locality)
            return context.get_dummy_value()

        return types.none(a, types.intp), codegen

    return prefetch


def ggml_scores64_intrinsic() -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: `scores64(k, ko, q, qo, T, scale, p, v, vo)` -> float32: for j < T, p[j] = the
    `ggml_dot_intrinsic` dot of k[ko + 64 j : + 64] and q[qo : qo + 64] (ggml_vec_dot_f32's four 8-lane
    accumulators over two runs of 32, its reduction order) times scale; returns the largest p[j] (-inf for
    T = 0; a NaN score is never taken, as `s > best` would not). The same bits per score as the dot
    intrinsic, with the query's eight vectors loaded once for all positions instead of once per score. Row j
    of v (from vo, 64 floats) is prefetched beside key j: `vsum64` reads those rows next, lane by lane (not in
    an order the hardware prefetchers follow)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    f32 = ir.FloatType()
    v8f32 = ir.VectorType(f32, 8)

    @intrinsic
    def scores64(typingctx, k, ko, q, qo, T, scale, p, v, vo):  # noqa: ANN001, ANN202
        if not all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (k, q, p, v)):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            ka, qa, pa, va = (context.make_array(signature.args[i])(context, builder, args[i]).data
                              for i in (0, 2, 6, 7))
            ko_, qo_, T_, sc, vo_ = args[1], args[3], args[4], args[5], args[8]
            intp = T_.type
            fma = builder.module.declare_intrinsic("llvm.fma.v8f32",
                                                   fnty=ir.FunctionType(v8f32, [v8f32, v8f32, v8f32]))

            def vload(ptr: Any, off: Any) -> Any:
                return builder.load(builder.bitcast(builder.gep(ptr, [off]), v8f32.as_pointer()), align=4)

            qv = [vload(qa, builder.add(qo_, ir.Constant(intp, 8 * i))) for i in range(8)]
            best = cgutils.alloca_once_value(builder, ir.Constant(f32, float("-inf")))
            zero = ir.Constant(v8f32, [0.0] * 8)
            with cgutils.for_range(builder, T_) as loop:
                base = builder.add(ko_, builder.mul(loop.index, ir.Constant(intp, 64)))
                vbase = builder.add(vo_, builder.mul(loop.index, ir.Constant(intp, 64)))
                for i in range(4):  # the row's four cache lines (when 64-byte aligned: the cache's rows are)
                    _emit_prefetch(builder, builder.gep(va, [builder.add(vbase, ir.Constant(intp, 16 * i))]))
                acc = [builder.call(fma, [vload(ka, builder.add(base, ir.Constant(intp, 8 * i))), qv[i], zero])
                       for i in range(4)]
                acc = [builder.call(fma, [vload(ka, builder.add(base, ir.Constant(intp, 32 + 8 * i))), qv[4 + i],
                                          acc[i]]) for i in range(4)]
                r = builder.fmul(_ggml_reduce4(builder, *acc), sc)
                builder.store(r, builder.gep(pa, [loop.index]))
                b = builder.load(best)
                builder.store(builder.select(builder.fcmp_ordered(">", r, b), r, b), best)
            return builder.load(best)

        return types.float32(k, types.intp, q, types.intp, types.intp, types.float32, p, v, types.intp), codegen

    return scores64


def ggml_vsum64_intrinsic() -> Any:  # pragma: no cover - compiled into the kernels
    """A Numba intrinsic: `vsum64(v, vo, p, T, width, acc)`: for each lane l < width, acc[l, :64] = the sum
    over the positions j = l, l + width, ... < T (in that order) of p[j] x v[vo + 64 j : + 64], one fused
    multiply-add per position and value — exactly the lanes of `attend_task`'s one pass over the positions
    (acc[j % width] += p[j] v[j]), lane by lane so that a lane's 64 sums stay in eight registers."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    f32 = ir.FloatType()
    v8f32 = ir.VectorType(f32, 8)
    i32 = ir.IntType(32)

    @intrinsic
    def vsum64(typingctx, v, vo, p, T, width, acc):  # noqa: ANN001, ANN202
        if not all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (v, p, acc)):
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            va, pa, aa = (context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 2, 5))
            vo_, T_, w_ = args[1], args[3], args[4]
            intp = T_.type
            fma = builder.module.declare_intrinsic("llvm.fma.v8f32",
                                                   fnty=ir.FunctionType(v8f32, [v8f32, v8f32, v8f32]))

            def vptr(ptr: Any, off: Any) -> Any:
                return builder.bitcast(builder.gep(ptr, [off]), v8f32.as_pointer())

            with cgutils.for_range(builder, w_) as lane:
                l = lane.index
                accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(8)]
                for a in accs:
                    builder.store(ir.Constant(v8f32, [0.0] * 8), a)
                n = builder.sdiv(builder.add(builder.sub(T_, l), builder.sub(w_, ir.Constant(intp, 1))), w_)
                with cgutils.for_range(builder, n) as it:
                    j = builder.add(l, builder.mul(it.index, w_))
                    pj = builder.load(builder.gep(pa, [j]))
                    wv = builder.insert_element(ir.Constant(v8f32, ir.Undefined), pj, ir.Constant(i32, 0))
                    wv = builder.shuffle_vector(wv, ir.Constant(v8f32, ir.Undefined), ir.Constant(
                        ir.VectorType(i32, 8), [0] * 8))
                    base = builder.add(vo_, builder.mul(j, ir.Constant(intp, 64)))
                    for i in range(8):
                        x = builder.load(vptr(va, builder.add(base, ir.Constant(intp, 8 * i))), align=4)
                        builder.store(builder.call(fma, [x, wv, builder.load(accs[i])]), accs[i])
                out = builder.mul(l, ir.Constant(intp, 64))
                for i in range(8):
                    builder.store(builder.load(accs[i]), vptr(aa, builder.add(out, ir.Constant(intp, 8 * i))),
                                  align=4)
            return context.get_dummy_value()

        return types.none(v, types.intp, p, types.intp, types.intp, acc), codegen

    return vsum64


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

    from . import cpu_decode, cpu_ggml, cpu_qmatmul, cpu_step, cpu_topk

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
    cpu_topk.gather_scores(np.ones((10, 8), f32), np.arange(3), np.ones(8, f32))
    cpu_topk.gather_scores(np.ones((10, 8), np.float16), np.arange(3), np.ones(8, f32))
    return ["rows_matmul", "attend", "attend_q8", "filter_rows", "refine", "dots64", "half_scores", "gather_scores",
            *cpu_qmatmul.warm(), *cpu_ggml.warm(), *cpu_step.warm()]
