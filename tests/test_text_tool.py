"""The generate_text tool on the embedded SmolLM2 through a FakeContext: output shape, chat template,
stop strings, progress, cancellation, cache options, prefix reuse, and ToolErrors naming the argument."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.scheduler import CancelToken
from tests.fakectx import make_context
from tests.helpers import REFUSED

from tools.text import TOOLS, GenerateTextInput, GenerateTextOutput

SPEC = TOOLS[0]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = make_context(tmp_path_factory.mktemp("ctx"), limits={"max_new_tokens": 64, "max_stop_strings": 2})
    yield c
    c.engine.close()


def _run(ctx, **kw):
    ctx.token = CancelToken()
    ctx.progress.clear()
    out = SPEC.run(GenerateTextInput(**kw), ctx)
    assert isinstance(out.structured, GenerateTextOutput)
    return out


def test_spec():
    assert SPEC.name == "generate_text" and SPEC.execution == "thread" and SPEC.long_running
    schema = GenerateTextInput.model_json_schema()
    assert all("description" in p for p in schema["properties"].values())


def test_haiku_answer_with_progress(ctx):
    out = _run(ctx, prompt="Write a haiku about the sea", max_new_tokens=24)
    s = out.structured
    assert s.text.strip() and out.text == s.text
    assert any(ch.isalpha() for ch in s.text)
    assert s.model == "SmolLM2-135M-Instruct"
    assert 1 <= s.completion_tokens <= 24 and s.finish_reason in ("stop", "length")
    assert s.prompt_tokens > 5 and s.tokens_per_s > 0
    assert s.cache.kind == "full" and s.cache.dtype == "float32" and s.cache.bytes > 0
    assert ctx.progress and all(t == 24 for _, t, _ in ctx.progress)
    n, _, msg = ctx.progress[-1]
    assert msg.startswith(f"{int(n)} tokens: ") and int(n) == s.completion_tokens  # the final count last
    assert [p for p, _, _ in ctx.progress] == sorted(p for p, _, _ in ctx.progress)


def test_messages_use_the_chat_template(ctx):
    from engine._compat import model_libraries

    model_libraries()  # the torchvision shim first, as the engine does before any transformers import
    from transformers import AutoTokenizer

    svc_model = next(iter(ctx.engine.services().values())).model()
    ref = AutoTokenizer.from_pretrained(svc_model.folder)
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"}]
    out = _run(ctx, messages=msgs, system="Answer with one word.", max_new_tokens=4)
    want = ref.apply_chat_template([{"role": "system", "content": "Answer with one word."}] + msgs,
                                   add_generation_prompt=True, tokenize=False)
    assert out.structured.prompt_tokens == len(ref(want, add_special_tokens=False)["input_ids"])


def test_stop_string_ends_generation(ctx):
    free = _run(ctx, prompt="Write a haiku about the sea", max_new_tokens=40)
    assert "\n" in free.structured.text
    out = _run(ctx, prompt="Write a haiku about the sea", max_new_tokens=40, stop=["\n"])
    assert out.structured.finish_reason == "stop"
    assert out.structured.text == free.structured.text.split("\n")[0]


def test_prefix_reuse_reported_and_identical(ctx):
    msgs = [{"role": "user", "content": "Tell me about tides."}]
    first = _run(ctx, messages=msgs, max_new_tokens=8)
    longer = msgs + [{"role": "assistant", "content": first.structured.text}, {"role": "user", "content": "More."}]
    again = _run(ctx, messages=longer, max_new_tokens=8)
    assert again.structured.reused_tokens >= first.structured.prompt_tokens
    # same answer as a fresh cache would give: the int8 cache never reuses, and keeps the last 128 tokens exact
    fresh = _run(ctx, messages=longer, max_new_tokens=8, kv_cache="int8")
    assert fresh.structured.reused_tokens == 0
    assert fresh.structured.text == again.structured.text


def test_cache_options(ctx):
    f = _run(ctx, prompt="Say hi.", max_new_tokens=4, kv_cache="full")
    q = _run(ctx, prompt="Say hi.", max_new_tokens=4, kv_cache="int8")
    assert q.structured.cache.kind == "int8" and q.structured.cache.dtype == "int8"
    # the int8 cache keeps its last 128 tokens in fp32, read with the full cache's attention while the
    # conversation fits in them: the full cache's logits bit for bit, so the same text
    assert q.structured.text == f.structured.text
    w = _run(ctx, prompt="Say hi.", max_new_tokens=4, kv_cache="window", window=64, sink_tokens=4)
    assert w.structured.cache.kind == "window" and w.structured.cache.bytes == 30 * 2 * 3 * 64 * 64 * 4
    # the window cache runs the torch forward: its own attention arithmetic, and with Q8 activations an
    # activation at a rounding boundary can land one Q8 unit apart (logits ~0.1 apart on SmolLM2: a near tie,
    # "," vs "!" 0.02 apart after "Hello there", went either way on different CPUs). Its exactness before the
    # window fills is tested on fp32 weights (test_llm_cache.test_window_equals_full_cache_until_the_window_fills)
    assert w.structured.completion_tokens == 4 and w.structured.text.strip()


def test_cancel_stops_and_next_call_succeeds(ctx):
    ctx.token = CancelToken()
    ctx.progress.clear()
    real = ctx.report

    def report(p, total=None, msg=None):
        real(p, total, msg)
        if p >= 2:
            ctx.token.cancel("user")

    ctx.report = report
    try:
        out = SPEC.run(GenerateTextInput(prompt="Write a long story about a dragon.", max_new_tokens=64), ctx)
    finally:
        del ctx.report
    assert out.structured.finish_reason == "cancelled"
    assert out.structured.completion_tokens < 64
    assert _run(ctx, prompt="Say hi.", max_new_tokens=3).structured.finish_reason in ("stop", "length")


@pytest.mark.parametrize("kw, arg", [
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 65}, "max_new_tokens"),
    ({"prompt": "hi", "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop[0]"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content"),
    ({"prompt": "hi", "kv_cache": "window", "window": 32, "sink_tokens": 16}, "sink_tokens"),
    ({"prompt": "word " * 2100}, "prompt"),
])
def test_bad_input_names_the_argument(ctx, kw, arg):
    with pytest.raises(REFUSED) as ei:
        _run(ctx, **kw)
    assert str(ei.value).startswith(arg + "=")


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                {"repetition_penalty": 0}, {"messages": [{"role": "user"}]}, {"seed": -1}])
def test_invalid_values_rejected_by_the_schema(kw):
    with pytest.raises(ValidationError) as ei:
        GenerateTextInput(prompt="hi", **kw) if "messages" not in kw else GenerateTextInput(**kw)
    assert next(iter(kw)) in str(ei.value)


def test_long_input_works_with_the_window_cache(ctx):
    out = _run(ctx, prompt="word " * 2100, raw=True, max_new_tokens=3, kv_cache="window", window=256)
    assert out.structured.prompt_tokens > 2048 and out.structured.completion_tokens >= 1


def test_memory_bound_refuses_before_decoding(ctx):
    """Issue 17.4: the KV cache + prefill bound is checked before the request joins the decode loop."""
    ctx.settings.limits.max_call_memory_mb = 1
    try:
        with pytest.raises(REFUSED) as ei:
            _run(ctx, prompt="hello " * 400, max_new_tokens=64)
        msg = str(ei.value)
        assert msg.startswith("max_new_tokens=64: would need ") and "limit 0.001 GB" in msg
        assert "full KV cache" in msg and not ctx.progress
        out = None
        ctx.settings.limits.max_call_memory_mb = 64  # the same request fits a larger limit
        out = _run(ctx, prompt="hello " * 40, max_new_tokens=4)
        assert out.structured.completion_tokens >= 1
    finally:
        ctx.settings.limits.max_call_memory_mb = 0
