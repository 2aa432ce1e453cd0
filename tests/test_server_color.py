"""color_compare through the MCP server (in-memory client): the issue's two
user stories, checked against scikit-image."""

from __future__ import annotations

import asyncio

import numpy as np
from mcp import Client
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab

from mcp_server.app import build_server
from tests.test_server_core import make_settings


def test_two_colours_and_two_photos(tmp_path):
    s = make_settings(tmp_path)
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[10:30, 20:50] = np.clip(b[10:30, 20:50].astype(int) + 40, 0, 255).astype(np.uint8)  # a changed region
    Image.fromarray(a).save(tmp_path / "data" / "a.png")
    Image.fromarray(b).save(tmp_path / "data" / "b.png")
    out = []

    async def main():
        server = build_server(s)
        try:
            async with Client(server) as c:
                out.append(await c.call_tool("color_compare", {"color_a": "#FF0000", "color_b": "#FE0000"}))
                out.append(await c.call_tool("color_compare", {"image_a": "a.png", "image_b": "b.png"}))
                out.append(await c.call_tool("color_compare", {"color_a": "#GG0000", "color_b": "red"}))
        finally:
            server.state.close()

    asyncio.run(main())
    pair, imgs, bad = out
    assert not pair.is_error, pair.content[0].text
    oracle = deltaE_ciede2000(rgb2lab(np.array([[[255, 0, 0]]], np.uint8)),
                              rgb2lab(np.array([[[254, 0, 0]]], np.uint8)))[0, 0]
    assert abs(pair.structured_content["delta_e"] - oracle) < 1e-4
    assert "imperceptible" in pair.structured_content["band"].lower()

    assert not imgs.is_error, imgs.content[0].text
    st = imgs.structured_content
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))
    assert abs(st["mean"] - de.mean()) < 1e-3 and abs(st["max"] - de.max()) < 1e-3
    assert abs(st["fraction_above"] - (de > 5).mean()) < 1e-6
    box = st["worst_regions"][0]
    assert (box["x"], box["y"], box["width"], box["height"]) == (20, 10, 30, 20)
    assert st["verdict"] == ("fail" if (de > 5).mean() > 0.30 else "pass")
    assert any(i["name"] == "heatmap" for i in st["saved_images"])

    assert bad.is_error and "#GG0000" in bad.content[0].text
