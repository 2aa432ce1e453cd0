"""The `atelier` command: tools, call, doctor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_transports import server_env

ATELIER = str(Path(sys.executable).parent / "atelier")


def _run(args, tmp_path, **kw):
    return subprocess.run([ATELIER, *args], env=server_env(tmp_path), capture_output=True, timeout=120,
                          cwd=tmp_path, stdin=subprocess.DEVNULL, **kw)


def test_tools_lists_enabled_with_schemas(tmp_path):
    out = _run(["tools"], tmp_path)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    tools = json.loads(out.stdout)
    names = {t["name"] for t in tools}
    assert {"engine_status", "job_status", "job_cancel"} <= names
    assert all(t["inputSchema"]["type"] == "object" for t in tools)


def test_call_prints_json_and_exit_codes(tmp_path):
    out = _run(["call", "engine_status", "--args", "{}"], tmp_path)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    res = json.loads(out.stdout)
    assert res["is_error"] is False and res["structured"]["device"] == "cpu"
    bad = _run(["call", "job_status", "--args", '{"job_id": "nope"}'], tmp_path)
    assert bad.returncode == 1 and json.loads(bad.stdout)["is_error"] is True
    notjson = _run(["call", "engine_status", "--args", "{oops"], tmp_path)
    assert notjson.returncode == 2 and "not valid JSON" in notjson.stdout.decode()


def test_doctor_reports_environment(tmp_path):
    out = _run(["doctor"], tmp_path)
    rep = json.loads(out.stdout)
    assert rep["device"] == "cpu" and rep["versions"]["torch"].startswith("2.")
    assert rep["kernel_backend"] in ("torch", "triton")
    assert set(rep["embedded_models"]) >= {"llm", "embedding", "person_detector", "haar_cascades"}
    assert rep["dirs"]["output_dir"]["writable"] is True
    assert out.returncode == (0 if not rep["problems"] else 1)
