"""generate_image and detail_image through the MCP server (in-memory client):
thumbnail + image:// link + saved PNG with parameters, progress, jobs, errors."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from mcp import Client
from PIL import Image
from skimage import data as skdata

from mcp_server.app import build_server
from tests.test_server_core import make_settings
from tests.tiny_pipeline import cached_tiny_sd


def test_generate_and_detail_through_the_server(tmp_path):
    model = str(cached_tiny_sd())
    s = make_settings(tmp_path, models={"diffusion": model})
    Image.fromarray(skdata.astronaut()).save(tmp_path / "data" / "astronaut.png")
    progress = []

    async def on_progress(p, t, m):
        progress.append((p, t))

    async def main():
        server = build_server(s)
        try:
            async with Client(server) as c:
                names = {t.name for t in (await c.list_tools()).tools}
                assert {"generate_image", "detail_image"} <= names
                args = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 7}
                r = await c.call_tool("generate_image", args, progress_callback=on_progress)
                assert not r.is_error, r.content[0].text
                kinds = [b.type for b in r.content]
                assert "image" in kinds and "resource_link" in kinds
                img = r.structured_content["saved_images"][0]
                saved = Image.open(img["path"])
                assert saved.size == (64, 64)
                params = json.loads(saved.text["parameters"])
                assert params["seed"] == 7 and params["steps"] == 4
                again = await c.call_tool("generate_image", args)
                a = np.asarray(Image.open(img["path"]))
                b = np.asarray(Image.open(again.structured_content["saved_images"][0]["path"]))
                assert np.array_equal(a, b)  # same seed, same image

                d = await c.call_tool("detail_image", {"image": "astronaut.png", "targets": ["face"],
                                                       "steps": 4, "inpaint_resolution": 64, "seed": 1})
                assert not d.is_error, d.content[0].text
                dets = d.structured_content["detections"]
                assert dets and dets[0]["label"] == "face"
                names_out = [i["name"] for i in d.structured_content["saved_images"]]
                assert "detailed" in names_out and "detections" in names_out

                bad = await c.call_tool("generate_image", {"prompt": "x", "width": 65, "height": 64})
                assert bad.is_error and "width" in bad.content[0].text
        finally:
            server.state.close()

    asyncio.run(main())
    assert progress and progress[-1][0] == progress[-1][1]


def test_image_tools_without_a_model_explain_configuration(tmp_path):
    s = make_settings(tmp_path)

    async def main():
        server = build_server(s)
        try:
            async with Client(server) as c:
                r = await c.call_tool("generate_image", {"prompt": "x", "width": 64, "height": 64})
                assert r.is_error and "models.diffusion" in r.content[0].text
        finally:
            server.state.close()

    asyncio.run(main())
