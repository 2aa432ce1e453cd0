"""color_compare: perceptual colour difference (ΔE 76 / 94 / 2000) between two colours or two images.

Two colours (`color_a`, `color_b`: #RRGGBB, #RGB, rgb(r, g, b), a CSS name or
lab(L, a, b)) -> ΔE, both colours in Lab and hex, and a plain-language band
(Zeljko Bugarski's commonly cited scale, a rule of thumb, see `BANDS`).
Images get the same bands for their mean ΔE (`band`) and p95 ΔE (`band_p95`).

Two images (`image_a` is the reference, `image_b` the candidate) -> per-pixel
ΔE over the region (optional mask image and/or mask expression evaluated on
image_a) sampled every `stride` px: mean, median, p95, max, the fraction
above `threshold`, the bounding boxes of the largest above-threshold
connected components (8-connected, on the sampled grid, in full-resolution
pixels), a QC verdict ("fail" when more than `max_fraction` of the sampled
pixels exceed `threshold`), and a heatmap with a legend.

Memory: once both images are decoded (each bounded by limits.max_image_pixels)
and before any other image-sized allocation, `estimate_memory` bounds the call
(bytes per pixel of image_a's size: both decoded images, a resampled image_b
(12), the composited RGB copies (6), the transient of compositing or of the
region mask (44), the mask expression's own bound (engine.masks.expression); per
sampled pixel 64 for the ΔE map, the statistics, the regions and the heatmap;
plus the ΔE pieces in flight). Over limits.max_call_memory_mb (0 = the engine's
memory budget less loaded models) the call is refused before the work.

Errors (ToolError, or the engine's InvalidInput as it is: both name the argument and value): both or neither of the
colour / image pairs, unknown names, malformed hex, NaN or out-of-range Lab,
size mismatch without resize="fit", unsupported image channels, thresholds
out of range, image-only options given with colours. Inputs are never modified.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from engine import color as C
from engine import workmem
from engine.masks import evaluate_expression, expression_memory, parse

from .base import ImageOut, ToolContext, ToolError, ToolOutput, ToolSpec

# (upper bound exclusive, name) — Bugarski's perceptibility scale as commonly cited (Zeljko Bugarski,
# "Color Difference - Delta E - A Survey", zschuessler.github.io/DeltaE/learn: <=1 not perceptible by human
# eyes, 1-2 perceptible through close observation, 2-10 perceptible at a glance, 11-49 colours are more
# similar than opposite, 100 colours are exact opposite). Image mode applies it to the mean ΔE (the typical
# pixel) and to the p95 ΔE (the most different 5 %).
BANDS: tuple[tuple[float, str], ...] = (
    (1.0, "imperceptible: not perceptible by the human eye"),
    (2.0, "perceptible through close observation"),
    (10.0, "perceptible at a glance"),
    (50.0, "more similar than opposite"),
    (math.inf, "opposite colours"),
)
_METRIC_LABEL = {"cie76": "ΔE76", "cie94": "ΔE94", "ciede2000": "ΔE2000"}
MAX_STRIDE = 1024
MAX_REGIONS = 100


def band(delta_e: float) -> str:
    """The perceptibility band of a ΔE value (<1, 1-2, 2-10, 10-50, >=50)."""
    for upper, name in BANDS:
        if delta_e < upper:
            return name
    return BANDS[-1][1]


class ColorCompareInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    color_a: str | None = Field(None, description="Reference colour: #RRGGBB, #RGB, rgb(r, g, b), a CSS name or "
                                "lab(L, a, b).")
    color_b: str | None = Field(None, description="Same formats.")
    image_a: str | None = Field(None, description="Reference image: a path in the read roots, image:// or base64.")
    image_b: str | None = Field(None, description="Same size as image_a unless resize='fit'.")
    metric: Literal["cie76", "cie94", "ciede2000"] = Field("ciede2000", description="ΔE formula.")
    cie94_application: Literal["graphic_arts", "textiles"] = Field("graphic_arts", description="CIE94 weights.")
    kL: float | None = Field(None, description="Lightness weight in (0, 100]; default 1 (2 for CIE94 textiles).")
    kC: float = Field(1.0, description="Chroma weight in (0, 100].")
    kH: float = Field(1.0, description="Hue weight in (0, 100].")
    resize: Literal["none", "fit"] = Field("none", description="fit: resample image_b to image_a's size.")
    alpha: Literal["ignore", "composite"] = Field("ignore", description="composite: over `background` first.")
    background: str = Field("#FFFFFF", description="For alpha='composite'.")
    mask: str | None = Field(None, description="Region mask image (image_a's size): non-zero pixels compared.")
    mask_expression: str | None = Field(None, description="Region as a mask_edit expression on image_a, e.g. "
                                        "'delta_e(#FF0000) < 20'; ANDed with mask.")
    stride: int = Field(1, description=f"Sample every N-th pixel in x and y (1..{MAX_STRIDE}).")
    threshold: float = Field(5.0, description="ΔE above which a pixel differs, in (0, 100].")
    max_fraction: float = Field(0.30, description="Fail when more than this fraction (0..1) exceeds threshold.")
    heatmap: bool | None = Field(None, description="ΔE heatmap with a legend (default: true for images).")
    heatmap_max: float | None = Field(None, description="ΔE at the top of the heatmap scale; default 2 x threshold.")
    worst_regions: int = Field(5, description=f"How many largest above-threshold regions (0..{MAX_REGIONS}).")


class ColorInfo(BaseModel):
    input: str
    lab: list[float] = Field(description="L, a, b (D65 / 2°)")
    hex: str = Field(description="sRGB #RRGGBB (clipped to the sRGB gamut for Lab inputs)")
    in_srgb_gamut: bool


class WorstRegion(BaseModel):
    x: int
    y: int
    width: int
    height: int
    pixels: int = Field(description="sampled pixels above the threshold in this connected region")
    mean_delta_e: float


class ColorCompareOutput(BaseModel):
    mode: Literal["colors", "images"]
    metric: str
    parameters: dict[str, Any] = Field(description="the weights used (kL, kC, kH; K1, K2 for cie94)")
    # colours
    delta_e: float | None = None
    band: str | None = Field(None, description="plain-language perceptibility of delta_e, or of mean for images")
    band_p95: str | None = Field(None, description="the same for p95 (images)")
    color_a: ColorInfo | None = None
    color_b: ColorInfo | None = None
    # images
    width: int | None = None
    height: int | None = None
    sampled_pixels: int | None = None
    mean: float | None = None
    median: float | None = None
    p95: float | None = None
    max: float | None = None
    threshold: float | None = None
    max_fraction: float | None = None
    fraction_above: float | None = None
    worst_regions: list[WorstRegion] | None = None
    verdict: Literal["pass", "fail"] | None = None
    rule: str | None = None
    notes: list[str] = Field(default_factory=list)


# -- checks ------------------------------------------------------------------------------------
def _check_range(name: str, v: float | None, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if v is None:
        return
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rule = f"must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ToolError.invalid(name, v, rule)


def _check_args(a: ColorCompareInput) -> str:
    """-> "colors" | "images"."""
    colors = a.color_a is not None or a.color_b is not None
    images = a.image_a is not None or a.image_b is not None
    if colors and images:
        raise ToolError.invalid("image_a" if a.image_a is not None else "image_b",
                                a.image_a if a.image_a is not None else a.image_b,
                                "give either color_a + color_b or image_a + image_b, not both")
    if not colors and not images:
        raise ToolError.invalid("color_a", None, "give either color_a + color_b or image_a + image_b")
    for first, second in (("color_a", "color_b"), ("image_a", "image_b")):
        va, vb = getattr(a, first), getattr(a, second)
        if (va is None) != (vb is None):
            missing = second if vb is None else first
            raise ToolError.invalid(missing, None, f"required together with {first if vb is None else second}")
    for name in ("kL", "kC", "kH"):
        _check_range(name, getattr(a, name), 0.0, 100.0, lo_open=True)
    _check_range("threshold", a.threshold, 0.0, 100.0, lo_open=True)
    _check_range("max_fraction", a.max_fraction, 0.0, 1.0)
    _check_range("heatmap_max", a.heatmap_max, 0.0, 1000.0, lo_open=True)
    if not 1 <= a.stride <= MAX_STRIDE:
        raise ToolError.invalid("stride", a.stride, f"must be an integer in 1..{MAX_STRIDE}")
    if not 0 <= a.worst_regions <= MAX_REGIONS:
        raise ToolError.invalid("worst_regions", a.worst_regions, f"must be an integer in 0..{MAX_REGIONS}")
    if colors:
        for name, bad in (("mask", a.mask is not None), ("mask_expression", a.mask_expression is not None),
                          ("heatmap", a.heatmap is True), ("stride", a.stride != 1), ("resize", a.resize != "none"),
                          ("alpha", a.alpha != "ignore")):
            if bad:
                raise ToolError.invalid(name, getattr(a, name), "applies to image comparison only "
                                                                "(image_a + image_b)")
    return "colors" if colors else "images"


def _parse(text: str, argument: str) -> tuple[tuple[float, float, float], tuple[int, int, int], bool]:
    lab = C.parse_color(text, argument=argument)
    rgb, in_gamut = C.parse_color_srgb(text, argument=argument)
    return lab, rgb, in_gamut


def _weights(a: ColorCompareInput) -> dict[str, Any]:
    if a.metric == "cie76":
        return {}
    if a.metric == "cie94":
        kL, K1, K2 = C.CIE94_APPLICATIONS[a.cie94_application]
        return {"application": a.cie94_application, "kL": a.kL if a.kL is not None else kL, "kC": a.kC,
                "kH": a.kH, "K1": K1, "K2": K2}
    return {"kL": a.kL if a.kL is not None else 1.0, "kC": a.kC, "kH": a.kH}


# -- two colours --------------------------------------------------------------------------------
def _run_colors(a: ColorCompareInput, ctx: ToolContext) -> ToolOutput:
    lab_a, rgb_a, gamut_a = _parse(a.color_a, "color_a")
    lab_b, rgb_b, gamut_b = _parse(a.color_b, "color_b")
    w = _weights(a)
    t1 = torch.tensor(lab_a, dtype=torch.float64)
    t2 = torch.tensor(lab_b, dtype=torch.float64)
    if a.metric == "cie76":
        de = C.delta_e_76(t1, t2)
    elif a.metric == "cie94":
        de = C.delta_e_94(t1, t2, textiles=a.cie94_application == "textiles", kL=w["kL"], kC=a.kC, kH=a.kH)
    else:
        de = C.delta_e_2000(t1, t2, kL=w["kL"], kC=a.kC, kH=a.kH)
    value = float(de)
    info_a = ColorInfo(input=a.color_a, lab=[round(v, 4) for v in lab_a], hex=C.rgb_to_hex(rgb_a),
                       in_srgb_gamut=gamut_a)
    info_b = ColorInfo(input=a.color_b, lab=[round(v, 4) for v in lab_b], hex=C.rgb_to_hex(rgb_b),
                       in_srgb_gamut=gamut_b)
    out = ColorCompareOutput(mode="colors", metric=a.metric, parameters=w, delta_e=value, band=band(value),
                             color_a=info_a, color_b=info_b)
    text = (f"{_METRIC_LABEL[a.metric]} between {a.color_a} ({info_a.hex}, Lab {_fmt_lab(lab_a)}) and {a.color_b} "
            f"({info_b.hex}, Lab {_fmt_lab(lab_b)}) = {value:.4f}: {out.band}.")
    return ToolOutput(text=text, structured=out)


def _fmt_lab(lab: tuple[float, float, float]) -> str:
    return "({:.2f}, {:.2f}, {:.2f})".format(*lab)


# -- two images -------------------------------------------------------------------------------------
def _as_rgb_alpha(arr: np.ndarray, argument: str) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [H, W], [H, W, 1|2|3|4] -> (RGB [H, W, 3], alpha [H, W] or None); views where possible."""
    if arr.dtype != np.uint8:
        raise ToolError.invalid(argument, str(arr.dtype), "unsupported image mode: expected 8-bit channels")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ToolError.invalid(argument, tuple(arr.shape), "unsupported image mode: expected gray, gray+alpha, "
                                                            "RGB or RGBA")
    c = arr.shape[2]
    rgb = np.repeat(arr[..., :1], 3, axis=2) if c in (1, 2) else arr[..., :3]
    alpha = arr[..., c - 1] if c in (2, 4) else None
    return rgb, alpha


def _resize(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]] if arr.ndim == 3 else "L"
    img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] > 1 else arr[..., 0], mode=mode)
    return np.array(img.resize((width, height), Image.Resampling.LANCZOS))


def _region_mask(a: ColorCompareInput, ctx: ToolContext, rgb_a: np.ndarray,
                 alpha_a: np.ndarray | None) -> np.ndarray | None:
    H, W = rgb_a.shape[:2]
    region: np.ndarray | None = None
    if a.mask is not None:
        m = ctx.load_image(a.mask, "mask", mode="L")
        if m.shape[:2] != (H, W):
            raise ToolError.invalid("mask", a.mask[:60], f"mask is {m.shape[1]}x{m.shape[0]}, image_a is {W}x{H}: "
                                                         "sizes must match")
        region = m.reshape(H, W) != 0
    if a.mask_expression is not None:
        limits = ctx.settings.limits
        alpha = alpha_a if alpha_a is not None else np.full((H, W), 255, np.uint8)
        rgba = torch.from_numpy(np.ascontiguousarray(np.concatenate([rgb_a, alpha[..., None]], axis=2)))
        sel = evaluate_expression(a.mask_expression, rgba, max_chars=limits.max_expression_chars,
                                  max_depth=limits.max_expression_depth, argument="mask_expression")
        sel = sel.cpu().numpy().astype(bool, copy=False)
        region = sel if region is None else (region & sel)
    return region


def _worst_regions(above: np.ndarray, de: np.ndarray, k: int, stride: int, W: int, H: int) -> list[WorstRegion]:
    if k == 0 or not above.any():
        return []
    from scipy import ndimage

    labels, n = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    sums = np.bincount(flat, weights=de.ravel(), minlength=n + 1)
    counts[0] = 0
    top = np.argsort(-counts[1:], kind="stable")[:k] + 1
    # bounding boxes of the top k only: relabel them 1..k, everything else 0
    rank = np.zeros(n + 1, dtype=np.int32)
    rank[top] = np.arange(1, len(top) + 1, dtype=np.int32)
    slices = ndimage.find_objects(rank[labels], max_label=len(top))
    out = []
    for lab, (ys, xs) in zip(top, slices):
        x0, y0 = xs.start * stride, ys.start * stride
        x1, y1 = min(W, xs.stop * stride), min(H, ys.stop * stride)
        out.append(WorstRegion(x=int(x0), y=int(y0), width=int(x1 - x0), height=int(y1 - y0),
                               pixels=int(counts[lab]), mean_delta_e=round(float(sums[lab] / counts[lab]), 4)))
    return out


def _kth_smallest(values: np.ndarray, ks: list[int]) -> list[float]:
    """Exact k-th smallest (0-based) of non-negative float32 values by a radix select on the float bits.

    Non-negative IEEE floats order like their bit patterns: one bincount of the top 16 bits finds the bin
    holding each k, then only that bin's values are sorted. Several times faster than np.partition.
    """
    keys = (values + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0
    top = keys >> 16
    cum = np.cumsum(np.bincount(top, minlength=1 << 16))
    out = []
    cache: dict[int, np.ndarray] = {}
    for k in ks:
        b = int(np.searchsorted(cum, k, side="right"))
        if b not in cache:
            cache[b] = np.sort(values[top == b])
        start = int(cum[b - 1]) if b > 0 else 0
        out.append(float(cache[b][k - start]))
    return out


def _quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """np.percentile's default (linear) method, exactly, for float32 values >= 0."""
    n = values.size
    pos = [q / 100.0 * (n - 1) for q in qs]
    ks = sorted({int(math.floor(p)) for p in pos} | {min(int(math.floor(p)) + 1, n - 1) for p in pos})
    kth = dict(zip(ks, _kth_smallest(values, ks)))
    res = []
    for p in pos:
        lo = int(math.floor(p))
        hi = min(lo + 1, n - 1)
        res.append(kth[lo] + (kth[hi] - kth[lo]) * (p - lo))
    return res


# heatmap colours: anchors at fractions of the scale (0 .. heatmap_max); the default scale puts the
# threshold at 0.5 (yellow): navy -> blue -> yellow -> orange -> red
_ANCHORS = np.array([[0.0, 20, 24, 82], [0.25, 40, 110, 200], [0.5, 250, 225, 70], [0.75, 245, 130, 30],
                     [1.0, 200, 20, 30]], dtype=np.float32)
_MASKED_GREY = (96, 96, 96)


def _colormap(values: np.ndarray, vmax: float) -> np.ndarray:
    """float [...] -> uint8 [..., 3] (values clipped to 0..vmax)."""
    t = np.clip(values / vmax, 0.0, 1.0)
    idx = np.minimum((t * 255.0 + 0.5).astype(np.uint8), 255)
    xs = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    lut = np.stack([np.interp(xs, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)], axis=1)
    return np.round(lut).astype(np.uint8)[idx]


def _heatmap(de: np.ndarray, region: np.ndarray | None, vmax: float, threshold: float, label: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    h, w = de.shape
    rgb = _colormap(de, vmax)
    if region is not None:
        rgb[~region] = _MASKED_GREY
    bar_h, pad = 14, 6
    canvas_w = max(w, 260)
    legend_h = bar_h + 36
    img = Image.new("RGB", (canvas_w, h + legend_h), (255, 255, 255))
    img.paste(Image.fromarray(rgb), (0, 0))
    bar_w = canvas_w - 2 * pad
    bar = _colormap(np.linspace(0.0, vmax, bar_w, dtype=np.float32)[None, :].repeat(bar_h, 0), vmax)
    img.paste(Image.fromarray(bar), (pad, h + 4))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y_text = h + 4 + bar_h + 2
    marks = [(0.0, "0"), (min(threshold, vmax), f"{threshold:g}"), (vmax, f"{vmax:g}+")]
    for v, txt in marks:
        x = pad + int(round(v / vmax * (bar_w - 1)))
        draw.line([(x, h + 4), (x, h + 4 + bar_h)], fill=(0, 0, 0))
        tw = draw.textlength(txt, font=font)
        draw.text((min(max(0, x - tw / 2), canvas_w - tw), y_text), txt, fill=(0, 0, 0), font=font)
    caption = f"{label.replace('ΔE', 'dE')} per pixel; threshold {threshold:g}"  # the bitmap font has no Δ
    draw.text((pad, y_text + 13), caption, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def estimate_memory(a: ColorCompareInput, shape_a: tuple[int, ...], shape_b: tuple[int, ...], *,
                    device: Any = "cpu", tree: Any = None) -> int:
    """Upper bound, in bytes, of an image comparison's working memory (see the module docstring)."""
    H, W = shape_a[:2]
    ca = shape_a[2] if len(shape_a) == 3 else 1
    cb = shape_b[2] if len(shape_b) == 3 else 1
    px = H * W
    sampled = -(-H // a.stride) * -(-W // a.stride)
    resize = 12 if tuple(shape_b[:2]) != (H, W) else 0
    need = px * (ca + cb + resize + 6 + 44) + sampled * 64
    if tree is not None:
        need += px * 5 + expression_memory(tree, H, W, channels=4, device="cpu")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    workers = max(1, min(torch.get_num_threads(), 8)) if dev.type == "cpu" else 1
    piece = C.CPU_PIECE if dev.type == "cpu" else 1 << 18
    return int(need + workers * piece * 256 + 16 * 1024 * 1024)


def _run_images(a: ColorCompareInput, ctx: ToolContext) -> ToolOutput:
    bg_rgb = _parse(a.background, "background")[1]
    tree = None
    if a.mask_expression is not None:  # parsed before decoding: a malformed expression costs nothing
        lim = ctx.settings.limits
        tree = parse(a.mask_expression, max_chars=lim.max_expression_chars, max_depth=lim.max_expression_depth,
                     argument="mask_expression")
    img_a = ctx.load_image(a.image_a, "image_a", mode="keep")
    img_b = ctx.load_image(a.image_b, "image_b", mode="keep")
    need = estimate_memory(a, img_a.shape, img_b.shape, device=getattr(ctx.engine, "device", None), tree=tree)
    limit = workmem.call_limit(ctx.engine, getattr(ctx.settings.limits, "max_call_memory_mb", 0))
    H, W = img_a.shape[:2]
    workmem.require("mask_expression" if tree is not None else "image_a",
                    a.mask_expression if tree is not None else f"{W}x{H}", need, limit,
                    f"comparing {W}x{H} images" + (" with a mask expression" if tree is not None else "")
                    + f" at stride {a.stride}; use a larger stride or smaller images, or raise "
                      "limits.max_call_memory_mb")
    try:
        return _compare_images(a, ctx, bg_rgb, img_a, img_b)
    finally:
        del img_a, img_b
        workmem.release(need)


def _compare_images(a: ColorCompareInput, ctx: ToolContext, bg_rgb: Any, img_a: np.ndarray,
                    img_b: np.ndarray) -> ToolOutput:
    rgb_a, alpha_a = _as_rgb_alpha(img_a, "image_a")
    rgb_b, alpha_b = _as_rgb_alpha(img_b, "image_b")
    H, W = rgb_a.shape[:2]
    notes: list[str] = []
    if rgb_b.shape[:2] != (H, W):
        hb, wb = rgb_b.shape[:2]
        if a.resize == "none":
            raise ToolError.invalid("image_b", a.image_b[:60], f"image_b is {wb}x{hb} but image_a is {W}x{H}: sizes "
                                                               "must match (or pass resize='fit')")
        if abs((wb / hb) / (W / H) - 1.0) > 0.01:
            notes.append(f"image_b ({wb}x{hb}) was stretched to {W}x{H}: the aspect ratios differ")
        else:
            notes.append(f"image_b ({wb}x{hb}) was resampled to {W}x{H}")
        rgb_b, alpha_b = _as_rgb_alpha(_resize(img_b, W, H), "image_b")
    ctx.check()
    if a.alpha == "composite":
        if alpha_a is not None:
            rgb_a = C.composite_alpha(torch.from_numpy(np.concatenate([rgb_a, alpha_a[..., None]], 2)), bg_rgb).numpy()
        if alpha_b is not None:
            rgb_b = C.composite_alpha(torch.from_numpy(np.concatenate([rgb_b, alpha_b[..., None]], 2)), bg_rgb).numpy()
    elif alpha_a is not None or alpha_b is not None:
        notes.append("alpha channel ignored (alpha='ignore')")

    region = _region_mask(a, ctx, rgb_a, alpha_a)
    s = a.stride
    if s > 1:
        rgb_a, rgb_b = rgb_a[::s, ::s], rgb_b[::s, ::s]
        region = region[::s, ::s] if region is not None else None
    ta = torch.from_numpy(np.ascontiguousarray(rgb_a))
    tb = torch.from_numpy(np.ascontiguousarray(rgb_b))
    w = _weights(a)
    ctx.check()
    de_t = C.delta_e_map(ta, tb, metric=a.metric, kL=w.get("kL"), kC=a.kC, kH=a.kH,
                         textiles=a.cie94_application == "textiles", token=ctx.cancel_token(),
                         device=getattr(ctx.engine, "device", None),
                         backend=ctx.engine.backends.deltae.impl if hasattr(ctx.engine, "backends") else None)  # H4
    de = de_t.numpy()
    vals = de[region] if region is not None else de.ravel()
    n = int(vals.size)
    if n == 0:
        raise ToolError.invalid("mask_expression" if a.mask_expression is not None else "mask",
                                a.mask_expression if a.mask_expression is not None else a.mask,
                                "the region selects no (sampled) pixels")
    ctx.check()
    med, p95 = _quantiles(vals, (50.0, 95.0))
    above = de > a.threshold
    if region is not None:
        above &= region
    frac = int(np.count_nonzero(above)) / n
    verdict = "fail" if frac > a.max_fraction else "pass"
    label = _METRIC_LABEL[a.metric]
    rule = (f"fail when more than {a.max_fraction:.1%} of the sampled pixels have {label} > {a.threshold:g}; "
            f"here {frac:.2%} do")
    regions = _worst_regions(above, de, a.worst_regions, s, W, H)
    images = []
    if a.heatmap is not False:
        vmax = a.heatmap_max if a.heatmap_max is not None else 2.0 * a.threshold
        images.append(ImageOut(array=_heatmap(de, region, vmax, a.threshold, label), name="heatmap",
                               metadata={"metric": a.metric, "scale_max": f"{vmax:g}", "threshold": f"{a.threshold:g}",
                                         "stride": str(s)}))
    out = ColorCompareOutput(mode="images", metric=a.metric, parameters=w, width=W, height=H, sampled_pixels=n,
                             mean=float(vals.mean(dtype=np.float64)), median=med, p95=p95, max=float(vals.max()),
                             threshold=a.threshold, max_fraction=a.max_fraction, fraction_above=frac,
                             worst_regions=regions, verdict=verdict, rule=rule, notes=notes)
    out.band, out.band_p95 = band(out.mean), band(p95)
    text = (f"{label} over {n} sampled pixel(s) of {W}x{H}: mean {out.mean:.3f}, median {med:.3f}, p95 {p95:.3f}, "
            f"max {out.max:.3f}; {frac:.2%} above {a.threshold:g} -> {verdict.upper()} ({rule}). "
            f"In plain words: the typical pixel (mean) is {out.band}; the most different 5% (p95) "
            f"{'are' if out.band_p95 != out.band else 'are also'} {out.band_p95}.")
    if regions:
        r0 = regions[0]
        text += (f" Largest differing region: x={r0.x} y={r0.y} {r0.width}x{r0.height} "
                 f"(mean {r0.mean_delta_e:.2f}).")
    if notes:
        text += " Note: " + "; ".join(notes) + "."
    return ToolOutput(text=text, structured=out, images=images)


def _run(args: ColorCompareInput, ctx: ToolContext) -> ToolOutput:
    mode = _check_args(args)
    return _run_colors(args, ctx) if mode == "colors" else _run_images(args, ctx)


TOOLS = [
    ToolSpec(
        name="color_compare",
        title="Compare colours (ΔE)",
        description=("Perceptual colour difference (ΔE) between two colours (color_a, color_b) or two images "
                     "(image_a, image_b). Colours: ΔE, Lab/hex and a plain-language band. Images: mean, median, "
                     "p95, max, bands for mean and p95, fraction above threshold, largest differing regions, a "
                     "pass/fail verdict and a heatmap."),
        input_model=ColorCompareInput,
        output_model=ColorCompareOutput,
        run=_run,
        execution="thread",  # no model: runs beside the device worker, never queued behind long jobs
        priority=0,
    )
]
