"""Output retention: the oldest images this server wrote go first, over limits.output_max_bytes or older
than limits.output_max_age_s; never a file it did not write, never a fresh one; a deleted image's link
answers "expired"; engine_status shows the folder. Through the official client (in memory)."""

from __future__ import annotations

import asyncio
import time

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from PIL import Image

from mcp_server.app import build_server
from mcp_server.media import RETENTION_GRACE_S
from tests.helpers import make_settings
from tests.tooling import TEST_TOOLS


def test_oldest_outputs_go_first_and_links_say_expired(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # files the server did not write: one named like its outputs (no Software tag), one not
    Image.new("RGB", (300, 300), "red").save(out / "holiday-0123456789ab.png")
    Image.new("RGB", (300, 300), "blue").save(out / "photo.png")
    settings = make_settings(tmp_path, limits={"output_max_bytes": 60_000, "output_max_age_s": 0})
    server = build_server(settings, extra_specs=TEST_TOOLS)
    media = server.state.media

    async def main():
        async with Client(server) as c:
            ids = []
            for i in range(5):
                r = await c.call_tool("test_image", {"width": 200 + 10 * i, "height": 150})
                ids.append(r.structured_content["saved_images"][0]["uri"].removeprefix("image://"))
                await asyncio.sleep(0.01)
            sizes = {i: media.get(i).size for i in ids}
            assert all(v > 0 for v in sizes.values())
            limit = sizes[ids[-1]] + sizes[ids[-2]] + 1  # room for the two newest
            server.state.settings.limits.output_max_bytes = limit
            # everything is fresh: nothing goes, even over the limit
            assert media.enforce_retention() == []
            later = time.time() + RETENTION_GRACE_S + 60
            gone = media.enforce_retention(now=later)
            kept = [i for i in ids if i not in gone]
            assert gone == ids[:len(gone)] and gone  # oldest first
            assert kept == ids[-2:] and sum(sizes[i] for i in kept) <= limit
            assert (out / "holiday-0123456789ab.png").exists() and (out / "photo.png").exists()
            assert all(not any(out.glob(f"*-{i}.png")) for i in gone)
            with pytest.raises(MCPError, match="expired: the output retention deleted it"):
                await c.read_resource(f"image://{gone[0]}")
            r = await c.call_tool("test_load", {"image": f"image://{gone[0]}"})
            assert r.is_error and "expired" in r.content[0].text
            r = await c.call_tool("test_load", {"image": f"image://{kept[-1]}"})
            assert not r.is_error
            st = (await c.call_tool("engine_status", {})).structured_content["outputs"]
            assert st["files"] == len(kept) and st["bytes"] == sum(sizes[i] for i in kept)
            assert st["deleted_by_retention"] == len(gone) and st["max_bytes"] == limit
            return kept

    try:
        kept = asyncio.run(main())
    finally:
        server.state.close()

    # a restart finds its own tagged outputs (and not the user's file); the age rule removes old ones
    settings = make_settings(tmp_path, limits={"output_max_bytes": 0, "output_max_age_s": 3600})
    server = build_server(settings, extra_specs=TEST_TOOLS)
    try:
        media = server.state.media
        ours = [r for r in media.records() if r.ours]
        assert len(ours) == len(kept) and {r.id for r in ours} == set(kept)
        assert media.enforce_retention(now=time.time() + 1800) == []
        assert sorted(media.enforce_retention(now=time.time() + 7200)) == sorted(kept)
        assert sorted(p.name for p in out.iterdir()) == ["holiday-0123456789ab.png", "photo.png"]
    finally:
        server.state.close()


def test_a_file_that_is_not_an_image_is_named_by_its_path(tmp_path):
    server = build_server(make_settings(tmp_path), extra_specs=TEST_TOOLS)
    notes = tmp_path / "data" / "notes.png"
    notes.write_text("these are my notes, not a picture\n" * 9)

    async def main():
        async with Client(server) as c:
            r = await c.call_tool("test_load", {"image": str(notes)})
            assert r.is_error
            assert r.content[0].text == (f"image={str(notes)!r}: unsupported image format; accepted: PNG, JPEG, "
                                         f"WEBP")

    try:
        asyncio.run(main())
    finally:
        server.state.close()
