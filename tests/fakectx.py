"""A minimal ToolContext for unit-testing tool modules without the server.

The real context (sandbox, media store, progress notifications, jobs) lives in
`mcp_server`; server-level tests use the in-memory MCP client instead.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.scheduler import CancelToken
from tools.base import ToolError


class FakeContext:
    def __init__(self, engine: Any, settings: Any) -> None:
        self.engine = engine
        self.settings = settings
        self.token = CancelToken()
        self.progress: list[tuple[float, float | None, str | None]] = []

    def check(self) -> None:
        self.token.check()

    def report(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        self.progress.append((progress, total, message))

    def cancel_token(self) -> CancelToken:
        return self.token

    def resolve_input(self, path: str, argument: str) -> Path:
        p = Path(path)
        if not p.is_file():
            raise ToolError.invalid(argument, path, "file does not exist")
        return p

    def load_image(self, ref: str, argument: str, *, mode: str = "keep") -> np.ndarray:
        try:
            is_file = not ref.startswith("data:") and Path(ref).exists()
        except OSError:  # e.g. a long base64 string is not a valid file name
            is_file = False
        if not is_file:
            try:
                raw = base64.b64decode(ref.split(",", 1)[-1], validate=True)
                img = Image.open(io.BytesIO(raw))
            except Exception as exc:
                raise ToolError.invalid(argument, ref[:40], f"not a readable image: {exc}") from exc
        else:
            img = Image.open(ref)
        img.load()
        if mode == "keep":
            if img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        else:
            img = img.convert(mode)
        return np.asarray(img).copy()


def make_context(tmp_path: Path | None = None, **settings_overrides: Any) -> FakeContext:
    """A FakeContext over a CPU engine.

    The engine cache dir is shared by the whole test session (`ATELIER_TEST_CACHE`,
    set in conftest.py) so converted models and embedding caches are built once.
    """
    import os

    from engine import Engine, EngineConfig
    from mcp_server.config import Settings

    settings = Settings(**settings_overrides)
    cache = Path(os.environ.get("ATELIER_TEST_CACHE") or ((tmp_path or Path("/tmp")) / "atelier-cache"))
    eng = Engine(EngineConfig(device="cpu", cache_dir=cache, queue_length=settings.limits.queue_length))
    return FakeContext(eng, settings)


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
