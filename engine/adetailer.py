"""ADetailer: detect -> masks -> crop with padding -> upscale -> inpaint -> scale back -> feathered paste.

Contract
- `detail(engine, model_path, image, units, ...)` repaints every detected
  region of uint8 RGB [H, W, 3] `image` and returns a `DetailResult`.
  A `DetailUnit` is one target ("face", "hand", "person" or a class name, see
  `engine.detect`) with its own prompt, negative prompt, denoising strength,
  steps and guidance, like one ADetailer tab.
- All units detect on the input image first (so the total number of steps is
  known for progress), then regions are inpainted one after the other, each on
  the image the previous one left; region i uses seed + i.
- Masks, per unit, built with `engine.masks`' operations: from the box, or
  from the segmentation mask when the detector gives one that selects
  something (`mask_source="auto"`; `masks.detection_mask`); then offset (x:
  +right, y: +up, as in ADetailer; pixels shifted in are empty, nothing
  wraps; `masks.shift`), then dilate (px > 0) or erode (px < 0) with a
  (2|px|+1)-square (`masks.dilate` / `masks.erode`, footprint "square":
  dilation never grows from outside the image, erosion does not eat in from
  the image edge), masks left empty are dropped, then merge: "none" (one
  region per detection), "merge" (their union), "merge_invert" (everything
  but the union).
- Per region: alpha = `masks.feather(mask, feather)`, a Gaussian of sigma
  feather / 2 truncated at radius feather (symmetric borders, as OpenCV's
  GaussianBlur with a (2*feather+1) kernel and BORDER_REFLECT), values under
  1e-6 set to 0, so alpha > 0 exactly on the mask dilated by `feather` px. The crop is the
  bounding box of alpha > 0 grown by `padding` px (clipped to the image); it
  is resized (aspect kept, sides multiples of 8) so its longer side is
  `resolution`, inpainted where alpha > 0, resized back (Lanczos), and pasted
  as `orig * (1 - alpha) + new * alpha`. Every pixel where alpha == 0 is
  returned bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import diffusion
from . import masks as mask_ops
from .detect import Detection, detect
from .errors import InvalidInput
from .scheduler import CancelToken

MERGE_MODES = ("none", "merge", "merge_invert")


@dataclass
class DetailUnit:
    target: str
    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.4
    steps: int = 20
    guidance_scale: float = 7.0


@dataclass
class Region:
    unit: int  # index into the units
    target: str
    crop: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive) of the inpainted crop
    size: tuple[int, int]  # (width, height) the crop was inpainted at
    seed: int
    mask: np.ndarray  # [H, W] bool: the processed mask
    alpha: np.ndarray  # [H, W] float32 0..1: the feathered paste weight


@dataclass
class DetailResult:
    image: np.ndarray  # uint8 [H, W, 3]
    detections: list[tuple[int, Detection]]  # (unit index, detection) kept after threshold / top-k
    regions: list[Region] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    masks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (unit index, processed [H, W] bool mask)


# -- masks: engine.masks' operations on NumPy arrays (torch.from_numpy shares their memory) -----------
def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """[H, W] bool, True inside box (x1, y1, x2, y2 exclusive)."""
    return mask_ops.box_mask(box, *shape).numpy()


def detection_mask(det: Detection, shape: tuple[int, int], source: str = "auto") -> np.ndarray:
    """The detection's segmentation mask when `source` is "auto" and it has one that selects something, else its box."""
    return mask_ops.detection_mask([det], *shape, use_masks=source == "auto").numpy()


def offset_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift by dx px to the right and dy px UP (ADetailer's convention); no wrap-around."""
    return mask_ops.shift(torch.from_numpy(mask), dx, -dy).numpy()


def dilate_erode(mask: np.ndarray, px: int) -> np.ndarray:
    """px > 0 dilates, px < 0 erodes, by |px| pixels (Chebyshev: a (2|px|+1)-square kernel)."""
    if px == 0:
        return mask.copy()
    op = mask_ops.dilate if px > 0 else mask_ops.erode
    return op(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)), abs(px), footprint="square").numpy()


def merge_masks(masks: Sequence[np.ndarray], mode: str) -> list[np.ndarray]:
    if mode not in MERGE_MODES:
        raise InvalidInput("merge", mode, f"expected one of {', '.join(MERGE_MODES)}")
    if mode == "none" or not masks:
        return [m.copy() for m in masks]
    union = np.logical_or.reduce(list(masks))
    return [union] if mode == "merge" else [~union]


def preprocess_masks(masks: Sequence[np.ndarray], *, offset: tuple[int, int] = (0, 0), dilate: int = 0,
                     merge: str = "none") -> list[np.ndarray]:
    """offset -> dilate/erode -> drop empty -> merge; empty results are dropped."""
    out = [dilate_erode(offset_mask(m, offset[0], offset[1]), dilate) for m in masks]
    out = [m for m in out if m.any()]
    return [m for m in merge_masks(out, merge) if m.any()]


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """float32 [H, W]: Gaussian-blurred mask (`engine.masks.feather`: sigma feather / 2, radius feather);
    > 0 exactly on the mask dilated by a (2 feather + 1)-square."""
    if feather <= 0:
        return mask.astype(np.float32)
    a = mask_ops.feather(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)), feather).numpy()
    a[a < 1e-6] = 0.0  # float dust is not "inside"
    return a


def crop_box(alpha: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha > 0)
    h, w = alpha.shape
    return (max(0, int(xs.min()) - padding), max(0, int(ys.min()) - padding),
            min(w, int(xs.max()) + 1 + padding), min(h, int(ys.max()) + 1 + padding))


def inpaint_size(crop_w: int, crop_h: int, resolution: int) -> tuple[int, int]:
    """(width, height): longer side = resolution, aspect kept, both multiples of 8."""
    scale = resolution / max(crop_w, crop_h)
    return max(8, int(round(crop_w * scale / 8)) * 8), max(8, int(round(crop_h * scale / 8)) * 8)


def paste(image: np.ndarray, patch: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray) -> np.ndarray:
    """Blend patch [h, w, 3] into image at box with alpha [H, W]; exact original where alpha == 0."""
    x1, y1, x2, y2 = box
    out = image.copy()
    region = image[y1:y2, x1:x2].astype(np.float32)
    a = alpha[y1:y2, x1:x2, None]
    blended = np.clip((region * (1.0 - a) + patch.astype(np.float32) * a).round(), 0, 255).astype(np.uint8)
    out[y1:y2, x1:x2] = np.where(a > 0, blended, image[y1:y2, x1:x2])
    return out


MAX_REGIONS_PER_TARGET = 100  # detections kept per target when top_k is not given (bounds the memory)


def select(dets: list[Detection], top_k: int | None, sort_by: str) -> list[Detection]:
    if sort_by not in ("confidence", "area"):
        raise InvalidInput("sort_by", sort_by, "expected confidence or area")
    key = (lambda d: d.confidence) if sort_by == "confidence" else (lambda d: d.area)
    ordered = sorted(dets, key=key, reverse=True)
    return ordered[:min(top_k or MAX_REGIONS_PER_TARGET, MAX_REGIONS_PER_TARGET)]


def detail_memory(height: int, width: int, n_units: int, *, top_k: int | None = None, merge: str = "none",
                  resolution: int = 512, detect_only: bool = False) -> int:
    """Upper bound of `detail`'s working memory in bytes (the input image not counted).

    Per pixel: the result copy and the output (3 + 3), the preview (64: float32
    tinting, one region at a time), and per region its mask and feathered
    alpha (1 + 4) plus the detector's mask (1); regions are at most
    n_units x min(top_k, MAX_REGIONS_PER_TARGET), or n_units when merged.
    Plus one inpaint at `resolution` (`diffusion.pipeline_memory`) and the
    paste of a crop (64 B/px of the image, an upper bound of the crop).
    """
    px = height * width
    per_unit = 1 if merge != "none" else min(top_k or MAX_REGIONS_PER_TARGET, MAX_REGIONS_PER_TARGET)
    regions = n_units * per_unit
    need = px * (6 + 64 + 6 * regions)
    if not detect_only:
        need += px * 64 + diffusion.pipeline_memory(resolution, resolution, 1)
    return int(need + 16 * 1024 * 1024)


# -- the flow ------------------------------------------------------------------
def detail(engine: Any, model_path: str, image: np.ndarray, units: Sequence[DetailUnit], *,
           threshold: float = 0.3, top_k: int | None = None, sort_by: str = "confidence",
           mask_source: str = "auto", offset: tuple[int, int] = (0, 0), dilate: int = 4, merge: str = "none",
           resolution: int = 512, padding: int = 32, feather: int = 4, seed: int | None = None,
           scheduler: str = "DDIM", detectors: Mapping[str, str] = {},  # noqa: B006
           detect_only: bool = False, token: CancelToken | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> DetailResult:
    """Detect every unit's target, then inpaint each region; see the module docstring."""
    if not units:
        raise InvalidInput("targets", [], "name at least one target")
    if mask_source not in ("auto", "box"):
        raise InvalidInput("mask_source", mask_source, "expected auto or box")
    if resolution < 64 or resolution % 8:
        raise InvalidInput("inpaint_resolution", resolution, "must be a multiple of 8, >= 64")
    if padding < 0 or feather < 0:
        raise InvalidInput("padding" if padding < 0 else "feather", min(padding, feather), "must be >= 0")
    for u in units:
        if not 0.0 < u.strength <= 1.0:
            raise InvalidInput("denoising_strength", u.strength, "must be in (0, 1]")
        if u.steps < 1 or int(u.steps * u.strength) < 1:
            raise InvalidInput("steps", u.steps, f"steps * denoising_strength ({u.strength}) must be >= 1")
    if not detect_only:
        diffusion.load(engine, model_path)  # fail before detection work if no model is configured
    h, w = image.shape[:2]
    seed = diffusion.random_seed() if seed is None else int(seed)
    result = DetailResult(image=image.copy(), detections=[], seed=seed)

    planned: list[tuple[int, np.ndarray]] = []  # (unit index, processed mask)
    for ui, unit in enumerate(units):
        if token is not None:
            token.check()
        dets = select(detect(engine, image, [unit.target], threshold=threshold, detectors=detectors), top_k, sort_by)
        result.detections.extend((ui, d) for d in dets)
        if not dets:
            result.notes.append(f"no {unit.target} detected at threshold {threshold}")
            continue
        masks = preprocess_masks([detection_mask(d, (h, w), mask_source) for d in dets],
                                 offset=offset, dilate=dilate, merge=merge)
        if not masks:
            result.notes.append(f"every {unit.target} mask was empty after offset / dilate-erode")
        planned.extend((ui, m) for m in masks)
    result.masks = planned
    if detect_only or not planned:
        return result

    totals = [int(units[ui].steps * units[ui].strength) for ui, _ in planned]
    grand_total = sum(totals)
    done = 0
    for ri, (ui, mask) in enumerate(planned):
        unit = units[ui]
        alpha = feather_alpha(mask, feather)
        box = crop_box(alpha, padding)
        x1, y1, x2, y2 = box
        size = inpaint_size(x2 - x1, y2 - y1, resolution)
        region_seed = seed + ri
        msg = f"{unit.target} region {ri + 1}/{len(planned)}"

        def on_step(step: int, total: int, _base: int = done, _msg: str = msg) -> None:
            if progress is not None:
                progress(_base + step, grand_total, _msg)

        new = _inpaint_crop(engine, model_path, result.image, alpha, box, size, unit, region_seed,
                            scheduler, token, on_step)
        result.image = paste(result.image, new, box, alpha)
        result.regions.append(Region(ui, unit.target, box, size, region_seed, mask, alpha))
        done += totals[ri]
    return result


def _inpaint_crop(engine: Any, model_path: str, image: np.ndarray, alpha: np.ndarray,
                  box: tuple[int, int, int, int], size: tuple[int, int], unit: DetailUnit, seed: int,
                  scheduler: str, token: CancelToken | None, on_step: Callable[[int, int], None]) -> np.ndarray:
    """The crop of `image` at box, repainted where alpha > 0: uint8 [y2-y1, x2-x1, 3]."""
    from PIL import Image

    x1, y1, x2, y2 = box
    crop = image[y1:y2, x1:x2]
    region = (alpha[y1:y2, x1:x2] > 0).astype(np.uint8) * 255
    tw, th = size
    up = np.asarray(Image.fromarray(crop).resize((tw, th), Image.LANCZOS))
    up_mask = (np.asarray(Image.fromarray(region).resize((tw, th), Image.BILINEAR)) > 0).astype(np.float32)
    out = diffusion.inpaint(engine, model_path, up, up_mask, unit.prompt, negative_prompt=unit.negative_prompt,
                            strength=unit.strength, steps=unit.steps, guidance_scale=unit.guidance_scale,
                            seed=seed, token=token, progress=on_step, scheduler=scheduler)
    return np.asarray(Image.fromarray(out).resize((x2 - x1, y2 - y1), Image.LANCZOS))


PREVIEW_COLORS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220))
PREVIEW_FILL = 0.45  # opacity of the mask tint


def preview_sizes(height: int, width: int) -> tuple[int, float, int]:
    """(box line width px, label font scale, label text thickness) for an image of this size.

    Proportional to the longer side: 2 px and a 0.5 scale (about 11 px letters) up to 640 px, then
    line ~ side / 320 and scale ~ side / 1280, so a label stays ~1.7 % of the image tall.
    """
    side = max(height, width)
    line = max(2, round(side / 320))
    scale = max(0.5, side / 1280)
    return line, scale, max(1, round(scale * 1.6))


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `bg` (WCAG relative luminance)."""
    def lin(c: int) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    lum = 0.2126 * lin(bg[0]) + 0.7152 * lin(bg[1]) + 0.0722 * lin(bg[2])
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


def preview(image: np.ndarray, result: DetailResult) -> np.ndarray:
    """uint8 [H, W, 3]: the input with each mask tinted (45 % of its target's colour), each box outlined
    (line width from `preview_sizes`) and labelled "label 0.87" in contrasting text on a filled box of the
    same colour, above the box when there is room, else inside its top edge.

    The masks are the processed ones (offset, dilate / erode, merge), repainted or not (detect_only); the
    feathered paste weight is used for regions that were repainted.
    """
    import cv2

    h, w = image.shape[:2]
    out = image[..., :3].astype(np.float32)
    painted = {id(r.mask) for r in result.regions}
    tints = [(r.unit, r.alpha) for r in result.regions]
    tints += [(ui, m.astype(np.float32)) for ui, m in result.masks if id(m) not in painted]
    for ui, weight in tints:
        c = np.array(PREVIEW_COLORS[ui % len(PREVIEW_COLORS)], np.float32)
        a = (PREVIEW_FILL * weight)[..., None]
        out = out * (1 - a) + c * a
    out = np.ascontiguousarray(np.clip(out.round(), 0, 255).astype(np.uint8))
    line, scale, text_thick = preview_sizes(h, w)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for ui, d in result.detections:
        c = PREVIEW_COLORS[ui % len(PREVIEW_COLORS)]
        x1, y1, x2, y2 = d.box
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), c, line)
        text = f"{d.label} {d.confidence:.2f}"
        (tw, th), base = cv2.getTextSize(text, font, scale, text_thick)
        pad = max(2, line)
        bw, bh = tw + 2 * pad, th + base + 2 * pad
        bx = min(max(0, x1), max(0, w - bw))
        by = y1 - bh if y1 - bh >= 0 else max(0, min(y1, h - bh))  # above the box, else inside its top
        cv2.rectangle(out, (bx, by), (bx + bw - 1, by + bh - 1), c, -1)
        cv2.putText(out, text, (bx + pad, by + pad + th), font, scale, _text_color(c), text_thick, cv2.LINE_AA)
    return out
