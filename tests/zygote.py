"""A pre-imported Python that forks the suite's server and helper subprocesses (test-only).

About a hundred tests start a real server (or a helper script) as a subprocess, and each start paid
3-5 s of CPU importing torch, the MCP SDK and the engine before the test could begin: on 2 cores that
was a quarter of the suite. `Popen` here is `subprocess.Popen` whose child is forked from a *zygote*:
a process per pytest worker that has imported those modules once and then only forks. The child gets
the test's argv, environment, working folder and stdin/stdout/stderr (passed over a Unix socket), runs
the script as `__main__` would run, and exits as the interpreter does (threads joined, `atexit` run,
streams flushed; see `_exit_now` for the part it skips). It is a real
process: its pid takes signals (`kill -9` included), its pipes close when it dies, and `poll`, `wait`,
`communicate` and `returncode` report its exit as `subprocess` does (the zygote reaps it and sends the
status back).

The zygote serves only when its imports wrote nothing to stdout or stderr and started no thread, so a
forked child's streams and threads are a fresh process's. What stays a plain fork/exec (so every cold
start path is still tested): anything but
`[sys.executable, script | -c code | -m module, ...]` or a console script of this interpreter; any use
of preexec_fn, pass_fds, user/group, umask or a shell; and an environment that differs from the
zygote's in anything but the server's own `ATELIER_*` settings (read at run time, by `load_settings`),
pytest's bookkeeping and the switches of the model libraries the zygote does not import (`HF_*`,
`YOLO_*`, ...): variables read while importing (thread counts, `TRITON_INTERPRET`, `HOME`, `MALLOC_*`,
`PYTHON*`) then match. `ATELIER_TEST_ZYGOTE=0` turns it off.

The zygote imports only (no thread is started, no kernel is called: it checks that it still has one
thread before it serves), so the fork copies no lock held by another thread and no OpenMP or Numba
pool.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_PRELOAD = ("torch", "numpy", "PIL.Image", "pydantic", "numba", "httpx", "uvicorn", "starlette",
            "mcp_server.app", "mcp_server.transports", "mcp_server.cli", "mcp_server.config",
            "mcp_server.logs", "engine.catalog")
# environment prefixes nothing the zygote imports reads while importing: the server's settings, pytest's
# bookkeeping, the test tools' switches (tests/reltools.py) and those of the model libraries, which the
# zygote does not import (a child imports them on its first model load, after the engine set them; the
# engine sets them in the test process too, so they differ over a session)
_MODEL_LIBS = ("transformers", "diffusers", "ultralytics", "huggingface_hub", "tokenizers")
_RUNTIME_ONLY = ("ATELIER_", "PYTEST_", "REL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "YOLO_",
                 "TOKENIZERS_", "DISABLE_TELEMETRY")
_MAX_MSG = 1 << 20


def _import_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(_RUNTIME_ONLY)))


def _same_python(exe: str) -> bool:
    """`exe` is this interpreter: the same file name in the same (resolved) bin folder, so the same venv."""
    if exe == sys.executable:
        return True
    return (os.path.basename(exe) == os.path.basename(sys.executable)
            and os.path.realpath(os.path.dirname(exe)) == os.path.realpath(os.path.dirname(sys.executable)))


def _plan(args: list[str]) -> dict[str, Any] | None:
    """How a child runs `args` (the forms `python` itself would run), or None for a plain fork/exec."""
    if not args:
        return None
    exe = str(args[0])
    if _same_python(exe) and len(args) >= 2:
        if args[1] == "-c" and len(args) >= 3:
            return {"kind": "code", "code": str(args[2]), "argv": ["-c", *map(str, args[3:])]}
        if args[1] == "-m" and len(args) >= 3:
            return {"kind": "module", "module": str(args[2]), "argv": ["-m", *map(str, args[3:])]}
        if not str(args[1]).startswith("-") and Path(args[1]).is_file():
            return {"kind": "script", "path": str(args[1]), "argv": [str(a) for a in args[1:]]}
        return None
    # a console script of this interpreter (`atelier`): Python source behind a shebang naming it
    try:
        with open(exe, "rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return None
    if first.startswith(b"#!") and _same_python(os.fsdecode(first[2:].strip())):
        return {"kind": "script", "path": exe, "argv": [str(a) for a in args]}
    return None


# ------------------------------------------------------------------------------------------ client side
class _Zygote:
    """One zygote process (started by this pytest worker) and the socket it listens on."""

    def __init__(self, env: dict[str, str]) -> None:
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="atelier-zygote-")
        self.path = os.path.join(self.folder, "sock")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self.path], env=env,
                                     cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace").strip()  # "READY", else why it will not serve
        self.ok = line == "READY"
        self.why = "" if self.ok else (line or f"exited {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the zygote stops (and kills any child still running)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


_ZYGOTES: list[tuple[tuple, _Zygote]] = []
_ZLOCK = threading.Lock()
_MAX_ZYGOTES = 6  # per worker; an environment beyond them gets plain execs
NOT_FORKED: list[str] = []  # why an eligible command got a plain exec (tests/test_zygote.py shows it)
FORKED: list[str] = []  # the commands forked (ATELIER_TEST_ZYGOTE_LOG=file appends both lists at the end)


def _zygote_for(env: dict[str, str]) -> _Zygote | None:
    if os.environ.get("ATELIER_TEST_ZYGOTE", "1") == "0" or not hasattr(socket, "send_fds"):
        return None
    key = _import_key(env)
    with _ZLOCK:
        z = next((z for k, z in _ZYGOTES if k == key), None)
        if z is None:
            if len(_ZYGOTES) >= _MAX_ZYGOTES:
                NOT_FORKED.append(f"{_MAX_ZYGOTES} zygotes run already (environments differ in "
                                  f"{sorted(set().union(*(dict(k).keys() ^ dict(key).keys() for k, _ in _ZYGOTES)))})")
                return None
            z = _Zygote(env)
            _ZYGOTES.append((key, z))
        if not z.ok:
            NOT_FORKED.append(f"the zygote will not serve: {z.why}")
            return None
        return z


def shutdown() -> None:
    """Stop this worker's zygotes (conftest calls it at the session's end)."""
    log = os.environ.get("ATELIER_TEST_ZYGOTE_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "zygotes": len(_ZYGOTES),
                                 "forked": FORKED, "not_forked": NOT_FORKED}) + "\n")
    with _ZLOCK:
        for _, z in _ZYGOTES:
            z.close()
        _ZYGOTES.clear()


_EXEC_KEPT = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")  # an ignored signal stays ignored across exec


def _ignored_here() -> list[int]:
    """The signals this process ignores, which a fresh interpreter exec'd from here would ignore too (every
    other disposition is reset by exec): the child takes these from its caller, not from the zygote, which
    may have been started at another moment."""
    out = []
    for name in _EXEC_KEPT:
        num = getattr(signal, name, None)
        if num is not None and signal.getsignal(num) == signal.SIG_IGN:
            out.append(int(num))
    return out


class Popen(subprocess.Popen):
    """`subprocess.Popen`, with the child forked from a zygote where the command allows (module doc)."""

    _zconn: socket.socket | None = None

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,  # noqa: ANN001
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, *rest) -> None:
        plan = None
        if not (shell or preexec_fn or pass_fds or not close_fds or gid is not None or gids is not None or uid is not None
                or umask != -1 or executable is not None or any(r not in (None, -1) for r in rest)):
            plan = _plan(list(args) if not isinstance(args, (str, bytes, os.PathLike)) else [])
        env_d = {os.fsdecode(k): os.fsdecode(v) for k, v in (env if env is not None else os.environ).items()}
        zyg = _zygote_for(env_d) if plan is not None else None
        conn = None
        if zyg is not None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                conn.connect(zyg.path)
            except OSError as e:  # the zygote is gone: plain execs from now on
                conn.close()
                conn, zyg.ok, zyg.why = None, False, f"not answering ({e})"
                NOT_FORKED.append(f"the zygote will not serve: {zyg.why}")
        if conn is None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                                          startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread,
                                          c2pwrite, errread, errwrite, restore_signals, gid, gids, uid, umask,
                                          start_new_session, *rest)
        FORKED.append(" ".join(map(str, args))[:160])
        plan.update(env=env_d, cwd=os.fsdecode(cwd) if cwd is not None else os.getcwd(),
                    new_session=bool(start_new_session), ignored=_ignored_here())
        fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
        try:
            socket.send_fds(conn, [json.dumps(plan).encode()], fds)
            reply = json.loads(conn.recv(_MAX_MSG))
        except BaseException:
            conn.close()
            raise
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        if "error" in reply:
            conn.close()
            raise OSError(f"zygote could not start {args!r}: {reply['error']}")
        self.pid = int(reply["pid"])
        self._child_created = True
        self._zconn = conn

    def _take_status(self, timeout: float | None) -> bool:
        """Read the exit status the zygote sends when the child ends; False when it has not ended yet."""
        assert self._zconn is not None
        try:
            self._zconn.settimeout(timeout)
            data = self._zconn.recv(_MAX_MSG)
        except (BlockingIOError, TimeoutError, socket.timeout):
            return False
        except OSError:  # the socket closed under us: a Popen left in a garbage cycle (a failed test's
            # traceback) has its socket finalized before Popen.__del__ puts it on subprocess's list of
            # children to reap, whose next poll (at any later Popen) then failed every test in the worker
            data = b""
        self.returncode = json.loads(data)["returncode"] if data else -signal.SIGKILL  # zygote gone: child killed
        try:
            self._zconn.close()
        except OSError:
            pass
        return True

    def _internal_poll(self, _deadstate=None, **_kw):  # noqa: ANN001, ANN202
        if self._zconn is None:
            return super()._internal_poll(_deadstate=_deadstate, **_kw)
        if self.returncode is None:
            self._take_status(0)
        return self.returncode

    def _wait(self, timeout):  # noqa: ANN001, ANN202
        if self._zconn is None:
            return super()._wait(timeout)
        if self.returncode is None and not self._take_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def run(args: list[str], *, input: bytes | str | None = None, capture_output: bool = False,  # noqa: A002
        timeout: float | None = None, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run` with this module's `Popen`."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with Popen(args, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        except BaseException:
            proc.kill()
            raise
        code = proc.poll()
    if check and code:
        raise subprocess.CalledProcessError(code, proc.args, output=out, stderr=err)
    return subprocess.CompletedProcess(proc.args, code, out, err)


# ------------------------------------------------------------------------------------------ zygote side
def _serve(path: str) -> dict[str, Any] | None:
    """The zygote's loop: fork a child per request, send back its pid and, later, its exit status. Returns
    (in the child only) what the child must run; returns None in the zygote when it must stop."""
    import importlib
    import selectors

    import tempfile

    # Whatever the imports print would reach a fresh process's stdout or stderr but not a forked child's,
    # and tests check those streams: the zygote serves only when its imports printed nothing.
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as noise:
        os.dup2(noise.fileno(), 1)
        os.dup2(noise.fileno(), 2)
        try:
            for name in _PRELOAD:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 - a module this build lacks is simply not preloaded
                    pass
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        printed = os.fstat(noise.fileno()).st_size
    if printed:
        sys.stdout.write("NOISY: the imports wrote to stdout or stderr\n")
        sys.stdout.flush()
        return None
    imported = [name for name in _MODEL_LIBS if name in sys.modules]
    if imported:  # their switches would then be read here, not in the child (see _RUNTIME_ONLY)
        sys.stdout.write(f"IMPORTED: {imported}\n")
        sys.stdout.flush()
        return None
    if len(os.listdir("/proc/self/task")) != 1 or threading.active_count() != 1:
        sys.stdout.write("THREADS: an import started a thread, so forking is not safe\n")
        sys.stdout.flush()
        return None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    children: dict[int, socket.socket] = {}
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":  # the pytest worker is gone or done
                if not os.read(sys.stdin.fileno(), 4096):
                    for pid in children:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    return None
            elif key.data == "child":
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                while children:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    conn = children.pop(pid, None)
                    if conn is not None:
                        try:
                            conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                        except OSError:
                            pass
                        conn.close()
            else:
                conn, _ = listener.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, _MAX_MSG, 3)
                    plan = json.loads(msg)
                    if len(fds) != 3:
                        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
                except (OSError, ValueError) as e:
                    try:
                        conn.send(json.dumps({"error": str(e)}).encode())
                    except OSError:
                        pass
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child: leave the zygote's loop, keep only the request
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.set_wakeup_fd(-1)
                    sel.close()
                    for other in children.values():
                        other.close()
                    listener.close()
                    conn.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    plan["fds"] = fds
                    return plan
                for fd in fds:
                    os.close(fd)
                try:
                    conn.send(json.dumps({"pid": pid}).encode())
                except OSError:  # the test is gone: the child is nobody's
                    os.kill(pid, signal.SIGKILL)
                children[pid] = conn


def _stdio(fd: int, write: bool) -> Any:
    """A standard stream on `fd` made as the interpreter makes one at start."""
    import io

    enc = sys.getfilesystemencoding() if sys.flags.utf8_mode else (sys.__stdout__.encoding or "utf-8")
    if not write:
        return io.TextIOWrapper(io.BufferedReader(io.FileIO(fd, "rb", closefd=False)), encoding=enc,
                                errors="strict")
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # (`-u` is never forked: see _plan)
    raw = io.FileIO(fd, "wb", closefd=False)
    buf = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(buf, encoding=enc, errors="backslashreplace" if fd == 2 else "strict",
                            line_buffering=os.isatty(fd), write_through=unbuffered)


def _run_child(plan: dict[str, Any]) -> None:
    """In the forked child: become the requested process, then exit as that process would."""
    import runpy
    import types

    if plan["new_session"]:
        os.setsid()
    for name in _EXEC_KEPT:  # the dispositions a fresh interpreter started by the caller would have
        num = getattr(signal, name, None)
        if num is not None:
            default = signal.default_int_handler if num == signal.SIGINT else signal.SIG_DFL
            signal.signal(num, signal.SIG_IGN if int(num) in plan.get("ignored", ()) else default)
    for target, fd in enumerate(plan["fds"]):
        os.dup2(fd, target)
    for fd in set(plan["fds"]):
        if fd > 2:
            os.close(fd)
    os.chdir(plan["cwd"])
    os.environ.clear()
    os.environ.update(plan["env"])
    sys.stdin, sys.stdout, sys.stderr = _stdio(0, False), _stdio(1, True), _stdio(2, True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = list(plan["argv"])
    if plan["kind"] == "script":
        sys.path[0] = os.path.dirname(os.path.abspath(plan["path"]))
        runpy.run_path(plan["path"], run_name="__main__")
    elif plan["kind"] == "module":
        sys.path[0] = os.getcwd()
        runpy.run_module(plan["module"], run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        main.__builtins__ = __builtins__  # type: ignore[attr-defined]
        sys.modules["__main__"] = main
        exec(compile(plan["code"], "<string>", "exec"), main.__dict__)


def _exit_now(code: object) -> None:
    """End a child that finished (returned or raised SystemExit) as the interpreter's shutdown would, minus
    its last part: wait for non-daemon threads, run `atexit` (logging's flush, `weakref.finalize`,
    temp-folder clean-ups), flush the standard streams, then `os._exit`. What is skipped is the final
    garbage collection and the module teardown of the ~10^6 objects torch, the engine and the model
    libraries leave behind: measured 1-3 s of CPU per exit, and about a hundred children exit in the suite.
    Files still open are flushed first, as their finalisers would flush them. An uncaught exception other
    than SystemExit takes the normal path (traceback, full shutdown)."""
    import atexit

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:  # sys.exit("message"): printed to stderr, status 1
        try:
            print(code, file=sys.stderr)
        except Exception:  # noqa: BLE001 - a closed stderr
            pass
        status = 1
    import gc
    import io

    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        # files left open are flushed as their finalisers would at teardown (text layers first, then buffers)
        # (exact types: an isinstance check against the io ABCs would touch every object's class, and some
        # objects warn when touched, e.g. torch.distributed.reduce_op)
        writers = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
        opened = [o for o in gc.get_objects() if type(o) in writers]
        for f in sorted(opened, key=lambda f: type(f) is not io.TextIOWrapper):  # text layers first
            try:
                if not f.closed and f.writable():
                    f.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: the interpreter would ignore it too
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(status)


if __name__ == "__main__":
    _plan_here = _serve(sys.argv[1])
    if _plan_here is None:
        sys.exit(0)
    try:
        _run_child(_plan_here)
    except SystemExit as _exc:
        _exit_now(_exc.code)
    _exit_now(0)
