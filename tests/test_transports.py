"""Real transports: a stdio subprocess with the official client (and a library
printing to stdout mid-call), streamable HTTP and SSE on 127.0.0.1 with an
ephemeral port, Host/Origin validation, bearer tokens, the body limit, and
the refusal to listen on a non-loopback address without a token."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import httpx
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client

from tests.helpers import PY, ROOT, free_port, server_env, wait_port  # noqa: F401  (others import them from here)
from tests.zygote import run as zrun


def test_stdio_subprocess_with_official_client_and_noisy_library(tmp_path):
    async def main():
        params = StdioServerParameters(command=PY, args=[str(ROOT / "tests" / "tooling.py"), "stdio"],
                                       env=server_env(tmp_path), cwd=str(tmp_path))
        async with Client(params) as c:
            names = [t.name for t in (await c.list_tools()).tools]
            assert "engine_status" in names and "test_noisy" in names
            r = await c.call_tool("test_noisy", {})
            assert not r.is_error and r.structured_content == {"message": "printed"}
            # the stream is still valid protocol after the prints
            r2 = await c.call_tool("engine_status", {})
            assert r2.structured_content["device"] == "cpu"
            r3 = await c.call_tool("test_steps", {"steps": 3, "step_s": 0.01})
            assert r3.structured_content["done_steps"] == 3

    asyncio.run(main())


def test_stdio_stdout_is_only_protocol(tmp_path):
    """Raw JSON-RPC over a pipe: every stdout line must parse as JSON-RPC. A cold start (a plain
    subprocess, not tests/zygote.py's fork): what the imports print counts too."""
    proc = subprocess.Popen([PY, str(ROOT / "tests" / "tooling.py"), "stdio"], env=server_env(tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    msgs = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "test_noisy", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
    ]
    import threading

    lines: list[str] = []
    got_all = threading.Event()

    def reader():
        for raw in proc.stdout:
            lines.append(raw.decode())
            ids_now = {json.loads(x).get("id") for x in lines if x.strip()}
            if {1, 2, 3} <= ids_now:
                got_all.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for m in msgs:
        proc.stdin.write((json.dumps(m) + "\n").encode())
        proc.stdin.flush()
    assert got_all.wait(60), f"no answer to every request: {lines}"
    proc.stdin.close()  # EOF: the server shuts down
    try:
        proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(5)
    lines = [ln for ln in lines if ln.strip()]
    parsed = [json.loads(ln) for ln in lines]
    assert all(p.get("jsonrpc") == "2.0" for p in parsed)
    ids = {p.get("id") for p in parsed}
    assert {1, 2, 3} <= ids
    assert b"library chatter" in err and b"raw chatter" in err
    # stdin EOF shut the server down cleanly, with a last log line
    assert proc.returncode == 0
    last = [ln for ln in err.decode().splitlines() if ln.startswith("{")][-1]
    assert json.loads(last)["msg"] == "server stopped"


def test_streamable_http_roundtrip_and_security(http_server):
    port, _ = http_server("http")
    url = f"http://127.0.0.1:{port}/mcp"

    async def main():
        async with Client(url) as c:
            names = [t.name for t in (await c.list_tools()).tools]
            assert "test_steps" in names
            r = await c.call_tool("test_steps", {"steps": 2, "step_s": 0.01})
            assert r.structured_content["done_steps"] == 2

    asyncio.run(main())
    hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    r = httpx.post(url, headers={**hdrs, "Origin": "http://evil.example"}, content=body)
    assert r.status_code == 403
    r = httpx.post(url, headers={**hdrs, "Host": "evil.example"}, content=body)
    assert r.status_code == 421
    r = httpx.post(url, headers={**hdrs, "Host": f"attacker.test:{port}"}, content=body)
    assert r.status_code == 421
    r = httpx.post(url, headers=hdrs, content=b"x" * (33 * 1024 * 1024))
    assert r.status_code == 413


def test_http_bearer_token(http_server):
    port, _ = http_server("http", ATELIER_HTTP__AUTH_TOKEN="s3cret-token")
    url = f"http://127.0.0.1:{port}/mcp"
    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
    hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    assert httpx.post(url, headers=hdrs, content=init).status_code == 401
    assert httpx.post(url, headers={**hdrs, "Authorization": "Bearer wrong"}, content=init).status_code == 401
    ok = httpx.post(url, headers={**hdrs, "Authorization": "Bearer s3cret-token"}, content=init)
    assert ok.status_code == 200


def test_sse_transport_roundtrip(http_server):
    port, _ = http_server("sse")

    async def main():
        async with Client(sse_client(f"http://127.0.0.1:{port}/sse")) as c:
            names = [t.name for t in (await c.list_tools()).tools]
            assert "engine_status" in names
            r = await c.call_tool("engine_status", {})
            assert r.structured_content["device"] == "cpu"

    asyncio.run(main())
    r = httpx.get(f"http://127.0.0.1:{port}/sse", headers={"Host": "evil.example"}, timeout=5)
    assert r.status_code == 421


def test_refuses_non_loopback_without_token(tmp_path):
    env = server_env(tmp_path)
    proc = zrun([PY, "-m", "mcp_server.cli", "serve", "--transport", "http", "--host", "0.0.0.0",
                           "--port", str(free_port())], env=env, capture_output=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert b"http.host='0.0.0.0'" in proc.stderr and b"auth_token" in proc.stderr


def test_invalid_config_refuses_to_start(tmp_path):
    env = server_env(tmp_path, ATELIER_LIMITS__QUEUE_LENGTH="zero")
    proc = zrun([PY, "-m", "mcp_server.cli", "serve"], env=env, capture_output=True, timeout=60,
                cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert b"limits.queue_length" in proc.stderr


def test_sigterm_with_call_in_flight_exits_quickly(http_server):
    port, proc = http_server("http")
    url = f"http://127.0.0.1:{port}/mcp"

    async def start_long():
        async with Client(url) as c:
            await c.call_tool("test_steps", {"steps": 2000, "step_s": 0.05})

    async def main():
        task = asyncio.create_task(start_long())
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 15:
            await asyncio.sleep(0.1)
        task.cancel()
        return time.time() - t0

    elapsed = asyncio.run(main())
    assert proc.poll() is not None, "server did not exit after SIGTERM"
    assert elapsed < 10
    err = proc.stderr.read().decode()
    last = [ln for ln in err.splitlines() if ln.startswith("{")][-3:]
    assert "server stopped" in [json.loads(ln)["msg"] for ln in last], err[-3000:]


def test_http_client_cancel_frees_the_worker(http_server):
    port, _ = http_server("http")
    url = f"http://127.0.0.1:{port}/mcp"

    async def long_call():
        async with Client(url) as c:
            await c.call_tool("test_steps", {"steps": 2000, "step_s": 0.05})

    async def main():
        task = asyncio.create_task(long_call())
        await asyncio.sleep(1.5)
        async with Client(url) as c:
            st = await c.call_tool("engine_status", {})
            assert st.structured_content["worker_busy"] is True
            task.cancel()  # the client gives up: cancels the request and closes its stream
            with __import__("contextlib").suppress(BaseException):
                await task
            busy = True
            for _ in range(50):
                st = await c.call_tool("engine_status", {})
                busy = st.structured_content["worker_busy"]
                if not busy:
                    break
                await asyncio.sleep(0.1)
            assert busy is False, "the work kept running after the client went away"
            r = await c.call_tool("test_steps", {"steps": 1, "step_s": 0})
            assert r.structured_content["done_steps"] == 1

    asyncio.run(main())
