"""Every result fits every client: ≤ 1 MiB of JSON, no inline image side over 8000 px (the issue's sizes:
a 2048² image inline, 2000×1500 noise inline), through the official client, in memory and over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
from mcp import Client
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mcp_server.app import build_server
from mcp_server.fit import fit_result, result_chars
from tests.helpers import make_settings
from tools.base import ImageOut, ToolOutput, ToolSpec

CLAUDE_DESKTOP_LIMIT = 1_048_576


class _BigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(2000, ge=1, le=20000)
    height: int = Field(1500, ge=1, le=20000)
    noise: bool = True
    inline_full: bool = True
    text_chars: int = Field(0, ge=0)
    items: int = Field(0, ge=0)


class _BigOut(BaseModel):
    width: int
    height: int
    items: list[str] = []


def _big(args: _BigIn, ctx) -> ToolOutput:
    rng = np.random.default_rng(0)
    if args.noise:
        arr = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:args.height, 0:args.width]
        arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    return ToolOutput(text="x" * args.text_chars or "made",
                      structured=_BigOut(width=args.width, height=args.height,
                                         items=["item %07d " % i + "y" * 90 for i in range(args.items)]),
                      images=[ImageOut(arr, "big", {})] if args.width * args.height > 1 else [])


BIG = ToolSpec("test_big", "big", "makes a big result", _BigIn, _BigOut, _big, execution="thread")


def _sides(res) -> list[tuple[int, int]]:
    out = []
    for b in res.content:
        if b.type == "image":
            out.append(Image.open(io.BytesIO(base64.b64decode(b.data))).size)
    return out


def _text(res) -> str:
    return "\n".join(b.text for b in res.content if b.type == "text")


def test_results_fit_in_memory(tmp_path):
    server = build_server(make_settings(tmp_path, limits={"max_image_pixels": 200_000_000}), extra_specs=[BIG])

    async def main():
        async with Client(server) as c:
            # 2000x1500 noise, full resolution asked for: ~11.7 MB of base64 before
            r = await c.call_tool("test_big", {"width": 2000, "height": 1500})
            assert not r.is_error and result_chars(r) <= CLAUDE_DESKTOP_LIMIT
            (w, h), = _sides(r)
            assert w < 2000 and abs(w / h - 2000 / 1500) < 0.02
            t = _text(r)
            assert "inline image downscaled from 2000x1500" in t and "image://" in t and ".png" in t
            assert any(b.type == "resource_link" for b in r.content)
            # 2048² inline, smooth content
            r = await c.call_tool("test_big", {"width": 2048, "height": 2048, "noise": False})
            assert result_chars(r) <= CLAUDE_DESKTOP_LIMIT and _sides(r)
            # a side over 8000 px is brought to 8000 even when the bytes would fit
            r = await c.call_tool("test_big", {"width": 9000, "height": 40, "noise": False})
            assert max(_sides(r)[0]) == 8000 and "clients refuse images over 8000 px" in _text(r)
            # long text is cut with a note; the structured content is untouched
            r = await c.call_tool("test_big", {"width": 1, "height": 1, "text_chars": 3_000_000})
            assert result_chars(r) <= CLAUDE_DESKTOP_LIMIT and "characters cut" in _text(r)
            assert r.structured_content["width"] == 1
            # structured content alone over the limit: a clear error, not a truncated object
            r = await c.call_tool("test_big", {"width": 1, "height": 1, "items": 20_000})
            assert r.is_error and "ask for less" in r.content[0].text
            # small results are untouched
            r = await c.call_tool("test_big", {"width": 64, "height": 48, "noise": False})
            assert _sides(r) == [(64, 48)] and "downscaled" not in _text(r)

    try:
        asyncio.run(main())
    finally:
        server.state.close()


def test_fit_result_is_a_bound_for_any_mix():
    import mcp_types as mt

    rng = np.random.default_rng(1)
    blocks = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)).save(buf, "PNG")
        blocks.append(mt.ImageContent(type="image", data=base64.b64encode(buf.getvalue()).decode(),
                                      mime_type="image/png"))
    blocks.append(mt.TextContent(type="text", text="é" * 400_000))  # escaped to 6 characters each in JSON
    res = mt.CallToolResult(content=blocks, structured_content={"a": 1})
    assert result_chars(res) > 3_000_000
    for limit in (50_000, 300_000, 1_000_000):
        fitted = fit_result(res, limit)
        size = len(json.dumps(fitted.model_dump(by_alias=True, mode="json", exclude_none=True)))
        assert size <= limit, (limit, size)
        assert fitted.structured_content == {"a": 1}


def test_results_fit_over_http(http_server):  # noqa: F811
    port, _ = http_server("http")

    async def main():
        async with Client(f"http://127.0.0.1:{port}/mcp") as c:
            r = await c.call_tool("test_image", {"width": 4096, "height": 4096, "inline_full": True})
            assert not r.is_error and result_chars(r) <= CLAUDE_DESKTOP_LIMIT and _sides(r)

    asyncio.run(main())
