"""int8 / int4 weights quantised at load are cached on disk (issue 13): the second load reads the cache
(quantising is then impossible and not needed), gives the same blocks and the same logits; a corrupt cache
file is detected and rebuilt; a failed write leaves nothing under a final name; a changed model file gets a
new cache entry."""

from __future__ import annotations

import os

import numpy as np
import pytest




# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


from engine.llm import qweights  # noqa: E402
from engine.llm.cache import FullCache  # noqa: E402
from engine.llm.load import load_llm, quant_cache_file  # noqa: E402

IDS = [4, 8, 15, 16, 23, 42]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _logits(m):
    a = m.model.args
    return m.model.prefill(FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 32), 0, IDS, all_logits=True)


def _blocks(m):
    return {k: [a.copy() for _, a in p._arrays()] for k, p in qweights.packed_modules(m.model).items()}


def _no_quantising(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("quantised although the cache holds the blocks")
    monkeypatch.setattr(qweights.Packed, "quantize", refuse)


@pytest.mark.parametrize("weights,fmt,act", [("int8", "Q8_0", "fp32"), ("int4", "Q4_1", "fp32"),
                                            ("int4", "Q4_1", "q8_fast")])
def test_second_load_reads_the_cache(tmp_path, hf_folder, monkeypatch, weights, fmt, act):
    """q8_fast: the model's Q4_1 matrices interleaved by 8 rows, the cache in llama.cpp's layout (a cache of
    Q4_1x8 blocks would be refused as another format: no "hit")."""
    from atelier_kernels import cpu_qmatmul

    cache = tmp_path / "cache"
    msgs: list[str] = []
    first = load_llm(str(hf_folder), cache, weights=weights, progress=msgs.append, activations=act)
    if act == "q8_fast" and cpu_qmatmul.q8_available():
        assert first.model.layers[0].w2.formats == [cpu_qmatmul.X8_FORMAT]
    path = quant_cache_file(hf_folder, cache, weights)
    assert first.extra["qcache"] == "written" and path.is_file()
    assert any("quantising" in m for m in msgs)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    with monkeypatch.context() as mp:
        _no_quantising(mp)
        msgs.clear()
        second = load_llm(str(hf_folder), cache, weights=weights, progress=msgs.append, activations=act)
    assert second.extra["qcache"] == "hit" and any("from the cache" in m for m in msgs)
    assert fmt in second.weights and second.model.packed
    b1, b2 = _blocks(first), _blocks(second)
    assert b1.keys() == b2.keys() and len(b1) == 2 * 4 + 1  # 4 projections per layer + the tied embedding
    for k in b1:
        for x, y in zip(b1[k], b2[k], strict=True):
            np.testing.assert_array_equal(x, y)
    assert (_logits(first) - _logits(second)).abs().max() == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, hf_folder, damage):
    cache = tmp_path / "cache"
    good = load_llm(str(hf_folder), cache, weights="int4")
    path = quant_cache_file(hf_folder, cache, "int4")
    data = bytearray(path.read_bytes())
    if damage == "flip":  # inside the first member's data: its CRC-32 no longer matches
        for i in range(200, 240):
            data[i] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(qweights.CorruptCache, match=path.name):
        qweights.load_quantized(path, "Q4_1")
    again = load_llm(str(hf_folder), cache, weights="int4")
    assert again.extra["qcache"] == "rebuilt"
    assert (_logits(again) - _logits(good)).abs().max() == 0
    assert qweights.load_quantized(path, "Q4_1").keys() == qweights.packed_modules(good.model).keys()
    assert load_llm(str(hf_folder), cache, weights="int4").extra["qcache"] == "hit"


def test_cache_of_another_format_is_refused(tmp_path, hf_folder):
    cache = tmp_path / "cache"
    load_llm(str(hf_folder), cache, weights="int8")
    with pytest.raises(qweights.CorruptCache, match="expected Q4_1"):
        qweights.load_quantized(quant_cache_file(hf_folder, cache, "int8"), "Q4_1")


def test_failed_write_caches_nothing_under_a_final_name(tmp_path, hf_folder, monkeypatch):
    cache = tmp_path / "cache"
    real = np.savez

    def half_then_fail(f, **arrays):
        real(f, **dict(list(arrays.items())[:3]))  # some bytes reach the temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_fail)
    m = load_llm(str(hf_folder), cache, weights="int8")
    assert m.extra["qcache"] == "unwritable" and m.model.packed  # the model itself still loads
    folder = quant_cache_file(hf_folder, cache, "int8").parent
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(np, "savez", real)
    assert load_llm(str(hf_folder), cache, weights="int8").extra["qcache"] == "written"


def test_a_changed_model_file_gets_a_new_cache_entry(tmp_path, hf_folder):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(hf_folder, folder)
    cache = tmp_path / "cache"
    before = quant_cache_file(folder, cache, "int8")
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = quant_cache_file(folder, cache, "int8")
    assert before != after and before.parent == after.parent
    assert quant_cache_file(folder, cache, "int4") != after
