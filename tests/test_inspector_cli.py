"""The MCP Inspector CLI as an outside client, over stdio and streamable HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inspector import inspector
from tests.helpers import free_port, server_env, wait_port
from tests.zygote import Popen

ROOT = Path(__file__).resolve().parents[1]
ATELIER = str(Path(sys.executable).parent / "atelier")

pytestmark = pytest.mark.slow


def _env_flags(tmp_path: Path) -> list[str]:
    flags = []
    for k, v in server_env(tmp_path).items():
        if k.startswith("ATELIER_"):
            flags += ["-e", f"{k}={v}"]
    return flags


def test_inspector_stdio_list_and_call(tmp_path):
    rc, data, err = inspector(["--method", "tools/list", *_env_flags(tmp_path), "--", ATELIER, "serve"])
    assert rc == 0, err
    names = {t["name"] for t in data["tools"]}
    assert {"engine_status", "job_status", "job_cancel"} <= names
    rc, data, err = inspector(["--method", "tools/call", "--tool-name", "engine_status", *_env_flags(tmp_path),
                               "--", ATELIER, "serve"])
    assert rc == 0, err
    assert not data.get("isError", False)
    assert data["structuredContent"]["device"] == "cpu"


def test_inspector_http_list_and_call(tmp_path):
    port = free_port()
    proc = Popen([ATELIER, "serve", "--transport", "http", "--port", str(port)],
                 env=server_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        wait_port(port, proc)
        url = f"http://127.0.0.1:{port}/mcp"
        rc, data, err = inspector([url, "--method", "tools/list"])
        assert rc == 0, err
        assert "engine_status" in {t["name"] for t in data["tools"]}
        rc, data, err = inspector([url, "--method", "tools/call", "--tool-name", "job_status",
                                   "--tool-arg", "job_id=unknown"])
        assert data is not None, err
        assert data.get("isError") is True
        assert "no such job" in data["content"][0]["text"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
