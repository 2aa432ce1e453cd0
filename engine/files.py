"""Whole-or-nothing files and folders, and the sweep of what a crash left behind.

One rule for every writer in the process (the sandbox's outputs, the
catalogue's cache, log and index, the LLM conversion cache): the new content
goes to a temp name in the target's own folder (so the final `os.replace` is
a rename on one file system), is fsync'ed, then replaces the target; the
folder is fsync'ed so the new name survives a power cut. A reader sees the old
file or the new one, never a part. Temp names start with a caller-chosen
prefix, so `sweep` can remove a crash's leftovers (those files only).

- `atomic_write(path, content, prefix=, suffix="", overwrite=True, mode=0o600)`:
  `content` is bytes (written through the descriptor the temp file was
  created with: `O_CREAT | O_EXCL | O_NOFOLLOW`, so a name planted in the
  folder is never followed) or a callable `write(temp_path)` that fills the
  temp file by name (for writers that take a path, e.g. `np.save`; give the
  suffix they expect). With `overwrite=False` an existing target (even a
  dangling symlink) is left alone and `TargetExists` is raised. Any error
  removes the temp file and propagates unchanged (an `OSError` keeps its
  errno, so a caller can tell a full disk, ENOSPC / EDQUOT, from the rest).
- `atomic_folder(path)`: a context manager yielding a fresh temp folder beside
  `path`; on a normal exit it replaces `path` (removing the old folder), on an
  exception it is removed.
- `fsync_dir(folder)`: make a rename in `folder` durable. After a replace, a
  folder that cannot be opened or synced on its file system (EACCES, EPERM,
  EINVAL, ENOTSUP) is not an error: the rename already happened and there is
  nothing more to do; any other error (EIO) propagates.
- `sweep(folder, prefix, folders=False)`: remove the regular files (and, with
  `folders`, the folders) named `prefix*` in `folder`; never follows or
  removes a symlink; returns how many were removed.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_NO_DIR_SYNC = frozenset(e for e in (errno.EACCES, errno.EPERM, errno.EINVAL, getattr(errno, "ENOTSUP", None),
                                     getattr(errno, "EOPNOTSUPP", None)) if e is not None)
_CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
_NAME_TRIES = 100


class TargetExists(FileExistsError):
    """`atomic_write(..., overwrite=False)` found something at the target path; nothing was written there."""


def fsync_dir(folder: Path, *, strict: bool = True) -> None:
    """fsync a folder (its entries: a rename in it). `strict=False` ignores a file system that cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        if strict or exc.errno not in _NO_DIR_SYNC:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if strict or exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def _create_temp(folder: Path, prefix: str, suffix: str, mode: int) -> tuple[int, Path]:
    for _ in range(_NAME_TRIES):
        tmp = folder / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(tmp, _CREATE_FLAGS, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temp name after {_NAME_TRIES} tries", str(folder))


def atomic_write(path: Path, content: bytes | bytearray | memoryview | Callable[[str], None], *, prefix: str,
                 suffix: str = "", overwrite: bool = True, mode: int = 0o600) -> Path:
    """Write `content` to `path` whole or not at all (see the module docstring) -> `path`."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(folder, prefix, suffix, mode)
    try:
        if callable(content):
            os.close(fd)
            fd = -1
            content(str(tmp))
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        else:
            view = memoryview(content).cast("B")
            while view:
                n = os.write(fd, view)
                view = view[n:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if not overwrite and os.path.lexists(path):
            raise TargetExists(errno.EEXIST, "refusing to overwrite an existing file", str(path))
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder, strict=False)
    return path


@contextmanager
def atomic_folder(path: Path, *, prefix: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `path` to fill; on success it replaces `path`, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix if prefix is not None else f"{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent, strict=False)


def sweep(folder: Path, prefix: str, *, folders: bool = False) -> int:
    """Remove the temp files (and with `folders`, temp folders) a crash left in `folder` -> how many."""
    n = 0
    try:
        entries = list(Path(folder).glob(f"{prefix}*"))
    except OSError:
        return 0
    for p in entries:
        try:
            if p.is_symlink():
                continue
            if p.is_file():
                p.unlink()
                n += 1
            elif folders and p.is_dir():
                shutil.rmtree(p)
                n += 1
        except OSError:
            pass
    return n
