"""Helpers shared by the test files (fixtures live in conftest.py): free ports, the environment of a
server subprocess, waiting for its port, and the settings of an in-process server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import InvalidInput
from mcp_server.config import Settings
from tools.base import ToolError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# what a tool raises on bad input when called in-process: its own ToolError, or the engine's InvalidInput,
# which it lets through unwrapped (the server answers both alike, naming the argument)
REFUSED = (ToolError, InvalidInput)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a server subprocess: its own output and read folders, the session's engine cache."""
    env = dict(os.environ)
    (tmp_path / "data").mkdir(exist_ok=True)
    env.update({
        "ATELIER_PATHS__OUTPUT_DIR": str(tmp_path / "out"),
        "ATELIER_PATHS__READ_ROOTS": json.dumps([str(tmp_path / "data")]),
        "ATELIER_ENGINE__CACHE_DIR": os.environ["ATELIER_TEST_CACHE"],
        "ATELIER_ENGINE__DEVICE": "cpu",
        "ATELIER_LOGGING__FORMAT": "json",
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra)
    return env


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60, what: str = "server") -> None:
    """Wait until `proc` (named `what` in errors) listens on `port`; its piped stderr is shown if it exits."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr is not None else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def make_settings(tmp_path: Path, **over) -> Settings:
    """Settings of an in-process server: its own folders under tmp_path, the session's engine cache, CPU."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    base = {
        "paths": {"output_dir": str(tmp_path / "out"), "read_roots": [str(data)]},
        "engine": {"cache_dir": os.environ["ATELIER_TEST_CACHE"], "device": "cpu"},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return Settings(**base)


def run(coro):
    return asyncio.run(coro)


def tiny_llama_folder(folder: Path, *, max_positions: int = 256, seed: int = 0) -> Path:
    """A random 2-layer Llama (vocabulary 256, width 64, GQA 4/2 heads) saved by transformers into `folder`."""
    import torch

    from engine._compat import model_libraries

    model_libraries()  # the torchvision shim first, as the engine does before any transformers import
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    T.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder
