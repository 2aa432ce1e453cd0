"""generate_text benchmark: our KV-cached decoder vs transformers on SmolLM2-135M-Instruct (fp32, CPU).

    python benchmarks/text_bench.py            # the issue's sizes (several minutes on 2 cores)
    python benchmarks/text_bench.py --quick    # smoke run

Prints, measured in this run on this machine:
- batch 1, 32-token prompt, 256 new greedy tokens: ours vs transformers `generate(use_cache=True)`
  tokens/s (target >= 2x);
- ms per token at 128 / 512 / 1024 tokens of context, and the no-cache figure (a full forward
  over the context per token);
- achieved GB/s (weights + KV bytes read per token) against a measured read bandwidth;
- 8 concurrent requests: aggregate tokens/s vs single stream (target >= 4x);
- int8 cache: greedy agreement and mean KL vs the full cache over 10 prompts x 256 tokens, and
  its bytes per token vs an fp16 cache (targets >= 95%, <= 0.02, <= 0.55x), and the time of a
  decode step of those 10 rows on each cache;
- load time, peak RSS, cache bytes;
- GGUF weights kept packed (models.llm_weights = "auto", the default) with the configured activations
  (models.llm_activations, default auto = Q8 where AVX2 runs) against llama.cpp (llama-cpp-python, the
  `bench` extra) on the same Q4_1 file in the same run, llama.cpp alone in a child process, three rounds
  alternating with ours: batch 1, 32-token prompt, 256 new greedy tokens, drafting off; tokens/s per
  round, the medians' ratio (target >= 1.0x), 8 streams against both single streams (targets 4x / 3x),
  llama.cpp's own 8 streams (the same prompts as one batch of 8 sequences) as the reference for that ratio,
  fp32 activations for comparison and the achieved GB/s of weight bytes; with --fp32 also the
  de-quantised fp32 model for before/after.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "build" / "llama-native"  # `make bench`: llama.cpp built for this CPU (GGML_NATIVE)
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import _compat  # noqa: E402


def _bandwidth() -> float:
    x = torch.ones(64 * 1024 * 1024)  # 256 MB
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


_LLAMA_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[4])
native = os.path.join(sys.argv[4], "build", "llama-native")
if os.path.isdir(os.path.join(native, "llama_cpp")):  # make bench: llama.cpp built for this CPU (GGML_NATIVE)
    sys.path.insert(0, native)
import llama_cpp
from tests import llama_ref
llama_ref.patch()  # where the CPU has AMX: llama.cpp's AMX weight buffers crash on batches (tests/llama_ref.py)
path, n, prompt = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
def run(k):
    llm.reset()
    t = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        if i + 1 >= k:
            break
    return k / (time.perf_counter() - t)
def streams(prompts, k):
    # llama.cpp's own continuous batching: one context holding len(prompts) sequences (its default context
    # parameters, n_seq_max = their number, 512 positions each, as llama-server's slots), each prompt evaluated
    # as a batch of its own, then one llama_decode per step with every sequence's next greedy token
    import numpy as np
    L = llama_cpp
    cp = L.llama_context_default_params()
    cp.n_seq_max, cp.n_ctx, cp.n_batch, cp.n_ubatch = len(prompts), 512 * len(prompts), 512, 512
    cp.n_threads = cp.n_threads_batch = os.cpu_count()
    ctx = L.llama_init_from_model(llm._model.model, cp)
    nv = L.llama_vocab_n_tokens(L.llama_model_get_vocab(llm._model.model))
    batch = L.llama_batch_init(512, 0, len(prompts))
    def put(i, t, p, s, lg):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, lg
        batch.seq_id[i][0] = s
    def top(i):
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(nv,)).argmax())
    t = time.perf_counter()
    last, pos = [], []
    for s, pr in enumerate(prompts):
        batch.n_tokens = len(pr)
        for i, tok in enumerate(pr):
            put(i, tok, i, s, i == len(pr) - 1)
        assert L.llama_decode(ctx, batch) == 0
        last.append(top(len(pr) - 1))
        pos.append(len(pr))
    for _ in range(k - 1):
        batch.n_tokens = len(prompts)
        for s in range(len(prompts)):
            put(s, last[s], pos[s], s, True)
            pos[s] += 1
        assert L.llama_decode(ctx, batch) == 0
        last = [top(s) for s in range(len(prompts))]
    tps = len(prompts) * k / (time.perf_counter() - t)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return tps
run(4)
tps = run(n)
many = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
print(json.dumps([tps, llama_cpp.llama_print_system_info().decode().strip(), streams(many, n) if many else None]))
"""


def _llama_cpp_tps(gguf: Path, prompt: list[int], n: int, many: list[list[int]] | None = None
                   ) -> tuple[float, str, float | None] | None:
    """llama.cpp's plain greedy tokens/s on gguf (prompt evaluation included), in a child process of its own,
    the build's system info (the native build `make bench` puts in NATIVE where there is one, else the venv's
    AVX2 one) and, given `many` prompts, llama.cpp's aggregate tokens/s generating n tokens for each of them at
    once (batched `llama_decode`, one sequence per prompt)."""
    import json
    import subprocess

    argv = [sys.executable, "-c", _LLAMA_CHILD, str(gguf), str(n), json.dumps(prompt), str(ROOT)]
    out = subprocess.run(argv + ([json.dumps(many)] if many else []), capture_output=True, text=True, timeout=900)
    if out.returncode:
        print(f"llama.cpp child failed: {out.stderr.strip()[-500:]}")
        return None
    tps, info, agg = json.loads(out.stdout.strip().splitlines()[-1])
    return float(tps), info, agg


def _batch_bounds(model, prompt: list[int], quick: bool) -> list[str]:  # noqa: ANN001
    """What bounds the 8 streams' ratio to one: the decode step alone (no batcher, no prompts), 8 rows against 1
    at 10 and 160 positions of context, and the first layer's gate/up and down products alone
    (`cpu_qmatmul.matmul_q8`; llama.cpp's Q4_1 layout, and its rows interleaved by 8 as `q8_fast` holds them), as
    throughput. Measured first, while this process has one thread calling the kernels: once a second thread has
    run them (a service's worker), GNU OpenMP gives each its own team and, more threads than cores, throttles
    their spinning, so each parallel call pays a wake-up (~40 us, doubling a 1-row product's time here)."""
    from atelier_kernels import cpu_qmatmul
    from engine.llm.cache import FullCache

    a = model.args
    c8 = FullCache(a.n_layers, 8, a.n_kv_heads, a.head_dim, 512)
    parts = []
    for ctx in (10, 160):
        got = {}
        for rows in (1, 8):
            ts = []
            with torch.inference_mode():
                for i in range(12 if quick else 40):
                    for s in range(rows):
                        c8.lengths[s] = ctx
                    t = time.perf_counter()
                    model.decode(c8, list(range(rows)), prompt[i % 24:i % 24 + rows])
                    ts.append(time.perf_counter() - t)
            got[rows] = sorted(ts)[len(ts) // 4] * 1000
        parts.append(f"at {ctx} positions 1 row {got[1]:.2f} ms, 8 rows {got[8]:.2f} ms = "
                     f"{8 * got[1] / got[8]:.2f}x one row's throughput")
    del c8
    lines = ["decode step alone (what bounds the 8 streams' ratio): " + "; ".join(parts)]
    step = getattr(model, "_np_step", None)
    if step is None or not cpu_qmatmul.q8_available():
        return lines
    rng = np.random.default_rng(0)
    out = []
    # NumpyStep.layers[i]: (l1w, l1b, wqkv, bqkv, wo, bo, l2w, l2b, w13, b13, w2, b2)
    for name, lin in (("gate/up", step.layers[0][8]), ("down", step.layers[0][10])):
        p = getattr(lin, "parts", [None])[0]
        if p is None or p.fmt != "Q4_1" or p.qs.shape[0] % 8:
            continue
        N, K = p.qs.shape[0], p.qs.shape[1] * 32
        got = {}
        x8 = cpu_qmatmul.interleave_q41(p.qs, p.d, p.m)
        for fmt, arrs in (("Q4_1", (p.qs, p.d, p.m)), (cpu_qmatmul.X8_FORMAT, x8)):
            for rows in (1, 8):
                x = rng.standard_normal((rows, K)).astype(np.float32)
                o = np.empty((rows, N), np.float32)
                ts = []
                for _ in range(40 if quick else 200):
                    t = time.perf_counter()
                    cpu_qmatmul.matmul_q8(fmt, x, *arrs, out=o)
                    ts.append(time.perf_counter() - t)
                got[fmt, rows] = sorted(ts)[len(ts) // 2] * 1e6
        out.append(f"{name} ({N} x {K}) Q4_1 {got['Q4_1', 1]:.1f} / {got['Q4_1', 8]:.1f} us = "
                   f"{8 * got['Q4_1', 1] / got['Q4_1', 8]:.2f}x, Q4_1x8 {got['Q4_1x8', 1]:.1f} / "
                   f"{got['Q4_1x8', 8]:.1f} us = {8 * got['Q4_1x8', 1] / got['Q4_1x8', 8]:.2f}x")
    if out:
        lines.append("the products alone, 1 / 8 rows of activations (8 rows' throughput over one's): "
                     + "; ".join(out))
    return lines


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _plain_service(m, prompt: list[int], max_slots: int):  # noqa: ANN001, ANN202
    """An LLMService on the loaded model m, drafting off, warmed up with a 4-token generation."""
    from engine.llm.batcher import GenerationRequest, LLMService

    svc = LLMService(lambda: m, max_slots=max_slots, max_len=2048)
    svc.speculate = False
    svc.generate(GenerationRequest(prompt, max_new_tokens=4, ignore_eos=True, reuse_prefix=False))
    return svc


def _timed(svc, req) -> tuple:  # noqa: ANN001
    """One generation -> (its result, tokens/s)."""
    t = time.perf_counter()
    r = svc.generate(req)
    return r, r.completion_tokens / (time.perf_counter() - t)


def _concurrently(svc, reqs) -> tuple[list, float]:  # noqa: ANN001
    """The requests generated at once on svc, one thread each -> (results, aggregate tokens/s)."""
    results: list = [None] * len(reqs)

    def run(i: int) -> None:
        results[i] = svc.generate(reqs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, sum(r.completion_tokens for r in results) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--cache-dir", default=os.environ.get("ATELIER_BENCH_CACHE", str(Path.home() / ".cache" /
                                                                                     "atelier-mcp")))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the decode step")
    ap.add_argument("--fp32", action="store_true", help="also time plain decoding on de-quantised fp32 weights")
    ap.add_argument("--gpu-only", action="store_true", help="only the CUDA section (packed Triton products, the "
                    "fp16 de-quantised weights and transformers' generate on the GPU)")
    args = ap.parse_args()
    cache_dir = Path(args.cache_dir).expanduser()
    _compat.prepare(cache_dir)
    if args.gpu_only:
        from engine.llm.load import load_llm

        tok = load_llm("", cache_dir, activations="fp32").tokenizer
        text = ("The ocean covers most of the planet and shapes its weather, its coasts and the lives of the "
                "people who live beside it, from fishermen to sailors and ")
        _gpu_section(cache_dir, tok.encode(text * 2, add_special_tokens=False)[:32], 32 if args.quick else 256,
                     args.quick)
        return 0

    from engine.llm.batcher import GenerationRequest, LLMService
    from engine.llm.cache import FullCache, Int8Cache
    from engine.llm.load import embedded_gguf, load_llm

    n_new = 32 if args.quick else 256
    contexts = (128, 256) if args.quick else (128, 512, 1024)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quick={args.quick}")

    from mcp_server.config import ModelsSection

    act = ModelsSection().llm_activations  # the configured default ("auto": Q8 activations where AVX2 runs)
    t = time.perf_counter()
    m = load_llm("", cache_dir, activations=act)
    first = time.perf_counter() - t
    warms = []
    for _ in range(3):
        del m
        t = time.perf_counter()
        m = load_llm("", cache_dir, activations=act)
        warms.append(time.perf_counter() - t)
    warm = sorted(warms)[1]
    print(f"weights: {m.weights} ({m.size_bytes() / 1e6:.1f} MB resident, GGUF file "
          f"{embedded_gguf().stat().st_size / 1e6:.1f} MB)")
    print(f"load: first call {first:.2f} s (writes the tokenizer files once if not yet in the cache), later loads "
          f"{', '.join(f'{w:.2f}' for w in warms)} s, median {warm:.2f} s [target < 2 s: {_verdict(warm < 2)}]")
    model, tok = m.model, m.tokenizer
    a = model.args
    text = ("The ocean covers most of the planet and shapes its weather, its coasts and the lives of the "
            "people who live beside it, from fishermen to sailors and ")
    prompt = tok.encode(text * 2, add_special_tokens=False)[:32]
    assert len(prompt) == 32
    bounds = _batch_bounds(model, prompt, args.quick)  # before any other thread runs the kernels

    # -- batch 1: ours vs transformers ---------------------------------------------------------
    svc = LLMService(lambda: m, max_slots=8, max_len=2048)
    req = GenerationRequest(prompt, max_new_tokens=n_new, ignore_eos=True, reuse_prefix=False)
    svc.generate(GenerationRequest(prompt, max_new_tokens=4, ignore_eos=True, reuse_prefix=False))  # warm-up
    t = time.perf_counter()
    ours = svc.generate(req)
    ours_tps = n_new / (time.perf_counter() - t)

    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
        t = time.perf_counter()
        ref = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True)
        hf_tps = n_new / (time.perf_counter() - t)
    same = ref[0, 32:].tolist() == ours.token_ids
    ratio = ours_tps / hf_tps
    svc.speculate = False
    t = time.perf_counter()
    plain = svc.generate(req)
    plain_tps = n_new / (time.perf_counter() - t)
    svc.speculate = True
    print(f"prompt-lookup drafts: {svc.spec_accepted}/{svc.spec_drafted} accepted; without them ours "
          f"{plain_tps:.1f} tok/s ({plain_tps / hf_tps:.2f}x), same tokens: {plain.token_ids == ours.token_ids}")
    wbytes = model.size_bytes()
    print(f"plain decoding (drafting off) reads {wbytes / 1e6:.1f} MB of weights per token: "
          f"{plain_tps * wbytes / 1e9:.1f} GB/s of weight bytes")
    if args.fp32:
        m32 = load_llm("", cache_dir, weights="fp32")
        s32 = _plain_service(m32, prompt, 1)
        r32, tps32 = _timed(s32, req)
        print(f"fp32 de-quantised weights ({m32.size_bytes() / 1e6:.0f} MB), plain decoding: {tps32:.1f} tok/s; "
              f"packed GGUF {plain_tps / tps32:.2f}x that; same tokens: {r32.token_ids == plain.token_ids}")
        s32.close()
        del m32
    print(f"batch 1, 32-token prompt, {n_new} new tokens, greedy: ours {ours_tps:.1f} tok/s, "
          f"transformers {hf_tps:.1f} tok/s -> {ratio:.2f}x [target >= 2x: {_verdict(ratio >= 2)}] "
          f"(same tokens: {same})")
    del hf

    # -- ms per token vs context; no-cache figure; GB/s ------------------------------------------
    bw = _bandwidth()
    kv_tok = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, max(contexts) + 64)
    g = torch.Generator().manual_seed(0)
    steps = 8 if args.quick else 24
    print(f"measured read bandwidth {bw:.1f} GB/s; weights {wbytes / 1e6:.0f} MB")
    for ctx in contexts:
        ctx_ids = torch.randint(0, a.vocab_size, (ctx,), generator=g).tolist()
        cache.reset(0)
        with torch.inference_mode():
            t = time.perf_counter()
            model.prefill(cache, 0, ctx_ids)
            nocache_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            for i in range(steps):
                model.decode(cache, [0], [ctx_ids[i]])
            ms = (time.perf_counter() - t) * 1000 / steps
        gbs = (wbytes + kv_tok * ctx) / (ms / 1000) / 1e9
        print(f"context {ctx:5d}: {ms:6.1f} ms/token with the KV cache, {nocache_ms:7.1f} ms/token without "
              f"(full forward); {gbs:.1f} GB/s = {100 * gbs / bw:.0f}% of measured bandwidth")

    # -- 8 concurrent requests --------------------------------------------------------------------
    topics = ["the sea", "mountains", "a robot", "coffee", "the moon", "trains", "music", "winter"]
    reqs = [GenerationRequest(tok.encode(tok.render_chat([{"role": "user", "content": f"Write about {x}."}]),
                                         add_special_tokens=False), max_new_tokens=n_new, ignore_eos=True,
                              reuse_prefix=False) for x in topics]
    t = time.perf_counter()
    single = svc.generate(reqs[0])
    single_tps = single.completion_tokens / (time.perf_counter() - t)
    _, agg = _concurrently(svc, reqs)
    r8 = agg / single_tps
    print(f"8 concurrent requests: {agg:.1f} tok/s aggregate vs {single_tps:.1f} tok/s single stream -> "
          f"{r8:.2f}x [target >= 4x: {_verdict(r8 >= 4)}]")
    print("\n".join(bounds))
    print(f"cache bytes: {svc.cache_bytes() / 1e6:.0f} MB allocated for {svc.stats()['pools']['full']['slots']} "
          f"slots x 2048 tokens ({kv_tok} B/token fp32)")
    svc.close()

    # -- int8 cache quality -------------------------------------------------------------------------
    qs = ["the sea", "a city at night", "how vaccines work", "the history of Rome", "baking bread",
          "black holes", "learning to code", "a walk in the forest", "the moon landing", "chess strategy"]
    n_q = 3 if args.quick else 10
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": f"Write a long essay about {x}."}]),
                          add_special_tokens=False) for x in qs[:n_q]]
    n_tok = 160 if args.quick else 256
    L = max(len(p) for p in prompts) + n_tok + 1
    full = FullCache(a.n_layers, n_q, a.n_kv_heads, a.head_dim, L)
    q8 = Int8Cache(a.n_layers, n_q, a.n_kv_heads, a.head_dim, L)
    agree = total = 0
    kl = 0.0
    t = time.perf_counter()
    with torch.inference_mode():
        cur = []
        for i, p in enumerate(prompts):
            cur.append(int(model.prefill(full, i, p).argmax()))
            model.prefill(q8, i, p)
        t_full = t_q8 = 0.0
        for _ in range(n_tok - 1):
            t0 = time.perf_counter()
            lf = model.decode(full, list(range(n_q)), cur).log_softmax(-1)
            t1 = time.perf_counter()
            lq = model.decode(q8, list(range(n_q)), cur).log_softmax(-1)
            t_full, t_q8 = t_full + t1 - t0, t_q8 + time.perf_counter() - t1
            nxt = lf.argmax(-1)
            agree += int((lq.argmax(-1) == nxt).sum())
            total += n_q
            kl += float((lf.exp() * (lf - lq)).sum())
            cur = nxt.tolist()
    fp16_tok = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2
    bpt = q8.bytes_per_token() / fp16_tok
    print(f"int8 cache, {n_q} prompts x {n_tok} greedy tokens ({time.perf_counter() - t:.0f} s): agreement "
          f"{100 * agree / total:.2f}% [>= 95%: {_verdict(agree / total >= 0.95)}], mean KL {kl / total:.5f} "
          f"[<= 0.02: {_verdict(kl / total <= 0.02)}], bytes/token {bpt:.3f}x fp16 [<= 0.55: {_verdict(bpt <= 0.55)}]"
          f" (plus a fixed {q8.recent}-token full-precision ring per slot); decode step of {n_q} rows: full cache "
          f"{1000 * t_full / (n_tok - 1):.1f} ms, int8 cache {1000 * t_q8 / (n_tok - 1):.1f} ms "
          f"({t_q8 / t_full:.2f}x the full cache's time)")

    if args.compile:
        from engine.llm.model import compile_decode

        compile_decode(model)
        cache.reset(0)
        with torch.inference_mode():
            model.prefill(cache, 0, prompt)
            t = time.perf_counter()
            for i in range(3):
                model.decode(cache, [0], [prompt[i]])
            print(f"torch.compile warm-up {time.perf_counter() - t:.1f} s")
            t = time.perf_counter()
            for i in range(steps):
                model.decode(cache, [0], [prompt[i % 32]])
            print(f"compiled decode step: {(time.perf_counter() - t) * 1000 / steps:.1f} ms/token")

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python: not installed (pip install -e '.[bench]'); the llama.cpp ratio is skipped")
    else:
        # same file, same 32-token prompt, n_new greedy tokens (EOS ignored: the count is fixed), prompt
        # evaluation included on both sides. llama.cpp runs alone in a child process, as its users run it:
        # measured in this process beside our loaded engine it ran 40-60 % slower here (31-50 vs 55-70 tok/s
        # in one session). Three rounds, alternating with ours, so that drift on a shared machine hits both.
        sq = _plain_service(m, prompt, 8)
        l_runs, o_runs, build, l_agg = [], [], "", None
        n_rounds = 1 if args.quick else 3
        for i in range(n_rounds):
            # the last round also runs the 8 streams' prompts as llama.cpp's own batch of 8 sequences
            got = _llama_cpp_tps(gguf, prompt, n_new, [r.prompt_ids for r in reqs] if i == n_rounds - 1 else None)
            if got is None:
                break
            lt, build, agg8 = got
            l_agg = agg8 if agg8 is not None else l_agg
            l_runs.append(lt)
            time.sleep(1)
            rq, o = _timed(sq, req)
            o_runs.append(o)
            time.sleep(1)
        if l_runs:
            l_tps, q_tps = sorted(l_runs)[len(l_runs) // 2], sorted(o_runs)[len(o_runs) // 2]
            _, q_agg = _concurrently(sq, reqs)
            r = q_tps / l_tps
            feats = [f.split("=")[0].strip() for f in build.replace("CPU :", "").split("|")
                     if f.strip().endswith("= 1")]
            print(f"llama.cpp build: {' '.join(feats)}" + ("" if (NATIVE / "llama_cpp").is_dir() else
                  " (the venv's AVX2 build; `make bench` builds a native one into build/llama-native)"))
            print(f"llama-cpp-python {llama_cpp.__version__} (same Q4_1 GGUF, {os.cpu_count()} threads, alone in a "
                  f"process) vs ours (activations: {m.extra.get('activations', 'fp32')}), drafting off, "
                  f"rounds: " + ", ".join(f"{lt:.1f} vs {o:.1f}" for lt, o in zip(l_runs, o_runs)) + " tok/s")
            print(f"median: llama.cpp {l_tps:.1f} tok/s, ours {q_tps:.1f} tok/s -> {r:.2f}x [target >= 1.0x: "
                  f"{_verdict(r >= 1.0)}]; 8 streams {q_agg:.1f} tok/s = {q_agg / q_tps:.2f}x our single stream "
                  f"[target >= 4x: {_verdict(q_agg / q_tps >= 4)}], {q_agg / l_tps:.2f}x llama.cpp's "
                  f"[target >= 3x: {_verdict(q_agg / l_tps >= 3)}]; with drafting (first line) "
                  f"{ours_tps / l_tps:.2f}x")
            if l_agg:
                print(f"llama.cpp's own 8 streams (the same 8 prompts as one batch of 8 sequences per llama_decode, "
                      f"its default context parameters): {l_agg:.1f} tok/s = {l_agg / l_tps:.2f}x its single stream; "
                      f"ours {q_agg:.1f} = {q_agg / l_agg:.2f}x that")
        sq.close()
        if l_runs and m.extra.get("activations") == "q8":
            m32 = load_llm("", cache_dir, activations="fp32")
            s32 = _plain_service(m32, prompt, 8)
            r32, t32 = _timed(s32, req)
            print(f"fp32 activations (models.llm_activations = fp32: transformers' network to float rounding), "
                  f"drafting off: {t32:.1f} tok/s = {t32 / l_tps:.2f}x llama.cpp; Q8 activations {q_tps / t32:.2f}x "
                  f"that")
            s32.close()
            del m32
        if l_runs and m.extra.get("activations") == "q8":
            # q8_fast: the Q4_1 matrices interleaved by 8 rows (not llama.cpp's bits); its single stream alternated
            # with ours (q8) twice more, then its 8 streams
            mf = load_llm("", cache_dir, activations="q8_fast")
            sf = _plain_service(mf, prompt, 8)
            sq = _plain_service(m, prompt, 8)
            f_runs, q2_runs = [], []
            for _ in range(1 if args.quick else 2):
                rf, tf = _timed(sf, req)
                f_runs.append(tf)
                q2_runs.append(_timed(sq, req)[1])
            _, f_agg = _concurrently(sf, reqs)
            tf, tq = max(f_runs), max(q2_runs)
            same = next((i for i, (a, b) in enumerate(zip(rf.token_ids, rq.token_ids)) if a != b), None)
            print(f"q8_fast (models.llm_activations = q8_fast: Q4_1 rows interleaved by 8, not llama.cpp's bits), "
                  f"drafting off, best of {len(f_runs)}: {tf:.1f} tok/s = {tf / tq:.2f}x q8's {tq:.1f} (same rounds), "
                  f"{tf / l_tps:.2f}x llama.cpp's median; 8 streams {f_agg:.1f} tok/s = {f_agg / tf:.2f}x its single "
                  f"stream, {f_agg / l_tps:.2f}x llama.cpp's; greedy tokens = q8's "
                  + ("all " + str(len(rf.token_ids)) if same is None else f"up to position {same}"))
            sf.close()
            sq.close()
            del mf
        gguf_bytes = gguf.stat().st_size
        if l_runs:
            print(f"weight bytes per token: ours {wbytes / 1e6:.1f} MB -> {q_tps * wbytes / 1e9:.1f} GB/s "
                  f"({100 * q_tps * wbytes / 1e9 / bw:.0f}% of the measured {bw:.1f} GB/s); llama.cpp "
                  f"~{gguf_bytes / 1e6:.1f} MB -> {l_tps * gguf_bytes / 1e9:.1f} GB/s "
                  f"({100 * l_tps * gguf_bytes / 1e9 / bw:.0f}%)")
    _gpu_section(cache_dir, prompt, n_new, args.quick)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


def _gpu_section(cache_dir: Path, prompt: list[int], n_new: int, quick: bool) -> None:
    """On a CUDA machine with Triton: the embedded GGUF with its blocks kept packed in GPU memory (the Triton
    weight-only products, `qweights.place_model`) against the same file de-quantised to fp16 at load: tokens/s
    of each, resident weight bytes, and how many greedy tokens agree with the CPU's fp32-activation path (--quick:
    the packed path only; the de-quantised one converts the file first, ~20 s)."""
    from engine.llm.batcher import GenerationRequest
    from engine.llm.load import load_llm
    from atelier_kernels._backend import triton_available

    if not torch.cuda.is_available() or not triton_available():
        print("GPU (packed weights on CUDA): no CUDA device with Triton here; skipped")
        return
    req = GenerationRequest(prompt, max_new_tokens=n_new, ignore_eos=True, reuse_prefix=False)
    ref = _plain_service(load_llm("", cache_dir, activations="fp32"), prompt, 1).generate(req).token_ids
    tps_of: dict[str, float] = {}
    for impl in ("triton",) if quick else ("triton", "dequant"):
        m = load_llm("", cache_dir, device="cuda", dtype=torch.float16, device_products=impl)
        svc = _plain_service(m, prompt, 8)
        r, tps = _timed(svc, req)
        same = next((i for i, (x, y) in enumerate(zip(r.token_ids, ref)) if x != y), len(ref))
        tps_of[impl] = tps
        print(f"GPU {impl:7s}: {tps:.1f} tok/s, weights {m.size_bytes() / 1e6:.1f} MB ({m.weights}); greedy "
              f"tokens equal to the CPU's fp32-activation path for the first {same} of {len(ref)}")
        svc.close()
        del m, svc
        torch.cuda.empty_cache()
    # the baseline: transformers' generate on the same GPU, the same file de-quantised to fp16 by transformers
    from transformers import AutoModelForCausalLM

    from engine.llm.load import embedded_gguf

    gguf = embedded_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16).to("cuda")
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True)
        torch.cuda.synchronize()
        hf_tps = n_new / (time.perf_counter() - t)
    got = out[0, len(prompt):].tolist()
    same = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), len(ref))
    print(f"GPU transformers fp16 generate: {hf_tps:.1f} tok/s; greedy tokens equal to the CPU's fp32-activation "
          f"path for the first {same} of {len(ref)}; ours (triton) / transformers = {tps_of['triton'] / hf_tps:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
