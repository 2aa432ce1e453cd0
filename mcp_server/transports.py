"""Transports: stdio, SSE and streamable HTTP.

stdio: stdout carries only protocol. Before serving, file descriptor 1 is
duplicated for the protocol and fd 1 itself is pointed at stderr, so anything
a library prints (Python `print`, C code, subprocesses) lands on stderr.

HTTP and SSE (uvicorn): bind 127.0.0.1 by default; Host and Origin headers are
matched exactly against an allow-list (DNS-rebinding protection, always on;
mcp_server/http_hosts.py); a bearer token is required when configured and the
server refuses to start on a non-loopback address without one; Host, Origin,
token and declared size are all decided from the headers, before any of the
body is read (GuardMiddleware); request bodies over `http.max_body_bytes` are
refused with 413. Connections carry header and body timeouts, a body-rate
floor and per-client / global caps (mcp_server/http_conn.py).

`build_http_app` assembles the ASGI stack; `serve_http` the server around it.

Replicas (issue 15, docs/scaling.md): with `http.stateless = true` the
streamable HTTP app is the SDK's stateless mode (`stateless_http=True`: a
fresh transport per request, no `mcp-session-id`), so any replica behind a
balancer answers any request; what a later request needs (jobs, tasks, cancel
requests, the image index) lives in Redis (`state.backend = "redis"`). Every
HTTP response carries `X-Atelier-Replica: <replica id>`. With Redis and
sessions (`http.stateless = false`) the SDK keeps its stream events in Redis
(`mcp_server/state_events.py`), so a broken stream resumes with
`Last-Event-ID`; the balancer must then route by `mcp-session-id`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import AtelierServer
from .config import ConfigError, Settings
from .http_conn import ConnectionLimits, protocol_class
from .http_hosts import HostOriginPolicy
from .disconnect import watch_disconnects

log = logging.getLogger("atelier.transport")

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_settings(settings: Settings, port: int) -> TransportSecuritySettings:
    """The SDK's Host/Origin check (kept as a second layer), with exact matching (see http_hosts)."""
    return HostOriginPolicy.from_settings(settings, port).sdk_settings()


class GuardMiddleware:
    """Host, Origin, bearer token and declared size, all from the headers, before any of the body is read.

    Order: Host (421), Origin (403), token (401), Content-Length (400 / 413),
    the same answers the SDK gives. A request refused here never has its
    body read: the connection drops it (mcp_server/http_conn.py). An accepted
    body streams through to the app, counted: past `http.max_body_bytes`
    (chunked bodies have no Content-Length) the guard answers 413 itself; then,
    or when the client goes away (or is timed out) before its body is complete,
    the app's `receive()` raises `_BodyAbandoned` and the request ends quietly.
    """

    def __init__(self, app: ASGIApp, token: str, max_body: int, policy: HostOriginPolicy | None = None) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, list[bytes]] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), []).append(v)
        if self.policy is not None:
            hosts = headers.get("host", [])
            if len(hosts) != 1 or not self.policy.host_ok(hosts[0].decode("latin-1")):
                await _plain(send, 421, b"Invalid Host header")
                return
            origins = headers.get("origin", [])
            if len(origins) > 1 or not self.policy.origin_ok(origins[0].decode("latin-1") if origins else None):
                await _plain(send, 403, b"Invalid Origin header")
                return
        if self.token:
            auth = (headers.get("authorization") or [b""])[0]
            ok = auth.startswith(b"Bearer ") and hmac.compare_digest(auth[7:].strip(), self.token)
            if not ok:
                await _plain(send, 401, b"missing or invalid bearer token", {"www-authenticate": "Bearer"})
                return
        lengths = headers.get("content-length")
        if lengths is not None:
            try:
                n = int(lengths[0])
            except ValueError:
                await _plain(send, 400, b"invalid Content-Length")
                return
            if n > self.max_body:
                await _plain(send, 413, b"request body too large")
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return

        received = 0
        body_done = False
        app_started = False

        async def counted_receive() -> Message:
            nonlocal received, body_done
            msg = await receive()
            if msg["type"] == "http.request" and not body_done:
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    if not app_started:
                        await _plain(send, 413, b"request body too large")
                    raise _BodyAbandoned("over http.max_body_bytes")
                body_done = not msg.get("more_body", False)
            elif msg["type"] == "http.disconnect" and not body_done:
                raise _BodyAbandoned("the client went away mid-body")
            return msg

        async def tracked_send(msg: Message) -> None:
            nonlocal app_started
            app_started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyAbandoned:
            # the request never reached the SDK whole: no session made, no message parsed, nothing to cancel.
            # (Handing the SDK a partial body would make it log a traceback and park a task per request.)
            pass


class _BodyAbandoned(BaseException):
    """Raised from `receive()` so that the SDK (which catches `Exception`) unwinds without handling a half body."""


async def _plain(send: Send, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    for k, v in (extra or {}).items():
        headers.append((k.encode(), v.encode()))
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # response already started
        pass


class ReplicaHeader:
    """issue 15: `X-Atelier-Replica` on every response, so a client (and a test) sees which replica answered."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.value = replica.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-atelier-replica", self.value)]}
            await send(msg)

        await self.app(scope, receive, tagged)


def check_http_config(settings: Settings, host: str) -> None:
    if not is_loopback(host) and not settings.http.auth_token:
        raise ConfigError(f"http.host={host!r}: refusing to listen on a non-loopback address without "
                          f"http.auth_token (set ATELIER_HTTP__AUTH_TOKEN or http.auth_token in the config)")


def check_transport_config(settings: Settings, transport: str) -> None:
    """issue 15: http.stateless applies to streamable HTTP only."""
    if settings.http.stateless and transport != "http":
        raise ConfigError(f"http.stateless=true: applies to the streamable HTTP transport only (--transport http), "
                          f"not {transport!r}")


def build_http_app(server: AtelierServer, transport: str, host: str, port: int) -> ASGIApp:
    settings = server.state.settings
    policy = HostOriginPolicy.from_settings(settings, port)
    sec = policy.sdk_settings()
    if transport == "sse":
        app = server.sse_app(max_request_body_size=settings.http.max_body_bytes, transport_security=sec, host=host)
    else:
        shared = server.state.shared  # issue 15: stateless replicas; stream events in Redis for stateful ones
        events = shared.events if shared is not None and not settings.http.stateless else None
        app = server.streamable_http_app(max_request_body_size=settings.http.max_body_bytes,
                                         transport_security=sec, host=host, stateless_http=settings.http.stateless,
                                         event_store=events)
    app = watch_disconnects(app, transport)  # a closed HTTP exchange cancels its calls (mcp_server/disconnect.py)
    app = GuardMiddleware(app, settings.http.auth_token, settings.http.max_body_bytes, policy)
    return ReplicaHeader(app, _replica_of(server))


_REPLICA: list[str] = []


def _replica_of(server: AtelierServer) -> str:
    shared = server.state.shared
    if shared is not None:
        return shared.replica
    if not _REPLICA:
        from .state import replica_id

        _REPLICA.append(replica_id())
    return _REPLICA[0]


def _raise_fd_limit(wanted: int) -> None:
    """Let the process hold `wanted` descriptors (each connection is one) if the hard limit allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft != resource.RLIM_INFINITY and soft < wanted:
            log.warning("open-file limit below http.max_connections", extra={"nofile": soft, "wanted": wanted})
    except (ImportError, ValueError, OSError):
        pass


def serve_http(server: AtelierServer, transport: str, host: str, port: int) -> None:
    import uvicorn

    check_http_config(server.state.settings, host)
    check_transport_config(server.state.settings, transport)
    app = build_http_app(server, transport, host, port)
    path = "/sse" if transport == "sse" else "/mcp"
    http = server.state.settings.http
    _raise_fd_limit(http.max_connections + 256)
    # our protocol enforces the connection caps and read timeouts; uvicorn's own limit (which also counts
    # requests in flight) sits one above so that it never refuses a connection ours admitted.
    # ws="none": no protocol switch escapes the per-client count.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5, ws="none",
                            http=protocol_class(ConnectionLimits.from_settings(http)),
                            limit_concurrency=http.max_connections + 1)
    state = server.state

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # in-flight calls are cancelled at once: they stop at their next step and answer "cancelled"
            state.jobs.cancel_all("server shutting down")
            super().handle_exit(sig, frame)

    uv = _Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; let that reach a no-op
    # handler so the clean-up below runs and the last log line is written.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("listening", extra={"transport": transport, "url": f"http://{host}:{port}{path}"})
    # the serving app holds the state for its whole life (SSE enters the MCP lifespan once per connection,
    # so a connection's end alone must not close it); the last `let_go` closes it (AppState.hold/let_go)
    state.close_when_idle = True
    state.hold()
    try:
        uv.run()
    finally:
        state.let_go()
        log.info("server stopped", extra={"transport": transport})


def serve_stdio(server: AtelierServer) -> None:
    """Serve over stdin/stdout; returns on stdin EOF, exits on SIGTERM.

    On SIGTERM, and on the first Ctrl-C (SIGINT), in-flight calls are cancelled
    (they answer "cancelled" at their next step); once none is running (at most
    a second later; 0.1 s for an idle server) the state is
    closed, the last log line written and the process exits (0 for SIGTERM,
    130 for SIGINT): the SDK's stdin reader sits in a blocking readline() that
    no signal interrupts, so waiting for it would need a Ctrl-D.
    """
    state = server.state
    lock = threading.Lock()
    finished: list[bool] = []

    def finish() -> None:
        with lock:
            if finished:
                return
            finished.append(True)
            state.close()
            log.info("server stopped", extra={"transport": "stdio"})
            for h in logging.getLogger().handlers:
                try:
                    h.flush()
                except Exception:
                    pass
            sys.stderr.flush()

    def on_term(signum: int, frame: Any) -> None:
        state.jobs.cancel_all("server shutting down")

        def later() -> None:
            deadline = time.monotonic() + 1.0
            while state.jobs.active() and time.monotonic() < deadline:  # calls reach their next step
                time.sleep(0.02)
            time.sleep(0.1)  # their "cancelled" answers are written by the SDK's writer task
            finish()
            os._exit(130 if signum == signal.SIGINT else 0)

        threading.Thread(target=later, name="atelier-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    state.close_when_idle = True  # stdin's end leaves the MCP lifespan, whose `finally` closes the state
    try:
        anyio.run(server.run_stdio_async)
    except KeyboardInterrupt:
        pass
    finally:
        finish()
