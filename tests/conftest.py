"""Shared test set-up.

TRITON_INTERPRET=1 must be set before any `@triton.jit` is applied, so it is set
here, before any project module is imported: kernels then run on CPU tensors
in Triton's interpreter when a test asks for `backend="triton"`. The `auto`
rule still picks the torch reference for CPU tensors.
"""

from __future__ import annotations

import os
import tempfile

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

    procs = []

    def start(transport: str = "http", **env_extra: str):
        port = free_port()
        proc = subprocess.Popen([PY, str(ROOT / "tests" / "tooling.py"), transport, str(port)],
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
def engine(tmp_path_factory):
    """A CPU engine with its own cache folder, one per test module (closed at the module's end)."""
    from engine import Engine, EngineConfig

    eng = Engine(EngineConfig(device="cpu", cache_dir=tmp_path_factory.mktemp("cache")))
    yield eng
    eng.close()
