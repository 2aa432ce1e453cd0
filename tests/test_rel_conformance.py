"""Item 9 of the reliability suite: the official MCP conformance suite against our HTTP transport.

Runs `conformance server --url http://127.0.0.1:PORT/mcp` from the npm package
`@modelcontextprotocol/conformance` (Node 22 through npx, like tests/inspector.py)
against `atelier serve --transport http` on an ephemeral loopback port, reads
each scenario's checks.json, and compares the failed scenarios with
tests/conformance_expected_failures.txt ("<scenario>: <reason>" per line):
an unexpected failure fails the test, and so does a listed scenario that now
passes (a stale entry). Figures: scenarios run, passed, failed (expected /
unexpected).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reltools import stop
from tests.helpers import free_port, server_env, wait_port
from tests.inspector import CONFORMANCE
from tests.zygote import Popen

pytestmark = pytest.mark.slow

EXPECTED = Path(__file__).resolve().parent / "conformance_expected_failures.txt"
ATELIER = str(Path(sys.executable).parent / "atelier")


def expected_failures() -> dict[str, str]:
    out = {}
    for line in EXPECTED.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, reason = line.partition(":")
        assert sep and reason.strip(), f"entry without a reason: {line!r}"
        out[name.strip()] = reason.strip()
    return out


def read_results(out_dir: Path) -> dict[str, list[dict]]:
    """scenario -> its checks (from <out>/server-<scenario>-<timestamp>/checks.json)."""
    res = {}
    for d in sorted(out_dir.iterdir()):
        m = re.match(r"^server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$", d.name)
        if m and (d / "checks.json").exists():
            res[m.group(1)] = json.loads((d / "checks.json").read_text())
    return res


def test_official_conformance_suite_over_http(tmp_path):
    port = free_port()
    proc = Popen([ATELIER, "serve", "--transport", "http", "--port", str(port)],
                 env=server_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 cwd=tmp_path)
    out_dir = tmp_path / "conformance"
    try:
        wait_port(port, proc)
        inner = f"conformance server --url http://127.0.0.1:{port}/mcp -o {out_dir}"
        run = subprocess.run(["npx", "-y", "-p", "node@22", "-p", CONFORMANCE, "--", "sh", "-c", inner],
                             capture_output=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)
        assert proc.poll() is None, "the server died during the conformance run"
    finally:
        stop(proc)
    log = run.stdout.decode("utf-8", "replace") + run.stderr.decode("utf-8", "replace")
    assert out_dir.exists(), f"the conformance suite did not run (exit {run.returncode}):\n{log[-3000:]}"
    results = read_results(out_dir)
    expected = expected_failures()
    failed = {}
    for scenario, checks in results.items():
        bad = [c for c in checks if c.get("status") not in ("SUCCESS", "INFO", "WARNING", "SKIPPED")]
        if bad:
            failed[scenario] = "; ".join(f"{c.get('id')}: {c.get('errorMessage') or c.get('status')}" for c in bad)
    unexpected = {k: v for k, v in failed.items() if k not in expected}
    stale = sorted(k for k in expected if k in results and k not in failed)
    passed = sorted(k for k in results if k not in failed)
    print(f"\n[rel-conformance] {CONFORMANCE}: {len(results)} scenarios, {len(passed)} passed, {len(failed)} failed "
          f"({len(failed) - len(unexpected)} expected, {len(unexpected)} unexpected), {len(stale)} stale entries")
    print(f"   passed: {', '.join(passed)}")
    for k, v in sorted(failed.items()):
        print(f"   {'expected  ' if k in expected else 'UNEXPECTED'} {k}: {v[:160]}")
    assert len(results) >= 10, log[-3000:]
    assert not unexpected, f"unexpected conformance failures: {json.dumps(unexpected, indent=1)}"
    assert not stale, f"listed as expected failures but now pass (remove them from {EXPECTED.name}): {stale}"
