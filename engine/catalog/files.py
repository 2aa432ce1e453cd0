"""Whole-or-nothing files for the catalogue's own artefacts (embedding cache, compacted log, saved index):
a temp file in the target's folder (named by a prefix, so a crash's leftovers can be swept), written,
fsync'ed, `os.replace`d over the target, the folder fsync'ed. A reader sees the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None], *, prefix: str, suffix: str = "") -> None:
    """`write(temp_path)` fills a temp file beside `path`; it then replaces `path` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def sweep(folder: Path, prefix: str) -> int:
    """Remove the temp files a crash left in `folder` (ours only, by prefix) -> how many."""
    n = 0
    try:
        for p in folder.glob(f"{prefix}*"):
            if p.is_file() and not p.is_symlink():
                p.unlink()
                n += 1
    except OSError:
        pass
    return n
