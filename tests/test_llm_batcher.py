"""Continuous batching: batch-invariant greedy output, joining at step boundaries, seeded sampling,
cancellation and failures that free their slot; sampling against transformers' logits processors."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.errors import InvalidInput
from engine.llm.batcher import CacheSpec, GenerationRequest, LLMService
from engine.llm.load import load_llm
from engine.llm.sampling import SamplingParams, apply_repetition_penalty, sample
from engine.scheduler import CancelToken

from tests.helpers import tiny_llama_folder

CACHE = Path(os.environ.get("ATELIER_TEST_CACHE", "/tmp/atelier-test-cache"))


# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_llm(str(tiny_llama_folder(tmp_path_factory.mktemp("llama"), max_positions=256)), CACHE)

def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _concurrently(svc: LLMService, reqs: list[GenerationRequest]):
    out: list = [None] * len(reqs)

    def run(i: int) -> None:
        try:
            out[i] = svc.generate(reqs[i])
        except BaseException as exc:  # surfaced by the assertion below
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in out:
        assert not isinstance(r, BaseException), r
    return out


def _mixed(prompts: list[list[int]], n: int) -> list[GenerationRequest]:
    reqs = []
    for i, p in enumerate(prompts):
        sp = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i)
        reqs.append(GenerationRequest(p, max_new_tokens=n + 3 * i, sampling=sp, reuse_prefix=False,
                                      cache=CacheSpec("int8") if i == 3 else CacheSpec()))
    return reqs


def test_greedy_alone_equals_greedy_inside_a_batch_of_8(tiny, monkeypatch):
    svc = LLMService(lambda: tiny, max_slots=8, max_len=128)
    try:
        prompts = [_ids(3 + 5 * i, 10 + i) for i in range(8)]
        reqs = _mixed(prompts, 20)
        alone = [svc.generate(r) for r in reqs]
        steps_before = svc.steps
        # the tiny model's step takes well under a millisecond: paced to 5 ms, the eight threads' requests all
        # arrive while the first ones decode, however the threads are scheduled (a loaded run once batched
        # them late: 148 steps for 244 tokens)
        real = tiny.model.decode

        def paced(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            time.sleep(0.005)
            return real(*a, **kw)

        monkeypatch.setattr(tiny.model, "decode", paced)
        together = _concurrently(svc, reqs)
        for i in range(0, 8, 2):  # the greedy ones
            assert together[i].token_ids == alone[i].token_ids, i
            assert len(together[i].token_ids) == 20 + 3 * i
        # the batch really ran together: far fewer decode steps than tokens
        tokens = sum(r.completion_tokens for r in together)
        assert svc.steps - steps_before < tokens * 0.6
        assert svc.stats()["active"] == 0
    finally:
        svc.close()


def test_seeded_sampling_is_reproducible(tiny):
    svc = LLMService(lambda: tiny, max_slots=2, max_len=128)
    try:
        p = _ids(6, 1)
        sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=1234)
        a = svc.generate(GenerationRequest(p, 40, sp))
        b = svc.generate(GenerationRequest(p, 40, sp))
        c = svc.generate(GenerationRequest(p, 40, SamplingParams(temperature=1.0, top_k=50, top_p=0.95,
                                                                 repetition_penalty=1.2, seed=99)))
        assert a.token_ids == b.token_ids
        assert a.token_ids != c.token_ids
    finally:
        svc.close()


def test_cancel_mid_generation_frees_the_slot(tiny, monkeypatch):
    svc = LLMService(lambda: tiny, max_slots=1, max_len=256)
    try:
        token = CancelToken()
        calls = {"n": 0}

        def counted(real):  # noqa: ANN001, ANN202 - the client cancels during the model's third call
            def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
                calls["n"] += 1
                if calls["n"] == 3:
                    token.cancel("test")
                return real(*a, **kw)
            return call

        # cancelled from inside the decode loop (not from the progress callback, which a fast machine may
        # call only once the 200 tokens are done): the cancellation is seen at the next step
        for name in ("decode", "extend"):
            monkeypatch.setattr(tiny.model, name, counted(getattr(tiny.model, name)))
        r = svc.generate(GenerationRequest(_ids(5, 2), max_new_tokens=200), token)
        monkeypatch.undo()
        assert r.finish_reason == "cancelled"
        assert 1 <= r.completion_tokens < 200
        assert svc.stats()["pools"]["full"]["busy"] == 0
        ok = svc.generate(GenerationRequest(_ids(5, 3), max_new_tokens=5))  # the only slot is free again
        assert ok.finish_reason == "length" and ok.completion_tokens == 5
        # cancelled before it starts: no slot taken
        t2 = CancelToken()
        t2.cancel()
        r2 = svc.generate(GenerationRequest(_ids(5, 4), max_new_tokens=5), t2)
        assert r2.finish_reason == "cancelled" and r2.completion_tokens == 0
    finally:
        svc.close()


def test_a_failed_request_does_not_leak_its_slot(tiny, monkeypatch):
    svc = LLMService(lambda: tiny, max_slots=1, max_len=128)
    try:
        calls = {"n": 0}
        real = tiny.model.decode

        def broken(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real(*a, **kw)

        monkeypatch.setattr(tiny.model, "decode", broken)
        with pytest.raises(RuntimeError, match="boom"):
            svc.generate(GenerationRequest(_ids(4, 5), max_new_tokens=10))
        monkeypatch.setattr(tiny.model, "decode", real)
        assert svc.stats()["pools"]["full"]["busy"] == 0
        assert svc.generate(GenerationRequest(_ids(4, 5), max_new_tokens=10)).completion_tokens == 10
    finally:
        svc.close()


def test_bad_requests_name_the_argument(tiny):
    svc = LLMService(lambda: tiny, max_slots=1, max_len=64)
    try:
        cases = [(GenerationRequest([], 4), "prompt"),
                 (GenerationRequest([1], 0), "max_new_tokens"),
                 (GenerationRequest([1], 4, SamplingParams(temperature=-1)), "temperature"),
                 (GenerationRequest([1], 4, SamplingParams(top_p=0)), "top_p"),
                 (GenerationRequest([1], 4, SamplingParams(top_k=10**6)), "top_k"),
                 (GenerationRequest([1], 4, SamplingParams(repetition_penalty=0)), "repetition_penalty"),
                 (GenerationRequest(_ids(64, 1), 4), "prompt"),
                 (GenerationRequest([1], 4, cache=CacheSpec("window", 32, 20)), "sink_tokens")]
        for req, arg in cases:
            with pytest.raises(InvalidInput) as ei:
                svc.generate(req)
            assert ei.value.argument == arg
    finally:
        svc.close()


# -- sampling against transformers' processors -------------------------------------------
def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([3, 7, 7, 20, 49])
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen.view(1, -1), logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits[0], seen, 1.3), want[0])


def test_top_k_top_p_support_matches_transformers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, generator=g) * 3
    for k, p in ((10, 1.0), (0, 0.7), (25, 0.5)):
        x = logits.clone().view(1, -1)
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(None, x)
        allowed = set(torch.nonzero(torch.isfinite(x[0])).view(-1).tolist())
        gen = torch.Generator().manual_seed(1)
        drawn = {sample(logits, SamplingParams(temperature=1.0, top_k=k, top_p=p), gen) for _ in range(300)}
        assert drawn <= allowed
        assert len(drawn) >= min(len(allowed), 3)


def test_greedy_is_argmax_lowest_index_on_ties():
    x = torch.tensor([0.0, 2.0, 5.0, 5.0, 1.0])
    assert sample(x, SamplingParams(), None) == 2


# -- SmolLM2: alone vs inside a batch of 8 ------------------------------------------------------
@pytest.mark.slow
def test_smollm2_alone_equals_batch_of_8():
    m = load_llm("", CACHE)
    tok = m.tokenizer
    svc = LLMService(lambda: m, max_slots=8, max_len=512)
    try:
        qs = ["Write a haiku about the sea", "What is the capital of France?", "Explain gravity to a child.",
              "List three fruits.", "Tell me a joke about cats.", "How do I boil an egg?", "What is 2+2?",
              "Name a famous painter."]
        prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)
                   for q in qs]
        reqs = _mixed(prompts, 16)
        alone = [svc.generate(reqs[i]) for i in range(0, 8, 2)]
        together = _concurrently(svc, reqs)
        for j, i in enumerate(range(0, 8, 2)):
            assert together[i].token_ids == alone[j].token_ids, qs[i]
    finally:
        svc.close()


def test_prompt_lookup_drafts_keep_greedy_output_exact(tiny, monkeypatch):
    import engine.llm.batcher as batcher

    assert batcher._lookup([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # the 3-gram [1, 2, 3] was followed by 9, 1
    assert batcher._lookup([5, 6, 7], 3) == []
    p = _ids(12, 8)
    plain = LLMService(lambda: tiny, max_slots=1, max_len=256, speculate=False)
    try:
        want = plain.generate(GenerationRequest(p, max_new_tokens=60)).token_ids
    finally:
        plain.close()

    def drafts(ctx: list[int], k: int) -> list[int]:
        # a random model rarely repeats itself, so draft the true continuation with its 3rd token wrong:
        # every verification then accepts 2 tokens and must roll the cache back past the rejected ones
        done = len(ctx) - len(p)
        d = want[done:done + k]
        if len(d) >= 3:
            d[2] = (d[2] + 1) % 256
        return d

    monkeypatch.setattr(batcher, "_lookup", drafts)
    svc = LLMService(lambda: tiny, max_slots=2, max_len=256)
    try:
        got = svc.generate(GenerationRequest(p, max_new_tokens=60))
        assert got.token_ids == want and got.completion_tokens == 60
        assert svc.spec_accepted > 30 and svc.spec_drafted > svc.spec_accepted
        assert svc.steps < 30  # far fewer forwards than tokens
        monkeypatch.undo()
        # the cache was rolled back past rejected drafts: a follow-up that reuses it is still exact
        follow = p + got.token_ids + [7, 7]
        r1 = svc.generate(GenerationRequest(follow, max_new_tokens=20))
        assert r1.reused_tokens == len(p) + 59
        r2 = svc.generate(GenerationRequest(follow, max_new_tokens=20, reuse_prefix=False))
        assert r1.token_ids == r2.token_ids
    finally:
        svc.close()


def test_a_long_prompt_is_prefilled_in_pieces_between_the_running_streams_steps(tiny, monkeypatch):
    """A prompt longer than PREFILL_PIECE is prefilled a piece per round, with the running streams' decode
    steps between the pieces (before, the whole prompt ran before their next step: a 1500-token prompt stalled
    them 3.8 s on 2 cores); its tokens and the running stream's are those of each request alone with the
    prompt prefilled whole; a cancel between two pieces frees the slot."""
    import engine.llm.batcher as batcher

    long_p, short_p = _ids(45, 21), _ids(5, 22)
    whole = LLMService(lambda: tiny, max_slots=2, max_len=128, speculate=False)
    try:  # the references: the prompts prefilled whole (one piece), each request alone
        want_long = whole.generate(GenerationRequest(long_p, max_new_tokens=12)).token_ids
        want_short = whole.generate(GenerationRequest(short_p, max_new_tokens=60)).token_ids
    finally:
        whole.close()
    monkeypatch.setattr(batcher, "PREFILL_PIECE", 8)
    events: list[str] = []
    real_prefill, real_decode = tiny.model.prefill, tiny.model.decode

    def prefill(cache, slot, ids, start=0, **kw):  # noqa: ANN001, ANN003, ANN202
        events.append(f"p{len(ids)}")
        return real_prefill(cache, slot, ids, start, **kw)

    def decode(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        events.append("d")
        time.sleep(0.002)  # the tiny model's step is far under a millisecond: the long request arrives mid-stream
        return real_decode(*a, **kw)

    monkeypatch.setattr(tiny.model, "prefill", prefill)
    monkeypatch.setattr(tiny.model, "decode", decode)
    svc = LLMService(lambda: tiny, max_slots=2, max_len=128, speculate=False)
    try:
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("short", svc.generate(
            GenerationRequest(short_p, max_new_tokens=60))))
        t.start()
        while events.count("d") < 5:
            time.sleep(0.001)
        got_long = svc.generate(GenerationRequest(long_p, max_new_tokens=12))
        t.join(60)
        assert got_long.token_ids == want_long and out["short"].token_ids == want_short
        pieces = [i for i, e in enumerate(events) if e.startswith("p") and i > 0]
        assert [events[i] for i in pieces] == ["p8"] * 5 + ["p5"]  # 45 tokens: 5 pieces of 8, then 5
        assert all("d" in events[a:b] for a, b in zip(pieces, pieces[1:]))  # a decode step between two pieces

        # cancelled between two pieces: no token, the slot freed
        token = CancelToken()
        n0 = len(events)

        def cancelling(cache, slot, ids, start=0, **kw):  # noqa: ANN001, ANN003, ANN202
            if sum(e.startswith("p") for e in events[n0:]) == 1:  # while the second piece runs
                token.cancel("test")
            return prefill(cache, slot, ids, start, **kw)

        monkeypatch.setattr(tiny.model, "prefill", cancelling)
        r = svc.generate(GenerationRequest(long_p, max_new_tokens=12, reuse_prefix=False), token)
        assert r.finish_reason == "cancelled" and r.completion_tokens == 0
        assert sum(e.startswith("p") for e in events[n0:]) == 2  # no third piece
        assert svc.stats()["pools"]["full"]["busy"] == 0
    finally:
        svc.close()
