"""Where the server's shared state lives (issue 15): this process's memory, or Redis.

`state.backend = "memory"` (the default): jobs, MCP tasks, cancel flags and the
`image://` index live in this process, exactly as before; nothing here runs.

`state.backend = "redis"` (`state.redis_url`): `open_shared_state` connects to
Redis and returns a `mcp_server.state_redis.RedisState`, which gives the
server a job manager whose detached jobs and tasks every replica can read and
cancel, a shared image index, an MCP `EventStore` for resumable streams, and
a lease that this replica renews every `state.heartbeat_s` (a replica silent
for `state.lease_s` is dead: its jobs read `failed`). See docs/scaling.md.

When Redis cannot be reached, a call that needs shared state fails with
`StateUnavailable` (a ToolError naming `state.redis_url`); redis-py opens a
new connection on the next call, so calls succeed again once Redis is back.
Calls that need no shared state (a colour comparison that finishes within
its call) never touch Redis.

Ownership across replicas (`mcp_server/clients.py`): a job or image belongs to
the client that made it. In stateless HTTP mode no MCP session outlives its
request, so the owner is the bearer token's hash (`http.auth_token`), which
every replica computes alike. Without a token every stateless request is the
one anonymous client `stateless:anonymous` (loopback only: the server refuses
a non-loopback address without a token), so all of them see each other's jobs
and images.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from typing import TYPE_CHECKING, Any

from tools.base import ToolError

if TYPE_CHECKING:
    from .config import Settings
    from .state_redis import RedisState

STATELESS_ANONYMOUS = "stateless:anonymous"


class StateUnavailable(ToolError):
    """The shared state (Redis) could not be reached; the message names state.redis_url."""


def replica_id() -> str:
    """A replica id: host, pid and a random tail (a restarted replica is a new one)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def open_shared_state(settings: Settings) -> RedisState | None:
    """None for the in-memory backend; otherwise a connected RedisState (raises ConfigError if unreachable)."""
    if settings.state.backend != "redis":
        return None
    from .state_redis import RedisState

    return RedisState(settings)


def stateless_caller(settings: Settings, request: Any) -> str | None:
    """The owner of a stateless HTTP request without a bearer token (None: the usual rules apply)."""
    if request is None or not settings.http.stateless or settings.http.auth_token:
        return None
    return STATELESS_ANONYMOUS


__all__ = ["STATELESS_ANONYMOUS", "StateUnavailable", "open_shared_state", "replica_id", "stateless_caller"]
