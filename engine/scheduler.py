"""Scheduler: a bounded queue and one worker thread per device.

Accelerator work is serialised through the device's worker so two requests
never fight over device memory. Each piece of work gets a `CancelToken`; the
work calls `token.check()` between steps (decode step, diffusion step,
catalogue chunk) and `token.report(...)` to publish progress. A full queue
refuses new work at once with `Busy`.

The scheduler knows nothing about MCP or jobs: it returns a
`concurrent.futures.Future` per submission.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import Busy, Cancelled

log = logging.getLogger("atelier.engine.scheduler")

ProgressListener = Callable[[float, float | None, str | None], None]


class CancelToken:
    """Cooperative cancellation plus progress reporting for one piece of work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.progress: float = 0.0
        self.total: float | None = None
        self.message: str | None = None
        self._listeners: list[ProgressListener] = []
        self._lock = threading.Lock()

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise `Cancelled` if cancellation was asked for. Call between steps."""
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled")

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True if cancelled meanwhile."""
        return self._event.wait(timeout)

    def add_listener(self, fn: ProgressListener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: ProgressListener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def report(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        self.progress, self.total, self.message = float(progress), total, message
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(self.progress, total, message)
            except Exception:  # a listener must never break the work
                log.debug("progress listener failed", exc_info=True)


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    fn: Callable[[CancelToken], Any] = field(compare=False)
    token: CancelToken = field(compare=False)
    future: Future = field(compare=False)
    label: str = field(compare=False, default="")
    enqueued: float = field(compare=False, default_factory=time.monotonic)


_STOP = object()


class Scheduler:
    """One worker thread draining a bounded priority queue.

    `priority` 0 runs before 1 (cheap, interactive calls go first); equal
    priorities run in submission order.
    """

    def __init__(self, name: str, max_queue: int = 16) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.name = name
        self.max_queue = max_queue
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._pending = 0
        self._lock = threading.Lock()
        self._running: _Item | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"atelier-worker-{name}", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------
    @property
    def depth(self) -> int:
        """Queued items, not counting the one running."""
        with self._lock:
            return self._pending

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def running_label(self) -> str | None:
        item = self._running
        return item.label if item else None

    def submit(self, fn: Callable[[CancelToken], Any], *, token: CancelToken | None = None,
               label: str = "", priority: int = 1) -> tuple[Future, CancelToken]:
        token = token or CancelToken()
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise Busy(f"the {self.name} worker is shutting down")
            if self._pending >= self.max_queue:
                raise Busy(f"server busy: the {self.name} queue is full ({self.max_queue} waiting); retry later")
            self._pending += 1
        self._q.put(_Item(priority, next(self._seq), fn, token, fut, label))
        return fut, token

    def run_sync(self, fn: Callable[[CancelToken], Any], *, label: str = "", priority: int = 1,
                 timeout: float | None = None) -> Any:
        fut, _ = self.submit(fn, label=label, priority=priority)
        return fut.result(timeout)

    def shutdown(self, cancel_running: bool = True, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
        if cancel_running and self._running is not None:
            self._running.token.cancel("server shutting down")
        # fail everything still waiting
        drained = []
        while True:
            try:
                drained.append(self._q.get_nowait())
            except queue.Empty:
                break
        for item in drained:
            if item is _STOP:
                continue
            with self._lock:
                self._pending -= 1
            item.token.cancel("server shutting down")
            if not item.future.done():
                item.future.set_exception(Cancelled("server shutting down"))
        self._q.put(_Item(10**9, next(self._seq), lambda t: None, CancelToken(), Future(), "__stop__"))
        self._thread.join(timeout)

    # -- worker -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item: _Item = self._q.get()
            if item.label == "__stop__":
                return
            with self._lock:
                self._pending -= 1
            if item.future.cancelled() or item.token.cancelled:
                if not item.future.done():
                    item.future.set_exception(Cancelled(item.token.reason or "cancelled before start"))
                item = None  # type: ignore[assignment]
                continue
            if not item.future.set_running_or_notify_cancel():
                item = None  # type: ignore[assignment]
                continue
            self._running = item
            result = error = None
            try:
                result = item.fn(item.token)
            except BaseException as exc:  # delivered to the waiting caller
                error = exc
            # idle before the caller hears: whoever sees the outcome must not then see the worker busy
            self._running = None
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)
            # while idle, hold nothing of the last work (its tensors, its exception's frames)
            item = result = error = None  # type: ignore[assignment]
