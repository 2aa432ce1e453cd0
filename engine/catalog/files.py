"""Whole-or-nothing files for the catalogue's own artefacts (embedding cache, compacted log, saved index).

The rule and the code are `engine.files` (one helper for the sandbox, the catalogue and the LLM cache);
this module re-exports it under the names the catalogue modules import."""

from __future__ import annotations

from ..files import atomic_write, fsync_dir, sweep

__all__ = ["atomic_write", "fsync_dir", "sweep"]
