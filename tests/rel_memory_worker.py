"""A clean process for the memory measurements of tests/test_rel_memory_masks.py and _tools.py.

Peak RSS is a per-process figure: in the pytest process, threads left by
earlier tests (jobs that outlived their deadline, services) allocate while a
test measures. This worker has no other work. It fixes glibc's mmap threshold
at 64 KiB, so every image-sized array is its own mapping and RSS follows the
bytes alive, then answers one JSON request per stdin line with one JSON line
(on the original stdout; anything a library prints goes to stderr):

- {"kind": "expr", "expr", "h", "w", "rgb", "seed", "limit"} -> {"est", "peak", "after", "refused", "shape"}
- {"kind": "mask_edit", "args", "h", "w"} -> {"est", "worst", "peak", "width"}
- {"kind": "color", "args", "shape_a", "shape_b"} -> {"est", "peak", "width"}
- {"kind": "rss_after", "expr", "h", "w"} -> {"after"}: RSS growth over two evaluations (start the
  worker with `--glibc-defaults` to keep glibc's dynamic mmap threshold, as the server does)

Each measurement warms up first (threads, kernels, lazy imports), then
collects garbage, trims the heap, resets the peak (clear_refs 5) and runs.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import masks, workmem  # noqa: E402
from engine.masks.expression import check_expression_memory, expression_memory, parse  # noqa: E402  (issue 16, H5)
from tests.reltools import proc_status, reset_peak  # noqa: E402

_ctx = None


def _measure(fn):
    gc.collect()
    workmem.release(1 << 40)
    before = proc_status()["VmRSS"]
    reset_peak()
    out = fn()
    st = proc_status()
    return st["VmHWM"] - before, st["VmRSS"] - before, out


def _image(h: int, w: int, seed: int, rgb: bool) -> torch.Tensor:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3]) if rgb else arr)


def _expr(req: dict) -> dict:
    expr, h, w = req["expr"], req["h"], req["w"]
    img = _image(h, w, req.get("seed", 0), req.get("rgb", False))
    c = img.shape[2]
    tree = parse(expr)
    est = expression_memory(tree, h, w, channels=c)
    limit = req.get("limit")
    if limit is not None and est > limit:
        def refuse():
            try:
                check_expression_memory(tree, expr, h, w, limit, channels=c)
            except workmem.MemoryLimitExceeded as exc:
                return str(exc)
            return None
        peak, after, msg = _measure(refuse)
        return {"est": est, "peak": peak, "after": after, "refused": msg}
    masks.evaluate_expression(expr, img[:4, :4].contiguous())
    peak, after, out = _measure(lambda: masks.evaluate_expression(expr, img, memory_limit=limit))
    return {"est": est, "peak": peak, "after": after, "refused": None, "shape": list(out.shape),
            "dtype": str(out.dtype)}


def _context():
    global _ctx
    if _ctx is None:
        from tests.fakectx import make_context

        _ctx = make_context(Path("/tmp"))
    return _ctx


def _mask_edit(req: dict) -> dict:
    from tools import masks as tool

    inp = tool.MaskEditInput(**req["args"])
    tree = parse(inp.expression) if inp.expression else None
    est, worst = tool.estimate_memory(inp, req["h"], req["w"], channels=4, tree=tree)
    ctx = _context()
    tool.run(inp, ctx)
    peak, _, out = _measure(lambda: tool.run(inp, ctx))
    return {"est": est, "worst": worst, "peak": peak, "width": out.structured.width}


def _color(req: dict) -> dict:
    from tools import color as tool

    inp = tool.ColorCompareInput(**req["args"])
    tree = parse(inp.mask_expression) if inp.mask_expression else None
    est = tool.estimate_memory(inp, tuple(req["shape_a"]), tuple(req["shape_b"]), tree=tree)
    ctx = _context()
    tool._run(inp, ctx)
    peak, _, out = _measure(lambda: tool._run(inp, ctx))
    return {"est": est, "peak": peak, "width": out.structured.width}


def _rss_after(req: dict) -> dict:
    img = _image(req["h"], req["w"], 0, False)
    masks.evaluate_expression(req["expr"], img[:16, :16].contiguous())
    gc.collect()
    before = proc_status()["VmRSS"]
    for _ in range(2):
        out = masks.evaluate_expression(req["expr"], img)
        del out
    return {"after": proc_status()["VmRSS"] - before}


HANDLERS = {"expr": _expr, "mask_edit": _mask_edit, "color": _color, "rss_after": _rss_after}


class Worker:
    """The parent's handle: `ask(kind=..., ...)` -> the worker's answer (an error in the worker fails the test)."""

    def __init__(self, *, mapped: bool = True) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve())] + ([] if mapped else ["--glibc-defaults"])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(ROOT))

    def ask(self, **req: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the memory worker exited ({self.proc.wait(10)})")
        res = json.loads(line)
        if "error" in res:
            raise AssertionError("the memory worker failed:\n" + res["error"])
        return res

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if "--glibc-defaults" not in sys.argv:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so no heap reuse
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = HANDLERS[req["kind"]](req)
        except Exception:
            res = {"error": traceback.format_exc()}
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
