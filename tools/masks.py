"""mask_edit: select pixels (expression, mask image, shapes, detections), refine, edit.

Order of work: every given source becomes a bool mask; the sources are
combined with `combine` (and | or | xor), then `invert`, `dilate`, `erode`,
`remove_small_objects`, `fill_holes` and finally `feather` (a soft edge) are
applied; the operation runs through that mask. The engine (`engine.masks`)
documents the exact semantics of every step; the expression language is
documented in `engine.masks.expression`. `color` (fill) is parsed by
`engine.color` (#rrggbb, #rgb, rgb(r, g, b), a CSS name, lab(L, a, b)) with an
alpha suffix allowed on hex (#rrggbbaa, #rgba).

Results: the edited image ("edited"; RGBA when the input, the colour or the
operation involves transparency, RGB otherwise), the mask preview ("mask",
grey levels = mask weight), with `detect` a detections preview ("detections":
masks tinted, boxes labelled with their confidence, as detail_image draws it)
and stats of the mask before feathering. An empty
selection is not an error: the image comes back unchanged with a note.
Pixels where the final mask is 0 are the input's, byte for byte.

Limits: expressions obey limits.max_expression_chars / max_expression_depth;
inpaint needs models.diffusion and obeys limits.max_diffusion_steps and
limits.max_prompt_chars.

Memory: once the image is decoded (its size bounded by limits.max_image_pixels)
and before any other image-sized allocation, `estimate_memory` bounds the
call's working memory: what stays for the whole call (the image, its device
copy, one bool mask per source, the combined mask, the feathered mask, the
edited image) plus the largest single step (the expression's own bound from
`engine.masks.expression`, a source, a refinement, the operation, the outputs).
Each step's bytes per pixel (`STEP_BYTES_PER_PIXEL`) is 1.5x or more what it
was measured to hold at 1 MP (tests/test_rel_memory_tools.py checks it);
blur, feather and pixelate scale with their padded area; inpaint adds the
diffusion engine's own bound. Over `limits.max_call_memory_mb` (0 = the
engine's memory budget less loaded models) the call is refused:
"expression=...: would need N GB; limit M GB (...)".
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import adetailer, diffusion, masks, workmem
from engine import color as colors
from engine import detect as detect_engine
from engine.errors import InvalidInput, ModelUnavailable
from engine.masks import expression_memory, parse

from .base import ImageOut, ToolContext, ToolError, ToolOutput, ToolSpec

_HEX_ALPHA = re.compile(r"#(?:[0-9a-fA-F]{4}|[0-9a-fA-F]{8})")

# the description's example: hue / saturation / value ranges select a red object on a real photo, shading
# and noise included; RGB thresholds like (r > 200) & (g < 50) & (b < 50) select almost nothing there
HSV_RED_EXAMPLE = "(h < 15 or h > 345) and s > 0.4 and v > 0.2"

Operation = Literal["fill", "replace", "blur", "pixelate", "grayscale", "adjust", "hue_shift", "transparent",
                    "inpaint", "none"]


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["rect", "ellipse", "polygon"] = Field(description="ellipse: inscribed in box.")
    box: list[float] | None = Field(None, description="rect / ellipse: [x1, y1, x2, y2], x2 y2 exclusive.")
    points: list[list[float]] | None = Field(None, description="polygon: [[x, y], ...], >= 3 points.")
    units: Literal["px", "relative"] = Field("px", description="relative: fractions 0..1 of width / height.")


class DetectSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(description="face, person, hand, or a configured detector's class.")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Minimum confidence.")
    use_masks: bool = Field(True, description="Segmentation masks when the detector has them, else boxes.")


class MaskEditInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="A path in the read roots, an image:// URI, or base64 PNG/JPEG.")
    operation: Operation = Field(description=(
        "fill (color), replace (replace_with), blur (blur_radius), pixelate (pixel_size), grayscale, adjust "
        "(brightness, contrast), hue_shift (degrees), transparent, inpaint (prompt; needs models.diffusion), "
        "none (mask only)."))
    expression: str | None = Field(None, description=(
        "A condition over channels r g b a (0-255), h (hue 0-360), s v (0-1), l lab_a lab_b (CIELAB), gray, "
        "x y width height, delta_e(#rrggbb) (CIEDE2000 to a colour); + - * /, abs min max, comparisons, "
        "and or xor not (& | ^ ~), parentheses. E.g. 'delta_e(#1e90ff) < 12'."))
    mask_image: str | None = Field(None, description="Same-size image; non-zero pixels are selected.")
    shapes: list[Shape] | None = Field(None, description="Their union is selected.")
    detect: DetectSource | None = Field(None, description="Detected objects (faces, persons, ...).")
    combine: Literal["and", "or", "xor"] = Field("and", description="How several sources combine.")
    invert: bool = Field(False, description="Applied right after combining.")
    dilate: int = Field(0, ge=0, le=512, description="Grow by this many px.")
    erode: int = Field(0, ge=0, le=512, description="Shrink by this many px.")
    remove_small_objects: int = Field(0, ge=0, description="Drop blobs of fewer pixels.")
    fill_holes: int = Field(0, ge=0, description="Fill holes of fewer pixels.")
    feather: float = Field(0.0, ge=0.0, le=512.0, description="Soft edge width in px.")
    color: str | None = Field(None, description="fill: #rrggbb, #rrggbbaa, rgb(r, g, b), a CSS name or lab(L, a, b).")
    replace_with: str | None = Field(None, description="replace: a same-size image.")
    blur_radius: float = Field(8.0, gt=0.0, le=256.0, description="blur: Gaussian sigma in px.")
    pixel_size: int = Field(16, ge=1, le=1024, description="pixelate: cell size in px.")
    brightness: float = Field(1.0, ge=0.0, le=10.0, description="adjust: factor, 1 = unchanged.")
    contrast: float = Field(1.0, ge=0.0, le=10.0, description="adjust: factor around mid-grey, 1 = unchanged.")
    degrees: float = Field(0.0, ge=-360.0, le=360.0, description="hue_shift: rotation in degrees.")
    prompt: str | None = Field(None, description="inpaint: what to paint.")
    negative_prompt: str = Field("", description="inpaint: what not to paint.")
    strength: float = Field(0.75, gt=0.0, le=1.0, description="inpaint: how much to change.")
    steps: int = Field(20, ge=1, description="inpaint: denoising steps.")
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0, description="inpaint: guidance scale.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="inpaint: seed (omitted = random).")
    inline_full: bool = Field(False, description="Full-resolution PNG inline instead of a thumbnail.")


class MaskEditOutput(BaseModel):
    width: int
    height: int
    operation: str
    selected_pixels: int = Field(description="Before feathering.")
    fraction: float = Field(description="selected_pixels / (width * height).")
    bbox: list[int] | None = Field(description="[x1, y1, x2, y2] of the selection (x2, y2 exclusive).")
    components: int = Field(description="8-connected selected regions.")
    feathered: bool
    mode: Literal["RGB", "RGBA"] = Field(description="Channels of the edited image.")
    note: str = ""


# bytes per pixel a step holds at its peak, beside what the call keeps (>= 1.5x the measured figure at 1 MP)
STEP_BYTES_PER_PIXEL: dict[str, float] = {
    "mask_image": 12, "shapes": 16, "detect": 16, "dilate": 48, "erode": 48, "remove_small_objects": 24,
    "fill_holes": 24, "feather": 80, "stats": 12, "fill": 56, "replace": 72, "blur": 180, "pixelate": 96,
    "grayscale": 64, "adjust": 64, "hue_shift": 112, "transparent": 56, "inpaint": 64, "none": 0,
    "outputs": 32, "detections_preview": 72,
}
_FIXED_BYTES = 16 * 1024 * 1024


def estimate_memory(args: MaskEditInput, height: int, width: int, *, channels: int = 4, device: Any = "cpu",
                    tree: Any = None) -> tuple[int, str]:
    """(upper bound of the call's working memory in bytes, the step that dominates it); see the docstring."""
    px = height * width
    dev = str(getattr(device, "type", device))
    sources = sum(x is not None for x in (args.expression, args.mask_image, args.shapes, args.detect))
    kept = px * (channels + (channels if dev != "cpu" else 0) + max(sources, 1) + 1 + 4 * (args.feather > 0) + 4)
    steps: dict[str, float] = {}
    if tree is not None:
        steps["expression"] = expression_memory(tree, height, width, channels=channels, device=device)
    for name in ("mask_image", "shapes", "detect"):
        if getattr(args, name) is not None:
            steps[name] = STEP_BYTES_PER_PIXEL[name] * px
    for name in ("dilate", "erode", "remove_small_objects", "fill_holes"):
        if getattr(args, name):
            steps[name] = STEP_BYTES_PER_PIXEL[name] * px
    if args.feather > 0:
        r = int(args.feather)
        steps["feather"] = STEP_BYTES_PER_PIXEL["feather"] * min(px, (height + 6 * r) * (width + 6 * r))
    steps["stats"] = STEP_BYTES_PER_PIXEL["stats"] * px
    op = args.operation
    area = px
    if op == "blur":
        r = int(3.0 * args.blur_radius + 0.5)
        area = (height + 2 * r) * (width + 2 * r)
    elif op == "pixelate":
        area = (height + args.pixel_size) * (width + args.pixel_size)
    steps[op] = STEP_BYTES_PER_PIXEL[op] * area
    if op == "inpaint":
        steps[op] += _inpaint_memory(args, height, width)
    steps["outputs"] = STEP_BYTES_PER_PIXEL["outputs"] * px
    if args.detect is not None:
        steps["detections_preview"] = STEP_BYTES_PER_PIXEL["detections_preview"] * px
    worst = max(steps, key=lambda k: steps[k])
    return int(kept + steps[worst] + _FIXED_BYTES), worst


def _inpaint_memory(args: MaskEditInput, height: int, width: int) -> int:
    return int(diffusion.pipeline_memory(height, width, 1))


def _check_memory(args: MaskEditInput, ctx: ToolContext, height: int, width: int, channels: int, device: Any,
                  tree: Any) -> int:
    limit = workmem.call_limit(ctx.engine, getattr(ctx.settings.limits, "max_call_memory_mb", 0))
    need, worst = estimate_memory(args, height, width, channels=channels, device=device, tree=tree)
    argument, value = ("expression", args.expression) if worst == "expression" else ("image", f"{width}x{height}")
    workmem.require(argument, value, need, limit,
                    f"mask_edit {args.operation} on a {width}x{height} image; the largest step is {worst}; "
                    "use a smaller image or fewer steps, or raise limits.max_call_memory_mb")
    return need


def _fill_color(text: str) -> tuple[int, ...]:
    """(r, g, b), or (r, g, b, a) when translucent: `engine.color`'s syntax, plus a hex alpha (#rrggbbaa, #rgba)."""
    s = text.strip()
    if _HEX_ALPHA.fullmatch(s):
        n = 2 if len(s) == 9 else 1
        alpha = int(s[-n:] * (3 - n), 16)
        rgb, _ = colors.parse_color_srgb(s[:-n], argument="color")
        return rgb if alpha == 255 else (*rgb, alpha)
    return colors.parse_color_srgb(text, argument="color")[0]


def _detections(ctx: ToolContext, rgb: Any, spec: DetectSource) -> list[Any]:
    detectors = dict(getattr(ctx.settings.models, "detectors", {}) or {})
    try:
        return detect_engine.detect(ctx.engine, rgb, spec.targets, threshold=spec.threshold, detectors=detectors)
    except (InvalidInput, ModelUnavailable) as exc:
        raise ToolError(f"detect: {exc}") from exc


def _build_mask(args: MaskEditInput, ctx: ToolContext, arr: Any, image: Any, tree: Any,
                found: list[Any] | None = None) -> Any:
    h, w = arr.shape[:2]
    device = image.device
    sources = []
    if tree is not None:
        sources.append(masks.evaluate_tree(tree, image, args.expression))
        ctx.check()
    if args.mask_image is not None:
        arr = ctx.load_image(args.mask_image, "mask_image", mode="keep")
        sources.append(masks.image_mask(arr, h, w, device=device))
    if args.shapes is not None:
        if not args.shapes:
            raise ToolError.invalid("shapes", [], "give at least one shape, or leave shapes out")
        shapes = [s.model_dump(exclude_none=True) for s in args.shapes]
        sources.append(masks.shape_mask(shapes, h, w, device=device))
    if args.detect is not None:
        dets = _detections(ctx, arr[..., :3].copy(), args.detect)
        if found is not None:
            found.extend(dets)
        sources.append(masks.detection_mask(dets, h, w, use_masks=args.detect.use_masks, device=device))
        ctx.check()
    if not sources:
        raise ToolError.invalid("expression", None, "give at least one mask source: expression, mask_image, shapes "
                                "or detect")
    mask = masks.combine(sources, args.combine)
    if args.invert:
        mask = masks.invert(mask)
    if args.dilate:
        mask = masks.dilate(mask, args.dilate)
    if args.erode:
        mask = masks.erode(mask, args.erode)
    if args.remove_small_objects:
        mask = masks.remove_small_objects(mask, args.remove_small_objects)
    if args.fill_holes:
        mask = masks.fill_small_holes(mask, args.fill_holes)
    ctx.check()
    return mask


def _detections_preview(arr: Any, dets: list[Any], spec: DetectSource) -> Any:
    """uint8 [H, W, 3]: the input with each detection's mask tinted, its box outlined and labelled (the
    detail_image preview, `engine.adetailer.preview`); one colour per target; each mask is the one the
    selection used (`masks.detection_mask`)."""
    rgb = arr[..., :3]
    h, w = rgb.shape[:2]
    order = {t: i for i, t in enumerate(spec.targets)}
    tagged = [(order.get(d.label, len(order)), d) for d in dets]
    shown = [(ui, masks.detection_mask([d], h, w, use_masks=spec.use_masks).numpy()) for ui, d in tagged]
    return adetailer.preview(rgb, adetailer.DetailResult(image=rgb, detections=tagged, masks=shown))


def _inpaint(args: MaskEditInput, ctx: ToolContext, arr: Any, image: Any, soft: Any) -> Any:
    if not args.prompt:
        raise ToolError.invalid("prompt", args.prompt, "operation=inpaint needs a prompt")
    if len(args.prompt) > ctx.settings.limits.max_prompt_chars or \
            len(args.negative_prompt) > ctx.settings.limits.max_prompt_chars:
        raise ToolError.invalid("prompt", args.prompt, f"longer than limits.max_prompt_chars="
                                                        f"{ctx.settings.limits.max_prompt_chars}")
    if args.steps > ctx.settings.limits.max_diffusion_steps:
        raise ToolError.invalid("steps", args.steps, f"more than limits.max_diffusion_steps="
                                                      f"{ctx.settings.limits.max_diffusion_steps}")
    model_path = str(ctx.settings.models.diffusion or "")
    if not model_path:
        raise ToolError("operation=inpaint needs a diffusion model: set models.diffusion to a local diffusers "
                        "inpainting pipeline folder in atelier.toml")
    rgb = arr[..., :3].copy()
    weight = masks.mask_weights(soft)
    try:
        painted = diffusion.inpaint(ctx.engine, model_path, rgb, weight, args.prompt,
                                    negative_prompt=args.negative_prompt, strength=args.strength, steps=args.steps,
                                    guidance_scale=args.guidance_scale, seed=args.seed, token=ctx.cancel_token(),
                                    progress=lambda done, total: ctx.report(done, total, "inpainting"))
    except ModelUnavailable as exc:  # its text as it is (the server would prefix "model unavailable: ")
        raise ToolError(str(exc)) from exc
    other = masks.as_image_tensor(painted, image.device)
    # diffusion.inpaint already blends; composite again so alpha and unmasked pixels stay exact
    return masks.apply_replace(image, soft, other)


def _apply(args: MaskEditInput, ctx: ToolContext, arr: Any, image: Any, soft: Any,
           fill: tuple[int, ...] | None) -> Any:
    op = args.operation
    if op == "fill":
        assert fill is not None  # run() parsed args.color before decoding the image
        return masks.apply_fill(image, soft, fill)
    if op == "replace":
        if args.replace_with is None:
            raise ToolError.invalid("replace_with", None, "operation=replace needs replace_with (an image)")
        other = masks.as_image_tensor(ctx.load_image(args.replace_with, "replace_with", mode="RGBA"), image.device)
        return masks.apply_replace(image, soft, other)
    if op == "blur":
        return masks.apply_blur(image, soft, args.blur_radius)
    if op == "pixelate":
        return masks.apply_pixelate(image, soft, args.pixel_size)
    if op == "grayscale":
        return masks.apply_grayscale(image, soft)
    if op == "adjust":
        return masks.apply_adjust(image, soft, args.brightness, args.contrast)
    if op == "hue_shift":
        return masks.apply_hue_shift(image, soft, args.degrees)
    if op == "transparent":
        return masks.apply_transparent(image, soft)
    if op == "inpaint":
        return _inpaint(args, ctx, arr, image, soft)
    return image  # "none"


def run(args: MaskEditInput, ctx: ToolContext) -> ToolOutput:
    fill = None
    if args.operation == "fill":
        if args.color is None:
            raise ToolError.invalid("color", None, "operation=fill needs a color")
        fill = _fill_color(args.color)
    tree = None
    if args.expression is not None:  # parse before decoding: a malformed expression costs nothing
        lim = ctx.settings.limits
        tree = parse(args.expression, max_chars=lim.max_expression_chars, max_depth=lim.max_expression_depth)
    arr = ctx.load_image(args.image, "image", mode="RGBA")  # uint8 [H, W, 4]
    h, w = arr.shape[:2]
    need = _check_memory(args, ctx, h, w, arr.shape[2], ctx.engine.device, tree)
    try:
        return _run(args, ctx, arr, tree, fill)
    finally:
        workmem.release(need)


def _run(args: MaskEditInput, ctx: ToolContext, arr: Any, tree: Any, fill: tuple[int, ...] | None) -> ToolOutput:
    h, w = arr.shape[:2]
    image = masks.as_image_tensor(arr, ctx.engine.device)
    ctx.check()
    dets: list[Any] = []
    hard = _build_mask(args, ctx, arr, image, tree, dets)
    stats = masks.mask_stats(hard)
    soft = masks.feather(hard, args.feather) if args.feather > 0 else hard
    note = ""
    if stats["selected_pixels"] == 0:
        note = "the mask selects no pixels; the image is returned unchanged"
        edited = image
    else:
        ctx.check()
        edited = _apply(args, ctx, arr, image, soft, fill)
    out = masks.to_numpy(edited)
    opaque = bool((out[..., 3] == 255).all())
    keep_alpha = args.operation == "transparent" or not opaque
    if not keep_alpha:
        out = out[..., :3].copy()
    mode = "RGBA" if keep_alpha else "RGB"
    structured = MaskEditOutput(width=w, height=h, operation=args.operation, selected_pixels=stats["selected_pixels"],
                                fraction=stats["fraction"], bbox=stats["bbox"], components=stats["components"],
                                feathered=args.feather > 0, mode=mode, note=note)
    text = (f"mask_edit {args.operation}: {stats['selected_pixels']} of {w * h} pixels selected "
            f"({100.0 * stats['fraction']:.2f}%, {stats['components']} region(s))"
            + (f", bbox {stats['bbox']}" if stats["bbox"] else "") + (f". Note: {note}" if note else "") + ".")
    images = [ImageOut(out, "edited", {"operation": args.operation}), ImageOut(masks.mask_preview(soft), "mask")]
    if args.detect is not None:
        images.append(ImageOut(_detections_preview(arr, dets, args.detect), "detections"))
    return ToolOutput(text=text, structured=structured, images=images)


TOOLS = [
    ToolSpec(
        name="mask_edit",
        title="Edit the pixels selected by a mask",
        description=(
            "Select pixels (expression, mask image, shapes or detections), refine the selection, apply an "
            "operation. Example, make the red pixels blue: expression '" + HSV_RED_EXAMPLE + "', operation "
            "'fill', color '#0000ff' (hue/saturation/value ranges hold on photos; exact RGB thresholds rarely "
            "do). Returns the edited image, a mask preview and the selection's stats."),
        input_model=MaskEditInput,
        output_model=MaskEditOutput,
        run=run,
        execution="device",
        # models (diffusion, detectors) are used only by inpaint and detections: those go through the
        # device worker; pure tensor edits run beside it and do not queue behind a long diffusion job
        execution_for=lambda a: "device" if (a.operation == "inpaint" or a.detect is not None) else "thread",
        long_running=True,  # only inpaint takes long; the rest finishes well inside the deadline
        read_only=True,
        priority=0,
    ),
]
