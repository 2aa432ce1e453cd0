"""Quick before/after timings for the backend work of issue 16 (item 1): a catalogue scan on each CPU path,
one decode step of a SmolLM2-135M-shaped decoder (random weights) in the NumPy step, and the two Numba
products that run four rows at a time (`cpu_decode.rows_matmul`, `cpu_topk.half_scores`).

    python benchmarks/backends_timing.py            # ~1 minute on 2 cores
    python benchmarks/backends_timing.py --part products

Figures are medians of several runs (ms). Noisy on a shared machine: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def catalogue(n: int = 100_000, d: int = 384) -> None:
    from engine.catalog.query import Query
    from engine.catalog.store import Catalog

    rng = np.random.default_rng(0)
    mat = rng.standard_normal((n, d), dtype=np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    rows = [{"id": str(i)} for i in range(n)]
    qs = [torch.from_numpy(rng.standard_normal(d, dtype=np.float32)) for _ in range(8)]
    for label, dtype, sketch in [("fp32 sketch", torch.float32, None), ("fp32 numpy", torch.float32, False),
                                 ("fp16 half", torch.float16, False)]:
        cat = Catalog(d, dtype=dtype, capacity=n, sketch=sketch)
        cat.upsert(rows, torch.from_numpy(mat))
        one = _median_ms(lambda: cat.search(Query(qs[0], 10)), 15)
        eight = _median_ms(lambda: cat.search_many([Query(q, 10) for q in qs]), 7)
        print(f"catalogue {n}x{d} {label:12s}: 1 query {one:7.2f} ms, 8 queries {eight:7.2f} ms", flush=True)
        cat.close()


def decode_step() -> None:
    from engine.llm.cache import FullCache
    from engine.llm.model import ModelArgs, Transformer

    cfg = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
           "max_position_embeddings": 2048, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf(cfg)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model = model.requires_grad_(False)
    step = getattr(model, "set_decode_step", None) or model.set_blas
    step("numpy")
    a = model.args
    for B in (1, 8):
        cache = FullCache(a.n_layers, B, a.n_kv_heads, a.head_dim, 256)
        for s in range(B):
            model.prefill(cache, s, list(range(1, 33)))
        slots = list(range(B))

        def one() -> None:
            model.decode(cache, slots, [5] * B)
            for s in slots:
                cache.lengths[s] -= 1
        print(f"decode step, SmolLM2-135M shape, {B} row(s): {_median_ms(one, 15):7.2f} ms", flush=True)


def products() -> None:
    from atelier_kernels import cpu_decode, cpu_topk

    rng = np.random.default_rng(1)
    w = rng.standard_normal((1536 * 2, 576), dtype=np.float32)
    w16 = rng.standard_normal((50_000, 384)).astype(np.float16)
    for M in (1, 4, 8):
        x = rng.standard_normal((M, 576), dtype=np.float32)
        t = _median_ms(lambda: cpu_decode.rows_matmul(x, w), 30)
        x16 = rng.standard_normal((M, 384), dtype=np.float32)
        h = _median_ms(lambda: cpu_topk.half_scores(x16, w16), 15)
        print(f"rows_matmul {M} x 576 @ 3072x576: {t:6.3f} ms; half_scores {M} x 384 @ 50000x384 fp16: {h:6.3f} ms",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "catalogue", "decode", "products"], default="all")
    part = ap.parse_args().part
    if part in ("all", "products"):
        products()
    if part in ("all", "catalogue"):
        catalogue()
    if part in ("all", "decode"):
        decode_step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
