"""Masks: build a selection, refine it, apply an edit through it.

Contract
- Images are uint8 tensors [H, W, 3] or [H, W, 4] (RGB / RGBA) on any device;
  a hard mask is bool [H, W], a soft (feathered) mask float32 [H, W] in 0..1.
  Every function returns new tensors: the input image is never modified.
- The modules, one concern each (their docstrings hold the exact semantics):
  - `expression`: the expression language (tokenizer, parser, type rules),
    its evaluation on an image and the bound of the memory that evaluation
    holds (`evaluate_expression`, `evaluate_tree`, `parse`,
    `expression_memory`, `check_expression_memory`);
  - `sources`: selections from a mask image, shapes, boxes or detections, and
    their combination (`image_mask`, `shape_mask`, `box_mask`,
    `detection_mask`, `combine`);
  - `morphology`: refinement (`dilate`, `erode` with a disk or a square,
    `shift`, `remove_small_objects`, `fill_small_holes`, `feather`,
    `invert`) and the Gaussian blur `feather` and `apply_blur` share;
  - `edits`: `apply_fill`, `apply_replace`, `apply_blur`, `apply_pixelate`,
    `apply_grayscale`, `apply_adjust`, `apply_hue_shift`,
    `apply_transparent`, each composited through the mask;
  - `stats`: `mask_stats`, `mask_preview`, `mask_weights`;
  - `tensors`: image / mask checks and conversions (`as_image_tensor`,
    `to_numpy`) the others share.
- `engine.adetailer` builds its masks with `sources`, `morphology` (square
  footprint) and `feather`; `tools/masks.py` (mask_edit) and
  `tools/color.py` (mask_expression) use the same functions.

Everything listed in `__all__` is importable from `engine.masks`.
"""

from __future__ import annotations

from .edits import (
    apply_adjust,
    apply_blur,
    apply_fill,
    apply_grayscale,
    apply_hue_shift,
    apply_pixelate,
    apply_replace,
    apply_transparent,
)
from .expression import check_expression_memory, evaluate_expression, evaluate_tree, expression_memory, parse
from .morphology import dilate, erode, feather, fill_small_holes, gaussian_blur, invert, remove_small_objects, shift
from .sources import box_mask, combine, detection_mask, image_mask, shape_mask
from .stats import mask_preview, mask_stats, mask_weights
from .tensors import as_image_tensor, to_numpy

__all__ = [
    "evaluate_expression", "evaluate_tree", "parse", "expression_memory", "check_expression_memory",
    "image_mask", "shape_mask", "box_mask", "detection_mask", "combine",
    "dilate", "erode", "shift", "remove_small_objects", "fill_small_holes", "feather", "invert", "gaussian_blur",
    "apply_fill", "apply_replace", "apply_blur", "apply_pixelate", "apply_grayscale", "apply_adjust",
    "apply_hue_shift", "apply_transparent", "mask_stats", "mask_preview", "mask_weights", "as_image_tensor",
    "to_numpy",
]
