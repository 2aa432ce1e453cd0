"""Issue 14, the small first-contact items, through the official in-memory client where a client sees
them: mask_edit's HSV example on a photo-like image, plain-language bands for image-mode color_compare,
the detection preview (tinted masks, readable labels, thick boxes), path errors naming the allowed
folders, the three distinct diffusion-folder problems, and the size of these tools' tools/list entries."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from mcp import Client
from PIL import Image
from skimage import data as skdata
from skimage.color import deltaE_ciede2000, hsv2rgb, rgb2lab

from engine import adetailer
from engine import diffusion as D
from engine.detect import Detection
from mcp_server.app import build_server
from mcp_server.sandbox import Sandbox
from tests.helpers import make_settings
from tools.base import ToolError
from tools.masks import HSV_RED_EXAMPLE


def _call(settings, calls, *, listing=False):
    out = []

    async def main():
        server = build_server(settings)
        try:
            async with Client(server) as c:
                if listing:
                    out.append((await c.list_tools()).tools)
                for name, args in calls:
                    out.append(await c.call_tool(name, args))
        finally:
            server.state.close()

    asyncio.run(main())
    return out


def _saved(result, name):
    return np.asarray(Image.open(next(i["path"] for i in result.structured_content["saved_images"]
                                      if i["name"] == name)).convert("RGB"))


# -- 1. mask_edit's HSV example ----------------------------------------------------------------------
def _photo_like(rng):
    """A 'photo': sky, grass, a brown path, grey road, and a shaded, noisy red ball. Returns (rgb, ball)."""
    h, w = 120, 160
    hsv = np.zeros((h, w, 3), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    hsv[:50] = (210 / 360, 0.45, 0.0)
    hsv[:50, :, 2] = 0.95 - 0.3 * yy[:50] / 50  # sky darkening towards the horizon
    hsv[50:] = (100 / 360, 0.6, 0.0)
    hsv[50:, :, 2] = 0.35 + 0.3 * xx[50:] / w  # grass in uneven light
    hsv[90:, 100:] = (30 / 360, 0.6, 0.5)  # a brown (orange-hued) path
    hsv[50:70, :40] = (0.0, 0.05, 0.55)  # a grey road
    ball = (yy - 70) ** 2 + (xx - 70) ** 2 < 28 ** 2
    hue = (rng.uniform(-6, 6, (h, w)) % 360) / 360  # red wraps round 0 degrees
    shade = 0.95 - 0.6 * np.clip(((yy - 42) + (xx - 42)) / 112, 0, 1)  # lit top-left, shadow bottom-right
    hsv[ball, 0] = hue[ball]
    hsv[ball, 1] = rng.uniform(0.75, 0.9, int(ball.sum()))
    hsv[ball, 2] = shade[ball]
    rgb = hsv2rgb(hsv) * 255 + rng.normal(0, 5, (h, w, 3))  # sensor noise
    return np.clip(rgb.round(), 0, 255).astype(np.uint8), ball


def test_mask_edit_description_example_selects_the_red_object_on_a_photo(tmp_path):
    img, ball = _photo_like(np.random.default_rng(14))
    s = make_settings(tmp_path)
    Image.fromarray(img).save(tmp_path / "data" / "photo.png")
    old_rgb = "(r > 200) & (g < 50) & (b < 50)"
    tools, new, old = _call(s, [
        ("mask_edit", {"image": "photo.png", "expression": HSV_RED_EXAMPLE, "operation": "fill", "color": "#0000ff"}),
        ("mask_edit", {"image": "photo.png", "expression": old_rgb, "operation": "none"}),
    ], listing=True)
    desc = next(t for t in tools if t.name == "mask_edit").description
    assert HSV_RED_EXAMPLE in desc and old_rgb not in desc
    assert not new.is_error, new.content[0].text
    edited = _saved(new, "edited")
    blue = np.all(edited == [0, 0, 255], axis=-1)
    assert blue[ball].mean() > 0.97  # the ball, its shadow side included
    assert blue[~ball].mean() < 0.002  # not the sky, grass, brown path or grey road
    assert np.array_equal(edited[~blue], img[~blue])
    # the old RGB example misses almost all of a shaded red object
    assert not old.is_error and old.structured_content["selected_pixels"] < 0.1 * ball.sum()


# -- 2. color_compare image mode: plain-language bands ----------------------------------------------
# Zeljko Bugarski, "Color Difference - Delta E - A Survey" (zschuessler.github.io/DeltaE/learn):
# <= 1 not perceptible by human eyes; 1-2 perceptible through close observation; 2-10 perceptible at a
# glance; 11-49 more similar than opposite; 100 exact opposite
_SCALE = [(1.0, "imperceptible"), (2.0, "close observation"), (10.0, "at a glance"), (50.0, "more similar than"),
          (float("inf"), "opposite")]


def _expected(de):
    return next(name for upper, name in _SCALE if de < upper)


def test_color_compare_images_band_from_mean_and_p95(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(40, 216, (64, 80, 3), dtype=np.uint8)
    b = a.copy()
    b[:8, :60] = np.clip(a[:8, :60].astype(int) + [14, -10, 6], 0, 255).astype(np.uint8)  # ~9 % of the pixels
    s = make_settings(tmp_path)
    Image.fromarray(a).save(tmp_path / "data" / "a.png")
    Image.fromarray(b).save(tmp_path / "data" / "b.png")
    (r,) = _call(s, [("color_compare", {"image_a": "a.png", "image_b": "b.png"})])
    assert not r.is_error, r.content[0].text
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))
    mean, p95 = float(de.mean()), float(np.percentile(de, 95))
    want_mean, want_p95 = _expected(mean), _expected(p95)
    assert want_mean != want_p95  # the image discriminates the two
    st = r.structured_content
    assert st["mean"] == pytest.approx(mean, abs=1e-3) and st["p95"] == pytest.approx(p95, abs=1e-2)
    assert want_mean in st["band"] and want_p95 in st["band_p95"]
    text = r.content[0].text
    assert st["band"] in text and st["band_p95"] in text
    same = _call(s, [("color_compare", {"image_a": "a.png", "image_b": "a.png"})])[0].structured_content
    assert "imperceptible" in same["band"] and "imperceptible" in same["band_p95"]


# -- 3. the detection preview ---------------------------------------------------------------------------
def _luminance(c):
    lin = [(v / 255) / 12.92 if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_preview_tints_masks_and_draws_readable_labels():
    h, w = 1200, 1600
    img = np.full((h, w, 3), 128, np.uint8)
    mask = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    mask[((yy - 600) / 200) ** 2 + ((xx - 800) / 150) ** 2 < 1] = True  # an ellipse inside the box
    det = Detection("face", 0.87, (650, 400, 951, 801), mask, "test")
    res = adetailer.DetailResult(image=img.copy(), detections=[(0, det)], masks=[(0, mask)])
    out = adetailer.preview(img, res)
    color = np.array(adetailer.PREVIEW_COLORS[0], np.float64)
    want = np.round(128 * (1 - adetailer.PREVIEW_FILL) + color * adetailer.PREVIEW_FILL)
    inner = mask & (abs(yy - 600) < 150) & (abs(xx - 800) < 100)
    assert np.abs(out[inner].astype(float) - want).max() <= 1  # tinted inside the mask
    outside = ~mask & (abs(yy - 600) < 150) & (abs(xx - 800) < 140) & ~inner
    assert (out[outside & (xx > 660) & (xx < 940)] == 128).all()  # inside the box, off the mask: untouched
    # the box line: > 1 px wide on a 1600 px image
    col = out[600, 640:700]
    drawn = np.all(col == adetailer.PREVIEW_COLORS[0], axis=-1)
    assert drawn.sum() >= 3
    # the label: a filled box of the colour just above the detection, with text of the contrasting colour
    band = out[300:400, 650:950]
    filled = np.all(band == adetailer.PREVIEW_COLORS[0], axis=-1)
    rows = np.where(filled.any(axis=1))[0]
    assert rows.size >= 20  # letters about 1.7 % of the image tall, not a 10 px scribble
    ink = np.array([0, 0, 0] if _luminance(adetailer.PREVIEW_COLORS[0]) > 0.18 else [255, 255, 255])
    assert np.all(band == ink, axis=-1).sum() > 200
    # small images keep at least a 2 px line and a legible scale
    line, scale, _ = adetailer.preview_sizes(100, 120)
    assert line >= 2 and scale >= 0.5
    assert adetailer.preview_sizes(4000, 3000)[0] > adetailer.preview_sizes(1000, 800)[0]


def test_detect_only_preview_through_the_server_shows_the_masks(tmp_path):
    s = make_settings(tmp_path)
    astro = skdata.astronaut()
    Image.fromarray(astro).save(tmp_path / "data" / "astronaut.png")
    (r,) = _call(s, [("detail_image", {"image": "astronaut.png", "targets": ["face"], "detect_only": True,
                                       "dilate_erode": 0})])
    assert not r.is_error, r.content[0].text
    x1, y1, x2, y2 = r.structured_content["detections"][0]["box"]
    prev = _saved(r, "detections").astype(float)
    color = np.array(adetailer.PREVIEW_COLORS[0], float)
    # a pixel inside the face box, away from its outline and label, is the 45 % tint of the source pixel
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    want = np.round(astro[cy, cx] * (1 - adetailer.PREVIEW_FILL) + color * adetailer.PREVIEW_FILL)
    assert np.abs(prev[cy, cx] - want).max() <= 1
    assert np.array_equal(prev[5:40, 5:40], astro[5:40, 5:40].astype(float))  # far from it: untouched


def test_mask_edit_with_detections_returns_the_same_preview(tmp_path):
    s = make_settings(tmp_path)
    astro = skdata.astronaut()
    Image.fromarray(astro).save(tmp_path / "data" / "astronaut.png")
    (r,) = _call(s, [("mask_edit", {"image": "astronaut.png", "detect": {"targets": ["face"], "use_masks": False},
                                    "operation": "none"})])
    assert not r.is_error, r.content[0].text
    x1, y1, x2, y2 = r.structured_content["bbox"]  # the box mask: the selection is the face box
    prev = _saved(r, "detections").astype(float)
    color = np.array(adetailer.PREVIEW_COLORS[0], float)
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    want = np.round(astro[cy, cx] * (1 - adetailer.PREVIEW_FILL) + color * adetailer.PREVIEW_FILL)
    assert np.abs(prev[cy, cx] - want).max() <= 1
    assert np.all(prev[cy, x1:x1 + 2] == color)  # the outline, 2 px wide on a 512 px image
    assert np.array_equal(prev[5:40, 5:40], astro[5:40, 5:40].astype(float))


# -- 4. path errors name the allowed folders ----------------------------------------------------------
def test_path_error_names_allowed_folders_only(tmp_path):
    s = make_settings(tmp_path)
    secret = tmp_path / "outside.png"
    secret.write_text("root:x:0:0:secret-contents")
    (r,) = _call(s, [("mask_edit", {"image": str(secret), "expression": "r > 1", "operation": "none"})])
    assert r.is_error
    text = r.content[0].text
    data, out = str((tmp_path / "data").resolve()), str((tmp_path / "out").resolve())
    assert f"resolves outside the allowed read roots ({data}, {out})" in text
    assert "secret-contents" not in text


def test_many_roots_are_capped(tmp_path):
    roots = []
    for i in range(11):
        (tmp_path / f"r{i:02d}").mkdir()
        roots.append(tmp_path / f"r{i:02d}")
    sb = Sandbox(roots, tmp_path / "out")
    with pytest.raises(ToolError) as err:
        sb.resolve_input("/etc/hostname", "image")
    msg = str(err.value)
    shown = re.search(r"read roots \((.*)\)", msg).group(1)
    assert shown.endswith("and 4 more") and shown.count(str(tmp_path)) == 8  # 11 roots + output dir


# -- 6. a missing diffusion folder is reported as missing ----------------------------------------------
def test_three_diffusion_folder_problems_are_distinct(tmp_path):
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    missing = tmp_path / "no-such-folder"
    texts = []
    for model in ("", str(missing), str(empty)):
        sub = tmp_path / f"case{len(texts)}"
        sub.mkdir()
        s = make_settings(sub, models={"diffusion": model})
        Image.fromarray(skdata.astronaut()[:64, :64]).save(sub / "data" / "a.png")
        g, d = _call(s, [("generate_image", {"prompt": "x", "width": 64, "height": 64}),
                         ("detail_image", {"image": "a.png"})])
        assert g.is_error and d.is_error
        assert "detect_only" in d.content[0].text
        texts.append(g.content[0].text)
    not_configured, absent, not_pipeline = texts
    assert "no diffusion model is configured" in not_configured
    assert str(missing) in absent and "does not exist" in absent and "model_index.json" not in absent.split(";")[0]
    assert "is configured" not in absent
    assert str(empty) in not_pipeline and "exists" in not_pipeline and "no model_index.json" in not_pipeline
    assert "is configured" not in not_pipeline
    idle = SimpleNamespace(registry=SimpleNamespace(loaded=lambda: []))
    st_missing, st_empty = D.status(idle, str(missing)), D.status(idle, str(empty))
    assert st_missing["exists"] is False and st_missing["message"] == absent
    assert st_empty["exists"] is True and st_empty["valid_folder"] is False and st_empty["message"] == not_pipeline


# -- 7. tools/list: these tools' entries stay small ---------------------------------------------------
def test_tools_list_entries_are_compact(tmp_path):
    (tools,) = _call(make_settings(tmp_path), [], listing=True)
    mine = {t.name: len(json.dumps(t.model_dump(mode="json", by_alias=True, exclude_none=True)))
            for t in tools if t.name in ("mask_edit", "color_compare", "generate_image", "detail_image")}
    assert len(mine) == 4
    # 24,996 characters before the descriptions were cut (same server code otherwise)
    assert sum(mine.values()) < 22500, mine
    for t in tools:
        if t.name in mine:
            assert len(t.description) < 600
