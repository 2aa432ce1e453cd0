"""llama.cpp's own compiled CPU functions (the libggml-cpu of llama-cpp-python) through ctypes: the oracle of
the tests that check our K-quant products bit for bit where a NumPy transcription of llama.cpp's AVX2 code
would only be our reading of it.

    y = quantize_q8_k(x)                 # x [K] fp32 -> llama.cpp's block_q8_K bytes (quantize_row_q8_K)
    s = vec_dot("Q5_K", raw_row, y)      # one weight row's raw GGUF blocks . y, as ggml_vec_dot_q5_K_q8_K
    s = vec_dot("Q4_0", raw_row, quantize_q8_0(x))   # ggml_vec_dot_q4_0_q8_0 (a matrix llama.cpp does not repack)
    out = q4_0_repacked(raw, x)          # a Q4_0 matrix as llama.cpp repacks it (rows a multiple of 8) @ x.T:
                                         # its ggml_gemv / ggml_gemm_q4_0_8x8_q8_0 (rows of x in fours, the rest
                                         # one by one), on its own quantize_row_q8_0 / quantize_mat_q8_0_4x8
    out = q4_0_repacked(raw, x, "IQ4_NL")  # the same for an IQ4_NL matrix (ggml_gemv / gemm_iq4_nl_8x8_q8_0)
    s = vec_dot("IQ4_NL", raw_row, quantize_q8_0(x))   # ggml_vec_dot_iq4_nl_q8_0 (a matrix it does not repack)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

Q8K_BYTES = 4 + 256 + 32  # block_q8_K: fp32 d, 256 int8, 16 int16 bsums
Q80_BYTES = 2 + 32  # block_q8_0: fp16 d, 32 int8
# the dot products called, by weight type: (ggml's name, its activations' type)
_TYPES = {"Q4_K": ("q4_K", "q8_K"), "Q5_K": ("q5_K", "q8_K"), "Q6_K": ("q6_K", "q8_K"), "Q3_K": ("q3_K", "q8_K"),
          "Q2_K": ("q2_K", "q8_K"), "Q4_0": ("q4_0", "q8_0"), "Q8_0": ("q8_0", "q8_0"), "IQ4_NL": ("iq4_nl", "q8_0"),
          "IQ4_XS": ("iq4_xs", "q8_K")}


@functools.cache
def _base() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base (the quantizers)."""
    import llama_cpp

    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    for name in ("quantize_iq4_nl", "quantize_iq4_xs"):
        getattr(base, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return base


@functools.cache
def _lib() -> ctypes.CDLL:
    """llama-cpp-python's libggml-cpu (the dot products, the activations' quantizers), initialised."""
    import llama_cpp

    _base()
    cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_cpu_init()  # the fp16 tables the dot products read
    for name in ("quantize_row_q8_K", "quantize_row_q8_0", "ggml_quantize_mat_q8_0_4x8"):
        getattr(cpu, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for name in ("ggml_gemv_q4_0_8x8_q8_0", "ggml_gemm_q4_0_8x8_q8_0", "ggml_gemv_iq4_nl_8x8_q8_0",
                 "ggml_gemm_iq4_nl_8x8_q8_0"):
        getattr(cpu, name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    for name, act in _TYPES.values():
        f = getattr(cpu, f"ggml_vec_dot_{name}_{act}")
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                      ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return cpu


def _quantize_row(name: str, x: np.ndarray, per: int, nbytes: int) -> np.ndarray:
    """One row of activations through llama.cpp's `name` (blocks of `per` values, `nbytes` bytes each)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.zeros(x.size // per * nbytes, np.uint8)
    getattr(_lib(), name)(x.ctypes.data, y.ctypes.data, x.size)
    return y


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """One row of activations (K a multiple of 256) as llama.cpp's Q8_K blocks (its own quantize_row_q8_K)."""
    return _quantize_row("quantize_row_q8_K", x, 256, Q8K_BYTES)


def quantize_iq4_nl(w: np.ndarray, fmt: str = "IQ4_NL") -> np.ndarray:
    """W [N, K] fp32 -> llama.cpp's IQ4_NL blocks [N, K / 32 * 18] (its `quantize_iq4_nl`, no importance matrix);
    fmt "IQ4_XS": its IQ4_XS blocks [N, K / 256 * 136] (`quantize_iq4_xs`)."""
    f = getattr(_base(), f"quantize_{fmt.lower()}")
    w = np.ascontiguousarray(w, np.float32)
    N, K = w.shape
    out = np.zeros((N, K // 32 * 18 if fmt == "IQ4_NL" else K // 256 * 136), np.uint8)
    f(w.ctypes.data, out.ctypes.data, N, K, None)
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """One row of activations (K a multiple of 32) as llama.cpp's Q8_0 blocks (its own quantize_row_q8_0)."""
    return _quantize_row("quantize_row_q8_0", x, 32, Q80_BYTES)


def vec_dot(fmt: str, raw_row: np.ndarray, y: np.ndarray) -> np.float32:
    """llama.cpp's ggml_vec_dot_<fmt>_q8_K (Q4_0: _q8_0) on one weight row (its raw GGUF bytes) and one row of
    activations in those blocks (`quantize_q8_k`, `quantize_q8_0`)."""
    name, act = _TYPES[fmt]
    n = y.size // Q8K_BYTES * 256 if act == "q8_K" else y.size // Q80_BYTES * 32
    raw_row = np.ascontiguousarray(raw_row, np.uint8)
    s = np.zeros(1, np.float32)
    getattr(_lib(), f"ggml_vec_dot_{name}_{act}")(n, s.ctypes.data, 0, raw_row.ctypes.data, 0, y.ctypes.data, 0, 1)
    return s[0]


def _repack_q4_0x8(raw: np.ndarray, xor: int = 0x88) -> np.ndarray:
    """Q4_0 blocks [N, nb * 18] (N a multiple of 8) -> llama.cpp's block_q4_0x8 array (`make_block_q4_0x8`,
    interleave 8): per group of 8 rows and block b, the 8 fp16 scales, then 16 runs of 8 bytes (run i: bytes
    8 (i // 8) .. + 7 of row i % 8's block) XOR 0x88 (signed nibbles for its lookup). IQ4_NL (xor 0): its
    block_iq4_nlx8 (`make_block_iq4_nlx8`), the same runs, the nibbles as they are."""
    N = raw.shape[0]
    blocks = raw.reshape(N // 8, 8, -1, 18).transpose(0, 2, 1, 3)  # [group, block, row, 18]
    d = blocks[..., :2].reshape(*blocks.shape[:2], 16)
    qs = blocks[..., 2:].reshape(*blocks.shape[:2], 8, 2, 8).transpose(0, 1, 3, 2, 4) ^ np.uint8(xor)
    return np.ascontiguousarray(np.concatenate([d, qs.reshape(*blocks.shape[:2], 128)], axis=-1))


def q4_0_repacked(raw: np.ndarray, x: np.ndarray, fmt: str = "Q4_0") -> np.ndarray:
    """x [R, K] fp32 against a Q4_0 (or IQ4_NL) matrix (raw GGUF blocks [N, K / 32 * 18], N a multiple of 8) as
    llama.cpp computes it on x86 with AVX2, the matrix repacked (its default): rows of x in fours through
    `ggml_quantize_mat_q8_0_4x8` and `ggml_gemm_q4_0_8x8_q8_0`, the rest through `quantize_row_q8_0` and
    `ggml_gemv_q4_0_8x8_q8_0` (IQ4_NL: `ggml_gemm` / `ggml_gemv_iq4_nl_8x8_q8_0`) -> [R, N] fp32."""
    lib = _lib()
    x = np.ascontiguousarray(x, np.float32)
    R, K = x.shape
    N = raw.shape[0]
    w = _repack_q4_0x8(np.ascontiguousarray(raw, np.uint8), 0x88 if fmt == "Q4_0" else 0)
    gemm, gemv = (getattr(lib, f"ggml_{g}_{fmt.lower()}_8x8_q8_0") for g in ("gemm", "gemv"))
    out = np.zeros((R, N), np.float32)
    r4 = R - R % 4
    for r in range(0, r4, 4):
        y = np.zeros(K // 32 * 4 * 34, np.uint8)
        lib.ggml_quantize_mat_q8_0_4x8(x[r:r + 4].ctypes.data, y.ctypes.data, K)
        o = np.zeros((4, N), np.float32)
        gemm(K, o.ctypes.data, N, w.ctypes.data, y.ctypes.data, 4, N)
        out[r:r + 4] = o
    for r in range(r4, R):
        y = np.zeros(K // 32 * 34, np.uint8)
        lib.quantize_row_q8_0(x[r].ctypes.data, y.ctypes.data, K)
        o = np.zeros(N, np.float32)
        gemv(K, o.ctypes.data, N, w.ctypes.data, y.ctypes.data, 1, N)
        out[r] = o
    return out
