"""Issue 17 item 4 for whole tools: each call is costed before it works, and the cost is an upper bound.

Peak RSS (VmHWM reset through clear_refs) over the RSS before the call, in a
clean worker process (tests/rel_memory_worker.py) with glibc's mmap threshold
fixed at 64 KiB so every image-sized array is its own mapping (RSS follows the
bytes alive). Refusals are checked
with a small `limits.max_call_memory_mb`: the error names the argument, the
bytes needed and the limit, and nothing image-sized is allocated first.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.workmem import MemoryLimitExceeded  # issue 16 (H5): tools let the engine's refusal through unwrapped
from tests.fakectx import make_context
from tests.rel_memory_worker import Worker
from tests.reltools import reset_peak
from tools import color as color_tool
from tools import masks as mask_tool

MB = 1_000_000
H, W = 480, 640


@pytest.fixture(scope="module")
def worker():
    if not reset_peak():
        pytest.fail("these measurements need /proc/self/clear_refs (Linux)")
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(d / "a.png", compress_level=0)
    Image.fromarray(b).save(d / "b.png", compress_level=0)
    Image.fromarray(a[::2, ::2]).save(d / "small.png", compress_level=0)
    return d


@pytest.fixture(scope="module")
def tight_ctx(tmp_path_factory):
    c = make_context(tmp_path_factory.mktemp("ctx2"), limits={"max_call_memory_mb": 2})
    yield c
    c.engine.close()


MASK_CASES = [
    dict(operation="blur", expression="r > 100 & g < 200", feather=6.0, blur_radius=6.0),
    dict(operation="hue_shift", expression="h > 30 & s > 0.2", degrees=40.0, dilate=4),
    dict(operation="pixelate", shapes=[{"type": "ellipse", "box": [0.1, 0.1, 0.9, 0.9], "units": "relative"}],
         pixel_size=12, remove_small_objects=20, fill_holes=20),
    dict(operation="adjust", expression="gray > 90", brightness=1.2, erode=2, invert=True),
    dict(operation="fill", expression="delta_e(#808080) < 40 | l > 70", color="#ff8800"),
    dict(operation="transparent", expression="x > width / 3"),
    dict(operation="replace", expression="b > 128", replace_with="b.png", feather=3.0),
    dict(operation="grayscale", mask_image="b.png", expression="r < 128", combine="xor"),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c["operation"] for c in MASK_CASES])
def test_mask_edit_within_its_estimate(case, worker, files):
    args = dict(case, image=str(files / "a.png"))
    for key in ("replace_with", "mask_image"):
        if key in args:
            args[key] = str(files / args[key])
    r = worker.ask(kind="mask_edit", args=args, h=H, w=W)
    print(f"[rel-memory] mask_edit {case['operation']} {W}x{H}: estimate {r['est'] / MB:.0f} MB ({r['worst']}), "
          f"peak +{r['peak'] / MB:.0f} MB")
    assert r["width"] == W
    assert r["peak"] <= r["est"]


@pytest.mark.parametrize("extra", [{}, {"mask_expression": "l > 40 & h < 200", "alpha": "composite"},
                                   {"stride": 3, "heatmap": False}])
def test_color_compare_within_its_estimate(extra, worker, files):
    args = dict(image_a=str(files / "a.png"), image_b=str(files / "b.png"), **extra)
    r = worker.ask(kind="color", args=args, shape_a=[H, W, 3], shape_b=[H, W, 3])
    print(f"[rel-memory] color_compare {extra}: estimate {r['est'] / MB:.0f} MB, peak +{r['peak'] / MB:.0f} MB")
    assert r["width"] == W
    assert r["peak"] <= r["est"]


def test_mask_edit_refused_before_the_work(tight_ctx, files):
    inp = mask_tool.MaskEditInput(image=str(files / "a.png"), operation="blur", expression="h > 3 & l > 2")
    with pytest.raises(MemoryLimitExceeded) as err:
        mask_tool.run(inp, tight_ctx)
    msg = str(err.value)
    assert "would need" in msg and "limit 0.002 GB" in msg and "mask_edit blur on a 640x480 image" in msg


def test_color_compare_refused_before_the_work(tight_ctx, files):
    inp = color_tool.ColorCompareInput(image_a=str(files / "a.png"), image_b=str(files / "b.png"),
                                       mask_expression="r > 3")
    with pytest.raises(MemoryLimitExceeded) as err:
        color_tool._run(inp, tight_ctx)
    assert str(err.value).startswith("mask_expression='r > 3': would need ")


def test_text_kv_estimate_matches_the_cache_and_refuses():
    from engine.llm.cache import FullCache, Int8Cache
    from engine.llm.model import ModelArgs
    import torch

    from tools.text import estimate_memory

    a = ModelArgs(arch="llama", vocab_size=1000, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                  intermediate=128)
    full = FullCache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 8, torch.float32, torch.device("cpu"))
    q8 = Int8Cache(a.n_layers, 1, a.n_kv_heads, a.head_dim, 8, torch.float32, torch.device("cpu"))
    base = estimate_memory(a, 4, 10, 0, "full", 16, 2048)
    assert estimate_memory(a, 4, 10, 90, "full", 16, 2048) - base == 90 * full.bytes_per_token()
    base8 = estimate_memory(a, 4, 10, 0, "int8", 16, 2048)
    assert estimate_memory(a, 4, 10, 90, "int8", 16, 2048) - base8 == 90 * q8.bytes_per_token()
    # the context caps the cache; the window keeps `window` tokens
    assert estimate_memory(a, 4, 10, 5000, "full", 16, 2048) == estimate_memory(a, 4, 10, 2038, "full", 16, 2048)
    assert estimate_memory(a, 4, 10, 5000, "window", 16, None) == estimate_memory(a, 4, 10, 6, "window", 16, None)


def test_generate_and_detail_image_refused_before_loading(tmp_path, files):
    from tools import images

    # a folder that passes the configuration check (it has a model_index.json) but holds no model: the
    # memory bound must refuse before anything is loaded from it
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    c = make_context(tmp_path, limits={"max_call_memory_mb": 64}, models={"diffusion": str(folder)})
    try:
        with pytest.raises(MemoryLimitExceeded, match=r"^width='512x512 x 2': would need 1\.\d GB; limit 0\.067 GB"):
            images._run_generate(images.GenerateImageInput(prompt="a cat", width=512, height=512, num_images=2), c)
        with pytest.raises(MemoryLimitExceeded, match=r"^image='640x480': would need .* GB; limit 0\.067 GB.*top_k"):
            images._run_detail(images.DetailImageInput(image=str(files / "a.png")), c)
    finally:
        c.engine.close()
