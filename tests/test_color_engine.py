"""engine.color against independent oracles: Sharma, Wu & Dalal (2005) and scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import deltaE_cie76, deltaE_ciede94, deltaE_ciede2000, lab2rgb, rgb2lab

from engine import color as C
from engine.errors import InvalidInput

# Sharma, Wu & Dalal, "The CIEDE2000 color-difference formula: implementation notes, supplementary
# test data, and mathematical observations", Color Res. Appl. 30(1), 2005, Table 1:
# L1 a1 b1 L2 a2 b2 ΔE00 (pairs 7-16 sit on the 180° hue branches).
SHARMA = np.array([
    [50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425],
    [50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615],
    [50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412],
    [50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000],
    [50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669],
    [50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195],
    [50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045],
    [50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461],
    [50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065],
    [50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492],
    [50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977],
    [50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030],
    [50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000],
    [50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000],
    [60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644],
    [63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630],
    [61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731],
    [35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645],
    [22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373],
    [36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146],
    [90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441],
    [90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381],
    [6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377],
    [2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082],
])


def _random_lab(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.uniform([0, -110, -110], [100, 110, 110], size=(n, 3))
    lab[: n // 20, 1:] = rng.normal(0, 0.5, size=(n // 20, 2))  # near-neutral: hue branches matter
    lab[n // 20: n // 20 + 5, 1:] = 0.0  # zero chroma
    return lab


def test_sharma_table_float64() -> None:
    de = C.delta_e_2000(torch.from_numpy(SHARMA[:, :3]), torch.from_numpy(SHARMA[:, 3:6]))
    np.testing.assert_allclose(de.numpy(), SHARMA[:, 6], atol=1e-4, rtol=0)
    swapped = C.delta_e_2000(torch.from_numpy(SHARMA[:, 3:6]), torch.from_numpy(SHARMA[:, :3]))
    np.testing.assert_allclose(swapped.numpy(), SHARMA[:, 6], atol=1e-4, rtol=0)


def test_sharma_table_float32() -> None:
    # pairs 10 and 14 have a hue difference of exactly 180° in exact arithmetic: CIEDE2000 is
    # discontinuous there (Sharma et al. 2005, observation 5), float32 rounding picks the branch
    keep = np.setdiff1d(np.arange(len(SHARMA)), [9, 13])
    de = C.delta_e_2000(torch.from_numpy(SHARMA[:, :3]).float(), torch.from_numpy(SHARMA[:, 3:6]).float())
    assert de.dtype == torch.float32
    np.testing.assert_allclose(de.numpy()[keep], SHARMA[keep, 6], atol=1e-3, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"kL": 2.0, "kC": 0.5, "kH": 1.5}])
def test_ciede2000_random_pairs_vs_skimage(kw: dict) -> None:
    l1, l2 = _random_lab(10_000, 1), _random_lab(10_000, 2)
    ref = deltaE_ciede2000(l1, l2, **kw)
    np.testing.assert_allclose(C.delta_e_2000(torch.from_numpy(l1), torch.from_numpy(l2), **kw).numpy(), ref,
                               atol=1e-4, rtol=0)
    de32 = C.delta_e_2000(torch.from_numpy(l1).float(), torch.from_numpy(l2).float(), **kw)
    np.testing.assert_allclose(de32.numpy(), ref, atol=1e-3, rtol=0)


def test_cie76_and_cie94_random_pairs_vs_skimage() -> None:
    l1, l2 = _random_lab(10_000, 3), _random_lab(10_000, 4)
    t1, t2 = torch.from_numpy(l1), torch.from_numpy(l2)
    np.testing.assert_allclose(C.delta_e_76(t1, t2).numpy(), deltaE_cie76(l1, l2), atol=1e-4, rtol=0)
    np.testing.assert_allclose(C.delta_e_76(t1.float(), t2.float()).numpy(), deltaE_cie76(l1, l2), atol=1e-3)
    ga = deltaE_ciede94(l1, l2)
    tx = deltaE_ciede94(l1, l2, kL=2, k1=0.048, k2=0.014)
    np.testing.assert_allclose(C.delta_e_94(t1, t2).numpy(), ga, atol=1e-4, rtol=0)
    np.testing.assert_allclose(C.delta_e_94(t1, t2, textiles=True).numpy(), tx, atol=1e-4, rtol=0)
    np.testing.assert_allclose(C.delta_e_94(t1.float(), t2.float()).numpy(), ga, atol=1e-3, rtol=0)
    np.testing.assert_allclose(C.delta_e_94(t1, t2, kC=2.0, kH=0.5).numpy(),
                               deltaE_ciede94(l1, l2, kC=2.0, kH=0.5), atol=1e-4, rtol=0)


def test_broadcasting_one_reference() -> None:
    l1 = _random_lab(100, 5)
    ref = np.array([55.0, 20.0, -30.0])
    np.testing.assert_allclose(C.delta_e_2000(torch.from_numpy(l1), torch.from_numpy(ref)).numpy(),
                               deltaE_ciede2000(l1, np.broadcast_to(ref, l1.shape)), atol=1e-4)


def test_rgb_to_lab_vs_skimage() -> None:
    rng = np.random.default_rng(6)
    u8 = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    u8[0, :8] = [[0, 0, 0], [255, 255, 255], [1, 1, 1], [10, 10, 10], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                 [128, 128, 128]]
    ref = rgb2lab(u8)
    out = C.rgb_to_lab(torch.from_numpy(u8))
    assert out.dtype == torch.float32 and out.shape == (37, 53, 3)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0)
    f64 = u8 / 255.0
    np.testing.assert_allclose(C.rgb_to_lab(torch.from_numpy(f64)).numpy(), rgb2lab(f64), atol=1e-10)
    assert C.rgb_to_lab(torch.from_numpy(f64)).dtype == torch.float64
    np.testing.assert_allclose(C.rgb_to_lab(torch.from_numpy(f64.astype(np.float32))).numpy(), ref, atol=1e-4)


def test_lab_to_rgb_vs_skimage() -> None:
    lab = rgb2lab(np.random.default_rng(7).random((50, 3)))
    np.testing.assert_allclose(C.lab_to_rgb(torch.from_numpy(lab)).numpy(), lab2rgb(lab), atol=1e-8)


@pytest.mark.parametrize("text,rgb", [("#FF8800", (255, 136, 0)), ("#f80", (255, 136, 0)),
                                      ("rgb(255, 136, 0)", (255, 136, 0)), ("RGB(1 2 3)", (1, 2, 3)),
                                      ("tomato", (255, 99, 71)), ("Light Sea Green", (32, 178, 170))])
def test_parse_color_srgb_forms(text: str, rgb: tuple) -> None:
    lab = C.parse_color(text)
    np.testing.assert_allclose(lab, rgb2lab(np.array(rgb, dtype=np.float64) / 255.0), atol=1e-9)
    assert C.parse_color_srgb(text) == (rgb, True)


def test_css_names_match_pillow() -> None:
    from PIL import ImageColor

    from engine.colornames import CSS_COLORS

    assert len(CSS_COLORS) == 148
    assert set(CSS_COLORS) == set(ImageColor.colormap)
    for name, hex_ in CSS_COLORS.items():
        assert ImageColor.getrgb(name) == ImageColor.getrgb(hex_), name


def test_parse_lab_and_hex_roundtrip() -> None:
    assert C.parse_color("lab(50, 10, -20)") == (50.0, 10.0, -20.0)
    lab = C.parse_color("#336699")
    assert C.lab_to_hex(lab) == "#336699"
    rgb, in_gamut = C.parse_color_srgb("lab(50, 120, -120)")
    assert not in_gamut and all(0 <= v <= 255 for v in rgb)


@pytest.mark.parametrize("text", ["#12345", "#GGGGGG", "#", "rgb(256, 0, 0)", "rgb(1, 2)", "rgb(1.5, 2, 3)",
                                  "notacolour", "lab(nan, 0, 0)", "lab(101, 0, 0)", "lab(50, 200, 0)",
                                  "lab(50, 0)", "", "lab(inf, 0, 0)"])
def test_parse_color_rejects(text: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        C.parse_color(text, argument="color_b")
    assert ei.value.argument == "color_b"
    assert repr(text) in str(ei.value)


def test_delta_e_map_matches_skimage_all_metrics() -> None:
    rng = np.random.default_rng(8)
    a = rng.integers(0, 256, size=(61, 47, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(61, 47, 3), dtype=np.uint8)
    b[:5] = a[:5]
    a[5:7] = 0
    la, lb = rgb2lab(a), rgb2lab(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    a_before = a.copy()
    for metric, ref in [("ciede2000", deltaE_ciede2000(la, lb)), ("cie76", deltaE_cie76(la, lb)),
                        ("cie94", deltaE_ciede94(la, lb))]:
        out = C.delta_e_map(ta, tb, metric=metric, chunk_pixels=1000)
        assert out.shape == (61, 47) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-3, rtol=0)
    out = C.delta_e_map(ta, tb, metric="ciede2000", kL=2.0, kC=1.5, kH=0.7)
    np.testing.assert_allclose(out.numpy(), deltaE_ciede2000(la, lb, kL=2.0, kC=1.5, kH=0.7), atol=1e-3)
    out = C.delta_e_map(ta, tb, metric="cie94", textiles=True)
    np.testing.assert_allclose(out.numpy(), deltaE_ciede94(la, lb, kL=2, k1=0.048, k2=0.014), atol=1e-3)
    np.testing.assert_array_equal(a, a_before)


def test_delta_e_map_many_pieces_threaded_and_cancel() -> None:
    from engine.errors import Cancelled
    from engine.scheduler import CancelToken

    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, size=(300, 251, 3), dtype=np.uint8)  # 75 300 px: 3 CPU pieces
    b = rng.integers(0, 256, size=(300, 251, 3), dtype=np.uint8)
    out = C.delta_e_map(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(out.numpy(), deltaE_ciede2000(rgb2lab(a), rgb2lab(b)), atol=1e-3)
    tok = CancelToken()
    tok.cancel("test")
    with pytest.raises(Cancelled):
        C.delta_e_map(torch.from_numpy(a), torch.from_numpy(b), token=tok)


def test_delta_e_to_color_vs_skimage() -> None:
    rng = np.random.default_rng(10)
    img = rng.integers(0, 256, size=(190, 180, 3), dtype=np.uint8)
    ref = C.parse_color("#FF8800")
    out = C.delta_e_to_color(torch.from_numpy(img), ref)
    expected = deltaE_ciede2000(rgb2lab(img), np.broadcast_to(np.array(ref), img.shape))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-3, rtol=0)


def test_delta_e_map_bad_input() -> None:
    a = torch.zeros(4, 4, 3, dtype=torch.uint8)
    with pytest.raises(InvalidInput, match="rgb2"):
        C.delta_e_map(a, torch.zeros(4, 5, 3, dtype=torch.uint8))
    with pytest.raises(InvalidInput, match="rgb1"):
        C.delta_e_map(a.float(), a)
    with pytest.raises(InvalidInput, match="metric"):
        C.delta_e_map(a, a, metric="cmc")


def test_composite_alpha() -> None:
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    out = C.composite_alpha(torch.from_numpy(rgba), (0, 0, 255)).numpy()
    expected = np.round((rgba[..., :3] * (rgba[..., 3:] / 255.0)) + np.array([0, 0, 255]) * (1 - rgba[..., 3:] / 255.0))
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
