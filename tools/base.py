"""The contract between the server and a tool.

A tool is a `ToolSpec`: a name, a pydantic input model (its JSON schema is the
tool's `inputSchema`), a pydantic output model (`outputSchema`), and a plain
synchronous `run(args, ctx) -> ToolOutput`. The server validates the
arguments, checks permissions, runs `run` on a worker thread (the device
worker for `execution="device"`, a thread pool for `execution="thread"`),
turns `ToolOutput` into MCP content and maps errors:

- `ToolError` (here) and `engine.errors.InvalidInput` -> an error result whose
  text the model reads (name the argument, the value and the rule); both read
  "argument=value: rule", so a tool lets the engine's `InvalidInput` (and its
  `workmem.MemoryLimitExceeded`) through as it is, without wrapping it;
- `engine.errors.Busy` -> "busy"; `Cancelled` -> cancelled;
  `InsufficientMemory` -> an "insufficient memory" error; anything else -> a
  generic internal error (the traceback goes to the log only).

Long work calls `ctx.check()` between steps and `ctx.report(done, total, msg)`
for progress; the server turns those into MCP progress notifications, job
status and cancellation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:  # for the annotations only: tools never import the server at run time, nor torch here
    from engine import Engine
    from engine.scheduler import CancelToken
    from mcp_server.config import Settings


class ToolError(Exception):
    """An error the client's model should read. Prefer `ToolError.invalid(...)`."""

    @classmethod
    def invalid(cls, argument: str, value: object, rule: str) -> ToolError:
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        return cls(f"{argument}={shown}: {rule}")


@dataclass
class ImageOut:
    """An image a tool returns; the server saves it and delivers a thumbnail + link."""

    array: np.ndarray  # [H, W, 3] or [H, W, 4] uint8, or [H, W] uint8 (mask)
    name: str  # short label used in the file name, e.g. "edited", "mask", "heatmap"
    metadata: dict[str, str] = field(default_factory=dict)  # written as PNG text chunks


@dataclass
class ToolOutput:
    text: str  # a short summary for the model
    structured: BaseModel  # an instance of the spec's output_model
    images: list[ImageOut] = field(default_factory=list)  # the server saves each and lists it in "saved_images"


class ToolContext(Protocol):
    """What the server gives a running tool. Implemented in `mcp_server`."""

    settings: Settings  # read-only use: ctx.settings.limits.max_k, ...
    engine: Engine

    def check(self) -> None:
        """Raise `engine.errors.Cancelled` if the call was cancelled."""

    def report(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """Publish progress (a progress notification, and job_status while it runs)."""

    def load_image(self, ref: str, argument: str, *, mode: Literal["RGB", "RGBA", "L", "keep"] = "keep") -> np.ndarray:
        """Decode an input image from a path in the read roots, an `image://ID`, or base64.

        Returns uint8 [H, W, C] (C = 3 or 4) or [H, W] for mode "L". Raises
        `ToolError` naming `argument` for anything unsafe or undecodable.
        """

    def resolve_input(self, path: str, argument: str) -> Path:
        """A client path resolved inside a read root (a regular file), or `ToolError`."""

    def cancel_token(self) -> CancelToken:
        """The CancelToken of this call (for engine functions that take one)."""

    def output_usage(self) -> dict[str, Any]:
        """The output folder: files and bytes the server wrote, retention limits (engine_status)."""


RunFn = Callable[[Any, ToolContext], ToolOutput]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    run: RunFn
    execution: Literal["device", "thread", "inline"] = "device"
    long_running: bool = False  # may outlast the deadline and become a job
    read_only: bool = True  # MCP annotation: does not modify its environment
    priority: int = 1  # scheduler priority for execution="device": 0 = cheap / interactive
    # per-call override of `execution`: e.g. mask_edit needs the device worker only for inpaint/detections,
    # so a plain colour-range fill does not wait behind a running diffusion job
    execution_for: Callable[[Any], Literal["device", "thread", "inline"]] | None = None
