"""KV caches: int8 (vs quantise-dequantise of the full cache, and quality on SmolLM2), window
(StreamingLLM bookkeeping, exactness before the window fills, bounded memory past the context),
and prefix reuse (identical greedy output)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch




# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


from engine.llm.batcher import CacheSpec, GenerationRequest, LLMService  # noqa: E402
from engine.llm.cache import FullCache, Int8Cache, WindowCache  # noqa: E402
from engine.llm.load import load_llm  # noqa: E402
from atelier_kernels.kv_quant import dequantize_reference, quantize_reference  # noqa: E402

from tests.helpers import tiny_llama_folder  # noqa: E402

CACHE = Path(os.environ.get("ATELIER_TEST_CACHE", "/tmp/atelier-test-cache"))
L_, KVH, HD = 2, 3, 16


def _write(cache, slot: int, start: int, k: torch.Tensor, v: torch.Tensor):
    """Write k, v [KVH, S, hd] at positions start.. of slot through the public plan/update/commit path."""
    plan = cache.plan([slot], [start], k.shape[1])
    out = [cache.update(layer, plan, k[None], v[None]) for layer in range(L_)]
    cache.commit(plan)
    return plan, out


def test_int8_cache_holds_quantised_history_and_exact_recent_tokens():
    g = torch.Generator().manual_seed(0)
    full = FullCache(L_, 2, KVH, HD, 96)
    q8 = Int8Cache(L_, 2, KVH, HD, 96, recent=8)
    hist = {0: [], 1: []}
    # slot 0: a long prefill then decode steps; slot 1: short chunks crossing the ring boundary
    for slot, chunks in ((0, [30, 1, 1, 1]), (1, [3, 5, 4, 1, 9])):
        pos = 0
        for n in chunks:
            k = torch.randn(KVH, n, HD, generator=g) * 4
            v = torch.randn(KVH, n, HD, generator=g)
            _write(full, slot, pos, k, v)
            _, out = _write(q8, slot, pos, k, v)
            hist[slot].append((k, v))
            pos += n
            K, V = out[-1][0][0], out[-1][1][0]  # [KVH, T, hd] of the last layer
            kf = torch.cat([c[0] for c in hist[slot]], dim=1)
            vf = torch.cat([c[1] for c in hist[slot]], dim=1)
            old = max(pos - 8, 0)
            assert K.shape == (KVH, pos, HD)
            torch.testing.assert_close(K[:, old:], kf[:, old:], rtol=0, atol=0)  # the recent ring: exact
            torch.testing.assert_close(V[:, old:], vf[:, old:], rtol=0, atol=0)
            if old:
                qk, sk = quantize_reference(kf[:, :old])
                torch.testing.assert_close(K[:, :old], dequantize_reference(qk, sk), rtol=1e-6, atol=1e-6)
                qv, sv = quantize_reference(vf[:, :old])
                torch.testing.assert_close(V[:, :old], dequantize_reference(qv, sv), rtol=1e-6, atol=1e-6)
    # batched decode over both slots (different lengths) reads the same values as per-slot reads
    k = torch.randn(2, KVH, 1, HD, generator=g)
    plan = q8.plan([0, 1], [q8.lengths[0], q8.lengths[1]], 1)
    K, _ = q8.update(0, plan, k, k)
    assert K.shape[2] == max(q8.lengths) + 1
    assert plan.mask is not None and plan.mask.shape == (2, 1, 1, K.shape[2])


def test_int8_bytes_per_token_at_most_055_of_fp16():
    c = Int8Cache(30, 2, 3, 64, 256)
    fp16_per_token = 2 * 30 * 3 * 64 * 2
    assert c.bytes_per_token() <= 0.55 * fp16_per_token
    # the accounting matches the tensors actually allocated (int8 values + fp32 scales)
    per_token_storage = sum(t.numel() * t.element_size() for t in (c.qk, c.qv, c.sk, c.sv)) / (2 * 256)
    assert per_token_storage == c.bytes_per_token()


def test_window_cache_keeps_sinks_and_recent_tokens_with_cache_positions():
    W, S = 12, 3
    R = W - S
    wc = WindowCache(L_, 1, KVH, HD, W, S)
    for n in (5, 9):  # prefill 5 then 9 tokens (total 14 > W: wraps)
        start = wc.lengths[0]
        k = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).expand(KVH, n, HD).contiguous()
        plan, out = _write(wc, 0, start, k, k)
    total = 14
    K = out[0][0][0]  # [KVH, W, hd] unrotated: value = absolute position
    held = sorted(int(x) for x in K[0, :, 0])
    assert held == list(range(S)) + list(range(total - R, total))
    # rotary positions inside the cache: sinks 0..S-1, ring in chronological order S..W-1
    ab = K[0, :, 0].long()
    want = torch.where(ab < S, ab, S + ab - (total - R))
    assert torch.equal(plan.k_rope_pos[0], want)
    assert sorted(plan.k_rope_pos[0].tolist()) == list(range(W))
    # queries of the last chunk sit at the ring's positions, causal inside the chunk
    assert plan.rope_pos[0, -1].item() == W - 1
    m = plan.mask[0, 0]  # [S_new, W]
    for i, q_abs in enumerate(range(total - 9, total)):
        assert m[i].tolist() == [int(p) <= q_abs for p in ab.tolist()]
    with pytest.raises(ValueError, match="chunk"):
        wc.plan([0], [total], R + 1)


# -- with a model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_llm(str(tiny_llama_folder(tmp_path_factory.mktemp("llama"), max_positions=64)), CACHE)

def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_window_equals_full_cache_until_the_window_fills(tiny_llama):
    svc = LLMService(lambda: tiny_llama, max_slots=2, max_len=64)
    try:
        ids = _ids(10, 1)
        full = svc.generate(GenerationRequest(ids, max_new_tokens=20))
        win = svc.generate(GenerationRequest(ids, max_new_tokens=20, cache=CacheSpec("window", 32, 4)))
        assert win.token_ids == full.token_ids
    finally:
        svc.close()


def test_window_generates_past_the_context_in_constant_memory(tiny_llama):
    svc = LLMService(lambda: tiny_llama, max_slots=1, max_len=64)
    try:
        spec = CacheSpec("window", 24, 4)
        long_prompt = _ids(150, 2)  # longer than the model's 64 positions and the window: chunked prefill
        r = svc.generate(GenerationRequest(long_prompt, max_new_tokens=100, cache=spec))
        assert r.completion_tokens == 100 and r.finish_reason == "length"
        bytes_before = svc.cache_bytes()
        r2 = svc.generate(GenerationRequest(_ids(5, 3), max_new_tokens=200, cache=spec))
        assert r2.completion_tokens == 200
        assert svc.cache_bytes() == bytes_before  # nothing grew
        assert r2.cache_bytes == 2 * 2 * 2 * 24 * 16 * 4  # layers * (k, v) * kv_heads * window * hd * fp32
        # the full cache refuses the same prompt: it is longer than the context
        from engine.errors import InvalidInput

        with pytest.raises(InvalidInput, match="prompt"):
            svc.generate(GenerationRequest(long_prompt, max_new_tokens=4))
    finally:
        svc.close()


def test_prefix_reuse_gives_identical_greedy_output(tiny_llama):
    svc = LLMService(lambda: tiny_llama, max_slots=2, max_len=64)
    try:
        system = _ids(20, 4)
        first = svc.generate(GenerationRequest(system + _ids(3, 5), max_new_tokens=5))
        assert first.reused_tokens == 0
        follow = system + _ids(3, 5) + first.token_ids + _ids(4, 6)
        reused = svc.generate(GenerationRequest(follow, max_new_tokens=12))
        # the earlier prompt and all but the last generated token (never fed back) are reused
        assert reused.reused_tokens == 23 + len(first.token_ids) - 1
        fresh = svc.generate(GenerationRequest(follow, max_new_tokens=12, reuse_prefix=False))
        assert fresh.reused_tokens == 0
        assert reused.token_ids == fresh.token_ids
        other = svc.generate(GenerationRequest(system + _ids(6, 7), max_new_tokens=12))
        assert other.reused_tokens == 20
        ref = svc.generate(GenerationRequest(system + _ids(6, 7), max_new_tokens=12, reuse_prefix=False))
        assert other.token_ids == ref.token_ids
    finally:
        svc.close()


# -- int8 quality on SmolLM2 (the acceptance numbers) --------------------------------
@pytest.mark.slow
def test_int8_cache_quality_on_smollm2():
    """The issue's thresholds (>= 95% agreement, mean KL <= 0.02) on 10 prompts x 160 greedy tokens,
    teacher-forced on the full-cache greedy tokens (one early disagreement does not misalign the rest).
    The issue's full size (10 x 256) runs in benchmarks/text_bench.py; it took ~3 minutes here."""
    # fp32 weights: this measures the cache, not the weights. Both caches are filled and read by the NumPy
    # decode step (engine.llm.npstep; its int8 path equals the torch forward's, test_llm_model.py)
    m = load_llm("", CACHE, weights="fp32")
    tok, model = m.tokenizer, m.model
    a = model.args
    topics = ["the sea", "a city at night", "how vaccines work", "the history of Rome", "baking bread",
              "black holes", "learning to code", "a walk in the forest", "the moon landing", "chess strategy"]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": f"Write a long essay about {t}."}]),
                          add_special_tokens=False) for t in topics]
    n_new, B = 160, len(prompts)
    max_len = max(len(p) for p in prompts) + n_new + 1
    full = FullCache(a.n_layers, B, a.n_kv_heads, a.head_dim, max_len)
    q8 = Int8Cache(a.n_layers, B, a.n_kv_heads, a.head_dim, max_len)
    toks = []
    lp_full, lp_q8 = [], []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            lf = model.prefill(full, i, p)
            lq = model.prefill(q8, i, p)
            lp_full.append(lf.log_softmax(-1))
            lp_q8.append(lq.log_softmax(-1))
            toks.append(int(lf.argmax()))
        agree = total = 0
        kl_sum = 0.0
        cur = torch.tensor(toks)
        for _ in range(n_new - 1):
            lf = model.decode(full, list(range(B)), cur.tolist()).log_softmax(-1)
            lq = model.decode(q8, list(range(B)), cur.tolist()).log_softmax(-1)
            nxt = lf.argmax(-1)
            agree += int((lq.argmax(-1) == nxt).sum())
            total += B
            kl_sum += float((lf.exp() * (lf - lq)).sum(-1).sum())
            cur = nxt
    agreement, mean_kl = agree / total, kl_sum / total
    print(f"int8 agreement {agreement:.4f}, mean KL {mean_kl:.5f}")
    assert min(full.lengths) > 128 + 48  # tokens really went through the int8 path
    assert agreement >= 0.95
    assert mean_kl <= 0.02
