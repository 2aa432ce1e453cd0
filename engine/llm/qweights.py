"""Weights kept in their GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): the packed
matrix, its NumPy oracle, and the torch modules the decoder holds instead of `nn.Linear` / `nn.Embedding`.

    pm = Packed.from_gguf(tensor)           # a gguf.ReaderTensor [N, K] -> blocks split into qs / d / m
    y = pm.matmul(x)                        # x [R, K] fp32 -> [R, N] fp32 (`atelier_kernels.cpu_qmatmul`)
    w = pm.dequant()                        # fp32 [N, K] (tests, and the torch forward's scratch rows)

What it knows: llama.cpp's block layouts (see `atelier_kernels.cpu_qmatmul`) and how to
split a GGUF tensor's raw bytes into the arrays the kernels read: the nibble or
int8 bytes, and the fp16 scales (and mins) as their uint16 bits; for the K
formats also the packed sub-block scales (`sc`) and Q6_K's high bits (`qh`);
Q5_0 / Q5_1 keep each block's 4 bytes of high bits after its 16 nibble bytes, Q5_K each super-block's 32
after its 128, Q3_K its 32 hmask bytes after its 64 bytes of 2-bit values.
The split adds no byte: resident size = the tensor's size in the file.
`quantize` writes Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 with llama.cpp's rounding (`gguf.quants`) and
the K formats with a plain min/max search of our own (`quantize_k`; the `gguf`
package only decodes those).

How the decoder uses them: `PackedLinear` replaces `nn.Linear`. A product
with few rows (a decode step, a batch of up to 8, a draft check, a prompt up
to `DIRECT_ROWS` tokens) runs on the packed blocks directly. A longer prompt
through the torch forward is compute-bound, so there each weight matrix is
de-quantised transiently, a chunk of at most `SCRATCH_ELEMS` values at a time,
into one scratch buffer shared by the whole model, and multiplied with torch's
GEMM; no fp32 copy of the model ever exists. `PackedEmbedding` de-quantises
only the rows it looks up, and serves the tied output head the same way.

What it does not know: GGUF files (`engine.llm.gguf_load`), the network (`engine.llm.model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atelier_kernels import cpu_qmatmul

FORMATS = cpu_qmatmul.ALL_FORMATS
# bytes per block of 32: Q8_0 = d + 32 int8; Q4_0 = d + 16 nibble bytes; Q4_1 = d + m + 16; Q5_0 = d + 4 bytes
# of high bits + 16 nibble bytes; Q5_1 = d + m + 4 + 16; per super-block of 256: Q4_K = d + dmin + 12 scale
# bytes + 128; Q5_K = d + dmin + 12 scale bytes + 32 qh + 128; Q6_K = 128 ql + 64 qh + 16 scales + d
# Q3_K = 32 hmask + 64 + 12 scale bytes + d; Q2_K = 16 scale bytes + 64 + d + dmin; IQ4_NL = d + 16 nibble bytes
# (indices into its 16 non-uniform values); IQ4_XS = d + 2 + 4 bytes of 6-bit sub-block scales + 128 nibble bytes
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "IQ4_NL": 18, "Q4_K": 144, "Q5_K": 176,
               "Q6_K": 210, "Q3_K": 110, "Q2_K": 84, "IQ4_XS": 136}
BLOCK_VALUES = cpu_qmatmul.BLOCK_VALUES
DIRECT_ROWS = 64
SCRATCH_ELEMS = 1 << 21  # 8 MB of fp32


class UnsupportedFormat(ValueError):
    """A tensor's block type is not one we keep packed."""


@dataclass
class Packed:
    """A weight matrix W [N, K] in blocks of 32 (K % 32 == 0) or super-blocks of 256 (the K formats) along K."""

    fmt: str
    # uint8 [N, K/32, 16] (Q4_0/Q4_1/IQ4_NL), [N, K/32, 20] (Q5_0/Q5_1: nibbles, high bits), int8 [N, K/32, 32]
    # (Q8_0), uint8 [N, K/256, 128] (Q4_K, Q6_K ql, IQ4_XS), [N, K/256, 160] (Q5_K: nibbles, high bits),
    # [N, K/256, 96] (Q3_K: 2-bit values, hmask), [N, K/256, 64] (Q2_K)
    qs: np.ndarray
    d: np.ndarray  # uint16 [N, nb]: fp16 scale bits
    m: np.ndarray | None = None  # uint16 [N, nb]: fp16 min bits (Q4_1, Q5_1), dmin bits (Q2_K, Q4_K, Q5_K)
    # uint8 [N, nb, 12] (Q3_K/Q4_K/Q5_K packed 6-bit scales/mins), int8 [N, nb, 16] (Q6_K), uint8 [N, nb, 16] (Q2_K),
    # uint8 [N, nb, 6] (IQ4_XS: scales_h, scales_l)
    sc: np.ndarray | None = None
    qh: np.ndarray | None = None  # uint8 [N, nb, 64]: Q6_K's high 2 bits

    def _arrays(self) -> list[tuple[str, np.ndarray]]:
        return [(k, a) for k in ("qs", "d", "m", "sc", "qh") if (a := getattr(self, k)) is not None]

    def interleaved(self, on: bool) -> Packed:
        """Q4_1 rows as Q4_1x8 (on: `cpu_qmatmul.interleave_q41`, rows a multiple of 8) or back (off); any other
        matrix as it is. A new Packed (new arrays) where the layout changes, else self."""
        if on and self.fmt == "Q4_1" and self.qs.shape[0] % 8 == 0:
            return Packed(cpu_qmatmul.X8_FORMAT, *cpu_qmatmul.interleave_q41(self.qs, self.d, self.m))
        if not on and self.fmt == cpu_qmatmul.X8_FORMAT:
            return Packed("Q4_1", *cpu_qmatmul.deinterleave_q41(self.qs, self.d, self.m))
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * BLOCK_VALUES[self.fmt]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self._arrays())

    @classmethod
    def from_blocks(cls, fmt: str, raw: np.ndarray) -> Packed:
        """raw: uint8 [N, (K/32) * block bytes], llama.cpp's block layout -> split arrays (one copy; Q5_0 /
        Q5_1 keep the nibbles and the high bits together, nibbles first: `cpu_qmatmul`'s layout)."""
        if fmt not in BLOCK_BYTES:
            raise UnsupportedFormat(f"block type {fmt} (kept packed: {', '.join(FORMATS)})")
        bb = BLOCK_BYTES[fmt]
        raw = np.asarray(raw, dtype=np.uint8)
        if raw.ndim != 2 or raw.shape[1] % bb:
            raise ValueError(f"{fmt} bytes of shape {raw.shape}: rows are not whole {bb}-byte blocks")
        N, nb = raw.shape[0], raw.shape[1] // bb
        blk = raw.reshape(N, nb, bb)
        d = np.ascontiguousarray(blk[..., 0:2]).view(np.uint16).reshape(N, nb)
        if fmt == "Q5_0":  # d, qh (4 bytes), 16 nibble bytes -> qs = nibbles + qh
            return cls(fmt, np.concatenate([blk[..., 6:22], blk[..., 2:6]], axis=-1), d)
        if fmt == "Q8_0":
            return cls(fmt, np.ascontiguousarray(blk[..., 2:]).view(np.int8), d)
        if fmt in ("Q4_0", "IQ4_NL"):
            return cls(fmt, np.ascontiguousarray(blk[..., 2:]), d)
        if fmt == "IQ4_XS":  # d, scales_h (2 bytes), scales_l (4), 128 nibble bytes
            return cls(fmt, np.ascontiguousarray(blk[..., 8:]), d, sc=np.ascontiguousarray(blk[..., 2:8]))
        if fmt == "Q6_K":
            return cls(fmt, np.ascontiguousarray(blk[..., :128]),
                       np.ascontiguousarray(blk[..., 208:210]).view(np.uint16).reshape(N, nb),
                       sc=np.ascontiguousarray(blk[..., 192:208]).view(np.int8),
                       qh=np.ascontiguousarray(blk[..., 128:192]))
        m = np.ascontiguousarray(blk[..., 2:4]).view(np.uint16).reshape(N, nb)
        if fmt == "Q4_K":
            return cls(fmt, np.ascontiguousarray(blk[..., 16:]), d, m, sc=np.ascontiguousarray(blk[..., 4:16]))
        if fmt == "Q3_K":  # 32 hmask bytes, 64 bytes of 2-bit values, 12 scale bytes, d -> qs = values + hmask
            return cls(fmt, np.concatenate([blk[..., 32:96], blk[..., 0:32]], axis=-1),
                       np.ascontiguousarray(blk[..., 108:110]).view(np.uint16).reshape(N, nb),
                       sc=np.ascontiguousarray(blk[..., 96:108]))
        if fmt == "Q2_K":  # 16 scale bytes, 64 bytes of 2-bit values, d, dmin
            return cls(fmt, np.ascontiguousarray(blk[..., 16:80]),
                       np.ascontiguousarray(blk[..., 80:82]).view(np.uint16).reshape(N, nb),
                       np.ascontiguousarray(blk[..., 82:84]).view(np.uint16).reshape(N, nb),
                       sc=np.ascontiguousarray(blk[..., 0:16]))
        if fmt == "Q5_K":  # d, dmin, 12 scale bytes, 32 bytes of high bits, 128 nibble bytes -> qs = nibbles + qh
            return cls(fmt, np.concatenate([blk[..., 48:], blk[..., 16:48]], axis=-1), d, m,
                       sc=np.ascontiguousarray(blk[..., 4:16]))
        if fmt == "Q5_1":  # d, m, qh (4 bytes), 16 nibble bytes
            return cls(fmt, np.concatenate([blk[..., 8:24], blk[..., 4:8]], axis=-1), d, m)
        return cls(fmt, np.ascontiguousarray(blk[..., 4:]), d, m)

    @classmethod
    def quantize(cls, w: np.ndarray, fmt: str) -> Packed:
        """fp32 W [N, K] (K a multiple of the block) -> `fmt` blocks (`quantize_blocks`)."""
        return cls.from_blocks(fmt, quantize_blocks(w, fmt))

    def rows(self, index: np.ndarray | slice) -> Packed:
        """A row subset (a copy for an index array, a view for a slice; Q4_1x8: of the Q4_1 rows)."""
        if self.fmt == cpu_qmatmul.X8_FORMAT:  # the groups of 8 holding those rows de-interleaved (a copy)
            idx = np.arange(self.qs.shape[0])[index]
            groups, where = np.unique(idx // 8, return_inverse=True)
            rows8 = (groups[:, None] * 8 + np.arange(8)).reshape(-1)
            q, d, m = cpu_qmatmul.deinterleave_q41(self.qs[rows8], self.d[rows8], self.m[rows8])
            pick = where.reshape(-1) * 8 + idx % 8
            return Packed("Q4_1", q[pick], d[pick], m[pick])
        return Packed(self.fmt, **{k: a[index] for k, a in self._arrays()})

    @staticmethod
    def concat(parts: list[Packed]) -> Packed:
        """Rows of several matrices of one format, stacked (fused q/k/v, gate/up)."""
        parts = [p.interleaved(False) for p in parts]
        fmts = {p.fmt for p in parts}
        if len(fmts) != 1:
            raise ValueError(f"cannot stack formats {sorted(fmts)}")
        return Packed(parts[0].fmt, **{k: np.concatenate([getattr(p, k) for p in parts])
                                       for k, _ in parts[0]._arrays()})

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [R, K] fp32 -> x @ W.T [R, N] fp32."""
        return cpu_qmatmul.matmul(self.fmt, x, self.qs, self.d, self.m, out=out, sc=self.sc, qh=self.qh)

    def dequant(self, n0: int = 0, n1: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows n0..n1 as fp32 [n1 - n0, K]."""
        return cpu_qmatmul.dequant(self.fmt, self.qs, self.d, self.m, n0, n1, out=out, sc=self.sc, qh=self.qh)

    def dequant64(self) -> np.ndarray:
        """The whole matrix in float64 (the NumPy oracle)."""
        return cpu_qmatmul.dequant_reference(self.fmt, self.qs, self.d, self.m, self.sc, self.qh)


def quantize_blocks(w: np.ndarray, fmt: str) -> np.ndarray:
    """fp32 W [N, K] (K a multiple of the block) -> its `fmt` blocks as a GGUF stores them, uint8 [N, K / block x
    bytes]: Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 with llama.cpp's rounding (`gguf.quants.quantize`), the K formats with
    `quantize_k`, IQ4_NL and IQ4_XS with `quantize_iq4_nl`."""
    if fmt not in BLOCK_BYTES:
        raise UnsupportedFormat(f"block type {fmt} (kept packed: {', '.join(FORMATS)})")
    w = np.ascontiguousarray(w, dtype=np.float32)
    qk = BLOCK_VALUES[fmt]
    if w.ndim != 2 or w.shape[1] % qk:
        raise ValueError(f"a matrix of shape {w.shape}: rows must be whole blocks of {qk}")
    if fmt in ("IQ4_NL", "IQ4_XS"):
        return quantize_iq4_nl(w, super_block=fmt == "IQ4_XS")
    if fmt in cpu_qmatmul.K_FORMATS:
        return quantize_k(w, fmt)
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(w, getattr(GGMLQuantizationType, fmt))


def quantize_iq4_nl(w: np.ndarray, super_block: bool = False) -> np.ndarray:
    """fp32 W [N, K] (K a multiple of 32) -> IQ4_NL blocks [N, K / 32 * 18] (gguf's quantizer has none):
    llama.cpp's search without an importance matrix (`quantize_row_iq4_nl_impl`, ntry 7) in float64: per block of
    32, weights x^2, the scale d = max / 127 (max: the value of largest magnitude) and 1 / d = (t - 127) / max
    for t in -7..7 tried, each value its nearest table entry, the least-squares d of the try that fits best
    kept (fp16), the values then re-chosen against it. super_block: IQ4_XS blocks [N, K / 256 * 136] (K a
    multiple of 256): the same per block of 32, then the super-block's d = -(the block scale of largest
    magnitude) / 32 (fp16), each block's scale rounded to an integer l in -32..31 of d, its values re-chosen
    against d x l."""
    from atelier_kernels._numba import IQ4NL_VALUES

    lut = np.asarray(IQ4NL_VALUES, np.float64)
    mid = (lut[1:] + lut[:-1]) / 2  # nearest table entry: ggml's best_index_int8 (a tie takes the upper one)
    x = np.asarray(w, np.float64).reshape(w.shape[0], -1, 32)
    N, nb = x.shape[:2]
    wt = x * x
    amax_i = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, amax_i[..., None], -1)[..., 0]
    live = np.abs(vmax) >= 1e-15  # ggml's GROUP_MAX_EPS: an all-(near-)zero block gets d = 0
    safe = np.where(live, vmax, 1.0)

    def nearest(inv: np.ndarray) -> np.ndarray:  # each value's table index for 1 / d = inv
        return np.searchsorted(mid, x * inv[..., None], side="right").astype(np.uint8)

    def fit(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # -> (sum w q x, sum w q^2) for 1 / d = inv
        v = lut[nearest(inv)]
        return (wt * v * x).sum(-1), (wt * v * v).sum(-1)

    def recip(v: np.ndarray) -> np.ndarray:
        return np.where(v != 0, 1.0 / np.where(v != 0, v, 1.0), 0.0)

    sqx, sq2 = fit(127.0 / safe)
    d = np.where(sq2 > 0, sqx / np.where(sq2 > 0, sq2, 1.0), 0.0)
    best = d * sqx
    for t in range(-7, 8):
        sqx, sq2 = fit((t - 127.0) / safe)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, sqx / np.where(sq2 > 0, sq2, 1.0), d)
        best = np.where(better, d * sqx, best)
    d = np.where(live, d, 0.0)
    if not super_block:
        q = nearest(recip(d))
        nib = q[..., :16] | (q[..., 16:] << 4)
        d16 = d.astype(np.float16).view(np.uint8).reshape(N, nb, 2)
        return np.ascontiguousarray(np.concatenate([d16, nib], -1)).reshape(N, nb * 18)
    ns = nb // 8
    ds = d.reshape(N, ns, 8)
    big = np.take_along_axis(ds, np.abs(ds).argmax(-1)[..., None], -1)[..., 0]
    dsb = -big / 32  # the super-block's scale (fp32 in llama.cpp; stored as fp16)
    ls = np.clip(np.rint(ds * recip(dsb)[..., None]), -32, 31)  # ggml's nearest_int: ties to even
    q = nearest(recip(dsb[..., None] * ls).reshape(N, nb)).reshape(N, ns, 8, 32)
    nib = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, ns, 128)
    lu = (ls + 32).astype(np.int64)  # 0..63: low 4 bits in scales_l (two per byte), high 2 in scales_h
    sl = ((lu[..., 0::2] & 15) | ((lu[..., 1::2] & 15) << 4)).astype(np.uint8)  # [N, ns, 4]
    sh = ((lu >> 4) << (2 * np.arange(8))).sum(-1).astype(np.uint16)  # [N, ns]
    d16 = dsb.astype(np.float16).view(np.uint8).reshape(N, ns, 2)
    blk = np.concatenate([d16, sh[..., None].view(np.uint8).reshape(N, ns, 2), sl, nib], -1)
    return np.ascontiguousarray(blk).reshape(N, ns * 136)


def quantize_k(w: np.ndarray, fmt: str) -> np.ndarray:
    """fp32 W [N, K] (K % 256 == 0) -> raw K-format blocks uint8 [N, K/256 * block bytes] in llama.cpp's
    layout. A plain search, not llama.cpp's iterative one: Q4_K (Q5_K) takes each 32-value sub-block's min/max
    (scale (max - min)/15 (/31), min -min(min, 0)) and quantises the scales and mins to 6 bits against the
    super-block's largest; Q6_K takes each 16-value group's absmax / 31 as an int8 scale against the
    super-block's largest, Q3_K its absmax / 4 as a signed 6-bit scale (values -4..3), Q2_K its min/max as
    Q4_K does a sub-block's, with 4-bit scales and mins (values 0..3). The values are then rounded against the
    quantised scales."""
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    nb = K // 256
    x = w.reshape(N, nb, 256).astype(np.float64)
    if fmt in ("Q4_K", "Q5_K"):
        top = 15 if fmt == "Q4_K" else 31
        sub = x.reshape(N, nb, 8, 32)
        lo = np.minimum(sub.min(-1), 0.0)
        scale = (sub.max(-1) - lo) / top
        mins = -lo
        d = (scale.max(-1) / 63.0 * (1 + 2.0 ** -10)).astype(np.float16)  # rounded up in fp16
        dmin = (mins.max(-1) / 63.0 * (1 + 2.0 ** -10)).astype(np.float16)
        d64, dm64 = d.astype(np.float64)[..., None], dmin.astype(np.float64)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.where(d64 > 0, np.clip(np.ceil(scale / d64), 0, 63), 0).astype(np.int64)
            lm = np.where(dm64 > 0, np.clip(np.ceil(mins / dm64), 0, 63), 0).astype(np.int64)
            step = (d64 * ls)[..., None]
            q = np.where(step > 0, np.rint((sub + (dm64 * lm)[..., None]) / step), 0)
        q = np.clip(q, 0, top).astype(np.uint8).reshape(N, nb, 4, 2, 32)
        qs = ((q[:, :, :, 0] & 15) | ((q[:, :, :, 1] & 15) << 4)).reshape(N, nb, 128)
        # Q5_K: bit j of qh[l] is bit 4 of sub-block j's value l
        qh = ((q.reshape(N, nb, 8, 32) >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(2, dtype=np.uint8)
        sc = np.empty((N, nb, 12), np.uint8)
        sc[..., 0:4] = (ls[..., 0:4] & 63) | ((ls[..., 4:8] >> 4) << 6)
        sc[..., 4:8] = (lm[..., 0:4] & 63) | ((lm[..., 4:8] >> 4) << 6)
        sc[..., 8:12] = (ls[..., 4:8] & 15) | ((lm[..., 4:8] & 15) << 4)
        blk = np.concatenate([d.view(np.uint8).reshape(N, nb, 2), dmin.view(np.uint8).reshape(N, nb, 2), sc]
                             + ([qh] if fmt == "Q5_K" else []) + [qs], -1)
    elif fmt == "Q6_K":
        grp = x.reshape(N, nb, 16, 16)
        scale = np.abs(grp).max(-1) / 31.0
        d = (scale.max(-1) / 127.0 * (1 + 2.0 ** -10)).astype(np.float16)
        d64 = d.astype(np.float64)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.where(d64 > 0, np.clip(np.ceil(scale / d64), 0, 127), 0).astype(np.int64)
            step = (d64 * ls)[..., None]
            q = np.where(step != 0, np.rint(grp / step), 0)
        q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(N, nb, 2, 4, 32)  # [.., h, g, l]
        lo4 = q & 15
        ql = np.stack([lo4[:, :, :, 0] | (lo4[:, :, :, 2] << 4), lo4[:, :, :, 1] | (lo4[:, :, :, 3] << 4)], 3)
        qh = (q[:, :, :, 0] >> 4) | ((q[:, :, :, 1] >> 4) << 2) | ((q[:, :, :, 2] >> 4) << 4) \
            | ((q[:, :, :, 3] >> 4) << 6)
        blk = np.concatenate([ql.reshape(N, nb, 128), qh.reshape(N, nb, 64),
                              ls.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(N, nb, 2)], -1)
    elif fmt in ("Q3_K", "Q2_K"):
        grp = x.reshape(N, nb, 16, 16)
        if fmt == "Q3_K":
            scale = np.abs(grp).max(-1) / 4.0
            d = (scale.max(-1) / 31.0 * (1 + 2.0 ** -10)).astype(np.float16)
            d64 = d.astype(np.float64)[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(d64 > 0, np.clip(np.ceil(scale / d64), 0, 31), 0).astype(np.int64)
                step = (d64 * ls)[..., None]
                q = np.where(step > 0, np.rint(grp / step), 0)
            q = np.clip(q, -4, 3).astype(np.int64).reshape(N, nb, 2, 4, 32)  # [.., h, j, l]
            hbit = (q >= 0).astype(np.int64)
            u = ls + 32  # the stored six-bit scales
            sc = np.empty((N, nb, 12), np.int64)
            sc[..., 0:8] = (u[..., 0:8] & 15) | ((u[..., 8:16] & 15) << 4)
            sc[..., 8:12] = sum(((u[..., 4 * i:4 * i + 4] >> 4) & 3) << (2 * i) for i in range(4))
            hm = sum(hbit[:, :, h, j] << (4 * h + j) for h in range(2) for j in range(4))  # [N, nb, 32]
            q2 = q & 3
            qs = sum(q2[:, :, :, j] << (2 * j) for j in range(4)).reshape(N, nb, 64)  # [.., h, l] -> 64
            blk = np.concatenate([hm.astype(np.uint8), qs.astype(np.uint8), sc.astype(np.uint8),
                                  d.view(np.uint8).reshape(N, nb, 2)], -1)
        else:
            lo = np.minimum(grp.min(-1), 0.0)
            scale, mins = (grp.max(-1) - lo) / 3.0, -lo
            d = (scale.max(-1) / 15.0 * (1 + 2.0 ** -10)).astype(np.float16)
            dmin = (mins.max(-1) / 15.0 * (1 + 2.0 ** -10)).astype(np.float16)
            d64, dm64 = d.astype(np.float64)[..., None], dmin.astype(np.float64)[..., None]
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(d64 > 0, np.clip(np.ceil(scale / d64), 0, 15), 0).astype(np.int64)
                lm = np.where(dm64 > 0, np.clip(np.ceil(mins / dm64), 0, 15), 0).astype(np.int64)
                step = (d64 * ls)[..., None]
                q = np.where(step > 0, np.rint((grp + (dm64 * lm)[..., None]) / step), 0)
            q = np.clip(q, 0, 3).astype(np.int64).reshape(N, nb, 2, 4, 32)
            qs = sum(q[:, :, :, j] << (2 * j) for j in range(4)).reshape(N, nb, 64)
            blk = np.concatenate([(ls | (lm << 4)).astype(np.uint8), qs.astype(np.uint8),
                                  d.view(np.uint8).reshape(N, nb, 2), dmin.view(np.uint8).reshape(N, nb, 2)], -1)
    else:
        raise UnsupportedFormat(f"quantize_k: block type {fmt} (K formats: {', '.join(cpu_qmatmul.K_FORMATS)})")
    return np.ascontiguousarray(blk, dtype=np.uint8).reshape(N, nb * BLOCK_BYTES[fmt])


class Scratch:
    """One reusable fp32 buffer per model for the torch forward's transient de-quantised rows."""

    def __init__(self, elems: int = SCRATCH_ELEMS) -> None:
        self.elems = elems
        self._buf: np.ndarray | None = None

    def rows_for(self, k: int) -> int:
        return max(1, self.elems // k)

    def get(self, n: int, k: int) -> np.ndarray:
        if self._buf is None:
            self._buf = np.empty(self.elems if n * k <= self.elems else n * k, np.float32)
        return self._buf[:n * k].reshape(n, k)


class PackedLinear(nn.Module):
    """`nn.Linear` over parts of packed rows (one `Packed` each, stacked along the output); fp32 bias."""

    def __init__(self, parts: list[Packed], bias: torch.Tensor | None, scratch: Scratch) -> None:
        super().__init__()
        self.parts = parts
        ks = {p.shape[1] for p in parts}
        if len(ks) != 1:
            raise ValueError(f"parts with different input widths {sorted(ks)}")
        self.in_features = ks.pop()
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        self.scratch = scratch
        # or "q8": the parts take Q8 activations (`set_activations`)
        self.activations = "fp32"
        self.placed: list[tuple] | None = None  # the parts on a device (`place`), else None: the CPU arrays
        self.placed_impl = ""
        self._register_parts()

    def _register_parts(self) -> None:
        # the packed arrays as buffers (shared memory): size_bytes() and the registry count them
        for name in [n for n in self._buffers if n.startswith("p")]:
            del self._buffers[name]
        for i, p in enumerate(self.parts):
            for name, a in p._arrays():
                self.register_buffer(f"p{i}_{name}", torch.from_numpy(a.view(np.uint8)), persistent=False)

    def interleave(self, on: bool, keep: set[int] = frozenset()) -> None:
        """Lay the Q4_1 parts out as Q4_1x8 (on) or as llama.cpp's Q4_1 (off): `Packed.interleaved`, one part at
        a time (a part's old arrays go once it is replaced). keep: ids of qs arrays left as they are (a tied
        head's table, which the embedding also reads)."""
        if self.placed is not None:
            return
        new = [p if id(p.qs) in keep else p.interleaved(on) for p in self.parts]
        if any(a is not b for a, b in zip(new, self.parts)):
            self.parts = new
            self._register_parts()

    @property
    def formats(self) -> list[str]:
        return [p.fmt for p in self.parts]

    def matmul_np(self, x: np.ndarray, prompt: bool = False) -> np.ndarray:
        """x [R, in] fp32 -> [R, out] fp32 on the packed blocks (bias included). prompt: the rows are tokens of
        one sequence (`cpu_qmatmul.matmul_q8`)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.out_features), np.float32)
        o = 0
        q8 = self.activations == "q8"
        for p in self.parts:
            n = p.shape[0]
            if q8 and (p.fmt in cpu_qmatmul.Q8A_FORMATS or p.fmt == cpu_qmatmul.X8_FORMAT):
                y = cpu_qmatmul.matmul_q8(p.fmt, x, p.qs, p.d, p.m, out=out if len(self.parts) == 1 else None,
                                          sc=p.sc, qh=p.qh, prompt=prompt)
            else:
                y = p.matmul(x, out=out if len(self.parts) == 1 else None)
            if len(self.parts) > 1:
                out[:, o:o + n] = y
            o += n
        if self.bias is not None:
            out += self.bias.numpy()
        return out

    def place(self, device: torch.device, dtype: torch.dtype, impl: str) -> None:
        """Hold the parts on `device` for the torch forward (`place_model`): Q8_0 / Q4_0 / Q4_1 parts as their
        blocks, multiplied by `atelier_kernels.wq_matmul` (impl "triton"; "torch": its float64 twin, for tests), any
        other block type (Q4_K, Q6_K) de-quantised once into a `dtype` matrix. The CPU buffers go (a placed
        module does not run on the CPU arrays' products any more); `parts` stay for `weight_formats`."""
        from atelier_kernels import wq_matmul

        for name in [n for n in self._buffers if n.startswith("p")]:
            del self._buffers[name]
        self.parts = [p.interleaved(False) for p in self.parts]  # (the device kernels read llama.cpp's layout)
        self.placed, self.placed_impl = [], impl
        for i, p in enumerate(self.parts):
            if p.fmt in wq_matmul.FORMATS:
                arrays = [torch.from_numpy(np.ascontiguousarray(p.qs)).to(device),
                          torch.from_numpy(p.d.view(np.int16)).to(device),
                          None if p.m is None else torch.from_numpy(p.m.view(np.int16)).to(device)]
                for name, t in zip(("qs", "d", "m"), arrays):
                    if t is not None:
                        self.register_buffer(f"g{i}_{name}", t, persistent=False)
                self.placed.append((p.fmt, *arrays))
            else:
                w = torch.from_numpy(p.dequant()).to(device=device, dtype=dtype)
                self.register_buffer(f"g{i}_w", w, persistent=False)
                self.placed.append(("dense", w, None, None))
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().to(device=device, dtype=dtype), requires_grad=False)

    def _placed_forward(self, x2: torch.Tensor) -> torch.Tensor:
        from atelier_kernels import wq_matmul

        ys = [torch.nn.functional.linear(x2, qs) if fmt == "dense" else
              wq_matmul.matmul(x2, fmt, qs, d, m, backend=self.placed_impl)
              for fmt, qs, d, m in self.placed]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.placed is not None:
            return self._placed_forward(x2).view(*lead, self.out_features)
        if x2.device.type == "cpu" and x2.shape[0] <= DIRECT_ROWS:
            y = torch.from_numpy(self.matmul_np(x2.detach().float().numpy()))
            return y.to(x.dtype).view(*lead, self.out_features)
        return self._dequant_forward(x2).view(*lead, self.out_features)

    def _dequant_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows: chunks of W de-quantised into the shared scratch, then torch's GEMM."""
        out = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        step = self.scratch.rows_for(self.in_features)
        o = 0
        for p in self.parts:
            n = p.shape[0]
            for n0 in range(0, n, step):
                n1 = min(n, n0 + step)
                w = p.dequant(n0, n1, out=self.scratch.get(n1 - n0, self.in_features))
                wt = torch.from_numpy(w).to(device=x2.device, dtype=x2.dtype)
                torch.matmul(x2, wt.T, out=out[:, o + n0:o + n1])
            o += n
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out


class PackedEmbedding(nn.Module):
    """`nn.Embedding` on packed rows: a lookup de-quantises only the rows asked for; `linear` is the tied
    output head (x @ E.T) on the same blocks."""

    def __init__(self, table: Packed, scratch: Scratch) -> None:
        super().__init__()
        self.table = table
        self.head = PackedLinear([table], None, scratch)  # shares table's arrays (and its buffers)
        self.num_embeddings, self.embedding_dim = table.shape
        self.dtype = torch.float32  # of the looked-up rows (`place_model` sets the model's)

    def lookup_np(self, ids: np.ndarray) -> np.ndarray:
        """ids [R] int -> fp32 [R, D]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise IndexError(f"token ids outside 0..{self.num_embeddings - 1}")
        return self.table.rows(ids).dequant()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [...] -> [..., D]
        rows = torch.from_numpy(self.lookup_np(ids.detach().cpu().numpy()))  # a few rows, de-quantised here
        return rows.to(device=ids.device, dtype=self.dtype).view(*ids.shape, self.embedding_dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def place_model(model: Any, device: torch.device | str, dtype: torch.dtype, impl: str) -> Any:
    """Put a packed decoder (`gguf_load.build_packed`, `quantize_model`) on `device` for the torch forward,
    its blocks kept packed: every `PackedLinear` (the tied head included) `place`s its parts, the embedding
    keeps its table on the CPU (a step looks up one row per sequence there), the norms and biases move in
    `dtype`. impl: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1) or "torch" (the kernels' float64
    twins: the tests' oracle). Returns the model, set to the torch decode step."""
    device = torch.device(device)
    for mod in list(model.modules()):
        if isinstance(mod, PackedLinear):
            mod.place(device, dtype, impl)
        elif isinstance(mod, PackedEmbedding):
            mod.dtype = dtype
    model.to(device=device, dtype=dtype)
    model._freqs = None
    return model.set_decode_step("torch")


def weight_formats(model: Any) -> dict[str, int]:
    """{format: bytes} of a decoder's weight matrices (packed ones by block type, others by dtype)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            for p in mod.parts:
                if id(p.qs) not in seen:
                    seen.add(id(p.qs))
                    f = "Q4_1" if p.fmt == cpu_qmatmul.X8_FORMAT else p.fmt  # (its blocks, rows interleaved)
                    out[f] = out.get(f, 0) + p.nbytes
    for name, prm in model.named_parameters():
        key = str(prm.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + prm.numel() * prm.element_size()
    return out


ACTIVATIONS = ("auto", "fp32", "q8", "q8_fast")


def set_activations(model: Any, mode: str) -> str:
    """How the packed products of `model` take their activations (`models.llm_activations`): "fp32" (the
    weights de-quantised in registers against fp32 x: the de-quantised network, up to summation order),
    "q8" (x quantised to Q8 blocks of 32 and integer dot products, as llama.cpp computes Q4_0/Q4_1/Q5_0/Q5_1/
    Q8_0, and Q4_K / Q6_K per block of 32: `atelier_kernels.cpu_qmatmul.matmul_q8`), "q8_fast" (q8, with the
    Q4_1 matrices interleaved by 8 rows where the kernels run, `cpu_qmatmul.interleave_q41`: each block's integer
    dot summed whole before its one conversion, not llama.cpp's bits), "auto" (q8 where its AVX2 kernels run,
    else fp32). Sets every PackedLinear of the model (the tied head included); returns the mode used."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations={mode!r}: expected one of {', '.join(ACTIVATIONS)}")
    used = mode if mode != "auto" else ("q8" if cpu_qmatmul.q8_available() else "fp32")
    if used == "q8_fast" and not cpu_qmatmul.q8_available():
        used = "q8"  # (the NumPy twins: llama.cpp's layout)
    x8 = used == "q8_fast"
    tables = {id(mod.table.qs) for mod in model.modules() if isinstance(mod, PackedEmbedding)}
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.activations = "q8" if x8 else used
            # q8_fast: Q4_1 matrices interleaved by 8 rows (`cpu_qmatmul.interleave_q41`), a tied
            # head's table kept as the embedding reads it
            mod.interleave(x8, tables)
    step = getattr(model, "_np_step", None)
    if step is not None:  # the NumPy decode step: whether its fused Q8 path (atelier_kernels.cpu_step) applies
        step.refresh(model)
    return used


def head_format(fmt: str) -> str:
    """The block type `quantize_model` gives the embedding and output head: Q8_0 under a 4-bit `fmt` (as
    llama.cpp's 4-bit mixes keep the output head at 6-8 bits; measured on SmolLM2 with the text in
    tests/data: a Q4_1 head costs +9.8% perplexity, a Q8_0 head with Q4_1 layers +0.1%), else `fmt`."""
    return "Q8_0" if fmt in ("Q4_0", "Q4_1", "Q4_K") else fmt


def quantize_model(model: Any, fmt: str, blas: str = "auto", cached: dict[str, Packed] | None = None) -> Any:
    """Replace a CPU fp32 decoder's weight matrices by `fmt` blocks and its embedding / output head by
    `head_format(fmt)` blocks, in place; a matrix whose width is not a multiple of the block stays fp32.
    `cached` ({module path: Packed}, `load_quantized`) supplies blocks already made; a matrix it lacks, or
    whose shape or format differs, is quantised. Returns the model."""
    scratch = Scratch()
    model.scratch = scratch
    cached = cached or {}

    def packed(key: str, w: torch.Tensor, f: str) -> Packed:
        c = cached.get(key)
        if c is not None and c.fmt == f and c.shape == tuple(w.shape):
            return c
        return Packed.quantize(w.detach().float().numpy(), f)

    def q(lin: nn.Linear, key: str, f: str = fmt) -> nn.Module:
        if lin.weight.shape[1] % BLOCK_VALUES[f]:
            return lin
        return PackedLinear([packed(key, lin.weight, f)], lin.bias, scratch)

    for i, layer in enumerate(model.layers):
        for name in ("wqkv", "wo", "w13", "w2"):
            setattr(layer, name, q(getattr(layer, name), f"layers.{i}.{name}"))
    hf = head_format(fmt)
    if isinstance(model.output, nn.Linear):
        model.output = q(model.output, "output", hf)
    if isinstance(model.tok, nn.Embedding) and model.tok.weight.shape[1] % BLOCK_VALUES[hf] == 0:
        model.tok = PackedEmbedding(packed("tok", model.tok.weight, hf), scratch)
    from .model import blas_backend

    return model.set_blas(blas_backend(blas, "cpu", torch.float32))


# -- the on-disk cache of quantised weights -------------------------------------------------------------
CACHE_VERSION = 2


class CorruptCache(Exception):
    """A cache file that cannot be read back whole (truncated, bad CRC, missing or odd arrays)."""


def packed_modules(model: Any) -> dict[str, Packed]:
    """{module path: Packed} of a model made by `quantize_model` (one part per module)."""
    out: dict[str, Packed] = {}
    for i, layer in enumerate(model.layers):
        for name in ("wqkv", "wo", "w13", "w2"):
            mod = getattr(layer, name)
            if isinstance(mod, PackedLinear) and len(mod.parts) == 1:
                out[f"layers.{i}.{name}"] = mod.parts[0].interleaved(False)  # (the cache: llama.cpp's layout)
    if isinstance(model.output, PackedLinear) and len(model.output.parts) == 1:
        out["output"] = model.output.parts[0].interleaved(False)
    if isinstance(model.tok, PackedEmbedding):
        out["tok"] = model.tok.table
    return out


def save_quantized(model: Any, fmt: str, path: Path) -> None:
    """Write `model`'s packed blocks to `path` whole or not at all: an uncompressed .npz (a zip whose
    members carry CRC-32s) written to a temporary file in the same folder, flushed and fsync'ed, then
    moved into place with `os.replace`. On any failure the temporary file is removed and the error raised."""
    arrays: dict[str, np.ndarray] = {"__format__": np.array(f"{fmt}:{CACHE_VERSION}")}
    for key, pm in packed_modules(model).items():
        for field, a in pm._arrays():
            arrays[f"{key}/{pm.fmt}/{field}"] = a
    from ..files import atomic_write

    # engine/files: a temp file beside `path` (swept by its prefix), fsync'ed, os.replace'd, folder synced;
    # the suffix stays .npz or np.savez would add one
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), prefix=f"{path.name}.tmp-", suffix=".npz", mode=0o644)


def load_quantized(path: Path, fmt: str) -> dict[str, Packed]:
    """{module path: Packed} read back from `save_quantized`'s file; `CorruptCache` if any member fails its
    CRC, the file is truncated, or its format or arrays are not what `fmt` blocks need."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading a member whole checks its CRC-32
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CorruptCache(f"{path}: {type(exc).__name__}: {exc}") from exc
    tag = arrays.pop("__format__", None)
    if tag is None or str(tag) != f"{fmt}:{CACHE_VERSION}":
        raise CorruptCache(f"{path}: format {tag!r}, expected {fmt}:{CACHE_VERSION}")
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, a in arrays.items():
        key, f, field = (name.rsplit("/", 2) + ["", ""])[:3]
        groups.setdefault((key, f), {})[field] = a
    out: dict[str, Packed] = {}
    for (key, f), fields in groups.items():
        try:
            if f not in (fmt, head_format(fmt)):
                raise ValueError(f"block type {f!r} in a {fmt} cache")
            pm = Packed(f, **fields)
            cpu_qmatmul._check(f, pm.qs, pm.d, pm.m, pm.sc, pm.qh)
        except (TypeError, ValueError) as exc:
            raise CorruptCache(f"{path}: {key}: {exc}") from exc
        out[key] = pm
    return out
