"""The `atelier` command: tools, call, doctor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import ROOT, free_port, server_env, wait_port
from tests.zygote import Popen
from tests.zygote import run as zrun

ATELIER = str(Path(sys.executable).parent / "atelier")


def _run(args, tmp_path, env=None, **kw):
    return zrun([ATELIER, *args], env=env or server_env(tmp_path), capture_output=True, timeout=120,
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
    out = _run(["doctor", "--json"], tmp_path)
    rep = json.loads(out.stdout)
    assert rep["device"] == "cpu" and rep["versions"]["torch"].startswith("2.")
    assert rep["kernel_backend"] in ("torch", "triton")
    assert set(rep["embedded_models"]) >= {"llm", "embedding", "person_detector", "haar_cascades"}
    assert rep["dirs"]["output_dir"]["writable"] is True
    assert out.returncode == (0 if not rep["problems"] else 1)
    assert not (tmp_path / "out").exists(), "doctor must create nothing"


def test_doctor_names_every_broken_path_in_words_and_fails(tmp_path):
    (tmp_path / "notapipeline").mkdir()
    env = {"ATELIER_MODELS__DIFFUSION": str(tmp_path / "nosuchfolder"),
           "ATELIER_MODELS__DETECTORS": json.dumps({"face": str(tmp_path / "face.pt")}),
           "ATELIER_MODELS__LLM": str(tmp_path / "notapipeline"),
           "ATELIER_PATHS__READ_ROOTS": json.dumps([str(tmp_path / "data"), str(tmp_path / "gone")])}
    out = _run(["doctor"], tmp_path, env=server_env(tmp_path, **env))
    text = out.stdout.decode()
    assert out.returncode == 1, text
    assert f"models.diffusion = '{tmp_path / 'nosuchfolder'}': {tmp_path / 'nosuchfolder'} does not exist" in text
    assert "models.detectors.face" in text and "face.pt does not exist" in text
    assert "has no config.json" in text
    assert f"paths.read_roots = {tmp_path / 'gone'}: the folder does not exist" in text
    assert "4 problem(s)" in text
    # a folder that exists but is not a pipeline is reported as such, not as "missing"
    out = _run(["doctor", "--json"], tmp_path,
               env=server_env(tmp_path, ATELIER_MODELS__DIFFUSION=str(tmp_path / "notapipeline")))
    rep = json.loads(out.stdout)
    assert out.returncode == 1
    assert rep["problems"] == [f"models.diffusion = '{tmp_path / 'notapipeline'}': {tmp_path / 'notapipeline'} "
                               "is not a diffusers pipeline folder (no model_index.json)"]
    assert not (tmp_path / "out").exists()


def test_doctor_from_filesystem_root_creates_nothing(tmp_path):
    env = server_env(tmp_path)
    del env["ATELIER_PATHS__OUTPUT_DIR"]  # the default ./atelier-output, relative to / here
    out = zrun([ATELIER, "doctor"], env=env, capture_output=True, timeout=120, cwd="/",
               stdin=subprocess.DEVNULL)
    assert not Path("/atelier-output").exists(), out.stdout.decode()
    assert "output_dir /atelier-output" in out.stdout.decode()


def test_serve_flags_that_do_not_apply_and_busy_port(tmp_path):
    out = _run(["serve", "--port", "8123"], tmp_path)  # stdio is the CLI default
    assert out.returncode == 2
    assert "--port applies to --transport http or sse" in out.stderr.decode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _run(["serve", "--transport", "http", "--port", str(port)], tmp_path)
    err = out.stderr.decode().strip()
    assert out.returncode == 2
    assert err == (f"atelier: cannot listen on 127.0.0.1:{port}: the port is already in use (another `atelier "
                   f"serve`?); pick another port with --port N (make serve ARGS=\"--port N\")")


def test_tools_into_a_closed_pipe_ends_quietly(tmp_path):
    proc = Popen([ATELIER, "tools"], env=server_env(tmp_path), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.read(10)  # like `| head -c 10`: read a little, then close
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_make_serve_args_add_to_the_http_default(tmp_path):
    port = free_port()
    env = server_env(tmp_path)
    env["MAKEFLAGS"] = ""
    venv = Path(sys.executable).parent.parent  # the venv running the tests; -o: never (re)install from here
    proc = subprocess.Popen(["make", "-s", "-o", f"{venv}/.atelier-installed", "serve", f"VENV={venv}",
                             f"ARGS=--port {port}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(port, proc, timeout=120)
        r = httpx.post(f"http://127.0.0.1:{port}/mcp", timeout=30,
                       headers={"accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                             "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "t", "version": "0"}}})
        assert r.status_code == 200 and "atelier-mcp" in r.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        # (cleanup: a fresh-clone run once took over 60 s to exit here, the other test worker busy beside it)
        proc.wait(timeout=180)


def test_stdio_server_in_a_terminal_exits_on_the_first_ctrl_c(tmp_path):
    import pty
    import threading

    master, slave = pty.openpty()  # stdin is a terminal, as when a person runs `atelier serve`
    proc = Popen([ATELIER, "serve"], env=server_env(tmp_path), stdin=slave, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, cwd=tmp_path)
    os.close(slave)
    ready = threading.Event()

    def watch() -> None:
        for line in proc.stderr:
            if b"server ready" in line:
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert ready.wait(120), "the server did not start"
        proc.send_signal(signal.SIGINT)  # once
        assert proc.wait(timeout=10) == 130
    finally:
        proc.kill()
        os.close(master)


def test_config_errors_read_cleanly(tmp_path):
    out = _run(["doctor"], tmp_path, env=server_env(tmp_path, ATELIER_PATHS__READ_ROOTS='["/"]'))
    assert out.returncode == 2
    assert out.stderr.decode().splitlines() == [
        "atelier: invalid configuration (defaults + environment):",
        "  paths.read_roots contains '/' (from the entry resolving to the filesystem root): that would expose "
        "the whole filesystem; name a project folder instead"]
    out = _run(["doctor"], tmp_path, env=server_env(tmp_path, ATELIER_LIMITS__MAX_K="-3"))
    assert out.returncode == 2 and "  limits.max_k = '-3': Input should be greater than 0" in out.stderr.decode()
