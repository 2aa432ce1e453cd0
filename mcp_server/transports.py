"""Transports: stdio, SSE and streamable HTTP.

stdio: stdout carries only protocol. Before serving, file descriptor 1 is
duplicated for the protocol and fd 1 itself is pointed at stderr, so anything
a library prints (Python `print`, C code, subprocesses) lands on stderr.

HTTP and SSE (uvicorn): bind 127.0.0.1 by default; Host and Origin headers are
validated against an allow-list (DNS-rebinding protection, always on); a
bearer token is required when configured and the server refuses to start on a
non-loopback address without one; request bodies over `http.max_body_bytes`
are refused with 413 before they are read.
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
from starlette.types import ASGIApp, Receive, Scope, Send

from .app import AtelierServer
from .config import ConfigError, Settings
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
    http = settings.http
    hosts = list(http.allowed_hosts)
    origins = list(http.allowed_origins)
    for name in ("127.0.0.1", "localhost", "[::1]"):
        hosts += [name, f"{name}:{port}", f"{name}:*"]
        origins += [f"http://{name}", f"http://{name}:{port}", f"http://{name}:*"]
    if not is_loopback(http.host) and http.host not in ("0.0.0.0", "::"):
        hosts += [http.host, f"{http.host}:{port}"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


class GuardMiddleware:
    """Bearer token (when configured) and a request body limit, before the MCP app sees anything."""

    def __init__(self, app: ASGIApp, token: str, max_body: int) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.token:
            auth = headers.get("authorization", b"")
            ok = auth.startswith(b"Bearer ") and hmac.compare_digest(auth[7:].strip(), self.token)
            if not ok:
                await _plain(send, 401, b"missing or invalid bearer token", {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _plain(send, 400, b"invalid Content-Length")
                return
            if n > self.max_body:
                await _plain(send, 413, b"request body too large")
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # read the whole body here (chunked bodies have no Content-Length) and answer 413 as soon as it
        # passes the limit; then replay it to the app
        chunks: list[bytes] = []
        received = 0
        trailing = None
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                trailing = msg
                break
            body = msg.get("body", b"")
            received += len(body)
            if received > self.max_body:
                await _plain(send, 413, b"request body too large")
                return
            chunks.append(body)
            if not msg.get("more_body"):
                break
        queue: list[dict] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        if trailing is not None:
            queue.append(trailing)

        async def replay() -> dict:
            return queue.pop(0) if queue else await receive()

        await self.app(scope, replay, send)


async def _plain(send: Send, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    for k, v in (extra or {}).items():
        headers.append((k.encode(), v.encode()))
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # response already started
        pass


def check_http_config(settings: Settings, host: str) -> None:
    if not is_loopback(host) and not settings.http.auth_token:
        raise ConfigError(f"http.host={host!r}: refusing to listen on a non-loopback address without "
                          f"http.auth_token (set ATELIER_HTTP__AUTH_TOKEN or http.auth_token in the config)")


def build_http_app(server: AtelierServer, transport: str, host: str, port: int) -> ASGIApp:
    settings = server.state.settings
    sec = security_settings(settings, port)
    if transport == "sse":
        app = server.sse_app(max_request_body_size=settings.http.max_body_bytes, transport_security=sec, host=host)
    else:
        app = server.streamable_http_app(max_request_body_size=settings.http.max_body_bytes,
                                         transport_security=sec, host=host)
    app = watch_disconnects(app, transport)  # a closed HTTP exchange cancels its calls (mcp_server/disconnect.py)
    return GuardMiddleware(app, settings.http.auth_token, settings.http.max_body_bytes)


def serve_http(server: AtelierServer, transport: str, host: str, port: int) -> None:
    import uvicorn

    check_http_config(server.state.settings, host)
    app = build_http_app(server, transport, host, port)
    path = "/sse" if transport == "sse" else "/mcp"
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5,
                            limit_concurrency=256)
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
    try:
        uv.run()
    finally:
        server.state.close()
        log.info("server stopped", extra={"transport": transport})


def serve_stdio(server: AtelierServer) -> None:
    """Serve over stdin/stdout; returns on stdin EOF, exits on SIGTERM.

    On SIGTERM, and on the first Ctrl-C (SIGINT), in-flight calls are cancelled
    (they answer "cancelled" at their next step); a second later the state is
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
            time.sleep(1.0)
            finish()
            os._exit(130 if signum == signal.SIGINT else 0)

        threading.Thread(target=later, name="atelier-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        anyio.run(server.run_stdio_async)
    except KeyboardInterrupt:
        pass
    finally:
        finish()
