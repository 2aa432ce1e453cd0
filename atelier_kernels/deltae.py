"""CIEDE2000 colour difference straight from 8-bit sRGB pairs: a fused Triton kernel and its torch twin.

    deltae2000_rgb8(a, b, kL=1., kC=1., kH=1., *, backend=None) -> Tensor[N] float32
        a, b: [N, 3] uint8 sRGB pixels (any device; contiguous rows of 3).

The colour science is exactly scikit-image's: sRGB (IEC 61966-2-1 transfer
curve, threshold 0.04045) -> linear -> XYZ with skimage's `xyz_from_rgb`
matrix -> CIE L*a*b* against the D65 / 2° white (0.95047, 1, 1.08883) with
skimage's 0.008856 / 7.787 linear segment -> `deltaE_ciede2000` including
its hue branches (the 180° case, zero chroma).

Hue ties. CIEDE2000 jumps where the two hues are 180° apart: the mean hue
flips by 180° as the difference crosses it, and ΔE with it (by up to ~22 units
for saturated pairs, e.g. sRGB (161, 62, 234) vs (165, 212, 146), 180.00003°
apart: 78.78 in float64, 57.11 from this kernel's float32 on an H200). No
float32 pipeline decides such pairs reliably (uint8 pairs come within 1e-9 rad
of the tie), so both the kernel and the twin flag every pixel whose hue
difference lies within `HUE_TIE` radians of 180° (both chromas non-zero) and
recompute those few pixels in float64 (`settle_ties`): about 3 in 10 000
random pairs, none in images compared with similar ones. The kernel counts
them with one atomic add per block, so the recomputation (and its device
synchronisation) happens only when there are any. Callers that work in pieces
pass `settle=False` and call `settle_ties` once over the whole result.

Memory traffic of the Triton kernel: reads 6 bytes, writes 4 bytes per pixel;
nothing intermediate touches memory (sRGB decoding, Lab, ΔE all in registers;
atan2 is a Cephes polynomial and the cube root exp2/log2 plus a Newton step,
since libdevice is not available in the interpreter). The torch reference
evaluates the same maths in float32: a 256-entry table for the transfer curve
(exact: computed in float64 once), element-wise XYZ and Lab, and in-place
element-wise ΔE with branches as arithmetic on 0/1 masks. Callers bound its
temporary memory by passing pieces (see `engine.color.delta_e_map`): about 25
float32 temporaries per pixel.

`ciede2000_lab` (torch, any float dtype) is the shared formula both the
reference and `engine.color.delta_e_2000` use. This module knows nothing
about images, masks or tools.
"""

from __future__ import annotations

import functools
import math

import torch

from ._backend import choose, triton_available

# skimage.color.colorconv.xyz_from_rgb (sRGB, D65) and the D65 / 2° reference white
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
WHITE_D65 = (0.95047, 1.0, 1.08883)

_TWO_PI = 2.0 * math.pi
_25_POW_7 = float(25**7)
_DEG30 = math.radians(30.0)
_DEG6 = math.radians(6.0)
_DEG63 = math.radians(63.0)
_RAD2DEG = 180.0 / math.pi
# radians: a hue difference this close to pi is recomputed in float64 (see the module docstring). The float32
# hue of a uint8 colour is off by up to ~7e-5 / chroma rad (the kernel's exp2/log2 on a GPU are approximate);
# below a chroma of ~0.1, where this band no longer covers the error, the jump is < 0.001 ΔE.
HUE_TIE = 1e-3


# -- shared formula ------------------------------------------------------------------
# Element-wise branches are written as arithmetic on 0/1 masks (`_pos`) rather than
# torch.where / comparisons: on CPU those are 10-30x slower than a vectorised sign().


def _pos(x: torch.Tensor) -> torch.Tensor:
    """In place: 1.0 where x > 0, else 0.0 (x finite)."""
    return x.sign_().clamp_(min=0.0)


def _norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * x).addcmul_(y, y).sqrt_()


def _pow7(c: torch.Tensor) -> torch.Tensor:
    c2 = c * c
    return c2.mul(c2).mul_(c2).mul_(c)


def _hue(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """atan2 mapped to [0, 2*pi) exactly as skimage's `_cart2polar_2pi`."""
    h = torch.atan2(y, x)
    return h.add_(_pos(h.neg()), alpha=_TWO_PI)


def ciede2000_lab(L1: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor,
                  L2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                  kL: float = 1.0, kC: float = 1.0, kH: float = 1.0, *, tie: float = 0.0) -> torch.Tensor:
    """CIEDE2000 of Lab channel tensors (all one shape and float dtype); the inputs are not modified.

    `tie` > 0: where both chromas are non-zero and the hue difference lies within `tie` radians of pi, the
    result is -1 instead, for the caller to recompute in float64 (`settle_ties`; module docstring).

    Follows `skimage.color.deltaE_ciede2000` step by step (same hue branches,
    same dtype), so float64 inputs agree with it to rounding. Two rewrites keep
    values but save time: the four cosines of T come from cos/sin of the mean
    hue by the multiple-angle formulas, and the exponent of the rotation term
    is clamped at -80 (exp(-80) ~ 2e-35 instead of an underflow).
    """
    # distortion of a by the mean chroma; everything after is in the primed coordinates
    cbar = _norm(a1, b1).add_(_norm(a2, b2)).mul_(0.5)
    c7 = _pow7(cbar)
    scale = c7.div_(c7 + _25_POW_7).sqrt_().mul_(-0.5).add_(1.5)  # 1 + G
    a1p = a1 * scale
    a2p = scale.mul_(a2)
    C1 = _norm(a1p, b1)
    C2 = _norm(a2p, b2)
    h1 = _hue(b1, a1p)
    h2 = _hue(b2, a2p)
    del a1p, a2p, scale, c7, cbar

    # lightness term
    tmp = (L1 + L2).mul_(0.5).sub_(50.0)
    tmp.mul_(tmp)
    SL = (tmp + 20.0).rsqrt_().mul_(tmp).mul_(0.015).add_(1.0)
    L_term = (L2 - L1).div_(SL.mul_(kL))
    del tmp, SL

    # chroma term
    cbar = (C1 + C2).mul_(0.5)
    C_term = (C2 - C1).div_((cbar * 0.045).add_(1.0).mul_(kC))

    # hue term: dH wraps into [-pi, pi]; hbar is the mean hue along the shorter arc,
    # h1 + h2 when either chroma is zero
    h_diff = h2 - h1
    ties = (h_diff.abs() - math.pi).abs_() < tie if tie > 0 else None
    h_sum = h1.add_(h2)
    del h2
    CC = C1.mul_(C2)
    del C1, C2
    dH = h_diff.sub(_pos(h_diff - math.pi), alpha=_TWO_PI).add_(_pos((-math.pi) - h_diff), alpha=_TWO_PI)
    dH_term = CC.sqrt().mul_(2.0).mul_(dH.mul_(0.5).sin_())
    del dH
    nonzero = CC.sign_()  # CC >= 0: 1.0 where both chromas are non-zero
    if ties is not None:
        ties.logical_and_(nonzero > 0)
    wrap = _pos(h_diff.abs_().sub_(math.pi)).mul_(nonzero)
    direction = _pos(_TWO_PI - h_sum).mul_(2.0).sub_(1.0)  # +1 if h_sum < 2 pi else -1
    hbar = h_sum.add_(wrap.mul_(direction), alpha=_TWO_PI).mul_(nonzero.mul_(-0.5).add_(1.0))
    del h_diff, wrap, direction, nonzero

    # T = 1 - 0.17 cos(h - 30°) + 0.24 cos(2h) + 0.32 cos(3h + 6°) - 0.20 cos(4h - 63°)
    c1 = torch.cos(hbar)
    s1 = torch.sin(hbar)
    c2 = (c1 * c1).mul_(2.0).sub_(1.0)
    s2 = (s1 * c1).mul_(2.0)
    T = c1 * (-0.17 * math.cos(_DEG30))
    T.add_(s1, alpha=-0.17 * math.sin(_DEG30)).add_(c2, alpha=0.24).add_(1.0)
    c3 = (c1 * c2).sub_(s1 * s2)
    s3 = s1.mul_(c2).addcmul_(c1, s2)
    T.add_(c3, alpha=0.32 * math.cos(_DEG6)).add_(s3, alpha=-0.32 * math.sin(_DEG6))
    c4 = (c2 * c2).mul_(2.0).sub_(1.0)
    s4 = s2.mul_(c2).mul_(2.0)
    T.add_(c4, alpha=-0.20 * math.cos(_DEG63)).add_(s4, alpha=-0.20 * math.sin(_DEG63))
    del c1, s1, c2, s2, c3, s3, c4, s4
    SH = T.mul_(cbar).mul_(0.015).add_(1.0)
    H_term = dH_term.div_(SH.mul_(kH))
    del T, SH

    # hue rotation
    c7 = _pow7(cbar)
    Rc = c7.div_(c7 + _25_POW_7).sqrt_().mul_(2.0)
    q = hbar.mul_(_RAD2DEG).sub_(275.0).div_(25.0)
    dtheta = q.mul_(q).neg_().clamp_(min=-80.0).exp_().mul_(_DEG30)
    R_term = dtheta.mul_(2.0).sin_().neg_().mul_(Rc).mul_(C_term).mul_(H_term)
    del Rc, dtheta, c7

    dE2 = L_term.mul_(L_term).addcmul_(C_term, C_term).addcmul_(H_term, H_term).add_(R_term)
    dE = dE2.clamp_(min=0.0).sqrt_()
    return dE if ties is None else dE.masked_fill_(ties, -1.0)


# -- torch reference on uint8 pairs ------------------------------------------------------
@functools.cache
def _tables(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, tuple[float, ...]]:
    """(sRGB code -> linear table [256] of `dtype` on `device`, XYZ/white matrix as 9 floats)."""
    c = torch.arange(256, dtype=torch.float64) / 255.0
    lut = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = torch.tensor(XYZ_FROM_RGB, dtype=torch.float64) / torch.tensor(WHITE_D65, dtype=torch.float64)[:, None]
    return lut.to(device=device, dtype=dtype), tuple(float(v) for v in m.flatten())


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    """In place on t >= 0: cbrt(t) above 0.008856, 7.787 t + 16/116 below (skimage's xyz2lab)."""
    above = _pos(t - 0.008856)
    lin = (t * 7.787).add_(16.0 / 116.0).mul_(1.0 - above)
    return t.pow_(1.0 / 3.0).mul_(above).add_(lin)


def rgb8_to_lab(rgb: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 3] uint8 sRGB -> (L, a, b), each [N] `dtype` (float32 or float64) contiguous, as skimage's rgb2lab."""
    lut, m = _tables(rgb.device, dtype)
    r, g, b = (lut.index_select(0, rgb[:, i].long()) for i in range(3))
    fx, fy, fz = ((r * m[3 * i]).add_(g, alpha=m[3 * i + 1]).add_(b, alpha=m[3 * i + 2]) for i in range(3))
    fx, fy, fz = _lab_f(fx), _lab_f(fy), _lab_f(fz)
    L = fy * 116.0 - 16.0
    a = fx.sub_(fy).mul_(500.0)
    b = fy.sub_(fz).mul_(200.0)
    return L, a, b


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"expected uint8 tensors, got {a.dtype} and {b.dtype}")
    if a.ndim != 2 or a.shape[-1] != 3 or a.shape != b.shape:
        raise ValueError(f"expected two [N, 3] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"tensors on different devices: {a.device} and {b.device}")


def deltae2000_rgb8_reference(a: torch.Tensor, b: torch.Tensor, kL: float = 1.0, kC: float = 1.0,
                              kH: float = 1.0, *, backend: str | None = None, settle: bool = True) -> torch.Tensor:
    """Torch twin of the kernel: [N, 3] uint8 pairs -> [N] float32 ΔE2000 (`backend` is ignored; `settle`
    as the kernel's)."""
    _check_pair(a, b)
    if a.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=a.device)
    out = ciede2000_lab(*rgb8_to_lab(a), *rgb8_to_lab(b), kL, kC, kH, tie=HUE_TIE)
    return settle_ties(out, a, b, kL, kC, kH) if settle else out


def settle_ties(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | tuple[float, float, float],
                kL: float = 1.0, kC: float = 1.0, kH: float = 1.0) -> torch.Tensor:
    """In place: the entries of `out` flagged -1 (hue ties, see the module docstring) recomputed in float64
    from the [N, 3] uint8 pixels `a` and `b` (the same shape, or one Lab colour for all); returns `out`. One
    call over a whole image costs ~2 ms where it has ties (a few hundred per million random pairs)."""
    idx = torch.nonzero(out < 0).squeeze(1)
    if idx.numel():
        lab1 = rgb8_to_lab(a.index_select(0, idx), torch.float64)
        if isinstance(b, torch.Tensor):
            lab2 = rgb8_to_lab(b.index_select(0, idx), torch.float64)
        else:
            lab2 = tuple(torch.tensor([float(v)], dtype=torch.float64, device=out.device) for v in b)
        out.index_copy_(0, idx, ciede2000_lab(*lab1, *lab2, kL, kC, kH).to(out.dtype))
    return out


# -- Triton kernel ---------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tl_srgb_to_linear(c):
        # c: uint8 code as float32
        v = c / 255.0
        hi = tl.exp2(2.4 * tl.log2((v + 0.055) / 1.055))
        return tl.where(v > 0.04045, hi, v / 12.92)

    @triton.jit
    def _tl_lab_f(t):
        # cube root for t > 0.008856 (exp2/log2 plus one Newton step), skimage's linear segment below
        tp = tl.maximum(t, 0.008856)
        y = tl.exp2(tl.log2(tp) * (1.0 / 3.0))
        y = y - (y * y * y - tp) / (3.0 * y * y)
        return tl.where(t > 0.008856, y, 7.787 * t + 16.0 / 116.0)

    @triton.jit
    def _tl_atan2_pos(y, x):
        # atan2 mapped to [0, 2*pi) as skimage's _cart2polar_2pi; Cephes atanf polynomial
        ax = tl.abs(x)
        ay = tl.abs(y)
        mx = tl.maximum(ax, ay)
        mn = tl.minimum(ax, ay)
        r = mn / tl.where(mx == 0.0, 1.0, mx)
        big = r > 0.41421356237309503
        z = tl.where(big, (r - 1.0) / (r + 1.0), r)
        z2 = z * z
        p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2
             - 3.33329491539e-1) * z2 * z + z
        at = tl.where(big, 0.7853981633974483 + p, p)
        at = tl.where(ay > ax, 1.5707963267948966 - at, at)
        at = tl.where(x < 0.0, 3.141592653589793 - at, at)
        at = tl.where(y < 0.0, -at, at)
        return tl.where(at < 0.0, at + 6.283185307179586, at)

    @triton.jit
    def _tl_lab_from_rgb8(ptr, offs, mask, m00, m01, m02, m10, m11, m12, m20, m21, m22):
        r = _tl_srgb_to_linear(tl.load(ptr + offs * 3, mask=mask, other=0).to(tl.float32))
        g = _tl_srgb_to_linear(tl.load(ptr + offs * 3 + 1, mask=mask, other=0).to(tl.float32))
        b = _tl_srgb_to_linear(tl.load(ptr + offs * 3 + 2, mask=mask, other=0).to(tl.float32))
        fx = _tl_lab_f(m00 * r + m01 * g + m02 * b)
        fy = _tl_lab_f(m10 * r + m11 * g + m12 * b)
        fz = _tl_lab_f(m20 * r + m21 * g + m22 * b)
        return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)

    @triton.jit
    def _deltae2000_rgb8_kernel(a_ptr, b_ptr, out_ptr, ties_ptr, n, kL, kC, kH,
                                m00, m01, m02, m10, m11, m12, m20, m21, m22,
                                TIE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        L1, a1, b1 = _tl_lab_from_rgb8(a_ptr, offs, mask, m00, m01, m02, m10, m11, m12, m20, m21, m22)
        L2, a2, b2 = _tl_lab_from_rgb8(b_ptr, offs, mask, m00, m01, m02, m10, m11, m12, m20, m21, m22)

        P7 = 6103515625.0  # 25 ** 7
        cbar = 0.5 * (tl.sqrt(a1 * a1 + b1 * b1) + tl.sqrt(a2 * a2 + b2 * b2))
        c7 = cbar * cbar * cbar * cbar * cbar * cbar * cbar
        scale = 1.5 - 0.5 * tl.sqrt(c7 / (c7 + P7))
        a1p = a1 * scale
        a2p = a2 * scale
        C1 = tl.sqrt(a1p * a1p + b1 * b1)
        C2 = tl.sqrt(a2p * a2p + b2 * b2)
        h1 = _tl_atan2_pos(b1, a1p)
        h2 = _tl_atan2_pos(b2, a2p)

        lbar = 0.5 * (L1 + L2) - 50.0
        tmp = lbar * lbar
        SL = 1.0 + 0.015 * tmp / tl.sqrt(20.0 + tmp)
        L_term = (L2 - L1) / (kL * SL)

        cbarp = 0.5 * (C1 + C2)
        C_term = (C2 - C1) / (kC * (1.0 + 0.045 * cbarp))

        PI = 3.141592653589793
        TWO_PI = 6.283185307179586
        h_diff = h2 - h1
        h_sum = h1 + h2
        CC = C1 * C2
        dH = tl.where(h_diff > PI, h_diff - TWO_PI, h_diff)
        dH = tl.where(h_diff < -PI, dH + TWO_PI, dH)
        dH_term = 2.0 * tl.sqrt(CC) * tl.sin(0.5 * dH)
        wrap = (tl.abs(h_diff) > PI) & (CC != 0.0)
        hbar = tl.where(wrap, tl.where(h_sum < TWO_PI, h_sum + TWO_PI, h_sum - TWO_PI), h_sum)
        hbar = tl.where(CC == 0.0, 2.0 * hbar, hbar) * 0.5

        T = (1.0 - 0.17 * tl.cos(hbar - 0.5235987755982988) + 0.24 * tl.cos(2.0 * hbar)
             + 0.32 * tl.cos(3.0 * hbar + 0.10471975511965977) - 0.20 * tl.cos(4.0 * hbar - 1.0995574287564276))
        H_term = dH_term / (kH * (1.0 + 0.015 * cbarp * T))

        c7p = cbarp * cbarp * cbarp * cbarp * cbarp * cbarp * cbarp
        Rc = 2.0 * tl.sqrt(c7p / (c7p + P7))
        q = (hbar * 57.29577951308232 - 275.0) / 25.0
        dtheta = 0.5235987755982988 * tl.exp(-(q * q))
        R_term = -tl.sin(2.0 * dtheta) * Rc * C_term * H_term

        dE2 = L_term * L_term + C_term * C_term + H_term * H_term + R_term
        # hue ties (module docstring): -1, counted, for the caller to recompute in float64
        tie = (CC != 0.0) & (tl.abs(tl.abs(h_diff) - PI) < TIE) & mask
        tl.store(out_ptr + offs, tl.where(tie, -1.0, tl.sqrt(tl.maximum(dE2, 0.0))), mask=mask)
        tl.atomic_add(ties_ptr, tl.sum(tie.to(tl.int32), axis=0))


def deltae2000_rgb8(a: torch.Tensor, b: torch.Tensor, kL: float = 1.0, kC: float = 1.0, kH: float = 1.0,
                    *, backend: str | None = None, settle: bool = True) -> torch.Tensor:
    """[N, 3] uint8 sRGB pairs -> [N] float32 ΔE2000; the Triton kernel on CUDA, the torch twin elsewhere.
    `settle=False` leaves the hue ties at -1 for the caller's one `settle_ties` over all its pieces."""
    _check_pair(a, b)
    if choose(a, backend) == "torch":
        return deltae2000_rgb8_reference(a, b, kL, kC, kH, settle=settle)
    n = a.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    if n == 0:
        return out
    a = a.contiguous()
    b = b.contiguous()
    _, mv = _tables(torch.device("cpu"))
    block = 1024
    ties = torch.zeros(1, dtype=torch.int32, device=a.device)
    _deltae2000_rgb8_kernel[(triton.cdiv(n, block),)](a, b, out, ties, n, float(kL), float(kC), float(kH), *mv,
                                                       TIE=HUE_TIE, BLOCK=block)
    return settle_ties(out, a, b, kL, kC, kH) if settle and int(ties.item()) else out
