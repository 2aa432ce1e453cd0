"""MCP tasks (SEP-1686, protocol revision 2025-11-25) on top of the job manager.

A client that sends `tools/call` with a `task` field for a long-running tool
gets a `CreateTaskResult` at once; the work runs as a job (`mcp_server/jobs.py`,
the same jobs `job_status` / `job_cancel` see) that is detached from the
request from the start, so neither the deadline nor a closed connection stops
it. Then:

- `tasks/get {taskId}`: the task (status, message, timestamps, ttl, poll interval);
- `tasks/result {taskId}`: waits until the task is terminal, then answers the
  `CallToolResult` the plain call would have answered, with
  `_meta["io.modelcontextprotocol/related-task"] = {taskId}`;
- `tasks/list`: the caller's tasks, newest first, `nextCursor` paging;
- `tasks/cancel {taskId}`: asks the work to stop at its next step; the task
  reads `cancelled` from then on (cancellation is sticky); a terminal task
  cannot be cancelled (invalid params).

Statuses: a queued or running job is `working` (its message says which, and
the progress); a finished job is `completed`, a job whose tool failed is
`failed` (the result carries the error, `isError`), a cancelled one
`cancelled`. `input_required` is never used: no tool asks the client for input.

Tasks are owned like jobs (`mcp_server/clients.py`): over HTTP only the client
that created a task sees it; with `http.auth_token` a new connection with the
same token reaches it again. A task is kept for its `ttl` (the client's
`task.ttl`, at most `limits.job_ttl_s`) after it was created.

Capability: `capabilities.tasks = {list, cancel, requests.tools.call}` on
2025-11-25 connections; each long-running tool's `execution.taskSupport` is
`optional` in `tools/list`. The 2026-07-28 revision moves tasks into an
extension (SEP-2663) whose wire shape the installed SDK does not model, so on
2026-07-28 connections tasks are not offered and `job_status` / `job_cancel`
remain the way to follow long work.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

import mcp_types as mt
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS
from pydantic import ValidationError

from .jobs import Job
from .state import StateUnavailable

if TYPE_CHECKING:
    from .app import AtelierServer

log = logging.getLogger("atelier.tasks")

RELATED_TASK = "io.modelcontextprotocol/related-task"
TASK_PROTOCOL_VERSIONS = frozenset({"2025-11-25"})
POLL_INTERVAL_MS = 1000
PAGE = 50


def offered(protocol_version: str | None) -> bool:
    return protocol_version in TASK_PROTOCOL_VERSIONS


def capability() -> mt.ServerTasksCapability:
    return mt.ServerTasksCapability(
        list=mt.TasksListCapability(), cancel=mt.TasksCancelCapability(),
        requests=mt.ServerTasksRequestsCapability(tools=mt.TasksToolsCapability(call=mt.TasksCallCapability())))


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_of(job: Job) -> str:
    if job.cancel_requested or job.state == "cancelled":
        return "cancelled"
    return {"done": "completed", "error": "failed"}.get(job.state, "working")


def task_of(job: Job) -> dict[str, Any]:
    snap = job.snapshot()
    status = status_of(job)
    if status == "working":
        message = snap["status"] + (f", {snap['progress']:.0f}/{snap['total']:.0f}" if snap["total"] else "") \
            + (f": {snap['message']}" if snap["message"] else "")
    elif status == "failed":
        message = job.error or "failed"
    elif status == "cancelled":
        message = "cancelled" + (f": {job.error}" if job.error else "")
    else:
        message = "completed"
    return {"taskId": job.id, "status": status, "statusMessage": message[:500],
            "createdAt": _iso(job.created), "lastUpdatedAt": _iso(job.updated),
            "ttl": int(job.ttl_s * 1000), "pollInterval": POLL_INTERVAL_MS}


def _dump(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"result_type"})


def _state_errors(handler: Any) -> Any:
    """issue 15: the shared state (Redis) unreachable answers an internal error naming state.redis_url."""

    async def wrapped(ctx: Any, params: Any) -> Any:
        try:
            return await handler(ctx, params)
        except StateUnavailable as exc:
            raise MCPError(code=INTERNAL_ERROR, message=str(exc)) from None

    return wrapped


def _unknown(task_id: str) -> MCPError:
    return MCPError(code=INVALID_PARAMS, message=f"taskId={task_id!r}: no such task (unknown, or expired)")


class Tasks:
    """The four `tasks/*` methods and task creation for one server."""

    def __init__(self, server: AtelierServer) -> None:
        self.server = server
        self.state = server.state

    def register(self) -> None:
        low = self.server._lowlevel_server
        low.middleware.append(self.middleware)
        low.add_request_handler("tasks/get", mt.GetTaskRequestParams, _state_errors(self._get))
        low.add_request_handler("tasks/result", mt.GetTaskPayloadRequestParams, _state_errors(self._result))
        low.add_request_handler("tasks/list", mt.PaginatedRequestParams, _state_errors(self._list))
        low.add_request_handler("tasks/cancel", mt.CancelTaskRequestParams, _state_errors(self._cancel))

    def _job(self, ctx: Any, task_id: str) -> Job:
        job = self.state.jobs.get(task_id, self.server._caller(ctx))
        if job is None or not job.is_task:
            raise _unknown(task_id)
        return job

    # -- creation: a middleware, because the tools/call result surface has no CreateTaskResult arm ----
    async def middleware(self, ctx: Any, call_next: Any) -> Any:
        """Task-augmented `tools/call` (2025-11-25): answer a CreateTaskResult and run the call as a task.
        Everything else, and task requests on other protocol versions, goes on unchanged."""
        params = ctx.params
        if (ctx.method != "tools/call" or not offered(ctx.protocol_version) or not isinstance(params, dict)
                or params.get("task") is None):
            return await call_next(ctx)
        try:
            call = mt.CallToolRequestParams.model_validate(params, by_name=False)
        except ValidationError as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"invalid tools/call params: {exc.errors()[0]['msg']}") \
                from None
        spec = self.state.specs.get(call.name)
        if spec is None or not spec.long_running:
            why = "no such tool" if spec is None else "its execution.taskSupport is forbidden; call it without task"
            raise MCPError(code=INVALID_PARAMS, message=f"name={call.name!r}: cannot run as a task ({why})")
        try:
            args = spec.input_model.model_validate(call.arguments or {})
        except ValidationError as exc:
            from .app import _validation_message

            return _dump(mt.CallToolResult(content=[mt.TextContent(type="text", text=_validation_message(
                call.name, exc))], is_error=True))
        from mcp.server.mcpserver import Context

        context = Context(request_context=ctx, mcp_server=self.server, input_params=call)
        ttl = call.task.ttl if call.task is not None else None
        try:
            created = self.create(spec, args, context, ttl)
        except StateUnavailable as exc:  # issue 15: the shared state (Redis) could not record the task
            raise MCPError(code=INTERNAL_ERROR, message=str(exc)) from None
        log.info("task created", extra={"event": "task_created", "tool": call.name, "task_id": created.task.task_id})
        return _dump(created)

    def create(self, spec: Any, args: Any, context: Any, ttl_ms: int | None) -> mt.CreateTaskResult:
        from engine.scheduler import CancelToken

        server = self.server
        caller = server._caller(context)
        limit_s = self.state.settings.limits.job_ttl_s
        ttl_s = limit_s if ttl_ms is None else max(1.0, min(limit_s, ttl_ms / 1000.0))
        token = CancelToken()
        job = self.state.jobs.create(spec.name, token, owner=caller)
        try:
            job.is_task, job.ttl_s, job.detached = True, ttl_s, True  # detached last: a shared job publishes then
        except StateUnavailable:  # issue 15: Redis unreachable, the task could not be recorded
            self.state.jobs.forget(job)
            raise
        loop = asyncio.get_running_loop()
        last = [0.0]
        held: list[tuple[float, float | None, str | None] | None] = [None]  # newest throttled report

        def on_progress(progress: float, total: float | None, message: str | None) -> None:
            job.updated = time.time()
            if job.state == "queued":
                job.state = "running"
            now = time.monotonic()
            if now - last[0] < 0.1 and not (total is not None and progress >= total):
                held[0] = (progress, total, message)
                return
            last[0], held[0] = now, None
            if context.request_context.meta is None or context.request_context.meta.progress_token is None:
                return
            try:  # the request's progress token stays valid for the task's lifetime, while the session lives
                fut = asyncio.run_coroutine_threadsafe(context.report_progress(progress, total, message), loop)
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            except Exception:
                pass

        token.add_listener(on_progress)
        try:
            fut = server._submit(spec, args, token, caller)
        except Exception as exc:
            self.state.jobs.forget(job)
            res, _ = server._map_error(exc, spec.name)
            raise MCPError(code=INVALID_PARAMS, message=res.content[0].text) from None
        job.future = fut

        def finished(f: Any) -> None:
            token.remove_listener(on_progress)
            if held[0] is not None:  # the final state of a fast task is not lost to the throttle
                last[0] = 0.0
                on_progress(*held[0])
            server._finish_job(job, f)

        fut.add_done_callback(finished)
        return mt.CreateTaskResult(task=mt.Task.model_validate(task_of(job)))

    # -- methods ----------------------------------------------------------------------------------
    async def _get(self, ctx: Any, params: mt.GetTaskRequestParams) -> mt.GetTaskResult:
        return mt.GetTaskResult.model_validate(task_of(self._job(ctx, params.task_id)))

    async def _result(self, ctx: Any, params: mt.GetTaskPayloadRequestParams) -> mt.CallToolResult:
        job = self._job(ctx, params.task_id)
        while job.state not in ("done", "error", "cancelled"):
            await asyncio.sleep(0.05)
            job = self.state.jobs.fresh(job)  # issue 15: a task running on another replica is re-read
        res = job.result
        if not isinstance(res, mt.CallToolResult):
            res = mt.CallToolResult(content=[mt.TextContent(type="text", text=job.error or job.state)],
                                    is_error=job.state != "done")
        meta = dict(res.meta or {})
        meta[RELATED_TASK] = {"taskId": job.id}
        return res.model_copy(update={"meta": meta})

    async def _list(self, ctx: Any, params: mt.PaginatedRequestParams | None) -> mt.ListTasksResult:
        caller = self.server._caller(ctx)
        jobs = sorted((j for j in self.state.jobs.visible(caller) if j.is_task), key=lambda j: -j.created)
        start = 0
        cursor = getattr(params, "cursor", None) if params is not None else None
        if cursor:
            try:
                start = int(cursor)
            except ValueError:
                raise MCPError(code=INVALID_PARAMS, message=f"cursor={cursor!r}: not a cursor this server "
                                                            f"gave") from None
        page = jobs[start:start + PAGE]
        nxt = str(start + PAGE) if start + PAGE < len(jobs) else None
        return mt.ListTasksResult(tasks=[mt.Task.model_validate(task_of(j)) for j in page], next_cursor=nxt)

    async def _cancel(self, ctx: Any, params: mt.CancelTaskRequestParams) -> mt.CancelTaskResult:
        job = self._job(ctx, params.task_id)
        status = status_of(job)
        if status != "working":
            raise MCPError(code=INVALID_PARAMS, message=f"taskId={job.id!r}: the task is already {status}; "
                                                        f"only a working task can be cancelled")
        self.state.jobs.request_cancel(job, "cancelled by tasks/cancel")  # issue 15: on whichever replica runs it
        return mt.CancelTaskResult.model_validate(task_of(job))
