"""Any GGUF file against llama.cpp on that same file: load, resident weights, plain greedy decoding.

    python benchmarks/gguf_bench.py [PATH.gguf ...] [--rounds 3] [--tokens 256]

`text_bench.py` measures the embedded SmolLM2 (a Q4_1 file) in depth; this one takes the file a user
brings — a Q4_K_M download, a Q5_0 or Q8_0 file — and prints how it loads here (the weights text: which
block types stay packed, or the fp32 fallback and why), then llama.cpp's and our
tokens/s in alternating rounds (llama.cpp alone in a child process, `make bench`'s native build where
there is one, as in text_bench), drafting off, a 32-token prompt, `--tokens` new greedy tokens with EOS
ignored, and the medians' ratio. Without a path (`make bench`) it writes eight files from the embedded
model with llama.cpp's own quantizer into a temporary folder — a Q4_K_M (on SmolLM2 mostly Q5_0: 576 is not
a multiple of Q4_K's 256), a Q5_K_M, a Q3_K_S (Q3_K ffn_down, the rest Q4_0), a Q5_0, a Q5_1, a Q4_0, an
IQ4_XS (IQ4_XS ffn_down, the rest IQ4_NL) and an IQ4_NL one — and measures each.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_bench as tb  # noqa: E402  (its ROOT on sys.path, its llama.cpp child and service helpers)

from engine.llm.batcher import GenerationRequest  # noqa: E402
from engine.llm.load import load_llm  # noqa: E402


def _requantised(folder: Path) -> list[Path]:
    """The embedded GGUF requantised by llama.cpp (Q4_K_M, Q5_K_M, Q3_K_S, Q5_0, Q5_1, Q4_0, IQ4_XS, IQ4_NL) into
    folder; [] without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python: not installed (pip install -e '.[bench]'): nothing to requantise")
        return []
    from engine.llm.load import embedded_gguf

    out = []
    for name in ("q4_k_m", "q5_k_m", "q3_k_s", "q5_0", "q5_1", "q4_0", "iq4_xs", "iq4_nl"):
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.allow_requantize, p.nthread = ftype, True, os.cpu_count() or 1
        dst = folder / f"SmolLM2-135M-Instruct.{name}.gguf"
        if llama_cpp.llama_model_quantize(str(embedded_gguf()).encode(), str(dst).encode(), ctypes.byref(p)) == 0:
            out.append(dst)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path, nargs="*", help="GGUF files (default: the embedded model requantised)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as d:  # the requantised files and the cache go
        tmp = Path(d)
        paths = [p.expanduser().resolve() for p in args.gguf] or _requantised(tmp)
        for path in paths:
            if not path.is_file():
                print(f"{path}: no such file")
                return 2
            bench(path, tmp / "cache", args.rounds, args.tokens)
    return 0


def bench(path: Path, cache: Path, rounds: int, tokens: int) -> None:
    """One file: how it loads, then the alternating rounds against llama.cpp."""
    t = time.perf_counter()
    m = load_llm(str(path), cache, activations="auto")
    load_s = time.perf_counter() - t
    print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB file; loaded in {load_s:.2f} s (first load, empty cache); "
          f"weights {m.weights}; {m.size_bytes() / 1e6:.1f} MB resident" + (f"; note: {m.note}" if m.note else ""))
    step = getattr(m.model, "_np_step", None)
    fused = step is not None and step.fused is not None
    print(f"decode step: {'fused (atelier_kernels/cpu_step.py)' if fused else 'layer by layer'}")
    if m.tokenizer is None:
        print("no tokenizer in the file: the timing needs one")
        return
    prompt = m.tokenizer.encode("The history of the printing press begins" * 8, add_special_tokens=False)[:32]
    svc = tb._plain_service(m, prompt, 8)
    req = GenerationRequest(prompt, max_new_tokens=tokens, ignore_eos=True, reuse_prefix=False)
    ours, theirs = [], []
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama_cpp = None
    for _ in range(rounds):
        if llama_cpp is not None:
            got = tb._llama_cpp_tps(path, prompt, tokens)
            if got is not None:
                theirs.append(got[0])
        time.sleep(1)
        ours.append(tb._timed(svc, req)[1])
        time.sleep(1)
    svc.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print("ours (drafting off): " + " / ".join(f"{x:.1f}" for x in ours) + f" tok/s, median {med(ours):.1f}")
    if theirs:
        r = med(ours) / med(theirs)
        print(f"llama.cpp ({os.cpu_count()} threads, alone in a process): " + " / ".join(f"{x:.1f}" for x in theirs)
              + f" tok/s, median {med(theirs):.1f} -> ours {r:.2f}x")
    else:
        print("llama-cpp-python: not installed (pip install -e '.[bench]'): no ratio")


if __name__ == "__main__":
    raise SystemExit(main())
