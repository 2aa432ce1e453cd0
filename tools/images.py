"""generate_image and detail_image: text-to-image and ADetailer on the configured diffusers pipeline.

Both tools need `models.diffusion` (a local diffusers pipeline folder); without
it they answer a ToolError saying how to configure one. `detail_image` with
`detect_only=true` needs no diffusion model: it returns the detections and the
mask preview and leaves the image as it was.

Limits from the configuration: image sides and the inpaint resolution
<= limits.max_image_side, steps <= limits.max_diffusion_steps, images per
call <= limits.max_images_per_call, prompts <= limits.max_prompt_chars.
Progress is reported after every denoising step; a cancel stops the work
within one step. Each generated image carries its generation parameters as
JSON in the PNG text chunk "parameters" (and in the structured output).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import adetailer, diffusion, workmem
from engine.errors import ModelUnavailable

from .base import ImageOut, ToolContext, ToolError, ToolOutput, ToolSpec

_SEED_MAX = 2**32 - 1


@contextmanager
def _model_errors() -> Iterator[None]:
    """A missing model reads as the engine wrote it (the server would prefix "model unavailable: ")."""
    try:
        yield
    except ModelUnavailable as exc:
        raise ToolError(str(exc)) from exc


def _check_prompt(ctx: ToolContext, argument: str, text: str | None) -> None:
    cap = ctx.settings.limits.max_prompt_chars
    if text is not None and len(text) > cap:
        raise ToolError.invalid(argument, text, f"longer than limits.max_prompt_chars={cap}")


def _check_memory(ctx: ToolContext, argument: str, value: object, need: int, what: str) -> int:
    """Refuse before the work when its upper-bound memory estimate is over the per-call limit."""
    limit = workmem.call_limit(ctx.engine, getattr(ctx.settings.limits, "max_call_memory_mb", 0))
    workmem.require(argument, value, need, limit, what + "; raise limits.max_call_memory_mb to allow it")
    return need


def _check_steps(ctx: ToolContext, argument: str, steps: int) -> None:
    cap = ctx.settings.limits.max_diffusion_steps
    if steps > cap:
        raise ToolError.invalid(argument, steps, f"more than limits.max_diffusion_steps={cap}")


def _model_path(ctx: ToolContext) -> str:
    return str(ctx.settings.models.diffusion or "")


def _model_name(path: str) -> str:
    return Path(path).expanduser().name if path else ""


# -- generate_image -------------------------------------------------------------
class GenerateImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the image should show.")
    negative_prompt: str = Field("", description="What it should not show.")
    width: int = Field(512, ge=8, description="A multiple of 8, <= limits.max_image_side (default 2048).")
    height: int = Field(512, ge=8, description="A multiple of 8, <= limits.max_image_side.")
    steps: int = Field(20, ge=1, description="<= limits.max_diffusion_steps (default 100).")
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0, description="<= 1 disables guidance (SD-Turbo: 0, with "
                                  "1-4 steps).")
    seed: int | None = Field(None, ge=0, le=_SEED_MAX, description="Omitted = random, reported back; image i "
                             "uses seed + i.")
    scheduler: str = Field("DDIM", description="Sampler.", json_schema_extra={"enum": list(diffusion.SCHEDULERS)})
    num_images: int = Field(1, ge=1, description="<= limits.max_images_per_call (default 4).")
    inline_full: bool = Field(False, description="Full-resolution PNG inline instead of a thumbnail.")


class GenerationParameters(BaseModel):
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int = Field(description="seed of the first image; image i used seed + i")
    scheduler: str
    num_images: int
    model: str = Field(description="name of the configured diffusers folder")


class GeneratedImage(BaseModel):
    index: int
    seed: int
    width: int
    height: int


class GenerateImageOutput(BaseModel):
    images: list[GeneratedImage]
    parameters: GenerationParameters


def _run_generate(args: GenerateImageInput, ctx: ToolContext) -> ToolOutput:
    limits = ctx.settings.limits
    for name in ("width", "height"):
        v = getattr(args, name)
        if v % 8:
            raise ToolError.invalid(name, v, "must be a multiple of 8")
        if v > limits.max_image_side:
            raise ToolError.invalid(name, v, f"more than limits.max_image_side={limits.max_image_side}")
    _check_steps(ctx, "steps", args.steps)
    if args.num_images > limits.max_images_per_call:
        raise ToolError.invalid("num_images", args.num_images,
                                f"more than limits.max_images_per_call={limits.max_images_per_call}")
    _check_prompt(ctx, "prompt", args.prompt)
    _check_prompt(ctx, "negative_prompt", args.negative_prompt)
    scheduler = diffusion.normalize_scheduler(args.scheduler)
    model_path = _model_path(ctx)
    problem = diffusion.folder_problem(model_path)
    if problem is not None:
        raise ToolError(problem)
    _check_memory(ctx, "width", f"{args.width}x{args.height} x {args.num_images}",
                  diffusion.pipeline_memory(args.height, args.width, args.num_images),
                  f"{args.num_images} image(s) of {args.width}x{args.height}: latents, UNet and VAE activations "
                  f"(engine.diffusion.pipeline_memory)")
    seed = diffusion.random_seed() if args.seed is None else args.seed
    params = GenerationParameters(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                                  height=args.height, steps=args.steps, guidance_scale=args.guidance_scale,
                                  seed=seed, scheduler=scheduler, num_images=args.num_images,
                                  model=_model_name(model_path))
    ctx.report(0, args.steps, "loading model")

    def progress(step: int, total: int) -> None:
        ctx.report(step, total, f"step {step}/{total}")

    with _model_errors():
        arrays = diffusion.generate(ctx.engine, model_path, args.prompt, negative_prompt=args.negative_prompt,
                                    width=args.width, height=args.height, steps=args.steps,
                                    guidance_scale=args.guidance_scale, seed=seed, scheduler=scheduler,
                                    num_images=args.num_images, token=ctx.cancel_token(), progress=progress)
    images, infos = [], []
    for i, arr in enumerate(arrays):
        meta = params.model_dump() | {"seed": seed + i, "batch_index": i}
        images.append(ImageOut(array=arr, name="image", metadata={"parameters": json.dumps(meta)}))
        infos.append(GeneratedImage(index=i, seed=seed + i, width=arr.shape[1], height=arr.shape[0]))
    text = (f"generated {len(arrays)} image(s) {args.width}x{args.height}, {args.steps} steps, {scheduler}, "
            f"seed {seed}" + (f" (image i used seed {seed}+i)" if len(arrays) > 1 else ""))
    return ToolOutput(text=text, structured=GenerateImageOutput(images=infos, parameters=params), images=images)


# -- detail_image -----------------------------------------------------------------
class DetailTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="face, hand, person, or a configured detector's class.")
    prompt: str | None = None
    negative_prompt: str | None = None
    denoising_strength: float | None = Field(None, gt=0.0, le=1.0)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)


class DetailImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="A path in the read roots, an image:// link, or base64 PNG/JPEG.")
    targets: list[str | DetailTarget] = Field(
        default_factory=lambda: ["face"], min_length=1, max_length=8,
        description="In order: face, hand (needs models.detectors.hand), person or a configured detector's "
                    "class, or objects with per-target prompt, negative_prompt, denoising_strength, steps, "
                    "guidance_scale (omitted = the top-level ones).")
    prompt: str = Field("", description="For the repainted regions, e.g. 'detailed face'.")
    negative_prompt: str = Field("", description="What the regions should not show.")
    denoising_strength: float = Field(0.4, gt=0.0, le=1.0, description="0 keeps a region, 1 repaints from noise.")
    steps: int = Field(20, ge=1, description="About steps * denoising_strength run.")
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0, description="<= 1 disables guidance.")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Minimum detection confidence.")
    top_k: int | None = Field(None, ge=1, le=100, description="Keep the N best detections per target.")
    sort_by: Literal["confidence", "area"] = Field("confidence", description="'best' for top_k.")
    mask_source: Literal["auto", "box"] = Field("auto", description="auto: segmentation masks when available.")
    offset_x: int = Field(0, ge=-4096, le=4096, description="Shift masks right by px.")
    offset_y: int = Field(0, ge=-4096, le=4096, description="Shift masks UP by px (ADetailer's convention).")
    dilate_erode: int = Field(4, ge=-256, le=256, description="Grow (> 0) or shrink (< 0) masks by px.")
    merge: Literal["none", "merge", "merge_invert"] = Field("none", description="merge: one region for all; "
                                                             "merge_invert: all but the detections.")
    inpaint_resolution: int = Field(512, ge=64, description="Repaint size, longer side, multiple of 8 (512 for "
                                    "SD 1.x, 768-1024 for SD 2 / SDXL).")
    padding: int = Field(32, ge=0, le=1024, description="Context px around each mask.")
    feather: int = Field(4, ge=0, le=256, description="Blend width in px at the mask edge.")
    seed: int | None = Field(None, ge=0, le=_SEED_MAX, description="Region i uses seed + i; omitted = random.")
    scheduler: str = Field("DDIM", description="Sampler.", json_schema_extra={"enum": list(diffusion.SCHEDULERS)})
    detect_only: bool = Field(False, description="Only detect and preview (no diffusion model needed).")
    inline_full: bool = Field(False, description="Full-resolution PNG inline instead of a thumbnail.")


class DetectionInfo(BaseModel):
    target: str
    label: str
    confidence: float
    box: list[int] = Field(description="x1, y1, x2, y2 in pixels (x2/y2 exclusive)")
    source: str


class RegionInfo(BaseModel):
    target: str
    crop: list[int] = Field(description="x1, y1, x2, y2 of the repainted crop")
    inpaint_size: list[int] = Field(description="width, height the crop was repainted at")
    seed: int


class DetailImageOutput(BaseModel):
    detections: list[DetectionInfo]
    regions: list[RegionInfo]
    changed: bool
    seed: int
    notes: list[str]
    model: str


def _units(args: DetailImageInput, ctx: ToolContext) -> list[adetailer.DetailUnit]:
    units = []
    for i, t in enumerate(args.targets):
        spec = DetailTarget(target=t) if isinstance(t, str) else t
        unit = adetailer.DetailUnit(
            target=spec.target,
            prompt=args.prompt if spec.prompt is None else spec.prompt,
            negative_prompt=args.negative_prompt if spec.negative_prompt is None else spec.negative_prompt,
            strength=args.denoising_strength if spec.denoising_strength is None else spec.denoising_strength,
            steps=args.steps if spec.steps is None else spec.steps,
            guidance_scale=args.guidance_scale if spec.guidance_scale is None else spec.guidance_scale)
        _check_steps(ctx, f"targets[{i}].steps" if spec.steps is not None else "steps", unit.steps)
        _check_prompt(ctx, f"targets[{i}].prompt", unit.prompt)
        _check_prompt(ctx, f"targets[{i}].negative_prompt", unit.negative_prompt)
        if int(unit.steps * unit.strength) < 1:
            raise ToolError.invalid("steps", unit.steps, f"steps * denoising_strength ({unit.strength}) "
                                    "must give at least one denoising step")
        units.append(unit)
    return units


def _run_detail(args: DetailImageInput, ctx: ToolContext) -> ToolOutput:
    limits = ctx.settings.limits
    if args.inpaint_resolution % 8 or args.inpaint_resolution > limits.max_image_side:
        raise ToolError.invalid("inpaint_resolution", args.inpaint_resolution,
                                f"must be a multiple of 8, at most limits.max_image_side={limits.max_image_side}")
    scheduler = diffusion.normalize_scheduler(args.scheduler)
    units = _units(args, ctx)
    model_path = _model_path(ctx)
    problem = None if args.detect_only else diffusion.folder_problem(model_path)
    if problem is not None:
        raise ToolError(problem + "; or call detail_image with detect_only=true to see the detections without "
                        "repainting")
    image = ctx.load_image(args.image, "image", mode="RGB")
    h, w = image.shape[:2]
    need = _check_memory(ctx, "image", f"{w}x{h}",
                         adetailer.detail_memory(h, w, len(units), top_k=args.top_k, merge=args.merge,
                                                 resolution=args.inpaint_resolution, detect_only=args.detect_only),
                         f"detail_image on a {w}x{h} image with {len(units)} target(s), up to "
                         f"{args.top_k or adetailer.MAX_REGIONS_PER_TARGET} region(s) each unless merged "
                         "(set top_k or merge to lower it)")
    try:
        return _detail(args, ctx, units, model_path, scheduler, image)
    finally:
        workmem.release(need)


def _detail(args: DetailImageInput, ctx: ToolContext, units: list[adetailer.DetailUnit], model_path: str,
            scheduler: str, image: Any) -> ToolOutput:
    ctx.check()
    ctx.report(0, None, "detecting")

    def progress(done: int, total: int, msg: str) -> None:
        ctx.report(done, total, msg)

    with _model_errors():
        res = adetailer.detail(
            ctx.engine, model_path, image, units, threshold=args.threshold, top_k=args.top_k,
            sort_by=args.sort_by, mask_source=args.mask_source, offset=(args.offset_x, args.offset_y),
            dilate=args.dilate_erode, merge=args.merge, resolution=args.inpaint_resolution,
            padding=args.padding, feather=args.feather, seed=args.seed, scheduler=scheduler,
            detectors=dict(ctx.settings.models.detectors), detect_only=args.detect_only,
            token=ctx.cancel_token(), progress=progress)
    dets = [DetectionInfo(target=units[ui].target, label=d.label, confidence=round(d.confidence, 4),
                          box=list(d.box), source=d.source) for ui, d in res.detections]
    regions = [RegionInfo(target=r.target, crop=list(r.crop), inpaint_size=list(r.size), seed=r.seed)
               for r in res.regions]
    notes = list(res.notes)
    if args.detect_only:
        notes.append("detect_only: the image was not repainted")
    elif not res.regions:
        notes.append("nothing to repaint: the input image is returned unchanged")
    out = DetailImageOutput(detections=dets, regions=regions, changed=bool(res.regions), seed=res.seed,
                            notes=notes, model=_model_name(model_path))
    meta = {"parameters": json.dumps(args.model_dump(exclude={"image"}) | {"seed": res.seed,
                                                                          "model": out.model})}
    images = [ImageOut(array=res.image, name="detailed", metadata=meta),
              ImageOut(array=adetailer.preview(image, res), name="detections")]
    summary = ", ".join(f"{d.label} {d.confidence:.2f} at {tuple(d.box)}" for d in dets[:6])
    text = (f"{len(dets)} detection(s)" + (f": {summary}" if summary else "")
            + (f"; repainted {len(regions)} region(s), seed {res.seed}" if regions else "")
            + (f". {' '.join(notes)}" if notes else ""))
    return ToolOutput(text=text, structured=out, images=images)


TOOLS = [
    ToolSpec(
        name="generate_image",
        title="Generate image",
        description="Text-to-image with the configured local diffusers pipeline (models.diffusion). Returns the "
                    "image(s) and their generation parameters; the same seed and parameters give the same image.",
        input_model=GenerateImageInput,
        output_model=GenerateImageOutput,
        run=_run_generate,
        execution="device",
        long_running=True,
    ),
    ToolSpec(
        name="detail_image",
        title="Detail image (ADetailer)",
        description="Fix faces, hands or persons (ADetailer): detect, mask, repaint each region at high "
                    "resolution and blend it back; pixels away from the masks stay unchanged. Returns the "
                    "result, a preview of detections and masks, and the detections. detect_only=true just "
                    "detects.",
        input_model=DetailImageInput,
        output_model=DetailImageOutput,
        run=_run_detail,
        execution="device",
        long_running=True,
    ),
]
