"""Refining a mask: grow, shrink, shift, clean up, soften, invert.

Hard masks are bool [H, W]; `feather` returns float32 [H, W] in 0..1. Every
function returns a new tensor on the mask's device. The morphology runs on the
CPU in NumPy / SciPy over the mask's bounding box (grown by the reach of the
operation), the result goes back to the mask's device.

- `dilate(m, px, footprint=)` / `erode(m, px, footprint=)`: by a disk of
  radius px (skimage `disk(px)`, via an exact Euclidean distance transform;
  the default) or a (2 int(px) + 1)-square (OpenCV's dilate / erode with that
  kernel, as ADetailer does). Dilation
  never grows from outside the image; erosion ignores the outside of the
  image (skimage `binary_erosion(mode="ignore")`, scipy `border_value=1`).
- `shift(m, dx, dy)`: move by dx px right and dy px down; pixels shifted in
  are unselected, nothing wraps.
- `remove_small_objects(m, n)`: drop 8-connected components of fewer than n
  pixels; `fill_small_holes(m, n)`: fill 4-connected unselected regions of
  fewer than n pixels (skimage morphology, max_size = n - 1).
- `feather(m, px)` -> float32: the mask blurred by a Gaussian of sigma px / 2
  truncated at radius int(px) (symmetric borders, scipy / OpenCV "reflect"),
  so it spreads at most int(px) pixels in x and in y: the support is the mask
  dilated by a (2 int(px) + 1)-square. On the CPU it is OpenCV's GaussianBlur
  with that kernel (what ADetailer used), elsewhere `gaussian_blur`; both are
  within 1e-6 of scipy's `gaussian_filter`.
- `invert(m)`: not m (or 1 - m).
- `gaussian_blur(x, sigma, radius)`: the separable Gaussian both `feather` and
  `engine.masks.edits.apply_blur` use, float32 [C, H, W], symmetric borders.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import InvalidInput
from .tensors import bbox, check_px, clone, grow, put, to_numpy

Footprint = Literal["disk", "square"]


def _check_footprint(footprint: str) -> None:
    if footprint not in ("disk", "square"):
        raise InvalidInput("footprint", footprint, "expected 'disk' or 'square'")


def _square(crop: np.ndarray, px: int, *, grow: bool) -> np.ndarray:
    """bool crop -> dilated / eroded by a (2 px + 1)-square (OpenCV: outside the array never counts)."""
    import cv2

    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    u8 = np.ascontiguousarray(crop).view(np.uint8)
    return (cv2.dilate(u8, kernel) if grow else cv2.erode(u8, kernel)).view(np.bool_)


def _region(argument: str, mask: torch.Tensor, px: int, footprint: Footprint) -> tuple[int, int, np.ndarray] | None:
    """Check px and footprint; -> (y0, x0, the mask's crop around its selection grown by px + 1) as NumPy,
    or None when nothing changes (px 0 or an empty mask)."""
    check_px(argument, px)
    _check_footprint(footprint)
    box = bbox(mask)
    if px == 0 or box is None:
        return None
    y0, y1, x0, x1 = grow(box, int(px) + 1, *mask.shape)
    return y0, x0, to_numpy(mask[y0:y1, x0:x1])


def dilate(mask: torch.Tensor, px: int, *, footprint: Footprint = "disk") -> torch.Tensor:
    """Grow a bool mask by a disk of radius px (Euclidean distance <= px) or a (2 px + 1)-square."""
    from scipy.ndimage import distance_transform_edt

    region = _region("dilate", mask, px, footprint)
    if region is None:
        return clone(mask)
    y0, x0, crop = region
    if footprint == "square":
        grown = _square(crop, int(px), grow=True)
    else:
        grown = distance_transform_edt(~crop) <= px
    out = clone(mask)
    put(out, y0, x0, grown)
    return out


def erode(mask: torch.Tensor, px: int, *, footprint: Footprint = "disk") -> torch.Tensor:
    """Shrink a bool mask by a disk of radius px or a (2 px + 1)-square; the outside of the image does not erode."""
    from scipy.ndimage import distance_transform_edt

    region = _region("erode", mask, px, footprint)
    if region is None:
        return clone(mask)
    y0, x0, crop = region
    if crop.all():
        return clone(mask)
    if footprint == "square":
        kept = _square(crop, int(px), grow=False)
    else:
        kept = distance_transform_edt(crop) > px  # distance to the nearest unselected pixel
    out = torch.from_numpy(np.zeros(mask.shape, np.bool_)).to(mask.device)
    put(out, y0, x0, kept)
    return out


def shift(mask: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move a mask dx px right and dy px down; what is shifted in is unselected, nothing wraps."""
    h, w = mask.shape
    out = torch.from_numpy(np.zeros(mask.shape, to_numpy(mask[:0, :0]).dtype)).to(mask.device)
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    if src_y.start < src_y.stop and src_x.start < src_x.stop:
        put(out, dst_y.start, dst_x.start, to_numpy(mask[src_y, src_x]))
    return out


def remove_small_objects(mask: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """Drop 8-connected components of fewer than `min_pixels` pixels."""
    from skimage import morphology

    check_px("remove_small_objects", min_pixels)
    box = bbox(mask)
    if min_pixels <= 1 or box is None:
        return clone(mask)
    y0, y1, x0, x1 = box
    crop = to_numpy(mask[y0:y1, x0:x1])
    kept = morphology.remove_small_objects(crop, max_size=int(min_pixels) - 1, connectivity=2)
    out = clone(mask)
    put(out, y0, x0, kept)
    return out


def fill_small_holes(mask: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """Select 4-connected unselected regions of fewer than `max_pixels` pixels."""
    from skimage import morphology

    check_px("fill_holes", max_pixels)
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


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
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
    """bool [H, W] -> float32 [H, W] in 0..1: Gaussian sigma px / 2 truncated at radius int(px)."""
    check_px("feather", px)
    radius = int(px)
    box = bbox(mask)
    if mask.device.type == "cpu":  # OpenCV's separable float filter: the same kernel and borders, ~50x faster
        import cv2

        arr = mask.numpy().astype(np.float32)  # a copy
        if radius < 1 or box is None:
            return torch.from_numpy(arr)
        y0, y1, x0, x1 = grow(box, 2 * radius, *arr.shape)
        k = 2 * radius + 1
        soft_np = cv2.GaussianBlur(np.ascontiguousarray(arr[y0:y1, x0:x1]), (k, k), sigmaX=px / 2.0,
                                   sigmaY=px / 2.0, borderType=cv2.BORDER_REFLECT)
        arr[y0:y1, x0:x1] = np.clip(soft_np, 0.0, 1.0)
        return torch.from_numpy(arr)
    m = mask.to(torch.float32) if mask.dtype == torch.bool else mask.to(torch.float32).clone()
    if radius < 1 or box is None:
        return m
    y0, y1, x0, x1 = grow(box, 2 * radius, *m.shape)
    soft = gaussian_blur(m[y0:y1, x0:x1].unsqueeze(0), px / 2.0, radius)[0]
    m[y0:y1, x0:x1] = soft.clamp_(0.0, 1.0)
    return m
