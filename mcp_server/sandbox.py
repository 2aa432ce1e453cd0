"""The sandbox: every client path is hostile until resolved inside a configured root.

Inputs must resolve (realpath, symlinks followed) to a regular file inside one
of the read roots; outputs go only to the output directory, under fresh names,
written atomically by `engine.files.atomic_write` (temp file in the same directory,
created with O_EXCL | O_NOFOLLOW, fsync, `os.replace`, folder fsync; an existing
output is never replaced).

Rules, each with its own error text:
- a path is a non-empty string without NUL bytes and at most 4096 characters;
- `~` is not expanded (a client has no home here);
- relative paths are taken relative to each read root in turn;
- after resolution the path must be inside a root: sibling-prefix directories
  (`/data-evil` vs `/data`) are outside (component-wise comparison); the error
  names the allowed folders (the read roots and the output directory, at most
  8, their paths only: "image='/etc/passwd': resolves outside the allowed read
  roots (/home/me/Pictures, /srv/atelier-output); ...");
- it must exist and be a regular file (no directories, FIFOs, sockets or devices);
- reading opens the resolved path with O_NOFOLLOW | O_NONBLOCK and re-checks the
  opened descriptor's real path and type, so a directory swapped for a symlink
  between the check and the open is still refused.

A full disk or an exhausted quota (ENOSPC, EDQUOT) while writing an output is
the ToolError "output_dir=...: no space left on device writing <output dir>";
the temp file is removed, so nothing partial is left under any name.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from pathlib import Path

from engine.files import TargetExists, atomic_write, sweep
from tools.base import ToolError

MAX_PATH_CHARS = 4096
TEMP_PREFIX = ".atelier-tmp-"
MAX_ROOTS_SHOWN = 8  # an error names at most this many allowed folders
NO_SPACE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


class Sandbox:
    def __init__(self, read_roots: list[Path], output_dir: Path) -> None:
        self.output_dir = Path(os.path.realpath(output_dir))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        roots = [Path(os.path.realpath(r)) for r in read_roots]
        # outputs are readable inputs too (image:// resolves there; a tool may re-read its output)
        if self.output_dir not in roots:
            roots.append(self.output_dir)
        self.read_roots = roots

    # -- helpers ----------------------------------------------------------
    @staticmethod
    def _inside(path: str, root: Path) -> bool:
        root_s = str(root)
        return path == root_s or path.startswith(root_s.rstrip(os.sep) + os.sep)

    def _root_of(self, real: str) -> Path | None:
        for root in self.read_roots:
            if self._inside(real, root):
                return root
        return None

    def _outside_rule(self) -> str:
        """The rule text naming the allowed folders (their paths only; nothing inside them is listed)."""
        shown = [str(r) for r in self.read_roots[:MAX_ROOTS_SHOWN]]
        more = len(self.read_roots) - len(shown)
        return ("resolves outside the allowed read roots (" + ", ".join(shown)
                + (f" and {more} more" if more > 0 else "") + ")")

    @staticmethod
    def _check_text(path: object, argument: str) -> str:
        if not isinstance(path, str):
            raise ToolError.invalid(argument, path, "a path must be a string")
        if path == "" or path.strip() == "":
            raise ToolError.invalid(argument, path, "a path must not be empty")
        if "\x00" in path:
            raise ToolError.invalid(argument, path, "a path must not contain NUL bytes")
        if len(path) > MAX_PATH_CHARS:
            raise ToolError.invalid(argument, path[:60], f"a path must be at most {MAX_PATH_CHARS} characters")
        return path

    # -- inputs -----------------------------------------------------------
    def resolve_input(self, path: str, argument: str) -> Path:
        """Resolve a client path to a regular file inside a read root, or raise ToolError."""
        text = self._check_text(path, argument)
        candidates = [Path(text)] if os.path.isabs(text) else [root / text for root in self.read_roots]
        outside = None
        for cand in candidates:
            try:
                real = os.path.realpath(cand)
            except OSError as exc:  # e.g. a /proc link we may not read
                raise ToolError.invalid(argument, path, f"cannot be resolved: {exc.strerror}") from None
            if self._root_of(real) is None:
                outside = real
                continue
            try:
                st = os.stat(real)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ToolError.invalid(argument, path, f"cannot be read: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, socket or device)"
                raise ToolError.invalid(argument, path, f"is {kind}; only regular files can be read")
            return Path(real)
        if outside is not None:
            raise ToolError.invalid(argument, path, self._outside_rule() + "; symlinks are followed before the check")
        raise ToolError.invalid(argument, path, "no such file inside the read roots")

    def read_bytes(self, path: str, argument: str, max_bytes: int) -> tuple[Path, bytes]:
        """Resolve and read a file with a size cap, re-checking the opened descriptor."""
        real = self.resolve_input(path, argument)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ToolError.invalid(argument, path, "changed into a symlink while being opened") from None
            raise ToolError.invalid(argument, path, f"cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ToolError.invalid(argument, path, "is not a regular file")
            fd_path = f"/proc/self/fd/{fd}"
            if os.path.exists(fd_path):
                opened = os.path.realpath(fd_path)
                if self._root_of(opened) is None:
                    raise ToolError.invalid(argument, path, self._outside_rule())
            if st.st_size > max_bytes:
                raise ToolError.invalid(argument, path, f"file is {st.st_size} bytes; the limit is {max_bytes}")
            chunks = []
            total = 0
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ToolError.invalid(argument, path, f"file is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return real, b"".join(chunks)
        finally:
            os.close(fd)

    # -- outputs ----------------------------------------------------------
    def fresh_output_path(self, stem: str, suffix: str) -> Path:
        safe = "".join(c if (c.isalnum() or c in "-_") else "-" for c in stem)[:48] or "out"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.output_dir / f"{safe}-{stamp}-{secrets.token_hex(4)}{suffix}"

    def write_atomic(self, final: Path, data: bytes) -> Path:
        """Write `data` to `final` (inside the output dir) atomically (`engine.files.atomic_write`); never overwrite."""
        final = Path(final)
        if Path(os.path.realpath(final.parent)) != self.output_dir:
            raise ToolError.invalid("output", str(final), "outputs are written only to the output directory")
        try:
            return atomic_write(final, data, prefix=TEMP_PREFIX, overwrite=False, mode=0o644)
        except TargetExists:
            raise ToolError.invalid("output", str(final), "refusing to overwrite an existing file") from None
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise self._no_space(exc) from None
            raise

    def _no_space(self, exc: OSError) -> ToolError:
        what = "disk quota exceeded" if exc.errno == getattr(errno, "EDQUOT", None) else "no space left on device"
        return ToolError.invalid("output_dir", str(self.output_dir),
                                 f"{what} writing {self.output_dir}; nothing was saved — free space there (or "
                                 f"set paths.output_dir to a larger disk) and retry")

    def sweep_temp_files(self) -> int:
        """Remove temp files left by a crash (`engine.files.sweep`). Returns how many were removed."""
        return sweep(self.output_dir, TEMP_PREFIX)
