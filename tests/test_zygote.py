"""tests/zygote.py: the suite's forked subprocesses behave as `subprocess.Popen`'s.

The oracle is Python itself: the same command run by a plain `subprocess.run` (a fresh interpreter)
gives the same argv, working folder, environment, `sys.path[0]`, output and exit code. The tests use
an environment of their own (one thread per pool, so the zygote may fork: see its module doc), which
gives them their own zygote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT
from tests import zygote
from tests.zygote import Popen, run

PROBE = ("import json, os, sys; print(json.dumps({'argv': sys.argv, 'cwd': os.getcwd(), 'x': os.environ.get('ATELIER_X'),"
         " 'path0': sys.path[0], 'ppid': os.getppid(), 'main': __name__, 'torch': 'torch' in sys.modules}));"
         " sys.stderr.write('to stderr\\n'); sys.exit(int(sys.argv[-1]))")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = "1"
    env.update(extra)
    return env


def _forked(proc: Popen) -> bool:
    assert proc._zconn is not None or not zygote.NOT_FORKED, zygote.NOT_FORKED[-1]
    return proc._zconn is not None


def test_code_script_and_module_forms_match_a_fresh_interpreter(tmp_path):
    env = _env(ATELIER_X="first")
    p = Popen([sys.executable, "-c", PROBE, "a b", "3"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert _forked(p), "the zygote did not serve an eligible command"
    fresh = subprocess.run([sys.executable, "-c", PROBE, "a b", "3"], env=env, cwd=tmp_path, capture_output=True,
                           timeout=120)
    got, want = json.loads(out), json.loads(fresh.stdout)
    assert got["ppid"] != os.getpid() and want["ppid"] == os.getpid()  # forked by the zygote, not by us
    assert got["torch"] and not want["torch"]  # the zygote's imports are there already
    for key in ("argv", "cwd", "x", "path0", "main"):
        assert got[key] == want[key], key
    assert (p.returncode, err) == (fresh.returncode, fresh.stderr) == (3, b"to stderr\n")

    # an ATELIER_* setting is read at run time: the same zygote serves a different value
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    r = run([sys.executable, str(script), "x", "0"], env=_env(ATELIER_X="second"), cwd=ROOT,
            capture_output=True, timeout=120)
    fresh = subprocess.run([sys.executable, str(script), "x", "0"], env=_env(ATELIER_X="second"), cwd=ROOT,
                           capture_output=True, timeout=120)
    got, want = json.loads(r.stdout), json.loads(fresh.stdout)
    assert got["ppid"] != os.getpid()
    for key in ("argv", "cwd", "x", "path0", "main"):
        assert got[key] == want[key], key
    assert r.returncode == 0

    # -m with stdin: json.tool reads what we write
    p = Popen([sys.executable, "-m", "json.tool"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.communicate('{"a": [1, 2]}', timeout=120) == (json.dumps({"a": [1, 2]}, indent=4) + "\n", None)
    assert _forked(p) and p.returncode == 0

    # a console script of this venv (`atelier`): the same output and exit code as the real one
    atelier = str(os.path.join(os.path.dirname(sys.executable), "atelier"))
    p = Popen([atelier, "--help"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    fresh = subprocess.run([atelier, "--help"], env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert _forked(p) and b"serve" in out
    assert (out, err, p.returncode) == (fresh.stdout, fresh.stderr, fresh.returncode)

    # an uncaught exception: traceback on stderr, exit 1
    r = run([sys.executable, "-c", "raise ValueError('boom')"], env=env, capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stderr.rstrip().endswith(b"ValueError: boom")


EXIT_PROBE = """
import atexit, sys, threading, time
f = open("unclosed.txt", "w")
f.write("kept")  # never closed, never flushed: the exit must flush it
atexit.register(lambda: print("atexit ran", flush=True))
t = threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True)))
t.start()  # not a daemon: the exit waits for it, before atexit
print("main done")  # buffered (a pipe): flushed at exit
how = sys.argv[1]
if how == "message":
    sys.exit("bye in words")
if how == "big":
    sys.exit(300)
"""


@pytest.mark.parametrize("how", ["return", "message", "big"])
def test_exit_paths_match_a_fresh_interpreter(tmp_path, how):
    # a forked child ends without the interpreter's final teardown (tests/zygote._exit_now): what a script
    # can see of its exit (threads joined, atexit, open files and streams flushed, the status) is unchanged
    env = _env()
    env.pop("PYTHONUNBUFFERED")
    results = []
    for runner in (run, subprocess.run):
        folder = tmp_path / runner.__module__.replace(".", "_")
        folder.mkdir()
        r = runner([sys.executable, "-c", EXIT_PROBE, how], env=env, cwd=folder, capture_output=True, timeout=120)
        results.append((r.returncode, r.stdout, r.stderr, (folder / "unclosed.txt").read_text()))
    assert results[0] == results[1]
    code, out, err, kept = results[0]
    assert out == b"main done\nthread done\natexit ran\n" and kept == "kept"
    assert (code, err) == {"return": (0, b""), "message": (1, b"bye in words\n"), "big": (44, b"")}[how]


@pytest.fixture
def default_signals():
    # a child ignores what its caller ignores (as after exec); this test timed out in three of six full runs, and
    # the run that printed the child's masks showed the worker ignoring SIGINT and SIGQUIT (SigIgn 0x...1006; not
    # traced to the test that left it so): the signals are asked of a caller with Python's own dispositions
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    yield
    for s, h in saved.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def test_signals_wait_poll_and_timeouts(tmp_path, default_signals):
    env = _env()
    code = "import signal, sys, time; print('up', flush=True); time.sleep(60)"
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        p = Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert _forked(p)
        assert p.stdout.readline() == b"up\n"
        assert p.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(0.2)
        p.send_signal(sig)
        try:
            rc = p.wait(30)
        except subprocess.TimeoutExpired:  # say which side stalled (see default_signals)
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    state = f.read().split(")")[-1].split()[0]  # Z: the child ended, the zygote did not reap it
                with open(f"/proc/{p.pid}/status") as f:  # its signal masks: ignored, caught, blocked
                    state += " " + " ".join(ln.strip() for ln in f if ln.startswith(("SigBlk", "SigIgn", "SigCgt")))
                with open(f"/proc/{p.pid}/wchan") as f:
                    state += " wchan " + f.read()
                p.kill()
            except OSError:
                state = "gone"  # reaped, but its status never reached us
            raise AssertionError(f"no exit status 30 s after signal {sig!r}; the child's state: {state}") from None
        # SIGINT: Python's KeyboardInterrupt, which ends the interpreter by SIGINT (as a fresh one does)
        assert rc == -sig
        assert p.stdout.read() == b""  # the pipe closed with the child
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", "import time; time.sleep(30)"], env=env, timeout=0.5)
    with pytest.raises(subprocess.CalledProcessError):
        run([sys.executable, "-c", "raise SystemExit(4)"], env=env, check=True, timeout=60)
    # output written without a flush arrives line by line under PYTHONUNBUFFERED, as in a fresh interpreter
    p = Popen([sys.executable, "-c", "import time; print('early'); time.sleep(30)"], env=env, stdout=subprocess.PIPE)
    t0 = time.monotonic()
    assert p.stdout.readline() == b"early\n" and time.monotonic() - t0 < 20
    p.kill()
    assert p.wait(30) == -signal.SIGKILL


def test_import_time_settings_and_other_programs_get_a_plain_exec(tmp_path):
    # a thread count is read while importing: an environment that differs in it is not forked from a
    # zygote whose imports read another value (it gets its own zygote, or a plain exec)
    p = Popen([sys.executable, "-c", "import os; print(os.getppid())"], env=_env(OMP_NUM_THREADS="3"),
              stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    if p._zconn is None:
        assert int(out) == os.getpid()
    # not Python: a plain exec
    p = Popen(["sh", "-c", "echo $PPID"], env=_env(), stdout=subprocess.PIPE)
    assert int(p.communicate(timeout=30)[0]) == os.getpid() and not _forked(p)
    # Python options other than -c/-m: a plain exec
    p = Popen([sys.executable, "-I", "-c", "import os; print(os.getppid())"], env=_env(), stdout=subprocess.PIPE)
    assert int(p.communicate(timeout=60)[0]) == os.getpid() and not _forked(p)
    # preexec_fn: a plain exec
    p = Popen([sys.executable, "-c", "import os; print(os.getppid())"], env=_env(), stdout=subprocess.PIPE,
              preexec_fn=lambda: None)
    assert int(p.communicate(timeout=60)[0]) == os.getpid() and not _forked(p)


def test_a_popen_whose_socket_closed_under_it_polls_as_ended():
    # a failed test's Popen can sit in a garbage cycle whose finalizers close its socket before Popen.__del__
    # hands it to subprocess's list of children to reap; the next Popen anywhere polls that list: it must not
    # raise (it did: EBADF failed every later test of the worker)
    p = Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], env=_env(),
              stdout=subprocess.PIPE)
    try:
        assert _forked(p)
        assert p.stdout.readline() == b"up\n"
        os.close(p._zconn.fileno())  # what the finalizer does, behind the socket object's back
        assert p.poll() == -signal.SIGKILL  # the status can no longer arrive: reported as the zygote's death
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.stdout.close()


def test_signal_dispositions_follow_the_caller_as_after_exec():
    # an ignored SIGINT / SIGTERM survives exec; anything else is reset (SIGINT to KeyboardInterrupt): a forked
    # child must match what a real fresh interpreter started by the caller at that moment reports, whatever the
    # zygote itself was started with
    code = ("import signal; print(*[signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)],"
            " signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    seen = []
    for ignore in (True, False):
        old = signal.signal(signal.SIGINT, signal.SIG_IGN if ignore else signal.default_int_handler)
        try:
            for cls in (Popen, subprocess.Popen):  # forked from the zygote; a plain exec (the oracle)
                p = cls([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE)
                out, _ = p.communicate(timeout=120)
                seen.append((ignore, cls is Popen and _forked(p), out.decode().split()))
        finally:
            signal.signal(signal.SIGINT, old)
    assert any(forked for _, forked, _ in seen)  # the zygote served
    for ignore in (True, False):
        outs = [o for i, _, o in seen if i == ignore]
        assert outs[0] == outs[1] == [str(ignore), "False", str(not ignore)], seen
