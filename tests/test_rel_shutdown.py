"""Item 7 of the reliability suite: graceful shutdown with calls in flight.

stdio: SIGTERM, and stdin EOF; HTTP: SIGTERM and SIGINT. Each time two long
calls (`test_steps`, 2000 x 50 ms: one running on the device worker, one
queued) and one thread-pool call are in flight when the server is told to stop.
Checked: the process exits within 10 s with status 0; every in-flight call
either got an answer (a result or a "cancelled" error) or its connection
closed cleanly (stdio: stdout reached EOF after only valid JSON-RPC lines;
HTTP: the response stream ended without a transport error); the last log line
on stderr is the flushed "server stopped". Timings are printed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.reltools import StdioPeer, init_messages, server_cmd, stop, valid_jsonrpc_message
from tests.helpers import free_port, server_env, wait_port
from tests.zygote import Popen

pytestmark = pytest.mark.slow

EXIT_LIMIT_S = 10.0
LONG = {"steps": 2000, "step_s": 0.05}


def _last_log(stderr: bytes) -> dict | None:
    lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _wait_exit(proc: subprocess.Popen, t0: float) -> float | None:
    try:
        proc.wait(EXIT_LIMIT_S + 5)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


@pytest.mark.parametrize("how", ["sigterm", "stdin_eof"])
def test_stdio_shutdown_with_calls_in_flight(tmp_path, how):
    peer = StdioPeer(server_cmd("stdio"), server_env(tmp_path), tmp_path)
    try:
        assert peer.initialize() is not None
        ids = [11, 12, 13]
        peer.send({"jsonrpc": "2.0", "id": 11, "method": "tools/call",
                   "params": {"name": "test_steps", "arguments": LONG}})
        peer.send({"jsonrpc": "2.0", "id": 12, "method": "tools/call",
                   "params": {"name": "test_steps", "arguments": LONG}})
        peer.send({"jsonrpc": "2.0", "id": 13, "method": "tools/call",
                   "params": {"name": "test_load", "arguments": {"image": "missing.png"}}})
        time.sleep(1.0)
        t0 = time.monotonic()
        if how == "sigterm":
            peer.proc.send_signal(signal.SIGTERM)
        else:
            peer.proc.stdin.close()
        elapsed = _wait_exit(peer.proc, t0)
        peer._t_out.join(5)
        peer._t_err.join(5)
        outcomes = {}
        for rid in ids:
            got = peer.answers.get(json.dumps(rid))
            if got is None:
                outcomes[rid] = "closed"
            else:
                msg, when = got
                res = msg.get("result") or {}
                text = (res.get("content") or [{}])[0].get("text", "") if isinstance(res, dict) else ""
                kind = "error" if "error" in msg else ("cancelled" if "cancelled" in text else
                                                       "tool_error" if res.get("isError") else "ok")
                outcomes[rid] = f"{kind} after {round(when - t0, 3) if when > t0 else 'before'} s"
        last = _last_log(bytes(peer.stderr))
        fig = {"transport": "stdio", "how": how, "exit_s": None if elapsed is None else round(elapsed, 3),
               "returncode": peer.proc.returncode, "in_flight": outcomes,
               "stdout_lines": len(peer.lines), "invalid_stdout_lines": len(peer.bad_lines),
               "last_log": last and last.get("msg")}
        print(f"\n[rel-shutdown] {json.dumps(fig)}")
        assert elapsed is not None and elapsed < EXIT_LIMIT_S, "did not exit in time"
        assert peer.proc.returncode == 0
        assert not peer.bad_lines
        assert last is not None and last["msg"] == "server stopped", bytes(peer.stderr)[-1500:]
        # the two long calls were interrupted: cancelled, or the stream closed cleanly (EOF, valid lines only)
        for rid in (11, 12):
            assert outcomes[rid] == "closed" or outcomes[rid].startswith(("cancelled", "error")), outcomes
    finally:
        stop(peer.proc)


def _http_call(url: str, hdrs: dict, body: dict, out: dict, key: str) -> None:
    t0 = time.monotonic()
    try:
        with httpx.stream("POST", url, headers=hdrs, content=json.dumps(body), timeout=30) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data:") and line[5:].strip():
                    events.append(json.loads(line[5:]))
            answers = [e for e in events if e.get("id") == body["id"]]
            if not all(valid_jsonrpc_message(e) for e in events):
                out[key] = ("invalid", events)
            elif answers:
                res = answers[0].get("result") or {}
                text = (res.get("content") or [{}])[0].get("text", "")
                out[key] = ("cancelled" if "cancelled" in text else "error" if "error" in answers[0]
                            else "tool_error" if res.get("isError") else "ok", time.monotonic())
            else:
                out[key] = ("closed", time.monotonic())
    except httpx.HTTPError as exc:
        out[key] = (f"transport error {type(exc).__name__}: {exc}", time.monotonic() - t0)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_http_shutdown_with_calls_in_flight(tmp_path, sig):
    port = free_port()
    proc = Popen(server_cmd("http", port), env=server_env(tmp_path), stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_port(port, proc)
        base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        r = httpx.post(url, headers=base, content=json.dumps(init_messages(1)[0]), timeout=30)
        hdrs = {**base, "MCP-Protocol-Version": "2025-11-25"}
        if r.headers.get("mcp-session-id"):
            hdrs["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        httpx.post(url, headers=hdrs, content=json.dumps(init_messages(1)[1]), timeout=30)
        out: dict = {}
        calls = {
            "long-1": {"jsonrpc": "2.0", "id": 21, "method": "tools/call",
                       "params": {"name": "test_steps", "arguments": LONG}},
            "long-2": {"jsonrpc": "2.0", "id": 22, "method": "tools/call",
                       "params": {"name": "test_steps", "arguments": LONG}},
        }
        threads = [threading.Thread(target=_http_call, args=(url, hdrs, body, out, key), daemon=True)
                   for key, body in calls.items()]
        for t in threads:
            t.start()
        time.sleep(1.5)
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        elapsed = _wait_exit(proc, t0)
        for t in threads:
            t.join(10)
        err = proc.stderr.read()
        last = _last_log(err)
        shown = {k: (v[0], round(v[1] - t0, 3) if isinstance(v[1], float) and v[1] > t0 else v[1])
                 for k, v in out.items()}
        fig = {"transport": "http", "how": sig, "exit_s": None if elapsed is None else round(elapsed, 3),
               "returncode": proc.returncode, "in_flight": shown, "last_log": last and last.get("msg")}
        print(f"\n[rel-shutdown] {json.dumps(fig, default=str)}")
        assert elapsed is not None and elapsed < EXIT_LIMIT_S, "did not exit in time"
        assert proc.returncode == 0
        assert last is not None and last["msg"] == "server stopped", err[-1500:]
        assert set(out) == set(calls), "a client thread did not finish"
        for key, (kind, _) in out.items():
            assert kind in ("cancelled", "closed", "error"), (key, kind)
    finally:
        stop(proc)
