"""engine.diffusion on tiny random pipelines loaded through the config path (a diffusers folder).

Oracles: diffusers' own pipeline called directly on the same folder, NumPy
comparisons, and parameter byte counts summed independently of the registry.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from engine import diffusion as D
from engine.errors import Cancelled, InvalidInput, ModelUnavailable
from engine.scheduler import CancelToken
from tests.tiny_pipeline import cached_tiny_sd


@pytest.fixture(scope="module")
def sd() -> str:
    return str(cached_tiny_sd())


@pytest.fixture(scope="module")
def sd_inpaint() -> str:
    return str(cached_tiny_sd(inpainting=True))


def _gen(engine, sd, prompt: str = "a red face", **kw):
    args = dict(width=64, height=48, steps=3, seed=11)
    args.update(kw)
    return D.generate(engine, sd, prompt, **args)


def test_same_seed_is_bit_identical_and_seed_matters(engine, sd):
    a = _gen(engine, sd)
    b = _gen(engine, sd)
    c = _gen(engine, sd, seed=12)
    assert a[0].shape == (48, 64, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_matches_diffusers_pipeline_called_directly(engine, sd):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ours = D.generate(engine, sd, "a cat", negative_prompt="blurry", width=64, height=64, steps=4,
                      guidance_scale=5.0, seed=7, scheduler="DDIM")[0]
    pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a cat", negative_prompt="blurry", width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
               generator=[torch.Generator().manual_seed(7)], output_type="np").images[0]
    ref_u8 = (ref * 255).round().astype(np.uint8)
    assert np.array_equal(ours, ref_u8)


def test_batch_image_i_uses_seed_plus_i(engine, sd):
    batch = _gen(engine, sd, num_images=2, seed=20)
    single = _gen(engine, sd, num_images=1, seed=21)
    assert len(batch) == 2
    # a batch of 2 runs different kernels than a batch of 1: equal up to float noise, not bitwise
    assert np.abs(batch[1].astype(int) - single[0].astype(int)).max() <= 2
    assert not np.array_equal(batch[0], batch[1])


@pytest.mark.parametrize("name", D.SCHEDULERS)
def test_every_scheduler_runs_deterministically(engine, sd, name):
    a = _gen(engine, sd, scheduler=name, seed=3)
    b = _gen(engine, sd, scheduler=name, seed=3)
    assert np.array_equal(a[0], b[0])
    pipe = D.load(engine, sd).text2img
    expected = {"DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler",
                "Euler-a": "EulerAncestralDiscreteScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler"}[name]
    assert type(pipe.scheduler).__name__ == expected


def test_scheduler_names_and_bad_arguments(engine, sd):
    assert D.normalize_scheduler("euler_a") == "Euler-a"
    assert D.normalize_scheduler("dpm++ 2m") == "DPM++ 2M"
    with pytest.raises(InvalidInput, match="scheduler"):
        _gen(engine, sd, scheduler="LMS-karras")
    with pytest.raises(InvalidInput, match="width=60"):
        _gen(engine, sd, width=60)
    with pytest.raises(InvalidInput, match="steps"):
        _gen(engine, sd, steps=0)


def test_progress_every_step_and_cancel_within_one_step(engine, sd):
    model = D.load(engine, sd)
    unet_calls = []
    hook = model.text2img.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    token = CancelToken()
    seen: list[tuple[int, int]] = []
    latents_ref: list[weakref.ref] = []

    def progress(step: int, total: int) -> None:
        seen.append((step, total))
        if step == 2:
            token.cancel("test")

    # capture the live latents each step through a wrapped callback, to check they are freed
    orig = D._step_callback

    def spy(tok, prog):
        inner = orig(tok, prog)

        def cb(pipe, i, t, kw):
            latents_ref.append(weakref.ref(kw["latents"]))
            return inner(pipe, i, t, kw)
        return cb

    D._step_callback = spy
    try:
        with pytest.raises(Cancelled):
            D.generate(engine, sd, "x", width=64, height=64, steps=10, seed=1, token=token, progress=progress)
    finally:
        D._step_callback = orig
        hook.remove()
    assert seen == [(1, 10), (2, 10)]
    assert len(unet_calls) == 2  # the step during which cancel arrived finished; no third step ran
    gc.collect()
    assert latents_ref and all(r() is None for r in latents_ref)


def test_cancel_before_start_runs_no_step(engine, sd):
    model = D.load(engine, sd)
    calls = []
    hook = model.text2img.unet.register_forward_hook(lambda *a: calls.append(1))
    token = CancelToken()
    token.cancel()
    try:
        with pytest.raises(Cancelled):
            _gen(engine, sd, token=token)
    finally:
        hook.remove()
    assert calls == []


def test_text2img_and_inpaint_share_one_set_of_weights(engine, sd):
    model = D.load(engine, sd)
    assert model.inpaint is not None and model.text2img is not None
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(model.inpaint, name) is getattr(model.text2img, name)
    entry = next(e for e in engine.registry.loaded() if e.key == D.model_key(sd))
    params = {id(p): p for n in ("unet", "vae", "text_encoder")
              for p in list(getattr(model.text2img, n).parameters()) + list(getattr(model.text2img, n).buffers())}
    assert entry.nbytes == sum(p.numel() * p.element_size() for p in params.values())
    assert model.text2img.unet.dtype == torch.float32  # CPU runs in float32
    procs = model.text2img.unet.attn_processors.values()
    assert procs and all(type(p).__name__ == "AttnProcessor2_0" for p in procs)


@pytest.mark.parametrize("kind", ["regular", "inpainting"])
def test_inpaint_changes_only_the_mask(engine, sd, sd_inpaint, kind):
    path = sd if kind == "regular" else sd_inpaint
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (52, 70, 3), dtype=np.uint8)  # sides not multiples of 8
    mask = np.zeros((52, 70), np.float32)
    mask[10:30, 20:50] = 1.0
    steps_seen = []
    out = D.inpaint(engine, path, image, mask, "a face", strength=0.5, steps=6, seed=2,
                    progress=lambda s, t: steps_seen.append((s, t)))
    again = D.inpaint(engine, path, image, mask, "a face", strength=0.5, steps=6, seed=2)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[mask == 0], image[mask == 0])
    assert (out[mask == 1] != image[mask == 1]).any()
    assert np.array_equal(out, again)
    assert steps_seen == [(i, 3) for i in range(1, 4)]  # int(6 * 0.5) denoising steps


def test_inpaint_soft_mask_blends(engine, sd):
    image = np.full((32, 32, 3), 100, np.uint8)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1.0
    mask[8:24, 4:8] = 0.5
    out = D.inpaint(engine, sd, image, mask, "x", strength=1.0, steps=2, seed=0)
    full = D.inpaint(engine, sd, image, np.where(mask > 0, 1.0, 0.0).astype(np.float32), "x", strength=1.0,
                     steps=2, seed=0)
    half = mask == 0.5
    expected = np.round(image[half].astype(np.float32) * 0.5 + full[half].astype(np.float32) * 0.5)
    # same generator, same binarised mask inside the pipeline: the half band is the 50/50 blend
    assert np.abs(out[half].astype(np.float32) - expected).max() <= 1


def test_inpaint_errors(engine, sd):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(InvalidInput, match="mask"):
        D.inpaint(engine, sd, image, np.zeros((32, 32), np.float32), "x")
    with pytest.raises(InvalidInput, match="mask"):
        D.inpaint(engine, sd, image, np.ones((16, 32), np.float32), "x")
    with pytest.raises(InvalidInput, match="steps"):
        D.inpaint(engine, sd, image, np.ones((32, 32), np.float32), "x", steps=3, strength=0.2)
    with pytest.raises(ModelUnavailable, match="models.diffusion"):
        D.inpaint(engine, "", image, np.ones((32, 32), np.float32), "x")
    with pytest.raises(ModelUnavailable, match="model_index.json"):
        D.generate(engine, str(cached_tiny_sd().parent), "x")


def test_inpainting_only_checkpoint_refuses_text_to_image(engine, sd_inpaint):
    with pytest.raises(ModelUnavailable, match="inpainting-only"):
        D.generate(engine, sd_inpaint, "x", width=32, height=32, steps=1)
    st = D.status(engine, sd_inpaint)
    assert st["loaded"] and st["text_to_image"] is False and st["inpainting"] is True
    assert D.status(engine, "")["configured"] is False
