"""Structured logging: JSON lines (or plain text) on stderr, never stdout.

Every tool call logs one `start` and one `end` event with the same request id
(`request_id` contextvar), the tool, `duration_ms`, the outcome
(ok | tool_error | cancelled | timeout | rejected | oom | error) and sizes —
never prompts or image bytes (lengths and hashes instead).

Libraries' loggers are held to `max(logging.level, logging.third_party_level)`
(default WARNING), so DEBUG logging is ours, not numba's compiler output.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import hashlib
import json
import logging
import sys
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("atelier_request_id", default=None)

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime", "taskName",
                                                                               "request_id"}

_base_factory = logging.getLogRecordFactory()


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Stamp every record with the request id current where it was created (any thread)."""
    record = _base_factory(*args, **kwargs)
    record.request_id = request_id.get()
    return record


def install_record_factory() -> None:
    """Stamp records with the request id from now on. Called when the server is built (never at import):
    importing this module changes no process state."""
    if getattr(logging.getLogRecordFactory(), "__name__", "") != "_record_factory":
        logging.setLogRecordFactory(_record_factory)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for k, v in _extras(record).items():
            out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        rid = getattr(record, "request_id", None) or request_id.get()
        head = f"{ts} {record.levelname:<7} {record.name}"
        if rid:
            head += f" [{rid}]"
        line = f"{head}: {record.getMessage()}" + (f" {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _FlushingHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


# Loggers that are ours: everything else is a library's and is held to `logging.third_party_level`.
OWN_LOGGERS = ("atelier", "py.warnings", "root")
# Libraries known to be chatty (numba's compiler passes alone write thousands of DEBUG lines per kernel):
# their level is set too, so their records are not even created below the threshold.
NOISY_LOGGERS = ("numba", "llvmlite", "PIL", "matplotlib", "httpx", "httpcore", "h11", "hpack", "urllib3",
                 "asyncio", "filelock", "fsspec", "torch", "triton", "transformers", "diffusers",
                 "huggingface_hub", "sentence_transformers", "ultralytics", "uvicorn", "mcp", "sse_starlette",
                 "python_multipart", "multipart", "numexpr", "opencv", "onnxruntime")


def _level_no(level: str | int) -> int:
    value = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    return value if isinstance(value, int) else logging.WARNING


def _is_own(name: str) -> bool:
    return name in OWN_LOGGERS or name.startswith("atelier.")


class ThirdPartyFilter(logging.Filter):
    """Drops library records below `level` (our own records pass; the root level still applies to them)."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return _is_own(record.name) or record.levelno >= self.level


def set_third_party_level(level: str = "INFO", third_party_level: str = "WARNING") -> int:
    """Hold libraries' loggers to max(level, third_party_level); returns that threshold."""
    install_record_factory()
    threshold = max(_level_no(level), _level_no(third_party_level))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(threshold)
    for h in logging.getLogger().handlers:
        for f in h.filters:
            if isinstance(f, ThirdPartyFilter):
                f.level = threshold
    return threshold


def setup_logging(level: str = "INFO", fmt: str = "json", stream: Any = None,
                  third_party_level: str = "WARNING") -> None:
    """Route every logger (ours and libraries') to stderr in the configured format.

    Libraries log at `max(level, third_party_level)` (default WARNING): DEBUG
    logging shows our own debug lines, not numba's compiler passes or httpcore's
    socket events, unless `logging.third_party_level` asks for them.
    """
    install_record_factory()
    handler = _FlushingHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ThirdPartyFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("atelier").setLevel(level)
    set_third_party_level(level, third_party_level)
    logging.captureWarnings(True)


def digest(data: bytes | str) -> str:
    """A short content hash to log instead of content."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:16]


def summarize_args(args: dict[str, Any]) -> dict[str, Any]:
    """Sizes and hashes of tool arguments, never their content."""
    out: dict[str, Any] = {}
    for k, v in args.items():
        if isinstance(v, str):
            out[k] = {"len": len(v), "sha": digest(v)}
        elif isinstance(v, (int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = {"items": len(v)}
        elif isinstance(v, dict):
            out[k] = {"keys": len(v)}
        else:
            out[k] = type(v).__name__
    return out
