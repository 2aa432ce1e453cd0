"""Tool families. One module per family; each exposes `TOOLS: list[ToolSpec]`.

A tool module owns its pydantic input/output models, its limit checks, the
calls into the engine and the shaping of results. It never touches torch
devices directly and never imports `mcp_server` (the server hands it a
`ToolContext`).
"""

from __future__ import annotations

import importlib

from .base import ToolSpec

FAMILIES = (
    "tools.status",
    "tools.color",
    "tools.masks",
    "tools.recommend",
    "tools.text",
    "tools.images",
)


def load_specs() -> list[ToolSpec]:
    """All tool specs of the families that exist in this build, in a stable order."""
    specs: list[ToolSpec] = []
    for mod_name in FAMILIES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name == mod_name:
                continue
            raise
        specs.extend(mod.TOOLS)
    return specs
