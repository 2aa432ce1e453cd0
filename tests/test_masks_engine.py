"""engine.masks: channels, sources, refinement and operations against independent NumPy / skimage / scipy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath
from PIL import Image
from scipy import ndimage
from skimage import color as skcolor
from skimage import morphology

from engine import masks
from engine.errors import InvalidInput
from engine.masks.expression import _box_mask

H, W = 61, 83  # irregular on purpose
RNG = np.random.default_rng(3)
IMG = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
IMG[..., 3] = RNG.integers(100, 256, (H, W), dtype=np.uint8)
IMG_T = torch.from_numpy(IMG)
SEL = (IMG[..., 0] > 128) & (IMG[..., 1] < 160)
SEL_T = torch.from_numpy(SEL)


def assert_outside_identical(out: np.ndarray, mask: np.ndarray, src: np.ndarray = IMG) -> None:
    np.testing.assert_array_equal(out[~mask], src[~mask])


# -- channels ------------------------------------------------------------------------------
def test_seed_example_red_to_blue() -> None:
    img = IMG[..., :3].copy()
    img[5:9, 7:12] = [230, 20, 10]  # surely red
    m = masks.evaluate_expression("(r > 200) & (g < 50) & (b < 50)", torch.from_numpy(img))
    out = masks.apply_fill(torch.from_numpy(img), m, (0, 0, 255)).numpy()
    want = img.copy()
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    want[(r > 200) & (g < 50) & (b < 50)] = [0, 0, 255]
    np.testing.assert_array_equal(out, want)
    assert (out[5:9, 7:12] == [0, 0, 255]).all()


def test_hsv_and_gray_channels_match_skimage_and_numpy() -> None:
    hsv = skcolor.rgb2hsv(IMG[..., :3])
    rgbf = IMG[..., :3].astype(np.float64)
    gray = 0.299 * rgbf[..., 0] + 0.587 * rgbf[..., 1] + 0.114 * rgbf[..., 2]
    for text, want in {
        "h > 120 & h < 240": (hsv[..., 0] * 360 > 120.001) & (hsv[..., 0] * 360 < 239.999),
        "s > 0.5": hsv[..., 1] > 0.5001,
        "v < 0.3": hsv[..., 2] < 0.2999,
        "gray > 100": gray > 100.001,
    }.items():
        got = masks.evaluate_expression(text, IMG_T).numpy()
        # compare away from the thresholds (float32 vs float64 rounding)
        near = {"h": np.abs(hsv[..., 0] * 360 - 120) < 1e-3, "s": np.abs(hsv[..., 1] - 0.5) < 1e-4,
                "v": np.abs(hsv[..., 2] - 0.3) < 1e-4, "g": np.abs(gray - 100) < 1e-3}[text[0]]
        np.testing.assert_array_equal(got[~near], want[~near], err_msg=text)
        assert got.any() and not got.all()


def test_byte_fast_path_equals_torch_path() -> None:
    for bounds in ({"r": (30, 200)}, {"r": (201, 255), "g": (0, 49), "b": (0, 49)}, {"a": (120, 255), "g": (5, 250)},
                   {"r": (0, 255)}, {"b": (10, 9)}):
        cv = _box_mask(IMG_T, bounds, backend="cv2").numpy()
        th = _box_mask(IMG_T, bounds, backend="torch").numpy()
        want = np.ones((H, W), bool)
        for name, (lo, hi) in bounds.items():
            ch = IMG[..., "rgba".index(name)]
            want &= (ch >= lo) & (ch <= hi)
        np.testing.assert_array_equal(cv, want)
        np.testing.assert_array_equal(th, want)


def test_lab_and_delta_e_channels() -> None:
    rgb = IMG[..., :3].copy()
    rgb[:10, :10] = [0x1E, 0x90, 0xFF]
    t = torch.from_numpy(rgb)
    lab = skcolor.rgb2lab(rgb)
    ref = skcolor.rgb2lab(np.array([[[0x1E, 0x90, 0xFF]]], np.uint8))[0, 0]
    de = skcolor.deltaE_ciede2000(lab, np.broadcast_to(ref, lab.shape))
    got = masks.evaluate_expression("delta_e(#1e90ff) < 12", t).numpy()
    near = np.abs(de - 12) < 1e-2
    np.testing.assert_array_equal(got[~near], (de < 12)[~near])
    assert got[:10, :10].all()
    got = masks.evaluate_expression("l > 50 & lab_a < 0 & lab_b > -20", t).numpy()
    want = (lab[..., 0] > 50) & (lab[..., 1] < 0) & (lab[..., 2] > -20)
    near = (np.abs(lab[..., 0] - 50) < 1e-3) | (np.abs(lab[..., 1]) < 1e-3) | (np.abs(lab[..., 2] + 20) < 1e-3)
    np.testing.assert_array_equal(got[~near], want[~near])


# -- sources ----------------------------------------------------------------------------------
def test_image_mask_rules_and_size_mismatch() -> None:
    grey = np.zeros((H, W), np.uint8)
    grey[3:7, 4:9] = 1
    np.testing.assert_array_equal(masks.image_mask(grey, H, W).numpy(), grey != 0)
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[1, 1, 0] = 9
    rgba[2, 2, 2] = 9
    rgba[2, 2, 3] = 0  # transparent: not selected
    want = np.zeros((H, W), bool)
    want[1, 1] = True
    np.testing.assert_array_equal(masks.image_mask(rgba, H, W).numpy(), want)
    with pytest.raises(InvalidInput) as info:
        masks.image_mask(grey[:-1], H, W)
    assert info.value.argument == "mask_image" and "size" in str(info.value)


def _centres(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)


def test_shapes_match_independent_rasterisation() -> None:
    pts = _centres(H, W)
    poly = [[3.3, 2.1], [70.7, 9.4], [40.2, 55.6], [20.1, 30.3], [5.2, 50.9]]
    got = masks.shape_mask([{"type": "polygon", "points": poly}], H, W).numpy()
    want = MplPath(np.array(poly)).contains_points(pts).reshape(H, W)
    np.testing.assert_array_equal(got, want)
    assert want.sum() > 500

    got = masks.shape_mask([{"type": "rect", "box": [0.25, 0.25, 0.75, 0.75], "units": "relative"}], H, W).numpy()
    x, y = pts[:, 0].reshape(H, W), pts[:, 1].reshape(H, W)
    want = (x >= 0.25 * W) & (x < 0.75 * W) & (y >= 0.25 * H) & (y < 0.75 * H)
    np.testing.assert_array_equal(got, want)

    got = masks.shape_mask([{"type": "ellipse", "box": [10.3, 4.1, 60.6, 40.2]}, {"type": "rect", "box": [70, 50, 200, 90]}],
                           H, W).numpy()
    want = ((x - 35.45) / 25.15) ** 2 + ((y - 22.15) / 18.05) ** 2 <= 1
    want |= (x >= 70) & (y >= 50)
    np.testing.assert_array_equal(got, want)

    for bad in ([{"type": "star"}], [{"type": "rect", "box": [1, 2, 3]}], [{"type": "polygon", "points": [[0, 0]]}],
                [{"type": "rect", "box": [5, 5, 1, 1]}], [{"type": "rect", "box": [0, 0, 1, 1], "units": "cm"}]):
        with pytest.raises(InvalidInput, match=r"shapes\[0\]"):
            masks.shape_mask(bad, H, W)


class _Det:
    def __init__(self, box, mask=None):
        self.box, self.mask, self.label, self.confidence, self.source = box, mask, "face", 0.9, "test"


def test_detection_mask_boxes_and_segments() -> None:
    seg = np.zeros((H, W), bool)
    seg[40:45, 60:70] = True
    got = masks.detection_mask([_Det((5, 6, 20, 30)), _Det((70, 50, 500, 500)), _Det((0, 0, 9, 9), seg)], H, W).numpy()
    want = np.zeros((H, W), bool)
    want[6:30, 5:20] = True
    want[50:, 70:] = True
    want |= seg
    np.testing.assert_array_equal(got, want)


def test_combine() -> None:
    a, b, c = SEL, IMG[..., 2] > 100, IMG[..., 3] > 200
    ts = [torch.from_numpy(m) for m in (a, b, c)]
    np.testing.assert_array_equal(masks.combine(ts, "and").numpy(), a & b & c)
    np.testing.assert_array_equal(masks.combine(ts, "or").numpy(), a | b | c)
    np.testing.assert_array_equal(masks.combine(ts, "xor").numpy(), a ^ b ^ c)
    with pytest.raises(InvalidInput):
        masks.combine([ts[0], ts[1][:-1]], "and")


# -- refinement ------------------------------------------------------------------------------
BLOBS = np.zeros((H, W), bool)
BLOBS[10:30, 10:40] = True
BLOBS[15:18, 20:22] = False  # a 6-px hole
BLOBS[12, 12] = False  # a 1-px hole
BLOBS[45, 70] = True  # a 1-px object
BLOBS[50:53, 5:8] = True  # a 9-px object
BLOBS[0:4, 60:83] = True  # touching the border


@pytest.mark.parametrize("px", [1, 2, 4])
def test_dilate_erode_match_skimage_disk(px: int) -> None:
    t = torch.from_numpy(BLOBS)
    disk = morphology.disk(px)
    np.testing.assert_array_equal(masks.dilate(t, px).numpy(), morphology.dilation(BLOBS, disk, mode="ignore"))
    np.testing.assert_array_equal(masks.erode(t, px).numpy(), morphology.erosion(BLOBS, disk, mode="ignore"))


def test_small_objects_and_holes_match_scipy_labels() -> None:
    t = torch.from_numpy(BLOBS)
    lab, _ = ndimage.label(BLOBS, structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())
    want = BLOBS & (sizes[lab] >= 9)
    np.testing.assert_array_equal(masks.remove_small_objects(t, 9).numpy(), want)
    lab, _ = ndimage.label(~BLOBS)  # 4-connected background
    sizes = np.bincount(lab.ravel())
    want = BLOBS | ((lab > 0) & (sizes[lab] < 7))
    got = masks.fill_small_holes(t, 7).numpy()
    np.testing.assert_array_equal(got, want)
    assert got[15:18, 20:22].all() and got[12, 12]


def test_feather_matches_scipy_gaussian() -> None:
    soft = masks.feather(torch.from_numpy(BLOBS), 6).numpy()
    want = ndimage.gaussian_filter(BLOBS.astype(np.float64), sigma=3.0, mode="reflect", truncate=2.0)
    np.testing.assert_allclose(soft, want, atol=1e-5)
    assert soft.dtype == np.float32 and soft.max() <= 1.0
    np.testing.assert_array_equal(masks.invert(torch.from_numpy(BLOBS)).numpy(), ~BLOBS)


# -- operations ------------------------------------------------------------------------------
def test_fill_hard_and_soft() -> None:
    out = masks.apply_fill(IMG_T, SEL_T, (1, 2, 3)).numpy()
    want = IMG.copy()
    want[SEL, :3] = [1, 2, 3]
    np.testing.assert_array_equal(out, want)
    out = masks.apply_fill(IMG_T, SEL_T, (1, 2, 3, 4)).numpy()
    want[SEL] = [1, 2, 3, 4]
    np.testing.assert_array_equal(out, want)
    soft = masks.feather(SEL_T, 3)
    out = masks.apply_fill(IMG_T, soft, (0, 0, 255)).numpy()
    m = soft.numpy()[..., None]
    blended = np.round(IMG[..., :3].astype(np.float32) + (np.array([0, 0, 255], np.float32) - IMG[..., :3]) * m)
    np.testing.assert_array_equal(out[..., :3], blended.astype(np.uint8))
    assert_outside_identical(out, soft.numpy() > 0)
    assert (IMG_T.numpy() == IMG).all()  # the source is untouched


def test_replace_and_transparent() -> None:
    other = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = masks.apply_replace(IMG_T, SEL_T, torch.from_numpy(other)).numpy()
    want = IMG.copy()
    want[SEL, :3] = other[SEL]
    want[SEL, 3] = 255
    np.testing.assert_array_equal(out, want)
    with pytest.raises(InvalidInput, match="replace_with"):
        masks.apply_replace(IMG_T, SEL_T, torch.from_numpy(other[:-1]))
    out = masks.apply_transparent(torch.from_numpy(IMG[..., :3].copy()), SEL_T).numpy()
    assert out.shape == (H, W, 4)
    np.testing.assert_array_equal(out[..., 3], np.where(SEL, 0, 255))
    np.testing.assert_array_equal(out[..., :3], IMG[..., :3])


def test_blur_matches_scipy_inside_and_is_exact_outside() -> None:
    sel = np.zeros((H, W), bool)
    sel[20:40, 30:60] = True
    out = masks.apply_blur(IMG_T, torch.from_numpy(sel), 2.5).numpy()
    want = np.stack([ndimage.gaussian_filter(IMG[..., c].astype(np.float64), 2.5, mode="reflect", truncate=3.0)
                     for c in range(3)], -1)
    diff = np.abs(out[..., :3].astype(int) - np.round(want).astype(int))
    assert diff[sel].max() <= 1
    assert_outside_identical(out, sel)
    np.testing.assert_array_equal(out[..., 3], IMG[..., 3])
    # at the image border too
    edge = np.zeros((H, W), bool)
    edge[:5, :5] = True
    out = masks.apply_blur(IMG_T, torch.from_numpy(edge), 3.0).numpy()
    want = np.stack([ndimage.gaussian_filter(IMG[..., c].astype(np.float64), 3.0, mode="reflect", truncate=3.0)
                     for c in range(3)], -1)
    assert np.abs(out[..., :3].astype(int) - np.round(want).astype(int))[edge].max() <= 1


@pytest.mark.parametrize("block", [1, 4, 7])
def test_pixelate_matches_block_means(block: int) -> None:
    out = masks.apply_pixelate(IMG_T, SEL_T, block).numpy()
    want = IMG.copy()
    for y in range(0, H, block):
        for x in range(0, W, block):
            cell = IMG[y:y + block, x:x + block, :3].astype(np.int64)
            mean = np.floor(cell.reshape(-1, 3).mean(0) + 0.5)
            sel = SEL[y:y + block, x:x + block]
            want[y:y + block, x:x + block, :3][sel] = mean
    np.testing.assert_array_equal(out, want)


def test_grayscale_matches_pil() -> None:
    lum = np.asarray(Image.fromarray(IMG[..., :3].copy()).convert("L"))
    out = masks.apply_grayscale(IMG_T, SEL_T).numpy()
    want = IMG.copy()
    want[SEL, :3] = lum[SEL][:, None]
    np.testing.assert_array_equal(out, want)


def test_adjust_matches_numpy() -> None:
    out = masks.apply_adjust(IMG_T, SEL_T, 1.3, 0.7).numpy()
    v = IMG[..., :3].astype(np.float32)
    adj = np.clip(np.round((v * np.float32(1.3) - np.float32(128)) * np.float32(0.7) + np.float32(128)), 0, 255)
    want = IMG.copy()
    want[SEL, :3] = adj.astype(np.uint8)[SEL]
    np.testing.assert_array_equal(out, want)
    with pytest.raises(InvalidInput, match="brightness"):
        masks.apply_adjust(IMG_T, SEL_T, -1.0, 1.0)


def test_hue_shift_matches_skimage() -> None:
    out = masks.apply_hue_shift(IMG_T, SEL_T, 100.0).numpy()
    hsv = skcolor.rgb2hsv(IMG[..., :3])
    hsv[..., 0] = (hsv[..., 0] + 100.0 / 360.0) % 1.0
    want = np.round(skcolor.hsv2rgb(hsv) * 255).astype(int)
    assert np.abs(out[..., :3].astype(int) - want)[SEL].max() <= 1
    assert_outside_identical(out, SEL)
    np.testing.assert_array_equal(out[..., 3], IMG[..., 3])


def test_empty_mask_and_mismatch() -> None:
    empty = torch.zeros(H, W, dtype=torch.bool)
    for fn in (lambda m: masks.apply_blur(IMG_T, m, 2.0), lambda m: masks.apply_fill(IMG_T, m, (1, 2, 3)),
               lambda m: masks.apply_pixelate(IMG_T, m, 5)):
        np.testing.assert_array_equal(fn(empty).numpy(), IMG)
    with pytest.raises(InvalidInput, match="mask"):
        masks.apply_grayscale(IMG_T, empty[:-1])


def test_stats_match_scipy() -> None:
    stats = masks.mask_stats(torch.from_numpy(BLOBS))
    ys, xs = np.nonzero(BLOBS)
    _, n = ndimage.label(BLOBS, structure=np.ones((3, 3)))
    assert stats == {"selected_pixels": int(BLOBS.sum()), "fraction": BLOBS.sum() / (H * W),
                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], "components": n}
    assert masks.mask_stats(torch.zeros(3, 4, dtype=torch.bool))["bbox"] is None
