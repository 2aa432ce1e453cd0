"""generate_text: text generation with our own KV-cached decoder (engine.llm), or, with
models.llm_backend = "openai", on an OpenAI-compatible server (tools/text_remote.py: same arguments and
result; `json_schema` structured output only there).

The model comes from the configuration (`models.llm`: a Hugging Face folder of
the Llama family or GPT-2, or a .gguf; empty = the embedded
SmolLM2-135M-Instruct), never from an argument. A `prompt` is sent as one user
message through the model's chat template (unless `raw` is true); `messages`
are rendered with the chat template as given; `system` adds a system message
first. Requests from concurrent calls share one decode loop (continuous
batching). Progress is reported after every token as
"<n> tokens: <tail of the text so far>"; a cancel stops the work within one
decode step and returns what was generated with finish_reason "cancelled".

Limits: max_new_tokens <= limits.max_new_tokens, prompt/messages characters <=
limits.max_prompt_chars, stop strings <= limits.max_stop_strings. A prompt
longer than the context is refused unless kv_cache="window".

Memory: after tokenizing and before the request joins the shared decode loop,
`estimate_memory` bounds the call: the KV cache for prompt + max_new_tokens
tokens (capped at the context) at the cache kind's own bytes per token
(engine.llm.cache: full = 2 x layers x kv_heads x head_dim x dtype size, int8
adds a 4-byte scale per head, window keeps `window` tokens), plus the prefill's
activations (prompt x (4 dim + 2 intermediate + 2 heads x head_dim) float32,
the prompt x prompt attention scores per head, two rows of logits). Over the
per-call limit (limits.max_call_memory_mb; 0 = the engine's memory budget less
loaded models) it is refused naming max_new_tokens or the prompt.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import workmem
from engine.errors import ModelUnavailable
from engine.llm.batcher import CacheSpec, GenerationRequest, service_for
from engine.llm.sampling import SamplingParams

from .base import ToolContext, ToolError, ToolOutput, ToolSpec

ROLES = ("system", "user", "assistant")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(description="One of: system, user, assistant.")
    content: str = Field(description="The message text.")


class GenerateTextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="The request as plain text (sent as one user message through "
                                                 "the chat template). Give either prompt or messages.")
    messages: list[ChatMessage] | None = Field(None, description="A chat: [{role, content}, ...] with roles "
                                                                 "system/user/assistant, rendered with the "
                                                                 "model's chat template.")
    system: str | None = Field(None, description="Optional system instruction, added as the first message.")
    raw: bool = Field(False, description="Send `prompt` as-is for plain text completion (no chat template).")
    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default 256, at most "
                                                                "limits.max_new_tokens: 1024 in the default config).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy (deterministic); higher = more "
                                                                  "random. Typical 0.7.")
    top_k: int = Field(0, ge=0, description="Sample only from the k most likely tokens (0 = off).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: smallest set of tokens whose "
                                                           "probability reaches top_p (1 = off).")
    repetition_penalty: float = Field(1.1, gt=0.0, le=10.0, description="> 1 discourages repeating tokens "
                                      "(1 = off). The default 1.1 applies to the last repetition_window "
                                      "generated tokens only: short answers come out as without a penalty, "
                                      "long ones do not loop.")
    repetition_window: int = Field(64, ge=0, le=1_000_000, description="How many of the most recent tokens the "
                                                                       "penalty looks at (0 = all).")
    repetition_scope: Literal["generated", "all"] = Field(
        "generated", description="generated: only the model's own tokens are penalised (default); all: the "
                                 "prompt's too (transformers' convention).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling (same seed, same text).")
    stop: list[str] = Field(default_factory=list, description="Stop when any of these strings appears (not "
                                                              "included in the text).")
    kv_cache: Literal["full", "int8", "window"] = Field(
        "full", description="KV cache: full (exact), int8 (about half the memory, near-identical), window "
                            "(sliding window with attention sinks: constant memory, inputs longer than the context).")
    window: int = Field(1024, ge=16, description="kv_cache=window: tokens kept (sinks included).")
    sink_tokens: int = Field(4, ge=0, description="kv_cache=window: first tokens always kept (attention sinks).")
    json_schema: dict[str, Any] | None = Field(  # issue 15.3 (H1)
        None, description="Structured output: a JSON Schema the answer must follow (constrained decoding). Needs "
                          "models.llm_backend='openai' (vLLM, llama.cpp server).")


class CacheInfo(BaseModel):
    kind: str = Field(description="full | int8 | window | server (models.llm_backend='openai')")
    dtype: str = Field(description="Storage dtype of the cached keys and values.")
    bytes: int = Field(description="Bytes of the cache slot this request used.")
    bytes_per_token: float = Field(description="Cache bytes per token (all layers, keys and values).")


class GenerateTextOutput(BaseModel):
    text: str
    prompt_tokens: int
    reused_tokens: int = Field(description="Prompt tokens whose keys/values were reused from an earlier request.")
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]
    tokens_per_s: float
    model: str
    cache: CacheInfo
    note: str = ""


def _check(ctx: ToolContext, a: GenerateTextInput) -> None:
    lim = ctx.settings.limits
    if (a.prompt is None) == (a.messages is None):
        raise ToolError.invalid("prompt", a.prompt, "give exactly one of prompt or messages")
    if a.prompt is not None and not a.prompt.strip():
        raise ToolError.invalid("prompt", a.prompt, "must not be empty")
    if a.messages is not None:
        if not a.messages:
            raise ToolError.invalid("messages", [], "must contain at least one message")
        for i, msg in enumerate(a.messages):
            if msg.role not in ROLES:
                raise ToolError.invalid(f"messages[{i}].role", msg.role, f"must be one of {', '.join(ROLES)}")
            if not msg.content.strip():
                raise ToolError.invalid(f"messages[{i}].content", msg.content, "must not be empty")
        if a.raw:
            raise ToolError.invalid("raw", True, "only applies to prompt, not messages")
    chars = len(a.prompt or "") + sum(len(m.content) for m in a.messages or []) + len(a.system or "")
    if chars > lim.max_prompt_chars:
        raise ToolError.invalid("prompt", f"{chars} characters", f"longer than limits.max_prompt_chars="
                                                                  f"{lim.max_prompt_chars}")
    if a.max_new_tokens is None:
        a.max_new_tokens = min(256, lim.max_new_tokens)
    if a.max_new_tokens > lim.max_new_tokens:
        raise ToolError.invalid("max_new_tokens", a.max_new_tokens,
                                f"more than limits.max_new_tokens={lim.max_new_tokens}")
    if len(a.stop) > lim.max_stop_strings:
        raise ToolError.invalid("stop", a.stop, f"more than limits.max_stop_strings={lim.max_stop_strings}")
    for i, s in enumerate(a.stop):
        if not s:
            raise ToolError.invalid(f"stop[{i}]", s, "must not be empty")
    if a.kv_cache == "window" and a.sink_tokens >= a.window // 2:
        raise ToolError.invalid("sink_tokens", a.sink_tokens, f"must be less than window/2 = {a.window // 2}")


def _prompt_ids(a: GenerateTextInput, tok: object) -> list[int]:
    if a.prompt is not None and (a.raw or not getattr(tok, "chat_template", None)):
        text = (a.system + "\n\n" + a.prompt) if a.system else a.prompt
        return tok.encode(text, add_special_tokens=True)
    msgs = [{"role": m.role, "content": m.content} for m in a.messages] if a.messages is not None else \
        [{"role": "user", "content": a.prompt}]
    if a.system:
        msgs.insert(0, {"role": "system", "content": a.system})
    try:
        text = tok.render_chat(msgs)
    except Exception as exc:
        raise ToolError.invalid("messages", msgs[:3], f"the chat template refused them: {exc}") from exc
    return tok.encode(text, add_special_tokens=False)


def _check_schema(ctx: ToolContext, schema: dict[str, Any]) -> None:
    """json_schema: a valid JSON Schema (jsonschema's meta-schema check), within limits.max_prompt_chars."""
    import jsonschema

    size = len(json.dumps(schema))
    if size > ctx.settings.limits.max_prompt_chars:
        raise ToolError.invalid("json_schema", f"{size} characters",
                                f"longer than limits.max_prompt_chars={ctx.settings.limits.max_prompt_chars}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ToolError.invalid("json_schema", schema, f"not a valid JSON Schema: {exc.message}") from None


class _NoEstimate(Exception):
    pass


def estimate_memory(args: object, item_size: int, prompt_tokens: int, max_new_tokens: int, kind: str,
                    window: int, context: int | None) -> int:
    """Upper bound, in bytes, of one request's KV cache and prefill activations (see the module docstring).

    `args` is the model's engine.llm.model.ModelArgs; `item_size` the bytes of its activation dtype.
    """
    a = args
    if kind == "int8":
        per_token = 2 * a.n_layers * a.n_kv_heads * (a.head_dim + 4)
    else:
        per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * item_size
    total = prompt_tokens + max_new_tokens
    tokens = min(window, total) if kind == "window" else (min(total, context) if context else total)
    s = prompt_tokens if kind != "window" else min(prompt_tokens, window)
    act = s * (4 * a.dim + 2 * a.intermediate + 2 * a.n_heads * a.head_dim) * 4
    scores = a.n_heads * s * s * 4
    logits = 2 * a.vocab_size * 4
    return int(per_token * tokens + act + scores + logits)


def run_generate_text(a: GenerateTextInput, ctx: ToolContext) -> ToolOutput:
    _check(ctx, a)
    if a.json_schema is not None:
        _check_schema(ctx, a.json_schema)
    if getattr(ctx.settings.models, "llm_backend", "local") == "openai":
        from .text_remote import run_remote  # issue 15.3 (H1): the OpenAI-compatible backend

        return run_remote(a, ctx)
    if a.json_schema is not None:
        raise ToolError.invalid("json_schema", a.json_schema, "structured output needs models.llm_backend='openai' "
                                "(a server with JSON-schema constrained decoding: vLLM, llama.cpp); the local "
                                "decoder has none")
    try:
        models = ctx.settings.models
        svc = service_for(ctx.engine, models.llm, compile_step=models.llm_compile, decode=models.llm_decode,
                          weights=models.llm_weights,  # issue 13: weight format, "loading model" progress
                          activations=models.llm_activations,
                          progress=lambda message: ctx.report(0, a.max_new_tokens, message))
        m = svc.model()
    except ModelUnavailable as exc:
        raise ToolError(str(exc)) from exc
    if m.tokenizer is None:
        raise ToolError(f"model {m.name} has no tokenizer.json; configure models.llm with a folder that has one")
    ctx.check()
    ids = _prompt_ids(a, m.tokenizer)
    margs, norm = getattr(m.model, "args", None), getattr(getattr(m.model, "norm", None), "weight", None)
    try:
        if margs is None or norm is None:  # a transformers fallback model: no cache of ours to size
            raise _NoEstimate
        item = norm.element_size()
        context = svc.context_limit(CacheSpec(a.kv_cache, a.window, a.sink_tokens)) if a.kv_cache != "window" \
            else None
        need = estimate_memory(margs, item, len(ids), a.max_new_tokens, a.kv_cache, a.window, context)
        limit = workmem.call_limit(ctx.engine, getattr(ctx.settings.limits, "max_call_memory_mb", 0))
        workmem.require("max_new_tokens", a.max_new_tokens, need, limit,
                        f"a {a.kv_cache} KV cache for {len(ids)} prompt + {a.max_new_tokens} new tokens and the "
                        f"prefill's activations; lower max_new_tokens, shorten the prompt or use kv_cache='int8' "
                        f"or 'window'")
    except _NoEstimate:
        pass
    req = GenerationRequest(
        prompt_ids=ids, max_new_tokens=a.max_new_tokens,
        sampling=SamplingParams(a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed,
                                a.repetition_window, a.repetition_scope),
        stop=tuple(a.stop), cache=CacheSpec(a.kv_cache, a.window, a.sink_tokens))

    def progress(n: int, text: str) -> None:
        tail = text[-160:].replace("\n", " ")
        ctx.report(n, a.max_new_tokens, f"{n} tokens: {tail}")

    r = svc.generate(req, ctx.cancel_token(), progress)  # InvalidInput reaches the server's error mapping as is
    out = GenerateTextOutput(
        text=r.text, prompt_tokens=r.prompt_tokens, reused_tokens=r.reused_tokens,
        completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,  # type: ignore[arg-type]
        tokens_per_s=round(r.tokens_per_s, 2), model=r.model,
        cache=CacheInfo(kind=r.cache_kind, dtype=r.cache_dtype, bytes=r.cache_bytes,
                        bytes_per_token=r.cache_bytes_per_token), note=r.note)
    text = r.text if r.finish_reason != "cancelled" else f"[cancelled after {r.completion_tokens} tokens] {r.text}"
    return ToolOutput(text=text, structured=out)


TOOLS = [
    ToolSpec(
        name="generate_text",
        title="Generate text",
        description="Generate text with the configured language model (default: local SmolLM2-135M-Instruct; "
                    "or an OpenAI-compatible server): a prompt or chat messages, greedy or sampled "
                    "(temperature/top_k/top_p/seed), stop strings, a choice of KV cache (full, int8, or a sliding "
                    "window for long inputs), JSON-schema output on a server. Reports progress; cancellable.",
        input_model=GenerateTextInput,
        output_model=GenerateTextOutput,
        run=run_generate_text,
        execution="thread",
        long_running=True,
    ),
]
