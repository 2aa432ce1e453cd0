"""engine.adetailer: mask maths against scipy.ndimage / explicit NumPy, and the full flow on a tiny pipeline.

The full-flow oracle: the repainted area is at most the detection box, grown
by `dilate` then by `feather` pixels (square structuring elements, computed
with scipy.ndimage); every pixel outside it must be bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from scipy import ndimage

from engine import Engine, EngineConfig
from engine import adetailer as A
from engine.detect import Detection
from engine.errors import Cancelled, InvalidInput, ModelUnavailable
from engine.scheduler import CancelToken
from tests.tiny_pipeline import cached_tiny_sd


def square(r: int) -> np.ndarray:
    return np.ones((2 * r + 1, 2 * r + 1), bool)


def random_mask(rng, h=37, w=53) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for _ in range(3):
        y, x = rng.integers(0, h), rng.integers(0, w)
        m[y:y + rng.integers(1, 12), x:x + rng.integers(1, 15)] = True
    return m


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("px", [1, 2, 5])
def test_dilate_and_erode_match_scipy(seed, px):
    m = random_mask(np.random.default_rng(seed))
    assert np.array_equal(A.dilate_erode(m, px), ndimage.binary_dilation(m, structure=square(px)))
    # erosion does not eat in from the image edge (outside counts as inside)
    assert np.array_equal(A.dilate_erode(m, -px), ndimage.binary_erosion(m, structure=square(px), border_value=1))
    assert np.array_equal(A.dilate_erode(m, 0), m)


@pytest.mark.parametrize(("dx", "dy"), [(0, 0), (3, 0), (-4, 2), (5, -7), (60, 0), (0, -40)])
def test_offset_matches_explicit_loop(dx, dy):
    m = random_mask(np.random.default_rng(1))
    h, w = m.shape
    expected = np.zeros_like(m)
    for y, x in zip(*np.nonzero(m), strict=True):
        ny, nx = y - dy, x + dx  # +x right, +y up
        if 0 <= ny < h and 0 <= nx < w:
            expected[ny, nx] = True
    assert np.array_equal(A.offset_mask(m, dx, dy), expected)


def test_merge_modes():
    rng = np.random.default_rng(2)
    masks = [random_mask(rng) for _ in range(3)]
    union = masks[0] | masks[1] | masks[2]
    assert all(np.array_equal(a, b) for a, b in zip(A.merge_masks(masks, "none"), masks, strict=True))
    (merged,) = A.merge_masks(masks, "merge")
    assert np.array_equal(merged, union)
    (inverted,) = A.merge_masks(masks, "merge_invert")
    assert np.array_equal(inverted, ~union)
    with pytest.raises(InvalidInput, match="merge"):
        A.merge_masks(masks, "xor")


def test_preprocess_order_and_empty_masks_dropped():
    rng = np.random.default_rng(3)
    masks = [random_mask(rng) for _ in range(2)]
    tiny = np.zeros_like(masks[0])
    tiny[5, 5] = True  # eroded away
    got = A.preprocess_masks(masks + [tiny], offset=(2, 1), dilate=-1, merge="merge")
    shifted = [A.offset_mask(m, 2, 1) for m in masks]
    eroded = [ndimage.binary_erosion(m, structure=square(1), border_value=1) for m in shifted]
    assert len(got) == 1 and np.array_equal(got[0], eroded[0] | eroded[1])
    assert A.preprocess_masks([tiny], dilate=-1) == []


@pytest.mark.parametrize("feather", [0, 1, 3, 6])
def test_feather_support_is_the_mask_dilated_by_feather(feather):
    m = random_mask(np.random.default_rng(4))
    a = A.feather_alpha(m, feather)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    expected = ndimage.binary_dilation(m, structure=square(feather)) if feather else m
    assert np.array_equal(a > 0, expected)


def test_paste_is_exact_outside_alpha():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    patch = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = np.zeros((40, 50), np.float32)
    alpha[12:22, 15:30] = 1.0
    alpha[12:22, 30:35] = 0.25
    out = A.paste(img, patch, (10, 5, 40, 25), alpha)
    assert np.array_equal(out[alpha == 0], img[alpha == 0])
    assert np.array_equal(out[12:22, 15:30], patch[7:17, 5:20])
    exp = np.round(img[12:22, 30:35] * 0.75 + patch[7:17, 20:25] * 0.25)
    assert np.array_equal(out[12:22, 30:35], exp.astype(np.uint8))


def test_inpaint_size_and_crop_box():
    for cw, ch, res in [(93, 93, 512), (100, 40, 512), (13, 300, 768)]:
        w, h = A.inpaint_size(cw, ch, res)
        assert w % 8 == 0 and h % 8 == 0 and max(w, h) == res
        assert abs(w / h - cw / ch) < 0.1 * cw / ch + 8 / min(w, h)
    alpha = np.zeros((50, 60), np.float32)
    alpha[10:20, 30:55] = 0.5
    assert A.crop_box(alpha, 8) == (22, 2, 60, 28)


# -- full flow -------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(EngineConfig(device="cpu", cache_dir=tmp_path_factory.mktemp("cache")))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def sd() -> str:
    return str(cached_tiny_sd())


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


def _oracle_region(shape, box, dilate, feather) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    if dilate:
        m = ndimage.binary_dilation(m, structure=square(dilate))
    if feather:
        m = ndimage.binary_dilation(m, structure=square(feather))
    return m


@pytest.mark.parametrize(("dilate", "feather", "padding"), [(4, 4, 32), (0, 10, 0), (6, 0, 16)])
def test_detail_changes_nothing_outside_the_feathered_mask(engine, sd, astronaut, dilate, feather, padding):
    unit = A.DetailUnit("face", prompt="a detailed face", strength=0.5, steps=4)
    res = A.detail(engine, sd, astronaut, [unit], dilate=dilate, feather=feather, padding=padding,
                   resolution=128, seed=9)
    assert len(res.detections) == 1 and len(res.regions) == 1
    box = res.detections[0][1].box
    inside = _oracle_region(astronaut.shape[:2], box, dilate, feather)
    assert np.array_equal(res.image[~inside], astronaut[~inside])
    x1, y1, x2, y2 = box
    assert (res.image[y1:y2, x1:x2] != astronaut[y1:y2, x1:x2]).any()
    again = A.detail(engine, sd, astronaut, [unit], dilate=dilate, feather=feather, padding=padding,
                     resolution=128, seed=9)
    assert np.array_equal(res.image, again.image)
    cx1, cy1, cx2, cy2 = res.regions[0].crop
    ys, xs = np.nonzero(inside)
    assert cx1 <= xs.min() and cy1 <= ys.min() and cx2 > xs.max() and cy2 > ys.max()


def test_merge_invert_keeps_the_face(engine, sd, astronaut):
    unit = A.DetailUnit("face", strength=0.5, steps=2)
    res = A.detail(engine, sd, astronaut, [unit], dilate=2, feather=3, merge="merge_invert", resolution=64, seed=1)
    box = res.detections[0][1].box
    # repainted: everything but the face box grown by 2; so the face box shrunk by the feather is untouched
    core = np.zeros(astronaut.shape[:2], bool)
    core[box[1]:box[3], box[0]:box[2]] = True
    core = ndimage.binary_dilation(core, structure=square(2))
    untouched = ndimage.binary_erosion(core, structure=square(3), border_value=1)
    assert np.array_equal(res.image[untouched], astronaut[untouched])
    assert (res.image[~core] != astronaut[~core]).any()
    assert res.regions[0].crop == (0, 0, 512, 512)


def test_progress_counts_steps_over_all_regions(engine, sd, astronaut):
    seen = []
    units = [A.DetailUnit("face", strength=0.5, steps=4), A.DetailUnit("person", strength=1.0, steps=3)]
    res = A.detail(engine, sd, astronaut, units, resolution=64, seed=2, feather=2,
                   progress=lambda d, t, m: seen.append((d, t)))
    assert len(res.regions) == 2 and res.regions[1].seed == res.regions[0].seed + 1
    assert [d for d, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t in seen)


def test_no_detection_returns_the_input(engine, sd):
    flat = np.full((96, 128, 3), 90, np.uint8)
    res = A.detail(engine, sd, flat, [A.DetailUnit("face")], seed=0)
    assert res.regions == [] and np.array_equal(res.image, flat) and res.notes


def test_detect_only_needs_no_model(engine, astronaut):
    res = A.detail(engine, "", astronaut, [A.DetailUnit("face")], detect_only=True)
    assert len(res.detections) == 1 and res.regions == [] and np.array_equal(res.image, astronaut)
    with pytest.raises(ModelUnavailable, match="models.diffusion"):
        A.detail(engine, "", astronaut, [A.DetailUnit("face")])


def test_segmentation_mask_is_used_when_given():
    seg = np.zeros((20, 20), bool)
    seg[5:8, 5:15] = True
    det = Detection("person", 0.9, (5, 5, 15, 15), seg, "yolo:x")
    assert np.array_equal(A.detection_mask(det, (20, 20), "auto"), seg)
    assert A.detection_mask(det, (20, 20), "box").sum() == 100


def test_cancel_stops_the_flow(engine, sd, astronaut):
    token = CancelToken()
    seen = []

    def progress(d, t, m):
        seen.append(d)
        token.cancel()

    with pytest.raises(Cancelled):
        A.detail(engine, sd, astronaut, [A.DetailUnit("face", strength=1.0, steps=5)], resolution=64,
                 token=token, progress=progress)
    assert seen == [1]


def test_bad_arguments(engine, sd, astronaut):
    with pytest.raises(InvalidInput, match="inpaint_resolution"):
        A.detail(engine, sd, astronaut, [A.DetailUnit("face")], resolution=500)
    with pytest.raises(InvalidInput, match="steps"):
        A.detail(engine, sd, astronaut, [A.DetailUnit("face", steps=2, strength=0.3)])
    with pytest.raises(InvalidInput, match="targets"):
        A.detail(engine, sd, astronaut, [A.DetailUnit("hand")])
