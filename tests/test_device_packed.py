"""Packed weights placed on a device for the torch forward (issue 13: the GPU path), run here on CPU tensors:
the Triton weight-only products (`atelier_kernels.wq_matmul`) under TRITON_INTERPRET=1, and their float64 twins. The
oracle is transformers on the same tiny GGUF (it de-quantises the file to fp32)."""

from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it before any import of triton

from engine.llm.cache import FullCache  # noqa: E402
from engine.llm.load import load_llm  # noqa: E402
from engine.llm.qweights import PackedLinear  # noqa: E402
from tests.test_qweights import _greedy_hf, _greedy_ours, _hf, write_tiny_gguf  # noqa: E402
from tests.test_qweights_cache import hf_folder  # noqa: E402,F401  (a fixture: a tiny fp32 Llama folder)

# the offline environment and the torchvision shim before any model load (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("model_libraries")


@pytest.mark.parametrize("fmt,tie,impl", [("Q8_0", True, "triton"), ("Q4_0", False, "triton"),
                                          ("Q4_1", True, "triton"), ("Q4_1", False, "torch")])
def test_placed_gguf_is_the_network_transformers_loads(tmp_path, fmt, tie, impl):
    path = write_tiny_gguf(tmp_path / f"tiny-{fmt}.gguf", fmt, tie=tie, seed=3)
    m = load_llm(str(path), tmp_path / "cache", device_products=impl)
    model = m.model
    assert model.decode_step == "torch" and m.extra["placed"] == f"cpu ({impl})"
    assert f"packed on cpu ({impl})" in m.weights and fmt in m.weights
    lins = [mod for mod in model.modules() if isinstance(mod, PackedLinear)]
    assert lins and all(mod.placed is not None and mod.placed_impl == impl for mod in lins)
    # no fp32 copy of a matrix: the placed buffers are the blocks (bytes = the parts' packed bytes)
    for mod in lins:
        held = sum(b.numel() * b.element_size() for b in mod.buffers())
        assert held == sum(p.nbytes for p in mod.parts)
    ref = _hf(path)
    ids = [3, 17, 99, 5, 42, 7, 150, 1]
    a = model.args
    cache = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 128)
    got = model.prefill(cache, 0, ids, all_logits=True)
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-4 * want.abs().max() + 1e-5
    assert _greedy_ours(model, ids, 8) == _greedy_hf(ref, ids, 8)


def test_placed_batch_of_two_equals_each_alone(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_1", seed=4)
    model = load_llm(str(path), tmp_path / "cache", device_products="triton").model
    a = model.args
    prompts = [[3, 17, 99, 5], [42, 7, 150, 1, 9, 11]]
    alone = []
    for p in prompts:
        c = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 64)
        model.prefill(c, 0, p)
        alone.append(model.decode(c, [0], [12])[0])
    c2 = FullCache(a.n_layers, 2, a.n_kv_heads, a.head_dim, 64)
    for s, p in enumerate(prompts):
        model.prefill(c2, s, p)
    both = model.decode(c2, [0, 1], [12, 12])
    for i in range(2):
        assert (both[i] - alone[i]).abs().max() < 1e-4 * alone[i].abs().max() + 1e-6


def test_int8_folder_placed_matches_the_cpu_blocks(tmp_path, hf_folder):  # noqa: F811
    """models.llm_weights = "int8" from an fp32 folder, placed: the same Q8_0 blocks as on the CPU path (one
    quantiser, one cache file), so the same logits up to summation order."""
    folder = hf_folder
    cpu = load_llm(str(folder), tmp_path / "cache", weights="int8", activations="fp32")
    placed = load_llm(str(folder), tmp_path / "cache", weights="int8", device_products="triton")
    assert cpu.extra["qcache"] == "written" and placed.extra["qcache"] == "hit"
    assert "packed on cpu (triton)" in placed.weights
    ids = [1, 5, 9, 2, 7]
    a = cpu.model.args
    outs = []
    for m in (cpu, placed):
        c = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 32)
        outs.append(m.model.prefill(c, 0, ids, all_logits=True))
    assert (outs[0] - outs[1]).abs().max() < 1e-4 * outs[0].abs().max() + 1e-5


def test_backend_decision_for_packed_products():
    from engine.backends import resolve
    from atelier_kernels._backend import triton_available

    cpu = resolve(device=torch.device("cpu"), dtype=torch.float32)
    assert cpu.wq_matmul.impl == "cpu" and "cpu_qmatmul" in cpu.wq_matmul.why
    gpu = resolve(device=torch.device("cuda"), dtype=torch.float16)  # a decision only: no GPU is used
    assert gpu.wq_matmul.impl == ("triton" if triton_available() else "dequant")
    off = resolve(device=torch.device("cuda"), dtype=torch.float16, kernel_backend="torch")
    assert off.wq_matmul.impl == "dequant" and "engine.kernel_backend=torch" in off.wq_matmul.why
    with pytest.raises(ValueError, match="device_products='fast'"):
        load_llm("", "/nonexistent", device_products="fast")
