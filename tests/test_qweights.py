"""GGUF blocks kept packed: the block decoding and the kernels against independent oracles
(`gguf.quants.dequantize`, float64 NumPy), and tiny GGUF files written here with `gguf.GGUFWriter`
loaded by our loader against transformers' de-quantising GGUF loader (same logits, same greedy tokens).

The SmolLM2 same-network test (greedy identical to transformers' `generate` on the embedded GGUF) is
`tests/test_llm_model.py::test_smollm2_prefill_logits_and_greedy_match_transformers`, whose model is
now the packed one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch




# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402

from engine.llm.cache import FullCache, Int8Cache  # noqa: E402
from engine.llm.gguf_load import CorruptGGUF, UnsupportedGGUF, read_gguf  # noqa: E402
from engine.llm.load import load_llm  # noqa: E402
from engine.llm.qweights import Packed, quantize_iq4_nl  # noqa: E402
from tests.fused_twin import fused_and_layer_by_layer  # noqa: E402
from atelier_kernels import cpu_qmatmul  # noqa: E402

FMTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")


def _raw(fmt: str, w: np.ndarray) -> np.ndarray:
    if fmt == "IQ4_NL":  # the gguf package has no IQ4_NL quantizer (its decoder stays the oracle)
        return quantize_iq4_nl(np.ascontiguousarray(w, dtype=np.float32))
    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), getattr(QT, fmt))


@pytest.mark.parametrize("fmt", FMTS)
def test_packed_blocks_decode_like_gguf(fmt):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((37, 160)).astype(np.float32) * rng.uniform(0.01, 3, (37, 1)).astype(np.float32)
    raw = _raw(fmt, w)
    pm = Packed.from_blocks(fmt, raw)
    want = quants.dequantize(raw, getattr(QT, fmt))  # the gguf package's own decoder: the oracle
    assert pm.shape == (37, 160) and pm.nbytes == raw.nbytes  # the split adds no byte
    np.testing.assert_array_equal(pm.dequant64(), want.astype(np.float64))
    for backend in (None, "numpy"):
        np.testing.assert_array_equal(cpu_qmatmul.dequant(fmt, pm.qs, pm.d, pm.m, backend=backend), want)
    np.testing.assert_array_equal(pm.dequant(5, 19), want[5:19])
    np.testing.assert_array_equal(pm.rows(np.array([36, 0, 7])).dequant(), want[[36, 0, 7]])


@pytest.mark.parametrize("fmt", ["Q5_0", "Q5_1"])
def test_q5_blocks_stay_packed_with_their_high_bits(fmt):
    """A Q5_0 / Q5_1 tensor (Q5_0: llama.cpp's fallback for Q4_K rows that are not whole super-blocks, as in
    most small models' Q4_K_M files) stays in its own bytes: 16 nibble bytes, then the block's 32 high bits.
    Rows whose high bits are all set, all clear, or zero (d = 0) decode as the gguf package decodes them."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((29, 96)).astype(np.float32) * rng.uniform(0.01, 3, (29, 1)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: d = 0
    w[4] = np.abs(w[4])  # Q5_0: every value at or above the block's midpoint
    w[5] = -np.abs(w[5])
    raw = _raw(fmt, w)
    pm = Packed.from_blocks(fmt, raw)
    want = quants.dequantize(raw, getattr(QT, fmt))
    assert pm.fmt == fmt and pm.qs.shape == (29, 3, 20) and pm.nbytes == raw.nbytes
    np.testing.assert_array_equal(pm.dequant64(), want.astype(np.float64))
    for backend in (None, "numpy"):
        np.testing.assert_array_equal(cpu_qmatmul.dequant(fmt, pm.qs, pm.d, pm.m, backend=backend), want)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    want_q8 = cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m, backend="numpy")
    # the float64 twin de-quantises x's Q8 blocks and W: the oracle for the integer kernels
    xq, dx, xs = cpu_qmatmul.quantize_rows(x, "numpy")
    xd = (xq.reshape(6, 3, 32).astype(np.float64) * dx[..., None]).reshape(6, 96)
    ref = xd @ want.astype(np.float64).T
    if fmt == "Q5_1":  # the min against the block's de-quantised sum, xs (llama.cpp's Q8_1 s)
        mm = pm.m.view(np.float16).astype(np.float64)
        ref = ref - (xd.reshape(6, 1, 3, 32).sum(-1) * mm[None]).sum(-1) + xs.astype(np.float64) @ mm.T
    np.testing.assert_allclose(want_q8, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())  # fp32 out
    got = cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_kernels_are_installed():
    assert cpu_qmatmul.available()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("R", [1, 2, 3, 5, 8, 9, 16])  # the kernels tile 2 rows of x (an odd last row alone)
@pytest.mark.parametrize("N,K", [(1, 32), (7, 96), (130, 576), (13, 1536)])  # x 4 rows of W: N % 4 = 1, 3, 2, 1
def test_packed_matmul_matches_float64(fmt, R, N, K):
    rng = np.random.default_rng(R * 1000 + N + K)
    raw = _raw(fmt, rng.standard_normal((N, K)))
    pm = Packed.from_blocks(fmt, raw)
    x = rng.standard_normal((R, K)).astype(np.float32)
    w64 = quants.dequantize(raw, getattr(QT, fmt)).astype(np.float64)
    want = x.astype(np.float64) @ w64.T
    tol = 4 * K * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w64).T).max()  # fp32 dot-product bound
    for backend in (None, "numpy"):
        got = cpu_qmatmul.matmul(fmt, x, pm.qs, pm.d, pm.m, backend=backend)
        assert got.dtype == np.float32 and got.shape == (R, N)
        assert np.abs(got - want).max() <= tol, backend


def test_packed_matmul_rejects_bad_shapes():
    pm = Packed.from_blocks("Q4_1", _raw("Q4_1", np.ones((4, 64))))
    with pytest.raises(ValueError, match=r"x \(2, 63\)"):
        pm.matmul(np.ones((2, 63), np.float32))
    with pytest.raises(ValueError, match="fmt='IQ3_S'"):
        cpu_qmatmul.matmul("IQ3_S", np.ones((1, 64), np.float32), pm.qs, pm.d, pm.m)
    with pytest.raises(ValueError, match="fmt=Q5_0: qs uint8"):  # Q4_1's 16-byte blocks are not Q5_0's 20
        cpu_qmatmul.matmul("Q5_0", np.ones((1, 64), np.float32), pm.qs, pm.d, pm.m)
    with pytest.raises(ValueError, match="not whole 20-byte blocks"):
        Packed.from_blocks("Q4_1", np.zeros((2, 30), np.uint8))


# -- tiny GGUF files ------------------------------------------------------------------------------
D, H, KVH, HD, INTER, LAYERS, VOCAB = 64, 4, 2, 16, 96, 2, 160


def write_tiny_gguf(path: Path, fmt: str, tie: bool = True, seed: int = 0, extra: dict | None = None) -> Path:
    """A random 2-layer llama GGUF whose matrices are `fmt` blocks (norms F32)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(INTER)
    w.add_head_count(H)
    w.add_head_count_kv(KVH)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(VOCAB)
    w.add_file_type(1)

    def mat(name: str, n: int, k: int, scale: float = 0.2, t: str = fmt) -> None:
        x = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        if t == "F32":
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, _raw(t, x), raw_dtype=getattr(QT, t))

    def vec(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))

    mat("token_embd.weight", VOCAB, D, 1.0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight")
        mat(p + "attn_q.weight", H * HD, D)
        mat(p + "attn_k.weight", KVH * HD, D)
        mat(p + "attn_v.weight", KVH * HD, D, t=(extra or {}).get("attn_v", fmt))
        mat(p + "attn_output.weight", D, H * HD)
        vec(p + "ffn_norm.weight")
        mat(p + "ffn_gate.weight", INTER, D)
        mat(p + "ffn_up.weight", INTER, D)
        mat(p + "ffn_down.weight", D, INTER)
    vec("output_norm.weight")
    if not tie:
        mat("output.weight", VOCAB, D)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _greedy_ours(model, ids: list[int], n: int) -> list[int]:
    a = model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)
    nxt = int(model.prefill(cache, 0, ids).argmax())
    out = []
    for _ in range(n):
        out.append(nxt)
        nxt = int(model.decode(cache, [0], [nxt])[0].argmax())
    return out


def _greedy_hf(ref, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("fmt,tie", [("Q8_0", True), ("Q4_0", False), ("Q4_1", True), ("Q5_0", False),
                                     ("Q5_1", True), ("IQ4_NL", False)])
def test_tiny_gguf_is_the_network_transformers_loads(tmp_path, fmt, tie):
    path = write_tiny_gguf(tmp_path / f"tiny-{fmt}.gguf", fmt, tie=tie)
    ours = load_llm(str(path), tmp_path / "cache", activations="fp32")  # the de-quantised network exactly
    assert ours.model.packed and ours.native and ours.tokenizer is None
    assert fmt in ours.weights
    ref = _hf(path)
    ids = [3, 17, 99, 5, 42, 7, 150, 1]
    a = ours.model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)
    got = ours.model.prefill(cache, 0, ids, all_logits=True)  # the NumPy step on the packed kernels
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-4 * want.abs().max() + 1e-5
    assert _greedy_ours(ours.model, ids, 24) == _greedy_hf(ref, ids, 24)
    # the torch forward on the same blocks (int8 cache; a long prompt de-quantised chunk by chunk)
    long_ids = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, 70)]
    c8 = Int8Cache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)
    got_long = ours.model.prefill(c8, 0, long_ids)
    with torch.inference_mode():
        want_long = ref(torch.tensor([long_ids])).logits[0, -1]
    assert int(got_long.argmax()) == int(want_long.argmax())
    assert (got_long - want_long).abs().max() < 0.05 * want_long.abs().max()  # int8 K/V: not exact


def _q8_float64(p, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """The Q8 product of x and a packed part in float64 (`cpu_qmatmul.matmul_q8_reference`: x quantised to Q8
    blocks, then de-quantised; Q4_1x8 de-interleaved)."""
    from atelier_kernels import cpu_qmatmul

    xq, dx, xs = cpu_qmatmul.quantize_rows(x, "numpy")
    out = np.empty((x.shape[0], p.qs.shape[0]), np.float32)
    cpu_qmatmul.matmul_q8_reference(p.fmt, xq, dx, xs, p.qs, p.d, p.m, out)
    return out


@pytest.mark.parametrize("fmt,act", [("Q8_0", "q8"), ("Q4_0", "q8"), ("Q4_1", "q8"), ("Q5_0", "q8"), ("Q5_1", "q8"),
                                     ("IQ4_NL", "q8"), ("Q4_1", "q8_fast")])
def test_q8_activations_compute_the_quantised_product(tmp_path, fmt, act):
    """models.llm_activations = "q8": every packed product is the Q8 product (activations in Q8 blocks of 32,
    `matmul_q8`'s float64 twin as the oracle) in the prefill and decode paths, alone or with other rows;
    decoding token by token gives the prefill's logits. "q8_fast": the same with the Q4_1 matrices interleaved
    by 8 rows (`cpu_qmatmul.interleave_q41`; the tied head stays as the embedding reads it)."""
    from atelier_kernels import cpu_qmatmul

    path = write_tiny_gguf(tmp_path / f"tiny-{fmt}.gguf", fmt, tie=True)
    ours = load_llm(str(path), tmp_path / "cache", activations=act)
    want_act = act if act == "q8" or cpu_qmatmul.q8_available() else "q8"
    assert ours.extra["activations"] == want_act and "Q8 activations" in ours.weights
    assert f"gguf {fmt} " in ours.weights  # (Q4_1x8 is reported as its blocks' type)
    lin = ours.model.layers[0].wqkv
    if want_act == "q8_fast":
        assert lin.formats == [cpu_qmatmul.X8_FORMAT] and ours.model.tok.head.formats == ["Q4_1"]  # (tied)
    # 13 rows: a group of 8, one of 4 and one left over (each tile kind of `q8a_span`)
    x = np.random.default_rng(1).standard_normal((13, lin.in_features)).astype(np.float32)
    want = np.concatenate([_q8_float64(p, x) for p in lin.parts], 1)
    got = lin.matmul_np(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for r in range(13):  # a row's result does not depend on the other rows
        np.testing.assert_array_equal(lin.matmul_np(x[r:r + 1])[0], got[r])
    ids = [3, 17, 99, 5, 42, 7, 150, 1]
    a = ours.model.args
    got_l = ours.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128), 0, ids, all_logits=True)
    with torch.inference_mode():
        ref = _hf(path)(torch.tensor([ids])).logits[0]
    # a random tiny network amplifies the activations' rounding layer by layer: a loose bound that a wrong
    # product (garbage, ~100 %) cannot meet; the end-to-end oracle is llama.cpp on SmolLM2
    # (test_q8_activations_llama_cpp.py)
    assert (got_l - ref).abs().max() < 0.2 * ref.abs().max()
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)  # decode steps: the same rows one by one
    ours.model.prefill(cache, 0, ids[:1])
    steps = [ours.model.decode(cache, [0], [t])[0] for t in ids[1:]]
    # a prompt's attention sums in llama.cpp's prompt order, a decode step's in its one-token order: close
    torch.testing.assert_close(torch.stack(steps), got_l[1:], rtol=1e-5, atol=1e-5 * float(got_l.abs().max()))
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)  # a draft check: the decode steps' bits
    ours.model.prefill(cache, 0, ids[:1])
    assert torch.equal(ours.model.extend(cache, 0, ids[1:]), torch.stack(steps))


@pytest.mark.parametrize("fmt,act", [("Q4_1", "q8"), ("Q4_0", "q8"), ("Q8_0", "q8"), ("Q5_0", "q8"), ("Q5_1", "q8"),
                                     ("IQ4_NL", "q8"), ("Q4_1", "q8_fast")])
def test_fused_q8_step_is_the_layer_by_layer_step(tmp_path, fmt, act):
    """`atelier_kernels.cpu_step` runs every layer in one Numba call; its twin is NumpyStep's layer-by-layer path (the
    same product, attention, norm, RoPE and SwiGLU arithmetic: llama.cpp's, `atelier_kernels.cpu_ggml`). Prompts of nine
    slots, then decode steps of 1, 2, 5 (a tile of 4 rows and one more) and 9 rows (a tile of 8 and one): the
    same logits, bit for bit."""
    from atelier_kernels import cpu_step

    path = write_tiny_gguf(tmp_path / f"tiny-{fmt}.gguf", fmt, tie=act == "q8")  # (q8_fast: its head Q4_1x8 too)
    ours = load_llm(str(path), tmp_path / "cache", activations=act)
    step = ours.model._np_step
    assert (step.fused is not None) == cpu_step.available()  # Numba and AVX2; else the layer-by-layer path
    if step.fused is None:
        return
    fused, plain = fused_and_layer_by_layer(step, ours.model.args, steps=12)
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)


@pytest.mark.parametrize("threads", [2, 3])
def test_fused_q8_step_on_the_int8_cache_is_the_layer_by_layer_step(tmp_path, monkeypatch, threads):
    """The int8 cache in the fused step (before, layer by layer: a decode step 1.55-1.75x a full cache's on
    SmolLM2): a decode step's position leaving the ring, and a prompt's (the ring positions it pushes out
    first, its rows the ring will not hold straight to int8), quantised as `npstep._int8_write` quantises them
    (`kv_quant.quantize_np`'s fp32 operations); a row whose slot fits in the ring attended as on the full cache,
    the others over int8 history plus the ring (`cpu_decode.attend_q8_task`, which the layer-by-layer step
    runs too). A ring of 4 positions: the 5-token prompt outgrows it at once, the 2-token ones fill it, the 12
    steps leave it, rows in and out of it in one step. The same logits bit for bit; the same cache bytes (int8
    values, scales, rings)."""
    import numba

    from atelier_kernels import cpu_step, kv_quant

    assert cpu_step.KV_EPS == kv_quant._EPS
    path = write_tiny_gguf(tmp_path / "tiny-Q4_1.gguf", "Q4_1", tie=True)
    ours = load_llm(str(path), tmp_path / "cache", activations="q8")
    step = ours.model._np_step
    if not cpu_step.available():  # Numba and AVX2; else the layer-by-layer path alone
        assert step.fused is None
        return
    monkeypatch.setattr(numba, "get_num_threads", lambda: threads)
    caches = []
    real = step._finish

    def keep(cache, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 - the cache each run ends with
        if not caches or caches[-1] is not cache:
            caches.append(cache)
        return real(cache, *a, **k)

    monkeypatch.setattr(step, "_finish", keep)
    real_step, int8_steps = cpu_step.step_q8, []

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        int8_steps.append(k.get("int8") is not None)
        return real_step(*a, **k)

    monkeypatch.setattr(cpu_step, "step_q8", counted)
    fused, plain = fused_and_layer_by_layer(step, ours.model.args, steps=12, ring=4)
    assert int8_steps == [True] * 23  # the fused run's 11 prompts and 12 decode steps all in the fused step
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)
    a, b = caches
    assert a.lengths == b.lengths and max(a.lengths) > 8  # every slot past its ring
    for x, y in zip(a._tensors(), b._tensors()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="one token per slot"):  # rows of one slot that are not consecutive
        real_step(step.fused, np.zeros((2, ours.model.args.dim), np.float32), *(t.numpy() for t in (a.rk, a.rv)),
                  step.gcos, step.gsin, np.array([0, 0]), np.array([9, 11]), 1, 1, 1, 1, 1.0,
                  int8=tuple(t.numpy() for t in (a.qk, a.sk, a.qv, a.sv)))


@pytest.mark.parametrize("threads,kvpf,act", [(1, True, "q8"), (3, True, "q8"), (7, True, "q8"), (3, False, "q8"),
                                              (3, True, "q8_fast"), (7, True, "q8_fast")])
def test_fused_q8_step_is_the_same_on_any_number_of_threads(tmp_path, monkeypatch, threads, kvpf, act):
    """The fused step cuts each product's rows and the attention's tasks into one home range per thread and
    lets a thread that finishes first take the others' leftovers. With 1 thread, or more threads than Numba
    runs (7 here: several ranges per OS thread, some ranges empty on the tiny model's short parts, every range
    of a late thread taken by the others), every row and task is still computed once: the layer-by-layer
    step's logits, bit for bit. kvpf: with or without the next layer's keys and values asked for during the
    products (`cpu_step.PREFETCH_KV`: each thread's plan of its home tasks' runs, a cursor moved on per weight
    row), the same bits. q8_fast: the Q4_1 matrices interleaved by 8 rows (each range whole groups of 8)."""
    import numba

    from atelier_kernels import cpu_step

    path = write_tiny_gguf(tmp_path / "tiny-Q4_1.gguf", "Q4_1", tie=True)
    ours = load_llm(str(path), tmp_path / "cache", activations=act)
    step = ours.model._np_step
    assert (step.fused is not None) == cpu_step.available()
    if step.fused is None:
        return
    monkeypatch.setattr(numba, "get_num_threads", lambda: threads)  # what step_q8 hands the kernel
    monkeypatch.setattr(cpu_step, "PREFETCH_KV", kvpf)
    fused, plain = fused_and_layer_by_layer(step, ours.model.args, steps=8)
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)


def test_tiny_gguf_resident_bytes_are_the_file_blocks(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", "Q4_1")
    m = load_llm(str(path), tmp_path / "cache")
    blocks = sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)
    assert m.size_bytes() <= 1.1 * path.stat().st_size
    assert blocks <= m.size_bytes() <= blocks + 4096  # + the rope tables, nothing else


def test_mixed_block_types_in_one_projection(tmp_path):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "Q4_1", extra={"attn_v": "Q8_0"})
    ours = load_llm(str(path), tmp_path / "cache", activations="fp32")
    assert ours.model.layers[0].wqkv.formats == ["Q4_1", "Q8_0"]  # q and k stacked, v apart
    ids = [1, 2, 3, 4, 5]
    a = ours.model.args
    got = ours.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 32), 0, ids, all_logits=True)
    with torch.inference_mode():
        want = _hf(path)(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-4 * want.abs().max() + 1e-5


def test_int8_and_int4_weights_quantise_at_load(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=H, num_key_value_heads=KVH, max_position_embeddings=128,
                        tie_word_embeddings=True)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    full = load_llm(str(tmp_path / "hf"), tmp_path / "cache")
    assert not full.model.packed
    ids = [4, 8, 15, 16, 23, 42]
    a = full.model.args
    want = full.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 32), 0, ids, all_logits=True)
    for weights, fmt, tol in (("int8", "Q8_0", 0.02), ("int4", "Q4_1", 0.25)):
        q = load_llm(str(tmp_path / "hf"), tmp_path / "cache", weights=weights)
        assert q.model.packed and fmt in q.weights and weights in q.weights
        assert q.size_bytes() < full.size_bytes() / (3 if fmt == "Q8_0" else 5)
        got = q.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 32), 0, ids, all_logits=True)
        assert (got - want).abs().max() < tol * want.abs().max(), weights


def test_unsupported_block_type_names_file_tensor_and_type(tmp_path):
    # Q8_1: llama.cpp's activation blocks, which neither we nor the gguf package de-quantise (the IQ types are
    # re-quantised to Q8_0: tests/test_gguf_requant.py)
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 40), np.uint8), raw_dtype=QT.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUF, match=r"q81\.gguf: tensor token_embd\.weight has block type Q8_1"):
        read_gguf(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUF, match=r"gpt2\.gguf: architecture 'gpt2'"):
        read_gguf(path)


@pytest.mark.parametrize("cut", [3, 100, -50])
def test_truncated_gguf_is_a_clear_error_and_caches_nothing(tmp_path, cut):
    from engine.errors import ModelUnavailable

    good = write_tiny_gguf(tmp_path / "good.gguf", "Q4_1").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:cut] if cut > 0 else good[:cut])
    with pytest.raises(CorruptGGUF, match=r"bad\.gguf"):
        read_gguf(bad)
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailable, match=r"bad\.gguf.*(truncated|corrupt|not a GGUF)"):
        load_llm(str(bad), cache)
    with pytest.raises(ModelUnavailable, match=r"bad\.gguf.*(truncated|corrupt|not a GGUF)"):
        load_llm(str(bad), cache, weights="int8")  # de-quantised by our reader: the same refusal
    assert not list(cache.glob("llm/bad*")) and not list(cache.rglob("*.npz"))


def test_generate_text_reports_loading_and_names_the_weights(tmp_path):
    from engine.llm.batcher import GenerationRequest, service_for
    from tests.fakectx import make_context
    from tools.base import ToolError
    from tools.text import GenerateTextInput, run_generate_text

    path = write_tiny_gguf(tmp_path / "tiny-progress.gguf", "Q4_1")
    ctx = make_context(tmp_path, models={"llm": str(path)})
    try:
        with pytest.raises(ToolError, match="no tokenizer"):  # a tokenizer-less file: loads, then refused
            run_generate_text(GenerateTextInput(prompt="hi", max_new_tokens=2), ctx)
        msgs = [m for _, _, m in ctx.progress]
        assert msgs and all(m.startswith("loading model") for m in msgs), msgs
        assert any("GGUF blocks" in m for m in msgs)
        svc = service_for(ctx.engine, str(path))
        r = svc.generate(GenerationRequest([1, 2, 3], max_new_tokens=3, ignore_eos=True))
        assert r.completion_tokens == 3 and "weights: gguf Q4_1" in r.note and "MB resident" in r.note
        svc.close()
    finally:
        ctx.engine.close()


def _tile_callers(kind: int, vnni: bool, ux: bool = False):  # noqa: ANN202
    """njit callers of the Q8 tile intrinsics of one kind (0 Q4_1, 1 Q4_0, 2 Q8_0, 3 Q5_1, 4 Q5_0) and VNNI
    setting: 1 x 1, 4 weight rows x 1, 1 x 4 and 1 x 8 (Q4_1 / Q5_1's min terms over the 4 / 8 rows as one
    vector, xs transposed);
    ux: the 1 x 4 and 1 x 8 tiles take the activations with their sign bit flipped."""
    from numba import njit

    from atelier_kernels._numba import q8_tile_dot_intrinsic

    t11, t41, t14, t18 = (q8_tile_dot_intrinsic(kind, nw, n, n >= 4, vnni, ux and n >= 4)
                          for nw, n in ((1, 1), (4, 1), (1, 4), (1, 8)))

    sc = np.zeros(0, np.uint8)  # Q4_K's scale bytes: unread by these kinds

    @njit
    def one(w, wo, d, do, x, xo, dx, dxo, m, xs, nb):  # noqa: ANN001, ANN202
        return t11(w, wo, d, do, x, xo, dx, dxo, m, xs, sc, nb)

    @njit
    def w4(w, wr, d, nb, x, xo, dx, dxo, m, xs):  # noqa: ANN001, ANN202 - weight rows 0..3, row stride wr
        return t41(w, 0, wr, 2 * wr, 3 * wr, d, 0, nb, 2 * nb, 3 * nb, x, xo, dx, dxo, m, xs, sc, nb)

    @njit
    def r4(w, wo, d, do, x, xr, dx, m, xs, nb):  # noqa: ANN001, ANN202 - activation rows 0..3
        return t14(w, wo, d, do, x, 0, xr, 2 * xr, 3 * xr, dx, 0, nb, 2 * nb, 3 * nb, m, xs, sc, nb)

    @njit
    def r8(w, wo, d, do, x, xr, dx, m, xst, nb):  # noqa: ANN001, ANN202 - activation rows 0..7
        return t18(w, wo, d, do, x, 0, xr, 2 * xr, 3 * xr, 4 * xr, 5 * xr, 6 * xr, 7 * xr, dx, 0, nb, 2 * nb,
                   3 * nb, 4 * nb, 5 * nb, 6 * nb, 7 * nb, m, xst, sc, nb)

    return one, w4, r4, r8


@pytest.mark.parametrize("fmt", ["Q4_1", "Q4_0", "Q8_0", "Q5_0", "Q5_1"])
def test_q8_tiles_give_every_pair_the_same_bits(fmt):
    """The Q8 tile intrinsics (`_numba._q8_rows_codegen`): blocks 8 at a time with their scales converted and
    multiplied as vectors, the rest one by one, Q4_1's min chains as vectors over weight rows (4 x 1) or
    activation rows (1 x 8): every (weight row, activation row) result equals the 1 x 1 tile's bits and the
    float64 twin to fp32 rounding, for 5 (no group of 8), 16 and 19 blocks; where the CPU has VNNI, the
    `vpdpbusd` variant equals the AVX2 one bit for bit (on a CPU without it only the AVX2 one can run), and
    so do Q4_0 / Q8_0's tiles of rows on sign-flipped activations (weights as the signed operand)."""
    from atelier_kernels import cpu_qmatmul
    from atelier_kernels._numba import has_avx2, has_vnni, jit

    assert jit() is not None and has_avx2(), "the Q8 kernels run here (Numba, AVX2)"
    kind = {"Q4_1": 0, "Q4_0": 1, "Q8_0": 2, "Q5_1": 3, "Q5_0": 4}[fmt]
    bw = {"Q8_0": 32, "Q5_0": 20, "Q5_1": 20}.get(fmt, 16)
    mn = fmt in ("Q4_1", "Q5_1")
    variants = [False] + ([True] if has_vnni() else [])
    rng = np.random.default_rng(7)
    for nb in (5, 16, 19):
        W, R = 4, 8
        qs = rng.integers(0, 256, (W, nb, bw), dtype=np.uint8)
        if fmt == "Q8_0":
            qs = qs.view(np.int8).clip(-127, 127).view(np.uint8)
        d = rng.uniform(1e-3, 3e-2, (W, nb)).astype(np.float16).view(np.uint16)
        m = (-rng.uniform(1e-3, 0.2, (W, nb))).astype(np.float16).view(np.uint16)
        x = rng.standard_normal((R, nb * 32)).astype(np.float32)
        xq, dx, xs = cpu_qmatmul.quantize_rows(x)
        want = np.empty((R, W))
        cpu_qmatmul.matmul_q8_reference(fmt, xq, dx, xs, qs if fmt != "Q8_0" else qs.view(np.int8), d,
                                        m if mn else None, want)
        wf, df, mf, dxf, xsf = qs.reshape(-1), d.reshape(-1), m.reshape(-1), dx.reshape(-1), xs.reshape(-1)
        xst = np.ascontiguousarray(xs.T).reshape(-1)  # (row j, block b) at b * 8 + j
        xst4 = np.ascontiguousarray(xs[:4].T).reshape(-1)  # rows 0..3: at b * 4 + j
        xr = nb * 32
        results = []
        for vnni in variants:
            one, w4, r4, r8 = _tile_callers(kind, vnni)
            ref = np.array([[one(wf, t * nb * bw, df, t * nb, xq, j * xr, dxf, j * nb, mf, xsf, nb) for t in range(W)]
                            for j in range(R)], np.float32)
            np.testing.assert_allclose(ref, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
            for j in range(R):
                np.testing.assert_array_equal(np.array(w4(wf, nb * bw, df, nb, xq, j * xr, dxf, j * nb, mf, xsf),
                                                       np.float32), ref[j])
            for t in range(W):
                np.testing.assert_array_equal(np.array(r4(wf, t * nb * bw, df, t * nb, xq, xr, dxf, mf,
                                                          xst4 if mn else xsf, nb), np.float32), ref[:4, t])
                np.testing.assert_array_equal(np.array(r8(wf, t * nb * bw, df, t * nb, xq, xr, dxf, mf,
                                                          xst if mn else xsf, nb), np.float32), ref[:, t])
            if vnni and not mn:  # the tiles of rows on sign-flipped activations (no vpsignb): the same bits
                _, _, r4u, r8u = _tile_callers(kind, vnni, ux=True)
                xu = xq ^ np.int8(-128)
                for t in range(W):
                    np.testing.assert_array_equal(np.array(r4u(wf, t * nb * bw, df, t * nb, xu, xr, dxf, mf, xsf, nb),
                                                           np.float32), ref[:4, t])
                    np.testing.assert_array_equal(np.array(r8u(wf, t * nb * bw, df, t * nb, xu, xr, dxf, mf, xsf, nb),
                                                           np.float32), ref[:, t])
            results.append(ref)
        for other in results[1:]:
            np.testing.assert_array_equal(other, results[0])


@pytest.mark.parametrize("N", [16, 64, 13])
def test_q4_0_products_are_llama_cpps_compiled_bits(N):
    """Q4_0 on Q8 activations (`matmul_q8`) against llama.cpp's own compiled kernels through ctypes
    (`tests/ggml_ref.py`): a matrix whose rows are a multiple of 8 as its AVX2 build repacks it by default
    (`ggml_gemv_q4_0_8x8_q8_0` for a row, `ggml_gemm_q4_0_8x8_q8_0` for rows in fours: one fp32 chain per pair
    over the blocks' whole integer dots), any other (13 rows), or any matrix without its extra weight buffers
    (`llama_q4k_repack(False)`), as its `ggml_vec_dot_q4_0_q8_0` (8 lanes per block, summed at the end): every
    (weight row, activation row) bit for bit, alone or in tiles of 8 and 4 rows (11 rows), random blocks at
    several activation scales, 1, 16 and 19 blocks per row."""
    from tests import ggml_ref

    rng = np.random.default_rng(N)
    for nb in (1, 16, 19):
        raw = rng.integers(0, 256, (N, nb, 18), dtype=np.uint8)
        raw[..., :2] = rng.uniform(1e-4, 0.05, (N, nb)).astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(N, nb * 18)
        pm = Packed.from_blocks("Q4_0", raw)
        x = (rng.standard_normal((11, nb * 32)) * rng.uniform(0.01, 30, (11, 1))).astype(np.float32)
        dots = np.array([[ggml_ref.vec_dot("Q4_0", raw[n], ggml_ref.quantize_q8_0(row)) for n in range(N)]
                         for row in x])
        repacked = ggml_ref.q4_0_repacked(raw, x) if N % 8 == 0 else dots
        for on, want in ((True, repacked), (False, dots)):
            with cpu_qmatmul.llama_q4k_repack(on):
                for prompt in (False, True):
                    got = cpu_qmatmul.matmul_q8("Q4_0", x, pm.qs, pm.d, prompt=prompt)
                    np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(cpu_qmatmul.matmul_q8("Q4_0", x[3:4], pm.qs, pm.d)[0], want[3])
        if N % 8 == 0 and nb > 1:
            assert not np.array_equal(repacked, dots)  # the two arithmetics do differ somewhere


@pytest.mark.parametrize("N", [16, 64, 13])
def test_iq4_nl_products_are_llama_cpps_compiled_bits(N):
    """IQ4_NL on Q8 activations (`matmul_q8`; each nibble one of 16 non-uniform values, looked up with
    `vpshufb`) against llama.cpp's own compiled kernels through ctypes (`tests/ggml_ref.py`), every (weight row,
    activation row) bit for bit, 13 rows of activations (tiles of 8, 4 and one) and one alone, random blocks at
    several activation scales, 1, 16 and 19 blocks per row (an odd last block: llama.cpp's scalar tail). A
    matrix whose rows are a multiple of 8 as its AVX2 build repacks it (`ggml_gemv_iq4_nl_8x8_q8_0` for a row,
    `ggml_gemm_iq4_nl_8x8_q8_0` for rows in fours: Q4_0's template with the table), as decoding steps or a
    prompt; any other (13 rows, or with its extra buffers off: `llama_q4k_repack(False)`) as its
    `ggml_vec_dot_iq4_nl_q8_0` for a token (two sets of 8 lanes) and, for a prompt's rows, as llamafile's
    tinyBLAS (one set of 8 lanes: `ggml_vec_dot_q8_0_q8_0`'s arithmetic, checked on the blocks written as Q8_0
    ones with the table's values)."""
    from tests import ggml_ref

    rng = np.random.default_rng(N + 1)
    for nb in (1, 16, 19):
        raw = rng.integers(0, 256, (N, nb, 18), dtype=np.uint8)
        raw[..., :2] = rng.uniform(1e-4, 0.05, (N, nb)).astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(N, nb * 18)
        pm = Packed.from_blocks("IQ4_NL", raw)
        np.testing.assert_array_equal(pm.dequant(), quants.dequantize(raw, QT.IQ4_NL))
        x = (rng.standard_normal((13, nb * 32)) * rng.uniform(0.01, 30, (13, 1))).astype(np.float32)
        ys = [ggml_ref.quantize_q8_0(row) for row in x]
        dots = np.array([[ggml_ref.vec_dot("IQ4_NL", raw[n], y) for n in range(N)] for y in ys])
        blk = raw.reshape(N, nb, 18)  # the same blocks as Q8_0 ones: d, then the 32 values as int8
        nib = np.concatenate([blk[..., 2:] & 15, blk[..., 2:] >> 4], -1)
        as_q8 = np.concatenate([blk[..., :2], np.asarray(cpu_qmatmul.IQ4NL_VALUES, np.int8)[nib].view(np.uint8)], -1)
        tiny = np.array([[ggml_ref.vec_dot("Q8_0", as_q8[n].reshape(-1), y) for n in range(N)] for y in ys])
        for on in (True, False):
            with cpu_qmatmul.llama_q4k_repack(on):
                for prompt in (False, True):
                    got = cpu_qmatmul.matmul_q8("IQ4_NL", x, pm.qs, pm.d, prompt=prompt)
                    if N % 8 == 0 and on:
                        np.testing.assert_array_equal(got, ggml_ref.q4_0_repacked(raw, x, "IQ4_NL"))
                    else:
                        np.testing.assert_array_equal(got, tiny if prompt else dots)
                    one = cpu_qmatmul.matmul_q8("IQ4_NL", x[3:4], pm.qs, pm.d, prompt=prompt)[0]
                    np.testing.assert_array_equal(one, dots[3] if N % 8 or not on else got[3])
        if nb > 1:
            assert not np.array_equal(tiny, dots)  # the arithmetics do differ somewhere
            if N % 8 == 0:
                assert not np.array_equal(ggml_ref.q4_0_repacked(raw, x, "IQ4_NL"), dots)


@pytest.mark.parametrize("fmt", ["IQ4_NL", "IQ4_XS"])
def test_iq4_quantizer_writes_llama_cpps_bytes(fmt):
    """`quantize_iq4_nl` (ours, NumPy: the gguf package has no IQ4_NL / IQ4_XS quantizer) makes llama.cpp's
    choices (its compiled `quantize_iq4_nl` / `quantize_iq4_xs`, no importance matrix) on random rows of several
    scales, a row of zeros, a zero super-block and a row with one large value: the same bytes for >= 98 % of
    the blocks (ours sums in float64, llama.cpp in float32: a near-tie of two tries' fits can go the other
    way), and no block of 32 reconstructed worse than 1.05x llama.cpp's squared error (measured: <= 1.005x; in
    all 0.87-1.0x)."""
    from tests import ggml_ref

    bb, per = (18, 32) if fmt == "IQ4_NL" else (136, 256)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        w = (rng.standard_normal((40, 512)) * rng.uniform(1e-3, 10, (40, 1))).astype(np.float32)
        w[5] = 0.0
        w[6, 17] = 1e3
        w[7, :256] = 0.0
        ours, theirs = quantize_iq4_nl(w, super_block=fmt == "IQ4_XS"), ggml_ref.quantize_iq4_nl(w, fmt)
        assert ours.shape == theirs.shape == (40, 512 // per * bb)
        assert (ours.reshape(40, -1, bb) == theirs.reshape(40, -1, bb)).all(-1).mean() >= 0.98
        err = [((quants.dequantize(q, getattr(QT, fmt)) - w) ** 2).reshape(40, 16, 32).sum(-1) for q in (ours, theirs)]
        assert (err[0] <= 1.05 * err[1] + 1e-30).all()
        np.testing.assert_array_equal(ours[5], theirs[5])  # zeros: d = 0
        np.testing.assert_array_equal(ours[7, :bb], theirs[7, :bb])


def test_q8_activation_blocks_are_the_twins_bit_for_bit():
    """The kernels' activation quantisers (blocks of 32 and Q8_K's 256) find each block's largest |x| through
    the float bits with the sign cleared (an integer maximum): the same blocks as the NumPy twin's float
    maximum, bit for bit, where the largest sits at every position, is negative, is a subnormal, is a tie with
    its negation, beside an all-zero block and blocks spanning 60 binary orders of magnitude."""
    rng = np.random.default_rng(33)
    R, K = 40, 512
    x = (rng.standard_normal((R, K)) * rng.uniform(1e-3, 1e3, (R, 1))).astype(np.float32)
    for j in range(32):  # row j: the largest |x| of every block at position j, negative on odd rows
        x[j, j::32] = np.float32(-5e3 if j % 2 else 5e3)
    x[32] = 0.0
    x[33] = (rng.standard_normal(K) * 1e-40).astype(np.float32)  # subnormals only
    assert np.all(np.abs(x[33][x[33] != 0]) < np.finfo(np.float32).tiny)
    x[34, :32] = np.float32(-7.25)
    x[34, 5] = np.float32(7.25)  # the largest magnitude twice, both signs
    x[35] = (rng.standard_normal(K) * np.exp2(rng.integers(-30, 30, K))).astype(np.float32)
    x[36, ::2] = -0.0
    for k in (False, True):
        want = cpu_qmatmul.quantize_rows(x, "numpy", k=k)
        got = cpu_qmatmul.quantize_rows(x, k=k)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
