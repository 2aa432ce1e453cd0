"""color_compare through tools.color with a FakeContext; oracles: scikit-image, NumPy, scipy."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import deltaE_cie76, deltaE_ciede94, deltaE_ciede2000, rgb2lab

from engine.errors import InvalidInput
from tests.fakectx import make_context, png_b64
from tests.helpers import REFUSED
from tools.base import ToolError

from tools.color import TOOLS, ColorCompareInput, band

SPEC = TOOLS[0]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = make_context(tmp_path_factory.mktemp("color"))
    yield c
    c.engine.close()


def run(ctx, **kw):
    return SPEC.run(ColorCompareInput(**kw), ctx)


def _lab(rgb) -> np.ndarray:
    return rgb2lab(np.array(rgb, dtype=np.float64) / 255.0)


def test_spec() -> None:
    assert SPEC.name == "color_compare" and SPEC.execution == "thread" and SPEC.priority == 0
    schema = ColorCompareInput.model_json_schema()
    assert all(p.get("description") for p in schema["properties"].values())


def test_two_colours_ciede2000(ctx) -> None:
    r = run(ctx, color_a="#FF0000", color_b="#FE0000")
    s = r.structured
    expected = deltaE_ciede2000(_lab((255, 0, 0)), _lab((254, 0, 0)))
    assert s.mode == "colors" and s.metric == "ciede2000"
    assert s.delta_e == pytest.approx(expected, abs=1e-6)
    assert s.band.startswith("imperceptible")
    assert s.color_a.hex == "#FF0000" and s.color_b.hex == "#FE0000"
    np.testing.assert_allclose(s.color_a.lab, _lab((255, 0, 0)), atol=1e-4)
    assert "ΔE2000" in r.text and not r.images


def test_two_colours_other_metrics_and_formats(ctx) -> None:
    la, lb = _lab((255, 99, 71)), _lab((10, 20, 30))
    s = run(ctx, color_a="tomato", color_b="rgb(10, 20, 30)", metric="cie76").structured
    assert s.delta_e == pytest.approx(deltaE_cie76(la, lb), abs=1e-6)
    s = run(ctx, color_a="tomato", color_b="#0A141E", metric="cie94", cie94_application="textiles").structured
    assert s.delta_e == pytest.approx(deltaE_ciede94(la, lb, kL=2, k1=0.048, k2=0.014), abs=1e-6)
    assert s.parameters["K1"] == 0.048
    s = run(ctx, color_a="lab(50, 2.5, 0)", color_b="lab(73, 25, -18)").structured
    assert s.delta_e == pytest.approx(27.1492, abs=1e-4)  # Sharma et al. 2005, pair 17
    s = run(ctx, color_a="#abc", color_b="#AABBCC", kL=2.0).structured
    assert s.delta_e == 0.0 and s.band.startswith("imperceptible")


@pytest.mark.parametrize("value,prefix", [(0.5, "imperceptible"), (1.5, "perceptible through"),
                                          (5.0, "perceptible at a glance"), (30.0, "more similar"),
                                          (80.0, "opposite")])
def test_bands(value: float, prefix: str) -> None:
    assert band(value).startswith(prefix)


def _pair(h: int = 48, w: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1)
    a = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    b = a.copy()
    b[10:20, 30:45] = [250, 10, 200]  # the big difference
    b[40:43, 2:4] = [0, 255, 0]  # a small one
    return a, b


def test_images_statistics_verdict_regions_heatmap(ctx) -> None:
    a, b = _pair()
    r = run(ctx, image_a=png_b64(a), image_b=png_b64(b))
    s = r.structured
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))
    assert (s.width, s.height, s.sampled_pixels) == (64, 48, 64 * 48)
    assert s.mean == pytest.approx(de.mean(), abs=1e-4)
    assert s.median == pytest.approx(np.median(de), abs=1e-4)
    assert s.p95 == pytest.approx(np.percentile(de, 95), abs=1e-3)
    assert s.max == pytest.approx(de.max(), abs=1e-3)
    assert s.fraction_above == pytest.approx((de > 5).mean())
    assert s.verdict == "pass" and "30.0%" in s.rule
    big = s.worst_regions[0]
    assert (big.x, big.y, big.width, big.height, big.pixels) == (30, 10, 15, 10, 150)
    assert big.mean_delta_e == pytest.approx(de[10:20, 30:45].mean(), abs=1e-3)
    small = s.worst_regions[1]
    assert (small.x, small.y, small.width, small.height) == (2, 40, 2, 3)
    assert len(r.images) == 1 and r.images[0].name == "heatmap"
    hm = r.images[0].array
    assert hm.dtype == np.uint8 and hm.shape[2] == 3 and hm.shape[0] > 48 and hm.shape[1] >= 64
    # the different block is red-ish (top of the scale), an unchanged pixel is dark
    assert hm[15, 35, 0] > 150 and hm[15, 35, 2] < 80
    assert hm[0, 0].sum() < 200


def test_images_fail_verdict_and_threshold(ctx) -> None:
    a, b = _pair()
    s = run(ctx, image_a=png_b64(a), image_b=png_b64(b), max_fraction=0.01, heatmap=False).structured
    assert s.verdict == "fail"
    r = run(ctx, image_a=png_b64(a), image_b=png_b64(b), threshold=100.0, heatmap=False)
    assert r.structured.fraction_above == 0.0 and r.structured.worst_regions == [] and not r.images


def test_images_mask_image_and_stride(ctx) -> None:
    a, b = _pair()
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 255
    s = run(ctx, image_a=png_b64(a), image_b=png_b64(b), mask=png_b64(mask)).structured
    assert s.sampled_pixels == 48 * 32
    assert s.mean == pytest.approx(de[:, :32].mean(), abs=1e-4)
    assert s.worst_regions[0].x == 30 and s.worst_regions[0].width == 2  # clipped by the mask
    s = run(ctx, image_a=png_b64(a), image_b=png_b64(b), stride=4).structured
    sub = de[::4, ::4]
    assert s.sampled_pixels == sub.size
    assert s.mean == pytest.approx(sub.mean(), abs=1e-4)
    r0 = s.worst_regions[0]
    # sampled columns 32, 36, 40, 44 and rows 12, 16 fall in the block: cells cover x 32..47, y 12..19
    assert (r0.x, r0.y, r0.width, r0.height, r0.pixels) == (32, 12, 16, 8, 8)


def test_images_mask_expression(ctx) -> None:
    a, b = _pair()
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))
    s = run(ctx, image_a=png_b64(a), image_b=png_b64(b), mask_expression="x < 32").structured
    assert s.sampled_pixels == 48 * 32
    assert s.mean == pytest.approx(de[:, :32].mean(), abs=1e-4)
    with pytest.raises(InvalidInput, match="mask_expression"):
        run(ctx, image_a=png_b64(a), image_b=png_b64(b), mask_expression="x <")
    with pytest.raises(ToolError, match="no .*pixels"):
        run(ctx, image_a=png_b64(a), image_b=png_b64(b), mask_expression="x < 0")


def test_images_alpha_ignore_and_composite(ctx) -> None:
    a, _ = _pair()
    rgba_a = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], 2)
    rgba_b = rgba_a.copy()
    rgba_b[..., :3] = 0
    rgba_b[..., 3] = 0  # fully transparent black
    s = run(ctx, image_a=png_b64(rgba_a), image_b=png_b64(rgba_b), heatmap=False).structured
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(np.zeros_like(a)))
    assert s.mean == pytest.approx(de.mean(), abs=1e-4) and any("ignored" in n for n in s.notes)
    # composited over the colour of image_a's first pixel: b becomes that flat colour
    bg = "#{:02X}{:02X}{:02X}".format(*a[0, 0])
    s = run(ctx, image_a=png_b64(rgba_a), image_b=png_b64(rgba_b), alpha="composite", background=bg,
            heatmap=False).structured
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(np.broadcast_to(a[0, 0], a.shape)))
    assert s.mean == pytest.approx(de.mean(), abs=1e-4)


def test_images_resize_fit(ctx) -> None:
    a = np.full((40, 60, 3), 120, np.uint8)
    b = np.full((20, 30, 3), 120, np.uint8)
    with pytest.raises(ToolError, match="image_b.*30x20.*60x40"):
        run(ctx, image_a=png_b64(a), image_b=png_b64(b))
    s = run(ctx, image_a=png_b64(a), image_b=png_b64(b), resize="fit").structured
    assert s.max == pytest.approx(0.0, abs=1e-6) and s.notes


def test_images_inputs_not_modified(ctx, tmp_path) -> None:
    from PIL import Image

    a, b = _pair()
    pa, pb = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(a).save(pa)
    Image.fromarray(b).save(pb)
    before = (pa.read_bytes(), pb.read_bytes())
    run(ctx, image_a=str(pa), image_b=str(pb), alpha="composite")
    assert (pa.read_bytes(), pb.read_bytes()) == before


@pytest.mark.parametrize("kw,argument", [
    ({}, "color_a"),
    ({"color_a": "#FF0000"}, "color_b"),
    ({"image_b": "x"}, "image_a"),
    ({"color_a": "#FF0000", "color_b": "#00FF00", "image_a": "x", "image_b": "y"}, "image_a"),
    ({"color_a": "#FF000", "color_b": "#00FF00"}, "color_a"),
    ({"color_a": "#FF0000", "color_b": "#GG0000"}, "color_b"),
    ({"color_a": "blurple", "color_b": "red"}, "color_a"),
    ({"color_a": "lab(nan, 0, 0)", "color_b": "red"}, "color_a"),
    ({"color_a": "lab(50, 0, 0)", "color_b": "lab(120, 0, 0)"}, "color_b"),
    ({"color_a": "lab(50, 300, 0)", "color_b": "red"}, "color_a"),
    ({"color_a": "rgb(300, 0, 0)", "color_b": "red"}, "color_a"),
    ({"color_a": "red", "color_b": "blue", "kL": 0.0}, "kL"),
    ({"color_a": "red", "color_b": "blue", "kH": float("nan")}, "kH"),
    ({"color_a": "red", "color_b": "blue", "kC": -1.0}, "kC"),
    ({"color_a": "red", "color_b": "blue", "threshold": 0.0}, "threshold"),
    ({"color_a": "red", "color_b": "blue", "threshold": float("inf")}, "threshold"),
    ({"color_a": "red", "color_b": "blue", "max_fraction": 1.5}, "max_fraction"),
    ({"color_a": "red", "color_b": "blue", "stride": 0}, "stride"),
    ({"color_a": "red", "color_b": "blue", "worst_regions": -1}, "worst_regions"),
    ({"color_a": "red", "color_b": "blue", "heatmap_max": 0.0}, "heatmap_max"),
    ({"color_a": "red", "color_b": "blue", "stride": 2}, "stride"),
    ({"color_a": "red", "color_b": "blue", "mask_expression": "r > 0"}, "mask_expression"),
    ({"color_a": "red", "color_b": "blue", "heatmap": True}, "heatmap"),
])
def test_bad_input_names_argument(ctx, kw: dict, argument: str) -> None:
    with pytest.raises(REFUSED) as ei:
        run(ctx, **kw)
    assert str(ei.value).startswith(argument + "="), str(ei.value)


def test_bad_image_inputs(ctx) -> None:
    a, b = _pair()
    with pytest.raises(InvalidInput, match="^background="):
        run(ctx, image_a=png_b64(a), image_b=png_b64(b), background="nope")
    with pytest.raises(ToolError, match="^image_b="):
        run(ctx, image_a=png_b64(a), image_b="not-an-image")
    with pytest.raises(ToolError, match="^mask=.*sizes must match"):
        run(ctx, image_a=png_b64(a), image_b=png_b64(b), mask=png_b64(np.zeros((5, 5), np.uint8)))
    with pytest.raises(ToolError, match="^mask=.*no .*pixels"):
        run(ctx, image_a=png_b64(a), image_b=png_b64(b), mask=png_b64(np.zeros((48, 64), np.uint8)))
