"""The MCP application: tool registration, the call pipeline, resources and jobs.

`build_server(settings)` returns an `AtelierServer` (an `MCPServer`) whose
tools come from `tools.load_specs()` filtered by `tools.enabled/disabled`
(a tool that is not enabled is neither listed nor callable) plus the
server-level `job_status` / `job_cancel`.

The call pipeline, for every tool:
1. validate the arguments against the tool's pydantic input model;
2. log `start` (request id, tool, argument sizes — never content);
3. run `spec.run` on a worker thread: the engine's device worker for
   `execution="device"` (bounded queue: a full queue answers "busy" at once),
   a bounded thread pool otherwise; images are saved and delivered there too;
4. forward progress to the client (`notifications/progress`) and to job status;
5. a long-running call still running at the deadline returns a job id;
   a client cancel (`notifications/cancelled`), a closed HTTP exchange
   (`mcp_server/disconnect.py`) or an ended session (SSE stream closed,
   streamable HTTP DELETE) cancels the work, which stops at its next step —
   unless the call has already become a job;
6. map errors to tool errors a model can read; tracebacks stay in the log;
7. log `end` with duration_ms and the outcome.

Images and jobs belong to the client that made them (`mcp_server/clients.py`);
`resources/list`, `resources/read`, `image://` inputs, `job_status` and
`job_cancel` answer only their owner.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import threading
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as mt
from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import Engine, EngineConfig
from engine.device import select_device, select_dtype
from engine.errors import (Busy, Cancelled, EngineError, InsufficientMemory, InvalidInput, ModelTooLarge,
                           ModelUnavailable)
from engine.registry import free_memory, is_oom
from engine.scheduler import CancelToken
from tools import load_specs
from tools.base import ToolError, ToolOutput, ToolSpec

from . import __version__
from .clients import LOCAL, client_of, http_request
from .config import Settings
from .fit import fit_result
from .disconnect import ExchangeWatch, exchange_watch
from .jobs import Job, JobManager
from .logs import request_id, set_third_party_level, setup_logging, summarize_args
from .media import EXPIRED, MediaStore
from .pool import FixedPool
from .sandbox import NO_SPACE_ERRNOS, Sandbox
from .state import StateUnavailable, open_shared_state, stateless_caller  # issue 15 (h2)
from .tasks import Tasks
from .tasks import capability as tasks_capability
from .tasks import offered as tasks_offered

log = logging.getLogger("atelier.server")

INSTRUCTIONS = (
    "atelier-mcp runs AI operations on a local engine: text generation, recommendations, image "
    "generation and detailing, colour difference and mask edits. Long calls report progress; if one "
    "outlasts the deadline it returns a job_id: poll job_status(job_id) and cancel with job_cancel. "
    "Images are returned as a thumbnail plus an image:// link to the full file."
)

INLINE_THREADS = 4  # the inline tools' threads: they answer in milliseconds, a few threads serve any load
_LEVELS = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]


# --------------------------------------------------------------------------- state
@dataclass
class AppState:
    settings: Settings
    engine_config: EngineConfig  # the engine itself is built by `open()`: in the MCP lifespan when served
    sandbox: Sandbox
    media: MediaStore
    jobs: JobManager
    specs: dict[str, ToolSpec]
    pool: FixedPool  # tool calls that run on a thread (not the device worker)
    inline: FixedPool  # inline tools (engine_status, a colour pair...): never queued behind the pool's calls
    thread_slots: threading.BoundedSemaphore
    client_log_levels: dict[int, str] = field(default_factory=dict)  # open connection -> level
    closed: bool = False
    shared: Any = None  # issue 15 (h2): RedisState with state.backend = "redis", else None

    # the lifecycle (issue 16.3): the MCP lifespan holds the state while a transport serves it; when the
    # last holder lets go and the transport asked for it (`close_when_idle`, set by `serve_stdio` and
    # `serve_http`), the state (jobs, engine and its services, pool) is closed there, in the lifespan's
    # `finally`. In-process users (tests, embedding) leave it False and call `close()` themselves.
    close_when_idle: bool = False
    _holders: int = 0
    _holders_lock: threading.Lock = field(default_factory=threading.Lock)
    _engine: Engine | None = None
    _engine_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def engine(self) -> Engine:
        """The engine: built when the MCP lifespan is first entered (`open`); an in-process user that never
        enters it (a test, an embedding) gets it built here on first use."""
        eng = self._engine
        return eng if eng is not None else self.open()

    @property
    def engine_built(self) -> bool:
        return self._engine is not None

    def open(self) -> Engine:
        """Build the engine once (device, dtype, backends, registry, scheduler) -> it."""
        with self._engine_lock:
            if self._engine is None:
                if self.closed:
                    raise RuntimeError("the server state is closed")
                self._engine = Engine(self.engine_config)
                log.info("engine started", extra={"device": str(self._engine.device),
                                                  "dtype": str(self._engine.dtype).removeprefix("torch.")})
            return self._engine

    def start_thread(self) -> None:
        """A pool thread starting: its native intra-op threads start now too, when the engine is built (the
        pools start at their first call, after the MCP lifespan built it), see `Engine.start_thread`."""
        eng = self._engine
        if eng is not None:
            eng.start_thread()

    def hold(self) -> int:
        """One more holder (a lifespan, a serving transport) -> how many now."""
        with self._holders_lock:
            self._holders += 1
            return self._holders

    def let_go(self) -> int:
        """One holder fewer; the last one closes the state when `close_when_idle` -> how many are left."""
        with self._holders_lock:
            self._holders = max(0, self._holders - 1)
            left = self._holders
        if left == 0 and self.close_when_idle:
            self.close()
        return left

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.jobs.cancel_all()
        with self._engine_lock:
            eng = self._engine
        if eng is not None:  # never built (no call reached it): nothing to stop
            eng.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.inline.shutdown(wait=False, cancel_futures=True)
        if self.shared is not None:  # issue 15 (h2): pending job writes, then drop this replica's lease
            self.shared.close()


def make_state(settings: Settings, extra_specs: list[ToolSpec] | None = None) -> AppState:
    """The server's state, its engine not built yet (the MCP lifespan builds it: `AppState.open`). The device
    and dtype are checked here, so that a configuration naming a missing device fails before serving."""
    engine_config = EngineConfig(
        device=settings.engine.device,
        dtype=settings.engine.dtype,
        memory_budget_bytes=(settings.engine.memory_budget_mb * 1024 * 1024) or None,
        cache_dir=settings.resolved_cache_dir(),
        hf_offline=settings.engine.hf_offline,
        queue_length=settings.limits.queue_length,
        kernel_backend=settings.engine.kernel_backend,
        torch_threads=settings.engine.torch_threads,
        llm_decode=settings.models.llm_decode, llm_compile=settings.models.llm_compile,  # issue 16 (H4): Backends
    )
    select_dtype(engine_config.dtype, select_device(engine_config.device))  # ValueError naming the setting
    sandbox = Sandbox(settings.resolved_read_roots(), settings.resolved_output_dir())
    swept = sandbox.sweep_temp_files()
    if swept:
        log.info("swept stale temp files", extra={"count": swept})
    enabled = set(settings.enabled_tools())
    specs: dict[str, ToolSpec] = {}
    for spec in [*load_specs(), *_server_specs(), *(extra_specs or [])]:
        if spec.name in enabled or (extra_specs and spec in extra_specs):
            specs[spec.name] = spec
    workers = max(2, settings.limits.queue_length)
    shared = open_shared_state(settings)  # issue 15 (h2): None = in-memory state, as before
    state = AppState(
        settings=settings, engine_config=engine_config, sandbox=sandbox,
        media=MediaStore(sandbox, settings.limits),
        jobs=shared.jobs if shared is not None else JobManager(settings.limits.job_ttl_s, settings.limits.max_jobs),
        specs=specs,
        pool=FixedPool(workers, "atelier-tool"),
        inline=FixedPool(INLINE_THREADS, "atelier-inline"),
        thread_slots=threading.BoundedSemaphore(settings.limits.queue_length + 1),
        shared=shared,
    )
    state.pool.initializer = state.inline.initializer = state.start_thread
    if shared is not None:  # issue 15 (h2)
        state.media.shared = shared.images
    return state


# --------------------------------------------------------------------------- run context
class RunContext:
    """The ToolContext a running tool gets (see tools.base.ToolContext)."""

    def __init__(self, state: AppState, token: CancelToken, caller: str = LOCAL) -> None:
        self.settings = state.settings
        self.engine = state.engine
        self._state = state
        self._token = token
        self._caller = caller

    def check(self) -> None:
        self._token.check()

    def report(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        self._token.report(progress, total, message)

    def cancel_token(self) -> CancelToken:
        return self._token

    def load_image(self, ref: str, argument: str, *, mode: str = "keep") -> Any:
        return self._state.media.load_image(ref, argument, mode, self._caller)

    def output_usage(self) -> dict[str, Any]:
        """The output folder: files and bytes this server wrote, the retention limits (engine_status)."""
        return self._state.media.usage()

    def resolve_input(self, path: str, argument: str) -> Any:
        return self._state.sandbox.resolve_input(path, argument)


# --------------------------------------------------------------------------- server-level tools
class JobIdInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(description="The job id a long-running tool call returned.", min_length=1, max_length=64)


class JobStatusOutput(BaseModel):
    job_id: str
    tool: str
    status: str = Field(description="queued | running | done | error | cancelled")
    progress: float
    total: float | None
    message: str | None
    elapsed_s: float
    error: str | None
    result: dict[str, Any] | None = Field(None, description="the tool's structured result once done")


def _server_specs() -> list[ToolSpec]:
    # run() is replaced by the server (these need the job manager); the specs carry the schemas.
    def _unused(args: Any, ctx: Any) -> ToolOutput:  # pragma: no cover
        raise RuntimeError("handled by the server")

    return [
        ToolSpec("job_status", "Job status",
                 "Progress of a long-running call that returned a job_id, or its result once finished "
                 "(the same content the original call would have returned).",
                 JobIdInput, JobStatusOutput, _unused, execution="inline", priority=0),
        ToolSpec("job_cancel", "Cancel a job",
                 "Ask a running job to stop; it stops at its next step (decode step, diffusion step, "
                 "catalogue chunk). Returns the job's status.",
                 JobIdInput, JobStatusOutput, _unused, execution="inline", read_only=False, priority=0),
    ]


# --------------------------------------------------------------------------- helpers
def _validation_message(tool: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err["loc"]) or "(arguments)"
        value = err.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if err["type"] == "missing":
            parts.append(f"{loc}: required argument is missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}={shown}: unknown argument for {tool}")
        else:
            parts.append(f"{loc}={shown}: {err['msg']}")
    return f"invalid arguments for {tool}: " + "; ".join(parts)


def _error_result(text: str, structured: dict[str, Any] | None = None) -> mt.CallToolResult:
    return mt.CallToolResult(content=[mt.TextContent(type="text", text=text)], is_error=True,
                             structured_content=structured)


HEARTBEAT_S = 4.0  # a long call sends progress at least this often (Claude clients reset their timeout on it)


def _compact(schema: Any) -> Any:
    """The same JSON schema, shorter for the model that reads it: pydantic's generated `title`s go (each
    repeats its property or model name; a property named "title" stays), and an optional value written
    `anyOf: [{type: T, ...}, {type: null}], default: null` becomes `type: [T, "null"], ...` (null stays the
    default). An optional `$ref` keeps its anyOf."""
    if isinstance(schema, list):
        return [_compact(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _compact(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    alts = out.get("anyOf")
    if isinstance(alts, list) and len(alts) == 2 and {"type": "null"} in alts:
        other = next(a for a in alts if a != {"type": "null"})
        # the other branch's keywords (minimum, items, additionalProperties...) constrain only its own type,
        # so merging them beside `type: [T, "null"]` accepts exactly the same values
        if isinstance(other, dict) and isinstance(other.get("type"), str) and not (set(other) & set(out)):
            out = {**{k: v for k, v in out.items() if k != "anyOf"}, **other, "type": [other["type"], "null"]}
            if "const" in out:  # `enum`/`const` constrain every type: null must be listed too
                out["enum"] = [out.pop("const")]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
            if out.get("default", 0) is None:
                del out["default"]
    return out


def _output_schema(spec: ToolSpec) -> dict[str, Any]:
    schema = spec.output_model.model_json_schema(mode="serialization")
    props = schema.setdefault("properties", {})
    props.setdefault("saved_images", {
        "type": "array",
        "description": "images this call saved: name, image:// uri, file path, size",
        "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "uri": {"type": "string"}, "path": {"type": "string"},
            "width": {"type": "integer"}, "height": {"type": "integer"}}},
    })
    props.setdefault("job_id", {"type": "string", "description": "set when the call outlasted the deadline"})
    props.setdefault("status", {"type": "string"})
    # a call that became a job returns only job fields, so nothing is required
    schema.pop("required", None)
    return schema


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, Busy):
        return "rejected"
    if isinstance(exc, Cancelled):
        return "cancelled"
    if isinstance(exc, InsufficientMemory) or is_oom(exc):
        return "oom"
    if isinstance(exc, (ToolError, EngineError)):
        return "tool_error"
    return "error"


# --------------------------------------------------------------------------- the server
class AtelierServer(MCPServer):
    def __init__(self, state: AppState) -> None:
        self.state = state

        @contextlib.asynccontextmanager
        async def lifespan(_: MCPServer) -> AsyncIterator[AppState]:
            # entered once per serving app (stdio), per session or request (streamable HTTP) or per connection
            # (SSE, in-memory); the first entry builds the engine (off the event loop), the last holder's exit
            # closes the state where the transport asked for it (`close_when_idle`)
            first = state.hold() == 1
            try:
                if not state.engine_built:  # a stateless HTTP request enters here each time: no thread hop then
                    await anyio.to_thread.run_sync(state.open)
                if first:
                    log.info("server ready", extra={"tools": sorted(state.specs), "device": str(state.engine.device)})
                yield state
            finally:
                state.let_go()  # the last holder closes the state where the transport asked for it

        had_handlers = bool(logging.getLogger().handlers)
        super().__init__(
            name="atelier-mcp", title="atelier-mcp", version=__version__, instructions=INSTRUCTIONS,
            lifespan=lifespan, log_level=state.settings.logging.level,
        )
        log_cfg = state.settings.logging
        if not had_handlers:  # MCPServer installed a rich console handler: use ours (stderr, JSON/text)
            setup_logging(log_cfg.level, log_cfg.format, third_party_level=log_cfg.third_party_level)
        else:  # whoever installed the handlers (the CLI, a test harness): still quiet the libraries
            set_third_party_level(log_cfg.level, log_cfg.third_party_level)
        self._register_resources()
        self._register_logging()
        self._register_tasks()

    # ---------------------------------------------------------------- MCP tasks (2025-11-25)
    def _register_tasks(self) -> None:
        """tasks/* methods, task-augmented tools/call, and the `tasks` capability where tasks are offered."""
        self.tasks = Tasks(self)
        self.tasks.register()
        low = self._lowlevel_server
        base = low.get_capabilities

        def capabilities(*args: Any, protocol_version: str | None = None, **kwargs: Any) -> mt.ServerCapabilities:
            caps = base(*args, protocol_version=protocol_version, **kwargs)
            # `initialize` asks without a version and the result is shaped per version afterwards (the
            # `tasks` field exists only in 2025-11-25's schema); `server/discover` asks with its version
            if protocol_version is None or tasks_offered(protocol_version):
                caps = caps.model_copy(update={"tasks": tasks_capability()})
            return caps

        low.get_capabilities = capabilities  # type: ignore[method-assign]

    # ---------------------------------------------------------------- logging to clients
    def _register_logging(self) -> None:
        levels = self.state.client_log_levels

        async def set_level(ctx: Any, params: mt.SetLevelRequestParams) -> mt.EmptyResult:
            key = _connection_key(ctx.session)
            if key not in levels:
                # the entry lives as long as the connection: removed when its session ends
                conn = getattr(ctx.session, "_connection", None)
                stack = getattr(conn, "exit_stack", None)
                if stack is not None:
                    stack.callback(levels.pop, key, None)
            levels[key] = str(params.level)
            return mt.EmptyResult()

        self._lowlevel_server.add_request_handler("logging/setLevel", mt.SetLevelRequestParams, set_level)

    async def _client_log(self, context: Any, level: str, data: Any) -> None:
        """Send a log notification to clients that asked for them (setLevel or per-request opt-in)."""
        try:
            session = context.session
        except Exception:
            return
        version = getattr(context, "protocol_version", None) or ""
        wanted = self.state.client_log_levels.get(_connection_key(session))
        if version >= "2026-07-28":
            pass  # the SDK filters by the request's own opt-in
        elif wanted is None or _LEVELS.index(level) < _LEVELS.index(wanted):
            return
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await context.log(level, data, logger_name="atelier")

    # ---------------------------------------------------------------- tools
    async def list_tools(self) -> list[mt.Tool]:
        out = []
        missing = self._unconfigured()
        for spec in self.state.specs.values():
            description = spec.description
            if spec.name in missing:
                if self.state.settings.tools.hide_unconfigured:
                    continue
                description = f"{missing[spec.name]}. {description}"
            out.append(mt.Tool(
                name=spec.name, title=spec.title, description=description,
                input_schema=_compact(spec.input_model.model_json_schema()),
                output_schema=_compact(_output_schema(spec)),
                annotations=mt.ToolAnnotations(title=spec.title, read_only_hint=spec.read_only,
                                               destructive_hint=False if spec.read_only else None,
                                               open_world_hint=False),
                execution=mt.ToolExecution(task_support="optional") if spec.long_running else None,
            ))
        return out

    def _unconfigured(self) -> dict[str, str]:
        """Tools whose model is not configured -> what they say about it at the start of their description."""
        import os
        from pathlib import Path

        diffusion = self.state.settings.models.diffusion
        if diffusion and (Path(os.path.expanduser(diffusion)) / "model_index.json").is_file():
            return {}
        why = ("not configured" if not diffusion else
               f"{diffusion!r} is not a diffusers pipeline folder" if Path(os.path.expanduser(diffusion)).is_dir()
               else f"{diffusion!r} does not exist")
        return {"generate_image": f"Unavailable: needs models.diffusion ({why})",
                "detail_image": f"Inpainting needs models.diffusion ({why}): only detect_only works"}

    def _tool_input_schema(self, name: str) -> dict[str, Any] | None:
        spec = self.state.specs.get(name)
        return None if spec is None else spec.input_model.model_json_schema()

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> mt.CallToolResult:
        rid = secrets.token_hex(6)
        rtoken = request_id.set(rid)
        t0 = time.perf_counter()
        outcome = "error"
        extra: dict[str, Any] = {}
        try:
            spec = self.state.specs.get(name)
            if spec is None:
                outcome = "rejected"
                log.info("start", extra={"event": "start", "tool": name})
                return _error_result(f"unknown tool {name!r}; available: {', '.join(sorted(self.state.specs))}")
            args_in = arguments or {}
            log.info("start", extra={"event": "start", "tool": name, "arguments": summarize_args(args_in)})
            try:
                args = spec.input_model.model_validate(args_in)
            except ValidationError as exc:
                outcome = "tool_error"
                return _error_result(_validation_message(name, exc))
            if name in ("job_status", "job_cancel"):
                result, outcome = self._job_tool(name, args, self._caller(context))
                return result
            await self._client_log(context, "debug", {"event": "start", "tool": name, "request_id": rid})
            result, outcome, extra = await self._run_spec(spec, args, context)
            await self._client_log(context, "debug" if outcome == "ok" else "warning",
                                   {"event": "end", "tool": name, "request_id": rid, "outcome": outcome})
            return result
        except StateUnavailable as exc:  # issue 15 (h2): Redis unreachable; the message names state.redis_url
            outcome = "tool_error"
            return _error_result(str(exc))
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()) or isinstance(exc, asyncio.CancelledError):
                outcome = "cancelled"
                raise
            outcome = _outcome_of(exc)
            log.exception("unexpected failure in the call pipeline")
            return _error_result(f"internal error in {name} (request {rid}); details are in the server log")
        finally:
            log.info("end", extra={"event": "end", "tool": name, "outcome": outcome,
                                   "duration_ms": round((time.perf_counter() - t0) * 1000, 2), **extra})
            request_id.reset(rtoken)

    # ---------------------------------------------------------------- jobs
    def _caller(self, context: Any) -> str:
        """The client behind a request (owner of what its calls make): see mcp_server/clients.py."""
        settings = self.state.settings  # issue 15 (h2): stateless HTTP without a token is one anonymous client
        return stateless_caller(settings, http_request(context)) or client_of(context, settings.http.auth_token)

    def _job_tool(self, name: str, args: JobIdInput, caller: str = LOCAL) -> tuple[mt.CallToolResult, str]:
        jobs = self.state.jobs
        job = jobs.cancel(args.job_id, caller) if name == "job_cancel" else jobs.get(args.job_id, caller)
        if job is None:
            return _error_result(f"job_id={args.job_id!r}: no such job (unknown, or expired after "
                                 f"{self.state.settings.limits.job_ttl_s:.0f} s)"), "tool_error"
        snap = job.snapshot()
        if name == "job_cancel" and snap["status"] in ("queued", "running"):
            snap["message"] = "cancellation requested; the job stops at its next step"
        res = job.result if job.state in ("done", "error", "cancelled") else None
        structured = dict(snap)
        content: list[Any] = []
        if isinstance(res, mt.CallToolResult):
            structured["result"] = res.structured_content
            content.extend(res.content)
        head = (f"job {job.id} ({job.tool}): {snap['status']}"
                + (f", {snap['progress']:.0f}/{snap['total']:.0f}" if snap["total"] else "")
                + (f" — {snap['message']}" if snap["message"] else ""))
        content.insert(0, mt.TextContent(type="text", text=head))
        is_error = bool(isinstance(res, mt.CallToolResult) and res.is_error)
        return self._fit(mt.CallToolResult(content=content, structured_content=structured, is_error=is_error)), "ok"

    # ---------------------------------------------------------------- execution
    def _execute(self, spec: ToolSpec, args: BaseModel, token: CancelToken,
                 caller: str = LOCAL) -> mt.CallToolResult:
        """Runs on a worker thread: the tool, then image delivery (images owned by `caller`)."""
        token.check()
        token.report(0, None, "started")  # the job leaves `queued` (and the client hears that work began)
        out = spec.run(args, RunContext(self.state, token, caller))
        if not isinstance(out, ToolOutput):
            raise TypeError(f"tool {spec.name} returned {type(out).__name__}, not ToolOutput")
        content: list[Any] = [mt.TextContent(type="text", text=out.text)]
        delivered = []
        inline_full = bool(getattr(args, "inline_full", False))
        for img in out.images:
            token.check()
            blocks, summary = self.state.media.deliver(img, inline_full=inline_full, owner=caller)
            content.extend(blocks)
            delivered.append(summary)
        structured = out.structured.model_dump(mode="json")
        if delivered:
            structured["saved_images"] = delivered
        return self._fit(mt.CallToolResult(content=content, structured_content=structured))

    def _fit(self, result: mt.CallToolResult) -> mt.CallToolResult:
        """The one place a result is measured before it is sent (mcp_server/fit.py)."""
        lim = self.state.settings.limits
        return fit_result(result, lim.max_result_chars, lim.max_inline_side)

    def _submit(self, spec: ToolSpec, args: BaseModel, token: CancelToken, caller: str = LOCAL) -> Future:
        fn = lambda tok: self._execute(spec, args, tok, caller)  # noqa: E731
        execution = spec.execution_for(args) if spec.execution_for is not None else spec.execution
        if execution == "device":
            fut, _ = self.state.engine.scheduler.submit(fn, token=token, label=spec.name, priority=spec.priority)
            return fut
        slots = self.state.thread_slots
        if not slots.acquire(blocking=False):
            raise Busy(f"server busy: {self.state.settings.limits.queue_length} calls already in progress; retry later")

        def run() -> mt.CallToolResult:
            try:
                return fn(token)
            finally:
                slots.release()

        try:
            return self.state.pool.submit(run)
        except RuntimeError as exc:  # pool shut down
            slots.release()
            raise Busy("server is shutting down") from exc

    def _map_error(self, exc: BaseException, name: str) -> tuple[mt.CallToolResult, str]:
        outcome = _outcome_of(exc)
        if isinstance(exc, (ToolError, InvalidInput)):
            return _error_result(str(exc)), outcome
        if isinstance(exc, ModelUnavailable):
            return _error_result(f"model unavailable: {exc}"), outcome
        if isinstance(exc, Busy):
            return _error_result(f"busy: {exc}", {"status": "busy"}), outcome
        if isinstance(exc, Cancelled):
            return _error_result(f"cancelled: {exc}", {"status": "cancelled"}), outcome
        if isinstance(exc, ModelTooLarge):  # a smaller request cannot help: the model itself is over the budget
            free_memory()
            return _error_result(f"insufficient memory for {name}: {exc}. The server keeps serving; raise "
                                 f"engine.memory_budget_mb, or configure a smaller model or weight format"), outcome
        if outcome == "oom":
            free_memory()
            return _error_result(f"insufficient memory while running {name}; memory was freed, the server keeps "
                                 f"serving — retry with a smaller request ({exc})"), outcome
        if isinstance(exc, EngineError):
            return _error_result(str(exc)), outcome
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:  # a cache or temp write (outputs: sandbox)
            log.error("no space left on device", exc_info=exc, extra={"tool": name})
            return _error_result(f"no space left on device while {name} was writing (a cache or temporary file); "
                                 f"free disk space and retry"), "tool_error"
        log.error("tool raised an unexpected exception", exc_info=exc, extra={"tool": name})
        return _error_result(f"internal error in {name} (request {request_id.get()}); details are in the server "
                             f"log"), outcome

    def _finish_job(self, job: Job, fut: Future) -> None:
        """Record a job's final state when its future completes (any thread)."""
        exc = fut.exception()
        if exc is None:
            result = fut.result()
            self.state.jobs.finish(job, "done", result)
            outcome = "ok"
        else:
            result, outcome = self._map_error(exc, job.tool)
            state = {"cancelled": "cancelled"}.get(outcome, "error")
            self.state.jobs.finish(job, state, result, error=str(exc))
            exc.__traceback__ = None  # logged already; its frames may hold large tensors
        job.future = None
        if job.detached:
            log.info("job end", extra={"event": "job_end", "job_id": job.id, "tool": job.tool, "outcome": outcome,
                                       "duration_ms": round((time.time() - job.created) * 1000, 2)})

    async def _run_spec(self, spec: ToolSpec, args: BaseModel, context: Any) -> tuple[mt.CallToolResult, str, dict]:
        caller = self._caller(context)
        token = CancelToken()
        # a closed HTTP exchange cancels the token (mcp_server/disconnect.py) until the call answers or detaches
        watch = exchange_watch(http_request(context))
        if watch is not None:
            watch.attach(token)
        try:
            return await self._run_watched(spec, args, context, token, caller, watch)
        finally:
            if watch is not None:
                watch.detach(token)

    async def _run_watched(self, spec: ToolSpec, args: BaseModel, context: Any, token: CancelToken, caller: str,
                           watch: ExchangeWatch | None) -> tuple[mt.CallToolResult, str, dict]:
        if spec.execution == "inline" and not spec.long_running:
            try:
                result = await asyncio.wrap_future(self.state.inline.submit(self._execute, spec, args, token, caller))
                return result, "ok", {}
            except Exception as exc:
                res, outcome = self._map_error(exc, spec.name)
                return res, outcome, {}

        job = self.state.jobs.create(spec.name, token, owner=caller)
        loop = asyncio.get_running_loop()
        last_sent = [time.monotonic(), -1.0]  # when, and the highest progress value sent
        # notifications go out at most every 0.1 s; the newest one held back is sent before the result
        # (`flush_progress`), so a client always sees the final state ("16 tokens: ...") even of a fast call
        held: list[tuple[float, float | None, str | None] | None] = [None]
        in_flight: list[Future] = []
        progress_lock = threading.Lock()

        def send(progress: float, total: float | None, message: str | None) -> None:
            with progress_lock:
                # progress values must increase (MCP): a repeated or lower value is nudged above the last one
                value = max(progress, last_sent[1] + 1e-6) if progress <= last_sent[1] else progress
                if total is not None and value > total:
                    return
                last_sent[0], last_sent[1] = time.monotonic(), value
                held[0] = None
                with contextlib.suppress(Exception):
                    in_flight[:] = [f for f in in_flight if not f.done()]
                    in_flight.append(asyncio.run_coroutine_threadsafe(
                        context.report_progress(value, total, message), loop))

        def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if job.state == "queued":
                job.state = "running"
            if context is None or job.detached:
                return
            final = total is not None and progress >= total
            if not final and time.monotonic() - last_sent[0] < 0.1:
                held[0] = (progress, total, message)
                return
            send(progress, total, message)

        async def drain() -> None:  # the notifications on their way, sent
            with progress_lock:
                pending = list(in_flight)
            for f in pending:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(f), 2.0)

        async def flush_progress() -> None:
            """Send the newest held-back notification, after those already on their way (in order); call it
            once the listener is removed."""
            if context is None or job.detached:
                return
            await drain()
            if held[0] is not None:
                send(*held[0])
                await drain()

        async def heartbeat() -> None:
            """No silent waits: a long call that reported nothing for HEARTBEAT_S seconds (a model loading,
            a queue) sends its last progress again, nudged, with what it is doing and for how long."""
            t0 = time.monotonic()
            while True:
                await asyncio.sleep(0.5)
                now = time.monotonic()
                if job.detached or job.future is None or job.future.done():
                    return
                if now - last_sent[0] >= HEARTBEAT_S:
                    what = (f"queued behind {self.state.engine.scheduler.running_label or 'other work'}"
                            if job.state == "queued" else (token.message or "working"))
                    send(max(token.progress, last_sent[1] + 1e-3), token.total,
                         f"{what} (still working, {now - t0:.0f} s)")

        token.add_listener(on_progress)
        try:
            fut = self._submit(spec, args, token, caller)
        except Exception as exc:
            self.state.jobs.forget(job)
            res, outcome = self._map_error(exc, spec.name)
            return res, outcome, {}
        job.future = fut
        fut.add_done_callback(lambda f: self._finish_job(job, f))
        beat = asyncio.ensure_future(heartbeat()) if context is not None else None
        deadline = self.state.settings.limits.deadline_s if spec.long_running else None
        try:
            with anyio.CancelScope(shield=False):
                done = await _wait_future(fut, deadline)
        except BaseException:
            # client cancelled the request (or the connection closed): stop the work
            token.cancel("cancelled by the client")
            job.detached = False
            if beat is not None:
                beat.cancel()
            raise
        if beat is not None:
            beat.cancel()
        if not done:
            if watch is not None:
                watch.detach(token)  # a job outlives its request: the exchange's end no longer stops it
            job.detached = True
            snap = job.snapshot()
            where = ("is still queued behind other work" if snap["status"] == "queued" else "is still running")
            text = (f"{spec.name} {where} after {deadline:.0f} s; it continues as job {job.id}. "
                    f"Call job_status with job_id={job.id!r} for progress and the result, or job_cancel to stop it.")
            await self._client_log(context, "info", {"event": "job_detached", "job_id": job.id, "tool": spec.name})
            return (mt.CallToolResult(content=[mt.TextContent(type="text", text=text)],
                                      structured_content={"job_id": job.id, "status": snap["status"]}),
                    "timeout", {"job_id": job.id})
        self.state.jobs.forget(job)
        token.remove_listener(on_progress)
        await flush_progress()
        exc = fut.exception()
        if exc is None:
            return fut.result(), "ok", {}
        res, outcome = self._map_error(exc, spec.name)
        return res, outcome, {}

    # ---------------------------------------------------------------- resources
    def _register_resources(self) -> None:
        pass

    async def _handle_list_resources(self, ctx: Any, params: Any) -> mt.ListResourcesResult:
        return mt.ListResourcesResult(resources=await self.list_resources(self._caller(ctx)))

    async def list_resources(self, caller: str = LOCAL) -> list[mt.Resource]:
        """Registered resources plus the images `caller` owns."""
        base = await super().list_resources()
        for rec in self.state.media.records(caller):
            base.append(mt.Resource(uri=rec.uri, name=rec.path.name, mime_type=rec.mime_type,
                                    description=f"{rec.name} image produced by atelier-mcp"))
        return base

    async def list_resource_templates(self) -> list[mt.ResourceTemplate]:
        base = await super().list_resource_templates()
        base.append(mt.ResourceTemplate(uri_template="image://{id}", name="image",
                                        description="An image produced by this server (full resolution PNG)",
                                        mime_type="image/png"))
        return base

    async def read_resource(self, uri: Any, context: Any = None) -> Any:
        text = str(uri)
        if text.startswith("image://"):
            from mcp.server.lowlevel.helper_types import ReadResourceContents
            from mcp.server.mcpserver.exceptions import ResourceNotFoundError

            image_id = text[len("image://"):]
            caller = self._caller(context)
            rec = self.state.media.get(image_id, caller)
            if rec is None:
                if self.state.media.expired(image_id) is not None:
                    raise ResourceNotFoundError(f"image resource {text} {EXPIRED}")
                raise ResourceNotFoundError(f"unknown image resource {text}")
            try:
                data = await anyio.to_thread.run_sync(self.state.media.read_bytes, image_id, caller)
            except ToolError as exc:
                raise ResourceNotFoundError(f"image resource {text} cannot be read: {exc}") from None
            return [ReadResourceContents(content=data, mime_type="image/png")]
        return await super().read_resource(uri, context)


def _connection_key(session: Any) -> int:
    """Sessions are per request; the connection under them is per client."""
    return id(getattr(session, "_connection", session))


async def _wait_future(fut: Future, timeout: float | None) -> bool:
    """Wait for a concurrent future without blocking the loop; False on timeout."""
    wrapped = asyncio.wrap_future(fut)
    # whoever stops waiting (deadline, client cancel), the outcome is read later from `fut`;
    # retrieve it here so asyncio does not report "exception was never retrieved"
    wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        if timeout is None:
            await asyncio.shield(wrapped)
        else:
            await asyncio.wait_for(asyncio.shield(wrapped), timeout)
        return True
    except asyncio.TimeoutError:
        return False
    except Exception:
        return True  # the future finished with an exception; the caller reads it


def build_server(settings: Settings, extra_specs: list[ToolSpec] | None = None) -> AtelierServer:
    return AtelierServer(make_state(settings, extra_specs))


__all__ = ["AtelierServer", "AppState", "build_server", "make_state", "base64"]
