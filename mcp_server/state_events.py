"""An MCP `EventStore` in Redis (issue 15): a broken stream resumes with `Last-Event-ID` on any replica.

Each SSE stream's events are a Redis list `P:ev:<stream id>` of JSON rows
`{"id": event id, "msg": the JSON-RPC message or null for a priming event}`;
`P:evid:<event id>` names the stream an event belongs to. Event ids are
`<stream id>.<n>` with n from one Redis counter, so they are unique across
replicas. Both keys expire `state.event_ttl_s` after the last event.

With `http.stateless = false` the SDK uses this store itself (its sessions
still live on one replica: route by `mcp-session-id`). With
`http.stateless = true` the SDK keeps no store, so the server records the
events of each POST's stream here (`RecordingEvents` in
mcp_server/transports.py) and any replica answers a `GET` carrying
`Last-Event-ID` by replaying what follows that event and then following the
stream in Redis until its response has been sent (`follow`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as mt
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from pydantic import TypeAdapter

if TYPE_CHECKING:
    from .state_redis import RedisState

_MESSAGE = TypeAdapter(mt.JSONRPCMessage)
MAX_REPLAY = 10_000


class RedisEventStore(EventStore):
    def __init__(self, shared: RedisState) -> None:
        self.shared = shared
        self.ttl = max(1, int(shared.event_ttl_s))

    def _store_sync(self, stream_id: str, message: Any) -> str:
        s = self.shared
        n = s.call(s.r.incr, s.key("evseq"))
        event_id = f"{stream_id}.{n}"
        msg = None if message is None else json.loads(_MESSAGE.dump_json(message, by_alias=True, exclude_none=True))
        row = json.dumps({"id": event_id, "msg": msg})

        def write(p: Any) -> None:
            p.rpush(s.key("ev", stream_id), row)
            p.expire(s.key("ev", stream_id), self.ttl)
            p.set(s.key("evid", event_id), stream_id, ex=self.ttl)
        s.pipeline(write)
        return event_id

    async def store_event(self, stream_id: StreamId, message: mt.JSONRPCMessage | None) -> EventId:
        return await anyio.to_thread.run_sync(self._store_sync, str(stream_id), message)

    def stream_of(self, event_id: str) -> str | None:
        s = self.shared
        return s.call(s.r.get, s.key("evid", event_id))

    def rows_after(self, stream_id: str, start: int) -> list[dict[str, Any]]:
        s = self.shared
        return [json.loads(r) for r in s.call(s.r.lrange, s.key("ev", stream_id), start, start + MAX_REPLAY - 1)]

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        stream_id = await anyio.to_thread.run_sync(self.stream_of, str(last_event_id))
        if stream_id is None:
            return None
        rows = await anyio.to_thread.run_sync(self.rows_after, stream_id, 0)
        after = False
        for row in rows:
            if after and row["msg"] is not None:
                await send_callback(EventMessage(_MESSAGE.validate_python(row["msg"]), row["id"]))
            if row["id"] == last_event_id:
                after = True
        return stream_id

    async def follow(self, last_event_id: str, poll_s: float = 0.05,
                     give_up_s: float = 3600.0) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The events after `last_event_id`, then new ones as they are stored, until the stream's response
        (a JSON-RPC result or error) has been yielded. Nothing if the event is unknown (expired)."""
        stream_id = await anyio.to_thread.run_sync(self.stream_of, last_event_id)
        if stream_id is None:
            return
        pos, after, waited = 0, False, 0.0
        while waited < give_up_s:
            rows = await anyio.to_thread.run_sync(self.rows_after, stream_id, pos)
            pos += len(rows)
            for row in rows:
                if after and row["msg"] is not None:
                    yield row["id"], row["msg"]
                    if "result" in row["msg"] or "error" in row["msg"]:
                        return
                if row["id"] == last_event_id:
                    after = True
            if not rows:
                await anyio.sleep(poll_s)
                waited += poll_s
            else:
                waited = 0.0


__all__ = ["RedisEventStore"]
