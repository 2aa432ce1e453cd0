"""Issue 17 items 3 and 5: a vanished client frees its work; one client's work is that client's.

Two real server processes (tests/reltools.py) shared by the tests of this
module: streamable HTTP and SSE, both without a token (the default set-up).
With `http.auth_token` the client is the token: tests/test_server_core.py
checks that identity and a reconnect without a server process.

Vanished clients (a raw socket close, nothing sent first, while the call runs):
- streamable HTTP: the call the closed POST started is cancelled and the device
  worker is idle again within STOP_BOUND_S, seen by a second client through
  `engine_status`; the log ends the call "cancelled" (before the fix it ran
  on, became a job nobody knew about at the deadline, and kept the worker);
- SSE: closing the `GET /sse` stream ends the session and cancels its calls;
- a call that has already become a job keeps running after the disconnect;
- the real `catalog_upsert` (20 000 items) disconnected mid-embedding stops
  and commits nothing (catalog_info's row count is unchanged);
- the real `generate_text` (1 024 tokens) disconnected mid-decode stops.

Scoping: images (resources/list, resources/read, image:// inputs, paths into
the output directory) and jobs (job_status, job_cancel) of one client answer
another exactly like nonexistent ones, and its job_cancel leaves the job
running; images left by an earlier run are nobody's over HTTP.

Figures (seconds from the close to the stop, steps run after it) are printed.
"""

from __future__ import annotations

import json
import secrets
import time

import numpy as np
import pytest
from PIL import Image

from tests.relclients import HttpClient, LiveServer, SseClient, read_until, tool_event

pytestmark = pytest.mark.slow

STEP_S = 0.1
STOP_BOUND_S = 3.0  # 30 steps of 100 ms; the work stops at its next step (measured figures are printed)


def _earlier_run_image(out_dir) -> str:
    """A PNG named as the media store names outputs, left in the output directory before the server starts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image_id = secrets.token_hex(6)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out_dir / f"old-20260101-000000-abcd1234-{image_id}.png")
    return f"image://{image_id}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The two servers, started in parallel (each takes a while to import torch), killed at the end."""
    tmp = tmp_path_factory.mktemp("h4-http")
    old = _earlier_run_image(tmp / "out")
    started = {
        "http": LiveServer(tmp, "http", wait=False, ATELIER_LIMITS__DEADLINE_S="3"),
        "sse": LiveServer(tmp_path_factory.mktemp("h4-sse"), "sse", wait=False, ATELIER_LIMITS__DEADLINE_S="3"),
    }
    started["http"].old_image = old
    try:
        for srv in started.values():
            srv.ready()
        yield started
    finally:
        for srv in started.values():
            srv.close(kill=True)


@pytest.fixture()
def http_srv(servers):
    return servers["http"]


@pytest.fixture()
def sse_srv(servers):
    return servers["sse"]


# --------------------------------------------------------------------------- helpers
def _wait_idle(client, bound: float) -> float | None:
    """Seconds until engine_status reports the device worker idle (None: still busy after `bound`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound + 2.0:
        st = client.call("engine_status")["structuredContent"]
        if not st["worker_busy"]:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _wait_running(client, label: str, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if client.call("engine_status")["structuredContent"]["running"] == label:
            return
        time.sleep(0.05)
    raise AssertionError(f"{label} never ran on the device worker")


def _wait_job(client, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    t0 = time.monotonic()
    while True:
        st = client.call("job_status", {"job_id": job_id})["structuredContent"]
        if st["status"] in states or time.monotonic() - t0 > timeout:
            return st
        time.sleep(0.1)


def _job_id_from(sse_text: str) -> str:
    for line in sse_text.splitlines():
        if line.startswith("data:") and '"job_id"' in line:
            return json.loads(line[5:])["result"]["structuredContent"]["job_id"]
    raise AssertionError(f"no job id in {sse_text[-500:]!r}")


def _text(result: dict) -> str:
    return result["content"][0]["text"]


def _uris(client) -> set[str]:
    return {r["uri"] for r in client.request("resources/list")["result"]["resources"]}


def _read_error(client, uri: str) -> str:
    msg = client.request("resources/read", {"uri": uri})
    assert "error" in msg, f"read of {uri} succeeded: {str(msg)[:200]}"
    return msg["error"]["message"]


# --------------------------------------------------------------------------- vanished clients
def test_http_closed_connection_cancels_the_running_call(http_srv):
    srv = http_srv
    owner, other = HttpClient(srv.port), HttpClient(srv.port)
    mark = srv.mark()
    sock = owner.raw_call("test_steps", {"steps": 2000, "step_s": STEP_S})
    head = read_until(sock, b"\r\n\r\n", 30)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    _wait_running(other, "test_steps")
    time.sleep(0.5)  # a few steps in, well before the 3 s deadline
    t_close = time.monotonic()
    sock.close()
    idle_s = _wait_idle(other, STOP_BOUND_S)
    end = srv.wait_log(tool_event("end", "test_steps"), 5, since=mark)
    fig = {"transport": "http", "idle_after_close_s": None if idle_s is None else round(idle_s, 3),
           "steps_after_close": None if idle_s is None else round(idle_s / STEP_S, 1),
           "end_outcome": end and end.get("outcome"),
           "end_after_close_s": end and round(end["_seen"] - t_close, 3)}
    print(f"\n[rel-disconnect] {json.dumps(fig)}")
    assert idle_s is not None and idle_s < STOP_BOUND_S, "the call kept running after its client left"
    assert end is not None and end["outcome"] == "cancelled", end
    assert not srv.wait_log(lambda r: r.get("event") == "job_detached", 0, since=mark)
    gone = srv.wait_log(lambda r: r.get("event") == "client_gone", 0, since=mark)
    assert gone is not None and gone["cancelled_calls"] == 1
    # the server keeps serving the surviving client
    assert other.call("test_steps", {"steps": 2, "step_s": 0})["structuredContent"]["done_steps"] == 2


def test_sse_closed_stream_cancels_the_sessions_calls(sse_srv):
    srv = sse_srv
    owner, other = SseClient(srv.port), SseClient(srv.port)
    try:
        owner.send_call("test_steps", {"steps": 2000, "step_s": STEP_S})
        owner.send_call("test_steps", {"steps": 2000, "step_s": STEP_S})  # a second one, queued behind it
        _wait_running(other, "test_steps")
        time.sleep(0.5)
        owner.close()
        idle_s = _wait_idle(other, STOP_BOUND_S)
        fig = {"transport": "sse", "idle_after_close_s": None if idle_s is None else round(idle_s, 3),
               "steps_after_close": None if idle_s is None else round(idle_s / STEP_S, 1),
               "queue_depth": other.call("engine_status")["structuredContent"]["queue_depth"]}
        print(f"\n[rel-disconnect] {json.dumps(fig)}")
        assert idle_s is not None and idle_s < STOP_BOUND_S, "the session's calls kept running after it closed"
        assert fig["queue_depth"] == 0
        assert other.call("test_steps", {"steps": 2, "step_s": 0})["structuredContent"]["done_steps"] == 2
    finally:
        other.close()


def test_detached_job_survives_the_disconnect(http_srv):
    """A call that already became a job is meant to outlive its request: the disconnect leaves it running."""
    first = HttpClient(http_srv.port)
    sock = first.raw_call("test_steps", {"steps": 2000, "step_s": 0.05})
    got = read_until(sock, b'"job_id"', 30)
    if b"\n" not in got[got.find(b'"job_id"'):]:
        got += read_until(sock, b"\n", 5)
    sock.close()
    job_id = _job_id_from(got.decode("utf-8", "replace"))
    again = first  # the same session, on another connection (its httpx pool), polls the job
    st1 = again.call("job_status", {"job_id": job_id})["structuredContent"]
    time.sleep(1.0)
    st2 = again.call("job_status", {"job_id": job_id})["structuredContent"]
    print(f"\n[rel-disconnect] detached job {job_id}: {st1['status']} {st1['progress']} -> "
          f"{st2['status']} {st2['progress']}")
    assert st2["status"] == "running" and st2["progress"] > st1["progress"]
    again.call("job_cancel", {"job_id": job_id})
    assert _wait_job(again, job_id, ("cancelled",), 10)["status"] == "cancelled"


def test_catalog_upsert_disconnected_commits_nothing(http_srv):
    srv = http_srv
    owner, other = HttpClient(srv.port), HttpClient(srv.port)
    rows_before = other.call("catalog_info")["structuredContent"]["rows"]
    items = [{"id": f"vanish-{i}", "category": "probe", "name": f"disconnect probe item number {i}",
              "description": f"a long enough description of probe item {i} so that embedding takes a while"}
             for i in range(20_000)]
    mark = srv.mark()
    sock = owner.raw_call("catalog_upsert", {"items": items})
    assert read_until(sock, b"\r\n\r\n", 60).startswith(b"HTTP/1.1 200")
    assert srv.wait_log(tool_event("start", "catalog_upsert"), 30, since=mark)
    time.sleep(2.0)  # embedding is under way
    t_close = time.monotonic()
    sock.close()
    end = srv.wait_log(tool_event("end", "catalog_upsert"), 15, since=mark)
    rows_after = other.call("catalog_info")["structuredContent"]["rows"]
    fig = {"tool": "catalog_upsert", "items": len(items), "end_outcome": end and end.get("outcome"),
           "end_after_close_s": end and round(end["_seen"] - t_close, 3),
           "rows_before": rows_before, "rows_after": rows_after}
    print(f"\n[rel-disconnect] {json.dumps(fig)}")
    assert end is not None, "catalog_upsert was still running 15 s after its client left"
    assert end["outcome"] == "cancelled" and end["_seen"] - t_close < 10
    assert rows_after == rows_before


def test_generate_text_disconnected_stops_decoding(http_srv):
    srv = http_srv
    owner = HttpClient(srv.port)
    # loads the model and everything a sampled call uses: a first sampled call spent ~3 s before its first
    # progress notification (so before its response headers, which the test waits for) where the warm-up was
    # greedy, and the call was over before the test could leave
    warm = owner.call("generate_text", {"prompt": "Hi", "max_new_tokens": 2, "raw": True, "temperature": 0.7,
                                        "repetition_penalty": 1.0, "seed": 1})
    if "job_id" in (warm.get("structuredContent") or {}):  # the load outlasted the 3 s deadline
        assert _wait_job(owner, warm["structuredContent"]["job_id"], ("done", "error"))["status"] == "done"
    # sampled, so that no draft speeds it up: up to 1024 plain decoding steps (6-14 s on the machines seen);
    # greedy counting with prompt-lookup drafting finished all 1024 tokens in under 3 s, before the client left.
    # A sampled text may reach an end of sequence before the client leaves (seed 7 on SmolLM2 after ~2.5 s, and
    # a loaded machine can take that long to show the call's start): then the disconnect was not exercised, and
    # the next seed tries again
    for seed in (7, 11, 23, 31):
        args = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "raw": True, "max_new_tokens": 1024,
                "repetition_penalty": 1.0, "temperature": 0.7, "seed": seed}
        mark = srv.mark()
        sock = owner.raw_call("generate_text", args)
        assert read_until(sock, b"\r\n\r\n", 30).startswith(b"HTTP/1.1 200")
        assert srv.wait_log(tool_event("start", "generate_text"), 30, since=mark)
        time.sleep(0.2)  # decoding is under way, well before the 3 s deadline
        t_close = time.monotonic()
        sock.close()
        end = srv.wait_log(tool_event("end", "generate_text"), 15, since=mark)
        gone = srv.wait_log(lambda r: r.get("event") == "client_gone", 0, since=mark)
        fig = {"tool": "generate_text", "seed": seed, "max_new_tokens": 1024,
               "end_outcome": end and end.get("outcome"),
               "end_after_close_s": end and round(end["_seen"] - t_close, 3),
               "call_ms": end and end.get("duration_ms"),
               "cancelled_after_close_s": gone and round(gone["_seen"] - t_close, 3)}
        print(f"\n[rel-disconnect] {json.dumps(fig)}")
        assert end is not None, "generate_text was still decoding 15 s after its client left"
        if gone is None and end["_seen"] <= t_close:  # it ended (end of sequence) before the client left
            continue
        break
    else:
        pytest.fail("every sampled text ended before its client left: the disconnect was never exercised")
    # a cancelled generation answers its partial text ("[cancelled after N tokens] ...": outcome ok)
    assert end["outcome"] != "timeout", "the call became a job before the test closed its connection"
    assert gone is not None and gone["cancelled_calls"] == 1
    assert end["_seen"] - t_close < STOP_BOUND_S


# --------------------------------------------------------------------------- scoping
def _check_isolated(owner, other) -> dict:
    made = owner.call("test_image", {"width": 16, "height": 8})
    info = made["structuredContent"]["saved_images"][0]
    uri, path = info["uri"], info["path"]
    missing_uri = "image://" + secrets.token_hex(6)
    # resources/list and resources/read
    assert uri in _uris(owner)
    assert uri not in _uris(other)
    assert _read_error(other, uri).replace(uri, "X") == _read_error(other, missing_uri).replace(missing_uri, "X")
    assert "blob" in owner.request("resources/read", {"uri": uri})["result"]["contents"][0]
    # image:// input and a path into the output directory
    r = other.call("test_load", {"image": uri})
    r_missing = other.call("test_load", {"image": missing_uri})
    assert r["isError"] and _text(r).replace(uri, "X") == _text(r_missing).replace(missing_uri, "X")
    r = other.call("test_load", {"image": path})
    fake = path[:-16] + secrets.token_hex(6) + ".png"
    r_missing = other.call("test_load", {"image": fake})
    assert r["isError"] and _text(r).replace(path, "X") == _text(r_missing).replace(fake, "X"), \
        (_text(r), _text(r_missing))
    assert not owner.call("test_load", {"image": path})["isError"]
    assert owner.call("test_load", {"image": uri})["structuredContent"]["shape"] == [8, 16, 3]
    # jobs: status and cancel
    job = owner.call("test_steps", {"steps": 400, "step_s": 0.05})["structuredContent"]["job_id"]
    fake_job = secrets.token_hex(8)
    st = other.call("job_status", {"job_id": job})
    st_missing = other.call("job_status", {"job_id": fake_job})
    assert st["isError"] and _text(st).replace(job, "X") == _text(st_missing).replace(fake_job, "X")
    cancel = other.call("job_cancel", {"job_id": job})
    assert cancel["isError"] and _text(cancel).replace(job, "X") == _text(st_missing).replace(fake_job, "X")
    mine = owner.call("job_status", {"job_id": job})["structuredContent"]
    assert mine["status"] in ("queued", "running"), mine
    owner.call("job_cancel", {"job_id": job})
    assert _wait_job(owner, job, ("cancelled",), 10)["status"] == "cancelled"
    return {"owner_job_status_after_other_cancel": mine["status"], "other_sees": sorted(_uris(other))}


def test_http_sessions_are_isolated(http_srv):
    a, b = HttpClient(http_srv.port), HttpClient(http_srv.port)
    fig = _check_isolated(a, b)
    old = http_srv.old_image
    assert old not in _uris(a) and old not in _uris(b)  # earlier runs' images are nobody's over HTTP
    assert "error" in a.request("resources/read", {"uri": old})
    print(f"\n[rel-scope http] {fig}")


def test_sse_sessions_are_isolated(sse_srv):
    a, b = SseClient(sse_srv.port), SseClient(sse_srv.port)
    try:
        print(f"\n[rel-scope sse] {_check_isolated(a, b)}")
    finally:
        a.close()
        b.close()
