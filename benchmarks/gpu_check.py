"""The first thing to run on a CUDA machine: every Triton kernel against its torch twin, then each benchmark.

    python benchmarks/gpu_check.py            # about 5-8 minutes on one GPU
    python benchmarks/gpu_check.py --kernels  # the kernel table only (under a minute)

Part 1 iterates `kernels.registry` (the same list the CPU tests iterate under
TRITON_INTERPRET=1): for each Triton kernel and each case, including the large
GPU-sized ones, it runs the kernel and its torch twin on the GPU, compares them
with the registry's check, and times both (CUDA events, median of 5 after a
warm-up). Part 2 runs each `benchmarks/*_bench.py --quick` in a subprocess with
a time limit, on the default device (CUDA here), and keeps their ratio lines.
One table is printed at the end; the exit code is 1 if any kernel disagreed
with its twin or a benchmark failed.
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

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_check: unset TRITON_INTERPRET: this script runs the compiled kernels on the GPU")

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


def check_kernels() -> list[tuple[str, str, str, str, str]]:
    from kernels import registry

    rows = []
    for k in registry.kernels("triton"):
        for args, label in k.cases("cuda", True):
            try:
                got, want = k.fast(*args), k.twin(*args)
                k.check(got, want)
                verdict = "ok"
            except AssertionError as exc:
                verdict = "MISMATCH: " + str(exc).splitlines()[0][:60]
            except Exception as exc:  # a kernel that does not compile or launch
                rows.append((k.name, label, f"ERROR {type(exc).__name__}: {str(exc)[:60]}", "-", "-"))
                continue
            t_k, t_t = _time_ms(k.fast, args), _time_ms(k.twin, args)
            rows.append((k.name, label, verdict, f"{t_k:.3f}", f"{t_t:.3f} ({t_t / max(t_k, 1e-9):.1f}x)"))
    return rows


def run_benchmarks(limit_s: float) -> list[tuple[str, str, str]]:
    rows = []
    for script in sorted((ROOT / "benchmarks").glob("*_bench.py")):
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                                 timeout=limit_s, cwd=ROOT)
            status = "ok" if out.returncode == 0 else f"exit {out.returncode}"
            lines = [ln for ln in out.stdout.splitlines() if "x" in ln and any(c.isdigit() for c in ln)]
            summary = " | ".join(ln.strip() for ln in lines[-4:])[:160]
        except subprocess.TimeoutExpired:
            status, summary = f"timeout {limit_s:.0f}s", ""
        rows.append((script.name, f"{status} ({time.perf_counter() - t0:.0f} s)", summary))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="the kernel table only")
    ap.add_argument("--bench-limit", type=float, default=75.0, help="seconds per benchmark script")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a machine with a GPU", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    krows = check_kernels()
    print("\n| kernel | case | vs twin | kernel ms | twin ms (ratio) |\n|---|---|---|---|---|")
    for r in krows:
        print("| " + " | ".join(r) + " |")
    bad = [r for r in krows if r[2] != "ok"]
    if not args.kernels:
        brows = run_benchmarks(args.bench_limit)
        print("\n| benchmark (--quick) | status | last ratio lines |\n|---|---|---|")
        for r in brows:
            print("| " + " | ".join(r) + " |")
        bad += [r for r in brows if not r[1].startswith("ok")]
    print(f"\n{len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
