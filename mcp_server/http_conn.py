"""Connection-level limits for the HTTP server: nobody holds connections hostage.

uvicorn's h11 protocol has no header timeout, no body timeout and one global
connection limit, so 256 half-sent requests locked every client out. This
protocol (uvicorn's `H11Protocol` plus timers and counters; passed as
`uvicorn.Config(http=...)`) adds, per connection:

- a per-client cap: at most `http.max_connections_per_client` open connections
  per peer IP address (the TCP peer, never a forwarded header);
- a global cap: `http.max_connections` open connections;
- at a cap, a new connection takes the place of the connection most readily
  given up among those waiting on their client (see `_eviction_rank`: an idle
  kept-alive one, closed silently; then a body below the rate floor; then a
  head part-way in; last one that has sent nothing yet), which is answered
  `503` and closed. A request being served, a response being streamed or a
  body arriving at a fair rate is never evicted. With nothing to evict, the
  new connection is answered `503` naming the key and closed, before it is
  counted anywhere. So half-sent requests from an address cannot lock out a
  neighbour on the same address (on loopback, every local program is
  127.0.0.1);
- a header timeout: the request line and headers must be complete within
  `http.header_timeout_s` of the connection opening (or of the previous
  response, on a kept-alive connection). A connection that sent nothing is
  closed silently; one that sent part of a request gets `408`;
- a body idle timeout: while a body is incomplete, no pause longer than
  `http.body_timeout_s` -> `408`;
- a body-rate floor: after `http.body_rate_grace_s`, a body still arriving must
  average at least `http.min_body_rate_bytes_s` (0 turns the floor off) -> `408`.
  Time during which the server itself stopped reading (its buffer is full
  because the application has not asked for more) does not count;
- a drain limit: after the application answered without reading the body (a
  refusal), at most `drain_limit` further body bytes are read and dropped
  (so a kept-alive client can send its next request), then the connection closes.

Every refusal is written as a complete response with `Connection: close`; the
connection then stops writing (FIN), drops whatever the client still sends and
closes after `linger_s` or when the client closes, so a client still sending
its body reads the answer instead of a reset. The application sees
`http.disconnect` on a connection closed this way (so the calls it started are
cancelled). Refusals are logged at most once per `log_every_s` per reason, with
a count, so an attack cannot flood the log.

This module knows HTTP/1.1 and asyncio, nothing of MCP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

log = logging.getLogger("atelier.transport")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024
    per_client: int = 128
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    min_body_rate: int = 1024  # bytes/s; 0 = off
    rate_grace_s: float = 5.0
    drain_limit: int = 64 * 1024 * 1024
    linger_s: float = 1.0
    min_evict_age_s: float = 1.0
    log_every_s: float = 5.0

    @classmethod
    def from_settings(cls, http: Any) -> ConnectionLimits:
        return cls(max_connections=http.max_connections, per_client=http.max_connections_per_client,
                   header_timeout_s=http.header_timeout_s, body_timeout_s=http.body_timeout_s,
                   min_body_rate=http.min_body_rate_bytes_s, rate_grace_s=http.body_rate_grace_s,
                   drain_limit=2 * http.max_body_bytes)


def client_key(transport: asyncio.BaseTransport) -> str | None:
    """The peer's IP address (IPv4-mapped IPv6 as IPv4); None for a socket without one (Unix socket)."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, (tuple, list)) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return str(peer[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def error_response(status: int, reason: str, retry_after: int | None = None) -> bytes:
    body = (reason + "\n").encode("utf-8", "replace")
    head = [f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}", "content-type: text/plain; charset=utf-8",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _RateLimitedLog:
    """One log line per reason per `every` seconds, with the number of events it stands for."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def __call__(self, kind: str, reason: str, client: str | None) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.last.get(kind, -1e9) >= self.every:
            msg = ("connection evicted" if kind.endswith("_evicted") else "connection refused"
                   if kind in ("per_client", "max_connections") else "connection timed out")
            log.warning(msg, extra={"kind": kind, "reason": reason, "client": client, "events": self.count[kind]})
            self.last[kind] = now
            self.count[kind] = 0


class GuardedH11Protocol(H11Protocol):
    """`H11Protocol` with the limits above. Use `protocol_class(limits)` for a class bound to one server."""

    limits: ConnectionLimits = ConnectionLimits()
    peers: dict[str, dict[GuardedH11Protocol, None]] = {}  # peer address -> its open connections (per bound class)
    note: _RateLimitedLog = _RateLimitedLog(5.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer: str | None = None  # set while counted in `peers`
        self._ending = False  # answered by us and lingering: input is dropped
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "none"  # "head": waiting for a request head; "body": reading a body; "none"
        self._head_bytes = 0
        self._phase_t0 = 0.0
        self._last_body = 0.0
        self._rate_t0 = 0.0
        self._rate_bytes = 0
        self._drained = 0

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        lim = self.limits
        peer = client_key(transport)
        mine = self.peers.get(peer, {}) if peer is not None else {}
        if len(mine) >= lim.per_client:
            reason = (f"too many connections from {peer}: {len(mine)} open "
                      f"(http.max_connections_per_client={lim.per_client})")
            if not self._evict_one(mine, reason, "per_client"):
                return self._refuse_at_connect(transport, "per_client", reason, peer)
        if len(self.server_state.connections) >= lim.max_connections:
            reason = f"the server is at its connection limit (http.max_connections={lim.max_connections})"
            if not self._evict_one(self.server_state.connections, reason, "max_connections"):
                return self._refuse_at_connect(transport, "max_connections", reason, peer)
        if peer is not None:
            self.peers.setdefault(peer, {})[self] = None
            self._peer = peer
        super().connection_made(transport)
        self._update_phase()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._phase = "none"
        self._release()
        if self.flow is None:  # refused at connect: uvicorn never set this connection up
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._ending:
            return  # answered and closing: dropped, never parsed or buffered
        if self._phase == "head":
            self._head_bytes += len(data)
        elif self._phase == "body":
            self._last_body = time.monotonic()
            self._rate_bytes += len(data)
            if self.cycle is not None and self.cycle.response_complete:
                self._drained += len(data)
                if self._drained > self.limits.drain_limit:
                    self._close_now()
                    return
        super().data_received(data)
        self._update_phase()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_phase()

    # ------------------------------------------------------------------ places
    def _release(self) -> None:
        """Give back this connection's places (per client and global)."""
        if self._peer is not None:
            mine = self.peers.get(self._peer)
            if mine is not None:
                mine.pop(self, None)
                if not mine:
                    self.peers.pop(self._peer, None)
            self._peer = None
        self.server_state.connections.discard(self)

    def _eviction_rank(self, now: float) -> tuple | None:
        """How readily this connection gives its place to a new one (lower first); None: it keeps it.

        First an idle kept-alive connection (no byte for `min_evict_age_s`; closing it costs nothing);
        then a body arriving below the rate floor, slowest first; then a request head part-way in;
        last a connection just made that has sent nothing yet, oldest first (so the newest, likely
        about to send its request, is the last to go). Never a request being served, a response
        being streamed, or a body arriving at a fair rate. No age threshold: an attacker that
        reconnects as fast as it can keeps every place young, and would win any such race.
        """
        if self._ending or self._phase not in ("head", "body"):
            return None
        age = now - self._phase_t0
        if self._phase == "head":
            if self._head_bytes:
                return (2, -age)
            return (0, -age) if age >= self.limits.min_evict_age_s else (3, -age)
        if self.flow is not None and self.flow.read_paused:
            return None  # the server is not reading this body: not the client's doing
        rate = self._rate_bytes / max(now - self._rate_t0, 1e-3)
        if rate >= max(self.limits.min_body_rate, 1):
            return None
        return (1, rate, -age)

    def _evict_one(self, among: Any, reason: str, kind: str) -> bool:
        """Close the most readily evicted connection of `among`, so that a new one takes its place."""
        now = time.monotonic()
        ranked = [(r, c) for c in list(among) if isinstance(c, GuardedH11Protocol)
                  for r in [c._eviction_rank(now)] if r is not None]
        if not ranked:
            return False
        _, victim = min(ranked, key=lambda rc: rc[0])
        if victim._phase == "head" and victim._head_bytes == 0:
            victim._phase = "none"
            victim._cancel_timer()
            victim._ending = True
            victim.transport.close()  # idle: nothing to answer
        else:
            victim._fail(503, f"{reason}; this connection was the slowest waiting one and gave its place to a "
                              f"new one", f"{kind}_evicted")
        victim._release()
        return True

    # ------------------------------------------------------------------ phases and timers
    def _update_phase(self) -> None:
        if self.transport is None or self.transport.is_closing() or self._ending:
            self._cancel_timer()
            self._phase = "none"
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._phase != "head":
                self._phase = "head"
                self._phase_t0 = time.monotonic()
                self._head_bytes = 0
                self._set_timer(self.limits.header_timeout_s, self._head_expired)
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._phase = "body"
                now = time.monotonic()
                self._last_body = self._rate_t0 = self._phase_t0 = now
                self._rate_bytes = self._drained = 0
                self._set_timer(self._tick_s(), self._body_tick)
        elif self._phase != "none":
            self._phase = "none"
            self._cancel_timer()

    def _tick_s(self) -> float:
        return max(0.05, min(0.5, self.limits.body_timeout_s / 4))

    def _set_timer(self, delay: float, fn: Any) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, fn)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self._phase != "head" or self.transport.is_closing():
            return
        if self._head_bytes == 0:  # an idle connection: close it without a word
            self._phase = "none"
            self.transport.close()
            return
        self._fail(408, f"request headers not complete within {self.limits.header_timeout_s:g} s "
                        f"(http.header_timeout_s)", "header_timeout")

    def _body_tick(self) -> None:
        self._timer = None
        if self._phase != "body" or self.transport.is_closing():
            return
        if self.conn.their_state is not h11.SEND_BODY:
            return self._update_phase()
        lim = self.limits
        now = time.monotonic()
        if self.flow is not None and self.flow.read_paused:
            # the server is not reading (the application has not asked for more yet): not the client's doing
            self._last_body = self._rate_t0 = now
            self._rate_bytes = 0
        elif now - self._last_body > lim.body_timeout_s:
            return self._fail(408, f"no request body received for {lim.body_timeout_s:g} s (http.body_timeout_s)",
                              "body_timeout")
        elif lim.min_body_rate and now - self._rate_t0 > lim.rate_grace_s:
            rate = self._rate_bytes / (now - self._rate_t0)
            if rate < lim.min_body_rate:
                return self._fail(408, f"request body arriving at {rate:.0f} bytes/s, below "
                                       f"http.min_body_rate_bytes_s={lim.min_body_rate}", "body_rate")
        self._set_timer(self._tick_s(), self._body_tick)

    # ------------------------------------------------------------------ ending a connection
    def _fail(self, status: int, reason: str, kind: str) -> None:
        """Answer `status` (unless a response already began), wake the application, close gracefully."""
        phase = self._phase
        self._cancel_timer()
        self._phase = "none"
        self.note(kind, reason, self._peer)
        cycle = self.cycle if phase == "body" else None  # in the head phase, `cycle` is the previous request's
        answer = cycle is None or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's own answer, if any, is dropped
            cycle.message_event.set()  # its pending receive() returns http.disconnect
        self._linger_close(error_response(status, reason) if answer else b"")

    def _refuse_at_connect(self, transport: asyncio.Transport, kind: str, reason: str, peer: str | None) -> None:
        self.transport = transport
        self.note(kind, reason, peer)
        self._linger_close(error_response(503, reason, retry_after=1))

    def _linger_close(self, response: bytes) -> None:
        self._ending = True
        transport = self.transport
        if response:
            transport.write(response)
        try:
            if transport.is_closing() or not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()  # FIN after the answer; keep reading (and dropping) a little
        except OSError:  # the peer is already gone
            transport.close()
            return
        self.loop.call_later(self.limits.linger_s, transport.close)

    def _close_now(self) -> None:
        self._ending = True
        self._cancel_timer()
        self._phase = "none"
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` subclass with its own limits and its own per-client registry."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "limits": limits, "peers": {}, "note": _RateLimitedLog(limits.log_every_s)})
