"""The change log of a catalogue: every accepted change (an `apply`: upserts and deletes) is appended and
fsync'ed before it is committed in memory, replayed when the catalogue is opened, and compacted when it grows.

    j = Journal(path)                      # path: where the log lives (beside the catalogue, or a cache dir)
    n = j.replay(cat)                      # fold the log and apply it to a freshly loaded catalogue
    cat.apply(rows, vecs, dels, journal=j.append)   # logged (fsync) under the catalogue's lock, then applied

Why a log and not an atomic rewrite of the catalogue: a change costs O(its own size) on disk (one append and
one fsync, ~1.6 KB per 384-d item) instead of O(catalogue) (a 1M-row file and its 1.5 GB of embeddings
written again per call); the user's catalogue file is never rewritten; a crash can only tear the last
record, which was never acknowledged.

Format: frames `b"ATLG" | u32 payload length | u32 crc32(payload) | payload`, the payload a pickle of
`{"rows": [...], "ins": [bool], "vec": float32 bytes, "dim": int, "dels": [...]}` — the rows and the raw
input vectors exactly as `Catalog.apply` received them, `ins[i]` whether row i was a new id then. Loading
uses a restricted unpickler: plain containers and scalars, and only the stdlib date/time/decimal classes a
Parquet catalogue may hold (no other class can be named by a log); each record is round-tripped through
it before it is written, so what is written can be read.

Crash rules: a record is acknowledged only after `os.fsync`; on replay a torn or corrupt tail (short frame,
bad magic, CRC mismatch) ends the log and is cut off (the log is truncated to its last good frame; a bad
frame followed by more data is kept aside as `<log>.damaged-<time>` first); compaction writes the folded
state to a temp file in the same folder, fsyncs it, `os.replace`s it over the log and fsyncs the folder, so
the log on disk is always the old one or the new one. Appends and compaction take an exclusive `flock` on
`<log>.lock` (never replaced), so two processes cannot interleave frames or lose an append to a compaction.

Replay folds the log first (one pass, keeping each id's last row and vector) and applies two bulk changes:
the deletes of ids whose last event was a delete or that were deleted and added again (they go to the end,
as they did live), then every live changed id, the added ones in their order of (re-)insertion. The result
equals applying the records one by one (same rows, same vectors, same row order), at the cost of one
bulk upsert instead of one per record. Deletes of ids the catalogue does not hold are skipped (the file may
have been edited since).
"""

from __future__ import annotations

import datetime
import decimal
import fcntl
import io
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInput
from .files import atomic_write, fsync_dir, sweep

MAGIC = b"ATLG"
_HEAD = struct.Struct("<4sII")
DEFAULT_COMPACT_BYTES = 64 << 20  # compact once the log passes this and twice its size after the last compaction
_TMP_PREFIX = ".atelier-tmp-log-"
_ALLOWED = {("datetime", "date"), ("datetime", "datetime"), ("datetime", "time"), ("datetime", "timedelta"),
            ("datetime", "timezone"), ("decimal", "Decimal"), ("zoneinfo", "ZoneInfo._unpickle")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"class {module}.{name} is not allowed in a catalogue log")
        if module == "zoneinfo":
            import zoneinfo

            return zoneinfo.ZoneInfo._unpickle
        return getattr({"datetime": datetime, "decimal": decimal}[module], name)


def _loads(payload: bytes) -> Any:
    return _Unpickler(io.BytesIO(payload)).load()


def frames(data: bytes) -> tuple[list[dict[str, Any]], int, bool]:
    """Split log bytes -> (records of the good frames, bytes they span, whether more data follows them).
    A frame is good when whole, its CRC matches and its payload loads with the restricted unpickler."""
    out: list[dict[str, Any]] = []
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic != MAGIC or end > len(data):
            break
        payload = data[pos + _HEAD.size:end]
        rec = _record(payload) if zlib.crc32(payload) == crc else None
        if rec is None:
            break
        out.append(rec)
        pos = end
    return out, pos, pos < len(data)


def _record(payload: bytes) -> dict[str, Any] | None:
    """A payload -> its record, or None when it does not load or is not a well-formed record."""
    try:
        rec = _loads(payload)
        ok = (isinstance(rec, dict) and isinstance(rec.get("rows"), list) and isinstance(rec.get("dels"), list)
              and len(rec.get("ins", ())) == len(rec["rows"])
              and len(rec.get("vec", b"")) == 4 * len(rec["rows"]) * int(rec.get("dim", 0)))
    except Exception:
        return None
    return rec if ok else None


def encode(rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor | None, dels: Sequence[str],
           inserted: Sequence[bool]) -> bytes:
    """One frame for one change. vectors: [len(rows), dim] (any float; stored as float32)."""
    if rows:
        assert vectors is not None
        vec = np.ascontiguousarray(vectors.detach().cpu().float().numpy())
        dim = int(vec.shape[1])
    else:
        vec, dim = np.zeros((0, 0), np.float32), 0
    record = {"rows": [dict(r) for r in rows], "ins": [bool(x) for x in inserted], "vec": vec.tobytes(),
              "dim": dim, "dels": [str(d) for d in dels]}
    payload = pickle.dumps(record, protocol=5)
    try:
        _loads(payload)  # what cannot be read back is never written
    except Exception as exc:
        raise InvalidInput("items", f"<{len(rows)} items>", f"holds a value the catalogue's log cannot store "
                           f"({exc}); use JSON values") from exc
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def fold(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]], np.ndarray | None]:
    """The net effect of log records, in order -> (ids to delete first, rows to upsert then, their vectors
    [n, dim] float32 or None when no row is live). See the module docstring for why this equals replaying."""
    live: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
    seq: dict[str, int] = {}  # ids appended by the log (new, or re-added after a delete) -> insertion order
    deleted_once: set[str] = set()  # ids the log deleted at least once
    counter = 0
    for rec in records:
        dim = rec["dim"]
        vecs = np.frombuffer(rec["vec"], dtype=np.float32).reshape(len(rec["rows"]), dim) if rec["rows"] else None
        for i, (row, ins) in enumerate(zip(rec["rows"], rec["ins"])):
            rid = str(row["id"])
            assert vecs is not None
            if ins and rid not in seq:
                seq[rid] = counter
                counter += 1
            live[rid] = (row, vecs[i])
        for rid in rec["dels"]:
            live.pop(rid, None)
            seq.pop(rid, None)
            deleted_once.add(rid)
    dels = [rid for rid in deleted_once if rid not in live or rid in seq]
    order = sorted(live, key=lambda rid: seq.get(rid, -1))  # in-place updates first, then appends in order
    rows = [live[rid][0] for rid in order]
    vectors = np.stack([live[rid][1] for rid in order]) if order else None
    return dels, rows, vectors


class Journal:
    """The log at `path`. Thread-safe; `append` and `compact` also lock out other processes (flock)."""

    def __init__(self, path: Path, *, compact_bytes: int = DEFAULT_COMPACT_BYTES) -> None:
        self.path = Path(path)
        self.compact_bytes = int(compact_bytes)
        self._lock = threading.Lock()
        self._fh: Any = None
        self._ino: int | None = None
        self._compacted_size = 0
        self.records = 0  # records replayed or appended since this process opened it
        self.compactions = 0

    # -- locking -------------------------------------------------------------
    def _flock(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _handle(self) -> Any:
        """The append handle, reopened when the file on disk is not the one it holds (compacted elsewhere)."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = None
        if self._fh is None or ino != self._ino:
            if self._fh is not None:
                self._fh.close()
            created = ino is None
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 (held open between appends)
            self._ino = os.fstat(self._fh.fileno()).st_ino
            if created:
                fsync_dir(self.path.parent)
        return self._fh

    # -- writing ---------------------------------------------------------------
    def append(self, rows: Sequence[Mapping[str, Any]], vectors: torch.Tensor | None, dels: Sequence[str],
               inserted: Sequence[bool]) -> None:
        """Write one change and fsync it. Called by `Catalog.apply` under its lock, after its checks and
        before anything changes: when this raises, nothing changed. OSError -> InvalidInput naming the log."""
        frame = encode(rows, vectors, dels, inserted)
        with self._lock:
            fh, before = None, 0
            try:
                lock = self._flock()
                try:
                    fh = self._handle()
                    before = os.fstat(fh.fileno()).st_size
                    fh.write(frame)
                    os.fsync(fh.fileno())
                    size = before + len(frame)
                finally:
                    self._unlock(lock)
            except OSError as exc:
                if fh is not None:  # a partial frame may be on disk (ENOSPC): cut it off, the change is refused
                    try:
                        os.ftruncate(fh.fileno(), before)
                    except OSError:
                        pass
                raise InvalidInput("catalog", str(self.path), f"the change could not be written to the "
                                   f"catalogue's log ({exc.strerror or exc}); nothing was changed") from exc
            self.records += 1
            if size > self.compact_bytes and size > 2 * self._compacted_size:
                try:
                    self._compact_locked()
                except OSError:
                    pass  # the appended log is intact; compaction is retried after the next append

    def compact(self) -> None:
        with self._lock:
            self._compact_locked()

    def _compact_locked(self) -> None:
        lock = self._flock()
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
            payloads, good, _ = frames(data)
            dels, rows, vecs = fold(payloads)
            parts = []
            if dels:
                parts.append(encode([], None, dels, []))
            if rows:
                assert vecs is not None
                parts.append(encode(rows, torch.from_numpy(vecs), [], [True] * len(rows)))
            blob = b"".join(parts)
            atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(blob), prefix=_TMP_PREFIX)
            self._compacted_size = len(blob)
            self.compactions += 1
        finally:
            self._unlock(lock)

    # -- reading ---------------------------------------------------------------
    def replay(self, apply: Callable[[list[dict[str, Any]], torch.Tensor | None, list[str]], Any],
               has: Callable[[str], bool]) -> tuple[int, list[str]]:
        """Fold the log and apply it (`apply(rows, vectors, dels)`, `has(id)`) -> (records, warnings). A torn
        tail is cut off; a damaged middle is kept aside as `<log>.damaged-<time>` and the log cut there."""
        warnings: list[str] = []
        with self._lock:
            if not self.path.exists():
                return 0, warnings
            lock = self._flock()
            try:
                sweep(self.path.parent, _TMP_PREFIX)  # a compaction a crash interrupted
                data = self.path.read_bytes()
                payloads, good, more = frames(data)
                if more:
                    if _has_magic_after(data, good):
                        aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
                        aside.write_bytes(data)
                        warnings.append(f"catalogue log {self.path}: damaged after {len(payloads)} records; "
                                        f"the rest was kept aside as {aside.name}")
                    with open(self.path, "r+b") as fh:
                        fh.truncate(good)
                        os.fsync(fh.fileno())
            finally:
                self._unlock(lock)
            self._compacted_size = good
        dels, rows, vecs = fold(payloads)
        known = [d for d in dels if has(d)]
        if known:
            apply([], None, known)
        if rows:
            assert vecs is not None
            apply(rows, torch.from_numpy(vecs.copy()), [])
        self.records = len(payloads)
        return len(payloads), warnings

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _has_magic_after(data: bytes, pos: int) -> bool:
    """Whether a frame header appears after a bad frame at `pos`: damage in the middle, not a torn tail."""
    return data.find(MAGIC, pos + 1) >= 0


def read_records(path: Path) -> list[dict[str, Any]]:
    """The good records of a log file, in order."""
    return frames(path.read_bytes())[0] if path.exists() else []
