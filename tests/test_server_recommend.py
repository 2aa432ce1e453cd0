"""recommend_topk / catalog_upsert / catalog_info through the MCP server
(in-memory client) on the bundled demo catalogue: the README's user story."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from mcp import Client

from mcp_server.app import build_server
from tests.test_server_core import make_settings

pytestmark = pytest.mark.slow  # the first run embeds the demo catalogue (cached afterwards)


def test_accessories_for_a_phone_then_upsert(tmp_path):
    s = make_settings(tmp_path)

    async def main():
        server = build_server(s)
        try:
            async with Client(server) as c:
                info = await c.call_tool("catalog_info", {})
                assert not info.is_error, info.content[0].text
                assert info.structured_content["rows"] >= 200
                r = await c.call_tool("recommend_topk", {
                    "text": "accessories for my new Pixel 9 phone", "k": 5, "category_limit": 2,
                    "filters": {"category": {"in": ["phone case", "charger", "cable", "screen protector",
                                                     "power bank", "wireless charger", "car mount"]}}})
                assert not r.is_error, r.content[0].text
                items = r.structured_content["items"]
                assert len(items) == 5
                cats = Counter(i["category"] for i in items)
                assert max(cats.values()) <= 2
                scores = [i["score"] for i in items]
                assert scores == sorted(scores, reverse=True)

                new = {"id": "ACC-NEW-1", "category": "phone case", "name": "Pixel 9 aurora armour case",
                       "description": "A rugged armour case made for the Pixel 9 phone, with MagSafe ring."}
                up = await c.call_tool("catalog_upsert", {"items": [new]})
                assert not up.is_error, up.content[0].text
                r2 = await c.call_tool("recommend_topk", {"text": "rugged armour case for a Pixel 9", "k": 3})
                ids = [i["id"] for i in r2.structured_content["items"]]
                assert "ACC-NEW-1" in ids
                gone = await c.call_tool("catalog_upsert", {"delete": ["ACC-NEW-1"]})
                assert not gone.is_error
                r3 = await c.call_tool("recommend_topk", {"text": "rugged armour case for a Pixel 9", "k": 3})
                assert "ACC-NEW-1" not in [i["id"] for i in r3.structured_content["items"]]
                bad = await c.call_tool("recommend_topk", {"item_id": "NOPE-404", "k": 3})
                assert bad.is_error and "NOPE-404" in bad.content[0].text
        finally:
            server.state.close()

    asyncio.run(main())
