"""The generic coalescer: concurrent requests served in batches on one worker thread (see `Coalescer`).
Knows nothing of catalogues: it runs a `run_batch(list) -> list` callable."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class _Slot:
    request: Any
    cost: int = 0
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    t: float = 0.0  # when it was queued (time.monotonic)


class Coalescer:
    """Serves concurrent requests in batches on one worker thread.

    `submit` queues a request and blocks until it is served. The worker takes
    everything queued (up to `max_batch`, oldest first) and runs it as one
    batch; requests that arrive meanwhile form the next batch. One thread runs
    every batch because torch and Numba keep an OpenMP team per calling
    thread: batches run from many threads leave idle teams spinning on the
    same cores (measured: a 16-query batch 21 ms from one thread, 31-37 ms
    from rotating pool threads). The worker starts on demand and exits after
    `idle_s` without work.

    Gathering: a batch about to start waits for companions, at most
    `gather_s` after its oldest request was queued, while (a) callers
    announced with `with co.expect(): ...; co.submit(r)` have not submitted
    yet (the tool announces while it builds its query vector), or (b) the
    service is under concurrent load (a batch of more than one ended less than
    `busy_s` ago) and the last request came less than `quiet_s` ago. So
    sixteen calls that arrive together run as one batch, not a batch of one
    followed by fifteen. An idle service runs a lone request at once.
    Deterministic for tests: `pending` and `wait_pending(n)` expose the queue,
    `batches` records each batch's size.

    Isolation: when `run_batch` raises (an Exception) for a batch of several
    requests, each request of it is run again alone, so only a request that
    fails alone fails; callers should still check requests before `submit`.
    Memory: `submit(r, cost=bytes)` with `max_cost()` (bytes, None = no bound):
    a batch takes the oldest requests while their costs add up to at most
    `max_cost()` (always at least one).
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 64,
                 gather_s: float = 0.01, quiet_s: float = 0.001, busy_s: float = 0.05, idle_s: float = 5.0,
                 max_cost: Callable[[], int | None] | None = None) -> None:
        self._run = run_batch
        self._max_cost = max_cost or (lambda: None)
        self.max_batch = max_batch
        self.gather_s, self.quiet_s, self.busy_s, self.idle_s = gather_s, quiet_s, busy_s, idle_s
        self._busy_until = 0.0  # time.monotonic() until which the service counts as under load
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._running = False
        self._worker: threading.Thread | None = None
        self._closing = False
        self._incoming = 0  # announced (expect) and not yet submitted
        self._mine = threading.local()  # this thread's open announcements
        self.batches: list[int] = []

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def wait_pending(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= n, timeout)

    @contextlib.contextmanager
    def expect(self) -> Iterator[None]:
        """Announce that this thread will `submit` soon (see the class docstring)."""
        with self._cond:
            self._incoming += 1
        self._mine.n = getattr(self._mine, "n", 0) + 1
        try:
            yield
        finally:
            if self._mine.n > 0:  # left without submitting (bad input, cancelled): withdraw
                self._mine.n -= 1
                with self._cond:
                    self._incoming -= 1
                    self._cond.notify_all()

    def submit(self, request: Any, cost: int = 0) -> Any:
        slot = _Slot(request, cost=cost, t=time.monotonic())
        announced = getattr(self._mine, "n", 0) > 0
        if announced:
            self._mine.n -= 1
        with self._cond:
            if announced:
                self._incoming -= 1
            self._queue.append(slot)
            self._cond.notify_all()
            while not slot.done:
                if self._worker is None:  # none yet, idled out, or ended by an error: start one
                    self._worker = threading.Thread(target=self._loop, name="atelier-coalescer", daemon=True)
                    self._worker.start()
                self._cond.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def close(self) -> None:
        """Let the worker go now (once the queue is served) instead of after `idle_s`: it holds `run_batch`
        and whatever that refers to (a catalogue). A later `submit` starts a new one."""
        with self._cond:
            if self._worker is not None:
                self._closing = True
                self._cond.notify_all()

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # however it ends, the next submit (or a waiting one) starts a new worker
            with self._cond:
                if self._worker is threading.current_thread():
                    self._worker = None
                self._cond.notify_all()

    def _serve(self) -> None:
        with self._cond:
            while True:
                if not self._queue:
                    if not self._closing:
                        self._cond.wait(self.idle_s)
                    if not self._queue:  # idle or closed
                        self._closing = False
                        return
                    continue
                now = time.monotonic()
                left = self._queue[0].t + self.gather_s - now
                if left > 0 and len(self._queue) < self.max_batch:  # companions on their way may join
                    if self._incoming > 0:
                        self._cond.wait(left)
                        continue
                    quiet = self._queue[-1].t + self.quiet_s - now
                    if now < self._busy_until and quiet > 0:
                        self._cond.wait(min(left, quiet))
                        continue
                take = self._take()
                batch = self._queue[:take]
                del self._queue[:take]
                self._running = True
                self._cond.release()
                try:
                    self._serve_batch(batch)
                finally:
                    self._cond.acquire()
                    for s in batch:
                        s.done = True
                    self.batches.append(len(batch))
                    if len(batch) > 1:
                        self._busy_until = time.monotonic() + self.busy_s
                    self._running = False
                    self._cond.notify_all()


    def _take(self) -> int:
        """How many of the oldest queued requests the next batch takes (max_batch, max_cost)."""
        limit = self._max_cost()
        take, total = 0, 0
        for s in self._queue[:self.max_batch]:
            if take and limit is not None and total + s.cost > limit:
                break
            take += 1
            total += s.cost
        return take

    def _serve_batch(self, batch: list[_Slot]) -> None:
        try:
            results = self._run([s.request for s in batch])
            for s, r in zip(batch, results, strict=True):
                s.result = r
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for s in batch:  # one request failed the batch: serve each alone, so only the guilty one fails
                try:
                    s.result = self._run([s.request])[0]
                except Exception as one:
                    s.error = one
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: every caller of the batch sees it
            for s in batch:
                s.error = exc


