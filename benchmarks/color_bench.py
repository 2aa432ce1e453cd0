"""ΔE2000 map of two uint8 RGB images: engine.color.delta_e_map vs scikit-image, and the tool's overhead.

    python benchmarks/color_bench.py            # 2048 x 2048
    python benchmarks/color_bench.py --quick    # smoke run (256 x 256, one repetition)

1. Ours (`engine.color.delta_e_map`, metric ciede2000; on CPU the torch twin
   of `atelier_kernels.deltae`, pieces of 32 767 px over a thread pool) vs
   `skimage.color.deltaE_ciede2000(rgb2lab(a), rgb2lab(b))`, both from the same
   uint8 arrays, measured in this run. Printed: ms, Mpixel/s, GB/s read
   (6 bytes per pixel pair; 4 bytes per pixel are written), the speed-up and
   the max |ours - skimage float64|. Target: >= 10x.
2. Peak extra memory of one delta_e_map call, measured in a fresh subprocess
   as the growth of the process's peak RSS (VmHWM, a true high-water
   mark, unlike sampling; reset with /proc/self/clear_refs) after a warm-up call. tracemalloc cannot see torch's
   allocations (they bypass Python's allocator), and torch has no CPU
   allocator statistics, so RSS is the honest measure; it includes the
   float32 output (4 bytes/px = 16 MiB at 2048 x 2048), printed separately.
   Target: <= 64 MB excluding the output.
3. Tool overhead: `color_compare` (tools.color, FakeContext whose load_image
   returns the already-decoded arrays, so PNG decoding, the media module's
   job, is excluded) vs the bare engine call on the same arrays.
   Measured for the lean call (heatmap off, worst_regions 0) against the
   target <= 10 %, and for the default call (statistics + 5 worst regions +
   heatmap) for information.
Medians of interleaved repetitions; the machine is shared, so absolute times
move between runs, the ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def make_images(side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour field plus independent noise per image (uint8 [side, side, 3])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([255 * xx, 255 * yy, 127 * (xx + yy)], -1)
    base += 40 * np.sin(6 * xx + 3 * yy)[..., None]
    a = np.clip(base + rng.normal(0, 6, base.shape).astype(np.float32), 0, 255).astype(np.uint8)
    b = np.clip(base + rng.normal(0, 6, base.shape).astype(np.float32), 0, 255).astype(np.uint8)
    return a, b


def _interleaved(fns: dict, reps: int) -> dict[str, tuple[float, object]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_memory(path_a: str, path_b: str) -> None:
    """Subprocess entry: peak RSS growth (bytes) of one delta_e_map call, as JSON on stdout.

    Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS,
    so VmHWM after the call minus VmRSS before it is the call's true high-water growth.
    """
    import torch

    from engine.color import delta_e_map

    a = torch.from_numpy(np.load(path_a))
    b = torch.from_numpy(np.load(path_b))
    delta_e_map(a[:64, :64].contiguous(), b[:64, :64].contiguous())  # warm-up: tables, pool threads
    delta_e_map(a[:512], b[:512])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS") * 1024
    out = delta_e_map(a, b)
    peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"peak_growth": peak - before, "output_bytes": out.numel() * out.element_size()}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--measure-memory", nargs=2, metavar=("A_NPY", "B_NPY"))
    args = ap.parse_args()
    if args.measure_memory:
        measure_memory(*args.measure_memory)
        return 0
    side, reps, sk_reps = (256, 1, 1) if args.quick else (args.side, args.reps, 1)

    import torch
    from skimage.color import deltaE_ciede2000, rgb2lab

    from engine.color import delta_e_map

    a, b = make_images(side)
    n = side * side
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    print(f"images {side}x{side} ({n / 1e6:.2f} Mpixel), torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs")

    # 1. ours vs skimage --------------------------------------------------------------------------
    delta_e_map(ta[:64], tb[:64])  # warm-up
    ours = _interleaved({"ours": lambda: delta_e_map(ta, tb)}, reps)["ours"]
    sk = _interleaved({"skimage": lambda: deltaE_ciede2000(rgb2lab(a), rgb2lab(b))}, sk_reps)["skimage"]
    t_ours, out = ours
    t_sk, ref = sk
    err = np.abs(out.numpy().astype(np.float64) - ref)
    speedup = t_sk / t_ours
    print(f"ours     {t_ours * 1e3:9.1f} ms  {n / t_ours / 1e6:7.1f} Mpixel/s  {6 * n / t_ours / 1e9:6.3f} GB/s read")
    print(f"skimage  {t_sk * 1e3:9.1f} ms  {n / t_sk / 1e6:7.1f} Mpixel/s  {6 * n / t_sk / 1e9:6.3f} GB/s read")
    print(f"speed-up {speedup:.1f}x (target >= 10x): {'PASS' if speedup >= 10 else 'FAIL'}")
    print(f"accuracy max |ours - skimage float64| = {err.max():.2e}; pixels > 1e-3: {int((err > 1e-3).sum())}")

    # 2. peak memory (fresh subprocess) ----------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb = os.path.join(tmp, "a.npy"), os.path.join(tmp, "b.npy")
        np.save(pa, a)
        np.save(pb, b)
        res = subprocess.run([sys.executable, __file__, "--measure-memory", pa, pb], capture_output=True,
                             text=True, timeout=600)
    if res.returncode == 0:
        mem = json.loads(res.stdout.strip().splitlines()[-1])
        extra = mem["peak_growth"] - mem["output_bytes"]
        print(f"peak RSS growth {mem['peak_growth'] / 2**20:.1f} MiB incl. the {mem['output_bytes'] / 2**20:.1f} MiB "
              f"output -> extra {max(extra, 0) / 2**20:.1f} MiB (target <= 64 MB): "
              f"{'PASS' if extra <= 64e6 else 'FAIL'}")
    else:
        print("memory measurement failed:", res.stderr[-2000:])

    # 3. tool overhead -----------------------------------------------------------------------------
    from tests.fakectx import make_context
    from tools.color import TOOLS, ColorCompareInput

    run = TOOLS[0].run
    ctx = make_context()
    arrays = {"a": a, "b": b}
    ctx.load_image = lambda ref, argument, mode="keep": arrays[ref]  # decoded already; the tool never writes
    lean = ColorCompareInput(image_a="a", image_b="b", heatmap=False, worst_regions=0)
    full = ColorCompareInput(image_a="a", image_b="b")
    run(lean, ctx)
    res3 = _interleaved({"engine": lambda: delta_e_map(ta, tb, token=ctx.cancel_token(), device=ctx.engine.device),
                         "tool_lean": lambda: run(lean, ctx), "tool_full": lambda: run(full, ctx)}, reps)
    t_eng = res3["engine"][0]
    for k in ("tool_lean", "tool_full"):
        t = res3[k][0]
        over = t / t_eng - 1.0
        verdict = ("PASS" if over <= 0.10 else "FAIL") if k == "tool_lean" else "info"
        print(f"{k:9s} {t * 1e3:9.1f} ms vs engine {t_eng * 1e3:.1f} ms: overhead {over:+.1%} "
              f"(target <= 10%): {verdict}")
    print("tool text:", res3["tool_full"][1].text[:300])
    ctx.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
