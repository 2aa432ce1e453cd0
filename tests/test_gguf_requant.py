"""GGUF block types we do not compute packed (the IQ1 / IQ2 / IQ3 types, TQ1_0 / TQ2_0, MXFP4) re-quantised to
Q8_0 at load (issue 13): before, one such tensor sent the whole file to transformers' de-quantising conversion
(fp32, ~10x the file's bytes). Oracles: `gguf.quants.dequantize` (the gguf package's own decoding of each type)
for every re-quantised block, and transformers' de-quantising GGUF loader for the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")

import gguf  # noqa: E402
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402

from engine.llm.cache import FullCache  # noqa: E402
from engine.llm.gguf_load import (CorruptGGUF, read_gguf, requant_cache_file, requantisable)  # noqa: E402
from engine.llm.load import ModelUnavailable, load_llm  # noqa: E402
from engine.llm.qweights import weight_formats, quantize_blocks  # noqa: E402

D, H, KVH, HD, INTER, LAYERS, VOCAB = 256, 4, 2, 64, 512, 2, 160
# where each type keeps its fp16 scale (d) in a block, and the range of scales that keeps the random blocks'
# values of the order of a trained network's
D_AT = {"IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0, "IQ1_S": 0, "TQ2_0": 64, "TQ1_0": 52}
TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")


def random_blocks(ttype: str, n: int, k: int, rng: np.random.Generator, scale: float = 0.002) -> np.ndarray:
    """n rows of k values as random `ttype` blocks (every bit pattern of the quants), with finite scales."""
    qk, bb = GGML_QUANT_SIZES[QT[ttype]]
    raw = rng.integers(0, 256, (n, k // qk, bb), dtype=np.uint8)
    if ttype in D_AT:
        o = D_AT[ttype]
        raw[..., o:o + 2] = rng.uniform(scale / 2, scale, raw.shape[:2]).astype(np.float16).view(
            np.uint8).reshape(*raw.shape[:2], 2)
    elif ttype == "IQ1_M":  # its fp16 scale spread over the top nibbles of the four scale words (bytes 48..55)
        d = rng.uniform(scale / 2, scale, raw.shape[:2]).astype(np.float16).view(np.uint16)
        sc = raw[..., 48:56].copy().view(np.uint16)
        for i in range(4):
            sc[..., i] = (sc[..., i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        raw[..., 48:56] = sc.view(np.uint8)
    elif ttype == "MXFP4":  # an E8M0 exponent byte: 2^(e - 127)
        raw[..., 0] = rng.integers(118, 122, raw.shape[:2])
    return raw.reshape(n, -1)


def write_gguf(path: Path, layout: dict[str, str], seed: int = 0) -> Path:
    """A random 2-layer llama GGUF; layout: tensor kind (q, k, v, o, gate, up, down, embd) -> block type."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, LAYERS), (w.add_context_length, 256), (w.add_embedding_length, D),
                   (w.add_feed_forward_length, INTER), (w.add_head_count, H), (w.add_head_count_kv, KVH),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0),
                   (w.add_rope_dimension_count, HD), (w.add_vocab_size, VOCAB)):
        add(v)

    def mat(name: str, n: int, k: int, ttype: str, scale: float) -> None:
        if requantisable(ttype):
            w.add_tensor(name, random_blocks(ttype, n, k, rng, scale), raw_dtype=QT[ttype])
        elif ttype == "F16":
            w.add_tensor(name, (rng.standard_normal((n, k)) * scale * 30).astype(np.float16))
        else:
            x = (rng.standard_normal((n, k)) * scale * 30).astype(np.float32)
            w.add_tensor(name, quantize_blocks(x, ttype), raw_dtype=QT[ttype])

    mat("token_embd.weight", VOCAB, D, layout["embd"], 0.03)
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        mat(p + "attn_q.weight", H * HD, D, layout["q"], 0.004)
        mat(p + "attn_k.weight", KVH * HD, D, layout["k"], 0.004)
        mat(p + "attn_v.weight", KVH * HD, D, layout["v"], 0.004)
        mat(p + "attn_output.weight", D, H * HD, layout["o"], 0.004)
        w.add_tensor(p + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        mat(p + "ffn_gate.weight", INTER, D, layout["gate"], 0.004)
        mat(p + "ffn_up.weight", INTER, D, layout["up"], 0.004)
        mat(p + "ffn_down.weight", D, INTER, layout["down"], 0.003)
    w.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits_vs_transformers(m, path: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(our prefill's logits at every position, transformers' de-quantising GGUF loader's) for ids."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    a = m.model.args
    got = m.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64), 0, ids, all_logits=True)
    with torch.inference_mode():
        return got, ref(torch.tensor([ids])).logits[0]


LAYOUT = {"embd": "IQ3_S", "q": "IQ3_XXS", "k": "IQ2_XXS", "v": "Q6_K", "o": "IQ2_S", "gate": "IQ2_XS",
          "up": "Q4_K", "down": "IQ1_M"}  # requantised beside kept types, in one projection too (gate | up)


@pytest.mark.parametrize("ttype", TYPES)
def test_requantised_blocks_are_q8_0_of_what_gguf_decodes(ttype, tmp_path):
    """Every re-quantised block is llama.cpp's Q8_0 rounding of the values gguf's own decoder gives the file's
    blocks: within half a Q8_0 step (plus its fp16 scale's rounding) of them, and exactly gguf's Q8_0
    quantiser's bytes (the re-quantisation runs in chunks of rows on several threads: a chunk boundary changes
    nothing)."""
    import engine.llm.gguf_load as gl

    rng = np.random.default_rng(TYPES.index(ttype))
    rows = 37  # not a whole number of chunks
    raw = random_blocks(ttype, rows, 512, rng, 0.02 if ttype.startswith("TQ") else 0.002)  # TQ: values +-d
    want = quants.dequantize(raw, QT[ttype]).reshape(rows, 512)
    old = gl._REQUANT_CHUNK
    gl._REQUANT_CHUNK = 512 * 4 * 5  # 5 rows a chunk at most
    try:
        got = gl._requantise(tmp_path / "x.gguf", "t", ttype, raw, rows)
    finally:
        gl._REQUANT_CHUNK = old
    np.testing.assert_array_equal(got, quants.quantize(want, QT.Q8_0))
    back = quants.dequantize(got, QT.Q8_0).reshape(rows, 512)
    step = np.abs(want.reshape(rows, 16, 32)).max(-1) / 127  # each block's Q8_0 step, stored as fp16
    step16 = step.astype(np.float16).astype(np.float32)
    err = np.abs(back - want).reshape(rows, 16, 32).max(-1)
    assert (err <= 0.501 * step + 127 * np.abs(step - step16) + 1e-12).all()
    assert np.abs(want).max() > 0  # the random blocks decode to values


def test_gguf_with_iq_blocks_loads_packed_and_is_the_network_transformers_loads(tmp_path):
    path = write_gguf(tmp_path / "tiny-iq.gguf", LAYOUT)
    cache = tmp_path / "cache"
    said: list[str] = []
    ours = load_llm(str(path), cache, activations="fp32", progress=said.append)
    assert ours.native and ours.model.packed
    assert ours.model.layers[0].wqkv.formats == ["Q8_0", "Q6_K"]  # q/k re-quantised (stacked), v kept
    assert ours.model.layers[0].w13.formats == ["Q8_0", "Q4_K"]
    assert set(weight_formats(ours.model)) >= {"Q8_0", "Q6_K", "Q4_K"}
    for t in ("IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_S", "IQ2_XS", "IQ1_M"):
        assert t in ours.note
    assert "re-quantised to Q8_0" in ours.note and "cache: written" in ours.note
    assert any("re-quantising" in m and "(once; cached)" in m for m in said)
    cached = requant_cache_file(path, cache / "llm" / "requantised")
    assert cached.is_file()
    # resident: the Q8_0 blocks (8.5 bits a weight) and the kept blocks, far below fp32's 32 bits
    n_params = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(str(path)).tensors)
    assert ours.size_bytes() < n_params * 4 / 3

    ids = [3, 17, 99, 5, 42, 7, 150, 1]
    a = ours.model.args
    got, want = logits_vs_transformers(ours, path, ids)
    # the Q8_0 rounding of the re-quantised weights (half a step of 1/127 of a block's largest value): here
    # ~0.3 % of the logits' range; a wrong decoding or a mis-placed tensor moves them by their own size
    span = want.abs().max()
    assert (got - want).abs().max() < 0.02 * span

    # the next start reads the cache (the same blocks), Q8 activations included (the fused step)
    again = load_llm(str(path), cache, activations="auto")
    assert "cache: hit" in again.note and again.model.layers[0].wqkv.formats == ["Q8_0", "Q6_K"]
    for x, y in zip(ours.model.layers, again.model.layers):
        for p, q in zip(x.wqkv.parts, y.wqkv.parts):
            np.testing.assert_array_equal(p.qs, q.qs)
            np.testing.assert_array_equal(p.d, q.d)
    got8 = again.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64), 0, ids, all_logits=True)
    assert (got8 - want).abs().max() < 0.05 * span

    # a damaged cache file is replaced, not believed
    cached.write_bytes(cached.read_bytes()[:100])
    third = load_llm(str(path), cache, activations="fp32")
    assert "cache: written" in third.note and cached.stat().st_size > 100
    got3 = third.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64), 0, ids, all_logits=True)
    assert torch.equal(got3, got)


def test_requantised_cache_is_named_after_the_file_and_an_unwritable_one_costs_nothing(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {**LAYOUT, "embd": "Q8_0"}, seed=1)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # the cache folder cannot be made under a file (whoever runs the tests, root too)
    cfg, tensors = read_gguf(path, requant_cache=blocker / "sub")
    assert cfg["_requantised"]["cache"] == "unwritable"
    assert tensors["blk.0.attn_q.weight"].fmt == "Q8_0"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".requant-")] == []
    cfg2, _ = read_gguf(path)  # no cache folder: re-quantised, nothing written
    assert cfg2["_requantised"]["cache"] == "off" and cfg2["_requantised"]["types"] == {
        "IQ3_XXS": 2, "IQ2_XXS": 2, "IQ2_S": 2, "IQ2_XS": 2, "IQ1_M": 2}
    first = requant_cache_file(path, tmp_path / "c")
    path.write_bytes(path.read_bytes() + b"\0" * 32)  # another file under the same name: another cache name
    assert requant_cache_file(path, tmp_path / "c") != first


def test_iq_blocks_with_corrupt_scales_are_refused_naming_the_tensor(tmp_path):
    path = write_gguf(tmp_path / "nan.gguf", LAYOUT, seed=2)
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")  # IQ2_XXS: d at byte 0 of each block
    data = bytearray(path.read_bytes())
    at = int(t.data_offset)
    data[at:at + 2] = np.array([np.nan], np.float16).view(np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptGGUF, match=r"nan\.gguf: tensor blk\.1\.attn_k\.weight \(IQ2_XXS\) de-quantises to "
                                          r"non-finite values"):
        read_gguf(path)
    with pytest.raises(ModelUnavailable, match="blk.1.attn_k.weight"):
        load_llm(str(path), tmp_path / "cache")
    for w in ("fp32", "int8"):  # de-quantised by our reader: the same refusal, nothing cached
        with pytest.raises(ModelUnavailable, match=r"blk\.1\.attn_k\.weight \(IQ2_XXS\) de-quantises to non-finite"):
            load_llm(str(path), tmp_path / "cache", weights=w)
    assert not list((tmp_path / "cache").rglob("*.npz"))  # nothing cached


def test_requantisable_types_are_those_gguf_decodes_and_we_do_not_compute():
    for t in TYPES:
        assert requantisable(t), t
    for t in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16", "F32"):
        assert not requantisable(t), t  # kept packed or float
    for t in ("Q8_1", "Q8_K", "I8", "NOT_A_TYPE"):
        assert not requantisable(t), t  # gguf decodes none of these


def test_memory_estimate_before_loading_is_what_the_load_holds(tmp_path):
    """`estimate_llm_bytes` (what the engine's registry checks against its budget before a load) from the
    header alone: the packed bytes (re-quantised types at Q8_0's) and the de-quantised fp32 bytes are what
    the loaded models then hold."""
    from engine.llm.load import estimate_llm_bytes

    path = write_gguf(tmp_path / "est.gguf", LAYOUT, seed=3)
    packed = load_llm(str(path), tmp_path / "cache", activations="fp32")
    est = estimate_llm_bytes(str(path))
    assert abs(est - packed.size_bytes()) <= 0.01 * packed.size_bytes()
    # de-quantised: the embedded SmolLM2 in fp32 (its converted folder shared with the other tests' cache)
    import os

    shared = Path(os.environ.get("ATELIER_TEST_CACHE", "/tmp/atelier-test-cache"))
    full = load_llm("", shared, weights="fp32")
    est32 = estimate_llm_bytes("", weights="fp32")
    assert abs(est32 - full.size_bytes()) <= 0.02 * full.size_bytes()
    small = load_llm("", shared, activations="fp32")
    assert abs(estimate_llm_bytes("") - small.size_bytes()) <= 0.01 * small.size_bytes()
    assert est32 > 5 * estimate_llm_bytes("")
    # a file the loader does not keep packed (rope scaling) is de-quantised: every value in fp32
    scaled = tmp_path / "scaled.gguf"
    orig = gguf.GGUFWriter.write_header_to_file

    def with_scaling(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        self.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        return orig(self, *a, **k)

    gguf.GGUFWriter.write_header_to_file = with_scaling
    try:
        write_gguf(scaled, LAYOUT, seed=4)
    finally:
        gguf.GGUFWriter.write_header_to_file = orig
    n_values = sum(int(t.n_elements) for t in gguf.GGUFReader(str(scaled)).tensors)
    assert estimate_llm_bytes(str(scaled)) == 4 * n_values
    assert estimate_llm_bytes(str(tmp_path)) is None  # a folder: known after its load only
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    assert estimate_llm_bytes(str(tmp_path / "bad.gguf")) is None  # the load reports the corrupt file


def test_fp32_int8_bf16_weights_on_a_gguf_are_its_own_values_without_a_tokenizer(tmp_path):
    """models.llm_weights = fp32 / int8 / bf16 on a GGUF: de-quantised by our reader (`read_gguf(dequantise=True)`),
    not by transformers' conversion (which needs the file's tokenizer metadata: this file has none, and
    transformers' converter refused it). Oracles: `gguf.quants.dequantize` for every matrix (the IQ types
    de-quantised as the file holds them, not re-quantised to Q8_0), gguf's Q8_0 quantiser for the int8 blocks,
    transformers' de-quantising GGUF loader for the logits."""
    from engine.llm.batcher import GenerationRequest, LLMService

    path = write_gguf(tmp_path / "tiny-notok.gguf", LAYOUT, seed=5)
    cache = tmp_path / "cache"
    said: list[str] = []
    m = load_llm(str(path), cache, weights="fp32", progress=said.append)
    assert m.native and not m.model.packed and m.tokenizer is None and m.model.decode_step == "numpy"
    assert "loading model: de-quantising GGUF blocks" in said and not any("convert" in s for s in said)
    assert not (cache / "llm" / "requantised").exists()  # nothing re-quantised
    r = gguf.GGUFReader(str(path))
    file_values = {t.name: quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
        [int(x) for x in reversed(t.shape)]) for t in r.tensors}
    for i, layer in enumerate(m.model.layers):
        p = f"blk.{i}."
        want = np.concatenate([file_values[p + n] for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")])
        np.testing.assert_array_equal(layer.wqkv.weight.numpy(), want)
        want13 = np.concatenate([file_values[p + "ffn_gate.weight"], file_values[p + "ffn_up.weight"]])
        np.testing.assert_array_equal(layer.w13.weight.numpy(), want13)
        np.testing.assert_array_equal(layer.w2.weight.numpy(), file_values[p + "ffn_down.weight"])
    np.testing.assert_array_equal(m.model.tok.weight.numpy(), file_values["token_embd.weight"])

    ids = [3, 17, 99, 5, 42, 7, 150, 1]
    a = m.model.args
    got, want = logits_vs_transformers(m, path, ids)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()  # the same weights: float rounding only

    # int8: gguf's Q8_0 quantiser on those values, cached under the GGUF's own stamp (the next load reads it)
    q = load_llm(str(path), cache, weights="int8", activations="fp32")
    assert q.model.packed and q.extra["qcache"] == "written" and q.weights.startswith("int8 Q8_0")
    part = q.model.layers[1].w2.parts[0]
    raw = quants.quantize(file_values["blk.1.ffn_down.weight"], QT.Q8_0)
    np.testing.assert_array_equal(part.qs.reshape(-1), raw.reshape(D, -1, 34)[..., 2:].reshape(-1).view(np.int8))
    assert load_llm(str(path), cache, weights="int8").extra["qcache"] == "hit"
    path.write_bytes(path.read_bytes() + b"\0" * 32)  # another file under the same name: quantised again
    assert load_llm(str(path), cache, weights="int8").extra["qcache"] == "written"

    # bf16 (the torch forward): a greedy generation through the service, its tokens the forward's argmax
    b = load_llm(str(path), cache, weights="bf16")
    assert b.model.norm.weight.dtype == torch.bfloat16 and b.model.decode_step == "torch"
    svc = LLMService(lambda: b, max_slots=2, max_len=64)
    try:
        res = svc.generate(GenerationRequest(ids, max_new_tokens=6, ignore_eos=True))
    finally:
        svc.close()
    assert len(res.token_ids) == 6
    with torch.inference_mode():
        seq = ids + res.token_ids
        logits = b.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64, dtype=torch.bfloat16), 0,
                                 seq[:-1], all_logits=True)
    assert logits[len(ids) - 1:].float().argmax(-1).tolist() == res.token_ids


def test_a_projection_mixing_float_and_blocks_is_de_quantised_by_our_reader(tmp_path):
    """A GGUF we cannot keep packed because one projection mixes fp16 and Q8_0 matrices (q/k fp16, v Q8_0), with
    no tokenizer metadata: models.llm_weights = "auto" de-quantises it with our reader (a note says why), where
    it went to transformers' converter, which refuses a file without a tokenizer. Oracle: transformers' GGUF
    loader's logits."""
    path = write_gguf(tmp_path / "mixed.gguf", {**LAYOUT, "q": "F16", "k": "F16", "v": "Q8_0", "embd": "Q8_0"},
                      seed=6)
    from engine.llm.load import estimate_llm_bytes

    m = load_llm(str(path), tmp_path / "cache")
    assert m.native and not m.model.packed and m.tokenizer is None
    assert "mix packed and float types; de-quantised to float32 instead" in m.note
    est = estimate_llm_bytes(str(path))  # known before loading: every value in fp32, not the packed bytes
    assert abs(est - m.size_bytes()) <= 0.01 * m.size_bytes()
    got, want = logits_vs_transformers(m, path, [9, 4, 120, 33, 2, 77])
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
