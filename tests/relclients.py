"""Shared helpers for tests/test_rel_client_*.py (issue 17: vanished clients, per-client scoping).

A real server process (tests/reltools.py) on 127.0.0.1, its JSON log read
line by line while it runs, small streamable HTTP and SSE clients built on
httpx and raw sockets (so a test can close the TCP connection itself).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.reltools import init_messages, server_cmd, stop
from tests.helpers import free_port, server_env, wait_port
from tests.zygote import Popen

PROTO = "2025-11-25"


class LiveServer:
    """tests/reltools.py serving `transport` with its stderr JSON log collected as it arrives."""

    def __init__(self, tmp_path: Path, transport: str = "http", wait: bool = True, **env: str) -> None:
        self.port = free_port()
        self.transport = transport
        self.proc = Popen(server_cmd(transport, self.port), env=server_env(tmp_path, **env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
        self.logs: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.ready()

    def ready(self) -> "LiveServer":
        """Wait until the server accepts connections (servers started with wait=False start in parallel)."""
        wait_port(self.port, self.proc)
        return self

    def _read(self) -> None:
        for raw in self.proc.stderr:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            rec["_seen"] = time.monotonic()
            with self._cond:
                self.logs.append(rec)
                self._cond.notify_all()

    def mark(self) -> int:
        """A position in the log: `wait_log(..., since=mark)` looks only at what came after it."""
        with self._cond:
            return len(self.logs)

    def wait_log(self, pred, timeout: float, since: int = 0) -> dict | None:
        """The first log record (after `since`) matching `pred`, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.logs[since:]:
                    if pred(rec):
                        return rec
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(left)

    def close(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (graceful, up to 10 s), or SIGKILL when the test does not look at shutdown."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        stop(self.proc)
        self._reader.join(5)


def tool_event(event: str, tool: str):
    return lambda r: r.get("event") == event and r.get("tool") == tool


def _sse_messages(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            out.append(json.loads(line[5:]))
    return out


class HttpClient:
    """A streamable HTTP MCP session (httpx), optionally with a bearer token."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/mcp"
        self.base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if token:
            self.base["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(timeout=120)
        r = self.http.post(self.url, headers=self.base, content=json.dumps(init_messages(1)[0]))
        assert r.status_code == 200, r.text
        self.sid = r.headers.get("mcp-session-id")
        self.headers = {**self.base, "MCP-Protocol-Version": PROTO, "Mcp-Session-Id": self.sid}
        self.http.post(self.url, headers=self.headers, content=json.dumps(init_messages(1)[1]))
        self._next = 100

    def request(self, method: str, params: dict | None = None) -> dict:
        self._next += 1
        body = {"jsonrpc": "2.0", "id": self._next, "method": method, "params": params or {}}
        r = self.http.post(self.url, headers=self.headers, content=json.dumps(body))
        assert r.status_code == 200, (r.status_code, r.text[:300])
        msgs = [m for m in _sse_messages(r.text) if m.get("id") == self._next] if "event-stream" in \
            r.headers.get("content-type", "") else [r.json()]
        assert msgs, r.text[:300]
        return msgs[0]

    def call(self, name: str, arguments: dict | None = None) -> dict:
        msg = self.request("tools/call", {"name": name, "arguments": arguments or {}})
        assert "result" in msg, msg
        return msg["result"]

    def raw_call(self, name: str, arguments: dict, rid: int = 7) -> socket.socket:
        """Send a tools/call on a socket of its own and return the socket (read nothing yet)."""
        data = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                           "params": {"name": name, "arguments": arguments}}).encode()
        head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Length: {len(data)}\r\n"
        for k, v in self.headers.items():
            head += f"{k}: {v}\r\n"
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        sock.sendall(head.encode() + b"\r\n" + data)
        return sock

    def close(self) -> None:
        self.http.close()


def read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    """Read from a raw socket until `marker` has arrived (or timeout / EOF)."""
    sock.settimeout(0.5)
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        buf += chunk
    return buf


class SseClient:
    """A legacy SSE session: GET /sse on a raw socket (read by a thread), messages POSTed with httpx."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = f"GET /sse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        for k, v in self.auth.items():
            head += f"{k}: {v}\r\n"
        self.sock.sendall(head.encode() + b"\r\n")
        self.events: list[dict] = []
        self.endpoint: str | None = None
        self._cond = threading.Condition()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        with self._cond:
            self._cond.wait_for(lambda: self.endpoint is not None, 30)
        assert self.endpoint, "no endpoint event on /sse"
        self.http = httpx.Client(timeout=60)
        self._next = 100
        self.request("initialize", init_messages(0)[0]["params"])
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    event, data = None, ""
                    for line in block.decode("utf-8", "replace").split("\n"):
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data += line[5:].strip()
                    with self._cond:
                        if event == "endpoint":
                            self.endpoint = data
                        elif data:
                            try:
                                self.events.append(json.loads(data))
                            except ValueError:
                                pass
                        self._cond.notify_all()
        except OSError:
            pass

    def post(self, msg: dict) -> None:
        r = self.http.post(f"http://127.0.0.1:{self.port}{self.endpoint}", json=msg, headers=self.auth)
        assert r.status_code in (200, 202), (r.status_code, r.text)

    def request(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self._next += 1
        rid = self._next
        self.post({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
        with self._cond:
            self._cond.wait_for(lambda: any(e.get("id") == rid for e in self.events), timeout)
            got = [e for e in self.events if e.get("id") == rid]
        assert got, f"no answer to {method}"
        return got[0]

    def send_call(self, name: str, arguments: dict) -> int:
        self._next += 1
        self.post({"jsonrpc": "2.0", "id": self._next, "method": "tools/call",
                   "params": {"name": name, "arguments": arguments}})
        return self._next

    def call(self, name: str, arguments: dict | None = None) -> dict:
        msg = self.request("tools/call", {"name": name, "arguments": arguments or {}})
        assert "result" in msg, msg
        return msg["result"]

    def close(self) -> None:
        """Close the GET /sse connection (shutdown first: a recv blocked in the reader thread would otherwise
        keep the socket open, and no FIN would be sent, until it returned)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._t.join(5)
        self.http.close()
