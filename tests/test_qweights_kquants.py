"""GGUF Q2_K / Q3_K / Q4_K / Q5_K / Q6_K blocks kept packed (issue 13): the block decoding and the Numba kernels against
independent oracles (`gguf.quants.dequantize`, float64 NumPy), our Q4_K/Q5_K/Q6_K quantiser checked through
`gguf.quants.dequantize` (the `gguf` package decodes the K formats but cannot write them), and a tiny
llama GGUF of K blocks loaded by our loader against transformers' de-quantising GGUF loader."""

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

from engine.llm.cache import FullCache  # noqa: E402
from engine.llm.gguf_load import CorruptGGUF, read_gguf  # noqa: E402
from engine.llm.load import load_llm  # noqa: E402
from atelier_kernels._numba import IQ4NL_VALUES  # noqa: E402
from engine.llm.qweights import BLOCK_BYTES, Packed, quantize_blocks  # noqa: E402
from tests.fused_twin import fused_and_layer_by_layer  # noqa: E402
from atelier_kernels import cpu_qmatmul  # noqa: E402

KF = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS")  # kept packed, on fp32 or Q8_K activations
KF_ALL = KF
D_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82),
             "IQ4_XS": (0,)}  # the fp16 scales


def random_blocks(fmt: str, n: int, nb: int, seed: int) -> np.ndarray:
    """Random bytes as K blocks (every bit pattern of qs / qh / scales), with finite positive fp16 scales."""
    rng = np.random.default_rng(seed)
    bb = BLOCK_BYTES[fmt]
    raw = rng.integers(0, 256, (n, nb, bb), dtype=np.uint8)
    for o in D_OFFSETS[fmt]:
        d = rng.uniform(1e-4, 0.05, (n, nb)).astype(np.float16)
        raw[..., o:o + 2] = d.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * bb)


@pytest.mark.parametrize("fmt", KF_ALL)
def test_k_blocks_decode_like_gguf(fmt):
    raw = random_blocks(fmt, 37, 3, seed=1)
    want = quants.dequantize(raw, getattr(QT, fmt))  # the gguf package's own decoder: the oracle
    pm = Packed.from_blocks(fmt, raw)
    assert pm.shape == (37, 768) and pm.nbytes == raw.nbytes  # the split adds no byte
    np.testing.assert_allclose(pm.dequant64(), want, rtol=3e-7, atol=0)  # gguf computes d * s in fp32
    for backend in (None, "numpy"):
        got = cpu_qmatmul.dequant(fmt, pm.qs, pm.d, pm.m, backend=backend, sc=pm.sc, qh=pm.qh)
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)  # d * s * q: fp32 product order
    np.testing.assert_allclose(pm.dequant(5, 19), want[5:19], rtol=3e-7, atol=0)
    np.testing.assert_allclose(pm.rows(np.array([36, 0, 7])).dequant(), want[[36, 0, 7]], rtol=3e-7, atol=0)
    two = Packed.concat([pm.rows(slice(0, 4)), pm.rows(slice(30, 37))])
    np.testing.assert_allclose(two.dequant(), want[list(range(4)) + list(range(30, 37))], rtol=3e-7, atol=0)


@pytest.mark.parametrize("fmt", KF_ALL)
@pytest.mark.parametrize("R", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("N,nb", [(1, 1), (7, 3), (130, 2)])
def test_k_matmul_matches_float64(fmt, R, N, nb):
    rng = np.random.default_rng(R * 1000 + N + nb)
    raw = random_blocks(fmt, N, nb, seed=N + nb)
    pm = Packed.from_blocks(fmt, raw)
    K = nb * 256
    x = rng.standard_normal((R, K)).astype(np.float32)
    w64 = quants.dequantize(raw, getattr(QT, fmt)).astype(np.float64)
    want = x.astype(np.float64) @ w64.T
    tol = 8 * K * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w64).T).max()  # fp32 dot-product bound
    for backend in (None, "numpy"):
        got = cpu_qmatmul.matmul(fmt, x, pm.qs, pm.d, pm.m, backend=backend, sc=pm.sc, qh=pm.qh)
        assert got.dtype == np.float32 and got.shape == (R, N)
        assert np.abs(got - want).max() <= tol, (backend, np.abs(got - want).max(), tol)


def _q8k_llama(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's `quantize_row_q8_K_ref` (ggml-quants.c) transcribed line by line, in fp32: x [R, K] ->
    (qs int8 [R, K], d fp32 [R, K / 256], bsums int [R, K / 16]). The oracle of our Q8_K activations."""
    R, K = x.shape
    qs = np.zeros((R, K), np.int8)
    d = np.zeros((R, K // 256), np.float32)
    bsums = np.zeros((R, K // 16), np.int64)
    for r in range(R):
        for i in range(K // 256):
            blk = x[r, i * 256:(i + 1) * 256]
            mx = amax = np.float32(0.0)
            for v in blk:  # the first value of the largest magnitude, with its sign
                if abs(v) > amax:
                    amax, mx = abs(v), v
            if not amax:
                continue
            iscale = np.float32(-127.0) / mx
            val = (iscale * blk).astype(np.float32) + np.float32(12582912.0)  # nearest_int: the float's mantissa
            v = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
            qs[r, i * 256:(i + 1) * 256] = np.minimum(127, v)
            bsums[r, i * 16:(i + 1) * 16] = qs[r, i * 256:(i + 1) * 256].astype(np.int64).reshape(16, 16).sum(1)
            d[r, i] = np.float32(1.0) / iscale
    return qs, d, bsums


def test_q8k_activations_are_llama_cpps_quantize_row_q8_k():
    """`quantize_rows(k=True)` (kernel and twin) against llama.cpp's Q8_K quantiser transcribed: every de-quantised
    value d x q equal (llama.cpp's q and d are ours negated where the largest |x| is positive: the same products),
    xs llama.cpp's bsums (up to that sign), on random rows, an all-zero super-block, one whose
    largest |x| is negative and one where every x x 127 / max|x| is a tie at .5."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((5, 4 * 256)) * rng.uniform(0.01, 50, (5, 1))).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 256:512] = -np.abs(x[2, 256:512])
    x[2, 300] = -1e3  # the largest magnitude, negative
    x[3, 512:768] = (np.arange(256) % 127 - 63 + 0.5).astype(np.float32) / 2  # x x 2: k + .5
    x[3, 512] = np.float32(63.5)  # 127 / 63.5 = 2
    qs, d, bsums = _q8k_llama(x)
    want = qs.astype(np.float64) * np.repeat(d, 256, axis=1)
    for backend in ("numpy", None):
        xq, dx, xs = cpu_qmatmul.quantize_rows(x, backend, k=True)
        q = xq.reshape(5, -1).astype(np.int64)
        got = q.astype(np.float64) * np.repeat(dx, 32, axis=1)
        np.testing.assert_array_equal(got, want)
        sign = np.where(np.repeat(d, 16, axis=1) * np.repeat(dx[:, ::8], 16, axis=1) < 0, -1, 1)
        np.testing.assert_array_equal(sign * q.reshape(5, -1, 16).sum(-1), bsums)
        np.testing.assert_array_equal(sign * xs.view(np.int16), bsums)  # the bsums, in xs's bytes
    ties = x[3, 513:768].astype(np.float64) * 2  # the case is what it says: every product a tie
    assert np.all(ties - np.floor(ties) == 0.5)
    with pytest.raises(ValueError, match="whole blocks of 256"):
        cpu_qmatmul.quantize_rows(x[:, :288], k=True)


@pytest.mark.parametrize("fmt", KF)
def test_k_blocks_on_q8_activations_are_the_quantised_product(fmt):
    """The K types with Q8 activations (`matmul_q8`, what "auto" runs where the CPU has AVX2): x quantised as
    llama.cpp quantises it for these types (Q8_K, one scale per 256 values), each block of 32 of the weights
    against it (Q4_K's as a Q4_1 block whose scale and min are d x scale_j and -dmin x min_j, Q6_K's as a
    signed block, q - 32, with one scale per 16 values). Oracle: the gguf package's own decoding times
    llama.cpp's Q8_K activations (`_q8k_llama`) in float64. Every tile of `q8a_span` (13 rows: a group of 8,
    one of 4, one more; 4 weight rows at a time for the last) gives each row the bits it gets alone."""
    rng = np.random.default_rng(11)
    N, nb, R = 37, 3, 13
    raw = random_blocks(fmt, N, nb, seed=5)
    pm = Packed.from_blocks(fmt, raw)
    w64 = quants.dequantize(raw, getattr(QT, fmt)).astype(np.float64)
    x = rng.standard_normal((R, nb * 256)).astype(np.float32)
    qs, d, _ = _q8k_llama(x)
    ref = (qs.astype(np.float64) * np.repeat(d, 256, axis=1)) @ w64.T
    for backend in ("numpy", None):
        got = cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m, backend=backend, sc=pm.sc, qh=pm.qh)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    for r in range(R):
        one = cpu_qmatmul.matmul_q8(fmt, x[r:r + 1], pm.qs, pm.d, pm.m, sc=pm.sc, qh=pm.qh)
        np.testing.assert_array_equal(one[0], got[r])
    exact = x.astype(np.float64) @ w64.T  # the activations' int8 rounding: well under 1 % here
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("fmt", KF_ALL)
def test_quantize_k_round_trips_through_gguf(fmt):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((9, 512)) * rng.uniform(0.01, 3, (9, 1))).astype(np.float32)
    w[3, :256] = 0.0  # an all-zero super-block
    w[4, 40:72] = np.abs(w[4, 40:72])  # a sub-block with no negative value
    raw = quantize_blocks(w, fmt)  # quantize_k, IQ4_XS: quantize_iq4_nl (its match with llama.cpp's quantizer:
    # tests/test_qweights.py)
    assert raw.dtype == np.uint8 and raw.shape == (9, 2 * BLOCK_BYTES[fmt])
    back = quants.dequantize(raw, getattr(QT, fmt)).astype(np.float64)
    group = 16 if fmt in ("Q6_K", "Q3_K", "Q2_K") else 32
    g = w.astype(np.float64).reshape(9, -1, group)
    err = np.abs(back.reshape(g.shape) - g).max(-1)
    top = np.abs(g).max(axis=(1, 2))[:, None]  # each row's largest magnitude
    if fmt == "IQ4_XS":  # half the table's widest step (24 of 127) at the block's scale (d ~ absmax / 127, the
        # search may stretch it ~6 %), plus the 6-bit scale's rounding against the super-block's largest (/ 32)
        bound = np.abs(g).max(-1) * 12 / 127 * 1.1 + top / 127 * 127 / 64 * 1.1
    elif fmt == "Q3_K":  # a step of absmax / 4 per group (the largest positive value clipped to 3 steps), scales
        # rounded up against the super-block's largest / 31
        bound = np.abs(g).max(-1) / 4 + top / 4 / 31 * 1.05
    elif fmt == "Q2_K":  # half a step of (max - min(min, 0)) / 3, plus the 4-bit scale's and min's rounding
        span = g.max(-1) - np.minimum(g.min(-1), 0)
        bound = span / 3 * 0.5 + top / 15 * 1.05 * 2.5
    elif fmt != "Q6_K":  # a step of (max - min(min, 0)) / 15 (Q5_K: / 31) per sub-block, plus the 6-bit min's rounding
        levels = 15 if fmt == "Q4_K" else 31
        bound = (g.max(-1) - np.minimum(g.min(-1), 0)) / levels * 0.5 + np.abs(g).max(axis=(1, 2))[:, None] / 63 * 1.05
    else:  # a step of absmax / 31 per group, rounded to int8 scales against the super-block's largest
        bound = np.abs(g).max(-1) / 31 * 0.5 + np.abs(g).max(axis=(1, 2))[:, None] / 31 / 127 * 32
    assert (err <= bound + 1e-7).all(), (err / (bound + 1e-12)).max()
    np.testing.assert_array_equal(back[3, :256], 0.0)
    assert Packed.quantize(w, fmt).nbytes == raw.nbytes


def test_k_matmul_rejects_bad_arrays():
    pm = Packed.from_blocks("Q6_K", random_blocks("Q6_K", 2, 1, 0))
    with pytest.raises(ValueError, match="are not Q6_K blocks"):
        cpu_qmatmul.matmul("Q6_K", np.ones((1, 256), np.float32), pm.qs, pm.d, sc=pm.sc)  # no qh
    p5 = Packed.from_blocks("Q5_K", random_blocks("Q5_K", 2, 1, 0))
    assert p5.qs.shape == (2, 1, 160) and p5.qh is None  # the 32 high-bit bytes after the 128 nibble bytes
    with pytest.raises(ValueError, match="are not Q5_K blocks"):  # Q4_K's 128 bytes per super-block
        cpu_qmatmul.matmul("Q5_K", np.ones((1, 256), np.float32), p5.qs[..., :128].copy(), p5.d, p5.m, sc=p5.sc)
    with pytest.raises(ValueError, match=r"x \(1, 32\)"):
        pm.matmul(np.ones((1, 32), np.float32))
    with pytest.raises(ValueError, match="rows must be whole blocks of 256"):
        Packed.quantize(np.ones((2, 96), np.float32), "Q4_K")


# -- a tiny GGUF of K blocks ----------------------------------------------------------------------
D, H, KVH, HD, INTER, LAYERS, VOCAB = 256, 4, 2, 64, 512, 2, 160


def _k_writer(path: Path, layers: int = LAYERS) -> gguf.GGUFWriter:
    """A GGUF writer with this file's tiny llama metadata (tensors to be added)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, layers), (w.add_context_length, 256), (w.add_embedding_length, D),
                   (w.add_feed_forward_length, INTER), (w.add_head_count, H), (w.add_head_count_kv, KVH),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0),
                   (w.add_rope_dimension_count, HD), (w.add_vocab_size, VOCAB), (w.add_file_type, 15)):
        add(v)
    return w


def write_k_gguf(path: Path, seed: int = 0, tie: bool = True, main: str = "Q4_K") -> Path:
    """A random 2-layer llama GGUF as llama.cpp's Q4_K_M mixes it: Q4_K matrices, Q6_K attn_v / ffn_down
    (and the embedding / output head), F32 norms; main="Q5_K": as its Q5_K_M (Q5_K matrices)."""
    rng = np.random.default_rng(seed)
    w = _k_writer(path)

    def mat(name: str, n: int, k: int, fmt: str, scale: float = 0.1) -> None:
        x = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        w.add_tensor(name, quantize_blocks(x, fmt), raw_dtype=getattr(QT, fmt))

    def vec(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))

    mat("token_embd.weight", VOCAB, D, "Q6_K", 1.0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight")
        mat(p + "attn_q.weight", H * HD, D, main)
        mat(p + "attn_k.weight", KVH * HD, D, main)
        mat(p + "attn_v.weight", KVH * HD, D, "Q6_K")
        mat(p + "attn_output.weight", D, H * HD, main)
        vec(p + "ffn_norm.weight")
        mat(p + "ffn_gate.weight", INTER, D, main)
        mat(p + "ffn_up.weight", INTER, D, main)
        mat(p + "ffn_down.weight", D, INTER, "Q6_K", 0.05)
    vec("output_norm.weight")
    if not tie:
        mat("output.weight", VOCAB, D, "Q6_K")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie,main", [(True, "Q4_K"), (True, "Q5_K"), (True, "Q3_K"),
                                      (True, "Q2_K"), (True, "IQ4_XS")])  # the tied head: the Q6_K embedding
def test_k_gguf_is_the_network_transformers_loads(tmp_path, tie, main):
    from transformers import AutoModelForCausalLM

    path = write_k_gguf(tmp_path / f"tiny-k-{tie}.gguf", seed=int(tie), tie=tie, main=main)
    ours = load_llm(str(path), tmp_path / "cache", activations="fp32")  # the de-quantised network exactly
    assert ours.model.packed and ours.native and not ours.note
    assert ours.model.layers[0].wqkv.formats == [main, "Q6_K"]  # q/k stacked, v apart
    assert main in ours.weights and "Q6_K" in ours.weights
    blocks = sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)
    assert blocks <= ours.size_bytes() <= blocks + 4096 * 16  # + the rope tables
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = [3, 17, 99, 5, 42, 7, 150, 1]
    a = ours.model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)
    got = ours.model.prefill(cache, 0, ids, all_logits=True)
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-4 * want.abs().max() + 1e-5
    nxt, mine = int(got[-1].argmax()), []
    for _ in range(20):
        mine.append(nxt)
        nxt = int(ours.model.decode(cache, [0], [nxt])[0].argmax())
    with torch.inference_mode():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(ids):].tolist()
    assert mine == theirs
    if main != "Q4_K":  # the default activations where AVX2 runs: the Q5_K / Q3_K / Q2_K / IQ4_XS and Q6_K parts on
        # Q8_K, in the fused step
        q8 = load_llm(str(path), tmp_path / "cache", activations="auto")
        assert q8.model.packed and not q8.note and q8.model.layers[0].wqkv.formats == [main, "Q6_K"]
        assert q8.model._np_step.fused is not None
        got8 = q8.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128), 0, ids, all_logits=True)
        # the activations rounded to 8 bits before every product of this random network: ~2 % of the logits'
        # range here (a wrong block decoding is of the order of the logits themselves)
        assert (got8 - want).abs().max() < 0.05 * want.abs().max()
    # a long prompt through the torch forward: K blocks de-quantised chunk by chunk into the scratch
    long_ids = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, 70)]
    got_long = ours.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128), 0, long_ids)
    with torch.inference_mode():
        want_long = ref(torch.tensor([long_ids])).logits[0, -1]
    assert (got_long - want_long).abs().max() < 1e-4 * want_long.abs().max() + 1e-5


def test_k_rows_not_whole_super_blocks_are_refused(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(1)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((4, 144), np.uint8), raw_dtype=QT.Q4_K)  # 4 x 256: fine
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    # rewrite the tensor's first dimension 256 -> 96 in the header: rows that are not whole super-blocks
    i = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4
    assert int.from_bytes(data[i:i + 8], "little") == 256
    data[i:i + 8] = (96).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptGGUF, match=r"odd\.gguf: tensor token_embd\.weight \(Q4_K\) rows of 96 are not whole "
                                          r"blocks of 256"):
        read_gguf(path)


def test_fused_q8_step_runs_k_quant_products_as_the_layer_by_layer_step(tmp_path):
    """A Q4_K_M-style mix: projections of one block type (Q8_0, Q4_K, Q6_K, Q3_K, Q2_K) and projections whose parts have
    different types side by side (q and k in Q5_0 beside a Q6_K v; q, k and v in three types; gate Q4_K beside
    up Q5_1), as llama.cpp's quantizer writes them. The fused Q8 step (`atelier_kernels.cpu_step`) runs every
    part in the one parallel call, on Q8 activations (the K types on Q8_K), each into its own columns: the same
    logits bit for bit as the layer-by-layer path, for prompts of nine slots and steps of 1, 2, 5 and 9 rows."""
    from atelier_kernels import cpu_step

    rng = np.random.default_rng(3)
    path = tmp_path / "mixed.gguf"
    w = _k_writer(path, 4)

    def mat(name: str, n: int, k: int, fmt: str, scale: float = 0.1) -> None:
        x = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        raw = quantize_blocks(x, fmt)
        w.add_tensor(name, raw, raw_dtype=getattr(QT, fmt))

    mat("token_embd.weight", VOCAB, D, "Q8_0", 1.0)
    # per layer: (q, k, v), output, (gate, up), down
    layers = ((("Q8_0",) * 3, "Q8_0", ("Q4_K",) * 2, "Q3_K"),
              (("Q4_K",) * 3, "Q6_K", ("Q8_0", "IQ4_XS"), "Q5_K"),
              (("Q5_0", "Q5_0", "Q6_K"), "Q5_1", ("Q4_K", "Q5_1"), "Q2_K"),
              (("Q4_K", "Q5_0", "Q8_0"), "Q4_0", ("Q4_1", "IQ4_NL"), "Q5_0"))
    for i, (qkv, out, gu, down) in enumerate(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        for name, n, fmt in zip(("attn_q", "attn_k", "attn_v"), (H * HD, KVH * HD, KVH * HD), qkv):
            mat(p + name + ".weight", n, D, fmt)
        mat(p + "attn_output.weight", D, H * HD, out)
        w.add_tensor(p + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        mat(p + "ffn_gate.weight", INTER, D, gu[0])
        mat(p + "ffn_up.weight", INTER, D, gu[1])
        mat(p + "ffn_down.weight", D, INTER, down, 0.05)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = load_llm(str(path), tmp_path / "cache", activations="q8")
    step = ours.model._np_step
    assert (step.fused is not None) == cpu_step.available()
    if step.fused is None:  # no Numba / AVX2 here: the layer-by-layer path is the only one
        return
    # every block type (Q4_0, its rows a multiple of 8, as llama.cpp repacks it: kind 3)
    # (Q4_1x8, kind X8, only where the activations are q8_fast)
    assert sorted(set(step.fused.pkind.tolist())) == sorted({3 if k == 0 else k for k in cpu_step.KIND.values()
                                                             if k != cpu_qmatmul.X8})
    assert step.fused.pcount.max() == 3  # q, k and v in three types: three parts side by side
    fused, plain = fused_and_layer_by_layer(step, ours.model.args)
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)


@pytest.mark.parametrize("fmt", KF)
def test_k_q8_tiles_give_every_pair_the_same_bits(fmt):
    """The K types' tile intrinsics (`_numba._q8k_rows_codegen`, kinds 5 / 6 / 11; Q3_K / Q2_K's
    `_q8k_low2_codegen`, kinds 13 / 15; IQ4_XS's `_iq4xs_rows_codegen`, kind 18): every (weight row, activation
    row) of the 4 x 1, 1 x 4 and 1 x 8 tiles equals the 1 x 1 tile's bits, and the float64 product to fp32
    rounding."""
    from numba import njit

    from atelier_kernels._numba import has_avx2, jit, q8_tile_dot_intrinsic

    assert jit() is not None and has_avx2()
    kind = {"Q4_K": 5, "Q6_K": 6, "Q5_K": 11, "Q3_K": 13, "Q2_K": 15, "IQ4_XS": 18}[fmt]
    W, R, nbk = 4, 8, 2
    nb = nbk * 8
    raw = random_blocks(fmt, W, nbk, seed=9)
    pm = Packed.from_blocks(fmt, raw)
    wf, df = pm.qs.reshape(-1).view(np.uint8), pm.d.reshape(-1)
    mf = pm.qh.reshape(-1).view(np.uint16) if fmt == "Q6_K" else (pm.d if pm.m is None else pm.m).reshape(-1)
    scf = pm.sc.reshape(-1).view(np.uint8)
    x = np.random.default_rng(2).standard_normal((R, nb * 32)).astype(np.float32)
    xq, dx, xs = cpu_qmatmul.quantize_rows(x, k=True)
    dxf, xsf, xr = dx.reshape(-1), xs.reshape(-1), nb * 32
    wr = nbk * {"Q5_K": 160, "Q3_K": 96, "Q2_K": 64}.get(fmt, 128)  # weight bytes per row; scales per row: nbk
    want = cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m, backend="numpy", sc=pm.sc, qh=pm.qh)
    t11, t41, t14, t18 = (q8_tile_dot_intrinsic(kind, nw, n) for nw, n in ((1, 1), (4, 1), (1, 4), (1, 8)))

    @njit
    def run(xq):  # noqa: ANN001, ANN202
        one = np.empty((R, W), np.float32)
        w4 = np.empty((R, W), np.float32)
        r4 = np.empty((4, W), np.float32)
        r8 = np.empty((R, W), np.float32)
        for j in range(R):
            for t in range(W):
                one[j, t] = t11(wf, t * wr, df, t * nbk, xq, j * xr, dxf, j * nb, mf, xsf, scf, nb)
            a = t41(wf, 0, wr, 2 * wr, 3 * wr, df, 0, nbk, 2 * nbk, 3 * nbk, xq, j * xr, dxf, j * nb, mf,
                    xsf, scf, nb)
            for t in range(W):
                w4[j, t] = a[t]
        for t in range(W):
            a4 = t14(wf, t * wr, df, t * nbk, xq, 0, xr, 2 * xr, 3 * xr, dxf, 0, nb, 2 * nb, 3 * nb, mf, xsf,
                     scf, nb)
            a8 = t18(wf, t * wr, df, t * nbk, xq, 0, xr, 2 * xr, 3 * xr, 4 * xr, 5 * xr, 6 * xr, 7 * xr, dxf,
                     0, nb, 2 * nb, 3 * nb, 4 * nb, 5 * nb, 6 * nb, 7 * nb, mf, xsf, scf, nb)
            for j in range(4):
                r4[j, t] = a4[j]
            for j in range(8):
                r8[j, t] = a8[j]
        return one, w4, r4, r8

    one, w4, r4, r8 = run(xq)
    np.testing.assert_allclose(one, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(w4, one)
    np.testing.assert_array_equal(r4, one[:4])
    np.testing.assert_array_equal(r8, one)


def _fma32(a, b, c) -> np.float32:  # noqa: ANN001 - fp32 a x b + c, one rounding (the product is exact in float64)
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _llama_k_dot(fmt: str, block_row: np.ndarray, qs: np.ndarray, d: np.ndarray, bsums: np.ndarray,
                 mode: str) -> np.float32:
    """One (weight row, activation row) dot as llama.cpp computes it on x86 with AVX2 (0.3.36's sources), from
    the raw GGUF blocks and its own Q8_K activations (`_q8k_llama`). Q4_K, mode "gemv": its repacked 1-row
    kernel `ggml_gemv_q4_K_8x8_q8_K` (per super-block the integer sums of scale x dot and of min x bsum, each
    converted once into its own fp32 fused multiply-add chain, the second subtracted at the end); "gemm": its
    4-row kernel (the same, both chains stepping per 64 values); "dot": `ggml_vec_dot_q4_K_q8_K` (a matrix it
    does not repack: 8 int32 lanes of 4 bytes of each block into 8 chains times d_w x d_x, the mins in 4 lanes
    times -(dmin_w x d_x), hsum_float_8 plus the 4 lanes' sum); "tiled": its tiled K-quant matmul (per
    super-block r = d_w x the dot total, r - dmin_w x the min total fused, then r x d_x into one chain). Q6_K,
    "dot": `ggml_vec_dot_q6_K_q8_K` (8 int32 lanes, less 32 x bsum x scale per lane, into 8 chains, then
    hsum_float_8); "tiled": the tiled matmul (d_w x the integer total, then x d_x into one chain)."""
    def hsum8(v: np.ndarray) -> np.float32:
        lo4 = (v[4:] + v[:4]).astype(np.float32)
        return np.float32(np.float32(lo4[0] + lo4[2]) + np.float32(lo4[1] + lo4[3]))

    bb = BLOCK_BYTES[fmt]
    blocks = block_row.reshape(-1, bb)
    lanes, mlanes = np.zeros(8, np.float32), np.zeros(4, np.float32)
    acc = accm = np.float32(0.0)
    for i, blk in enumerate(blocks):
        xq = qs[i * 256:(i + 1) * 256].astype(np.int64)
        bs = bsums[i * 16:(i + 1) * 16].astype(np.int64)
        if fmt == "Q4_K":
            dw, dmin = blk[0:4].view(np.float16).astype(np.float32)
            sc_b, q4 = blk[4:16].astype(np.int64), blk[16:144]
            scales, mins = np.zeros(8, np.int64), np.zeros(8, np.int64)
            for j in range(8):  # ggml's get_scale_min_k4
                if j < 4:
                    scales[j], mins[j] = sc_b[j] & 63, sc_b[j + 4] & 63
                else:
                    scales[j] = (sc_b[j + 4] & 0xF) | ((sc_b[j - 4] >> 6) << 4)
                    mins[j] = (sc_b[j + 4] >> 4) | ((sc_b[j] >> 6) << 4)
            q = np.concatenate([np.concatenate([q4[32 * c:32 * c + 32] & 0xF, q4[32 * c:32 * c + 32] >> 4])
                                for c in range(4)]).astype(np.int64)
            prod = (q * xq).reshape(8, 8, 4).sum(2)  # [block, lane]
            isums = scales * prod.sum(1)
            imins = mins * bs.reshape(8, 2).sum(1)
            if mode in ("gemv", "gemm"):
                for lo, hi in ((0, 2), (2, 4), (4, 6), (6, 8)) if mode == "gemm" else ((0, 8),):
                    acc = _fma32(np.float32(int(isums[lo:hi].sum())), np.float32(dw * d[i]), acc)
                    accm = _fma32(np.float32(int(imins[lo:hi].sum())), np.float32(dmin * d[i]), accm)
            elif mode == "tiled":
                r = np.float32(dw * np.float32(int(isums.sum())))
                r = _fma32(-dmin, np.float32(int(imins.sum())), r)
                acc = _fma32(r, d[i], acc)
            else:
                dd, dm = np.float32(d[i] * dw), -np.float32(d[i] * dmin)
                sumi = (scales[:, None] * prod).sum(0)
                lanes = np.array([_fma32(dd, np.float32(v), a) for v, a in zip(sumi, lanes)], np.float32)
                m4 = imins[0::2] + imins[1::2]
                mlanes = np.array([_fma32(dm, np.float32(v), a) for v, a in zip(m4, mlanes)], np.float32)
            continue
        ql, qh, sc = blk[0:128], blk[128:192], blk[192:208].view(np.int8).astype(np.int64)
        dw = blk[208:210].view(np.float16).astype(np.float32)[0]
        q = np.zeros(256, np.int64)
        for h in range(2):  # ggml's dequantize_row_q6_K order, q unsigned (0 .. 63)
            lo, hb = ql[64 * h:64 * h + 64].astype(np.int64), qh[32 * h:32 * h + 32].astype(np.int64)
            q[128 * h:128 * h + 32] = (lo[:32] & 0xF) | ((hb & 3) << 4)
            q[128 * h + 32:128 * h + 64] = (lo[32:] & 0xF) | (((hb >> 2) & 3) << 4)
            q[128 * h + 64:128 * h + 96] = (lo[:32] >> 4) | (((hb >> 4) & 3) << 4)
            q[128 * h + 96:128 * h + 128] = (lo[32:] >> 4) | (((hb >> 6) & 3) << 4)
        prod = (q * xq).reshape(8, 8, 4).sum(2)  # [block, lane]
        scl = np.where(np.arange(8) < 4, sc[2 * np.arange(8)[:, None]], sc[2 * np.arange(8)[:, None] + 1])
        sumi = (scl * prod).sum(0) - 32 * (bs[0::2] * sc[0::2] + bs[1::2] * sc[1::2])
        if mode == "tiled":
            acc = _fma32(np.float32(dw * np.float32(int(sumi.sum()))), d[i], acc)
        else:
            dd = np.float32(d[i] * dw)
            lanes = np.array([_fma32(dd, np.float32(v), a) for v, a in zip(sumi, lanes)], np.float32)
    if fmt == "Q4_K" and mode in ("gemv", "gemm"):
        return np.float32(acc - accm)
    if mode == "tiled":
        return acc
    if fmt == "Q4_K":
        return np.float32(hsum8(lanes) + np.float32(np.float32(mlanes[0] + mlanes[2])
                                                    + np.float32(mlanes[1] + mlanes[3])))
    return hsum8(lanes)


@pytest.mark.parametrize("fmt,N,repack", [("Q4_K", 40, True), ("Q4_K", 37, True), ("Q4_K", 40, False),
                                          ("Q6_K", 37, True)])
def test_k_products_are_llama_cpps_bits(fmt, N, repack):
    """The K types on Q8_K activations give llama.cpp's own fp32 result bit for bit: oracle, its AVX2
    arithmetic transcribed in NumPy from the raw GGUF blocks and its own Q8_K quantiser (`_llama_k_dot`), every
    (weight row, activation row) through `matmul_q8` (each tile of `q8a_span`), for random blocks at several
    activation scales: a Q4_K matrix as llama.cpp repacks it (rows a multiple of 8) or does not (37 rows, or
    its extra buffers off: `llama_q4k_repack(False)`), Q6_K; one token per row, and a prompt's micro-batch of
    3, 7 or 11 rows (what llama.cpp computes for a batch: the 4-row repacked kernel on the rows in fours, the
    tiled matmul from 8 rows on)."""
    rng = np.random.default_rng(31)
    nb, R = 3, 7
    raw = random_blocks(fmt, N, nb, seed=17)
    pm = Packed.from_blocks(fmt, raw)
    plain = fmt == "Q4_K" and (N % 8 or not repack)

    def mode(r: int, rows: int, prompt: bool) -> str:
        if fmt == "Q4_K" and not plain:
            return "gemm" if prompt and r < rows - rows % 4 else "gemv"
        return "tiled" if prompt and rows >= 8 else "dot"

    x = (rng.standard_normal((R, nb * 256)) * rng.uniform(0.01, 30, (R, 1))).astype(np.float32)
    qs, d, bsums = _q8k_llama(x)
    with cpu_qmatmul.llama_q4k_repack(repack):
        want = np.array([[_llama_k_dot(fmt, raw[n], qs[r], d[r], bsums[r], mode(r, R, False)) for n in range(N)]
                         for r in range(R)])
        np.testing.assert_array_equal(cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m, sc=pm.sc, qh=pm.qh), want)
        x = (rng.standard_normal((11, nb * 256)) * 4).astype(np.float32)
        qs, d, bsums = _q8k_llama(x)
        for rows in (3, 7, 11):
            want = np.array([[_llama_k_dot(fmt, raw[n], qs[r], d[r], bsums[r], mode(r, rows, True))
                              for n in range(N)] for r in range(rows)])
            got = cpu_qmatmul.matmul_q8(fmt, x[:rows], pm.qs, pm.d, pm.m, sc=pm.sc, qh=pm.qh, prompt=True)
            np.testing.assert_array_equal(got, want)
            # a decoding batch keeps the one-token arithmetic: each row's bits as alone
            alone = cpu_qmatmul.matmul_q8(fmt, x[:1], pm.qs, pm.d, pm.m, sc=pm.sc, qh=pm.qh)
            batch = cpu_qmatmul.matmul_q8(fmt, x[:rows], pm.qs, pm.d, pm.m, sc=pm.sc, qh=pm.qh)
            np.testing.assert_array_equal(batch[:1], alone)
            if mode(0, rows, True) != mode(0, 1, False):
                assert not np.array_equal(got[:1], alone)  # the two arithmetics do differ somewhere


def _tiled_low2(fmt: str, pm: Packed, y: np.ndarray) -> np.float32:
    """One Q3_K / Q2_K / IQ4_XS weight row (pm, one row) . one Q8_K row (llama.cpp's bytes,
    `ggml_ref.quantize_q8_k`) as llama.cpp's tiled K-quant matmul computes it (`tiled_run_microtile`, 0.3.36's
    sources), which it runs for a micro-batch of 8 tokens or more: per super-block the exact integer totals
    s1 = sum_g scale_g sum q x and (Q2_K) s2 = sum_g min_g bsum_g, r = d_w x s1 (Q2_K: r - dmin_w x s2, one
    rounding), then r x d_x fused-multiply-added into one chain."""
    acc = np.float32(0.0)
    for i, yb in enumerate(y.reshape(-1, 292)):
        dy = yb[:4].view(np.float32)[0]
        xq, bs = yb[4:260].view(np.int8).astype(np.int64), yb[260:292].view(np.int16).astype(np.int64)
        if fmt == "IQ4_XS":  # sub-block k: nibbles of bytes 16k .. 16k + 15 (low, then high), table values
            nib = pm.qs[0, i].reshape(8, 16).astype(np.int64)
            q = np.asarray(IQ4NL_VALUES, np.int64)[np.concatenate([nib & 15, nib >> 4], -1)].reshape(256)
            s1 = int((np.repeat(cpu_qmatmul.iq4xs_scales(pm.sc[0, i]), 32) * q * xq).sum())
            acc = _fma32(np.float32(pm.d[0, i:i + 1].view(np.float16)[0].astype(np.float32) * np.float32(s1)), dy, acc)
            continue
        q = cpu_qmatmul._q2_bits(pm.qs[:, i:i + 1, :64])[0, 0]  # value order p = 128h + 32j + l
        if fmt == "Q3_K":  # bit 4h + j = p // 32 of hmask[p % 32] clear: q - 4
            p = np.arange(256)
            q = q - 4 * (1 - ((pm.qs[0, i, 64 + p % 32].astype(np.int64) >> (p // 32)) & 1))
            scales = cpu_qmatmul.q3k_scales(pm.sc[0, i])
        else:
            scales, mins = pm.sc[0, i].astype(np.int64) & 15, pm.sc[0, i].astype(np.int64) >> 4
        s1 = int((np.repeat(scales, 16) * q * xq).sum())
        r = np.float32(pm.d[0, i:i + 1].view(np.float16)[0].astype(np.float32) * np.float32(s1))
        if fmt == "Q2_K":
            dmin = pm.m[0, i:i + 1].view(np.float16)[0].astype(np.float32)
            r = _fma32(-dmin, np.float32(int((mins * bs).sum())), r)
        acc = _fma32(r, dy, acc)
    return acc


@pytest.mark.parametrize("fmt,N", [("Q5_K", 16), ("Q5_K", 13), ("Q3_K", 16), ("Q3_K", 13), ("Q2_K", 16),
                                   ("Q2_K", 13), ("IQ4_XS", 16), ("IQ4_XS", 13)])
def test_k_products_are_llama_cpps_compiled_bits(fmt, N):
    """Q5_K, Q3_K, Q2_K and IQ4_XS on Q8_K activations (`matmul_q8`: llama.cpp 0.3.36's AVX2 build repacks none of them,
    so every token takes its AVX2 dot product) against llama.cpp's own compiled `ggml_vec_dot_<type>_q8_K` on its
    own `quantize_row_q8_K` activations, called through ctypes (`tests/ggml_ref.py`): every (weight row,
    activation row) bit for bit, through every tile of the spans (11 rows: a group of 8, then 4 weight rows at a
    time), random blocks (every bit pattern of the values, high bits, scales and mins) at several activation
    scales. A prompt of 8 or more takes llama.cpp's tiled matmul arithmetic instead: Q3_K / Q2_K / IQ4_XS against its
    transcription (`_tiled_low2`) bit for bit, Q5_K to fp32 rounding (all three checked end to end against
    llama.cpp's logits in tests/test_q8_activations_llama_cpp.py)."""
    from tests import ggml_ref

    raw = random_blocks(fmt, N, 3, seed=N)
    pm = Packed.from_blocks(fmt, raw)
    rng = np.random.default_rng(N)
    x = (rng.standard_normal((11, 768)) * rng.uniform(0.01, 30, (11, 1))).astype(np.float32)
    ys = [ggml_ref.quantize_q8_k(row) for row in x]
    want = np.array([[ggml_ref.vec_dot(fmt, raw[n], y) for n in range(N)] for y in ys])
    np.testing.assert_array_equal(cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m, sc=pm.sc), want)
    for r in (0, 5):  # one token alone: the same bits
        np.testing.assert_array_equal(cpu_qmatmul.matmul_q8(fmt, x[r:r + 1], pm.qs, pm.d, pm.m, sc=pm.sc)[0],
                                      want[r])
    got = cpu_qmatmul.matmul_q8(fmt, x, pm.qs, pm.d, pm.m, sc=pm.sc, prompt=True)
    if fmt == "Q5_K":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    else:
        tiled = np.array([[_tiled_low2(fmt, pm.rows(slice(n, n + 1)), y) for n in range(N)] for y in ys])
        np.testing.assert_array_equal(got, tiled)
        assert not np.array_equal(tiled, want)  # the two arithmetics do differ somewhere
