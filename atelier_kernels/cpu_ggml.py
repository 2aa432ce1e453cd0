"""llama.cpp's float arithmetic around the Q8 products, reproduced operation for operation (issue 13).

    out = rmsnorm(x, w, eps)                  # x [R, D] -> x * (1 / sqrt(mean(x^2) + eps)) * w
    out = swiglu(gu)                          # gu [R, 2 I] (gate | up) -> silu(gate) * up   [R, I]
    cos, sin = rope_tables(base, n_dims, n)   # [n, n_dims / 2]
    out = rope(x, cos[pos], sin[pos])         # x [R, heads, hd]: pairs (2j, 2j + 1) rotated
    out = attend(q, K, V, row_slot, row_pos, scale, batch)   # as cpu_decode.attend, llama.cpp's sums

Why: with Q8 activations (`models.llm_activations = "q8"`) every product
input is rounded to int8 blocks, and a value that lands on the other side of
a rounding boundary moves its block by a whole step. A network computed twice
with float differences of 1e-7 (another summation order, another exp) flips
a few such roundings, and the network drifts apart layer by layer: on SmolLM2
8e-5 of layer 0's output became 3 % of the logits by layer 29, and the top-1
token differed from
llama.cpp's at 4-7 % of the positions of a greedy run, as far as two unrelated
roundings of the network (measured against llama.cpp 0.3.36 with its
intermediate tensors, `cb_eval`). So where the Q8 products already match
llama.cpp's bit for bit (`atelier_kernels.cpu_qmatmul`), the steps between them do
here too, as ggml's CPU backend computes them on an AVX2 CPU with FMA (its
8-lane paths, the build GGML_NATIVE gives this machine):

- RMSNorm: the sum of the squares (each rounded to fp32) in float64, the mean
  rounded to fp32, scale = 1 / sqrtf(mean + eps), then x * scale * w;
- SwiGLU: silu(g) = g / (1 + ggml_v_expf(-g)) eight lanes at a time (ggml's
  own exp polynomial, not libm's), the last n % 8 with libm's expf;
- RoPE: cos/sin tables from glibc's cosf/sinf at theta = p * s^i, the angle
  multiplied in fp32 from one pair to the next (s = powf(base, -2 / n_dims)),
  and each pair rotated with one fused multiply-add per output
  (x0 c - x1 s = fma(x0, c, -(x1 s)), x0 s + x1 c = fma(x0, s, x1 c));
- attention: each score a ggml_vec_dot_f32 (4 x 8 fp32 lanes over 32 values
  at a time, reduced in its fixed order), times the scale, the softmax with
  ggml_v_expf and the lane sums of 8 added in float64, then the weighted sum
  of V in ggml_vec_dot_f32's order for one token (llama.cpp's decode step)
  or in tinyBLAS's (one 8-lane accumulator) for a batch of tokens
  (`batch=True`: llama.cpp's prompt, where its llamafile GEMM takes the
  product).

Checked against llama.cpp's own tensors (tests/test_q8_activations_llama_cpp.py
compares the logits of whole greedy runs): with these every logit equals
llama.cpp's, bit for bit, at every position measured. An AVX-512 build of llama.cpp sums in
16 lanes and would part from these in the last bit again; so would a change of
those ggml paths.

The NumPy twins compute the same operations (a fused multiply-add exactly
rounded once: `fma32`), for the kernel tests; the engine uses these only where
Numba runs (Q8 activations need it). `backend=` and the lock as in
`atelier_kernels.cpu_decode`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

from ._numba import (dispatch, drop_stale_cache, float_bits_intrinsics, fma_intrinsic, ggml_dot_intrinsic,
                     ggml_scores64_intrinsic, ggml_vsum64_intrinsic, jit)

F32 = np.float32
_EXP_C = tuple(F32(float.fromhex(h)) for h in (
    "0x1.8p23", "0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20", "0x1.0e4020p-7", "0x1.573e2ep-5",
    "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"))


# -- references (NumPy) ---------------------------------------------------------------------------
def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a x b + c rounded once (ties to even), element-wise: the product is exact in float64, the sum's
    rounding error is recovered exactly (TwoSum) and decides the one case where rounding float64 then float32
    differs from rounding once (a float64 sum exactly halfway between two float32 values)."""
    a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c64
        bp = s - p
        e = (p - (s - bp)) + (c64 - bp)
        r = s.astype(np.float32)
        r64 = r.astype(np.float64)
        other = np.nextafter(r, np.where(s > r64, np.inf, -np.inf).astype(np.float32))
        o64 = other.astype(np.float64)
        fix = (r64 != s) & (s - r64 == o64 - s) & (e != 0) & (np.sign(e) == np.sign(o64 - s))
    return np.where(fix, other, r).astype(np.float32)


def expf_reference(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf (AVX2) on every element of x (fp32): 2^n x a degree-5 polynomial, with its own handling of
    |n| > 126 (over/underflow)."""
    x = np.asarray(x, np.float32)
    r, l2e, c1, c2, p5, p4, p3, p2, p1 = _EXP_C
    z = fma32(x, l2e, r)
    n = (z - r).astype(np.float32)
    b = fma32(-n, c2, fma32(-n, c1, x))
    zb = z.view(np.uint32).astype(np.int64)
    e = (zb << 23) & 0xFFFFFFFF
    k = ((e + 0x3F800000) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    u = (b * b).astype(np.float32)
    j = fma32(fma32(fma32(p5, b, p4), u, fma32(p3, b, p2)), u, (p1 * b).astype(np.float32))
    out = fma32(j, k, k)
    big = np.abs(n) > 126
    if big.any():
        g = np.where(n <= 0, 0x82000000, 0)
        s1 = ((g + 0x7F000000) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        s2 = ((e - g) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            far = np.where(np.abs(n) > 192, (s1 * s1).astype(np.float32), (fma32(s2, j, s2) * s1).astype(np.float32))
        out = np.where(big, far, out)
    return out.astype(np.float32)


def _hsum8(v: np.ndarray) -> np.ndarray:
    """v [..., 8] -> the 128-bit halves added, then lanes (0 + 2) + (1 + 3): tinyBLAS's hsum, the softmax's."""
    t = (v[..., :4] + v[..., 4:]).astype(np.float32)
    return ((t[..., 0] + t[..., 2]).astype(np.float32) + (t[..., 1] + t[..., 3]).astype(np.float32)).astype(np.float32)


def _reduce32(acc: np.ndarray) -> np.ndarray:
    """acc [..., 4, 8] (ggml_vec_dot_f32's four accumulators) -> GGML_F32x8_REDUCE: (0 + 2) + (1 + 3), the
    halves added, then two horizontal adds: (0 + 1) + (2 + 3)."""
    s = ((acc[..., 0, :] + acc[..., 2, :]).astype(np.float32) + (acc[..., 1, :] + acc[..., 3, :]).astype(np.float32))
    t = (s[..., :4] + s[..., 4:]).astype(np.float32)
    return ((t[..., 0] + t[..., 1]).astype(np.float32) + (t[..., 2] + t[..., 3]).astype(np.float32)).astype(np.float32)


def _lanes(x: np.ndarray, y: np.ndarray, width: int) -> np.ndarray:
    """x, y [..., n] -> [..., width]: lane l accumulates fma(x_i, y_i) over i = l, l + width, ... in order
    (n padded with zeros to a whole number of widths: a zero product leaves a lane as it is)."""
    n = x.shape[-1]
    acc = np.zeros(np.broadcast_shapes(x.shape[:-1], y.shape[:-1]) + (width,), np.float32)
    for i in range(0, n, width):
        w = min(width, n - i)
        acc[..., :w] = fma32(x[..., i:i + w], y[..., i:i + w], acc[..., :w])
    return acc


def vec_dot_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f32 (AVX2) of x and y along the last axis, for n a multiple of 32 or zero-padded to one
    (the leftover loop of other lengths is a fused multiply-add per value)."""
    n = x.shape[-1]
    whole = n - n % 32
    out = _reduce32(_lanes(x[..., :whole], y[..., :whole], 32).reshape(*np.broadcast_shapes(
        x.shape[:-1], y.shape[:-1]), 4, 8))
    for i in range(whole, n):
        out = fma32(x[..., i], y[..., i], out)
    return out


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, eps: np.float32, out: np.ndarray) -> None:
    ss = np.cumsum((x * x).astype(np.float32).astype(np.float64), axis=-1)[..., -1]  # in order, as ggml
    mean = (ss / x.shape[-1]).astype(np.float32)
    scale = (np.float32(1.0) / np.sqrt(mean + np.float32(eps))).astype(np.float32)
    out[...] = ((x * scale[:, None]).astype(np.float32) * w).astype(np.float32)


def swiglu_reference(gu: np.ndarray, out: np.ndarray) -> None:
    inter = out.shape[1]
    g, u = gu[:, :inter], gu[:, inter:]
    vec = inter - inter % 8
    with np.errstate(over="ignore"):
        silu = (g / (np.float32(1.0) + expf_reference((np.float32(0.0) - g).astype(np.float32)))).astype(np.float32)
        tail = (g[:, vec:] / (np.float32(1.0) + _libm_expf(-g[:, vec:]))).astype(np.float32)
    silu[:, vec:] = tail
    out[...] = (silu * u).astype(np.float32)


def rope_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """x [R, heads, hd]; cos, sin [R, hd / 2] (the rows' positions) -> out."""
    c, s = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = fma32(x0, c, -(x1 * s).astype(np.float32))
    out[..., 1::2] = fma32(x0, s, (x1 * c).astype(np.float32))


def attend_reference(q: np.ndarray, K: np.ndarray, V: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray,
                     scale: np.float32, batch: bool, out: np.ndarray) -> None:
    R, H, hd = q.shape
    G = H // K.shape[1]
    for r in range(R):
        T = int(row_pos[r]) + 1
        for h in range(H):
            kb, vb = K[row_slot[r], h // G, :T], V[row_slot[r], h // G, :T]
            p = (vec_dot_reference(kb, q[r, h][None, :]) * np.float32(scale)).astype(np.float32)
            e = expf_reference((p - p.max()).astype(np.float32))
            pad = np.zeros(-T % 8, np.float32)
            tot = np.float64(0.0)
            for part in _hsum8(np.concatenate([e, pad]).reshape(-1, 8)):
                tot += np.float64(part)
            w = (e * np.float32(1.0 / tot)).astype(np.float32)
            vt = vb.T  # [hd, T]
            if batch:
                out[r, h] = _hsum8(_lanes(vt, w[None, :], 8))
            else:
                out[r, h] = vec_dot_reference(np.concatenate([vt, np.zeros((hd, -T % 32), np.float32)], 1),
                                              np.concatenate([w, np.zeros(-T % 32, np.float32)])[None, :])


@functools.cache
def _libm() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name or "libm.so.6")
    except OSError:
        return None
    for fn, n in (("cosf", 1), ("sinf", 1), ("expf", 1), ("powf", 2)):
        f = getattr(lib, fn)
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float] * n
    return lib


def _libm_expf(x: np.ndarray) -> np.ndarray:
    lib = _libm()
    x = np.asarray(x, np.float32)
    if lib is None:
        return np.exp(x.astype(np.float64)).astype(np.float32)
    return np.asarray([lib.expf(float(v)) for v in x.ravel()], np.float32).reshape(x.shape)


def rope_tables_reference(base: float, n_dims: int, n_pos: int, cos: np.ndarray, sin: np.ndarray) -> None:
    """ggml_rope_cache_init: theta = p, then theta *= powf(base, -2 / n_dims) pair after pair, in fp32; libm's
    cosf/sinf (through ctypes; float64 rounded to fp32 where no libm loads)."""
    lib = _libm()
    ts = F32(lib.powf(float(F32(base)), float(F32(-2.0) / F32(n_dims)))) if lib else \
        F32(np.float64(F32(base)) ** np.float64(F32(-2.0) / F32(n_dims)))
    for p in range(n_pos):
        th = F32(p)
        for i in range(n_dims // 2):
            cos[p, i] = lib.cosf(float(th)) if lib else np.cos(np.float64(th))
            sin[p, i] = lib.sinf(float(th)) if lib else np.sin(np.float64(th))
            th = F32(th * ts)


# -- Numba kernels -------------------------------------------------------------------------------
# set by _kernels()
_fma = _bits = _from_bits = _dot = _scores64 = _vsum64 = expf_all = hsum8 = rmsnorm_row = swiglu_row = None
attend_task = None


@functools.cache
def _kernels() -> dict | None:
    if jit() is None:
        return None
    drop_stale_cache(__file__, ("_numba.py",))
    njit, prange = jit()  # type: ignore[misc]
    global _fma, _bits, _from_bits, _dot, _scores64, _vsum64, expf_all, hsum8, rmsnorm_row, swiglu_row
    global attend_task
    # module globals, not closure variables (see atelier_kernels/cpu_qmatmul.py); no fastmath anywhere here: the
    # order of every operation is the point
    _fma = fma_intrinsic()
    _bits, _from_bits = float_bits_intrinsics()
    _dot = ggml_dot_intrinsic()
    _scores64 = ggml_scores64_intrinsic()
    _vsum64 = ggml_vsum64_intrinsic()
    r_, l2e, c1, c2, p5, p4, p3, p2, p1 = (float(c) for c in _EXP_C)

    @njit(cache=True, nogil=True, inline="always")
    def hsum8(a, o):  # pragma: no cover - compiled
        t0 = a[o] + a[o + 4]
        t1 = a[o + 1] + a[o + 5]
        t2 = a[o + 2] + a[o + 6]
        t3 = a[o + 3] + a[o + 7]
        return (t0 + t2) + (t1 + t3)

    @njit(cache=True, nogil=True, inline="always")
    def expf_all(p, n):  # pragma: no cover - compiled
        # ggml_v_expf (AVX2) over p[:n] in place (the same operations per value as `expf_reference`), written
        # without branches (both ranges computed, one kept) so that LLVM runs it eight lanes at a time
        r = np.float32(r_)
        for i in range(n):
            x = p[i]
            z = _fma(x, np.float32(l2e), r)
            nn = z - r
            b = _fma(-nn, np.float32(c2), _fma(-nn, np.float32(c1), x))
            e = (_bits(z) << 23) & 0xFFFFFFFF
            k = _from_bits(e + 0x3F800000)
            u = b * b
            j = _fma(_fma(_fma(np.float32(p5), b, np.float32(p4)), u, _fma(np.float32(p3), b, np.float32(p2))), u,
                     np.float32(p1) * b)
            near = _fma(j, k, k)
            g = 0x82000000 if nn <= np.float32(0.0) else 0
            # ggml computes the far range only when a lane needs it; here every lane computes it, so a near
            # lane takes 1.0 for s1 and s2: its discarded far value is then a normal number (its own s1, as
            # small as 2**-125, made denormal products, which cost Intel CPUs a microcode assist each: the
            # SwiGLU of one row took 9.7 instead of 2 us). Far lanes compute what they did
            is_near = abs(nn) <= np.float32(126.0)
            s1 = np.float32(1.0) if is_near else _from_bits(g + 0x7F000000)
            s2 = np.float32(1.0) if is_near else _from_bits(e - g)
            far = s1 * s1 if abs(nn) > np.float32(192.0) else _fma(s2, j, s2) * s1
            p[i] = near if is_near else far

    @njit(cache=True, nogil=True, inline="always")
    def rmsnorm_row(x, w, eps, out):  # pragma: no cover - compiled
        D = x.shape[0]
        ss = 0.0
        for i in range(D):
            ss += np.float64(x[i] * x[i])
        mean = np.float32(ss / D)
        scale = np.float32(1.0) / np.sqrt(mean + eps)
        for i in range(D):
            out[i] = x[i] * scale * w[i]

    @njit(cache=True, nogil=True)
    def rmsnorm_nb(x, w, eps, out):  # pragma: no cover - compiled
        for r in range(x.shape[0]):
            rmsnorm_row(x[r], w, eps, out[r])

    @njit(cache=True, nogil=True)
    def swiglu_row(gu, o):  # pragma: no cover - compiled
        # one row: gu [2 I] (gate | up) -> o [I]; ggml_v_expf on whole groups of 8, libm's expf on the rest
        inter = o.shape[0]
        vec = inter - inter % 8
        for i in range(vec):
            o[i] = np.float32(0.0) - gu[i]
        expf_all(o, vec)
        for i in range(vec):
            o[i] = gu[i] / (np.float32(1.0) + o[i]) * gu[inter + i]
        for i in range(vec, inter):
            g = gu[i]
            o[i] = g / (np.float32(1.0) + np.exp(-g)) * gu[inter + i]

    @njit(cache=True, nogil=True)
    def swiglu_nb(gu, out):  # pragma: no cover - compiled
        for r in range(out.shape[0]):
            swiglu_row(gu[r], out[r])

    @njit(cache=True, nogil=True)
    def rope_nb(x, cos, sin, out):  # pragma: no cover - compiled
        R, Hh, hd = x.shape
        for r in range(R):
            for h in range(Hh):
                for j in range(hd // 2):
                    x0 = x[r, h, 2 * j]
                    x1 = x[r, h, 2 * j + 1]
                    out[r, h, 2 * j] = _fma(x0, cos[r, j], -(x1 * sin[r, j]))
                    out[r, h, 2 * j + 1] = _fma(x0, sin[r, j], x1 * cos[r, j])

    @njit(cache=True, nogil=True)
    def rope_tables_nb(base, n_dims, cos, sin):  # pragma: no cover - compiled
        # math.cos / math.sin / ** on float32 are libm's cosf / sinf / powf here (LLVM's f32 intrinsics)
        ts = np.float32(base) ** (np.float32(-2.0) / np.float32(n_dims))
        for p in range(cos.shape[0]):
            th = np.float32(p)
            for i in range(n_dims // 2):
                cos[p, i] = np.cos(th)
                sin[p, i] = np.sin(th)
                th = th * ts

    @njit(cache=True, nogil=True)
    def attend_task(q, K, V, row_slot, row_pos, scale, batch, out, r, h, g0, g1, p, acc):  # pragma: no cover
        # row r, kv head h: its query heads g0 .. g1 - 1 (of the G sharing h) over keys 0 .. row_pos[r] of its
        # slot; each head's arithmetic is the same whichever task holds it. Scratch: p [>= T + 8] zeros (left
        # zero), acc [32, hd]
        H, hd = q.shape[1], q.shape[2]
        G = H // K.shape[1]
        width = 8 if batch else 32
        T = row_pos[r] + 1
        kb = K[row_slot[r], h]
        vb = V[row_slot[r], h]
        kf = kb.reshape(-1)
        vf = vb.reshape(-1)
        qf = q.reshape(-1)
        for g in range(g0, g1):
            qo = (r * H + h * G + g) * hd
            if hd == 64:  # the query held in registers across the positions: the same sums
                best = _scores64(kf, 0, qf, qo, T, scale, p, vf, 0)
            else:
                best = np.float32(-np.inf)
                for j in range(T):
                    s = _dot(kf, j * hd, qf, qo, hd) * scale
                    p[j] = s
                    if s > best:
                        best = s
            for j in range(T):
                p[j] = p[j] - best
            expf_all(p, T)
            tot = 0.0
            for j in range(0, T, 8):  # p[T:] is 0: a partial group adds zeros
                tot += np.float64(hsum8(p, j))
            inv = np.float32(1.0 / tot)
            for j in range(T):
                p[j] = p[j] * inv
            if hd == 64:  # lane by lane, a lane's sums in registers: the same chains
                _vsum64(vf, 0, p, T, width, acc.reshape(-1))
            else:
                for l in range(width):
                    for d in range(hd):
                        acc[l, d] = np.float32(0.0)
                for j in range(T):
                    l = j % width
                    w = p[j]
                    for d in range(hd):
                        acc[l, d] = _fma(vb[j, d], w, acc[l, d])
            o = h * G + g
            if batch:  # tinyBLAS's hsum of the 8 lanes, for every d at once
                for d in range(hd):
                    out[r, o, d] = ((acc[0, d] + acc[4, d]) + (acc[2, d] + acc[6, d])) + \
                        ((acc[1, d] + acc[5, d]) + (acc[3, d] + acc[7, d]))
            else:  # GGML_F32x8_REDUCE of the 32 lanes (see `_reduce32`), for every d at once
                for d in range(hd):
                    t0 = ((acc[0, d] + acc[16, d]) + (acc[8, d] + acc[24, d])) + \
                        ((acc[4, d] + acc[20, d]) + (acc[12, d] + acc[28, d]))
                    t1 = ((acc[1, d] + acc[17, d]) + (acc[9, d] + acc[25, d])) + \
                        ((acc[5, d] + acc[21, d]) + (acc[13, d] + acc[29, d]))
                    t2 = ((acc[2, d] + acc[18, d]) + (acc[10, d] + acc[26, d])) + \
                        ((acc[6, d] + acc[22, d]) + (acc[14, d] + acc[30, d]))
                    t3 = ((acc[3, d] + acc[19, d]) + (acc[11, d] + acc[27, d])) + \
                        ((acc[7, d] + acc[23, d]) + (acc[15, d] + acc[31, d]))
                    out[r, o, d] = (t0 + t1) + (t2 + t3)
            for j in range(T):
                p[j] = np.float32(0.0)

    @njit(parallel=True, cache=True, nogil=True)
    def attend_nb(q, K, V, row_slot, row_pos, scale, batch, out):  # pragma: no cover - compiled
        R, hd = q.shape[0], q.shape[2]
        KVH = K.shape[1]
        for task in prange(R * KVH):
            r = task // KVH
            attend_task(q, K, V, row_slot, row_pos, scale, batch, out, r, task - r * KVH, 0, q.shape[1] // KVH,
                        np.zeros(row_pos[r] + 9, np.float32), np.empty((32, hd), np.float32))

    return {"rmsnorm": rmsnorm_nb, "swiglu": swiglu_nb, "rope": rope_nb, "rope_tables": rope_tables_nb,
            "attend": attend_nb}


def available() -> bool:
    """Whether the Numba kernels run (else the NumPy references do)."""
    return _kernels() is not None


# -- entry points ----------------------------------------------------------------------------------
def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, backend: str | None = None) -> np.ndarray:
    """x [R, D] fp32, w [D] -> ggml's RMSNorm times w, [R, D] fp32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    dispatch(_kernels, "rmsnorm", rmsnorm_reference, backend, x, np.ascontiguousarray(w, np.float32), F32(eps), out)
    return out


def swiglu(gu: np.ndarray, backend: str | None = None) -> np.ndarray:
    """gu [R, 2 I] fp32 (gate, then up) -> silu(gate) x up [R, I] (ggml_vec_swiglu_f32)."""
    gu = np.ascontiguousarray(gu, dtype=np.float32)
    out = np.empty((gu.shape[0], gu.shape[1] // 2), np.float32)
    dispatch(_kernels, "swiglu", swiglu_reference, backend, gu, out)
    return out


def rope_tables(base: float, n_dims: int, n_pos: int, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_pos, n_dims / 2] fp32 as ggml's rope cache holds them for positions 0 .. n_pos - 1."""
    cos = np.empty((n_pos, n_dims // 2), np.float32)
    sin = np.empty_like(cos)
    ref = lambda b, n, c, s: rope_tables_reference(b, n, c.shape[0], c, s)  # noqa: E731
    dispatch(_kernels, "rope_tables", ref, backend, float(base), int(n_dims), cos, sin)
    return cos, sin


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, backend: str | None = None) -> np.ndarray:
    """x [R, heads, hd] fp32; cos, sin [R, hd / 2] (the table rows of each row's position) -> rotated x."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    dispatch(_kernels, "rope", rope_reference, backend, x, np.ascontiguousarray(cos, np.float32),
             np.ascontiguousarray(sin, np.float32), out)
    return out


def attend(q: np.ndarray, K: np.ndarray, V: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray, scale: float,
           batch: bool = False, backend: str | None = None) -> np.ndarray:
    """`atelier_kernels.cpu_decode.attend` with llama.cpp's sums: q [R, H, hd]; K, V [slots, KVH, L, hd] (C-contiguous,
    the rows' K/V already written) -> [R, H, hd]. batch: the weighted sum of V in tinyBLAS's order (llama.cpp
    evaluating several tokens at once), else in ggml_vec_dot_f32's (one token)."""
    out = np.empty(q.shape, np.float32)
    dispatch(_kernels, "attend", attend_reference, backend, np.ascontiguousarray(q, dtype=np.float32), K, V,
             np.asarray(row_slot, dtype=np.int64), np.asarray(row_pos, dtype=np.int64), F32(scale), bool(batch), out)
    return out


def warm() -> list[str]:
    """Compile the kernels once with the engine's argument types (Numba's on-disk cache keeps them)."""
    if not available():
        return []
    x = np.ones((2, 64), np.float32)
    rmsnorm(x, x[0], 1e-5)
    swiglu(np.ones((1, 24), np.float32))
    c, s = rope_tables(10000.0, 8, 2)
    rope(np.ones((1, 1, 8), np.float32), c[:1], s[:1])
    kv = np.ones((1, 1, 3, 8), np.float32)
    for batch in (False, True):
        attend(np.ones((1, 2, 8), np.float32), kv, kv, np.array([0]), np.array([2]), 0.5, batch)
    return ["ggml_rmsnorm", "ggml_swiglu", "ggml_rope", "ggml_attend"]


def _register() -> None:
    from .registry import Kernel, register

    def exact(got: object, want: object) -> None:
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            np.testing.assert_array_equal(g, w)

    def norm_cases(device: str, large: bool):  # noqa: ANN202
        rng = np.random.default_rng(31)
        for R, D in [(1, 576), (3, 37), (2, 2048)]:
            x = (rng.standard_normal((R, D)) * rng.uniform(0.01, 30)).astype(np.float32)
            yield (x, rng.standard_normal(D).astype(np.float32), 1e-5), f"{R} x {D}"

    def swiglu_cases(device: str, large: bool):  # noqa: ANN202
        rng = np.random.default_rng(32)
        for R, inter in [(1, 1536), (2, 13), (3, 64)]:
            gu = (rng.standard_normal((R, 2 * inter)) * 6).astype(np.float32)
            gu[0, :4] = [0.0, -95.0, 90.0, -200.0]  # exp's range ends: |n| > 126 and > 192 lanes
            yield (gu,), f"{R} x {inter}"

    def rope_cases(device: str, large: bool):  # noqa: ANN202
        rng = np.random.default_rng(33)
        for base, hd, R, Hh in [(100000.0, 64, 1, 9), (100000.0, 64, 5, 3), (10000.0, 128, 2, 1)]:
            cos, sin = rope_tables(base, hd, 300, backend="numpy")
            pos = rng.integers(0, 300, R)
            yield (rng.standard_normal((R, Hh, hd)).astype(np.float32), cos[pos], sin[pos]), \
                f"{R} rows x {Hh} heads of {hd}"

    def attend_cases(device: str, large: bool):  # noqa: ANN202
        rng = np.random.default_rng(34)
        for hd, T, batch in [(64, 1, False), (64, 37, False), (48, 70, True), (64, 9, True)]:
            K = (rng.standard_normal((2, 2, T + 3, hd)) * 2).astype(np.float32)
            V = rng.standard_normal((2, 2, T + 3, hd)).astype(np.float32)
            q = rng.standard_normal((3, 4, hd)).astype(np.float32)
            yield (q, K, V, np.array([0, 1, 1]), np.array([T - 1, T + 2, 0]), 0.125, batch), \
                f"hd {hd}, {T} keys, {'tinyBLAS' if batch else 'vec_dot'} order"

    register(Kernel("ggml_rmsnorm", "numba", lambda *a: rmsnorm(*a), lambda *a: rmsnorm(*a, backend="numpy"),
                    norm_cases, exact, "llama.cpp's RMSNorm (float64 sum of squares) times the weight"))
    register(Kernel("ggml_swiglu", "numba", lambda gu: swiglu(gu), lambda gu: swiglu(gu, backend="numpy"),
                    swiglu_cases, exact, "silu(gate) x up with ggml_v_expf (AVX2 lanes)"))
    register(Kernel("ggml_rope", "numba", lambda *a: rope(*a), lambda *a: rope(*a, backend="numpy"), rope_cases,
                    exact, "RoPE on adjacent pairs with ggml's fused multiply-adds"))
    register(Kernel("ggml_rope_tables", "numba", lambda *a: rope_tables(*a),
                    lambda *a: rope_tables(*a, backend="numpy"),
                    lambda device, large: iter([((100000.0, 64, 40), "base 1e5, 64 dims, 40 positions"),
                                                ((10000.0, 128, 9), "base 1e4, 128 dims, 9 positions"),
                                                ((500000.0, 96, 3000), "base 5e5, 96 dims, 3000 positions")]),
                    exact, "ggml's rope cache: libm cosf/sinf at fp32 angles"))
    register(Kernel("ggml_attend", "numba", lambda *a: attend(*a), lambda *a: attend(*a, backend="numpy"),
                    attend_cases, exact, "attention with ggml's dot, softmax and sum orders"))


_register()
