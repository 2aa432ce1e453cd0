"""Edits through a mask: `apply_<name>(rgba, mask, ...)` -> a new uint8 image.

The edited value e of a pixel is composited as `round(src + (e - src) * m)`
(float32, round half to even); where m == 0 the result is the source byte for
byte, where m == 1 it is e. Only the mask's bounding box (plus the blur
margin) is computed.

- fill(color): RGB (and alpha when the colour has 4 components) := color;
- replace(other): every channel from `other` (same size; RGB gets alpha 255);
- blur(sigma): Gaussian, sigma px, truncated at 3 sigma, symmetric borders
  (scipy.ndimage.gaussian_filter(mode="reflect", truncate=3)), RGB only;
- pixelate(block): block x block cells on the image grid from (0, 0), each
  the mean of the whole cell rounded half up (integer arithmetic), RGB only;
- grayscale(): R = G = B = (19595 R + 38470 G + 7471 B + 32768) >> 16
  (PIL's "L" conversion);
- adjust(brightness, contrast): ((v * brightness) - 128) * contrast + 128,
  rounded half to even and clamped, RGB only;
- hue_shift(degrees): RGB -> HSV (skimage formulas), h += degrees / 360
  mod 1, back to RGB, rounded;
- transparent(): alpha := 0 (RGB input gains an alpha channel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import InvalidInput
from .morphology import gaussian_blur
from .tensors import bbox, check_image, check_mask, clone, grow


def _rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [..., 3] in 0..1 -> h in [0, 1), s, v (skimage.color.rgb2hsv's formulas)."""
    r, g, b = rgb.unbind(-1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    zero = delta == 0
    safe = torch.where(zero, torch.ones_like(delta), delta)
    s = torch.where(zero, torch.zeros_like(delta), delta / torch.where(v == 0, torch.ones_like(v), v))
    h = torch.where(r == v, (g - b) / safe, torch.zeros_like(delta))
    h = torch.where(g == v, 2.0 + (b - r) / safe, h)
    h = torch.where(b == v, 4.0 + (r - g) / safe, h)
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(zero, torch.zeros_like(h), h)
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h in [0, 1), s, v in 0..1 -> float [..., 3] in 0..1 (skimage.color.hsv2rgb's formulas)."""
    hi = torch.floor(h * 6.0)
    f = h * 6.0 - hi
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    hi = torch.remainder(hi, 6).to(torch.int64)
    r = torch.stack([v, q, p, p, t, v], -1).gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    g = torch.stack([t, v, v, q, p, p], -1).gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    b = torch.stack([p, p, t, v, v, q], -1).gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    return torch.stack([r, g, b], -1)


def _composite(src: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 [h, w, k] x2 and a bool / float [h, w] mask -> uint8: src where m == 0, edited where m == 1."""
    if mask.dtype == torch.bool:
        return torch.where(mask.unsqueeze(-1), edited, src)
    m = mask.to(torch.float32).unsqueeze(-1)
    s = src.to(torch.float32)
    blended = torch.round(s + (edited.to(torch.float32) - s) * m).clamp_(0, 255).to(torch.uint8)
    return torch.where(m > 0, blended, src)


def _apply_local(rgba: torch.Tensor, mask: torch.Tensor, edit: Callable[[torch.Tensor, int, int], torch.Tensor],
                 *, channels: slice = slice(0, 3), margin: int = 0, align: int = 1) -> torch.Tensor:
    """Run `edit(crop, y0, x0) -> edited crop channels` over the mask's bbox (+margin) and composite."""
    check_image(rgba, "image")
    check_mask(mask, rgba)
    out = clone(rgba)
    box = bbox(mask)
    if box is None:
        return out
    h, w = rgba.shape[:2]
    y0, y1, x0, x1 = grow(box, margin, h, w)
    if align > 1:
        y0, x0 = y0 // align * align, x0 // align * align
        y1, x1 = min(h, -(-y1 // align) * align), min(w, -(-x1 // align) * align)
    crop = rgba[y0:y1, x0:x1]
    edited = edit(crop, y0, x0)
    out[y0:y1, x0:x1, channels] = _composite(crop[..., channels], edited, mask[y0:y1, x0:x1])
    return out


def _color_tuple(color: Sequence[int], channels: int) -> tuple[int, ...]:
    vals = tuple(int(c) for c in color)
    if len(vals) not in (3, 4) or any(not 0 <= c <= 255 for c in vals):
        raise InvalidInput("color", color, "expected 3 or 4 integers in 0..255")
    if len(vals) == 4 and channels == 3 and vals[3] != 255:
        raise InvalidInput("color", color, "a translucent colour needs an RGBA image")
    return vals[:channels]


def apply_fill(rgba: torch.Tensor, mask: torch.Tensor, color: Sequence[int]) -> torch.Tensor:
    """Paint `color` (r, g, b[, a]) where selected."""
    check_image(rgba, "image")
    check_mask(mask, rgba)
    vals = _color_tuple(color, rgba.shape[2])
    k = len(vals)
    if mask.dtype == torch.bool:  # sparse scatter: no full-image blend pass
        out = clone(rgba)
        idx = torch.nonzero(mask.reshape(-1)).flatten()
        if idx.numel():
            value = torch.tensor(vals, dtype=torch.uint8, device=rgba.device)
            out.view(-1, rgba.shape[2])[idx, :k] = value
        return out
    value = torch.tensor(vals, dtype=torch.uint8, device=rgba.device)
    return _apply_local(rgba, mask, lambda crop, y0, x0: value.expand(*crop.shape[:2], k), channels=slice(0, k))


def apply_replace(rgba: torch.Tensor, mask: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Take every channel from `other` (uint8 [H, W, 3|4], same size) where selected."""
    check_image(other, "replace_with")
    if tuple(other.shape[:2]) != tuple(rgba.shape[:2]):
        raise InvalidInput("replace_with", f"{other.shape[1]}x{other.shape[0]}",
                           f"must have the size of the image, {rgba.shape[1]}x{rgba.shape[0]}")
    other = other.to(rgba.device)
    c = rgba.shape[2]
    if other.shape[2] == 3 and c == 4:
        other = torch.cat([other, torch.full_like(other[..., :1], 255)], -1)
    elif other.shape[2] == 4 and c == 3:
        if bool((other[..., 3] != 255).any()):
            raise InvalidInput("replace_with", "RGBA", "a translucent replacement needs an RGBA image")
        other = other[..., :3]
    return _apply_local(rgba, mask, lambda crop, y0, x0: other[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]],
                        channels=slice(0, c))


def apply_blur(rgba: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (sigma px, truncated at 3 sigma, symmetric borders) where selected; RGB only."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and 0 < sigma <= 1000):
        raise InvalidInput("blur_radius", sigma, "must be in (0, 1000] px")
    radius = int(3.0 * sigma + 0.5)

    def edit(crop: torch.Tensor, y0: int, x0: int) -> torch.Tensor:
        x = crop[..., :3].permute(2, 0, 1).to(torch.float32)
        y = gaussian_blur(x, sigma, radius)
        return torch.round(y).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)

    return _apply_local(rgba, mask, edit, margin=radius)


def apply_pixelate(rgba: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """Cells of block x block from (0, 0), each its mean rounded half up, where selected; RGB only."""
    if not (isinstance(block, int) and 1 <= block <= 4096):
        raise InvalidInput("pixel_size", block, "must be an integer in 1..4096")

    def edit(crop: torch.Tensor, y0: int, x0: int) -> torch.Tensor:
        h, w = crop.shape[:2]
        hb, wb = -(-h // block), -(-w // block)
        x = crop[..., :3].to(torch.int64)
        pad = torch.zeros(hb * block, wb * block, 3, dtype=torch.int64, device=crop.device)
        pad[:h, :w] = x
        sums = pad.view(hb, block, wb, block, 3).sum((1, 3))
        ones = torch.zeros(hb * block, wb * block, dtype=torch.int64, device=crop.device)
        ones[:h, :w] = 1
        counts = ones.view(hb, block, wb, block).sum((1, 3)).unsqueeze(-1)
        means = torch.div(2 * sums + counts, 2 * counts, rounding_mode="floor").to(torch.uint8)
        full = means.repeat_interleave(block, 0).repeat_interleave(block, 1)
        return full[:h, :w]

    return _apply_local(rgba, mask, edit, align=block)


def apply_grayscale(rgba: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R = G = B = PIL's "L" value where selected."""
    def edit(crop: torch.Tensor, y0: int, x0: int) -> torch.Tensor:
        x = crop[..., :3].to(torch.int32)
        lum = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) >> 16
        return lum.to(torch.uint8).unsqueeze(-1).expand(*lum.shape, 3)

    return _apply_local(rgba, mask, edit)


def apply_adjust(rgba: torch.Tensor, mask: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0
                 ) -> torch.Tensor:
    """((v * brightness) - 128) * contrast + 128, rounded half to even, clamped; RGB only."""
    for name, val in (("brightness", brightness), ("contrast", contrast)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and 0 <= val <= 100):
            raise InvalidInput(name, val, "must be a factor in [0, 100] (1 = unchanged)")

    def edit(crop: torch.Tensor, y0: int, x0: int) -> torch.Tensor:
        v = crop[..., :3].to(torch.float32)
        y = (v * float(np.float32(brightness)) - 128.0) * float(np.float32(contrast)) + 128.0
        return torch.round(y).clamp_(0, 255).to(torch.uint8)

    return _apply_local(rgba, mask, edit)


def apply_hue_shift(rgba: torch.Tensor, mask: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the HSV hue by `degrees` where selected."""
    if not (isinstance(degrees, (int, float)) and math.isfinite(degrees)):
        raise InvalidInput("hue_shift", degrees, "must be a finite number of degrees")

    def edit(crop: torch.Tensor, y0: int, x0: int) -> torch.Tensor:
        h, s, v = _rgb_to_hsv(crop[..., :3].to(torch.float32) / 255.0)
        h = torch.remainder(h + degrees / 360.0, 1.0)
        return torch.round(_hsv_to_rgb(h, s, v) * 255.0).clamp_(0, 255).to(torch.uint8)

    return _apply_local(rgba, mask, edit)


def apply_transparent(rgba: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """alpha := 0 where selected (alpha * (1 - m) when soft); RGB input gains an alpha channel."""
    check_image(rgba, "image")
    if rgba.shape[2] == 3:
        rgba = torch.cat([rgba, torch.full_like(rgba[..., :1], 255)], -1)
    return _apply_local(rgba, mask, lambda crop, y0, x0: torch.zeros_like(crop[..., 3:4]), channels=slice(3, 4))
