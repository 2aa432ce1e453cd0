"""Issue 15: three stateless replicas behind a real HAProxy, shared state in a real redis-server.

One cluster for the module (starting replicas is the slow part): 3 replicas
(`http.stateless = true`, `state.backend = "redis"`), HAProxy round-robin on
one port and hashing on `X-Atelier-Affinity` on another. The tests run in file
order; the last two break things on purpose (kill -9 a replica, restart
Redis). Expected ΔE values come from scikit-image (an independent oracle).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import itertools
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab

from tests.replicas import HaproxyProc, RedisProc, Replica, call, rpc, stop_all

COLOURS = ["#ff0000", "#fe0101", "#00ff00", "#0a0b0c", "#808080", "#7f8081", "#123456", "#fedcba"]


def _oracle(a: str, b: str) -> float:
    def lab(h: str) -> np.ndarray:
        rgb = np.array([[[int(h[i:i + 2], 16) / 255.0 for i in (1, 3, 5)]]])
        return rgb2lab(rgb)
    return float(deltaE_ciede2000(lab(a), lab(b))[0, 0])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("replicas")
    shared = work / "shared"
    (shared / "out").mkdir(parents=True)
    redis = reps = lb = None
    try:
        try:
            redis = RedisProc(work).start()
            reps = [Replica(work, f"r{i}", redis.url, shared_dir=shared).start() for i in (1, 2, 3)]
            for r in reps:
                r.wait()
            lb = HaproxyProc(work, reps).start()
        except (RuntimeError, TimeoutError) as exc:  # a missing binary or a process that would not start: fail, never skip
            pytest.fail(str(exc), pytrace=False)
        with httpx.Client() as client:
            # the balancer's health checks see every replica up before the tests start
            deadline = time.monotonic() + 30
            seen: set[str] = set()
            while len(seen) < 3 and time.monotonic() < deadline:
                a = call(client, lb.url, "engine_status", {})
                if a.replica:
                    seen.add(a.replica)
            assert len(seen) == 3, seen
        yield {"redis": redis, "replicas": reps, "lb": lb, "shared": shared, "work": work}
    finally:
        stop_all(lb, *(reps or []), redis)


def test_round_robin_mixed_load_one_answer_each(cluster):
    """200 mixed calls from 8 clients through the balancer: every call one answer, right values, no session
    errors, and all three replicas served."""
    lb = cluster["lb"]
    pairs = list(itertools.combinations(COLOURS, 2))
    work = [("color_compare", {"color_a": a, "color_b": b}) if i % 4 else ("engine_status", {})
            for i, (a, b) in zip(range(200), itertools.cycle(pairs))]

    def client_run(chunk):
        out = []
        with httpx.Client() as c:
            for rid, (tool, args) in chunk:
                out.append((rid, tool, args, call(c, lb.url, tool, args, rid=rid)))
        return out

    chunks = [list(enumerate(work))[k::8] for k in range(8)]
    with cf.ThreadPoolExecutor(8) as ex:
        results = [r for part in ex.map(client_run, chunks) for r in part]
    assert len(results) == 200
    replicas = set()
    for rid, tool, args, ans in results:
        assert ans.status == 200, (rid, ans.status, ans.messages)
        assert len(ans.replies) == 1, (rid, ans.messages)  # exactly one answer, to this request id
        assert ans.error is None and not ans.result.get("isError"), ans.messages
        replicas.add(ans.replica)
        if tool == "color_compare":
            want = _oracle(args["color_a"], args["color_b"])
            assert ans.result["structuredContent"]["delta_e"] == pytest.approx(want, abs=1e-3)
    assert len(replicas) == 3


def test_official_sdk_client_through_the_balancer(cluster):
    """The SDK's own streamable HTTP client: initialize on one replica, then list and call on the others,
    round-robin, with no session errors (stateless: no mcp-session-id to lose)."""
    import asyncio

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from tests.replicas import TOKEN

    async def run() -> list[float]:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx2.Timeout(60))
        async with http, Client(streamable_http_client(cluster["lb"].url, http_client=http)) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"color_compare", "job_status", "job_cancel"} <= names
            out = []
            for _ in range(9):
                r = await c.call_tool("color_compare", {"color_a": "#123456", "color_b": "#fedcba"})
                assert not r.is_error
                out.append(r.structured_content["delta_e"])
            return out

    got = asyncio.run(run())
    assert got == pytest.approx([_oracle("#123456", "#fedcba")] * 9, abs=1e-3)


def _png(path: Path, rgb: tuple[int, int, int], size: int = 32) -> str:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = rgb
    arr[: size // 2, : size // 2] = (255 - rgb[0], rgb[1], rgb[2])
    Image.fromarray(arr).save(path)
    return str(path)


def test_image_link_made_on_one_replica_reads_on_another(cluster):
    r1, r2, r3 = cluster["replicas"]
    shared = cluster["shared"]
    a = _png(shared / "a.png", (200, 30, 40))
    b = _png(shared / "b.png", (190, 35, 45))
    with httpx.Client() as c:
        made = call(c, r1.url, "color_compare", {"image_a": a, "image_b": b, "heatmap": True})
        links = [x for x in made.result["content"] if x.get("type") == "resource_link"]
        assert len(links) == 1, made.result
        uri = links[0]["uri"]
        path = Path(made.result["structuredContent"]["saved_images"][0]["path"])
        for other in (r2, r3):
            read = rpc(c, other.url, "resources/read", {"uri": uri})
            assert read.replica != made.replica
            blob = read.result["contents"][0]["blob"]
            assert base64.b64decode(blob) == path.read_bytes()
            # and as a tool input on that replica: the heatmap compared with itself is identical
            same = call(c, other.url, "color_compare", {"image_a": uri, "image_b": uri, "heatmap": False})
            assert same.result["structuredContent"]["max"] == 0.0
        listed = rpc(c, r3.url, "resources/list", {})
        assert uri in [x["uri"] for x in listed.result["resources"]]
        unknown = rpc(c, r2.url, "resources/read", {"uri": "image://0123456789ab"})
        assert unknown.error is not None


def _start_job(c: httpx.Client, url: str, tokens: int = 1000) -> tuple[str, str]:
    ans = call(c, url, "generate_text", {"prompt": "Tell a very long story about a lighthouse keeper.",
                                         "max_new_tokens": tokens})
    sc = ans.result["structuredContent"]
    assert "job_id" in sc, ans.result  # the call outlasted limits.deadline_s = 1 s
    return sc["job_id"], ans.replica


def _wait_status(c, url, job_id, want, timeout=60.0):
    t0 = time.monotonic()
    while True:
        ans = call(c, url, "job_status", {"job_id": job_id})
        sc = ans.result.get("structuredContent") or {}
        if sc.get("status") in want or time.monotonic() - t0 > timeout:
            return ans
        time.sleep(0.1)


def test_job_started_on_one_replica_is_polled_and_cancelled_through_the_others(cluster):
    r1, r2, r3 = cluster["replicas"]
    with httpx.Client() as c:
        job_id, where = _start_job(c, r1.url)
        # polled through r2: running, with progress as r1 reports it (the model loads, then tokens come)
        running = _wait_status(c, r2.url, job_id, {"running"})
        assert running.replica != where
        assert running.result["structuredContent"]["status"] == "running"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:  # the model loads first (seconds; much longer on a busy machine)
            st = call(c, r2.url, "job_status", {"job_id": job_id}).result["structuredContent"]
            if st["progress"] >= 1:
                break
            time.sleep(0.1)
        assert st["progress"] >= 1 and "tokens" in (st["message"] or ""), st  # r1's decoding progress, seen on r2
        cancel = call(c, r3.url, "job_cancel", {"job_id": job_id})
        assert cancel.replica not in (where, running.replica)
        assert "cancellation requested" in cancel.text
        done = _wait_status(c, r2.url, job_id, {"cancelled", "done", "error"}, timeout=120)
        sc = done.result["structuredContent"]
        assert sc["status"] == "cancelled", sc
        assert sc["error"] == "cancelled by job_cancel"
        assert sc["result"]["finish_reason"] == "cancelled"
        assert sc["result"]["completion_tokens"] < 1000
        # the same answer from every replica
        for r in (r1, r3):
            assert call(c, r.url, "job_status", {"job_id": job_id}).result["structuredContent"]["status"] == "cancelled"
        unknown = call(c, r3.url, "job_status", {"job_id": "00112233445566ff"})
        assert unknown.result["isError"] and "no such job" in unknown.text


def test_task_created_on_one_replica_is_read_and_cancelled_on_others(cluster):
    r1, r2, r3 = cluster["replicas"]
    with httpx.Client() as c:
        made = rpc(c, r1.url, "tools/call", {"name": "generate_text", "task": {"ttl": 600000},
                                             "arguments": {"prompt": "Tell a very long story about a dragon.",
                                                           "max_new_tokens": 1000}})
        task_id = made.result["task"]["taskId"]
        got = rpc(c, r2.url, "tasks/get", {"taskId": task_id})
        assert got.result["status"] == "working"
        listed = rpc(c, r3.url, "tasks/list", {})
        assert task_id in [t["taskId"] for t in listed.result["tasks"]]
        cancelled = rpc(c, r3.url, "tasks/cancel", {"taskId": task_id})
        assert cancelled.result["status"] == "cancelled"
        final = rpc(c, r2.url, "tasks/result", {"taskId": task_id}, timeout=240)
        assert final.result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task_id}
        res = final.result  # cancelled while decoding (partial text) or before the first step (an error result)
        assert (res.get("structuredContent") or {}).get("finish_reason") == "cancelled" \
            or (res.get("isError") and "cancelled" in final.text), res
        assert rpc(c, r1.url, "tasks/get", {"taskId": task_id}).result["status"] == "cancelled"


def test_affinity_header_keeps_a_conversation_on_one_replica(cluster):
    lb = cluster["lb"]
    with httpx.Client() as c:
        by_key = {}
        for key in ("conversation-a", "conversation-b", "conversation-c", "conversation-d", "conversation-e"):
            seen = {call(c, lb.affinity_url, "engine_status", {}, headers={"X-Atelier-Affinity": key}).replica
                    for _ in range(6)}
            assert len(seen) == 1, (key, seen)  # every call of a conversation on the same replica
            by_key[key] = seen.pop()
        assert len(set(by_key.values())) >= 2, by_key  # different conversations spread out
        # no key: round-robin, every replica still serves
        plain = {call(c, lb.affinity_url, "engine_status", {}).replica for _ in range(9)}
        assert len(plain) == 3


def test_kill9_replica_under_load(cluster):
    """kill -9 one replica: its running job turns failed with a reason, a job it finished keeps its result,
    and the clients' next calls all succeed through the other two."""
    r1, r2, r3 = cluster["replicas"]
    lb = cluster["lb"]
    with httpx.Client() as c:
        made = rpc(c, r1.url, "tools/call", {"name": "generate_text", "task": {"ttl": 600000},  # always shared
                                             "arguments": {"prompt": "Say hello.", "max_new_tokens": 4}})
        finished_id = made.result["task"]["taskId"]
        fin = _wait_status(c, r2.url, finished_id, {"done", "cancelled", "error"}, timeout=240)
        assert fin.result["structuredContent"]["status"] == "done"
        finished_text = fin.result["structuredContent"]["result"]["text"]
        running_id, _ = _start_job(c, r1.url)
        assert _wait_status(c, r2.url, running_id, {"running"}).result["structuredContent"]["status"] == "running"

        stop = time.monotonic() + 6.0
        errors_after: list = []

        def load(k: int) -> int:
            n = 0
            with httpx.Client() as cc:
                while time.monotonic() < stop:
                    t = time.monotonic()
                    try:
                        a = call(cc, lb.url, "color_compare", {"color_a": "#ff0000", "color_b": "#00ff00"},
                                 rid=k, timeout=30)
                        ok = a.status == 200 and a.reply is not None and not a.result.get("isError")
                    except httpx.HTTPError as exc:
                        ok, a = False, exc
                    if not ok and t > killed_at[0] + 1.0:  # calls begun after the balancer noticed
                        errors_after.append(a)
                    n += 1
            return n

        killed_at = [float("inf")]
        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(load, k) for k in range(4)]
            time.sleep(1.0)
            r1.kill9()
            killed_at[0] = time.monotonic()
            counts = [f.result() for f in futs]
        assert sum(counts) > 8
        assert errors_after == []
        # within state.lease_s (5 s) plus a read, the dead replica's job reads failed, everywhere alike
        t0 = time.monotonic()
        st = _wait_status(c, r3.url, running_id, {"error", "done", "cancelled"}, timeout=15)
        assert time.monotonic() - t0 < 15
        sc = st.result["structuredContent"]
        assert sc["status"] == "error"
        assert "stopped responding" in sc["error"] and "replica" in sc["error"]
        assert call(c, r2.url, "job_status", {"job_id": running_id}).result["structuredContent"]["error"] \
            == sc["error"]
        kept = call(c, r2.url, "job_status", {"job_id": finished_id}).result["structuredContent"]
        assert kept["status"] == "done" and kept["result"]["text"] == finished_text


def test_redis_restart_fails_clearly_then_recovers(cluster):
    """Redis killed: calls that need shared state fail with an error naming state.redis_url; calls that do not
    still work. Redis back on the same port: the replicas reconnect by themselves and shared state works again
    (a new image link made on one replica reads on the other)."""
    _, r2, r3 = cluster["replicas"]  # r1 was killed above
    redis = cluster["redis"]
    shared = cluster["shared"]
    a = _png(shared / "c.png", (10, 200, 40))
    b = _png(shared / "d.png", (12, 190, 45))
    with httpx.Client() as c:
        redis.kill()
        down = call(c, r2.url, "job_status", {"job_id": "00112233445566ff"})
        assert down.result["isError"]
        assert "state.redis_url='redis://127.0.0.1:" in down.text and "cannot reach Redis" in down.text
        img_down = call(c, r3.url, "color_compare", {"image_a": a, "image_b": b, "heatmap": True})
        assert img_down.result["isError"] and "state.redis_url=" in img_down.text  # the link could not be shared
        # calls that need no shared state still work
        assert not call(c, r2.url, "color_compare", {"color_a": "red", "color_b": "blue"}).result["isError"]
        redis.start()  # the same port, empty (no persistence in this test)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            up = call(c, r2.url, "job_status", {"job_id": "00112233445566ff"})
            if "no such job" in up.text:
                break
            time.sleep(0.2)
        assert "no such job" in up.text  # answered from Redis again
        made = call(c, r3.url, "color_compare", {"image_a": a, "image_b": b, "heatmap": True})
        uri = made.result["structuredContent"]["saved_images"][0]["uri"]
        path = Path(made.result["structuredContent"]["saved_images"][0]["path"])
        read = rpc(c, r2.url, "resources/read", {"uri": uri})
        assert base64.b64decode(read.result["contents"][0]["blob"]) == path.read_bytes()
