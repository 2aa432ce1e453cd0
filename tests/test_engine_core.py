"""Engine core: device policy, scheduler (queue bound, priorities, cancellation,
shutdown) and the model registry (lazy load, budget, LRU eviction, OOM recovery)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.device import select_device, select_dtype
from engine.errors import Busy, Cancelled, InsufficientMemory, ModelTooLarge, ModelUnavailable
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


def test_scheduler_is_idle_when_the_caller_hears_the_outcome():
    # a job's status turns "done" / "cancelled" when its future resolves; whoever sees that must not then find
    # the worker still busy (seen on a loaded machine: job_cancel's server test read busy=True after "cancelled")
    s = Scheduler("t", max_queue=4)
    busy_at_outcome = []
    try:
        ok, _ = s.submit(lambda t: "ok")
        ok.add_done_callback(lambda f: busy_at_outcome.append(s.busy))
        assert ok.result(5) == "ok"
        bad, _ = s.submit(lambda t: 1 / 0)
        bad.add_done_callback(lambda f: busy_at_outcome.append(s.busy))
        with pytest.raises(ZeroDivisionError):
            bad.result(5)
        assert busy_at_outcome == [False, False]
    finally:
        s.shutdown(timeout=5)


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
    with pytest.raises(ModelTooLarge, match=r"'big' needs .* GB once loaded, over the memory budget .*unloaded"):
        reg.get("big")
    assert reg.used_bytes == 0


def test_registry_estimate_refuses_before_loading_and_makes_room_first():
    """A model whose estimate (known before loading: a GGUF's header) is over the budget is refused with
    nothing allocated; one that fits makes the least recently used models leave before its load, not after."""
    reg = ModelRegistry(budget_bytes=1000)
    calls = []
    reg.register("huge", lambda: calls.append("huge") or _module(1000), family="x", estimate=lambda: 4000)
    with pytest.raises(ModelTooLarge, match=r"'huge' would need about 0\.000 GB once loaded \(estimated before "
                                                 r"loading\), over the memory budget .* nothing was loaded"):
        reg.get("huge")
    assert calls == [] and reg.used_bytes == 0
    reg.register("a", lambda: _module(100), family="x")  # 400 B
    reg.register("b", lambda: _module(100), family="x")
    reg.get("a")
    reg.get("b")
    seen = []

    def load_c():
        seen.append([e.key for e in reg.loaded()])  # what is resident while c loads
        return _module(100)

    reg.register("c", load_c, family="x", estimate=lambda: 400)
    reg.get("c")
    assert seen == [["b"]]  # a (least recently used) left before c's load
    assert [e.key for e in reg.loaded()] == ["b", "c"]
    # an estimate that fails or knows nothing leaves the load as it was (checked after it)
    reg.register("d", lambda: _module(10), family="x", estimate=lambda: 1 / 0)
    reg.register("e", lambda: _module(10), family="x", estimate=lambda: None)
    assert reg.get("d") is not None and reg.get("e") is not None


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


# -- backends: decided once, reported per operation, no environment written (issue 16) ------------------
def test_backends_on_cpu_resolved_once_and_frozen():
    import dataclasses

    from engine import sketch
    from engine.backends import OPERATIONS, resolve

    b = resolve(device=torch.device("cpu"), dtype=torch.float32)
    assert (b.topk.impl, b.deltae.impl, b.kv_quant.impl) == ("torch", "torch", "torch")
    assert b.cpu_kernels.impl == b.qmatmul.impl == "numba"  # numba is a dependency
    assert b.catalog_scan_float32.impl == ("sketch" if sketch.supported() else "numpy")
    assert b.catalog_scan_float16.impl == "half"
    assert b.llm_decode_step.impl == "numpy"
    rep = b.report()
    assert list(rep) == list(OPERATIONS)
    assert all(set(v) == {"impl", "why"} and v["why"] for v in rep.values())
    assert b.catalog_scan(torch.float16) is b.catalog_scan_float16
    with pytest.raises(ValueError, match="dtype=torch.bfloat16"):
        b.catalog_scan(torch.bfloat16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.topk = b.deltae  # type: ignore[misc]


def test_backends_settings_and_their_errors(monkeypatch):
    from engine.backends import resolve
    from atelier_kernels._backend import triton_available

    cpu = torch.device("cpu")
    forced = resolve(device=cpu, dtype=torch.float32, kernel_backend="triton")  # conftest: TRITON_INTERPRET=1
    assert forced.topk.impl == "triton" and "interpreter" in forced.topk.why
    assert forced.catalog_scan_float32.impl == forced.catalog_scan_float16.impl == "torch"
    t = resolve(device=cpu, dtype=torch.float32, kernel_backend="torch", llm_decode="torch")
    assert t.topk.impl == "torch" and "engine.kernel_backend=torch" in t.topk.why
    assert t.llm_decode_step.impl == "torch"
    assert resolve(device=cpu, dtype=torch.float32, llm_compile=True).llm_decode_step.impl == "torch.compile"
    gpu = resolve(device=torch.device("cuda"), dtype=torch.float16, llm_decode="numpy")  # a decision, no GPU used
    assert gpu.topk.impl == ("triton" if triton_available() else "torch")
    assert gpu.catalog_scan_float32.impl == gpu.catalog_scan_float16.impl == "torch"
    assert gpu.llm_decode_step.impl == "torch" and "needs the CPU" in gpu.llm_decode_step.why
    with pytest.raises(ValueError, match="engine.kernel_backend='cuda'"):
        resolve(device=cpu, dtype=torch.float32, kernel_backend="cuda")
    with pytest.raises(ValueError, match="models.llm_decode='fast'"):
        resolve(device=cpu, dtype=torch.float32, llm_decode="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="engine.kernel_backend='triton': the Triton kernels cannot run on cpu"):
        resolve(device=cpu, dtype=torch.float32, kernel_backend="triton")


def test_cpu_kernels_setting_is_read_once(monkeypatch):
    from atelier_kernels import _numba

    undecorated = _numba.wanted.__wrapped__
    monkeypatch.setenv("ATELIER_CPU_KERNELS", "numpy")
    assert undecorated()[0] == "numpy"
    monkeypatch.setenv("ATELIER_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="ATELIER_CPU_KERNELS='fast'"):
        undecorated()
    assert _numba.wanted()[0] == "numba"  # the cached decision of this process does not move


def test_engine_decides_backends_without_writing_the_environment(tmp_path):
    import os

    from engine import Engine, EngineConfig

    def ours() -> dict[str, str]:  # (engine._compat sets Hugging Face's offline switches: not a backend choice)
        return {k: v for k, v in os.environ.items() if k.startswith(("ATELIER_", "TRITON_", "NUMBA_"))}

    before = ours()
    eng = Engine(EngineConfig(device="cpu", cache_dir=tmp_path, kernel_backend="torch", llm_decode="torch"))
    try:
        assert ours() == before
        assert eng.backends.topk.impl == eng.kernel_backend == "torch"
        assert eng.backends.llm_decode_step.impl == "torch"
    finally:
        eng.close()


def test_engine_status_reports_the_backend_per_operation(tmp_path):
    from engine.backends import OPERATIONS
    from tests.fakectx import make_context
    from tools.status import TOOLS, EngineStatusInput

    ctx = make_context(tmp_path)
    try:
        out = TOOLS[0].run(EngineStatusInput(), ctx)
        assert list(out.structured.backends) == list(OPERATIONS)
        assert out.structured.backends == ctx.engine.backends.report()
        assert f"decode step {ctx.engine.backends.llm_decode_step.impl}" in out.text
    finally:
        ctx.engine.close()


def test_server_passes_llm_decode_to_the_engine(tmp_path):
    from mcp_server.app import make_state
    from tests.test_server_core import make_settings

    state = make_state(make_settings(tmp_path, models={"llm_decode": "torch"}))
    try:
        assert state.engine.backends.llm_decode_step.impl == "torch"
    finally:
        state.close()


@pytest.mark.parametrize("path", ["sketch", "numpy", "half", "torch"])
def test_catalogue_runs_the_scan_path_it_was_given(path):
    # one path per catalogue, from the engine's Backends or the same rule; every path gives NumPy's answer
    import numpy as np

    from engine.backends import resolve
    from engine.catalog import Catalog, Query
    from engine.catalog.scan import choose_path

    rng = np.random.default_rng(7)
    n, d = 300, 24
    mat = rng.standard_normal((n, d)).astype(np.float32)
    mat[5] = mat[17]  # an exact tie: the lower row first
    dtype = torch.float16 if path == "half" else torch.float32
    backends = resolve(device=torch.device("cpu"), dtype=torch.float32,
                       kernel_backend="triton" if path == "torch" else "auto")
    cat = Catalog(d, dtype=dtype, capacity=n, sketch=False if path == "numpy" else None, backends=backends)
    try:
        assert cat.scan_path == path
        if path == "sketch":
            assert cat.scan_path == choose_path("cpu", torch.float32)[0] == backends.catalog_scan_float32.impl
        cat.upsert([{"id": str(i)} for i in range(n)], torch.from_numpy(mat))
        stored = cat._matrix[:n].float().numpy().astype(np.float64)  # normalised (and fp16-rounded) rows
        for b in range(3):
            q = rng.standard_normal(d).astype(np.float32)
            qn = q / np.linalg.norm(q)
            exact = stored @ qn.astype(np.float64)
            want = np.lexsort((np.arange(n), -exact))[:10]
            got = [h.row for h in cat.search(Query(torch.from_numpy(q), 10))]
            np.testing.assert_allclose(exact[got], exact[want], rtol=0, atol=1e-5)
            assert got[:3] == list(want[:3]) or np.allclose(exact[got[:3]], exact[want[:3]], atol=1e-5)
    finally:
        cat.close()
