"""The first thing to run on a CUDA machine: every Triton kernel against its torch twin, then each benchmark.

    python benchmarks/gpu_check.py            # about 5-8 minutes on one GPU
    python benchmarks/gpu_check.py --kernels  # the kernels only (under a minute)
    python benchmarks/gpu_check.py --list     # what would run (no GPU needed)

Part 1 iterates `atelier_kernels.registry` (the same list the CPU tests iterate under
TRITON_INTERPRET=1, including kernels other modules `register`): for each
Triton kernel and each case, including the large GPU-sized ones, it runs the
kernel and its torch twin on the GPU, compares them with the registry's check,
and times both (CUDA events, median of 5 after a warm-up). Part 2 runs each
`benchmarks/*_bench.py --quick` in a subprocess with a time limit, on the
default device (CUDA here), and keeps their ratio lines. One table is printed
at the end.

Exit codes: 0 all agreed (or: no CUDA device here, said in one line, nothing
run); 1 a kernel disagreed with its twin, failed to run, or a benchmark
failed; 2 TRITON_INTERPRET=1 is set (the kernels would run in the interpreter).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _time_ms(fn, args, reps: int = 5) -> float:
    fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


Row = tuple[str, str, str, str, str, str]  # part, name, case, result, time, twin time (ratio) / summary
HEADER = "| part | name | case | result | ms | twin ms (ratio) / benchmark lines |"


def planned_kernels() -> list[Row]:
    """What part 1 runs: every registered Triton kernel and each of its GPU cases (labels only)."""
    from atelier_kernels import registry

    rows: list[Row] = []
    for k in registry.kernels("triton"):
        for label in _labels(k):
            rows.append(("kernel", k.name, label, "planned", "-", "-"))
    return rows


def _labels(k) -> list[str]:  # noqa: ANN001
    # the small cases' labels (built on the CPU); the GPU-sized ones are only built on the GPU
    return [label for _, label in k.cases("cpu", False)] + ["+ large GPU cases"]


def check_kernels() -> list[Row]:
    from atelier_kernels import registry

    rows: list[Row] = []
    for k in registry.kernels("triton"):
        for args, label in k.cases("cuda", True):
            try:
                got, want = k.fast(*args), k.twin(*args)
                k.check(got, want)
                verdict = "ok"
            except AssertionError as exc:
                verdict = "MISMATCH: " + (str(exc).splitlines() or [""])[0][:60]
            except Exception as exc:  # a kernel that does not compile or launch
                rows.append(("kernel", k.name, label, f"ERROR {type(exc).__name__}: {str(exc)[:60]}", "-", "-"))
                continue
            t_k, t_t = _time_ms(k.fast, args), _time_ms(k.twin, args)
            rows.append(("kernel", k.name, label, verdict, f"{t_k:.3f}",
                         f"{t_t:.3f} ({t_t / max(t_k, 1e-9):.1f}x)"))
    return rows


def run_benchmarks(limit_s: float) -> list[Row]:
    rows: list[Row] = []
    for script in sorted((ROOT / "benchmarks").glob("*_bench.py")):
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                                 timeout=limit_s, cwd=ROOT)
            status = "ok" if out.returncode == 0 else f"exit {out.returncode}"
            lines = [ln for ln in out.stdout.splitlines() if "x" in ln and any(c.isdigit() for c in ln)]
            summary = " / ".join(ln.strip().replace("|", "/") for ln in lines[-4:])[:160]
        except subprocess.TimeoutExpired:
            status, summary = f"timeout {limit_s:.0f}s", ""
        rows.append(("benchmark", script.name, "--quick", status, f"{(time.perf_counter() - t0) * 1000:.0f}",
                     summary))
    return rows


def print_table(rows: list[Row]) -> None:
    print(HEADER + "\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="the kernels only, no benchmarks")
    ap.add_argument("--list", action="store_true", help="print what would run and exit (no GPU needed)")
    ap.add_argument("--bench-limit", type=float, default=75.0, help="seconds per benchmark script")
    args = ap.parse_args()
    if args.list:
        rows = planned_kernels()
        if not args.kernels:
            rows += [("benchmark", p.name, "--quick", "planned", "-", "-")
                     for p in sorted((ROOT / "benchmarks").glob("*_bench.py"))]
        print_table(rows)
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing checked, run it on a GPU machine")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: unset TRITON_INTERPRET: this script runs the compiled kernels on the GPU")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = check_kernels()
    if not args.kernels:
        rows += run_benchmarks(args.bench_limit)
    print()
    print_table(rows)
    bad = [r for r in rows if r[3] != "ok"]
    print(f"\n{len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
