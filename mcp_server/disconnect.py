"""A closed HTTP exchange cancels the calls it started.

Streamable HTTP answers a `tools/call` on the POST that carried it (an SSE
stream). When that exchange ends before the answer went out — the client
closed its connection (ASGI `http.disconnect`) or the response could not be
sent — nobody can receive the result, so every call the exchange started and
that is still running is cancelled: its `CancelToken` is cancelled and the
work stops at its next step (decode step, diffusion step, catalogue chunk).
A call that has already become a job (the deadline passed and the client got
a job id) is no longer attached to its exchange: jobs outlive their request
by design and are stopped only by `job_cancel` or shutdown.

How: `DisconnectMiddleware` puts an `ExchangeWatch` into each HTTP request's
ASGI scope under `SCOPE_KEY`, notices `http.disconnect` on the way through
`receive` (the SDK's SSE response listens for it) and a failed `send`, and
ends the watch when the exchange ends for any reason. The call pipeline
(`mcp_server/app.py`) finds the watch through the Starlette request the SDK
attaches to every message (`exchange_watch`), attaches the call's token while
it runs and detaches it when the call returns or becomes a job.

The legacy SSE transport is not wrapped: its POSTs are answered `202` at once
and the results travel on the session's GET stream; when that stream closes
the SDK ends the session, which cancels the session's in-flight handlers
(and with them the tokens: see `AtelierServer._run_spec`).

This module knows nothing about MCP messages; it only needs objects with a
`cancel(reason)` method.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "atelier.exchange_watch"

log = logging.getLogger("atelier.transport")


class _Cancellable(Protocol):
    def cancel(self, reason: str = ...) -> None: ...


class ExchangeWatch:
    """The calls one HTTP exchange started; all cancelled when the exchange ends early."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[int, _Cancellable] = {}
        self.ended: str | None = None  # why the exchange ended, once it has

    def attach(self, token: _Cancellable) -> None:
        """Cancel `token` when the exchange ends (at once if it already has)."""
        with self._lock:
            reason = self.ended
            if reason is None:
                self._tokens[id(token)] = token
                return
        token.cancel(reason)

    def detach(self, token: _Cancellable) -> None:
        """The call answered or became a job: the exchange's end no longer concerns it."""
        with self._lock:
            self._tokens.pop(id(token), None)

    def end(self, reason: str) -> int:
        """The exchange is over; cancel what is still attached. Returns how many were cancelled."""
        with self._lock:
            if self.ended is None:
                self.ended = reason
            tokens = list(self._tokens.values())
            self._tokens.clear()
        for tok in tokens:
            tok.cancel(reason)
        if tokens:
            log.info("client gone: calls cancelled", extra={"event": "client_gone", "cancelled_calls": len(tokens),
                                                            "reason": reason})
        return len(tokens)

    @property
    def attached(self) -> int:
        with self._lock:
            return len(self._tokens)


def exchange_watch(request: Any) -> ExchangeWatch | None:
    """The watch of the HTTP exchange a Starlette request belongs to (None: not HTTP, or not wrapped)."""
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict):
        return None
    watch = scope.get(SCOPE_KEY)
    return watch if isinstance(watch, ExchangeWatch) else None


class DisconnectMiddleware:
    """ASGI middleware: one `ExchangeWatch` per HTTP request, ended when the client goes away."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = ExchangeWatch()
        scope[SCOPE_KEY] = watch

        async def watched_receive() -> Message:
            msg = await receive()
            if msg.get("type") == "http.disconnect":
                watch.end("cancelled: the client closed the connection")
            return msg

        async def watched_send(msg: Message) -> None:
            try:
                await send(msg)
            except BaseException:
                watch.end("cancelled: the response could not be sent to the client")
                raise

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            # a call still attached here lost the only stream its answer could travel on
            watch.end("cancelled: the client's HTTP exchange ended before the answer")


def watch_disconnects(app: ASGIApp, transport: str) -> ASGIApp:
    """Wrap the streamable HTTP app; SSE sessions end (and cancel their calls) with their GET stream."""
    return app if transport == "sse" else DisconnectMiddleware(app)


__all__ = ["DisconnectMiddleware", "ExchangeWatch", "SCOPE_KEY", "exchange_watch", "watch_disconnects"]
