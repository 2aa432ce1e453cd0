"""Text generation on an external OpenAI-compatible server (vLLM, llama.cpp's server, llama-cpp-python).

What this module knows: the HTTP API (`POST {base_url}/chat/completions` for chat
messages, `POST {base_url}/completions` for a raw prompt, both with
`stream: true`, answered as server-sent events `data: {json}` ending with
`data: [DONE]`), how to map our sampling options onto it, and how to stop:
the cancel token is checked between two chunks and the response is closed
(the server sees the disconnect and stops decoding). It does not know about
MCP, tokenizers or our own decoder; the tool decides what to send.

Mapping (the caller has already refused what has no remote meaning):
max_new_tokens -> max_tokens; temperature (0 = greedy) -> temperature; when
sampling (temperature > 0): top_p, top_k (0 = off; llama.cpp and vLLM read it
as an extra field), min_p = 0 (our sampler has none; llama.cpp's default is
0.05); seed; repetition_penalty -> `repetition_penalty` (vLLM) and
`repeat_penalty` (llama.cpp), each server with its own scope; the first 4 stop
strings are sent as `stop` (OpenAI's limit) and all are applied here, on the
streamed text, so the answer ends at the first of them whatever the server
does (the stream is then closed); a JSON schema
-> `response_format` (`json_schema`, or `json_object` + `schema` for
llama-cpp-python; `auto` falls back to the second once when the server
refuses the first, and remembers).

The API key goes in the `Authorization` header only: it is never logged, never
in an error message, never in `stats()`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from engine.errors import EngineError, InvalidInput

log = logging.getLogger(__name__)

ERROR_CHARS = 300  # a server's error message is cut to this many characters
MAX_SENT_STOPS = 4  # OpenAI's limit on `stop`; the rest are applied to the streamed text only


class RemoteUnavailable(EngineError):
    """The server could not be reached or answered an error; the message names the URL setting."""


@dataclass(frozen=True)
class RemoteConfig:
    base_url: str  # ".../v1", no trailing slash
    model: str
    api_key: str = field(default="", repr=False)
    timeout_s: float = 120.0
    json_format: str = "auto"  # auto | json_schema | json_object


@dataclass
class RemoteRequest:
    messages: list[dict[str, str]] | None  # chat; or
    prompt: str | None  # raw completion
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None


@dataclass
class RemoteResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    usage_reported: bool  # False: completion_tokens counts streamed chunks, prompt_tokens is 0
    tokens_per_s: float
    seconds: float
    model: str
    server_finish_reason: str | None
    json_format: str | None  # the response_format kind that was used, if any


class RemoteLLM:
    """One OpenAI-compatible endpoint: a pooled HTTP client and the request mapping. Thread-safe."""

    def __init__(self, cfg: RemoteConfig) -> None:
        self.cfg = cfg
        headers = {"Accept": "text/event-stream"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        t = cfg.timeout_s
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(t, connect=min(t, 10.0)),
                                    follow_redirects=False)
        self._lock = threading.Lock()
        self._json_format = cfg.json_format if cfg.json_format != "auto" else None  # learnt in auto mode
        self._active = 0
        self._requests = 0
        self._errors = 0
        self._cancelled = 0

    # -- status ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": "openai", "base_url": self.cfg.base_url, "model": self.cfg.model,
                    "api_key": "set" if self.cfg.api_key else "none", "timeout_s": self.cfg.timeout_s,
                    "json_format": self._json_format or "auto (not used yet)", "active": self._active,
                    "requests": self._requests, "errors": self._errors, "cancelled": self._cancelled}

    def close(self) -> None:
        self._client.close()

    # -- the request -------------------------------------------------------------------------------
    def _body(self, req: RemoteRequest, json_format: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.cfg.model, "max_tokens": req.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": req.temperature}
        if req.messages is not None:
            body["messages"] = req.messages
        else:
            body["prompt"] = req.prompt
        if req.temperature > 0:
            body.update(top_p=req.top_p, top_k=req.top_k, min_p=0.0)
        if req.seed is not None:
            body["seed"] = req.seed
        body["repetition_penalty"] = req.repetition_penalty
        body["repeat_penalty"] = req.repetition_penalty
        if req.stop:
            body["stop"] = list(req.stop[:MAX_SENT_STOPS])  # all of them are applied here too
        if req.json_schema is not None:
            if json_format == "json_object":
                body["response_format"] = {"type": "json_object", "schema": req.json_schema}
            else:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "output", "schema": req.json_schema}}
        return body

    def _url(self, req: RemoteRequest) -> str:
        return self.cfg.base_url + ("/chat/completions" if req.messages is not None else "/completions")

    def generate(self, req: RemoteRequest, token: Any, progress: Callable[[int, str], None] | None = None
                 ) -> RemoteResult:
        """Stream one completion; `token` is an engine.scheduler.CancelToken (checked between chunks);
        `progress(n_chunks, text_so_far)` after every chunk with text."""
        if req.messages is None and req.prompt is None:
            raise InvalidInput("prompt", None, "give messages or a prompt")
        with self._lock:
            self._active += 1
            self._requests += 1
            fmt = self._json_format
        try:
            if req.json_schema is None or fmt is not None:
                return self._stream(req, token, progress, fmt if req.json_schema is not None else None)
            try:  # auto: try OpenAI's json_schema, fall back once to json_object + schema
                r = self._stream(req, token, progress, "json_schema")
            except _FormatRefused as exc:
                log.info("text server refused response_format json_schema; using json_object + schema",
                         extra={"status": exc.status})
                r = self._stream(req, token, progress, "json_object")
                with self._lock:
                    self._json_format = "json_object"
                return r
            with self._lock:
                self._json_format = "json_schema"
            return r
        except _FormatRefused as exc:
            with self._lock:
                self._errors += 1
            raise RemoteUnavailable(
                f"json_schema: the text server at models.llm_base_url={self.cfg.base_url} refused the structured "
                f"output request (HTTP {exc.status}: {exc.message}); models.llm_json_format="
                f"{self.cfg.json_format!r}") from None
        except RemoteUnavailable:
            with self._lock:
                self._errors += 1
            raise
        finally:
            with self._lock:
                self._active -= 1

    def _stream(self, req: RemoteRequest, token: Any, progress: Callable[[int, str], None] | None,
                json_format: str | None) -> RemoteResult:
        url, body = self._url(req), self._body(req, json_format)
        where = f"models.llm_base_url={self.cfg.base_url}"
        t0 = time.perf_counter()
        text, chunks, usage, model, server_reason = "", 0, None, self.cfg.model, None
        finish = "length"
        try:
            with self._client.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    message = _error_message(resp)
                    if json_format is not None and resp.status_code not in (401, 403, 404) \
                            and ("response_format" in message or "json_schema" in message):
                        raise _FormatRefused(resp.status_code, message)
                    raise RemoteUnavailable(f"{where}: the text server answered HTTP {resp.status_code} to "
                                            f"POST {url.removeprefix(self.cfg.base_url)}: {message}")
                for event in _events(resp):
                    if token is not None and token.cancelled:
                        finish = "cancelled"
                        break
                    if event is None:  # [DONE]
                        break
                    if ("error" in event or event.get("object") == "error") and not event.get("choices"):
                        raise RemoteUnavailable(f"{where}: the text server reported an error mid-stream: "
                                                f"{_cut(json.dumps(event.get('error', event)))}")
                    model = event.get("model") or model
                    if event.get("usage"):  # the last chunk (stream_options.include_usage), or a whole answer
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or choice.get("message") or {}).get("content") \
                            if req.messages is not None else choice.get("text")
                        if piece:
                            text += piece
                            chunks += 1
                            cut = _first_stop(text, req.stop)
                            if cut is not None:
                                text, finish, server_reason = text[:cut], "stop", "stop"
                                break
                            if progress is not None:
                                progress(chunks, text)
                        if choice.get("finish_reason"):
                            server_reason = choice["finish_reason"]
                    if finish == "stop":
                        break
                    if token is not None and token.cancelled:
                        finish = "cancelled"
                        break
                if finish not in ("stop", "cancelled"):
                    finish = "length" if server_reason == "length" else "stop"
                # leaving the `with` closes the response: on a cancel or a client-side stop the server sees
                # the connection go and stops decoding
        except (RemoteUnavailable, _FormatRefused):
            raise
        except _Malformed as exc:
            raise RemoteUnavailable(f"{where}: the text server sent a malformed event: {exc}") from None
        except httpx.ConnectError as exc:
            raise RemoteUnavailable(f"{where}: cannot connect to the text server ({_reason(exc)}); is it "
                                    f"running?") from None
        except httpx.TimeoutException as exc:
            raise RemoteUnavailable(f"{where}: the text server did not answer within models.llm_timeout_s="
                                    f"{self.cfg.timeout_s} ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise RemoteUnavailable(f"{where}: the connection to the text server failed: {_reason(exc)}") from None
        seconds = time.perf_counter() - t0
        if finish == "cancelled":
            with self._lock:
                self._cancelled += 1
        reported = bool(usage)
        completion = int(usage.get("completion_tokens", chunks)) if usage else chunks
        cached = 0
        if usage and isinstance(usage.get("prompt_tokens_details"), dict):
            cached = int(usage["prompt_tokens_details"].get("cached_tokens") or 0)
        return RemoteResult(text=text, finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens", 0))
                            if usage else 0, completion_tokens=completion, cached_tokens=cached,
                            usage_reported=reported, tokens_per_s=completion / seconds if seconds > 0 else 0.0,
                            seconds=seconds, model=str(model), server_finish_reason=server_reason,
                            json_format=json_format)


class _Malformed(Exception):
    pass


class _FormatRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _events(resp: httpx.Response) -> Iterator[dict[str, Any] | None]:
    """Server-sent events: each `data:` line's JSON; None for `[DONE]`. Other lines are skipped. A server
    that answers with one JSON document instead (it ignored `stream`) gives that document as one event."""
    if resp.headers.get("content-type", "").startswith("application/json"):
        try:
            event = json.loads(resp.read())
        except json.JSONDecodeError:
            raise _Malformed(_cut(resp.text)) from None
        yield event if isinstance(event, dict) else {}
        yield None
        return
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise _Malformed(_cut(data)) from None
        if isinstance(event, dict):
            yield event


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _cut(s: str) -> str:
    s = " ".join(s.split())
    return s if len(s) <= ERROR_CHARS else s[:ERROR_CHARS - 3] + "..."


def _error_message(resp: httpx.Response) -> str:
    try:
        raw = resp.read()[:20_000].decode("utf-8", "replace")
    except httpx.HTTPError:
        return "(no body)"
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") or err.get("detail") or err if isinstance(err, dict) else err
        return _cut(msg if isinstance(msg, str) else json.dumps(msg))
    except (json.JSONDecodeError, AttributeError):
        return _cut(raw) or "(no body)"


def _reason(exc: Exception) -> str:
    s = str(exc) or type(exc).__name__
    return _cut(s)


def service_for(engine: Any, cfg: RemoteConfig) -> RemoteLLM:
    """The engine's RemoteLLM for this endpoint (one pooled HTTP client per URL and model), created once;
    it shows in engine_status under `services` as `llm-openai:<url>#<model>`."""
    name = f"llm-openai:{cfg.base_url}#{cfg.model}"
    return engine.service(name, lambda eng: RemoteLLM(cfg))
