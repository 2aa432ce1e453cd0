"""Test helpers for issue 15: a real redis-server, real atelier replicas and a real HAProxy, on loopback ports.

Nothing is mocked: `RedisProc` runs `redis-server --save '' --appendonly no`,
`Replica` runs `python -m mcp_server.cli serve --transport http` with a TOML
config of its own, `HaproxyProc` runs `haproxy -f <generated cfg>`. A
missing binary fails at once with one line naming the Debian packages (never
a skip). `rpc()` speaks MCP's streamable HTTP directly (one JSON-RPC POST, the
answer read from the SSE stream), which is what a stateless client does.
Also used by benchmarks/replicas_bench.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import free_port, wait_port
from tests.zygote import Popen

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = "redis-server haproxy"
TOKEN = "replica-test-token-0123456789"
PROTOCOL = "2025-11-25"


def need_binary(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        raise RuntimeError(f"{name} not found: install the Debian packages {PACKAGES} "
                           f"(apt-get install -y {PACKAGES}; `make test` does this as root)")
    return path


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait: float = 8.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class RedisProc:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = need_binary("redis-server")
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_port(self.port, self.proc, 20, "redis-server")
        return self

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)


class Replica:
    def __init__(self, workdir: Path, name: str, redis_url: str, *, shared_dir: Path, extra: str = "",
                 stateless: bool = True, backend: str = "redis", deadline_s: float = 1.0) -> None:
        self.name = name
        self.port = free_port()
        self.config = workdir / f"{name}.toml"
        self.log = workdir / f"{name}.log"
        roots = json.dumps([str(shared_dir)])
        self.config.write_text(f"""
[paths]
output_dir = {json.dumps(str(shared_dir / "out"))}
read_roots = {roots}
[engine]
cache_dir = {json.dumps(os.environ.get("ATELIER_TEST_CACHE", str(workdir / "cache")))}
torch_threads = 1
[limits]
deadline_s = {deadline_s}
[http]
stateless = {str(stateless).lower()}
auth_token = "{TOKEN}"
[state]
backend = "{backend}"
redis_url = "{redis_url}"
heartbeat_s = 0.5
lease_s = 5.0
[logging]
level = "WARNING"
[tools]
enabled = ["color_compare", "engine_status", "generate_text", "job_status", "job_cancel"]
{extra}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> Replica:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ATELIER_CONFIG", None)
        log = open(self.log, "ab")
        self.proc = Popen([sys.executable, "-m", "mcp_server.cli", "serve", "--transport", "http",
                                      "--port", str(self.port), "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        return self

    def wait(self, timeout: float = 240.0) -> Replica:
        wait_port(self.port, self.proc, timeout, f"replica {self.name} (log {self.log})")
        return self

    def kill9(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)


class HaproxyProc:
    """Two frontends: `port` (round-robin) and `affinity_port` (hash on the X-Atelier-Affinity header)."""

    def __init__(self, workdir: Path, replicas: list[Replica]) -> None:
        self.binary = need_binary("haproxy")
        self.port, self.affinity_port = free_port(), free_port()
        self.cfg = workdir / "haproxy.cfg"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check inter 300ms fall 2 rise 1"
                            for r in replicas)
        self.cfg.write_text(f"""
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend rr
    bind 127.0.0.1:{self.port}
    default_backend replicas
frontend affinity
    bind 127.0.0.1:{self.affinity_port}
    default_backend replicas_affinity
backend replicas
    balance roundrobin
{servers}
backend replicas_affinity
    balance hdr(X-Atelier-Affinity)
    hash-type consistent
{servers}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def affinity_url(self) -> str:
        return f"http://127.0.0.1:{self.affinity_port}/mcp"

    def start(self) -> HaproxyProc:
        check = subprocess.run([self.binary, "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config rejected: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.cfg)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.cfg.with_suffix(".log"), "ab"))
        wait_port(self.port, self.proc, 20, "haproxy")
        wait_port(self.affinity_port, self.proc, 20, "haproxy")
        return self

    def stop(self) -> None:
        _stop(self.proc)


# ------------------------------------------------------------------------------------------ the client side
class Answer:
    def __init__(self, status: int, replica: str | None, messages: list[dict[str, Any]], rid: int) -> None:
        self.status, self.replica, self.messages = status, replica, messages
        replies = [m for m in messages if m.get("id") == rid and ("result" in m or "error" in m)]
        self.replies = replies
        self.reply = replies[0] if len(replies) == 1 else None

    @property
    def result(self) -> dict[str, Any]:
        assert self.reply is not None and "result" in self.reply, (self.status, self.messages)
        return self.reply["result"]

    @property
    def error(self) -> dict[str, Any] | None:
        return None if self.reply is None else self.reply.get("error")

    @property
    def text(self) -> str:
        return "\n".join(c.get("text", "") for c in self.result.get("content", []) if c.get("type") == "text")


def rpc(client: httpx.Client, url: str, method: str, params: dict[str, Any], rid: int = 1,
        headers: dict[str, str] | None = None, timeout: float = 120.0) -> Answer:
    """One JSON-RPC request over streamable HTTP (stateless: no initialize, no session)."""
    h = {"accept": "application/json, text/event-stream", "content-type": "application/json",
         "authorization": f"Bearer {TOKEN}", "mcp-protocol-version": PROTOCOL, **(headers or {})}
    r = client.post(url, headers=h, json={"jsonrpc": "2.0", "id": rid, "method": method, "params": params},
                    timeout=timeout)
    messages: list[dict[str, Any]] = []
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                messages.append(json.loads(line[5:]))
    elif r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        messages.extend(body if isinstance(body, list) else [body])
    return Answer(r.status_code, r.headers.get("x-atelier-replica"), messages, rid)


def call(client: httpx.Client, url: str, tool: str, arguments: dict[str, Any], rid: int = 1,
         **kw: Any) -> Answer:
    return rpc(client, url, "tools/call", {"name": tool, "arguments": arguments}, rid, **kw)


def stop_all(*procs: Any) -> None:
    """SIGTERM to all at once, then wait for each (a replica takes a few seconds to shut down)."""
    live = [p for p in procs if p is not None and p.proc is not None and p.proc.poll() is None]
    for p in live:
        try:
            p.proc.send_signal(signal.SIGTERM)
        except OSError:
            pass
    for p in live:
        try:
            p.proc.wait(8)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(5)
