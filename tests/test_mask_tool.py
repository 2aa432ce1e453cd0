"""tools.masks (mask_edit) through a FakeContext: the two user stories, sources, errors, detections, inpaint."""

from __future__ import annotations

import numpy as np
import pytest

from engine.detect import Detection
from engine.errors import InvalidInput
from tests.fakectx import make_context, png_b64
from tests.helpers import REFUSED
from tools.masks import TOOLS, MaskEditInput


H, W = 48, 64
RNG = np.random.default_rng(11)
IMG = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
IMG[10:20, 10:30] = [240, 10, 20]  # a red patch
REF = png_b64(IMG)
SPEC = TOOLS[0]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return make_context(tmp_path_factory.mktemp("mask"))


def call(ctx, **kwargs):
    return SPEC.run(MaskEditInput(image=REF, **kwargs), ctx)


def test_spec() -> None:
    assert SPEC.name == "mask_edit" and SPEC.execution == "device"
    schema = MaskEditInput.model_json_schema()
    assert all("description" in p for p in schema["properties"].values())


def test_make_red_pixels_blue(ctx) -> None:
    out = call(ctx, expression="(r > 200) & (g < 50) & (b < 50)", operation="fill", color="#0000ff")
    edited = out.images[0].array
    want = IMG.copy()
    r, g, b = IMG[..., 0], IMG[..., 1], IMG[..., 2]
    sel = (r > 200) & (g < 50) & (b < 50)
    want[sel] = [0, 0, 255]
    assert edited.shape == (H, W, 3) and out.structured.mode == "RGB"
    np.testing.assert_array_equal(edited, want)
    np.testing.assert_array_equal(out.images[1].array, np.where(sel, 255, 0))
    assert out.structured.selected_pixels == int(sel.sum())
    assert out.structured.bbox is not None and out.structured.components >= 1
    assert [i.name for i in out.images] == ["edited", "mask"]


def test_outside_centre_rectangle_transparent(ctx) -> None:
    out = call(ctx, shapes=[{"type": "rect", "box": [0.25, 0.25, 0.75, 0.75], "units": "relative"}], invert=True,
               operation="transparent")
    edited = out.images[0].array
    assert edited.shape == (H, W, 4) and out.structured.mode == "RGBA"
    inside = np.zeros((H, W), bool)
    inside[12:36, 16:48] = True
    np.testing.assert_array_equal(edited[..., 3], np.where(inside, 255, 0))
    np.testing.assert_array_equal(edited[..., :3], IMG)
    assert out.structured.selected_pixels == H * W - inside.sum()
    assert out.structured.components == 1


def test_combined_sources_mask_image_and_feather(ctx, tmp_path) -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[:, :32] = 200
    path = tmp_path / "m.png"
    from PIL import Image

    Image.fromarray(mask).save(path)
    out = call(ctx, expression="r > 128", mask_image=str(path), combine="and", operation="grayscale")
    sel = (IMG[..., 0] > 128) & (mask > 0)
    lum = np.asarray(Image.fromarray(IMG).convert("L"))
    want = IMG.copy()
    want[sel] = lum[sel][:, None]
    np.testing.assert_array_equal(out.images[0].array, want)
    out = call(ctx, shapes=[{"type": "ellipse", "box": [20, 10, 40, 30]}], feather=4, operation="fill",
               color="white")
    weight = out.images[1].array
    assert out.structured.feathered and 0 < weight[weight > 0].min() < 255
    outside = weight == 0
    np.testing.assert_array_equal(out.images[0].array[outside], IMG[outside])


def test_empty_selection_is_not_an_error(ctx) -> None:
    out = call(ctx, expression="r > 255", operation="blur")
    np.testing.assert_array_equal(out.images[0].array, IMG)
    assert out.structured.selected_pixels == 0 and out.structured.bbox is None
    assert "no pixels" in out.structured.note and "unchanged" in out.text


@pytest.mark.parametrize("kwargs,words", [
    (dict(expression="(r > 200) & (foo < 3)", operation="blur"), "unknown channel 'foo'"),
    (dict(expression="(r > 200", operation="blur"), "at column 9"),
    (dict(operation="blur"), "at least one mask source"),
    (dict(expression="r > 1", operation="fill"), "needs a color"),
    (dict(expression="r > 1", operation="fill", color="not-a-colour"), "color='not-a-colour': unknown colour name"),
    (dict(expression="r > 1", operation="replace"), "replace_with"),
    (dict(expression="r > 1", operation="inpaint", prompt="a cat"), "models.diffusion"),
    (dict(expression="r > 1", operation="inpaint"), "needs a prompt"),
])
def test_bad_input_gives_tool_errors(ctx, kwargs, words) -> None:
    with pytest.raises(REFUSED, match=words.replace("(", r"\(").replace(")", r"\)")):
        call(ctx, **kwargs)


def test_mask_size_mismatch_and_limits(ctx, tmp_path) -> None:
    with pytest.raises(InvalidInput, match="mask_image.*size"):
        call(ctx, mask_image=png_b64(np.zeros((H + 1, W), np.uint8)), operation="none")
    with pytest.raises(InvalidInput, match="replace_with.*size"):
        call(ctx, expression="r > 1", operation="replace", replace_with=png_b64(np.zeros((H, W + 2, 3), np.uint8)))
    small = make_context(tmp_path, limits={"max_expression_chars": 8, "max_expression_depth": 2})
    with pytest.raises(InvalidInput, match="limit of 8 characters"):
        call(small, expression="r > 1 & g > 2", operation="none")
    with pytest.raises(InvalidInput, match="limit of 2"):
        call(small, expression="r+1 > 1", operation="none")


def test_detections_as_a_source(ctx, monkeypatch) -> None:
    import engine.detect

    seen = {}

    def fake_detect(engine, image, targets, *, threshold=0.3, max_detections=None, detectors={}):  # noqa: B006
        seen.update(shape=image.shape, targets=list(targets), threshold=threshold)
        return [Detection("face", 0.9, (5, 6, 20, 30), None, "test")]

    monkeypatch.setattr(engine.detect, "detect", fake_detect)
    out = call(ctx, detect={"targets": ["face"], "threshold": 0.5}, operation="pixelate", pixel_size=4)
    assert seen == {"shape": (H, W, 3), "targets": ["face"], "threshold": 0.5}
    box = np.zeros((H, W), bool)
    box[6:30, 5:20] = True
    assert out.structured.selected_pixels == box.sum()
    np.testing.assert_array_equal(out.images[0].array[~box], IMG[~box])
    assert (out.images[0].array[box] != IMG[box]).any()


def test_inpaint_calls_diffusion_and_keeps_outside(ctx, monkeypatch) -> None:
    import engine.diffusion

    seen = {}

    def fake_inpaint(engine, model_path, image, mask, prompt, **kw):
        seen.update(model=model_path, prompt=prompt, mask=mask.copy(), steps=kw["steps"])
        return np.full_like(image, 7)

    monkeypatch.setattr(engine.diffusion, "inpaint", fake_inpaint)
    ctx.settings.models.diffusion = "/models/sd-inpaint"
    try:
        out = call(ctx, expression="(r > 200) & (g < 50) & (b < 50)", operation="inpaint", prompt="a cat", steps=3)
    finally:
        ctx.settings.models.diffusion = ""
    sel = (IMG[..., 0] > 200) & (IMG[..., 1] < 50) & (IMG[..., 2] < 50)
    assert seen["model"] == "/models/sd-inpaint" and seen["prompt"] == "a cat" and seen["steps"] == 3
    np.testing.assert_array_equal(seen["mask"], sel.astype(np.float32))
    want = IMG.copy()
    want[sel] = 7
    np.testing.assert_array_equal(out.images[0].array, want)
