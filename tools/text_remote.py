"""generate_text on an external OpenAI-compatible server (models.llm_backend = "openai").

Same arguments, same result shape, same progress as the local path
(tools/text.py): a `prompt` goes as one user message to `/chat/completions`
(the server applies its model's chat template), `raw: true` sends
`system + "\\n\\n" + prompt` to `/completions`, `messages` go as given with
`system` first. Progress after every streamed chunk: "<n> tokens: <tail>". A
cancel closes the stream at the next chunk (finish_reason "cancelled", the
partial text kept).

Options without a remote meaning, per option:
- kv_cache="int8": a note (the server manages its own cache; nothing to save here);
- kv_cache="window": a ToolError (its promise, inputs longer than the context,
  cannot be kept by a server with a fixed context);
- repetition_window / repetition_scope other than the defaults: a note (the
  penalty is sent; the server applies it with its own scope);
- window / sink_tokens: ignored unless kv_cache="window", as locally.
Fields the server does not report: `prompt_tokens` 0 and `completion_tokens`
= streamed chunks when it sends no usage (a note says so); `reused_tokens` is
the server's `cached_tokens` when it reports them; `cache.kind` is "server".
"""

from __future__ import annotations

import json
from typing import Any

from engine.llm.remote import RemoteConfig, RemoteRequest, RemoteUnavailable, service_for

from .base import ToolContext, ToolError, ToolOutput
from .text import CacheInfo, GenerateTextInput, GenerateTextOutput


def _unsupported(a: GenerateTextInput) -> list[str]:
    """Notes for options the server cannot honour; a ToolError for those whose promise would break."""
    if a.kv_cache == "window":
        raise ToolError.invalid("kv_cache", a.kv_cache, "not available with models.llm_backend='openai': the text "
                                "server keeps its own KV cache and context length; use kv_cache='full' and an "
                                "input that fits the server's context")
    notes = []
    if a.kv_cache == "int8":
        notes.append("kv_cache='int8' has no effect: the text server manages its own KV cache")
    fields = a.model_fields_set
    if ("repetition_window" in fields and a.repetition_window != 64) or \
            ("repetition_scope" in fields and a.repetition_scope != "generated"):
        notes.append("repetition_window/repetition_scope are not sent: the server applies repetition_penalty with "
                     "its own scope (vLLM: prompt and output; llama.cpp: its last-n tokens, prompt included)")
    return notes


def _request(a: GenerateTextInput) -> RemoteRequest:
    messages: list[dict[str, str]] | None
    prompt: str | None = None
    if a.prompt is not None and a.raw:
        messages, prompt = None, (a.system + "\n\n" + a.prompt) if a.system else a.prompt
    else:
        messages = [{"role": m.role, "content": m.content} for m in a.messages] if a.messages is not None else \
            [{"role": "user", "content": a.prompt or ""}]
        if a.system:
            messages.insert(0, {"role": "system", "content": a.system})
    return RemoteRequest(messages=messages, prompt=prompt, max_tokens=a.max_new_tokens or 1,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                         repetition_penalty=a.repetition_penalty, seed=a.seed, stop=tuple(a.stop),
                         json_schema=a.json_schema)


def _schema_note(text: str, schema: dict[str, Any]) -> str:
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the answer is not JSON ({exc.msg} at character {exc.pos}) although json_schema was given"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"the answer does not follow json_schema: {exc.message[:200]}"
    return ""


def run_remote(a: GenerateTextInput, ctx: ToolContext) -> ToolOutput:
    notes = _unsupported(a)
    m = ctx.settings.models
    cfg = RemoteConfig(base_url=m.llm_base_url, model=m.llm_remote_model, api_key=m.llm_api_key.get_secret_value(),
                       timeout_s=m.llm_timeout_s, json_format=m.llm_json_format)
    svc = service_for(ctx.engine, cfg)
    req = _request(a)
    ctx.check()

    def progress(n: int, text: str) -> None:
        tail = text[-160:].replace("\n", " ")
        ctx.report(n, a.max_new_tokens, f"{n} tokens: {tail}")

    try:
        r = svc.generate(req, ctx.cancel_token(), progress)
    except RemoteUnavailable as exc:
        raise ToolError(str(exc)) from None
    if not r.usage_reported:
        notes.append("the server reported no usage: completion_tokens counts streamed chunks, prompt_tokens is 0")
    if r.server_finish_reason not in (None, "stop", "length"):
        notes.append(f"the server ended with finish_reason={r.server_finish_reason!r}")
    if a.json_schema is not None and r.finish_reason == "stop":
        bad = _schema_note(r.text, a.json_schema)
        if bad:
            notes.append(bad)
    elif a.json_schema is not None:
        notes.append(f"the answer ended with finish_reason={r.finish_reason!r}: it may be incomplete JSON")
    out = GenerateTextOutput(
        text=r.text, prompt_tokens=r.prompt_tokens, reused_tokens=r.cached_tokens,
        completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,  # type: ignore[arg-type]
        tokens_per_s=round(r.tokens_per_s, 2), model=r.model,
        cache=CacheInfo(kind="server", dtype="n/a", bytes=0, bytes_per_token=0.0), note="; ".join(notes))
    text = r.text if r.finish_reason != "cancelled" else f"[cancelled after {r.completion_tokens} tokens] {r.text}"
    return ToolOutput(text=text, structured=out)
