"""Server core through the official in-memory client: listing, validation, errors,
jobs, progress, cancellation, the busy queue, media delivery, resources, logging."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
from pathlib import Path

import anyio
import pytest
from mcp import Client
from PIL import Image

from mcp_server.app import build_server
from mcp_server.config import Settings
from mcp_server.logs import JsonFormatter
from tests.helpers import make_settings, run  # noqa: F401  (others import them from here)
from tests.tooling import TEST_TOOLS


async def _with_client(settings: Settings, fn, extra=TEST_TOOLS):
    server = build_server(settings, extra_specs=extra)
    try:
        async with Client(server) as client:
            return await fn(client, server)
    finally:
        server.state.close()


def test_lists_enabled_tools_only(tmp_path):
    s = make_settings(tmp_path, tools={"disabled": ["job_cancel"]})

    async def body(c, srv):
        names = [t.name for t in (await c.list_tools()).tools]
        assert "engine_status" in names and "job_status" in names
        assert "job_cancel" not in names
        r = await c.call_tool("job_cancel", {"job_id": "x"})
        assert r.is_error and "unknown tool 'job_cancel'" in r.content[0].text
        for t in (await c.list_tools()).tools:
            assert t.input_schema["type"] == "object"
            assert t.output_schema is not None

    run(_with_client(s, body, extra=None))


def test_engine_status_reports_device_and_defaults(tmp_path):
    async def body(c, srv):
        r = await c.call_tool("engine_status", {})
        assert not r.is_error
        st = r.structured_content
        assert st["device"] == "cpu" and st["kernel_backend"] in ("torch", "triton")
        assert st["queue_capacity"] == srv.state.settings.limits.queue_length
        assert set(st["embedded_defaults"]) >= {"llm", "embedding", "person_detector", "haar_cascades"}
        # "not imported yet" until a tool loads a model library (test_process_state checks both states)
        assert st["torchvision"] in ("native", "shim", "not imported yet")

    run(_with_client(make_settings(tmp_path), body, extra=None))


def test_validation_errors_name_the_argument(tmp_path):
    async def body(c, srv):
        r = await c.call_tool("test_steps", {"steps": -3})
        assert r.is_error
        assert "steps=-3" in r.content[0].text and "greater than or equal to 1" in r.content[0].text
        r = await c.call_tool("test_steps", {"bogus": 1})
        assert r.is_error and "bogus" in r.content[0].text and "unknown argument" in r.content[0].text
        r = await c.call_tool("test_load", {})
        assert r.is_error and "image: required argument is missing" in r.content[0].text

    run(_with_client(make_settings(tmp_path), body))


def test_unexpected_exception_hides_internals(tmp_path, caplog):
    async def body(c, srv):
        r = await c.call_tool("test_boom", {})
        assert r.is_error
        text = r.content[0].text
        assert "internal error in test_boom" in text
        assert "/etc/shadow" not in text and "Traceback" not in text
        # the server keeps serving
        r2 = await c.call_tool("engine_status", {})
        assert not r2.is_error

    with caplog.at_level(logging.ERROR):
        run(_with_client(make_settings(tmp_path), body))
    assert any("secret internal detail" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_oom_becomes_insufficient_memory_and_server_keeps_serving(tmp_path):
    async def body(c, srv):
        r = await c.call_tool("test_oom", {})
        assert r.is_error and "insufficient memory" in r.content[0].text
        assert "retry with a smaller request" in r.content[0].text
        # a model over the whole budget: no smaller request helps; the answer names the budget's key instead
        r = await c.call_tool("test_too_large", {})
        text = r.content[0].text
        assert r.is_error and "insufficient memory for test_too_large" in text and "nothing was loaded" in text
        assert "raise engine.memory_budget_mb" in text and "smaller request" not in text
        r2 = await c.call_tool("test_steps", {"steps": 1, "step_s": 0})
        assert not r2.is_error and r2.structured_content["done_steps"] == 1

    run(_with_client(make_settings(tmp_path), body))


def test_progress_notifications_reach_the_client(tmp_path):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async def body(c, srv):
        r = await c.call_tool("test_steps", {"steps": 5, "step_s": 0.12}, progress_callback=on_progress)
        assert not r.is_error and r.structured_content["done_steps"] == 5

    run(_with_client(make_settings(tmp_path), body))
    assert seen, "no progress notification arrived"
    assert seen[-1][0] == 5 and seen[-1][1] == 5
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)


def test_the_newest_throttled_progress_arrives_before_the_result(tmp_path):
    # 40 reports within a few ms against a total of 50 (the work ends early, as text at its end-of-text
    # token): notifications are throttled to one per 0.1 s, but the newest held-back one is sent before the
    # result
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async def body(c, srv):
        for _ in range(3):
            seen.clear()
            r = await c.call_tool("test_steps", {"steps": 40, "step_s": 0, "early": 10},
                                  progress_callback=on_progress)
            assert not r.is_error and r.structured_content["done_steps"] == 40
            assert seen and seen[-1] == (40, 50, "step 40"), seen
            assert len(seen) < 40 and [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)

    run(_with_client(make_settings(tmp_path), body))


def test_job_after_deadline_then_status_then_result(tmp_path):
    s = make_settings(tmp_path, limits={"deadline_s": 0.3})

    async def body(c, srv):
        r = await c.call_tool("test_steps", {"steps": 8, "step_s": 0.1})
        assert not r.is_error
        job_id = r.structured_content["job_id"]
        assert job_id and "job_status" in r.content[0].text
        st = await c.call_tool("job_status", {"job_id": job_id})
        assert st.structured_content["status"] in ("queued", "running")
        for _ in range(100):
            st = await c.call_tool("job_status", {"job_id": job_id})
            if st.structured_content["status"] == "done":
                break
            await anyio.sleep(0.05)
        assert st.structured_content["status"] == "done"
        assert st.structured_content["result"]["done_steps"] == 8
        assert st.structured_content["progress"] == 8

    run(_with_client(s, body))


def test_job_cancel_stops_within_a_step_and_frees_the_worker(tmp_path):
    s = make_settings(tmp_path, limits={"deadline_s": 0.2})

    async def body(c, srv):
        r = await c.call_tool("test_steps", {"steps": 1000, "step_s": 0.05})
        job_id = r.structured_content["job_id"]
        await anyio.sleep(0.2)
        cancelled = await c.call_tool("job_cancel", {"job_id": job_id})
        assert not cancelled.is_error
        for _ in range(60):
            st = await c.call_tool("job_status", {"job_id": job_id})
            if st.structured_content["status"] == "cancelled":
                break
            await anyio.sleep(0.05)
        assert st.structured_content["status"] == "cancelled"
        assert st.structured_content["progress"] < 1000
        assert not srv.state.engine.scheduler.busy
        r2 = await c.call_tool("test_steps", {"steps": 2, "step_s": 0})
        assert r2.structured_content["done_steps"] == 2

    run(_with_client(s, body))


def test_client_cancel_stops_the_work(tmp_path):
    async def body(c, srv):
        tok = srv.state.engine.scheduler
        with anyio.move_on_after(0.4):
            await c.call_tool("test_steps", {"steps": 1000, "step_s": 0.05})
        for _ in range(100):
            if not tok.busy:
                break
            await anyio.sleep(0.02)
        assert not tok.busy, "the worker kept running after the client cancelled"
        r = await c.call_tool("test_steps", {"steps": 1, "step_s": 0})
        assert r.structured_content["done_steps"] == 1

    run(_with_client(make_settings(tmp_path), body))


def test_full_queue_answers_busy_at_once(tmp_path):
    s = make_settings(tmp_path, limits={"queue_length": 1, "deadline_s": 0.2})

    async def body(c, srv):
        first = await c.call_tool("test_steps", {"steps": 40, "step_s": 0.05})  # running, becomes a job
        second = await c.call_tool("test_steps", {"steps": 40, "step_s": 0.05})  # queued, becomes a job
        assert "job_id" in first.structured_content and "job_id" in second.structured_content
        t0 = anyio.current_time()
        third = await c.call_tool("test_steps", {"steps": 1, "step_s": 0})
        assert third.is_error and third.content[0].text.startswith("busy")
        assert anyio.current_time() - t0 < 1.0
        for jid in (first.structured_content["job_id"], second.structured_content["job_id"]):
            await c.call_tool("job_cancel", {"job_id": jid})

    run(_with_client(s, body))


def test_image_delivery_thumbnail_link_and_resource(tmp_path):
    async def body(c, srv):
        r = await c.call_tool("test_image", {"width": 1500, "height": 700})
        assert not r.is_error
        kinds = [b.type for b in r.content]
        assert kinds.count("image") == 1 and "resource_link" in kinds
        img_block = next(b for b in r.content if b.type == "image")
        assert len(img_block.data) <= 100_000
        thumb = Image.open(io.BytesIO(base64.b64decode(img_block.data)))
        assert max(thumb.size) <= 512
        link = next(b for b in r.content if b.type == "resource_link")
        assert link.uri.startswith("image://")
        info = r.structured_content["saved_images"][0]
        saved = Path(info["path"])
        assert saved.is_file() and saved.parent == Path(srv.state.settings.resolved_output_dir())
        full = Image.open(saved)
        assert full.size == (1500, 700) and full.text.get("source") == "test"
        listed = [str(x.uri) for x in (await c.list_resources()).resources]
        assert link.uri in listed
        rr = await c.read_resource(link.uri)
        blob = base64.b64decode(rr.contents[0].blob)
        assert blob == saved.read_bytes()
        # an image:// produced here is a valid input
        r2 = await c.call_tool("test_load", {"image": link.uri})
        assert not r2.is_error and r2.structured_content["shape"] == [700, 1500, 3]
        # no temp files left behind
        assert not list(saved.parent.glob(".atelier-tmp-*"))

    run(_with_client(make_settings(tmp_path), body))


def test_full_resolution_inline_only_when_asked(tmp_path):
    async def body(c, srv):
        r = await c.call_tool("test_image", {"width": 600, "height": 600, "inline_full": True})
        data = next(b for b in r.content if b.type == "image").data
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (600, 600)

    run(_with_client(make_settings(tmp_path), body))


def test_unknown_image_resource_is_an_error(tmp_path):
    async def body(c, srv):
        with pytest.raises(Exception):
            await c.read_resource("image://0123456789ab")

    run(_with_client(make_settings(tmp_path), body))


def test_start_and_end_log_lines_share_a_request_id(tmp_path):
    records: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Catch()
    fmt = JsonFormatter()
    logger = logging.getLogger("atelier.server")
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        async def body(c, srv):
            await c.call_tool("test_load", {"image": "secret-prompt-text.png"})
        run(_with_client(make_settings(tmp_path), body))
    finally:
        logger.removeHandler(h)
    lines = [json.loads(fmt.format(r)) for r in records if r.getMessage() in ("start", "end")]
    lines = [ln for ln in lines if ln.get("tool") == "test_load"]
    assert [ln["event"] for ln in lines] == ["start", "end"]
    assert lines[0]["request_id"] == lines[1]["request_id"]
    assert lines[1]["outcome"] == "tool_error" and lines[1]["duration_ms"] >= 0
    assert "secret-prompt-text" not in json.dumps(lines)


def test_client_log_notifications_after_set_level(tmp_path):
    got = []

    async def on_log(params):
        got.append(params)

    async def body_factory():
        server = build_server(make_settings(tmp_path, limits={"deadline_s": 0.1}), extra_specs=TEST_TOOLS)
        try:
            async with Client(server, logging_callback=on_log, mode="legacy") as c:
                await c.set_logging_level("info")
                r = await c.call_tool("test_steps", {"steps": 5, "step_s": 0.05})
                assert "job_id" in r.structured_content
        finally:
            server.state.close()

    run(body_factory())
    assert any(getattr(p, "data", {}).get("event") == "job_detached" for p in got)


def test_invalid_config_names_the_key(tmp_path):
    from mcp_server.config import ConfigError, load_settings

    cfg = tmp_path / "bad.toml"
    cfg.write_text("[limits]\nmax_new_tokens = -5\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    assert "limits.max_new_tokens" in str(ei.value)
    cfg.write_text("[engine]\ndevice = 'tpu'\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    assert "engine.device" in str(ei.value)
    cfg.write_text("[tools]\nenabled = ['nope']\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    assert "tools.enabled" in str(ei.value)
    cfg.write_text("[paths]\nread_roots = ['/']\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    assert "read_roots" in str(ei.value)
    cfg.write_text("this is = not toml [")
    with pytest.raises(ConfigError):
        load_settings(cfg)


def test_config_errors_never_show_a_secret(tmp_path):
    """A misspelled or mistyped secret key, or a URL with a password, is named without its value."""
    from mcp_server.config import ConfigError, load_settings

    cfg = tmp_path / "bad.toml"
    for text, key in [('[models]\nllm_api_kee = "sk-SECRET-1"\n', "models.llm_api_kee"),
                      ('[http]\nauth_token = ["sk-SECRET-1"]\n', "http.auth_token"),
                      ('[limits]\nmax_k = "redis://:sk-SECRET-1@host:6379"\n', "limits.max_k")]:
        cfg.write_text(text)
        with pytest.raises(ConfigError) as ei:
            load_settings(cfg)
        assert key in str(ei.value)
        assert "SECRET" not in str(ei.value), str(ei.value)


def test_env_overrides_toml(tmp_path, monkeypatch):
    from mcp_server.config import load_settings

    cfg = tmp_path / "ok.toml"
    cfg.write_text("[limits]\nmax_new_tokens = 100\nmax_k = 7\n[logging]\nlevel = 'debug'\n")
    monkeypatch.setenv("ATELIER_LIMITS__MAX_NEW_TOKENS", "64")
    s = load_settings(cfg)
    assert s.limits.max_new_tokens == 64 and s.limits.max_k == 7 and s.logging.level == "DEBUG"
    assert s.config_file == cfg.resolve()


def test_malformed_env_json_is_a_config_error(monkeypatch):
    from mcp_server.config import ConfigError, load_settings

    monkeypatch.setenv("ATELIER_PATHS__READ_ROOTS", "[/not/json]")
    with pytest.raises(ConfigError, match="paths"):
        load_settings()


# --------------------------------------------------------------------------- issue 17: smaller items
@pytest.mark.parametrize("err", ["ENOSPC", "EDQUOT"])
def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, err):
    """A full disk while saving an output answers "no space left on device writing <output dir>" (not
    "internal error"), and neither the final file nor a temp file is left behind."""
    import errno as errno_mod

    import mcp_server.sandbox as sandbox_mod

    code = getattr(errno_mod, err)
    real_write = os.write
    calls = []

    def full_write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:10])  # a partial first write, as a filling disk does
        raise OSError(code, os.strerror(code))

    async def body(c, srv):
        out_dir = srv.state.settings.resolved_output_dir()
        before = sorted(p.name for p in out_dir.iterdir())
        monkeypatch.setattr(sandbox_mod.os, "write", full_write)
        r = await c.call_tool("test_image", {"width": 64, "height": 48})
        monkeypatch.setattr(sandbox_mod.os, "write", real_write)
        text = r.content[0].text
        assert r.is_error and "internal error" not in text
        want = "disk quota exceeded" if err == "EDQUOT" else "no space left on device"
        assert f"{want} writing {out_dir}" in text and text.startswith("output_dir="), text
        assert sorted(p.name for p in out_dir.iterdir()) == before  # nothing partial, no temp file
        assert not [str(x.uri) for x in (await c.list_resources()).resources if str(x.uri).startswith("image://")]
        ok = await c.call_tool("test_image", {"width": 8, "height": 8})  # space is back: the server keeps serving
        assert not ok.is_error

    run(_with_client(make_settings(tmp_path), body))
    assert len(calls) >= 2


def test_log_level_table_is_cleared_when_sessions_end(tmp_path):
    server = build_server(make_settings(tmp_path), extra_specs=TEST_TOOLS)

    async def body():
        for i in range(5):
            async with Client(server, mode="legacy") as c:
                await c.set_logging_level("info" if i % 2 else "debug")
                assert len(server.state.client_log_levels) >= 1
        return len(server.state.client_log_levels)

    try:
        with pytest.warns(Warning):
            left = run(body())
    finally:
        server.state.close()
    assert left == 0, f"{left} log-level entries outlived their sessions"


def test_debug_logging_keeps_numba_compiler_output_out(tmp_path):
    """DEBUG logging is ours: compiling a Numba kernel writes no numba lines unless third_party_level asks."""
    import io as io_mod

    import numba

    from mcp_server.logs import NOISY_LOGGERS, setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in ("atelier", *NOISY_LOGGERS)})

    def compile_fresh(k: float) -> float:
        fn = numba.njit(lambda x: x * k + 1.0)  # a new closure constant: compiled now
        return fn(2.0)

    def count(third_party: str) -> tuple[int, int]:
        buf = io_mod.StringIO()
        setup_logging("DEBUG", "json", stream=buf, third_party_level=third_party)
        logging.getLogger("atelier.h4probe").debug("our own debug line")
        compile_fresh(3.0 if third_party == "WARNING" else 5.0)
        lines = [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.startswith("{")]
        return (sum(1 for ln in lines if ln["logger"].startswith("numba")),
                sum(1 for ln in lines if ln["logger"] == "atelier.h4probe"))

    try:
        quiet_numba, quiet_ours = count("WARNING")
        loud_numba, loud_ours = count("DEBUG")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for n, lvl in saved[2].items():
            logging.getLogger(n).setLevel(lvl)
    print(f"\n[logging] DEBUG with third_party_level=WARNING: {quiet_numba} numba lines; =DEBUG: {loud_numba}")
    assert quiet_ours == 1 and loud_ours == 1
    assert quiet_numba == 0
    assert loud_numba > 0  # the numba lines exist and are only let through when asked for


def test_third_party_level_is_a_config_key(tmp_path):
    from mcp_server.config import ConfigError, load_settings

    cfg = tmp_path / "log.toml"
    cfg.write_text("[logging]\nlevel = 'debug'\nthird_party_level = 'info'\n")
    s = load_settings(cfg)
    assert s.logging.third_party_level == "INFO" and Settings().logging.third_party_level == "WARNING"
    cfg.write_text("[logging]\nthird_party_level = 'chatty'\n")
    with pytest.raises(ConfigError, match="logging.third_party_level"):
        load_settings(cfg)


def test_disconnect_middleware_cancels_only_calls_still_attached():
    """ASGI level: an `http.disconnect` cancels the tokens the exchange's calls attached; a call that
    answered (or became a job) and detached is left alone; a call attaching after the end is cancelled."""
    from engine.scheduler import CancelToken
    from mcp_server.disconnect import SCOPE_KEY, DisconnectMiddleware

    running, answered, late = CancelToken(), CancelToken(), CancelToken()
    seen = {}

    async def app(scope, receive, send):
        watch = scope[SCOPE_KEY]
        watch.attach(running)
        watch.attach(answered)
        watch.detach(answered)
        seen["before"] = (running.cancelled, watch.attached)
        msg = await receive()  # the SSE response's disconnect listener
        seen["msg"] = msg["type"]
        seen["after_receive"] = running.cancelled
        watch.attach(late)

    messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    async def send(msg):
        pass

    async def body():
        mw = DisconnectMiddleware(app)
        await mw({"type": "http", "method": "POST", "headers": []}, receive, send)  # consumes the request
        messages.insert(0, {"type": "http.disconnect"})

    messages.pop(0)
    asyncio.run(body())
    assert seen["before"] == (False, 1)
    assert seen["msg"] == "http.disconnect" and seen["after_receive"] is True
    assert running.cancelled and late.cancelled and not answered.cancelled


def test_disconnect_middleware_normal_exchange_cancels_nothing():
    from engine.scheduler import CancelToken
    from mcp_server.disconnect import SCOPE_KEY, DisconnectMiddleware

    tok = CancelToken()

    async def app(scope, receive, send):
        scope[SCOPE_KEY].attach(tok)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        scope[SCOPE_KEY].detach(tok)  # the call answered before the exchange ended
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        pass

    asyncio.run(DisconnectMiddleware(app)({"type": "http", "method": "POST", "headers": []}, receive, send))
    assert not tok.cancelled


def test_no_space_in_a_cache_write_is_named_not_internal(tmp_path):
    import errno as errno_mod

    from pydantic import BaseModel, ConfigDict

    from tools.base import ToolSpec

    class NoArgs(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Done(BaseModel):
        ok: bool

    def fill_disk(args, ctx):
        raise OSError(errno_mod.ENOSPC, "No space left on device", "/var/cache/atelier/emb-123.tmp")

    spec = ToolSpec("h4_full_cache", "full cache", "a cache write that meets a full disk", NoArgs, Done, fill_disk,
                    execution="thread")

    async def body(c, srv):
        r = await c.call_tool("h4_full_cache", {})
        text = r.content[0].text
        assert r.is_error and "no space left on device while h4_full_cache was writing" in text
        assert "internal error" not in text and "/var/cache" not in text

    run(_with_client(make_settings(tmp_path), body, extra=[*TEST_TOOLS, spec]))


def test_client_identity_token_session_and_local():
    """Who owns a call's work: the token when http.auth_token is set (the same across connections and
    sessions: a reconnect reaches its jobs), else the MCP session; no HTTP request = the local client."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from engine.scheduler import CancelToken
    from mcp_server.clients import LOCAL, client_of
    from mcp_server.jobs import JobManager

    def ctx(auth: str | None, conn):
        headers = [(b"authorization", auth.encode())] if auth else []
        req = Request({"type": "http", "method": "POST", "path": "/mcp", "headers": headers})
        return SimpleNamespace(request_context=SimpleNamespace(request=req, session=SimpleNamespace(_connection=conn)))

    conn1, conn2 = SimpleNamespace(state={}), SimpleNamespace(state={})
    # with a token: one client across connections/sessions; another token is another client
    t1, t1_again = client_of(ctx("Bearer tok-A", conn1), "tok-A"), client_of(ctx("Bearer tok-A", conn2), "tok-A")
    assert t1 == t1_again and t1.startswith("token:") and "tok-A" not in t1
    assert client_of(ctx("Bearer tok-B", conn1), "tok-A") != t1
    # without a token: the session (connection); a header the server did not ask for changes nothing
    s1, s2 = client_of(ctx(None, conn1), ""), client_of(ctx(None, conn2), "")
    assert s1 != s2 and s1 == client_of(ctx("Bearer whatever", conn1), "") and s1.startswith("session:")
    assert client_of(None, "tok-A") == LOCAL
    assert client_of(SimpleNamespace(request_context=SimpleNamespace(request=None, session=None)), "") == LOCAL

    jobs = JobManager()
    job = jobs.create("test_steps", CancelToken(), owner=t1)
    assert jobs.get(job.id, t1_again) is job  # the reconnected token holder reaches its job
    assert jobs.get(job.id, s1) is None and jobs.cancel(job.id, s2) is None and not job.token.cancelled
    assert jobs.get(job.id, LOCAL) is job
