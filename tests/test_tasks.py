"""MCP tasks (2025-11-25): created, polled, finished; cancelled; failed; listed; outliving a disconnect.

The official Python client has no task helpers, so the tests send the spec's
requests through its session (`send_request` with the SDK's own request and
result types), on a connection negotiated with the classic handshake
(`mode="legacy"`, protocol 2025-11-25)."""

from __future__ import annotations

import asyncio
import time

import httpx2
import mcp_types as mt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict

from tests.helpers import make_settings
from tests.tooling import TEST_TOOLS
from tools.base import ToolError, ToolOutput, ToolSpec
from mcp_server.app import build_server


class _FailIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _FailOut(BaseModel):
    ok: bool


def _fail(args, ctx):
    ctx.report(1, 2, "half way")
    raise ToolError("the model file is corrupt")


FAIL = ToolSpec("test_fail_late", "fail", "fails after a step", _FailIn, _FailOut, _fail, execution="device",
                long_running=True)


async def create(c: Client, name: str, args: dict, ttl: int | None = 60_000) -> mt.CreateTaskResult:
    # the SDK's session checks a tools/call answer against CallToolResult, which has no task arm, so the
    # request goes through the same session's dispatcher (the official client's transport, unvalidated)
    params = mt.CallToolRequestParams(name=name, arguments=args, task=mt.TaskMetadata(ttl=ttl))
    raw = await c.session._dispatcher.send_raw_request(
        "tools/call", params.model_dump(by_alias=True, mode="json", exclude_none=True),
        {"timeout": 60})
    return mt.CreateTaskResult.model_validate(raw, by_name=False)


async def get(c: Client, task_id: str) -> mt.GetTaskResult:
    return await c.session.send_request(mt.GetTaskRequest(params=mt.GetTaskRequestParams(task_id=task_id)),
                                        mt.GetTaskResult)


async def result(c: Client, task_id: str) -> mt.CallToolResult:
    req = mt.GetTaskPayloadRequest(params=mt.GetTaskPayloadRequestParams(task_id=task_id))
    return await c.session.send_request(req, mt.CallToolResult)


async def cancel(c: Client, task_id: str) -> mt.CancelTaskResult:
    return await c.session.send_request(mt.CancelTaskRequest(params=mt.CancelTaskRequestParams(task_id=task_id)),
                                        mt.CancelTaskResult)


async def listing(c: Client, cursor: str | None = None) -> mt.ListTasksResult:
    req = mt.ListTasksRequest(params=mt.PaginatedRequestParams(cursor=cursor) if cursor else None)
    return await c.session.send_request(req, mt.ListTasksResult)


async def wait_status(c: Client, task_id: str, want: set[str], timeout: float = 60) -> mt.GetTaskResult:
    t0 = time.monotonic()
    while True:
        t = await get(c, task_id)
        if t.status in want:
            return t
        assert time.monotonic() - t0 < timeout, f"task {task_id} still {t.status}"
        await asyncio.sleep(0.05)


def test_task_lifecycle_in_memory(tmp_path):
    server = build_server(make_settings(tmp_path), extra_specs=[*TEST_TOOLS, FAIL])

    async def main():
        async with Client(server, mode="legacy") as c:
            assert c.protocol_version == "2025-11-25"
            caps = c.server_capabilities.tasks
            assert caps is not None and caps.list is not None and caps.cancel is not None
            assert caps.requests.tools.call is not None
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert tools["test_steps"].execution.task_support == "optional"
            assert tools["engine_status"].execution is None  # not long-running: no tasks

            # created at once, polled, finished
            t0 = time.monotonic()
            created = await create(c, "test_steps", {"steps": 20, "step_s": 0.05})
            assert time.monotonic() - t0 < 20 * 0.05  # answered before the work is done
            task = created.task
            assert task.status == "working" and task.ttl == 60_000 and task.poll_interval
            # progress is tied to the task: tasks/get carries it while the work runs
            messages = set()
            while (t := await get(c, task.task_id)).status == "working":
                messages.add(t.status_message)
                await asyncio.sleep(0.03)
            assert any(m.startswith("running, ") and "/20: step " in m for m in messages), messages
            done = await wait_status(c, task.task_id, {"completed"})
            assert done.status_message == "completed" and done.last_updated_at >= done.created_at
            res = await result(c, task.task_id)
            assert not res.is_error and res.structured_content["done_steps"] == 20
            assert res.meta["io.modelcontextprotocol/related-task"] == {"taskId": task.task_id}
            # the same work is a job: job_status sees it
            js = await c.call_tool("job_status", {"job_id": task.task_id})
            assert js.structured_content["status"] == "done"

            # cancelled: sticky, the work stops at its next step, result says so
            long = (await create(c, "test_steps", {"steps": 2000, "step_s": 0.01})).task
            await wait_status(c, long.task_id, {"working"})
            await asyncio.sleep(0.1)
            cancelled = await cancel(c, long.task_id)
            assert cancelled.status == "cancelled"
            assert (await get(c, long.task_id)).status == "cancelled"
            res = await result(c, long.task_id)
            assert res.is_error and "cancel" in res.content[0].text
            with pytest.raises(MCPError, match="already cancelled"):
                await cancel(c, long.task_id)
            js = await c.call_tool("job_status", {"job_id": long.task_id})
            assert js.structured_content["status"] == "cancelled"

            # a tool that fails: failed, its error in the message and the result
            bad = (await create(c, "test_fail_late", {})).task
            failed = await wait_status(c, bad.task_id, {"failed"})
            assert "the model file is corrupt" in failed.status_message
            res = await result(c, bad.task_id)
            assert res.is_error and "the model file is corrupt" in res.content[0].text

            # listed, newest first
            listed = await listing(c)
            assert [t.task_id for t in listed.tasks] == [bad.task_id, long.task_id, task.task_id]
            assert listed.next_cursor is None

            # bad requests
            with pytest.raises(MCPError, match="no such task"):
                await get(c, "nope")
            with pytest.raises(MCPError, match="cannot run as a task"):
                await create(c, "engine_status", {})
            bad_args = await c.session._dispatcher.send_raw_request("tools/call", {
                "name": "test_steps", "arguments": {"steps": -1}, "task": {}}, {"timeout": 60})
            assert bad_args["isError"] and "steps" in bad_args["content"][0]["text"]

        # a modern (2026-07-28) connection is not offered tasks; plain calls work as before
        async with Client(server) as c:
            assert c.server_capabilities.tasks is None
            r = await c.call_tool("test_steps", {"steps": 2, "step_s": 0.0})
            assert r.structured_content["done_steps"] == 2

    try:
        asyncio.run(main())
    finally:
        server.state.close()


def test_task_outlives_its_connection_and_is_scoped_to_its_client(http_server):  # noqa: F811
    token = "task-token-123"
    port, _ = http_server("http", ATELIER_HTTP__AUTH_TOKEN=token)
    url = f"http://127.0.0.1:{port}/mcp"

    def client(tok: str | None) -> Client:
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=30)),
                      mode="legacy")

    async def main():
        async with client(token) as c:
            task = (await create(c, "test_steps", {"steps": 30, "step_s": 0.05})).task
        # the connection (and its MCP session) is gone; the task goes on
        await asyncio.sleep(0.3)
        async with client(token) as c2:  # a new connection with the same credentials
            t = await get(c2, task.task_id)
            assert t.status in ("working", "completed")
            res = await result(c2, task.task_id)
            assert res.structured_content["done_steps"] == 30
            assert task.task_id in [x.task_id for x in (await listing(c2)).tasks]

    asyncio.run(main())
    # without the token the server answers 401 before any task is looked up
    r = httpx2.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tasks/list"},
                    headers={"Accept": "application/json, text/event-stream"})
    assert r.status_code == 401


def test_tasks_are_scoped_to_their_session_without_a_token(http_server):  # noqa: F811
    port, _ = http_server("http")
    url = f"http://127.0.0.1:{port}/mcp"

    async def main():
        async with Client(url, mode="legacy") as a, Client(url, mode="legacy") as b:
            task = (await create(a, "test_steps", {"steps": 5, "step_s": 0.01})).task
            with pytest.raises(MCPError, match="no such task"):
                await get(b, task.task_id)
            with pytest.raises(MCPError, match="no such task"):
                await cancel(b, task.task_id)
            assert (await listing(b)).tasks == []
            assert (await result(a, task.task_id)).structured_content["done_steps"] == 5

    asyncio.run(main())


class _PartialIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = 500


class _PartialOut(BaseModel):
    done_steps: int
    finish_reason: str


def _partial(args, ctx):
    done = 0
    for i in range(args.steps):
        if ctx.cancel_token().cancelled:  # like generate_text: stop and return what there is
            return ToolOutput(text=f"stopped after {done}", structured=_PartialOut(done_steps=done,
                                                                                  finish_reason="cancelled"))
        time.sleep(0.02)
        done = i + 1
        ctx.report(done, args.steps, f"step {done}")
    return ToolOutput(text="all done", structured=_PartialOut(done_steps=done, finish_reason="length"))


PARTIAL = ToolSpec("test_partial", "partial", "returns what it has when cancelled", _PartialIn, _PartialOut,
                   _partial, execution="device", long_running=True)


def test_a_cancelled_job_reads_cancelled_and_a_queued_one_says_queued(tmp_path):
    server = build_server(make_settings(tmp_path, limits={"deadline_s": 0.3}), extra_specs=[*TEST_TOOLS, PARTIAL])

    async def main():
        async with Client(server) as c:
            first = await c.call_tool("test_partial", {})
            job = first.structured_content["job_id"]
            assert first.structured_content["status"] == "running" and "is still running" in first.content[0].text
            # a second device call waits behind the first: its reply and its status both say queued
            second = await c.call_tool("test_steps", {"steps": 2, "step_s": 0.01})
            assert second.structured_content["status"] == "queued"
            assert "is still queued behind other work" in second.content[0].text
            await c.call_tool("job_cancel", {"job_id": job})
            for _ in range(200):
                st = await c.call_tool("job_status", {"job_id": job})
                if st.structured_content["status"] != "running":
                    break
                await asyncio.sleep(0.05)
            # the tool returned normally with its partial result; the job still reads cancelled
            assert st.structured_content["status"] == "cancelled"
            assert st.structured_content["result"]["finish_reason"] == "cancelled"
            assert st.content[0].text.startswith(f"job {job} (test_partial): cancelled")

    try:
        asyncio.run(main())
    finally:
        server.state.close()
