"""Diffusion: text-to-image and inpainting with a local diffusers pipeline folder.

Contract
- The model is a local diffusers pipeline folder (one with `model_index.json`:
  SD 1.x/2.x, SDXL, SD-Turbo ...) named by the configuration (`models.diffusion`),
  never by a tool argument. It is loaded lazily into `engine.registry` under
  the key `diffusion:<resolved path>` (family "diffusion") and counts against
  the memory budget once: text-to-image and inpainting are two diffusers
  pipelines built over the SAME component objects
  (`AutoPipelineForText2Image.from_pipe` / `AutoPipelineForInpainting.from_pipe`),
  so no weight exists twice.
- A regular (4-channel UNet) checkpoint does both: diffusers' inpaint pipeline
  runs its legacy path (after every step the noised image latents are put back
  outside the mask). A dedicated inpainting checkpoint (9-channel UNet) only
  inpaints; `generate` then raises `ModelUnavailable` saying so.
- Precision: float32 on CPU (whatever the engine dtype says: CPU half is slow
  and partly unsupported), the engine dtype elsewhere (float16 on CUDA/MPS).
  Attention runs through torch SDPA (`AttnProcessor2_0`).
- Schedulers: "DDIM" (default), "Euler", "Euler-a", "DPM++ 2M"; a fresh one is
  built from the model's own scheduler config on every call.
- Randomness: one CPU `torch.Generator` per image, seeded `seed + i`, so the
  same seed and parameters give bit-identical images on the same device, and
  the initial noise is the same on every device.
- Progress and cancellation: `callback_on_step_end` reports `(step, total)`
  after every denoising step and calls `token.check()`, so a cancel stops the
  work within one step; intermediate tensors are released before `Cancelled`
  reaches the caller.

Pipelines are stateful (the scheduler is swapped per call): call these
functions from the engine's device worker (tools with execution="device"
are), never from two threads at once.

Images cross this boundary as NumPy: uint8 [H, W, 3] in, uint8 [H, W, 3] out;
masks float32 [H, W] in 0..1.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import Cancelled, InsufficientMemory, InvalidInput, ModelUnavailable
from ._compat import model_libraries
from .registry import free_memory, is_oom
from .scheduler import CancelToken

log = logging.getLogger("atelier.engine.diffusion")

SCHEDULERS: tuple[str, ...] = ("DDIM", "Euler", "Euler-a", "DPM++ 2M")
_SCHEDULER_ALIASES = {
    "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler-a", "euler_a": "Euler-a", "euler a": "Euler-a",
    "euler ancestral": "Euler-a", "dpm++ 2m": "DPM++ 2M", "dpm++2m": "DPM++ 2M", "dpmpp_2m": "DPM++ 2M",
    "dpmpp-2m": "DPM++ 2M",
}

NOT_CONFIGURED = ("no diffusion model is configured: set `models.diffusion` in atelier.toml (or the environment "
                  "variable ATELIER_MODELS__DIFFUSION) to a local diffusers pipeline folder, the one holding "
                  "model_index.json (for example a Stable Diffusion 1.5 folder saved with save_pretrained)")

ProgressFn = Callable[[int, int], None]


def normalize_scheduler(name: str) -> str:
    """The canonical scheduler name for `name` (case-insensitive, common aliases), or InvalidInput."""
    canon = _SCHEDULER_ALIASES.get(str(name).strip().lower())
    if canon is None:
        raise InvalidInput("scheduler", name, f"expected one of {', '.join(SCHEDULERS)}")
    return canon


def _make_scheduler(name: str, config: Any) -> Any:
    model_libraries()
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    name = normalize_scheduler(name)
    if name == "DDIM":
        return DDIMScheduler.from_config(config)
    if name == "Euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "Euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class DiffusionModel:
    """One loaded pipeline folder: two pipelines over one set of components."""

    path: str
    pipeline_class: str  # the folder's own class, e.g. "StableDiffusionPipeline"
    text2img: Any | None  # None for inpainting-only (9-channel UNet) checkpoints
    inpaint: Any | None  # None where diffusers has no inpainting pipeline for this family
    scheduler_config: Any
    unet_in_channels: int | None

    @property
    def components(self) -> dict[str, Any]:
        """The shared components (the registry measures the model's bytes from these)."""
        pipe = self.text2img if self.text2img is not None else self.inpaint
        return dict(pipe.components)


def model_key(model_path: str) -> str:
    return f"diffusion:{Path(model_path).expanduser().resolve()}"


def _working_dtype(engine: Any) -> torch.dtype:
    return torch.float32 if engine.device.type == "cpu" else engine.dtype


def _use_sdpa(pipe: Any) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is None or not hasattr(module, "attn_processors"):
            continue
        procs = module.attn_processors
        if procs and all(type(p).__name__ == "AttnProcessor" for p in procs.values()):
            module.set_attn_processor(AttnProcessor2_0())


def _load_pipelines(path: Path, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    model_libraries()
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image, DiffusionPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        base = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    finally:
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    base = base.to(device)
    unet = getattr(base, "unet", None)
    in_channels = int(unet.config.in_channels) if unet is not None else None
    is_inpaint_ckpt = in_channels == 9 or "Inpaint" in type(base).__name__
    text2img = inpaint = None
    if is_inpaint_ckpt:
        inpaint = base
    else:
        try:
            text2img = AutoPipelineForText2Image.from_pipe(base)
        except Exception as exc:  # a folder diffusers cannot run as text-to-image
            raise ModelUnavailable(f"models.diffusion={str(path)!r}: {type(base).__name__} is not a "
                                   f"text-to-image pipeline diffusers can run ({exc})") from exc
        try:
            inpaint = AutoPipelineForInpainting.from_pipe(text2img)
        except Exception:
            log.info("no inpainting pipeline for this model family", extra={"model": str(path)})
    for pipe in (text2img, inpaint):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
            _use_sdpa(pipe)
    return DiffusionModel(path=str(path), pipeline_class=type(base).__name__, text2img=text2img, inpaint=inpaint,
                          scheduler_config=base.scheduler.config, unet_in_channels=in_channels)


def folder_problem(model_path: str) -> str | None:
    """Why `model_path` cannot be loaded, before any loading, or None when it looks like a pipeline folder.

    Three distinct answers: not configured (empty), the folder does not exist
    (or is not a folder), the folder exists but holds no model_index.json.
    """
    if not model_path:
        return NOT_CONFIGURED
    path = Path(model_path).expanduser()
    if not path.exists():
        return (f"models.diffusion={model_path!r}: the folder does not exist; point models.diffusion at a local "
                "diffusers pipeline folder (the one holding model_index.json) or leave it empty")
    if not path.is_dir():
        return (f"models.diffusion={model_path!r}: not a folder; point models.diffusion at a local diffusers "
                "pipeline folder (the one holding model_index.json)")
    if not (path / "model_index.json").is_file():
        return (f"models.diffusion={model_path!r}: the folder exists but is not a diffusers pipeline (no "
                "model_index.json in it); use the folder a pipeline was saved to with save_pretrained")
    return None


def load(engine: Any, model_path: str) -> DiffusionModel:
    """The pipelines of `model_path` from the registry (loaded on first use)."""
    problem = folder_problem(model_path)
    if problem is not None:
        raise ModelUnavailable(problem)
    path = Path(model_path).expanduser().resolve()
    key = model_key(model_path)
    device, dtype = engine.device, _working_dtype(engine)
    engine.registry.register(key, lambda: _load_pipelines(path, device, dtype), family="diffusion",
                             source=str(path))
    return engine.registry.get(key)


def status(engine: Any, model_path: str) -> dict[str, Any]:
    """What `engine_status` can say about the diffusion model without loading it."""
    if not model_path:
        return {"configured": False, "message": NOT_CONFIGURED}
    key = model_key(model_path)
    loaded = next((e for e in engine.registry.loaded() if e.key == key), None)
    problem = folder_problem(model_path)
    out: dict[str, Any] = {"configured": True, "path": str(Path(model_path).expanduser()),
                           "exists": Path(model_path).expanduser().is_dir(), "valid_folder": problem is None,
                           "loaded": loaded is not None}
    if problem is not None:
        out["message"] = problem
    if loaded is not None:
        m: DiffusionModel = loaded.obj
        out.update(pipeline_class=m.pipeline_class, text_to_image=m.text2img is not None,
                   inpainting=m.inpaint is not None, bytes=loaded.nbytes)
    return out


# -- running ---------------------------------------------------------------
def _step_callback(token: CancelToken | None, progress: ProgressFn | None) -> Callable[..., dict]:
    def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if progress is not None:
            progress(step + 1, int(pipe.num_timesteps))
        if token is not None:
            token.check()
        return callback_kwargs

    return on_step_end


def _run_pipe(pipe: Any, token: CancelToken | None, kwargs: dict[str, Any]) -> np.ndarray:
    """Call the pipeline; returns float32 [N, H, W, 3] in 0..1. Frees memory on cancel / OOM."""
    if token is not None:
        token.check()
    reason: str | None = None
    oom: str | None = None
    try:
        with torch.inference_mode():
            images = pipe(**kwargs, output_type="np", return_dict=True).images
    except Cancelled as exc:
        reason = str(exc) or "cancelled"
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # outside the except blocks: the pipeline's frames (and their latents) are gone now
    if reason is not None:
        free_memory()
        raise Cancelled(reason)
    if oom is not None:
        free_memory()
        raise InsufficientMemory(f"out of memory while running the diffusion pipeline ({oom}); memory was freed")
    return np.asarray(images, dtype=np.float32)


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    # [N, H, W, 3] float 0..1 -> list of [H, W, 3] uint8, the rounding of diffusers' numpy_to_pil
    return [np.ascontiguousarray((np.clip(im, 0.0, 1.0) * 255).round().astype(np.uint8)) for im in images]


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(seed) + i) for i in range(n)]


def random_seed() -> int:
    return secrets.randbelow(2**32)


def pipeline_memory(height: int, width: int, batch: int = 1, *, dtype_bytes: int = 4) -> int:
    """A rough, documented upper bound of a Stable Diffusion pipeline's activations (weights not counted).

    UNet: classifier-free guidance doubles the batch; at most 24 feature maps of
    320 channels at the latent resolution (H/8 x W/8) are alive at once (the
    skip connections of the top level plus the block in flight). Attention goes
    through torch SDPA, whose CPU flash and CUDA memory-efficient kernels do not
    materialise the token x token score matrix. VAE decode: 4 maps of 128
    channels at full resolution per image. Input/output images: 32 bytes per
    pixel per image (uint8 arrays, PIL copies, float tensors).
    """
    lat = (height // 8) * (width // 8)
    unet = 2 * batch * lat * 320 * 24 * dtype_bytes
    vae = batch * height * width * 128 * 4 * dtype_bytes
    return int(unet + vae + 32 * batch * height * width)


def _check_side(argument: str, value: int) -> None:
    if not isinstance(value, int) or value < 8 or value % 8:
        raise InvalidInput(argument, value, "must be a positive multiple of 8")


def generate(engine: Any, model_path: str, prompt: str, *, negative_prompt: str = "", width: int = 512,
             height: int = 512, steps: int = 20, guidance_scale: float = 7.0, seed: int | None = None,
             scheduler: str = "DDIM", num_images: int = 1, token: CancelToken | None = None,
             progress: ProgressFn | None = None) -> list[np.ndarray]:
    """Text-to-image. Returns `num_images` uint8 [height, width, 3] arrays (image i used seed + i)."""
    _check_side("width", width)
    _check_side("height", height)
    if steps < 1:
        raise InvalidInput("steps", steps, "must be >= 1")
    if num_images < 1:
        raise InvalidInput("num_images", num_images, "must be >= 1")
    if guidance_scale < 0:
        raise InvalidInput("guidance_scale", guidance_scale, "must be >= 0")
    scheduler = normalize_scheduler(scheduler)
    model = load(engine, model_path)
    if model.text2img is None:
        raise ModelUnavailable(f"models.diffusion={model_path!r} is an inpainting-only checkpoint "
                               f"({model.pipeline_class}, {model.unet_in_channels}-channel UNet); text-to-image "
                               "needs a regular checkpoint folder")
    pipe = model.text2img
    pipe.scheduler = _make_scheduler(scheduler, model.scheduler_config)
    seed = random_seed() if seed is None else int(seed)
    images = _run_pipe(pipe, token, dict(
        prompt=prompt, negative_prompt=negative_prompt or None, width=width, height=height,
        num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=num_images,
        generator=_generators(seed, num_images), callback_on_step_end=_step_callback(token, progress)))
    return _to_uint8(images)


def _resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    from PIL import Image

    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    return np.asarray(Image.fromarray(arr).resize((w, h), resample))


def inpaint(engine: Any, model_path: str, image: np.ndarray, mask: np.ndarray, prompt: str, *,
            negative_prompt: str = "", strength: float = 0.75, steps: int = 20, guidance_scale: float = 7.0,
            seed: int | None = None, token: CancelToken | None = None, progress: ProgressFn | None = None,
            scheduler: str = "DDIM") -> np.ndarray:
    """Repaint the masked part of `image`; returns uint8 [H, W, 3].

    image: uint8 [H, W, 3]; mask: float32 [H, W] in 0..1 (1 = repaint). Sides
    that are not multiples of 8 are resized to the nearest multiple for the
    pipeline and back. The result is `image * (1 - mask) + generated * mask`,
    so every pixel where mask == 0 comes back bit-identical. Denoising runs
    `int(steps * strength)` steps (at least 1 is required).
    """
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput("image", getattr(image, "shape", type(image).__name__), "expected uint8 [H, W, 3]")
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        raise InvalidInput("mask", getattr(mask, "shape", type(mask).__name__),
                           f"expected a [H, W] array matching the image {image.shape[:2]}")
    m = np.clip(mask.astype(np.float32), 0.0, 1.0)
    if not (m > 0).any():
        raise InvalidInput("mask", "all zero", "the mask is empty: nothing to inpaint")
    if not 0.0 < strength <= 1.0:
        raise InvalidInput("strength", strength, "must be in (0, 1]")
    if steps < 1 or int(steps * strength) < 1:
        raise InvalidInput("steps", steps, f"steps * strength ({strength}) must give at least one denoising step")
    if guidance_scale < 0:
        raise InvalidInput("guidance_scale", guidance_scale, "must be >= 0")
    scheduler = normalize_scheduler(scheduler)
    model = load(engine, model_path)
    if model.inpaint is None:
        raise ModelUnavailable(f"models.diffusion={model_path!r} ({model.pipeline_class}) has no inpainting "
                               "pipeline in diffusers")
    h, w = image.shape[:2]
    h8, w8 = max(8, int(round(h / 8)) * 8), max(8, int(round(w / 8)) * 8)
    work_img = _resize(image, (w8, h8), Image.LANCZOS)
    mask_u8 = (m * 255).round().astype(np.uint8)
    work_mask = _resize(mask_u8, (w8, h8), Image.BILINEAR)
    pipe = model.inpaint
    pipe.scheduler = _make_scheduler(scheduler, model.scheduler_config)
    seed = random_seed() if seed is None else int(seed)
    out = _run_pipe(pipe, token, dict(
        prompt=prompt, negative_prompt=negative_prompt or None, image=Image.fromarray(work_img),
        mask_image=Image.fromarray(work_mask), height=h8, width=w8, strength=strength,
        num_inference_steps=steps, guidance_scale=guidance_scale, generator=_generators(seed, 1),
        callback_on_step_end=_step_callback(token, progress)))
    generated = _resize(_to_uint8(out)[0], (w, h), Image.LANCZOS)
    # blend: [H, W, 1] weights; exact original wherever mask == 0
    a = m[..., None]
    blended = (image.astype(np.float32) * (1.0 - a) + generated.astype(np.float32) * a).round()
    return np.where(a > 0, np.clip(blended, 0, 255).astype(np.uint8), image)
