"""Errors the engine raises. The tool layer turns each into a ToolError a model can read.

The engine knows nothing about MCP: these are plain exceptions with a message
that names the argument, the value and the rule where there is one.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class InvalidInput(EngineError):
    """The request is malformed; `argument` names the offending field."""

    def __init__(self, argument: str, value: object, rule: str) -> None:
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{argument}={shown}: {rule}")
        self.argument = argument
        self.value = value
        self.rule = rule


class Busy(EngineError):
    """The work queue is full; the caller should retry later."""


class Cancelled(EngineError):
    """The work was cancelled (client cancel, job_cancel, or shutdown)."""


class InsufficientMemory(EngineError):
    """Out of memory while loading a model or running work; memory was freed."""


class ModelTooLarge(InsufficientMemory):
    """A model larger than the whole memory budget (`engine.memory_budget_mb`), refused before or right after
    loading: no smaller request can help, only a larger budget or a smaller model / weight format."""


class ModelUnavailable(EngineError):
    """A model the request needs is not configured or not installed."""
