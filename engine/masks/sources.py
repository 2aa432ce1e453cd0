"""Mask sources: where a selection comes from (besides an expression, `engine.masks.expression`).

- `image_mask(arr, H, W)`: non-zero = selected (RGB: any colour channel
  non-zero; RGBA: that and alpha non-zero). A size mismatch is an error.
- `shape_mask(shapes, H, W)`: the union of shapes; a pixel is selected when
  its centre (x + 0.5, y + 0.5) is inside. Shapes are dicts:
  `{"type": "rect", "box": [x1, y1, x2, y2]}` (x1 <= cx < x2, y1 <= cy < y2),
  `{"type": "ellipse", "box": [x1, y1, x2, y2]}` (the inscribed ellipse,
  boundary included), `{"type": "polygon", "points": [[x, y], ...]}`
  (even-odd rule); each may say `"units": "px"` (default) or `"relative"`
  (fractions of the width / height).
- `box_mask(box, H, W)`: one box (x1, y1, x2, y2; x2 / y2 exclusive).
- `detection_mask(detections, H, W)`: the union of the detections' boxes
  (x1, y1, x2, y2; x2 / y2 exclusive; clipped to the image), or of their
  segmentation masks when they have one of the image's size that selects
  something and `use_masks` is true (an empty segmentation falls back to the
  box, as in ADetailer).
- `combine(masks, how)`: "and" | "or" | "xor" (xor = odd parity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInput
from .tensors import zeros_mask


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
    """The union of detections (`.box` x1, y1, x2, y2 exclusive; `.mask` bool [H, W] or None) -> bool [H, W].

    A segmentation mask is used when `use_masks`, it has the image's size and it selects something; else the box.
    """
    out = zeros_mask(height, width, device)
    for det in detections:
        seg = getattr(det, "mask", None)
        if use_masks and seg is not None and tuple(np.shape(seg)) == (height, width):
            seg_np = np.asarray(seg, dtype=bool)
            if seg_np.any():
                if out.device.type == "cpu":
                    acc = out.numpy()
                    np.logical_or(acc, seg_np, out=acc)
                else:
                    out |= torch.as_tensor(seg_np, device=out.device)
                continue
        _fill_box(out, det.box)
    return out


def box_mask(box: Sequence[float], height: int, width: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [H, W]: True inside box (x1, y1, x2, y2; x2 / y2 exclusive; int() of each; clipped to the image)."""
    out = zeros_mask(height, width, device)
    _fill_box(out, box)
    return out


def _fill_box(out: torch.Tensor, box: Sequence[float]) -> None:
    height, width = out.shape
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    if x1 < x2 and y1 < y2:
        if out.device.type == "cpu":
            out.numpy()[y1:y2, x1:x2] = True
        else:
            out[y1:y2, x1:x2] = True


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
