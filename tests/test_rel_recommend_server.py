"""Issue 17 item 1 through the MCP server (in-memory client): the probe's two findings, end to end.

- 6 concurrent calls with `filters: {"price": {"min": <400-digit integer>}}` and 6 plain ones: every
  plain one succeeds with the NumPy brute-force answer, every bad one is an error naming
  `filters.price.min` and the rule (before the fix: "internal error" for the bad ones and for plain
  ones that shared their batch);
- `catalog_upsert` of an item whose `price` is a 400-digit integer is refused naming `items[0].price`,
  and the README's `{"price": {"max": 30}}` keeps working (before: "1 added", then every such query
  failed).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from mcp import Client

from mcp_server.app import build_server
from tests.helpers import make_settings

HUGE = 10 ** 400


def test_bad_filters_and_poison_upserts_reach_no_other_client(tmp_path: Path) -> None:
    s = make_settings(tmp_path)
    rng = np.random.default_rng(9)
    mat = np.zeros((40, 5))
    mat[np.arange(40), rng.integers(0, 5, 40)] = rng.integers(1, 5, 40) * rng.choice([-1.0, 1.0], 40)
    rows = [{"id": f"p{i}", "category": "xy"[i % 2], "price": int(rng.integers(0, 60))} for i in range(40)]
    cat = tmp_path / "data" / "shop.jsonl"
    cat.write_text("".join(json.dumps({**r, "embedding": mat[i].tolist()}) + "\n" for i, r in enumerate(rows)),
                   encoding="utf-8")
    q = np.array([2.0, -1.0, 0.0, 1.0, 3.0])
    m = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    order = np.lexsort((np.arange(40), -(m @ (q / np.linalg.norm(q)))))
    want = [rows[r]["id"] for r in order if rows[r]["price"] <= 30][:4]
    plain = {"vector": q.tolist(), "k": 4, "filters": {"price": {"max": 30}}, "catalog": str(cat)}
    bad = {**plain, "filters": {"price": {"min": HUGE}}}

    async def main() -> None:
        server = build_server(s)
        try:
            async with Client(server) as c:
                first = await c.call_tool("recommend_topk", plain)
                assert not first.is_error, first.content[0].text
                calls = [c.call_tool("recommend_topk", bad if i % 2 else plain) for i in range(12)]
                results = await asyncio.gather(*calls)
                for i, r in enumerate(results):
                    text = r.content[0].text
                    if i % 2:
                        assert r.is_error and text.startswith("filters.price.min=<integer of 401 digits>: "), text
                        assert "internal error" not in text
                    else:
                        assert not r.is_error, text
                        assert [it["id"] for it in r.structured_content["items"]] == want
                up = await c.call_tool("catalog_upsert", {"items": [{"id": "poison", "category": "x",
                                                                     "price": HUGE, "embedding": q.tolist()}],
                                                          "catalog": str(cat)})
                assert up.is_error and up.content[0].text.startswith("items[0].price=<integer of 401 digits>: ")
                again = await c.call_tool("recommend_topk", plain)
                assert not again.is_error, again.content[0].text
                assert [it["id"] for it in again.structured_content["items"]] == want
                info = await c.call_tool("catalog_info", {"catalog": str(cat)})
                assert info.structured_content["rows"] == 40
        finally:
            server.state.close()

    asyncio.run(main())
