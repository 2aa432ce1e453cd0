"""llama.cpp's own compiled CPU functions (the libggml-cpu of llama-cpp-python) through ctypes: the oracle of
the tests that check our K-quant products bit for bit where a NumPy transcription of llama.cpp's AVX2 code
would only be our reading of it.

    y = quantize_q8_k(x)                 # x [K] fp32 -> llama.cpp's block_q8_K bytes (quantize_row_q8_K)
    s = vec_dot("Q5_K", raw_row, y)      # one weight row's raw GGUF blocks . y, as ggml_vec_dot_q5_K_q8_K
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

Q8K_BYTES = 4 + 256 + 32  # block_q8_K: fp32 d, 256 int8, 16 int16 bsums
_TYPES = {"Q4_K": "q4_K", "Q5_K": "q5_K", "Q6_K": "q6_K"}


@functools.cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_cpu_init()  # the fp16 tables the dot products read
    cpu.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for name in _TYPES.values():
        f = getattr(cpu, f"ggml_vec_dot_{name}_q8_K")
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                      ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return cpu


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """One row of activations (K a multiple of 256) as llama.cpp's Q8_K blocks (its own quantize_row_q8_K)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.zeros(x.size // 256 * Q8K_BYTES, np.uint8)
    _lib().quantize_row_q8_K(x.ctypes.data, y.ctypes.data, x.size)
    return y


def vec_dot(fmt: str, raw_row: np.ndarray, y: np.ndarray) -> np.float32:
    """llama.cpp's ggml_vec_dot_<fmt>_q8_K on one weight row (its raw GGUF bytes) and one Q8_K row."""
    raw_row = np.ascontiguousarray(raw_row, np.uint8)
    s = np.zeros(1, np.float32)
    getattr(_lib(), f"ggml_vec_dot_{_TYPES[fmt]}_q8_K")(y.size // Q8K_BYTES * 256, s.ctypes.data, 0,
                                                        raw_row.ctypes.data, 0, y.ctypes.data, 0, 1)
    return s[0]
