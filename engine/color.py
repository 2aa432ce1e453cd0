"""Colour engine: parse colours, sRGB <-> CIE Lab, ΔE 76 / 94 / 2000, chunked ΔE maps between images.

Contract
- Colour science is scikit-image's: sRGB (D65) -> linear -> XYZ (skimage's
  `xyz_from_rgb`) -> Lab against the D65 / 2° white, as `skimage.color.rgb2lab`;
  ΔE formulas as `deltaE_cie76`, `deltaE_ciede94`, `deltaE_ciede2000` (same
  argument semantics, float64 in -> float64 out, otherwise float32).
- `parse_color(text)` -> (L, a, b) for `#RRGGBB`, `#RGB`, `rgb(r, g, b)`
  (0..255), a CSS colour name, or `lab(L, a, b)` (L in 0..100, a and b in
  -128..128); anything else raises `InvalidInput` naming the argument.
- `delta_e_map(rgb1, rgb2, ...)`: two uint8 [H, W, 3] images -> float32 [H, W].
  Pixels are processed in pieces; at most `workers` pieces are in flight, so
  the extra memory is bounded by the piece size (about 100 bytes per pixel in
  flight), not by the image. ΔE2000 goes through `atelier_kernels.deltae` (the fused
  Triton kernel on CUDA). On CPU the pieces are 32 767 pixels, under torch's
  intra-op grain size, so each torch op runs single-threaded in its worker
  and the work is spread over the CPU cores by a small thread pool: no
  OpenMP barrier per op, which matters on a machine shared with other work.
- Inputs are never modified. The engine knows nothing about MCP or files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from atelier_kernels import deltae as _k

from .colornames import CSS_COLORS
from .errors import InvalidInput

__all__ = [
    "parse_color", "parse_color_srgb", "rgb_to_lab", "lab_to_rgb", "rgb_to_hex", "lab_to_hex",
    "delta_e_76", "delta_e_94", "delta_e_2000", "delta_e_map", "delta_e_to_color", "composite_alpha",
    "METRICS", "CIE94_APPLICATIONS",
]

METRICS = ("cie76", "cie94", "ciede2000")
# skimage.color.deltaE_ciede94's documented weights: (kL, k1, k2)
CIE94_APPLICATIONS = {"graphic_arts": (1.0, 0.045, 0.015), "textiles": (2.0, 0.048, 0.014)}
LAB_AB_LIMIT = 128.0
CPU_PIECE = 32767  # < torch's intra-op grain size (32768): element-wise ops stay single-threaded

_HEX = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
_NUM = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_RGB = re.compile(r"rgb\(" + _NUM + r"[,\s]" + _NUM + r"[,\s]" + _NUM + r"\)", re.IGNORECASE)
_LAB = re.compile(r"lab\(" + _NUM + r"[,\s]" + _NUM + r"[,\s]" + _NUM + r"\)", re.IGNORECASE)


# -- parsing -------------------------------------------------------------------------------
def _hex_rgb(text: str) -> tuple[int, int, int]:
    h = text[1:]
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _parse(text: Any, argument: str) -> tuple[tuple[float, float, float], tuple[int, int, int] | None]:
    """-> (Lab, the sRGB bytes when the colour was given in sRGB else None)."""
    if not isinstance(text, str):
        raise InvalidInput(argument, text, "a colour must be a string: #RRGGBB, #RGB, rgb(r, g, b), "
                                           "a CSS colour name or lab(L, a, b)")
    s = text.strip()
    rgb: tuple[int, int, int] | None = None
    if s.startswith("#"):
        if not _HEX.fullmatch(s):
            raise InvalidInput(argument, text, "malformed hex colour: expected #RRGGBB or #RGB (hex digits)")
        rgb = _hex_rgb(s)
    elif s.lower().startswith("rgb"):
        m = _RGB.fullmatch(s)
        if not m:
            raise InvalidInput(argument, text, "malformed rgb(): expected rgb(r, g, b) with three numbers 0..255")
        vals = [float(v) for v in m.groups()]
        for v in vals:
            if not (0.0 <= v <= 255.0) or v != round(v):
                raise InvalidInput(argument, text, "rgb() components must be integers in 0..255")
        rgb = (int(vals[0]), int(vals[1]), int(vals[2]))
    elif s.lower().startswith("lab"):
        m = _LAB.fullmatch(s)
        if not m:
            raise InvalidInput(argument, text, "malformed lab(): expected lab(L, a, b) with three numbers")
        L, a, b = (float(v) for v in m.groups())
        if not all(math.isfinite(v) for v in (L, a, b)):
            raise InvalidInput(argument, text, "lab() components must be finite numbers")
        if not 0.0 <= L <= 100.0:
            raise InvalidInput(argument, text, "lab() L must be in 0..100")
        if abs(a) > LAB_AB_LIMIT or abs(b) > LAB_AB_LIMIT:
            raise InvalidInput(argument, text, f"lab() a and b must be in -{LAB_AB_LIMIT:g}..{LAB_AB_LIMIT:g}")
        return (L, a, b), None
    else:
        key = re.sub(r"[\s_\-]", "", s).lower()
        hex_ = CSS_COLORS.get(key)
        if hex_ is None:
            raise InvalidInput(argument, text, "unknown colour name: use one of the 148 CSS colour names, "
                                               "#RRGGBB, #RGB, rgb(r, g, b) or lab(L, a, b)")
        rgb = _hex_rgb(hex_)
    lab = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64) / 255.0)
    return (float(lab[0]), float(lab[1]), float(lab[2])), rgb


def parse_color(text: str, *, argument: str = "color") -> tuple[float, float, float]:
    """A colour string -> (L, a, b) floats (D65). Raises `InvalidInput(argument, text, rule)`."""
    return _parse(text, argument)[0]


def parse_color_srgb(text: str, *, argument: str = "color") -> tuple[tuple[int, int, int], bool]:
    """A colour string -> ((r, g, b) 0..255, in_gamut). Lab inputs are converted and clipped to sRGB."""
    lab, rgb = _parse(text, argument)
    if rgb is not None:
        return rgb, True
    lin = lab_to_rgb(torch.tensor(lab, dtype=torch.float64), clip=False)
    in_gamut = bool(((lin >= -1e-6) & (lin <= 1 + 1e-6)).all())
    byte = (lin.clamp(0.0, 1.0) * 255.0).round().to(torch.int64).tolist()
    return (byte[0], byte[1], byte[2]), in_gamut


# -- conversions -----------------------------------------------------------------------------
def _float_dtype(*ts: torch.Tensor) -> torch.dtype:
    """skimage's `_supported_float_type`: float64 if any input is float64 or integer (not uint8 here)."""
    return torch.float64 if any(t.dtype == torch.float64 or not t.is_floating_point() for t in ts) else torch.float32


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] sRGB -> [..., 3] Lab (D65 / 2°), as `skimage.color.rgb2lab`.

    uint8 (0..255) -> float32; float in 0..1 -> float32, or float64 for float64 input.
    """
    if rgb.shape[-1:] != (3,):
        raise InvalidInput("rgb", tuple(rgb.shape), "expected [..., 3] RGB")
    if rgb.dtype == torch.uint8:
        flat = rgb.reshape(-1, 3)
        out = torch.empty(flat.shape[0], 3, dtype=torch.float32, device=rgb.device)
        for s in range(0, flat.shape[0], CPU_PIECE):
            out[s:s + CPU_PIECE] = torch.stack(_k.rgb8_to_lab(flat[s:s + CPU_PIECE]), dim=-1)
        return out.reshape(rgb.shape)
    if not rgb.is_floating_point():
        raise InvalidInput("rgb", str(rgb.dtype), "expected uint8 or floating point RGB")
    dtype = torch.float64 if rgb.dtype == torch.float64 else torch.float32
    x = rgb.to(dtype)
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor(_k.XYZ_FROM_RGB, dtype=dtype, device=x.device)
    white = torch.tensor(_k.WHITE_D65, dtype=dtype, device=x.device)
    t = (lin @ m.T) / white
    f = torch.where(t > 0.008856, torch.sign(t) * t.abs() ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    return torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                        200.0 * (f[..., 1] - f[..., 2])], dim=-1)


def lab_to_rgb(lab: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
    """[..., 3] Lab -> [..., 3] sRGB floats in 0..1 (clipped unless clip=False), as `skimage.color.lab2rgb`."""
    dtype = torch.float64 if lab.dtype == torch.float64 else torch.float32
    lab = lab.to(dtype)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = lab[..., 1] / 500.0 + fy
    fz = (fy - lab[..., 2] / 200.0).clamp(min=0.0)
    f = torch.stack([fx, fy, fz], dim=-1)
    t = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = t * torch.tensor(_k.WHITE_D65, dtype=dtype, device=lab.device)
    m_inv = torch.linalg.inv(torch.tensor(_k.XYZ_FROM_RGB, dtype=torch.float64)).to(dtype=dtype, device=lab.device)
    lin = xyz @ m_inv.T
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0) ** (1 / 2.4) - 0.055, lin * 12.92)
    return rgb.clamp(0.0, 1.0) if clip else rgb


def rgb_to_hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*rgb)


def lab_to_hex(lab: tuple[float, float, float]) -> str:
    """The nearest sRGB colour (clipped) as #RRGGBB."""
    rgb = lab_to_rgb(torch.tensor(lab, dtype=torch.float64))
    return rgb_to_hex(tuple((rgb * 255.0).round().to(torch.int64).tolist()))


def composite_alpha(rgba: torch.Tensor, background: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [H, W, 4] over an opaque background colour -> uint8 [H, W, 3] (rounded, integer maths)."""
    a = rgba[..., 3:4].to(torch.int32)
    bg = torch.tensor(background, dtype=torch.int32, device=rgba.device)
    out = rgba[..., :3].to(torch.int32) * a + bg * (255 - a) + 127
    return out.div_(255, rounding_mode="floor").to(torch.uint8)


# -- ΔE on Lab tensors ----------------------------------------------------------------------
def _channels(lab1: torch.Tensor, lab2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    lab1, lab2 = torch.as_tensor(lab1), torch.as_tensor(lab2)
    dtype = _float_dtype(lab1, lab2)
    lab1, lab2 = torch.broadcast_tensors(lab1.to(dtype), lab2.to(dtype))
    if lab1.shape[-1:] != (3,):
        raise InvalidInput("lab", tuple(lab1.shape), "expected [..., 3] Lab")
    return ([lab1[..., i].contiguous() for i in range(3)], [lab2[..., i].contiguous() for i in range(3)])


def delta_e_76(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """Euclidean distance in Lab, [...] (skimage `deltaE_cie76`)."""
    (L1, a1, b1), (L2, a2, b2) = _channels(lab1, lab2)
    return ((L2 - L1).square_() + (a2 - a1).square_() + (b2 - b1).square_()).sqrt_()


def delta_e_94(lab1: torch.Tensor, lab2: torch.Tensor, *, textiles: bool = False, kL: float | None = None,
               K1: float | None = None, K2: float | None = None, kC: float = 1.0, kH: float = 1.0) -> torch.Tensor:
    """CIE94 with lab1 as the reference (not symmetric), as skimage `deltaE_ciede94`.

    Graphic-arts weights (kL=1, K1=0.045, K2=0.015) or, with textiles=True,
    (kL=2, K1=0.048, K2=0.014); explicit kL / K1 / K2 override them.
    """
    d_kL, d_K1, d_K2 = CIE94_APPLICATIONS["textiles" if textiles else "graphic_arts"]
    kL = d_kL if kL is None else kL
    K1 = d_K1 if K1 is None else K1
    K2 = d_K2 if K2 is None else K2
    (L1, a1, b1), (L2, a2, b2) = _channels(lab1, lab2)
    C1 = torch.hypot(a1, b1)
    C2 = torch.hypot(a2, b2)
    # the hue term in float64 as skimage's get_dH2 (it cancels badly in float32)
    a1d, b1d, a2d, b2d = (t.double() for t in (a1, b1, a2, b2))
    dH2 = (2.0 * (torch.hypot(a1d, b1d) * torch.hypot(a2d, b2d) - (a1d * a2d + b1d * b2d))).to(L1.dtype)
    SC = 1.0 + K1 * C1
    SH = 1.0 + K2 * C1
    dE2 = ((L1 - L2) / kL).square_() + ((C1 - C2) / (kC * SC)).square_() + dH2 / (kH * SH).square_()
    return dE2.clamp_(min=0.0).sqrt_()


def delta_e_2000(lab1: torch.Tensor, lab2: torch.Tensor, *, kL: float = 1.0, kC: float = 1.0,
                 kH: float = 1.0) -> torch.Tensor:
    """CIEDE2000, [...] (skimage `deltaE_ciede2000`, Sharma, Wu & Dalal 2005)."""
    (L1, a1, b1), (L2, a2, b2) = _channels(lab1, lab2)
    return _k.ciede2000_lab(L1, a1, b1, L2, a2, b2, kL, kC, kH)


# -- ΔE maps between uint8 images -------------------------------------------------------------
def _check_image(t: Any, argument: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 3 or t.shape[-1] != 3:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InvalidInput(argument, shape, "expected a uint8 [H, W, 3] RGB tensor")


def _workers(device: torch.device) -> int:
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, 8))


def _run_pieces(n: int, piece: int, device: torch.device, fn: Callable[[int, int], None], token: Any) -> None:
    """Call fn(start, end) over [0, n) in pieces; CPU pieces spread over a per-call thread pool."""
    starts = range(0, n, piece)
    total = len(starts)
    workers = min(_workers(device), total)

    def one(start: int) -> None:
        if token is not None:
            token.check()
        fn(start, min(start + piece, n))

    if workers <= 1:
        for i, s in enumerate(starts):
            one(s)
            if token is not None and total > 8 and i % 16 == 15:
                token.report(i + 1, total, "colour difference")
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="atelier-color") as pool:
        futures = [pool.submit(one, s) for s in starts]
        try:
            for i, f in enumerate(futures):
                f.result()
                if token is not None and total > 8 and i % 16 == 15:
                    token.report(i + 1, total, "colour difference")
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _piece_size(device: torch.device, chunk_pixels: int) -> int:
    if chunk_pixels < 1:
        raise InvalidInput("chunk_pixels", chunk_pixels, "must be >= 1")
    return min(chunk_pixels, CPU_PIECE) if device.type == "cpu" else chunk_pixels


def _lab_rows(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k.rgb8_to_lab(rgb)


def delta_e_map(rgb1: torch.Tensor, rgb2: torch.Tensor, *, metric: str = "ciede2000", kL: float | None = None,
                kC: float = 1.0, kH: float = 1.0, textiles: bool = False, chunk_pixels: int = 1 << 18,
                backend: str | None = None, token: Any = None, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """Two uint8 [H, W, 3] sRGB images -> float32 [H, W] ΔE map (on rgb1's device).

    metric: "cie76" | "cie94" (rgb1 is the reference; `textiles` picks the
    weights) | "ciede2000". kL defaults to 1 (2 for CIE94 textiles). The work
    runs on `device` (default: rgb1's device) piece by piece; `token` (an
    engine CancelToken) is checked between pieces.
    """
    _check_image(rgb1, "rgb1")
    _check_image(rgb2, "rgb2")
    if rgb1.shape != rgb2.shape:
        raise InvalidInput("rgb2", tuple(rgb2.shape), f"must have the shape of rgb1 {tuple(rgb1.shape)}")
    if metric not in METRICS:
        raise InvalidInput("metric", metric, f"expected one of {', '.join(METRICS)}")
    H, W, _ = rgb1.shape
    n = H * W
    out = torch.empty(n, dtype=torch.float32, device=rgb1.device)
    if n == 0:
        return out.reshape(H, W)
    dev = torch.device(device) if device is not None else rgb1.device
    a = rgb1.reshape(n, 3)
    b = rgb2.reshape(n, 3)
    kl = float(kL) if kL is not None else (CIE94_APPLICATIONS["textiles"][0] if metric == "cie94" and textiles
                                           else 1.0)

    def fn(s: int, e: int) -> None:
        pa, pb = a[s:e].to(dev), b[s:e].to(dev)
        if metric == "ciede2000":
            r = _k.deltae2000_rgb8(pa, pb, kl, kC, kH, backend=backend, settle=False)
        else:
            la, lb = torch.stack(_lab_rows(pa), -1), torch.stack(_lab_rows(pb), -1)
            r = delta_e_76(la, lb) if metric == "cie76" else delta_e_94(la, lb, textiles=textiles, kL=kl,
                                                                          kC=kC, kH=kH)
        out[s:e] = r

    _run_pieces(n, _piece_size(dev, chunk_pixels), dev, fn, token)
    if metric == "ciede2000":  # hues 180° apart, where CIEDE2000 jumps: those pixels in float64
        _k.settle_ties(out, a, b, kl, kC, kH)
    return out.reshape(H, W)


def delta_e_to_color(rgb: torch.Tensor, lab_ref: tuple[float, float, float], *, chunk_pixels: int = 1 << 18,
                     backend: str | None = None, token: Any = None) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [H, W]: CIEDE2000 of every pixel to one Lab colour (pixel = lab1)."""
    _check_image(rgb, "rgb")
    ref = [float(v) for v in lab_ref]
    if len(ref) != 3 or not all(math.isfinite(v) for v in ref):
        raise InvalidInput("lab_ref", lab_ref, "expected three finite numbers (L, a, b)")
    H, W, _ = rgb.shape
    n = H * W
    out = torch.empty(n, dtype=torch.float32, device=rgb.device)
    if n == 0:
        return out.reshape(H, W)
    flat = rgb.reshape(n, 3)
    r2 = [torch.tensor([v], dtype=torch.float32, device=rgb.device) for v in ref]

    def fn(s: int, e: int) -> None:
        L1, a1, b1 = _lab_rows(flat[s:e])
        out[s:e] = _k.ciede2000_lab(L1, a1, b1, *r2, tie=_k.HUE_TIE)

    _run_pieces(n, _piece_size(rgb.device, chunk_pixels), rgb.device, fn, token)
    _k.settle_ties(out, flat, tuple(ref))  # hues 180° apart, where CIEDE2000 jumps: those pixels in float64
    return out.reshape(H, W)
