"""Run the MCP Inspector CLI (a real outside client) under Node 22 from npm."""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Any

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"
CONFORMANCE = "@modelcontextprotocol/conformance@0.1.16"  # tests/test_rel_conformance.py


def inspector(args: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """Returns (exit code, parsed JSON stdout or None, stderr)."""
    inner = "mcp-inspector --cli " + " ".join(shlex.quote(a) for a in args)
    cmd = ["npx", "-y", "-p", "node@22", "-p", INSPECTOR, "--", "sh", "-c", inner]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    out = proc.stdout.decode()
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        data = None
    return proc.returncode, data, proc.stderr.decode()[-4000:] + "\nSTDOUT:\n" + out[-2000:]
