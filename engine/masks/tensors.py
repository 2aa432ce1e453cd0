"""Image and mask tensors shared by every masks module: the checks, the conversions, the bounding box.

An image is uint8 [H, W, 3 | 4] (RGB / RGBA) on any device; a hard mask bool [H, W]; a soft mask float32
[H, W] in 0..1. Nothing here allocates more than the tensor it returns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInput


def as_image_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [H, W, 3|4] (numpy or tensor) -> a tensor on `device` (no copy when already there)."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    check_image(t, "image")
    return t.to(device) if device is not None else t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def check_image(t: Any, argument: str = "image") -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] not in (3, 4):
        shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
        raise InvalidInput(argument, shape, "expected a uint8 image [H, W, 3] or [H, W, 4]")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidInput(argument, tuple(t.shape), "the image is empty")


def check_mask(mask: torch.Tensor, image: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or tuple(mask.shape) != tuple(image.shape[:2]):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise InvalidInput("mask", shape, f"expected a [H, W] mask matching the image {tuple(image.shape[:2])}")


def check_px(argument: str, px: float) -> None:
    if not (isinstance(px, (int, float)) and math.isfinite(px) and px >= 0):
        raise InvalidInput(argument, px, "must be a finite number >= 0")


def clone(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":  # numpy's memcpy beats torch's threaded copy on small CPUs
        return torch.from_numpy(t.numpy().copy())
    return t.clone()


def zeros_mask(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [H, W] all False (NumPy's calloc on the CPU)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.zeros((height, width), np.bool_))
    return torch.zeros(height, width, dtype=torch.bool, device=device)


def put(out: torch.Tensor, y0: int, x0: int, block: np.ndarray) -> None:
    """out[y0:y0 + h, x0:x0 + w] = block (a NumPy array), through NumPy when `out` is on the CPU."""
    h, w = block.shape[:2]
    if out.device.type == "cpu":
        out.numpy()[y0:y0 + h, x0:x0 + w] = block
    else:
        out[y0:y0 + h, x0:x0 + w] = torch.from_numpy(block).to(out.device)


def bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), ends exclusive, of mask > 0; None when empty."""
    if mask.device.type == "cpu":  # NumPy's single-threaded reductions beat torch's on small, busy CPUs
        arr = mask.numpy()
        sel_np = arr if arr.dtype == np.bool_ else arr > 0
        rows_np = np.flatnonzero(sel_np.any(1))
        if rows_np.size == 0:
            return None
        cols_np = np.flatnonzero(sel_np.any(0))
        return int(rows_np[0]), int(rows_np[-1]) + 1, int(cols_np[0]), int(cols_np[-1]) + 1
    sel = mask if mask.dtype == torch.bool else mask > 0
    rows = torch.nonzero(sel.any(1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(sel.any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def grow(box: tuple[int, int, int, int], margin: int, height: int, width: int) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    return max(0, y0 - margin), min(height, y1 + margin), max(0, x0 - margin), min(width, x1 + margin)
