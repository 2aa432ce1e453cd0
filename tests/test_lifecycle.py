"""Issue 16.3: one lifecycle. The MCP lifespan holds the server state while a transport serves it; the last
holder to leave closes it (jobs cancelled, engine services stopped, pool shut) when the transport asked for
that (stdio, HTTP); SSE-style lifespans (one per connection) never close it while another is open."""

from __future__ import annotations

import anyio
import pytest
import torch
from mcp import Client

from mcp_server.app import build_server
from tests.helpers import make_settings


class _Service:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _server(tmp_path):
    server = build_server(make_settings(tmp_path))
    svc = server.state.engine.service("lifecycle-probe", lambda _e: _Service())
    return server, svc


def test_lifespan_end_closes_the_state_and_engine_services_when_asked(tmp_path):
    server, svc = _server(tmp_path)
    server.state.close_when_idle = True

    async def go():
        async with Client(server) as c:
            await c.list_tools()
            assert not server.state.closed
    anyio.run(go)
    assert server.state.closed and svc.closed == 1
    assert server.state.pool._shutdown


def test_in_process_users_keep_the_state_until_they_close_it(tmp_path):
    server, svc = _server(tmp_path)

    async def go():
        async with Client(server) as c:
            await c.list_tools()
    try:
        anyio.run(go)
        assert not server.state.closed and svc.closed == 0
        anyio.run(go)  # a second connection still finds a live engine
    finally:
        server.state.close()
    assert svc.closed == 1
    server.state.close()  # idempotent
    assert svc.closed == 1


def test_per_connection_lifespans_close_only_after_the_last(tmp_path):
    server, svc = _server(tmp_path)
    server.state.close_when_idle = True
    server.state.hold()  # the serving app's own hold (serve_http does this)

    async def go():
        async with Client(server) as a, Client(server) as b:
            await a.list_tools()
            await b.list_tools()
        assert not server.state.closed  # both connections ended, the app still holds it
        async with Client(server) as c:
            await c.list_tools()
    anyio.run(go)
    assert not server.state.closed
    server.state.let_go()  # the app stops
    assert server.state.closed and svc.closed == 1


def test_the_engine_is_built_in_the_lifespan_and_closed_in_its_finally(tmp_path):
    server = build_server(make_settings(tmp_path))
    state = server.state
    state.close_when_idle = True
    assert not state.engine_built  # building the server starts no engine (no scheduler thread, no registry)
    seen = {}

    async def go():
        async with Client(server) as c:
            seen["built_while_served"] = state.engine_built
            seen["device"] = (await c.call_tool("engine_status", {})).structured_content["device"]
            seen["scheduler_alive"] = state.engine.scheduler is not None and not state.closed
    anyio.run(go)
    assert seen == {"built_while_served": True, "device": "cpu", "scheduler_alive": True}
    assert state.closed  # the lifespan's finally closed it (engine services: test_lifespan_end_closes_...)


def test_a_state_closed_before_any_call_never_builds_an_engine(tmp_path):
    server = build_server(make_settings(tmp_path))
    server.state.close()
    assert not server.state.engine_built and server.state.closed
    with pytest.raises(RuntimeError, match="closed"):
        server.state.engine  # noqa: B018 - a late caller after shutdown gets an error, not a new engine
    assert not server.state.engine_built


def test_a_configuration_naming_a_missing_device_fails_before_serving(tmp_path):
    # a device this machine lacks: CUDA here; on a CUDA machine MPS (Apple only, never beside CUDA)
    bad, words = ("mps", "MPS is not available") if torch.cuda.is_available() else ("cuda", "no CUDA device")
    with pytest.raises(ValueError, match=words):
        build_server(make_settings(tmp_path, engine={"device": bad}))
