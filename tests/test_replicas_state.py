"""Issue 15, in-process: the Redis state backend against a real redis-server (no replicas, no balancer).

Two `RedisState` objects on one Redis stand for two replicas: a job shared by
one is read, and cancelled, through the other; the event store replays on
"another replica"; the configuration refuses what cannot work; the default
backend is the in-memory one, untouched.
"""

from __future__ import annotations

import asyncio
import time

import mcp_types as mt
import pytest

from engine.scheduler import CancelToken
from mcp_server.config import ConfigError, load_settings
from mcp_server.jobs import JobManager
from mcp_server.state import StateUnavailable
from tests.replicas import RedisProc


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory):
    try:
        proc = RedisProc(tmp_path_factory.mktemp("redis")).start()
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(str(exc), pytrace=False)
    yield proc
    proc.stop()


def _settings(redis_url: str, tmp_path, **state):
    return load_settings(None, paths={"output_dir": str(tmp_path / "out"), "read_roots": [str(tmp_path)]},
                         state={"backend": "redis", "redis_url": redis_url, "heartbeat_s": 0.2, "lease_s": 1.0,
                                **state})


@pytest.fixture()
def two_replicas(redis_proc, tmp_path):
    from mcp_server.state_redis import RedisState

    prefix = f"t{time.monotonic_ns()}"
    a = RedisState(_settings(redis_proc.url, tmp_path, key_prefix=prefix))
    b = RedisState(_settings(redis_proc.url, tmp_path, key_prefix=prefix))
    yield a, b
    a.close()
    b.close()


def test_default_backend_is_the_in_memory_manager(tmp_path):
    from mcp_server.app import make_state

    s = load_settings(None, paths={"output_dir": str(tmp_path / "out"), "read_roots": [str(tmp_path)]})
    assert s.state.backend == "memory" and s.http.stateless is False
    state = make_state(s)
    try:
        assert type(state.jobs) is JobManager and state.shared is None and state.media.shared is None
    finally:
        state.close()


def test_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match=r"state.lease_s.*twice state.heartbeat_s"):
        load_settings(None, state={"heartbeat_s": 2.0, "lease_s": 3.0})
    with pytest.raises(ConfigError, match=r"state.redis_url"):
        load_settings(None, state={"backend": "redis", "redis_url": "http://localhost:6379"})
    from mcp_server.state import open_shared_state
    from tests.helpers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match=r"state.redis_url='redis://127.0.0.1:\d+/0': cannot reach Redis"):
        open_shared_state(_settings(dead, tmp_path))
    with pytest.raises(ConfigError) as err:  # a password in the URL is never shown
        open_shared_state(_settings(f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", tmp_path))
    assert "hunter2secret" not in str(err.value) and "redis://:***@127.0.0.1:" in str(err.value)
    from mcp_server.transports import check_transport_config

    with pytest.raises(ConfigError, match=r"http.stateless=true: applies to the streamable HTTP transport only"):
        check_transport_config(load_settings(None, http={"stateless": True}), "sse")


def test_a_job_is_read_and_cancelled_through_another_replica(two_replicas):
    a, b = two_replicas
    token = CancelToken()
    job = a.jobs.create("generate_text", token, owner="token:abc")
    assert b.jobs.get(job.id, "token:abc") is None  # not shared until it detaches
    job.detached = True
    job.state = "running"
    token.report(7, 100, "decoding")
    time.sleep(0.4)  # the sync loop pushes progress every 0.1 s
    seen = b.jobs.get(job.id, "token:abc")
    assert seen is not None and seen.state == "running"
    assert (seen.token.progress, seen.token.total, seen.token.message) == (7.0, 100, "decoding")
    assert b.jobs.get(job.id, "token:other") is None  # another client: as if it did not exist
    assert b.jobs.get(job.id, "session:zzz") is None
    t0 = time.monotonic()
    b.jobs.cancel(job.id, "token:abc")
    while not token.cancelled and time.monotonic() - t0 < 5:
        time.sleep(0.005)
    assert token.cancelled and token.reason == "cancelled by job_cancel"
    result = mt.CallToolResult(content=[mt.TextContent(type="text", text="partial")], structured_content={"n": 3})
    a.jobs.finish(job, "done", result)
    final = b.jobs.get(job.id, "token:abc")
    assert final.state == "cancelled" and final.error == "cancelled by job_cancel"
    assert final.result.structured_content == {"n": 3} and final.result.content[0].text == "partial"
    assert job.id in [j.id for j in b.jobs.visible("token:abc")]
    assert job.id not in [j.id for j in b.jobs.visible("token:other")]


def test_a_dead_replicas_running_job_reads_failed(redis_proc, tmp_path):
    from mcp_server.state_redis import RedisState

    prefix = f"d{time.monotonic_ns()}"
    a = RedisState(_settings(redis_proc.url, tmp_path, key_prefix=prefix))
    b = RedisState(_settings(redis_proc.url, tmp_path, key_prefix=prefix))
    try:
        job = a.jobs.create("generate_text", CancelToken(), owner="token:abc")
        job.detached = True
        job.state = "running"
        assert b.jobs.get(job.id, "token:abc").state == "running"
        a._stop.set()  # the replica stops heartbeating (as if frozen or killed) ...
        for t in a._threads:
            t.join(2)
        t0 = time.monotonic()
        while b.jobs.get(job.id, "token:abc").state == "running" and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        waited = time.monotonic() - t0
        lost = b.jobs.get(job.id, "token:abc")
        assert lost.state == "error" and f"replica {a.replica} stopped responding" in lost.error
        assert waited <= 1.0 + 1.0  # within state.lease_s (1 s) and a poll
    finally:
        b.close()
        a.r.close()


def test_image_index_is_shared(two_replicas, tmp_path):
    from mcp_server.media import ImageRecord

    a, b = two_replicas
    p = tmp_path / "x-0123456789ab.png"
    p.write_bytes(b"png")
    a.images.put(ImageRecord("0123456789ab", p, 4, 3, "x", time.time(), owner="token:abc", size=3))
    rec = b.images.get("0123456789ab")
    assert (rec.path, rec.width, rec.height, rec.owner, rec.size) == (p, 4, 3, "token:abc", 3)
    assert b.images.get("../../etc") is None
    b.images.forget(["0123456789ab"], 123.0)
    assert a.images.get("0123456789ab") is None and a.images.expired("0123456789ab") == 123.0


def test_event_store_replays_on_another_replica(two_replicas):
    from mcp.server.streamable_http import EventMessage

    a, b = two_replicas

    async def run():
        ids = [await a.events.store_event("s1", None)]
        for i in range(4):
            msg = mt.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress",
                                         params={"progressToken": 1, "progress": i})
            ids.append(await a.events.store_event("s1", msg))
        ids.append(await a.events.store_event("s1", mt.JSONRPCResponse(jsonrpc="2.0", id=1, result={"ok": True})))
        await a.events.store_event("s2", mt.JSONRPCResponse(jsonrpc="2.0", id=9, result={}))
        got: list[EventMessage] = []

        async def send(ev: EventMessage) -> None:
            got.append(ev)

        stream = await b.events.replay_events_after(ids[2], send)
        followed = [row async for row in b.events.follow(ids[2])]
        unknown = await b.events.replay_events_after("s1.999999999", send)
        return ids, stream, got, followed, unknown

    ids, stream, got, followed, unknown = asyncio.run(run())
    assert stream == "s1" and unknown is None
    assert [e.event_id for e in got] == ids[3:]  # what followed event 2, in order, nothing from stream s2
    assert [e.message.params["progress"] for e in got[:-1]] == [2, 3]
    assert got[-1].message.result == {"ok": True}
    assert [i for i, _ in followed] == ids[3:]


def test_redis_down_is_a_clear_error_and_recovers(tmp_path):
    from mcp_server.state_redis import RedisState

    proc = RedisProc(tmp_path).start()
    st = RedisState(_settings(proc.url, tmp_path))
    try:
        proc.kill()
        with pytest.raises(StateUnavailable, match=r"cannot reach Redis at state.redis_url='redis://127.0.0.1:\d+/0'"):
            st.jobs.get("0011223344556677", "token:abc")
        proc.start()
        assert st.jobs.get("0011223344556677", "token:abc") is None  # reconnected: answered (no such job)
    finally:
        st.close()
        proc.stop()
