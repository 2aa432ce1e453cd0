"""Engine core: device policy, scheduler (queue bound, priorities, cancellation,
shutdown) and the model registry (lazy load, budget, LRU eviction, OOM recovery)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.device import select_device, select_dtype
from engine.errors import Busy, Cancelled, InsufficientMemory, ModelUnavailable
from engine.registry import ModelRegistry, object_nbytes
from engine.scheduler import CancelToken, Scheduler


def test_device_policy():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    assert select_dtype("auto", torch.device("cpu")) == torch.float32
    assert select_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="device='tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            select_device("cuda")


def test_scheduler_runs_in_order_with_priorities():
    s = Scheduler("t", max_queue=8)
    gate = threading.Event()
    order = []
    s.submit(lambda t: gate.wait(5), label="blocker")
    time.sleep(0.05)
    futs = [s.submit(lambda t, i=i: order.append(i), priority=1)[0] for i in range(3)]
    futs.append(s.submit(lambda t: order.append("fast"), priority=0)[0])
    gate.set()
    for f in futs:
        f.result(5)
    assert order == ["fast", 0, 1, 2]
    s.shutdown()


def test_scheduler_bounded_queue_is_busy_at_once():
    s = Scheduler("t", max_queue=2)
    gate = threading.Event()
    s.submit(lambda t: gate.wait(5))
    time.sleep(0.05)
    s.submit(lambda t: None)
    s.submit(lambda t: None)
    t0 = time.perf_counter()
    with pytest.raises(Busy, match="queue is full"):
        s.submit(lambda t: None)
    assert time.perf_counter() - t0 < 0.5
    gate.set()
    s.shutdown()


def test_cancel_before_start_and_mid_run():
    s = Scheduler("t", max_queue=4)
    gate = threading.Event()
    s.submit(lambda t: gate.wait(5))
    time.sleep(0.02)
    tok = CancelToken()
    fut, _ = s.submit(lambda t: "ran", token=tok)
    tok.cancel()
    gate.set()
    with pytest.raises(Cancelled):
        fut.result(5)

    steps = []

    def work(t: CancelToken):
        for i in range(1000):
            t.check()
            steps.append(i)
            time.sleep(0.005)

    fut, tok = s.submit(work)
    time.sleep(0.05)
    tok.cancel("stop")
    with pytest.raises(Cancelled, match="stop"):
        fut.result(5)
    n = len(steps)
    time.sleep(0.05)
    assert len(steps) == n and n < 1000
    assert s.run_sync(lambda t: 42) == 42
    s.shutdown()


def test_progress_listeners():
    tok = CancelToken()
    seen = []
    tok.add_listener(lambda p, t, m: seen.append((p, t, m)))
    tok.add_listener(lambda p, t, m: 1 / 0)  # a broken listener must not break the work
    tok.report(1, 4, "a")
    tok.report(2, 4, "b")
    assert seen == [(1.0, 4, "a"), (2.0, 4, "b")] and tok.progress == 2.0


def test_shutdown_cancels_queued_work():
    s = Scheduler("t", max_queue=4)
    gate = threading.Event()

    def blocker(t):
        while not t.cancelled:
            gate.wait(0.01)

    s.submit(blocker)
    time.sleep(0.02)
    queued, _ = s.submit(lambda t: "never")
    s.shutdown(timeout=5)
    with pytest.raises(Cancelled):
        queued.result(1)
    with pytest.raises(Busy):
        s.submit(lambda t: None)


def _module(n_floats: int) -> torch.nn.Module:
    m = torch.nn.Linear(1, 1, bias=False)
    m.weight = torch.nn.Parameter(torch.zeros(n_floats, 1))
    return m


def test_registry_lazy_load_lru_eviction_under_budget():
    reg = ModelRegistry(budget_bytes=1000)
    loads = []
    for name in "abc":
        reg.register(name, lambda name=name: (loads.append(name), _module(100))[1], family="x")  # 400 B each
    assert loads == []
    reg.get("a")
    reg.get("b")
    assert reg.used_bytes == 800
    reg.get("a")  # a becomes most recent
    reg.get("c")  # over budget: evicts b (least recently used)
    assert [e.key for e in reg.loaded()] == ["a", "c"]
    assert reg.used_bytes == 800 and loads == ["a", "b", "c"]
    with pytest.raises(ModelUnavailable):
        reg.get("zzz")


def test_registry_model_over_budget_is_refused():
    reg = ModelRegistry(budget_bytes=100)
    reg.register("big", lambda: _module(1000), family="x")
    with pytest.raises(InsufficientMemory, match="over the memory budget"):
        reg.get("big")
    assert reg.used_bytes == 0


def test_registry_oom_during_load_recovers():
    reg = ModelRegistry(budget_bytes=10_000)
    reg.register("small", lambda: _module(10), family="x")
    reg.get("small")
    attempts = []

    def flaky():
        attempts.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    reg.register("huge", flaky, family="x")
    with pytest.raises(InsufficientMemory, match="insufficient memory"):
        reg.get("huge")
    assert len(attempts) == 2  # retried once after evicting everything else
    assert reg.used_bytes == 0
    assert reg.get("small") is not None  # keeps serving


def test_object_nbytes_counts_shared_storage_once():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    m[1].weight = m[0].weight
    assert object_nbytes(m) == 4 * 4 * 4
