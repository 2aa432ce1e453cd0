"""What a mask tells the caller: its statistics, a preview image, NumPy weights for other engines.

- `mask_stats(m)`: selected pixels, fraction, bbox (x1, y1, x2, y2 exclusive)
  and 8-connected component count of a hard mask.
- `mask_preview(m)`: uint8 [H, W] 0..255 for display.
- `mask_weights(m)`: float32 [H, W] in 0..1 on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .tensors import bbox, to_numpy


def mask_stats(mask: torch.Tensor) -> dict[str, Any]:
    """selected_pixels, fraction, bbox [x1, y1, x2, y2] (exclusive) or None, components (8-connected)."""
    from scipy import ndimage

    sel = mask if mask.dtype == torch.bool else mask > 0
    h, w = sel.shape
    count = int(sel.sum())
    box = bbox(sel)
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
