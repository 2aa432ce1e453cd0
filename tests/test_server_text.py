"""generate_text through the MCP server (in-memory client) with the embedded
SmolLM2: the README's haiku, progress with the text so far, bad input."""

from __future__ import annotations

import asyncio

import pytest
from mcp import Client

from mcp_server.app import build_server
from tests.helpers import make_settings

pytestmark = pytest.mark.slow


def test_haiku_with_progress_and_errors(tmp_path):
    s = make_settings(tmp_path, limits={"max_new_tokens": 64})
    progress = []

    async def on_progress(p, t, m):
        progress.append((p, t, m))

    async def main():
        server = build_server(s)
        try:
            async with Client(server) as c:
                r = await c.call_tool("generate_text", {"prompt": "Write a haiku about the sea",
                                                        "max_new_tokens": 48}, progress_callback=on_progress)
                assert not r.is_error, r.content[0].text
                st = r.structured_content
                assert progress and (progress[-1][2] or "").startswith(f"{st['completion_tokens']} tokens: ")
                assert st["completion_tokens"] > 0 and st["finish_reason"] in ("stop", "length")
                assert st["text"].strip() and st["prompt_tokens"] > 0
                assert st["cache"]["kind"] == "full" and st["cache"]["bytes"] > 0
                bad = await c.call_tool("generate_text", {"prompt": "hi", "max_new_tokens": 500})
                assert bad.is_error and "max_new_tokens" in bad.content[0].text
                empty = await c.call_tool("generate_text", {"prompt": ""})
                assert empty.is_error and "prompt" in empty.content[0].text
                st2 = await c.call_tool("engine_status", {})
                assert any(k.startswith("llm") for k in st2.structured_content["services"])
        finally:
            server.state.close()

    asyncio.run(main())
    assert progress, "no progress notifications"
    assert "tokens" in (progress[-1][2] or "")
