"""Shared test set-up.

TRITON_INTERPRET=1 must be set before any `@triton.jit` is applied, so it is set
here, before any project module is imported: kernels then run on CPU tensors
in Triton's interpreter when a test asks for `backend="triton"`. The `auto`
rule still picks the torch reference for CPU tensors.
"""

from __future__ import annotations

import os
import tempfile

# pytest-xdist runs N workers on this machine's cores (make test: -n 2 on 2 cores). Each worker's torch,
# MKL and Numba would start a thread per core; N workers then oversubscribe the cores, and OpenMP's and
# Numba's spinning pools make memory-bound steps 2-3x slower than one thread per worker (and one thread
# of torch beside two of Numba's, 15x: measured on the int8-cache quality test's decode step). So each
# worker (and every server it starts, which inherits the environment) gets cores / N threads, unless the
# environment already says otherwise.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
# one engine cache (converted models, embedding caches) for the whole session
os.environ.setdefault("ATELIER_TEST_CACHE", os.path.join(tempfile.gettempdir(), "atelier-test-cache"))

# Import hypothesis (and the module its pytest plugin imports at the end of the
# session) up front: CPython 3.11.7's ast.parse can fail with "AST constructor
# recursion depth mismatch" late in a session that ran deep recursions in other
# threads, and pytest's assertion rewriting parses modules on first import.
import hypothesis  # noqa: E402,F401
import hypothesis.internal.observability  # noqa: E402,F401


# -- fixtures shared by several test files ------------------------------------------------------------
import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture()
def http_server(tmp_path):
    """start(transport="http", **env) -> (port, proc): a server subprocess (tests/tooling.py) on a free port."""
    from tests.helpers import PY, ROOT, free_port, server_env, wait_port
    from tests.zygote import Popen

    procs = []

    def start(transport: str = "http", **env_extra: str):
        port = free_port()
        proc = Popen([PY, str(ROOT / "tests" / "tooling.py"), transport, str(port)],
                     env=server_env(tmp_path, **env_extra), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, cwd=tmp_path)
        procs.append(proc)
        wait_port(port, proc)
        return port, proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()



@pytest.fixture(scope="module")
def model_libraries():
    """The offline environment and the torchvision shim, as the engine sets them before a model load. The LLM
    test files use it (`pytestmark`) rather than calling `_compat.prepare` at import, so collecting them
    costs no worker the torchvision import."""
    from engine import _compat

    _compat.prepare(os.environ["ATELIER_TEST_CACHE"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A CPU engine with its own cache folder, one per test module (closed at the module's end)."""
    from engine import Engine, EngineConfig

    eng = Engine(EngineConfig(device="cpu", cache_dir=tmp_path_factory.mktemp("cache")))
    yield eng
    eng.close()


# -- order: the longest files first --------------------------------------------------------------------
# `make test` runs pytest-xdist with --dist loadfile --no-loadscope-reorder: each file goes whole to the
# next free worker, in collection order (without --no-loadscope-reorder xdist re-sorts the files by their
# number of tests, and a long file of one test, like test_rel_crash.py, then ran near the end). A long
# file collected last runs alone at the end while the other core idles, so the longest files (seconds
# summed over their tests, measured with --durations=0 on this 2-core machine) are collected first; the
# rest keep their order. Only the order changes: every test still runs.
_LONGEST_FIRST = [
    # test_llm_model converts the embedded GGUF to fp32 on a fresh cache (45 s) and test_llm_cache needs the
    # result: three long files that do not convert run between them, so the two never convert at once
    "test_llm_model.py", "test_rel_load.py", "test_rel_crash_catalog.py", "test_llm_cache.py", "test_cli.py",
    "test_rel_fuzz.py", "test_rel_crash.py", "test_transports.py", "test_rel_client_isolation.py",
    "test_process_state.py", "test_replicas.py", "test_rel_http_guard.py", "test_inspector_cli.py",
    "test_text_tool.py", "test_rel_memory_masks.py", "test_adetailer.py", "test_rel_protocol.py",
    "test_first_contact_server.py", "test_result_fit.py", "test_rel_oom.py", "test_llm_batcher.py",
    "test_zygote.py", "test_rel_shutdown.py", "test_detect.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their inner order


# -- npm packages fetched while the first tests run -----------------------------------------------------
# The Inspector and conformance tests run Node 22 and their npm packages through npx; on a fresh machine
# npx first downloads them (~45 s, network-bound, a worker idle meanwhile). The controller starts the same
# `npx -y -p ...` commands (so the same npx cache entries) in the background at the session's start; a
# test that gets there first fetches for itself, as before. Only the download moves.
_NPX_PREFETCH: list = []


def pytest_sessionstart(session):
    import shutil

    if hasattr(session.config, "workerinput") or shutil.which("npx") is None:
        return
    from tests.inspector import CONFORMANCE, INSPECTOR

    cmds = [f"npx -y -p node@22 -p {pkg} -- true" for pkg in (INSPECTOR, CONFORMANCE)]
    _NPX_PREFETCH.append(subprocess.Popen(["sh", "-c", " ; ".join(cmds)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))


def pytest_sessionfinish(session, exitstatus):
    import sys

    for proc in _NPX_PREFETCH:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    zygote = sys.modules.get("tests.zygote")
    if zygote is not None:
        zygote.shutdown()  # this worker's pre-imported server parents (tests/zygote.py)
