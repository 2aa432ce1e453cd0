"""tools.images (generate_image, detail_image) through a FakeContext, with a tiny pipeline in the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage

from engine.errors import Cancelled
from tests.fakectx import make_context
from tests.tiny_pipeline import cached_tiny_sd
from tests.helpers import REFUSED
from tools.base import ToolError
from tools.images import TOOLS, DetailImageInput, GenerateImageInput


GEN, DETAIL = TOOLS


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = make_context(tmp_path_factory.mktemp("ctx"), models={"diffusion": str(cached_tiny_sd())},
                     limits={"max_diffusion_steps": 12, "max_image_side": 256, "max_images_per_call": 2})
    yield c
    c.engine.close()


@pytest.fixture(scope="module")
def bare_ctx(tmp_path_factory):
    c = make_context(tmp_path_factory.mktemp("bare"))
    yield c
    c.engine.close()


@pytest.fixture(scope="module")
def astronaut_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(p)
    return str(p)


def gen(ctx, **kw):
    ctx.progress.clear()
    return GEN.run(GenerateImageInput(**{"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, **kw}), ctx)


def test_specs():
    assert [t.name for t in TOOLS] == ["generate_image", "detail_image"]
    for spec in TOOLS:
        assert spec.execution == "device" and spec.long_running
        schema = spec.input_model.model_json_schema()
        assert all("description" in p for p in schema["properties"].values())
    assert GenerateImageInput.model_json_schema()["properties"]["scheduler"]["enum"] == [
        "DDIM", "Euler", "Euler-a", "DPM++ 2M"]
    with pytest.raises(ValidationError):
        GenerateImageInput(prompt="x", model_path="/somewhere")  # weights never come from an argument


def test_generate_image_reports_seed_parameters_and_progress(ctx):
    out = gen(ctx, negative_prompt="fog", scheduler="Euler-a")
    assert [(p, t) for p, t, _ in ctx.progress if p > 0] == [(1, 3), (2, 3), (3, 3)]
    (img,) = out.images
    assert img.name == "image" and img.array.shape == (64, 64, 3) and img.array.dtype == np.uint8
    meta = json.loads(img.metadata["parameters"])
    params = out.structured.parameters
    assert meta["seed"] == params.seed == out.structured.images[0].seed
    assert meta | {"batch_index": 0} == meta and meta["scheduler"] == "Euler-a" and meta["negative_prompt"] == "fog"
    assert meta["width"] == 64 and meta["steps"] == 3 and meta["model"] == cached_tiny_sd().name
    # the reported random seed reproduces the image exactly
    again = gen(ctx, negative_prompt="fog", scheduler="Euler-a", seed=params.seed)
    assert np.array_equal(again.images[0].array, img.array)
    assert str(params.seed) in out.text


def test_generate_image_batch(ctx):
    out = gen(ctx, num_images=2, seed=100)
    assert [i.seed for i in out.structured.images] == [100, 101]
    assert [json.loads(i.metadata["parameters"])["seed"] for i in out.images] == [100, 101]


@pytest.mark.parametrize(("kw", "match"), [
    ({"width": 60}, "width=60.*multiple of 8"),
    ({"height": 512}, "height=512.*max_image_side=256"),
    ({"steps": 13}, "steps=13.*max_diffusion_steps=12"),
    ({"num_images": 3}, "num_images=3.*max_images_per_call=2"),
    ({"scheduler": "PLMS"}, "scheduler='PLMS'.*DDIM"),
])
def test_generate_image_bad_input(ctx, kw, match):
    with pytest.raises(REFUSED, match=match):
        gen(ctx, **kw)


def test_generate_image_cancel_within_one_step(ctx):
    ctx.token = type(ctx.token)()
    seen = []
    orig = ctx.report

    def report(p, t=None, m=None):
        orig(p, t, m)
        if p >= 2:
            seen.append(p)
            ctx.token.cancel("client cancelled")

    ctx.report = report
    try:
        with pytest.raises(Cancelled):
            gen(ctx, steps=10)
    finally:
        ctx.report = orig
        ctx.token = type(ctx.token)()
    assert seen == [2]


def test_no_model_configured_is_a_clear_error(bare_ctx, astronaut_file):
    with pytest.raises(ToolError, match="models.diffusion"):
        gen(bare_ctx)
    with pytest.raises(ToolError, match="models.diffusion.*detect_only"):
        DETAIL.run(DetailImageInput(image=astronaut_file), bare_ctx)
    out = DETAIL.run(DetailImageInput(image=astronaut_file, detect_only=True), bare_ctx)
    assert len(out.structured.detections) == 1 and not out.structured.changed
    assert np.array_equal(out.images[0].array, skimage.data.astronaut())


def test_detail_image_fixes_the_face_only(ctx, astronaut_file):
    ctx.progress.clear()
    args = DetailImageInput(image=astronaut_file, prompt="a detailed face", steps=6, denoising_strength=0.5,
                            inpaint_resolution=128, seed=4, dilate_erode=3, feather=5)
    out = DETAIL.run(args, ctx)
    assert [i.name for i in out.images] == ["detailed", "detections"]
    (det,) = out.structured.detections
    assert det.label == "face" and det.target == "face" and 0.3 <= det.confidence <= 1
    assert out.structured.changed and out.structured.seed == 4 and len(out.structured.regions) == 1
    src = skimage.data.astronaut()
    x1, y1, x2, y2 = det.box
    region = np.zeros(src.shape[:2], bool)
    region[y1:y2, x1:x2] = True
    region = ndimage.binary_dilation(region, structure=np.ones((7, 7)))  # dilate_erode=3
    region = ndimage.binary_dilation(region, structure=np.ones((11, 11)))  # feather=5
    final = out.images[0].array
    assert np.array_equal(final[~region], src[~region])
    assert (final[y1:y2, x1:x2] != src[y1:y2, x1:x2]).any()
    preview = out.images[1].array
    assert preview.shape == src.shape and not np.array_equal(preview, src)
    assert [(p, t) for p, t, _ in ctx.progress if t][-1] == (3, 3)
    assert json.loads(out.images[0].metadata["parameters"])["seed"] == 4


def test_detail_image_per_target_settings(ctx, astronaut_file):
    ctx.progress.clear()
    args = DetailImageInput(image=astronaut_file, targets=[{"target": "face", "steps": 4, "denoising_strength": 1.0},
                                                           "person"],
                            steps=2, denoising_strength=0.5, inpaint_resolution=64, top_k=1, sort_by="area")
    out = DETAIL.run(args, ctx)
    assert [d.target for d in out.structured.detections] == ["face", "person"]
    assert [t for _, t, _ in ctx.progress if t][-1] == 4 + 1


def test_detail_image_no_detection_returns_input(ctx, tmp_path):
    p = tmp_path / "flat.png"
    flat = np.full((64, 96, 3), 77, np.uint8)
    Image.fromarray(flat).save(p)
    out = DETAIL.run(DetailImageInput(image=str(p), inpaint_resolution=64, steps=4), ctx)
    assert out.structured.detections == [] and not out.structured.changed
    assert np.array_equal(out.images[0].array, flat)
    assert any("unchanged" in n for n in out.structured.notes)


@pytest.mark.parametrize(("kw", "match"), [
    ({"targets": ["hand"]}, "hand.*models.detectors.hand"),
    ({"targets": ["unicorn"]}, "unicorn.*unknown target"),
    ({"steps": 20}, "steps=20.*max_diffusion_steps=12"),
    ({"targets": [{"target": "face", "steps": 50}]}, r"targets\[0\].steps=50"),
    ({"inpaint_resolution": 500}, "inpaint_resolution=500"),
    ({"inpaint_resolution": 512}, "max_image_side=256"),
    ({"scheduler": "heun"}, "scheduler"),
    ({"steps": 2, "denoising_strength": 0.2}, "at least one denoising step"),
])
def test_detail_image_bad_input(ctx, astronaut_file, kw, match):
    base = {"image": astronaut_file, "steps": 4, "inpaint_resolution": 64}
    with pytest.raises(REFUSED, match=match):
        DETAIL.run(DetailImageInput(**(base | kw)), ctx)
