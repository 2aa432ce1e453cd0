"""Test-only tools for the reliability and security suite (tests/test_rel_*.py),
plus the helpers those tests share (server processes, memory figures).

Tools (added to the real server next to tests/tooling.py's TEST_TOOLS):
- `rel_mem`: the server process's own RSS, peak RSS, threads and open files;
- `rel_oom_load`: registers a model in `engine.registry` whose loader allocates
  `alloc_mb` MiB and then raises `torch.OutOfMemoryError`, and asks for it;
- `rel_oom_work`: allocates `alloc_mb` MiB over `steps` steps, then raises
  `torch.OutOfMemoryError` mid-work;
- `rel_noise_image`: `count` incompressible noise images (slow to write, so a
  `kill -9` lands mid-write often).

`python tests/reltools.py stdio` or `python tests/reltools.py http|sse PORT`
serves the real server with these tools and TEST_TOOLS (with `REL_TOOLSET=fuzz`:
the real tools plus `test_load` and `test_image` only).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tools.base import ImageOut, ToolOutput, ToolSpec  # noqa: E402
from tests.zygote import Popen  # noqa: E402

MiB = 1024 * 1024


# --------------------------------------------------------------------------- memory figures
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) in bytes from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak(pid: int | str = "self") -> bool:
    """Reset the peak RSS (VmHWM) of a process to its current RSS (Linux clear_refs 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemOut(BaseModel):
    rss_before_gc: int
    rss: int
    peak_rss: int
    threads: int
    open_files: int


def _mem(args: Empty, ctx) -> ToolOutput:
    import psutil

    p = psutil.Process()
    before = p.memory_info().rss
    gc.collect()
    st = proc_status()
    out = MemOut(rss_before_gc=before, rss=p.memory_info().rss, peak_rss=st.get("VmHWM", 0), threads=p.num_threads(),
                 open_files=len(os.listdir("/proc/self/fd")))
    return ToolOutput(text=json.dumps(out.model_dump()), structured=out)


class OomIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alloc_mb: int = Field(64, ge=0, le=2048, description="MiB to allocate before the injected OOM")
    steps: int = Field(4, ge=1, le=64, description="steps the allocation is spread over (rel_oom_work)")


class OomOut(BaseModel):
    ok: bool


def _oom_load(args: OomIn, ctx) -> ToolOutput:
    import torch

    calls = []

    def loader():
        calls.append(1)
        held = torch.ones(args.alloc_mb * MiB // 4, dtype=torch.float32)  # [N] float32: alloc_mb MiB
        held += 1
        raise torch.OutOfMemoryError(f"injected: CUDA out of memory. Tried to allocate {args.alloc_mb} MiB")

    ctx.engine.registry.register("rel_oom_model", loader, family="test", source="injected", replace=True)
    ctx.engine.registry.get("rel_oom_model")  # raises InsufficientMemory
    return ToolOutput(text="loaded?!", structured=OomOut(ok=True))


def _oom_work(args: OomIn, ctx) -> ToolOutput:
    import torch

    held = []
    per = max(1, args.alloc_mb * MiB // 4 // args.steps)
    for i in range(args.steps):
        ctx.check()
        held.append(torch.ones(per, dtype=torch.float32))  # [per] float32
        ctx.report(i + 1, args.steps + 1, "allocating")
    raise torch.OutOfMemoryError("injected: CUDA out of memory during work. Tried to allocate 2.00 GiB")


class NoiseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    side: int = Field(512, ge=8, le=2048)
    count: int = Field(1, ge=1, le=8)
    seed: int = 0


class NoiseOut(BaseModel):
    count: int


def _noise(args: NoiseIn, ctx) -> ToolOutput:
    rng = np.random.default_rng(args.seed)
    imgs = [ImageOut(rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8), "noise", {"seed": str(args.seed)})
            for _ in range(args.count)]
    return ToolOutput(text=f"{args.count} images", structured=NoiseOut(count=args.count), images=imgs)


REL_TOOLS = [
    ToolSpec("rel_mem", "mem", "server process memory, threads, open files", Empty, MemOut, _mem,
             execution="thread"),
    ToolSpec("rel_oom_load", "oom load", "injected OOM while loading a model", OomIn, OomOut, _oom_load,
             execution="device"),
    ToolSpec("rel_oom_work", "oom work", "injected OOM mid-work", OomIn, OomOut, _oom_work, execution="device"),
    ToolSpec("rel_noise_image", "noise", "writes noise images", NoiseIn, NoiseOut, _noise, execution="device"),
]


# --------------------------------------------------------------------------- shared test helpers
def server_cmd(transport: str, port: int | None = None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "tests" / "reltools.py"), transport]
    return cmd + ([str(port)] if port is not None else [])


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def init_messages(first_id: int = 1) -> list[dict]:
    return [
        {"jsonrpc": "2.0", "id": first_id, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "rel", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]


class StdioPeer:
    """A raw JSON-RPC peer on a stdio server subprocess: writes bytes, collects every stdout line."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        import threading

        self.proc = Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        self.lines: list[bytes] = []
        self.answers: dict = {}  # id -> (message, monotonic time)
        self.bad_lines: list[bytes] = []
        self.stderr = bytearray()
        self._cond = threading.Condition()
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out.start()
        self._t_err.start()

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            now = time.monotonic()
            with self._cond:
                self.lines.append(raw)
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self.bad_lines.append(raw)
                    self._cond.notify_all()
                    continue
                if not valid_jsonrpc_message(msg):
                    self.bad_lines.append(raw)
                elif "id" in msg and ("result" in msg or "error" in msg):
                    key = json.dumps(msg["id"])
                    self.answers[key] = (msg, now)
                self._cond.notify_all()

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            self.stderr += raw

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data if data.endswith(b"\n") else data + b"\n")
        self.proc.stdin.flush()

    def send(self, msg: dict) -> None:
        self.send_raw(json.dumps(msg).encode())

    def wait_answer(self, rid, timeout: float = 30) -> dict | None:
        key = json.dumps(rid)
        with self._cond:
            self._cond.wait_for(lambda: key in self.answers or self.proc.poll() is not None, timeout)
            got = self.answers.get(key)
        return got[0] if got else None

    def request(self, rid, method: str, params: dict | None = None, timeout: float = 30) -> dict | None:
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return self.wait_answer(rid, timeout)

    def initialize(self) -> dict | None:
        msgs = init_messages(0)
        self.send(msgs[0])
        ans = self.wait_answer(0, 60)
        self.send(msgs[1])
        return ans

    def log_lines(self) -> list[dict]:
        out = []
        for ln in bytes(self.stderr).decode("utf-8", "replace").splitlines():
            if ln.startswith("{"):
                try:
                    out.append(json.loads(ln))
                except ValueError:
                    pass
        return out


def valid_jsonrpc_message(msg: object) -> bool:
    """A JSON-RPC 2.0 response, request or notification (the shapes a server may write)."""
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        return False
    if "method" in msg:
        return isinstance(msg["method"], str)
    if "id" not in msg or ("result" in msg) == ("error" in msg):
        return False
    if "error" in msg:
        err = msg["error"]
        return isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("message"), str)
    return True


def wait_for(pred, timeout: float, step: float = 0.02) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(step)
    return pred()


def main() -> None:
    from mcp_server.app import build_server
    from mcp_server.config import load_settings
    from mcp_server.logs import setup_logging
    from tooling import TEST_TOOLS

    settings = load_settings()
    setup_logging(settings.logging.level, settings.logging.format)
    if os.environ.get("REL_TOOLSET") == "fuzz":
        # the real tools plus the two test tools that take input (a path / sizes); not the
        # fault-injection tools, whose whole purpose is to allocate or sleep on request
        extra = [t for t in TEST_TOOLS if t.name in ("test_load", "test_image")]
    else:
        extra = [*TEST_TOOLS, *REL_TOOLS]
    server = build_server(settings, extra_specs=extra)
    mode = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    import mcp_server.transports as transports

    if mode == "stdio":
        transports.serve_stdio(server)
    else:
        transports.serve_http(server, mode, "127.0.0.1", int(sys.argv[2]))


if __name__ == "__main__":
    main()
