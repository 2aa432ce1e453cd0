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
    if args.host:
        settings.http.host = args.host
    if args.port is not None:
        settings.http.port = args.port
    _setup_logs(settings)
    from .app import build_server
    from .transports import check_http_config, serve_http, serve_stdio

    if args.transport in ("http", "sse"):
        check_http_config(settings, settings.http.host)
    server = build_server(settings)
    if args.transport == "stdio":
        serve_stdio(server)
    else:
        serve_http(server, args.transport, settings.http.host, settings.http.port)
    return 0


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
class _ProgressBar:
    def __init__(self) -> None:
        self.shown = False

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
        self.shown = True

    def close(self) -> None:
        if self.shown:
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
    _setup_logs(settings)
    from .app import build_server

    server = build_server(settings)
    bar = _ProgressBar()
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
def cmd_doctor(args: argparse.Namespace) -> int:
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
    from engine._compat import prepare
    from engine.defaults import embedded_status
    from engine.device import select_device, select_dtype
    from kernels._backend import default_backend, triton_available

    report["torchvision"] = prepare(settings.resolved_cache_dir(), settings.engine.hf_offline)
    import torch

    try:
        dev = select_device(settings.engine.device)
        report["device"] = str(dev)
        report["dtype"] = str(select_dtype(settings.engine.dtype, dev)).removeprefix("torch.")
        report["kernel_backend"] = (settings.engine.kernel_backend if settings.engine.kernel_backend != "auto"
                                    else default_backend(dev))
    except ValueError as exc:
        report["device"] = f"error: {exc}"
    report["cuda_available"] = torch.cuda.is_available()
    report["triton_importable"] = triton_available()
    report["embedded_models"] = embedded_status()
    report["configured_models"] = settings.models.model_dump(mode="json")
    dirs = {}
    for label, p in (("output_dir", settings.resolved_output_dir()), ("cache_dir", settings.resolved_cache_dir())):
        try:
            p.mkdir(parents=True, exist_ok=True)
            writable = os.access(p, os.W_OK)
        except OSError:
            writable = False
        dirs[label] = {"path": str(p), "writable": writable}
    dirs["read_roots"] = [{"path": str(p), "exists": p.is_dir()} for p in settings.resolved_read_roots()]
    report["dirs"] = dirs
    report["enabled_tools"] = settings.enabled_tools()
    problems = []
    if not all(v["available"] for v in report["embedded_models"].values()):
        missing = [k for k, v in report["embedded_models"].items() if not v["available"]]
        problems.append(f"embedded models missing: {', '.join(missing)} (run `make install`)")
    if not dirs["output_dir"]["writable"]:
        problems.append("output_dir is not writable")
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    return 0 if not problems else 1


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


if __name__ == "__main__":
    sys.exit(main())
