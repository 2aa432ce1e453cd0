"""Test-only tools used to exercise the server core (jobs, progress, cancellation,
busy queue, stdout protection, media delivery, sandboxed image input).

`python tests/tooling.py [stdio|http PORT]` serves the real server plus these
tools, for subprocess transport tests.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.base import ImageOut, ToolOutput, ToolSpec  # noqa: E402


class StepsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=1, le=100000)
    step_s: float = Field(0.05, ge=0, le=5)
    early: int = Field(0, ge=0, le=100000, description="report a total this much above steps (ends early, as "
                                                        "text that stops before max_new_tokens)")


class StepsOut(BaseModel):
    done_steps: int


def _steps(args: StepsIn, ctx) -> ToolOutput:
    done = 0
    for i in range(args.steps):
        ctx.check()
        time.sleep(args.step_s)
        done = i + 1
        ctx.report(done, args.steps + args.early, f"step {done}")
    return ToolOutput(text=f"{done} steps", structured=StepsOut(done_steps=done))


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Msg(BaseModel):
    message: str


def _noisy(args: Empty, ctx) -> ToolOutput:
    print("library chatter on stdout via print()")
    sys.stdout.flush()
    os.write(1, b"raw chatter on fd 1\n")
    return ToolOutput(text="printed", structured=Msg(message="printed"))


def _boom(args: Empty, ctx) -> ToolOutput:
    raise RuntimeError("secret internal detail /etc/shadow")


def _oom(args: Empty, ctx) -> ToolOutput:
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _too_large(args: Empty, ctx) -> ToolOutput:
    from engine.errors import ModelTooLarge

    raise ModelTooLarge("model 'llm' would need about 9.000 GB once loaded (estimated before loading), over the "
                        "memory budget of 1.000 GB (engine.memory_budget_mb); nothing was loaded")


class ImgIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(64, ge=1, le=4096)
    height: int = Field(48, ge=1, le=4096)
    inline_full: bool = False


class ImgOut(BaseModel):
    width: int
    height: int


def _make_image(args: ImgIn, ctx) -> ToolOutput:
    yy, xx = np.mgrid[0 : args.height, 0 : args.width]
    arr = np.stack([(xx * 255 // max(1, args.width - 1)), (yy * 255 // max(1, args.height - 1)),
                    np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    return ToolOutput(text="made", structured=ImgOut(width=args.width, height=args.height),
                      images=[ImageOut(arr, "gradient", {"source": "test"})])


class LoadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str


class LoadOut(BaseModel):
    shape: list[int]
    checksum: int


def _load(args: LoadIn, ctx) -> ToolOutput:
    arr = ctx.load_image(args.image, "image")
    return ToolOutput(text=f"shape {arr.shape}", structured=LoadOut(shape=list(arr.shape), checksum=int(arr.sum())))


TEST_TOOLS = [
    ToolSpec("test_steps", "steps", "sleeps N steps with progress", StepsIn, StepsOut, _steps,
             execution="device", long_running=True),
    ToolSpec("test_noisy", "noisy", "prints to stdout", Empty, Msg, _noisy, execution="device"),
    ToolSpec("test_boom", "boom", "raises", Empty, Msg, _boom, execution="device"),
    ToolSpec("test_oom", "oom", "raises OOM", Empty, Msg, _oom, execution="device"),
    ToolSpec("test_too_large", "too large", "a model over the memory budget", Empty, Msg, _too_large,
             execution="device"),
    ToolSpec("test_image", "image", "makes an image", ImgIn, ImgOut, _make_image, execution="device"),
    ToolSpec("test_load", "load", "loads an image", LoadIn, LoadOut, _load, execution="thread"),
]


def main() -> None:
    from mcp_server.app import build_server
    from mcp_server.config import load_settings
    from mcp_server.logs import setup_logging
    from mcp_server.transports import serve_http, serve_stdio

    settings = load_settings()
    setup_logging(settings.logging.level, settings.logging.format)
    server = build_server(settings, extra_specs=TEST_TOOLS)
    mode = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    if mode == "stdio":
        serve_stdio(server)
    else:
        serve_http(server, mode, "127.0.0.1", int(sys.argv[2]))


if __name__ == "__main__":
    main()
