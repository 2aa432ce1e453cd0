"""Masks: build a selection (expression, mask image, shapes, detections), refine it, apply an edit.

Contract
- Images are uint8 tensors [H, W, 3] or [H, W, 4] (RGB / RGBA) on any device;
  a hard mask is bool [H, W], a soft (feathered) mask float32 [H, W] in 0..1.
  Every function returns new tensors: the input image is never modified.
- Sources
  - `evaluate_expression(expr, rgba, max_chars=, max_depth=, memory_limit=)`
    parses with `engine.mask_expr` (the grammar and the type rules are
    documented there), bounds the evaluation's memory with
    `engine.mask_eval.expression_memory` (refused over `memory_limit` before
    any allocation) and evaluates on the image's device (`engine.mask_eval`),
    reading only the channels the expression names. Semantics: channels and numbers are float32; `+ - * /`
    follow IEEE float32 exactly like NumPy float32 arrays (x/0 = +-inf,
    0/0 = nan, inf-inf = nan); comparisons with nan are false except `!=`;
    `min`/`max` propagate nan (np.minimum / np.maximum). Conditions are never
    numbers (the parser rejects `(r > 5) + 1`). Channels: r g b a as 0..255
    (a = 255 for RGB input), h in degrees [0, 360) and s, v in 0..1 (as
    skimage.color.rgb2hsv, hue * 360), gray = 0.299 r + 0.587 g + 0.114 b,
    l lab_a lab_b = skimage rgb2lab via `engine.color.rgb_to_lab`, x / y the
    column / row index, width / height the image size, delta_e(#hex) the
    CIEDE2000 distance via `engine.color.delta_e_to_color`.
    Fast path (same results): a conjunction of comparisons of r g b a with
    constants is turned into one per-channel integer range [lo, hi] and
    evaluated in uint8 (OpenCV `inRange` on CPU, torch elsewhere).
  - `image_mask(arr, H, W)`: non-zero = selected (RGB: any colour channel
    non-zero; RGBA: that and alpha non-zero). A size mismatch is an error.
  - `shape_mask(shapes, H, W)`: the union of shapes; a pixel is selected when
    its centre (x + 0.5, y + 0.5) is inside. Shapes are dicts:
    `{"type": "rect", "box": [x1, y1, x2, y2]}` (x1 <= cx < x2, y1 <= cy < y2),
    `{"type": "ellipse", "box": [x1, y1, x2, y2]}` (the inscribed ellipse,
    boundary included), `{"type": "polygon", "points": [[x, y], ...]}`
    (even-odd rule); each may say `"units": "px"` (default) or `"relative"`
    (fractions of the width / height).
  - `detection_mask(detections, H, W)`: the union of the detections' boxes
    (x2 / y2 exclusive), or of their segmentation masks when they have one
    and `use_masks` is true.
  - `combine(masks, how)`: "and" | "or" | "xor" (xor = odd parity).
- Refinement (hard masks; morphology runs on the CPU in NumPy over the mask's
  bounding box, the result goes back to the mask's device):
  `dilate(m, px)` / `erode(m, px)`: a disk of radius px (skimage `disk(px)`,
  via an exact Euclidean distance transform); erosion ignores the outside of
  the image (skimage `binary_erosion(mode="ignore")`).
  `remove_small_objects(m, n)`: drop 8-connected components of fewer than n
  pixels; `fill_small_holes(m, n)`: fill 4-connected unselected regions of
  fewer than n pixels (skimage morphology, max_size = n - 1).
  `feather(m, px)` -> float32: the mask blurred by a Gaussian of sigma px / 2
  truncated at radius px (symmetric borders), so it spreads at most px pixels.
  `invert(m)`: not m (or 1 - m).
- Operations `apply_<name>(rgba, mask, ...)`: the edited value e of a pixel is
  composited as `round(src + (e - src) * m)` (float32, round half to even);
  where m == 0 the result is the source byte for byte, where m == 1 it is e.
  Only the mask's bounding box (plus the blur margin) is computed.
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
- `mask_stats(m)`: selected pixels, fraction, bbox (x1, y1, x2, y2 exclusive)
  and 8-connected component count of a hard mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InvalidInput
from .mask_eval import _box_mask, evaluate_expression, evaluate_tree, expression_memory  # noqa: F401

__all__ = [
    "evaluate_expression", "evaluate_tree", "image_mask", "shape_mask", "detection_mask", "combine",
    "dilate", "erode", "remove_small_objects", "fill_small_holes", "feather", "invert",
    "apply_fill", "apply_replace", "apply_blur", "apply_pixelate", "apply_grayscale", "apply_adjust",
    "apply_hue_shift", "apply_transparent", "mask_stats", "as_image_tensor", "to_numpy", "mask_preview",
    "mask_weights", "expression_memory",
]

# -- helpers ------------------------------------------------------------------------
def as_image_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [H, W, 3|4] (numpy or tensor) -> a tensor on `device` (no copy when already there)."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    _check_image(t, "image")
    return t.to(device) if device is not None else t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _check_image(t: Any, argument: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] not in (3, 4):
        shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
        raise InvalidInput(argument, shape, "expected a uint8 image [H, W, 3] or [H, W, 4]")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidInput(argument, tuple(t.shape), "the image is empty")


def _check_mask(mask: torch.Tensor, image: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or tuple(mask.shape) != tuple(image.shape[:2]):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise InvalidInput("mask", shape, f"expected a [H, W] mask matching the image {tuple(image.shape[:2])}")


def _clone(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":  # numpy's memcpy beats torch's threaded copy on small CPUs
        return torch.from_numpy(t.numpy().copy())
    return t.clone()


# -- expression evaluation: engine.mask_eval (re-exported here) -------------------------------
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


# -- other sources ----------------------------------------------------------------------
def image_mask(mask: np.ndarray | torch.Tensor, height: int, width: int, *,
               device: torch.device | str = "cpu", argument: str = "mask_image") -> torch.Tensor:
    """Non-zero = selected: uint8/bool [h, w] or [h, w, 3|4] -> bool [H, W]; the size must match."""
    m = torch.from_numpy(np.ascontiguousarray(mask)) if isinstance(mask, np.ndarray) else mask
    if m.ndim not in (2, 3) or (m.ndim == 3 and m.shape[2] not in (1, 3, 4)):
        raise InvalidInput(argument, tuple(m.shape), "expected a [H, W] or [H, W, 1|3|4] mask image")
    if tuple(m.shape[:2]) != (height, width):
        raise InvalidInput(argument, f"{m.shape[1]}x{m.shape[0]}",
                           f"the mask image must have the size of the image, {width}x{height}")
    m = m.to(device)
    if m.ndim == 2:
        return m != 0
    if m.shape[2] == 1:
        return m[..., 0] != 0
    sel = (m[..., :3] != 0).any(-1)
    if m.shape[2] == 4:
        sel &= m[..., 3] != 0
    return sel


def _shape_coords(shape: Mapping[str, Any], key: str, count: int | None, height: int, width: int,
                  index: int) -> np.ndarray:
    arg = f"shapes[{index}].{key}"
    raw = shape.get(key)
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(arg, raw, "expected numbers") from exc
    if count is not None and arr.shape != (count,):
        raise InvalidInput(arg, raw, f"expected {count} numbers [x1, y1, x2, y2]")
    if count is None and (arr.ndim != 2 or arr.shape[1] != 2 or not 3 <= arr.shape[0] <= 10000):
        raise InvalidInput(arg, raw, "expected 3 to 10000 points [[x, y], ...]")
    if not np.isfinite(arr).all():
        raise InvalidInput(arg, raw, "coordinates must be finite")
    units = shape.get("units", "px")
    if units == "relative":
        arr = arr.reshape(-1, 2) * np.array([width, height], dtype=np.float64)
        arr = arr.reshape(-1) if count is not None else arr
    elif units != "px":
        raise InvalidInput(f"shapes[{index}].units", units, "expected 'px' or 'relative'")
    return arr


def shape_mask(shapes: Sequence[Mapping[str, Any]], height: int, width: int, *,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The union of rect / ellipse / polygon shapes (see the module docstring) -> bool [H, W]."""
    out = torch.zeros(height, width, dtype=torch.bool, device=device)
    for i, shape in enumerate(shapes):
        if not isinstance(shape, Mapping):
            raise InvalidInput(f"shapes[{i}]", shape, "expected an object with a 'type'")
        kind = shape.get("type")
        if kind in ("rect", "ellipse"):
            x1, y1, x2, y2 = _shape_coords(shape, "box", 4, height, width, i)
            if x2 < x1 or y2 < y1:
                raise InvalidInput(f"shapes[{i}].box", shape.get("box"), "needs x1 <= x2 and y1 <= y2")
            # only the pixels whose centres can be inside: columns c with x1 <= c + 0.5 < x2
            c0, c1 = max(0, math.floor(x1 - 0.5)), min(width, math.ceil(x2 - 0.5) + 1)
            r0, r1 = max(0, math.floor(y1 - 0.5)), min(height, math.ceil(y2 - 0.5) + 1)
            if c0 >= c1 or r0 >= r1:
                continue
            cx = torch.arange(c0, c1, dtype=torch.float64, device=device).view(1, -1) + 0.5
            cy = torch.arange(r0, r1, dtype=torch.float64, device=device).view(-1, 1) + 0.5
            if kind == "rect":
                inside = (cx >= x1) & (cx < x2) & (cy >= y1) & (cy < y2)
            else:
                rx, ry = (x2 - x1) / 2, (y2 - y1) / 2
                if rx <= 0 or ry <= 0:
                    continue
                inside = ((cx - (x1 + x2) / 2) / rx) ** 2 + ((cy - (y1 + y2) / 2) / ry) ** 2 <= 1.0
            out[r0:r1, c0:c1] |= inside
        elif kind == "polygon":
            pts = _shape_coords(shape, "points", None, height, width, i)
            c0, c1 = max(0, math.floor(pts[:, 0].min() - 0.5)), min(width, math.ceil(pts[:, 0].max()) + 1)
            r0, r1 = max(0, math.floor(pts[:, 1].min() - 0.5)), min(height, math.ceil(pts[:, 1].max()) + 1)
            if c0 >= c1 or r0 >= r1:
                continue
            px = torch.arange(c0, c1, dtype=torch.float64, device=device).view(1, -1) + 0.5
            py = torch.arange(r0, r1, dtype=torch.float64, device=device).view(-1, 1) + 0.5
            inside = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
            for (xi, yi), (xj, yj) in zip(pts, np.roll(pts, 1, axis=0)):  # a loop over edges, not pixels
                if yi == yj:
                    continue
                crosses = (yi > py) != (yj > py)  # [h, 1]
                x_at = xi + (py - yi) * (xj - xi) / (yj - yi)  # [h, 1]
                inside ^= crosses & (px < x_at)
            out[r0:r1, c0:c1] |= inside
        else:
            raise InvalidInput(f"shapes[{i}].type", kind, "expected 'rect', 'ellipse' or 'polygon'")
    return out


def detection_mask(detections: Iterable[Any], height: int, width: int, *, use_masks: bool = True,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The union of detections (`.box` x1, y1, x2, y2 exclusive; `.mask` bool [H, W] or None) -> bool [H, W]."""
    out = torch.zeros(height, width, dtype=torch.bool, device=device)
    for det in detections:
        seg = getattr(det, "mask", None)
        if use_masks and seg is not None and tuple(np.shape(seg)) == (height, width):
            out |= torch.as_tensor(np.asarray(seg, dtype=bool), device=device)
            continue
        x1, y1, x2, y2 = (int(v) for v in det.box)
        x1, x2 = max(0, x1), min(width, x2)
        y1, y2 = max(0, y1), min(height, y2)
        if x1 < x2 and y1 < y2:
            out[y1:y2, x1:x2] = True
    return out


def combine(masks: Sequence[torch.Tensor], how: str = "and") -> torch.Tensor:
    """Combine bool [H, W] masks with "and" | "or" | "xor"."""
    if not masks:
        raise InvalidInput("masks", [], "need at least one mask")
    if how not in ("and", "or", "xor"):
        raise InvalidInput("combine", how, "expected 'and', 'or' or 'xor'")
    shape = tuple(masks[0].shape)
    acc = masks[0]
    for m in masks[1:]:
        if tuple(m.shape) != shape:
            raise InvalidInput("masks", tuple(m.shape), f"mask sizes differ: {shape}")
        acc = acc & m if how == "and" else (acc | m if how == "or" else acc ^ m)
    return acc


# -- refinement --------------------------------------------------------------------------------
def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), ends exclusive, of mask > 0; None when empty."""
    sel = mask if mask.dtype == torch.bool else mask > 0
    rows = torch.nonzero(sel.any(1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(sel.any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _grow(box: tuple[int, int, int, int], margin: int, height: int, width: int) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    return max(0, y0 - margin), min(height, y1 + margin), max(0, x0 - margin), min(width, x1 + margin)


def _check_px(argument: str, px: float) -> None:
    if not (isinstance(px, (int, float)) and math.isfinite(px) and px >= 0):
        raise InvalidInput(argument, px, "must be a finite number >= 0")


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Grow a bool mask by a disk of radius px (exact: Euclidean distance <= px)."""
    from scipy.ndimage import distance_transform_edt

    _check_px("dilate", px)
    box = _bbox(mask)
    if px == 0 or box is None:
        return mask.clone()
    y0, y1, x0, x1 = _grow(box, int(px) + 1, *mask.shape)
    crop = to_numpy(mask[y0:y1, x0:x1])
    grown = distance_transform_edt(~crop) <= px
    out = mask.clone()
    out[y0:y1, x0:x1] = torch.from_numpy(grown).to(mask.device)
    return out


def erode(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Shrink a bool mask by a disk of radius px; the outside of the image does not erode."""
    from scipy.ndimage import distance_transform_edt

    _check_px("erode", px)
    box = _bbox(mask)
    if px == 0 or box is None:
        return mask.clone()
    y0, y1, x0, x1 = _grow(box, int(px) + 1, *mask.shape)
    crop = to_numpy(mask[y0:y1, x0:x1])
    if crop.all():
        return mask.clone()
    kept = distance_transform_edt(crop) > px  # distance to the nearest unselected pixel
    out = torch.zeros_like(mask)
    out[y0:y1, x0:x1] = torch.from_numpy(kept).to(mask.device)
    return out


def remove_small_objects(mask: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """Drop 8-connected components of fewer than `min_pixels` pixels."""
    from skimage import morphology

    _check_px("remove_small_objects", min_pixels)
    box = _bbox(mask)
    if min_pixels <= 1 or box is None:
        return mask.clone()
    y0, y1, x0, x1 = box
    crop = to_numpy(mask[y0:y1, x0:x1])
    kept = morphology.remove_small_objects(crop, max_size=int(min_pixels) - 1, connectivity=2)
    out = mask.clone()
    out[y0:y1, x0:x1] = torch.from_numpy(kept).to(mask.device)
    return out


def fill_small_holes(mask: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """Select 4-connected unselected regions of fewer than `max_pixels` pixels."""
    from skimage import morphology

    _check_px("fill_holes", max_pixels)
    if max_pixels <= 1:
        return mask.clone()
    filled = morphology.remove_small_holes(to_numpy(mask), max_size=int(max_pixels) - 1, connectivity=1)
    return torch.from_numpy(filled).to(mask.device)


def invert(mask: torch.Tensor) -> torch.Tensor:
    return ~mask if mask.dtype == torch.bool else 1.0 - mask


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy((k / k.sum()).astype(np.float32))


def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded by `radius` on both sides, mirrored as d c b a | a b c d."""
    i = torch.arange(-radius, n + radius, device=device)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """float32 [C, H, W] -> the same, separable Gaussian with symmetric borders."""
    if radius == 0:
        return x.clone()
    c, h, w = x.shape
    k = _gaussian_kernel(sigma, radius).to(x.device)
    xp = x.index_select(2, _symmetric_index(w, radius, x.device))
    y = torch.nn.functional.conv2d(xp.unsqueeze(0), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)[0]
    yp = y.index_select(1, _symmetric_index(h, radius, x.device))
    return torch.nn.functional.conv2d(yp.unsqueeze(0), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def feather(mask: torch.Tensor, px: float) -> torch.Tensor:
    """bool [H, W] -> float32 [H, W] in 0..1: Gaussian sigma px / 2 truncated at radius px."""
    _check_px("feather", px)
    m = mask.to(torch.float32) if mask.dtype == torch.bool else mask.to(torch.float32).clone()
    radius = int(px)
    box = _bbox(m)
    if radius < 1 or box is None:
        return m
    y0, y1, x0, x1 = _grow(box, 2 * radius, *m.shape)
    soft = _gaussian_blur(m[y0:y1, x0:x1].unsqueeze(0), px / 2.0, radius)[0]
    m[y0:y1, x0:x1] = soft.clamp_(0.0, 1.0)
    return m


# -- operations ---------------------------------------------------------------------------------
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
    _check_image(rgba, "image")
    _check_mask(mask, rgba)
    out = _clone(rgba)
    box = _bbox(mask)
    if box is None:
        return out
    h, w = rgba.shape[:2]
    y0, y1, x0, x1 = _grow(box, margin, h, w)
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
    _check_image(rgba, "image")
    _check_mask(mask, rgba)
    vals = _color_tuple(color, rgba.shape[2])
    k = len(vals)
    if mask.dtype == torch.bool:  # sparse scatter: no full-image blend pass
        out = _clone(rgba)
        idx = torch.nonzero(mask.reshape(-1)).flatten()
        if idx.numel():
            value = torch.tensor(vals, dtype=torch.uint8, device=rgba.device)
            out.view(-1, rgba.shape[2])[idx, :k] = value
        return out
    value = torch.tensor(vals, dtype=torch.uint8, device=rgba.device)
    return _apply_local(rgba, mask, lambda crop, y0, x0: value.expand(*crop.shape[:2], k), channels=slice(0, k))


def apply_replace(rgba: torch.Tensor, mask: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Take every channel from `other` (uint8 [H, W, 3|4], same size) where selected."""
    _check_image(other, "replace_with")
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
        y = _gaussian_blur(x, sigma, radius)
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
    _check_image(rgba, "image")
    if rgba.shape[2] == 3:
        rgba = torch.cat([rgba, torch.full_like(rgba[..., :1], 255)], -1)
    return _apply_local(rgba, mask, lambda crop, y0, x0: torch.zeros_like(crop[..., 3:4]), channels=slice(3, 4))


# -- results ---------------------------------------------------------------------------------------
def mask_stats(mask: torch.Tensor) -> dict[str, Any]:
    """selected_pixels, fraction, bbox [x1, y1, x2, y2] (exclusive) or None, components (8-connected)."""
    from scipy import ndimage

    sel = mask if mask.dtype == torch.bool else mask > 0
    h, w = sel.shape
    count = int(sel.sum())
    box = _bbox(sel)
    components = 0
    if box is not None:
        y0, y1, x0, x1 = box
        _, components = ndimage.label(to_numpy(sel[y0:y1, x0:x1]), structure=np.ones((3, 3), dtype=bool))
    return {"selected_pixels": count, "fraction": count / float(h * w),
            "bbox": None if box is None else [box[2], box[0], box[3], box[1]], "components": int(components)}


def mask_preview(mask: torch.Tensor) -> np.ndarray:
    """bool / float [H, W] -> uint8 [H, W] (0..255) for display."""
    if mask.dtype == torch.bool:
        return to_numpy(mask.to(torch.uint8) * 255)
    return to_numpy(torch.round(mask.to(torch.float32).clamp(0, 1) * 255.0).to(torch.uint8))


def mask_weights(mask: torch.Tensor) -> np.ndarray:
    """bool / float [H, W] -> float32 [H, W] in 0..1 on the CPU (for engines that take NumPy masks)."""
    return to_numpy(mask.to(torch.float32).clamp(0, 1)).astype(np.float32)
