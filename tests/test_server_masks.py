"""mask_edit through the MCP server (in-memory client): the user stories, real
detections and inpainting with a tiny pipeline, and bad input."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from mcp import Client
from PIL import Image
from skimage import data as skdata

from mcp_server.app import build_server
from tests.test_server_core import make_settings
from tests.tiny_pipeline import cached_tiny_sd


def _call(settings, calls):
    out = []

    async def main():
        server = build_server(settings)
        try:
            async with Client(server) as c:
                for name, args in calls:
                    out.append(await c.call_tool(name, args))
        finally:
            server.state.close()

    asyncio.run(main())
    return out


def test_red_to_blue_and_transparent_outside_centre(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    img[10:20, 10:30] = [230, 20, 10]  # a red patch
    s = make_settings(tmp_path)
    Image.fromarray(img).save(tmp_path / "data" / "photo.png")
    r1, r2, r3 = _call(s, [
        ("mask_edit", {"image": "photo.png", "expression": "(r > 200) & (g < 50) & (b < 50)",
                       "operation": "fill", "color": "#0000ff"}),
        ("mask_edit", {"image": "photo.png", "operation": "transparent", "invert": True,
                       "shapes": [{"type": "rect", "box": [0.25, 0.25, 0.75, 0.75], "units": "relative"}]}),
        ("mask_edit", {"image": "photo.png", "expression": "(r > 200) & (", "operation": "fill",
                       "color": "#0000ff"}),
    ])
    assert not r1.is_error, r1.content[0].text
    edited = np.asarray(Image.open(next(i["path"] for i in r1.structured_content["saved_images"]
                                        if i["name"] == "edited")).convert("RGB"))
    oracle = img.copy()
    sel = (img[..., 0] > 200) & (img[..., 1] < 50) & (img[..., 2] < 50)
    oracle[sel] = [0, 0, 255]
    assert np.array_equal(edited, oracle)
    assert r1.structured_content["selected_pixels"] == int(sel.sum())

    assert not r2.is_error, r2.content[0].text
    out = np.asarray(Image.open(next(i["path"] for i in r2.structured_content["saved_images"]
                                     if i["name"] == "edited")))
    assert out.shape == (60, 80, 4)
    inside = np.zeros((60, 80), bool)
    inside[15:45, 20:60] = True
    assert (out[~inside, 3] == 0).all() and (out[inside, 3] == 255).all()
    assert np.array_equal(out[inside, :3], img[inside])

    assert r3.is_error and "column" in r3.content[0].text


@pytest.mark.slow
def test_detection_mask_and_inpaint_with_real_engines(tmp_path):
    s = make_settings(tmp_path, models={"diffusion": str(cached_tiny_sd())})
    astro = skdata.astronaut()
    Image.fromarray(astro).save(tmp_path / "data" / "astronaut.png")
    r1, r2 = _call(s, [
        ("mask_edit", {"image": "astronaut.png", "detect": {"targets": ["face"]}, "operation": "pixelate",
                       "pixel_size": 8}),
        ("mask_edit", {"image": "astronaut.png", "shapes": [{"type": "rect", "box": [200, 80, 264, 144]}],
                       "operation": "inpaint", "prompt": "a face", "steps": 3, "seed": 1}),
    ])
    assert not r1.is_error, r1.content[0].text
    bbox = r1.structured_content["bbox"]
    # the face region from an independent hand check: x 183-268, y 62-160
    assert bbox[0] < 268 and bbox[2] > 183 and bbox[1] < 160 and bbox[3] > 62
    assert not r2.is_error, r2.content[0].text
    edited = np.asarray(Image.open(next(i["path"] for i in r2.structured_content["saved_images"]
                                        if i["name"] == "edited")).convert("RGB"))
    outside = np.ones(astro.shape[:2], bool)
    outside[80:144, 200:264] = False
    assert np.array_equal(edited[outside], astro[outside])
    assert not np.array_equal(edited[~outside], astro[~outside])
