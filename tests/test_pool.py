"""mcp_server/pool.py: the fixed thread pool behind tool calls. Oracle: the behaviour of
concurrent.futures.ThreadPoolExecutor for results, exceptions and shutdown, and a thread count that is the
configured size whatever the overlap of calls (the property ThreadPoolExecutor lacks)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from mcp_server.pool import FixedPool


def _ours() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("test-pool_")}


def test_all_threads_start_at_the_first_call_and_the_count_never_drifts():
    pool = FixedPool(5, "test-pool")
    try:
        assert _ours() == set()  # nothing before the first call
        assert pool.submit(lambda: 7).result(5) == 7
        assert _ours() == {f"test-pool_{i}" for i in range(5)}
        # bursts of every overlap, from one call at a time to more calls than threads
        for burst in (1, 2, 5, 12, 1, 30):
            futs = [pool.submit(time.sleep, 0.001 * (i % 3)) for i in range(burst)]
            for f in futs:
                f.result(10)
            assert pool.threads == 5 and len(_ours()) == 5
    finally:
        pool.shutdown(wait=True)
    assert _ours() == set()


def test_results_and_exceptions_match_threadpoolexecutor():
    def f(x):
        if x % 4 == 3:
            raise ValueError(f"bad {x}")
        return x * x

    def outcomes(pool):
        futs = [pool.submit(f, x) for x in range(20)]
        out = []
        for fut in futs:
            try:
                out.append(("ok", fut.result(10)))
            except ValueError as exc:
                out.append(("error", str(exc)))
        return out

    ours = FixedPool(3, "test-pool")
    try:
        with ThreadPoolExecutor(3) as ref:
            assert outcomes(ours) == outcomes(ref)
    finally:
        ours.shutdown()


def test_shutdown_cancels_queued_calls_and_refuses_new_ones():
    pool = FixedPool(1, "test-pool")
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
    queued = [pool.submit(lambda: 1) for _ in range(4)]
    time.sleep(0.05)
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: 1)
    gate.set()
    assert running.result(10) is True  # the call already running finishes
    for q in queued:
        with pytest.raises(CancelledError):
            q.result(1)
    pool.shutdown(wait=True, cancel_futures=True)  # a second shutdown is harmless, and joins
    assert _ours() == set()


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="size=0"):
        FixedPool(0, "test-pool")


def test_each_thread_runs_the_initializer_once_when_it_starts():
    seen: list[str] = []
    lock = threading.Lock()

    def init():
        with lock:
            seen.append(threading.current_thread().name)
        if threading.current_thread().name.endswith("_1"):
            raise OSError("one thread's initializer fails")  # logged; the thread still serves

    pool = FixedPool(3, "test-pool", initializer=init)
    try:
        assert [pool.submit(lambda x: x + 1, i).result(5) for i in range(9)] == list(range(1, 10))
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(seen) == ["test-pool_0", "test-pool_1", "test-pool_2"]
        assert pool.threads == 3
    finally:
        pool.shutdown()
