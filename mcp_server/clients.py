"""Who is calling: the owner of the images and jobs a call makes.

Over HTTP (streamable HTTP and SSE) every image record, `image://` resource
and job is owned by the client that made it, and only that client sees it;
anyone else gets the answer a nonexistent id gets ("unknown"), so existence is
not revealed. A client is:

- with `http.auth_token` set: the bearer token it authenticated with
  (`token:` + the first 24 hex digits of its SHA-256). Everyone holding the same
  token is one client: they share images and jobs, and a client that
  reconnects (new connection, new MCP session) with the token reaches its
  jobs and images again;
- without a token: its MCP session (the streamable HTTP `mcp-session-id`
  session, or the SSE session of one `GET /sse` stream). A new session is a
  new client: reconnecting without a token does not reach earlier jobs.

stdio, and the in-memory client, carry no HTTP request: they are one local
client (`LOCAL`) that sees everything this server holds, including images
found on disk from earlier runs. Over HTTP such images (`owner=None`: their
owner was not persisted) are visible to nobody.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from mcp.server.context import ServerRequestContext

LOCAL = "local"
_CONN_KEY = "atelier.client"


def can_see(owner: str | None, caller: str) -> bool:
    """Whether `caller` may see (list, read, poll, cancel) something owned by `owner`."""
    return caller == LOCAL or (owner is not None and owner == caller)


def _request_context(context: Any) -> Any:
    """The SDK's ServerRequestContext behind an MCPServer `Context` (or the thing itself)."""
    if context is None or isinstance(context, ServerRequestContext):
        return context
    try:
        return context.request_context
    except (AttributeError, ValueError):  # a Context made outside a request
        return None


def http_request(context: Any) -> Any:
    """The Starlette request a message came with (None on stdio / in memory)."""
    rc = _request_context(context)
    req = getattr(rc, "request", None) if rc is not None else None
    return req if hasattr(req, "headers") else None


def client_of(context: Any, auth_token: str) -> str:
    """The owner key of the client behind a request context (see the module docstring)."""
    rc = _request_context(context)
    req = http_request(context)
    if rc is None or req is None:
        return LOCAL
    if auth_token:
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and auth[7:].strip():
            # the transport already checked the token; hash what was presented so several tokens stay apart
            return "token:" + hashlib.sha256(auth[7:].strip().encode("utf-8", "surrogatepass")).hexdigest()[:24]
    conn = getattr(getattr(rc, "session", None), "_connection", None)
    state = getattr(conn, "state", None)
    if isinstance(state, dict):
        key = state.get(_CONN_KEY)
        if key is None:
            key = state[_CONN_KEY] = "session:" + secrets.token_hex(12)
        return key
    # no connection object to hang an identity on: a client of its own that sees nothing of others'
    return "request:" + secrets.token_hex(12)


__all__ = ["LOCAL", "can_see", "client_of", "http_request"]
