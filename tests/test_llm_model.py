"""Our decoder against transformers (the oracle): prefill logits and greedy tokens.

Tiny random Llama (GQA), Qwen2 (q/k/v bias) and GPT-2 models are built here
with a fixed seed and saved with save_pretrained; SmolLM2 (the embedded GGUF)
is compared with transformers' own GGUF loading (slow).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch




# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


from engine.llm.cache import FullCache  # noqa: E402
from engine.llm.load import EMBEDDED_FILE, embedded_gguf, load_llm, read_state, resolve_folder  # noqa: E402

CACHE = Path(os.environ.get("ATELIER_TEST_CACHE", "/tmp/atelier-test-cache"))


def _tiny(kind: str, folder: Path) -> Path:
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2, **common)
        model = T.GPT2LMHeadModel(cfg)
    elif kind == "qwen2":
        cfg = T.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                            tie_word_embeddings=True, **common)
        model = T.Qwen2ForCausalLM(cfg)
    else:
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                            tie_word_embeddings=False, **common)
        model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():  # biases are zero at init; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = _tiny(request.param, tmp_path_factory.mktemp(request.param))
    ours = load_llm(str(folder), CACHE)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, ours, ref


def _greedy(model, ids: list[int], n: int, max_len: int = 128, eos: tuple[int, ...] = ()) -> list[int]:
    a = model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, max_len)
    logits = model.prefill(cache, 0, ids)
    out = [int(logits.argmax())]
    for _ in range(n - 1):
        if out[-1] in eos:
            break
        out.append(int(model.decode(cache, [0], [out[-1]])[0].argmax()))
    return out


def _hf_greedy(ref, ids: list[int], n: int, stop_at_eos: bool = False) -> list[int]:
    extra = {} if stop_at_eos else {"min_new_tokens": n}
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, use_cache=True, **extra)
    return out[0, len(ids):].tolist()


def test_tiny_prefill_logits_match_transformers(tiny):
    kind, ours, ref = tiny
    assert ours.native, ours.note
    ids = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    a = ours.model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64)
    got = ours.model.prefill(cache, 0, ids, all_logits=True)
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-3, rtol=0), (got - want).abs().max()
    assert (got - want).abs().max() < 1e-4


def test_tiny_greedy_matches_transformers_generate(tiny):
    kind, ours, ref = tiny
    g = torch.Generator().manual_seed(2)
    for n_prompt in (1, 7, 19):
        ids = torch.randint(0, 256, (n_prompt,), generator=g).tolist()
        want = _hf_greedy(ref, ids, 32)
        assert len(set(want)) > 3, "degenerate oracle output"
        assert _greedy(ours.model, ids, 32) == want


def test_gqa_shapes_and_fused_weights(tiny):
    kind, ours, _ = tiny
    a = ours.model.args
    if kind == "gpt2":
        assert (a.n_heads, a.n_kv_heads, a.rope) == (4, 4, False)
    else:
        assert (a.n_heads, a.n_kv_heads, a.rope) == (4, 2, True)
        assert ours.model.layers[0].wqkv.weight.shape == ((4 + 2 * 2) * 16, 64)
        assert ours.model.layers[0].w13.weight.shape == (2 * 96, 64)
    assert (ours.model.layers[0].wqkv.bias is not None) == (kind in ("qwen2", "gpt2"))


def test_unsupported_architecture_falls_back_to_transformers(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, eos_token_id=None, bos_token_id=None)
    T.GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path)
    m = load_llm(str(tmp_path), CACHE)
    assert not m.native
    assert "gpt_neox" in m.note and "transformers" in m.note


def test_missing_model_folder_is_reported(tmp_path):
    from engine.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="models.llm"):
        load_llm(str(tmp_path / "nope"), CACHE)


# -- SmolLM2 (the embedded GGUF) -------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    assert gguf is not None and gguf.name == EMBEDDED_FILE
    # the GGUF's own blocks, kept packed (models.llm_weights = "auto"), against fp32 activations: the
    # de-quantised network (models.llm_activations = "fp32"; Q8 activations: test_q8_activations_llama_cpp.py)
    ours = load_llm("", CACHE, activations="fp32")
    assert ours.model.packed
    # the reference: transformers' own de-quantisation of the GGUF (`from_pretrained(gguf_file=...)`), whose
    # state dict `convert_gguf` saves unchanged as safetensors (the fallback for a GGUF our reader does not
    # take). Loading that folder takes 0.3 s; loading the GGUF through transformers again would take ~25 s.
    _, folder = resolve_folder("", CACHE)
    assert folder != gguf.parent and (folder / "model.safetensors").is_file()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(ours.folder)
    return ours, ref, ref_tok


@pytest.mark.slow
def test_fp32_weights_are_transformers_dequantisation_bit_for_bit(smol):
    """models.llm_weights = "fp32" on the GGUF: our reader's de-quantisation (`read_gguf(dequantise=True)`, ~1 s,
    where transformers' conversion took 20-35 s after a fresh install) gives every weight transformers' GGUF
    loader gives, bit for bit (q rows scaled by the attention scale, a power of two, as `build` folds it)."""
    from engine.llm.model import build

    ours = load_llm("", CACHE, weights="fp32")
    assert ours.native and not ours.model.packed and ours.extra["gguf"] == str(embedded_gguf())
    assert not (ours.folder / "model.safetensors").exists()  # no converted copy of the weights on disk
    _, folder = resolve_folder("", CACHE)
    ref = build(json.loads((folder / "config.json").read_text()), read_state(folder))
    assert ref.attn_scale == 1.0 and ours.model.attn_scale == 0.125
    want, got = ref.state_dict(), ours.model.state_dict()
    assert set(want) == set(got)
    a = ours.model.args
    nq = a.n_heads * a.head_dim
    for k, w in want.items():
        g = got[k]
        if k.endswith("wqkv.weight"):
            g = torch.cat([g[:nq] * 0.125, g[nq:]])
        assert torch.equal(g, w), k


@pytest.mark.slow
def test_converted_folder_is_complete(smol):
    _, _, ref_tok = smol
    _, folder = resolve_folder("", CACHE)  # the fallback: transformers' de-quantising conversion
    ours = load_llm(str(folder), CACHE)
    assert not ours.model.packed and ours.model.tok.weight.dtype == torch.float32
    files = {p.name for p in ours.folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not list(ours.folder.parent.glob("*.tmp-*")), "a temporary conversion folder was left behind"
    cfg = json.loads((ours.folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert ours.tokenizer.chat_template and "<|im_start|>" in ours.tokenizer.chat_template
    im_end = ours.tokenizer._tok.token_to_id("<|im_end|>")
    assert im_end in ours.eos_ids
    # the conversion shares one gguf-py reader and name map while it runs (engine.llm.load._gguf_parsed_once),
    # and puts gguf-py's own back afterwards
    import gguf
    import gguf.gguf_reader
    import gguf.tensor_mapping

    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map


@pytest.mark.slow
def test_smollm2_chat_template_and_tokens_match_transformers(smol):
    ours, _, ref_tok = smol
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about the sea"}]
    want = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.tokenizer.render_chat(msgs) == want
    assert ours.tokenizer.encode(want, add_special_tokens=False) == ref_tok(want, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_smollm2_prefill_logits_and_greedy_match_transformers(smol):
    ours, ref, _ = smol
    tok = ours.tokenizer
    prompts = ["Write a haiku about the sea", "What is the capital of France?", "List three colours."]
    for i, p in enumerate(prompts):
        ids = tok.encode(tok.render_chat([{"role": "user", "content": p}]), add_special_tokens=False)
        if i == 0:
            a = ours.model.args
            cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)
            got = ours.model.prefill(cache, 0, ids, all_logits=True)
            with torch.inference_mode():
                want = ref(torch.tensor([ids])).logits[0]
            assert (got - want).abs().max() < 1e-3
        want = _hf_greedy(ref, ids, 32, stop_at_eos=True)
        assert _greedy(ours.model, ids, 32, eos=tuple(ours.eos_ids)) == want, p


def test_numpy_step_is_the_default_on_cpu_fp32(tiny):
    _, ours, _ = tiny
    assert ours.model.blas == "numpy"


@pytest.fixture(params=["numba", "numpy"])
def cpu_kernels(request, monkeypatch):
    """The NumPy step with its Numba kernels, and with their NumPy fallbacks (no Numba installed)."""
    from atelier_kernels import cpu_decode

    if request.param == "numpy":
        monkeypatch.setattr(cpu_decode, "_kernels", lambda: None)
    else:
        assert cpu_decode.available()
    return request.param


def test_decode_step_logits_match_transformers_per_position(tiny, cpu_kernels):
    # the oracle: transformers' logits for the whole sequence in one forward; ours: prefill 1 token, then one
    # decode step per token, through the NumPy step and through the torch forward
    kind, ours, ref = tiny
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]  # [40, V]
    a = ours.model.args
    try:
        for backend in ("numpy", "torch"):
            ours.model.set_blas(backend)
            cache = FullCache(a.n_layers, 2, a.n_kv_heads, a.head_dim, 64)
            rows = [ours.model.prefill(cache, 1, ids[:1])]
            for t in ids[1:]:
                rows.append(ours.model.decode(cache, [1], [t])[0])
            got = torch.stack(rows)
            assert (got - want).abs().max() < 1e-4, (backend, (got - want).abs().max())
            assert cache.lengths == [0, 40]
    finally:
        ours.model.set_blas("numpy")


@pytest.mark.parametrize("slots", [(0, 2, 3), (1, 2, 3)], ids=["gathered", "contiguous"])
def test_numpy_step_batched_rows_at_different_lengths(tiny, slots, cpu_kernels):
    # three sequences of different lengths decoded together equal each decoded alone (transformers as oracle),
    # whichever slots they hold
    kind, ours, ref = tiny
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 9)]
    a = ours.model.args
    cache = FullCache(a.n_layers, 4, a.n_kv_heads, a.head_dim, 64)
    nxt = []
    for slot, p in zip(slots, prompts):
        nxt.append(int(ours.model.prefill(cache, slot, p).argmax()))
    seqs = [p + [t] for p, t in zip(prompts, nxt)]
    for _ in range(6):
        logits = ours.model.decode(cache, list(slots), [s[-1] for s in seqs])
        for s, row in zip(seqs, logits):
            with torch.inference_mode():
                want = ref(torch.tensor([s])).logits[0, -1]
            assert (row - want).abs().max() < 1e-4
            s.append(int(row.argmax()))
    assert [cache.lengths[i] for i in slots] == [len(s) - 1 for s in seqs]


def test_numpy_step_refuses_a_full_cache():
    from engine.llm.npstep import NumpyStep

    cfg = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24, "max_position_embeddings": 8}
    from engine.llm.model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf(cfg)).eval()
    step = NumpyStep(model)
    cache = FullCache(1, 1, 1, 8, 4)
    cache.lengths[0] = 4
    with pytest.raises(ValueError, match="exceed the cache length"):
        step(cache, [0], [1])


def test_extend_logits_match_transformers(tiny, cpu_kernels):
    # extend (draft verification, short prompts) appends several tokens at once; every position's logits
    # equal transformers'
    kind, ours, ref = tiny
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    a = ours.model.args
    try:
        for backend in ("numpy", "torch"):
            ours.model.set_blas(backend)
            cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64)
            first = ours.model.prefill(cache, 0, ids[:11], all_logits=True)
            rest = [ours.model.extend(cache, 0, ids[11:16]), ours.model.extend(cache, 0, ids[16:17]),
                    ours.model.extend(cache, 0, ids[17:])]
            got = torch.cat([first] + rest)
            assert (got - want).abs().max() < 1e-4, (backend, (got - want).abs().max())
            assert cache.lengths[0] == 30
    finally:
        ours.model.set_blas("numpy")


def test_numpy_step_on_the_int8_cache_equals_the_torch_forward(tiny, cpu_kernels):
    # the int8 cache (ring of 8 recent tokens, older ones int8) filled and read by the NumPy step gives the
    # torch forward's logits on its own int8 cache, and leaves the same cache contents: prompts shorter and
    # longer than the ring, a prompt extended in two parts (ring entries evicted by a multi-token write), and
    # batched decode steps of three slots at different lengths. The torch side's int8 cache is itself checked
    # against quantise-dequantise of a full cache in test_llm_cache.py; transformers' full-precision logits
    # bound both here (int8 keys and values move the logits a little, never a lot).
    from engine.llm.cache import Int8Cache

    kind, ours, ref = tiny
    a = ours.model.args
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 12)]
    caches, logits = {}, {}
    try:
        for backend in ("numpy", "torch"):
            ours.model.set_blas(backend)
            assert ours.model._numpy_step_for(Int8Cache(1, 1, 1, 8, 8)) is (None if backend == "torch" else
                                                                            ours.model._np_step)
            cache = caches[backend] = Int8Cache(a.n_layers, 3, a.n_kv_heads, a.head_dim, 64, recent=8)
            rows = [ours.model.prefill(cache, 0, prompts[0]), ours.model.prefill(cache, 1, prompts[1])]
            ours.model.prefill(cache, 2, prompts[2][:5])
            rows.append(ours.model.extend(cache, 2, prompts[2][5:])[-1])
            seqs = [p + [int(r.argmax())] for p, r in zip(prompts, rows)]
            out = [torch.stack(rows)]
            for _ in range(12):
                step = ours.model.decode(cache, [0, 1, 2], [s[-1] for s in seqs])
                out.append(step)
                for s, r in zip(seqs, step):
                    s.append(int(r.argmax()))
            logits[backend] = (torch.stack(out), seqs)
            assert cache.lengths == [len(s) - 1 for s in seqs]
    finally:
        ours.model.set_blas("numpy")
    (got, seq_np), (want, seq_t) = logits["numpy"], logits["torch"]
    cn, ct = caches["numpy"], caches["torch"]
    dq = torch.cat([(cn.qk.int() - ct.qk.int()).flatten(), (cn.qv.int() - ct.qv.int()).flatten()]).abs()
    print(f"int8 entries one unit apart: {int((dq == 1).sum())} of {dq.numel()}; "
          f"logits max diff {float((got - want).abs().max()):.2e}")
    assert seq_np == seq_t
    assert dq.max() <= 1  # a K or V value at a rounding tie may round the other way after fp32 noise
    assert int((dq == 1).sum()) <= 4  # ... which is rare (a systematic difference would move many)
    # 1e-4 is the fp32 agreement of the two paths on a full cache; a value one int8 unit apart (1/254 of its
    # row's largest) moves this tiny random model's logits by up to ~1e-2 (measured: 5.6e-3 for one such entry,
    # on an AMD Zen 4)
    assert (got - want).abs().max() < (1e-4 if dq.max() == 0 else 2e-2), (got - want).abs().max()
    for x, y in ((cn.sk, ct.sk), (cn.sv, ct.sv), (cn.rk, ct.rk), (cn.rv, ct.rv)):  # scales and rings: fp32 noise
        assert (x - y).abs().max() <= 1e-5 * y.abs().max(), ((x - y).abs().max(), y.abs().max())
    with torch.inference_mode():  # the full-precision oracle, on the tokens both paths chose
        full = torch.stack([ref(torch.tensor([s[:-1]])).logits[0, -13:] for s in seq_np], 1)  # [13, 3, V]
    assert (got - full).abs().max() < 0.05 * full.abs().max(), ((got - full).abs().max(), full.abs().max())


def test_numpy_step_leaves_exact_gelu_gpt2_to_torch():
    # the NumPy step implements the tanh GELU only; a GPT-2 with the exact GELU keeps the torch forward
    from engine.llm.model import ModelArgs, Transformer

    cfg = {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 8,
           "activation_function": "gelu"}
    model = Transformer(ModelArgs.from_hf(cfg)).eval()
    assert model.set_blas("numpy").blas == "torch"
    cfg["activation_function"] = "gelu_new"
    assert Transformer(ModelArgs.from_hf(cfg)).eval().set_blas("numpy").blas == "numpy"


# -- sampling defaults: the tool's repetition penalty keeps natural answers and stops loops ------------
SHORT_FACTUAL = ["What is the capital of France? Answer in one word.", "What is 2 + 2?", "Who wrote Romeo and Juliet?",
                 "What colour is the sky on a clear day?", "How many days are in a week?",
                 "What is the largest planet in our solar system?", "What is the boiling point of water in Celsius?",
                 "Translate 'thank you' into French.", "What is the chemical symbol for gold?",
                 "Name the first month of the year.", "What is the square root of 81?", "Which animal says 'moo'?"]
LONG_OUTPUT = ["Write a poem about the ocean with many verses.", "Write a song with a chorus that repeats.",
               "Write the rules of a board game you invent.", "Write a recipe for chocolate cake with all steps."]


def _repeated_4grams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


@pytest.mark.slow
def test_default_repetition_penalty_keeps_short_answers_and_stops_loops(smol):
    """The tool's defaults (penalty 1.1 on the model's own last 64 tokens, from a token's third use) against
    transformers' greedy output with no penalty: a dozen short factual prompts answer as without a penalty
    (transformers' own convention, penalty over the prompt too, spoils most of them); long outputs that loop
    without a penalty do not loop with the default."""
    from engine.llm.batcher import GenerationRequest, LLMService
    from engine.llm.sampling import SamplingParams

    ours, ref, _ = smol
    tok = ours.tokenizer
    eos = set(ours.eos_ids)
    # our requests run 8 at a time through the batcher (as concurrent clients would): a row's greedy tokens
    # are the same alone or in a batch (test_llm_batcher's alone-equals-batch tests), in a fraction of the time
    svc = LLMService(lambda: ours, max_slots=8, max_len=512)
    try:
        default = SamplingParams(repetition_penalty=1.1)  # the tool's defaults: window 64, scope "generated"
        transformers_style = SamplingParams(repetition_penalty=1.1, repetition_window=0, repetition_scope="all")
        chat = [tok.encode(tok.render_chat([{"role": "user", "content": p}]), add_special_tokens=False)
                for p in SHORT_FACTUAL + LONG_OUTPUT]
        short, long_ = chat[:len(SHORT_FACTUAL)], chat[len(SHORT_FACTUAL):]
        reqs = ([GenerationRequest(ids, 16, default) for ids in short]
                + [GenerationRequest(ids, 16, transformers_style) for ids in short]
                + [GenerationRequest(ids, 72, SamplingParams(repetition_penalty=1.0)) for ids in long_]
                + [GenerationRequest(ids, 72, default) for ids in long_])
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(svc.generate, reqs))
        n = len(short)
        same = spoiled = 0
        for i, (p, ids) in enumerate(zip(SHORT_FACTUAL, short, strict=True)):
            want = [t for t in _hf_greedy(ref, ids, 16, stop_at_eos=True) if t not in eos]
            got = [t for t in results[i].token_ids if t not in eos]
            old = [t for t in results[n + i].token_ids if t not in eos]
            first = tok.decode(want).split(". ")[0]
            assert tok.decode(got).startswith(first), (p, tok.decode(got), tok.decode(want))  # the answer itself
            same += got == want
            spoiled += not tok.decode(old).startswith(first)
        assert same >= 10, same  # all 16 tokens identical (measured: 11 of 12; the 12th differs after the answer)
        assert spoiled >= 6, spoiled  # what the old default (transformers' convention) did (measured: 10 of 12)
        loops_off = [_repeated_4grams(r.text) for r in results[2 * n:2 * n + len(long_)]]
        loops_default = [_repeated_4grams(r.text) for r in results[2 * n + len(long_):]]
        assert max(loops_off) >= 0.25, loops_off  # without a penalty the 135M model loops
        assert max(loops_default) <= 0.08, loops_default  # with the default it does not
    finally:
        svc.close()
