"""A thread pool of a fixed size: all its threads start together and live until `shutdown`.

`concurrent.futures.ThreadPoolExecutor` adds a thread whenever a call arrives and no thread has yet
signalled that it is idle, so its size drifts with how calls happen to overlap (and with the moment a worker
that has just published a result gets to release its idle token): a server under the same load ends with a
different number of threads from one run to the next, and a thread-count check cannot tell that drift from a
leak. This pool starts all its threads at the first `submit` (or `start`), so the count is a constant of the
configuration from the first call on. Each thread runs `initializer` when it starts: the server passes the
engine's `start_thread`, which starts the thread's OpenMP team too (the native threads a thread gets at its
first parallel torch op).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger(__name__)


class FixedPool:
    """`submit(fn, *args) -> Future`, `shutdown(wait, cancel_futures)`: the subset of `ThreadPoolExecutor`
    the server uses, over `size` daemon threads named `{name}_{i}`."""

    def __init__(self, size: int, name: str, initializer: Callable[[], None] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one thread, got size={size}")
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False
        self.initializer = initializer  # run by each thread when it starts (a failure is logged, not fatal)

    def start(self) -> None:
        """Start every thread (once); `submit` calls it."""
        with self._lock:
            if self._threads or self._shutdown:
                return
            for i in range(self.size):
                t = threading.Thread(target=self._work, name=f"{self.name}_{i}", daemon=True)
                t.start()
                self._threads.append(t)

    @property
    def threads(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue `fn(*args)` -> its future; RuntimeError once the pool is shut down."""
        if not self._threads:
            self.start()
        fut: Future = Future()
        with self._lock:  # never queued behind the shutdown sentinels
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((fut, fn, args))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            stops = len(self._threads) if first else 0  # the sentinels that end the threads
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:  # one an earlier shutdown queued: put back below
                        stops += 1
                    else:
                        item[0].cancel()
            for _ in range(stops):
                self._queue.put(None)
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()

    def _work(self) -> None:
        if self.initializer is not None:
            try:
                self.initializer()
            except Exception:
                log.warning("a pool thread's initializer failed", extra={"pool": self.name}, exc_info=True)
        while True:
            item = self._queue.get()
            if item is None:
                return
            _run(*item)
            item = None  # hold nothing of a finished call while waiting for the next


def _run(fut: Future, fn: Callable[..., Any], args: tuple) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # handed to the caller with the future, as ThreadPoolExecutor does
        fut.set_exception(exc)
    else:
        fut.set_result(result)
