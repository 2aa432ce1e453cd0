"""Item 8 of the reliability suite: `mcp-fuzzer` (PyPI) against stdio and HTTP.

The fuzzer fuzzes every tool the server lists (`--mode tools`, realistic and
aggressive phases, a fixed number of runs and a fixed seed), with the sandbox
read root pointed at a temp dir (`REL_TOOLSET=fuzz`: the real tools plus the
test tools `test_load` (a path argument) and `test_image`; small limits so no
valid call runs long). Canaries sit outside the read root: a text file, a
7 x 13 PNG, and a symlink to it inside the root; their access times are set
back so any read would show.

Pass: the fuzzer completes and reports 0 crashes, 0 transport/protocol
anomalies and 0 fuzzer exceptions; no canary was read (access time unchanged),
no fuzzer evidence or output file contains a canary's content (or
/etc/passwd's), and the server still answers `tools/list` afterwards (HTTP) /
the stdio server the fuzzer spawned left a clean log. Figures printed per tool.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.reltools import ROOT, init_messages, server_cmd, stop
from tests.helpers import free_port, server_env, wait_port
from tests.zygote import Popen

pytestmark = pytest.mark.slow

FUZZER = str(Path(sys.executable).parent / "mcp-fuzzer")
RUNS = 3
SEED = 4242
CANARY_TEXT = "ATELIER-CANARY-7f3c91d2"
LIMITS = {"ATELIER_LIMITS__MAX_NEW_TOKENS": "8", "ATELIER_LIMITS__MAX_DIFFUSION_STEPS": "2",
          "ATELIER_LIMITS__MAX_IMAGE_SIDE": "256", "ATELIER_LIMITS__DEADLINE_S": "5",
          "ATELIER_LIMITS__MAX_K": "20", "ATELIER_LIMITS__MAX_CATALOG_ROWS": "1000", "REL_TOOLSET": "fuzz"}


def _plant_canaries(tmp: Path) -> dict[Path, float]:
    (tmp / "canary.txt").write_text(CANARY_TEXT + "\n")
    arr = np.full((13, 7, 3), 200, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (tmp / "canary.png").write_bytes(buf.getvalue())
    (tmp / "data" / "inside.png").write_bytes(buf.getvalue())  # a legitimate input the fuzzer may find
    os.symlink(tmp / "canary.png", tmp / "data" / "escape.png")
    os.symlink(tmp / "canary.txt", tmp / "data" / "escape.txt")
    old = time.time() - 10_000
    times = {}
    for p in (tmp / "canary.txt", tmp / "canary.png"):
        os.utime(p, (old, time.time()))
        times[p] = os.stat(p).st_atime
    return times


def _fuzz(args: list[str], env: dict[str, str], cwd: Path, reports: Path) -> dict:
    cmd = [FUZZER, "--mode", "tools", "--phase", "both", "--runs", str(RUNS), "--seed", str(SEED),
           "--no-network", "--fs-root", str(cwd / "fuzz-fsroot"), "--output-dir", str(reports),
           "--tool-timeout", "30", "--timeout", "30", "--fail-if-no-tools", "--log-level", "ERROR", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, timeout=240, stdin=subprocess.DEVNULL)
    summary = json.loads((reports / "run_summary.json").read_text())
    findings = json.loads((reports / "findings.json").read_text()) if (reports / "findings.json").exists() else {}
    return {"rc": proc.returncode, "seconds": time.monotonic() - t0, "summary": summary, "findings": findings,
            "stdout": proc.stdout.decode("utf-8", "replace"), "stderr": proc.stderr.decode("utf-8", "replace")}


CLIENT_SIDE = ("Out of range float values are not JSON compliant",)  # the fuzzer's own JSON encoder refused


def _client_side(detail: dict) -> bool:
    """Errors inside the fuzzer, not the server: its JSON encoder refusing +-Infinity, or its stdio
    driver's 256 KiB line cap meeting a full-resolution image answered inline (inline_full=true)."""
    msg = str(detail.get("message", ""))
    args = detail.get("arguments") or {}
    return msg.startswith(CLIENT_SIDE) or (msg == "Failed to receive message from stdio transport"
                                           and isinstance(args, dict) and args.get("inline_full") is True)


def _exception_details(tmp: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for sess in (tmp / "reports" / "sessions").glob("*/*.json"):
        for t in json.loads(sess.read_text()).get("data", {}).get("tools_tested", []) or []:
            if isinstance(t, dict) and t.get("exception_details"):
                out.setdefault(t.get("name"), []).extend(t["exception_details"])
    return out


def _check(res: dict, tmp: Path, atimes: dict[Path, float], label: str) -> list[str]:
    problems = []
    tools = res["summary"].get("tools", {}).get("by_name", {})
    details = _exception_details(tmp)
    totals = {"runs": 0, "server_rejected": 0, "accepted_malformed": 0, "anomaly": 0, "crashed": 0, "exceptions": 0,
              "client_side_errors": 0}
    for name, t in tools.items():
        oc = t.get("outcomes", {})
        totals["runs"] += t.get("total_runs", 0)
        for k in ("server_rejected", "accepted_malformed", "anomaly", "crashed"):
            totals[k] += oc.get(k, 0)
        real = [d for d in details.get(name, []) if not _client_side(d)]
        client = len(details.get(name, [])) - len(real)
        totals["client_side_errors"] += client
        n_exc = max(0, max(oc.get("exceptions", 0), t.get("exceptions", 0)) - client)
        totals["exceptions"] += n_exc
        if oc.get("crashed") or oc.get("anomaly") or n_exc > 0:
            problems.append(f"{label} {name}: {oc} {json.dumps(real)[:600]}")
    leaked_text = json.dumps(res["findings"]) + res["stdout"]
    for marker in (CANARY_TEXT, "root:x:0:0", "[13, 7, 3]", "[13,7,3]"):
        if marker in leaked_text:
            problems.append(f"{label}: fuzzer evidence contains {marker!r}")
    for p, t in atimes.items():
        if os.stat(p).st_atime != t:
            problems.append(f"{label}: {p.name} outside the read root was read")
    for f in (tmp / "out").glob("*") if (tmp / "out").exists() else []:
        if f.is_file() and CANARY_TEXT.encode() in f.read_bytes():
            problems.append(f"{label}: output {f.name} contains the canary")
    if res["rc"] != 0:
        problems.append(f"{label}: fuzzer exit status {res['rc']}: {res['stderr'][-800:]}")
    if len(tools) < 3:
        problems.append(f"{label}: only {len(tools)} tools fuzzed")
    print(f"\n[rel-fuzz {label}] mcp-fuzzer, {len(tools)} tools x {RUNS} runs x 2 phases in {res['seconds']:.1f} s: "
          f"{json.dumps(totals)}; problems {len(problems)}")
    for name, t in sorted(tools.items()):
        print(f"   {name:18} {json.dumps(t.get('outcomes', {}))}")
    return problems


@pytest.fixture()
def fuzz_env(tmp_path):
    if not Path(FUZZER).exists() and not shutil.which("mcp-fuzzer"):
        pytest.fail("mcp-fuzzer is not installed in this environment (pip install mcp-fuzzer==0.7.0)")
    env = server_env(tmp_path, **LIMITS)
    atimes = _plant_canaries(tmp_path)
    return env, atimes


def test_fuzz_stdio(tmp_path, fuzz_env):
    env, atimes = fuzz_env
    endpoint = shlex.join(server_cmd("stdio"))
    res = _fuzz(["--protocol", "stdio", "--endpoint", endpoint], env, tmp_path, tmp_path / "reports")
    problems = _check(res, tmp_path, atimes, "stdio")
    assert not problems, "\n".join(problems)


def test_fuzz_http(tmp_path, fuzz_env):
    env, atimes = fuzz_env
    port = free_port()
    proc = Popen(server_cmd("http", port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 cwd=tmp_path)
    try:
        wait_port(port, proc)
        url = f"http://127.0.0.1:{port}/mcp"
        res = _fuzz(["--protocol", "http", "--endpoint", url], env, tmp_path, tmp_path / "reports")
        problems = _check(res, tmp_path, atimes, "http")
        assert proc.poll() is None, "the server died under fuzzing"
        hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        r = httpx.post(url, headers=hdrs, content=json.dumps(init_messages(1)[0]), timeout=30)
        hdrs["Mcp-Session-Id"] = r.headers.get("mcp-session-id", "")
        r = httpx.post(url, headers=hdrs, content=json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
                       timeout=30)
        assert r.status_code == 200 and "test_load" in r.text, "the server no longer lists its tools"
        assert not problems, "\n".join(problems)
    finally:
        stop(proc)
    err = proc.stderr.read().decode("utf-8", "replace")
    print(f"[rel-fuzz http] server log: {err.count(chr(10))} lines, "
          f"{err.count('unexpected exception')} unexpected tool exceptions, {err.count('Traceback')} tracebacks")
    assert ROOT.exists()
