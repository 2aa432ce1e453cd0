"""Issue 17 item 4: mask expressions are costed before they run, and their memory goes back.

Measurements are the kernel's: peak RSS (VmHWM, reset through clear_refs)
over the RSS before the call, taken in a clean worker process
(tests/rel_memory_worker.py) that fixes glibc's mmap threshold at 64 KiB, so
every image-sized array is its own mapping and RSS follows the bytes alive
(no heap reuse hiding or inflating them); the server keeps glibc's default
(arrays of >= 32 MB images - 8 MP and up - are mappings there anyway).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import masks, workmem
from engine.errors import InvalidInput
from engine.masks.edits import _rgb_to_hsv
from engine.masks.expression import CHANNELS, MAX_ARGS, check_expression_memory, expression_memory, parse
from tests.rel_memory_worker import Worker
from tests.reltools import reset_peak

MB = 1_000_000

# the probe of issue 17: 1,998 characters each, inside the length and depth limits of the old code
PROBE_MAX = "max(" + ",".join(f"r+{i}" for i in range(350)) + ") > 1"
PROBE_XY = "max(" + ",".join(["x*y"] * 498) + ")>1"
# the same work within the arity cap: nested max of 32 arguments each
NESTED_MAX = "max(" + ",".join("max(" + ",".join(f"r+{i}" for i in range(k, k + 32)) + ")"
                               for k in range(0, 320, 32)) + ")>1"
NESTED_XY = "max(" + ",".join("max(" + ",".join(["x*y"] * 32) + ")" for _ in range(14)) + ")>1"
# two groups only: enough for the old evaluator to hold 32 arrays at once, cheap enough for a unit test
SHORT_MAX = "max(" + ",".join("max(" + ",".join(f"r+{i}" for i in range(k, k + 32)) + ")" for k in (0, 32)) + ")>1"
SHORT_XY = "max(" + ",".join("max(" + ",".join(["x*y"] * 32) + ")" for _ in range(2)) + ")>1"


@pytest.fixture(scope="module")
def worker():
    if not reset_peak():
        pytest.fail("these measurements need /proc/self/clear_refs (Linux)")
    w = Worker()
    yield w
    w.close()


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))


def test_probe_lengths_are_within_the_old_limits():
    assert len(PROBE_MAX) == 1998 and len(PROBE_XY) == 1998
    assert len(NESTED_MAX) <= 2000 and len(NESTED_XY) <= 2000


@pytest.mark.parametrize("probe", [PROBE_MAX, PROBE_XY])
def test_probe_arity_is_refused_before_evaluation(probe):
    img = _image(8, 8)
    with pytest.raises(InvalidInput, match=f"at most {MAX_ARGS} argument"):
        masks.evaluate_expression(probe, img)


@pytest.mark.parametrize("expr", [SHORT_MAX, SHORT_XY])
def test_probe_peak_memory_on_2_megapixels(expr, worker):
    """The old evaluator held every argument of a max at once: 32 x 8 MB here, 2.8-4.0 GB for the probe
    (the full-length nested probes run through the server in test_rel_memory_server.py).

    Bound: the pairwise folds hold the r channel, the outer and the inner accumulator, one argument
    (4 B/px each) and the bool result: 17 B/px = 34 MB at 2 MP; 48 MB allows for the allocator. The
    estimate must cover it.
    """
    r = worker.ask(kind="expr", expr=expr, h=1250, w=1600)
    print(f"[rel-memory] {expr[:24]}... 2 MP: estimate {r['est'] / MB:.1f} MB, peak +{r['peak'] / MB:.1f} MB, "
          f"after +{r['after'] / MB:.1f} MB")
    assert r["shape"] == [1250, 1600]
    assert r["peak"] <= r["est"]
    assert r["peak"] < 48 * MB
    assert r["after"] < 8 * MB


def test_freed_memory_returns_to_the_os_with_glibc_defaults():
    """With glibc's dynamic mmap threshold (as in the server), RSS comes back down after the calls."""
    w = Worker(mapped=False)
    try:
        r = w.ask(kind="rss_after", expr="h > 100 & s < 0.5 | gray > 3 | (x*y + r*g)/2 > abs(b - 7)", h=1250, w=1600)
    finally:
        w.close()
    print(f"[rel-memory] RSS after two 2 MP evaluations: {r['after'] / MB:+.1f} MB")
    assert r["after"] < 16 * MB


def test_estimate_at_40_megapixels_and_the_refusal():
    w, h = 8000, 5000
    for expr in (NESTED_MAX, NESTED_XY):
        est = expression_memory(parse(expr), h, w)
        # r, the outer and the inner accumulator, one argument (4 B/px each), the result: not 350 arrays
        assert est <= 17 * w * h + 4 * MB
    # a deliberately wide tree: 32 nested levels, each holding its left operand
    deep = "r" + "".join(f"+(g*{i}" for i in range(1, 30)) + ")" * 29 + " > 1"
    tree = parse(deep)
    need = expression_memory(tree, h, w)
    assert need > 30 * 4 * w * h
    with pytest.raises(workmem.MemoryLimitExceeded) as err:
        check_expression_memory(tree, deep, h, w, 2 * 1024**3, argument="mask_expression")
    msg = str(err.value)
    assert msg.startswith("mask_expression='r+(g*1") and "would need " in msg and "limit 2.1 GB" in msg
    assert "image-sized arrays" in msg


def test_refusal_happens_before_allocating(worker):
    r = worker.ask(kind="expr", expr="h > 3 & l > 2", h=1000, w=1000, limit=10 * MB)
    assert r["refused"] and "would need" in r["refused"]
    assert r["peak"] < 2 * MB


# -- fuzz: random valid expression trees; refused by the estimate, or within it --------------------
_NUM_CH = [c for c in CHANNELS]
_HEX = ["#ff0000", "#1e90ff", "#777"]


def _nums(children):
    return st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "/"]), children, children).map(lambda t: f"({t[1]} {t[0]} {t[2]})"),
        children.map(lambda c: f"(-{c})"),
        children.map(lambda c: f"abs({c})"),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(children, min_size=2, max_size=5)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"),
    )


_num_leaf = st.one_of(st.sampled_from(_NUM_CH), st.sampled_from(["0", "1", "2.5", "200", "1e3", "0.5"]),
                      st.sampled_from(_HEX).map(lambda h: f"delta_e({h})"))
_num = st.recursive(_num_leaf, _nums, max_leaves=12)


def _bools(children):
    return st.one_of(
        st.tuples(st.sampled_from(["&", "|", "^"]), children, children).map(lambda t: f"({t[1]} {t[0]} {t[2]})"),
        children.map(lambda c: f"~({c})"),
    )


_cmp = st.tuples(_num, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), _num).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
_expr = st.recursive(_cmp, _bools, max_leaves=5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(expr=_expr, limit_mb=st.integers(1, 40), rgb=st.booleans())
def test_fuzz_refused_or_within_the_estimate(worker, expr, limit_mb, rgb):
    try:
        parse(expr)
    except InvalidInput:
        return  # over the depth limit: not a valid expression
    r = worker.ask(kind="expr", expr=expr, h=320, w=384, rgb=rgb, seed=len(expr), limit=limit_mb * MB)
    if r["refused"]:
        assert r["est"] > limit_mb * MB and "would need" in r["refused"]
        return
    assert r["shape"] == [320, 384] and r["dtype"] == "torch.bool"
    assert r["peak"] <= r["est"], f"{expr}: peak {r['peak']} > estimate {r['est']}"


# -- the cheaper evaluator computes what NumPy computes ----------------------------------------------
_ORACLE_CH = ["r", "g", "b", "a", "x", "y", "width", "height"]
_onum = st.recursive(st.one_of(st.sampled_from(_ORACLE_CH), st.sampled_from(["0", "1", "2.5", "200", "0.5"])),
                     _nums, max_leaves=10)
_oexpr = st.recursive(st.tuples(_onum, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), _onum).map(
    lambda t: f"{t[0]} {t[1]} {t[2]}"), _bools, max_leaves=5)


def _np_eval(node, img: np.ndarray):
    from engine.masks.expression import Call, Channel, Num, Unary

    h, w, c = img.shape
    f32 = np.float32
    if isinstance(node, Num):
        return f32(node.value)
    if isinstance(node, Channel):
        n = node.name
        if n in "rgba":
            i = "rgba".index(n)
            return img[..., i].astype(f32) if i < c else f32(255)
        return {"x": np.arange(w, dtype=f32)[None, :], "y": np.arange(h, dtype=f32)[:, None],
                "width": f32(w), "height": f32(h)}[n]
    if isinstance(node, Call):
        args = [_np_eval(a, img) for a in node.args]
        if node.func == "abs":
            return np.abs(args[0])
        fn = np.minimum if node.func == "min" else np.maximum
        acc = args[0]
        for a in args[1:]:
            acc = fn(acc, a)
        return acc
    if isinstance(node, Unary):
        x = _np_eval(node.operand, img)
        return np.logical_not(x) if node.op == "not" else np.negative(x)
    a, b = _np_eval(node.left, img), _np_eval(node.right, img)
    ops = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "<": np.less, "<=": np.less_equal,
           ">": np.greater, ">=": np.greater_equal, "==": np.equal, "!=": np.not_equal, "and": np.logical_and,
           "or": np.logical_or, "xor": np.logical_xor}
    return ops[node.op](a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=_oexpr, rgb=st.booleans())
def test_fuzz_matches_numpy_float32(expr, rgb):
    try:
        tree = parse(expr)
    except InvalidInput:
        return
    img = _image(23, 31, seed=len(expr)).numpy()
    img[0, :4, :3] = [[0, 0, 0], [255, 255, 255], [200, 200, 200], [1, 2, 3]]
    if rgb:
        img = np.ascontiguousarray(img[..., :3])
    with np.errstate(all="ignore"):
        want = np.broadcast_to(_np_eval(tree, img), img.shape[:2])
    got = masks.evaluate_expression(expr, torch.from_numpy(img)).numpy()
    np.testing.assert_array_equal(got, want, err_msg=expr)


def test_lean_channels_match_the_reference_formulas():
    """gray / h s v computed in place equal the straightforward formulas bit for bit."""
    img = _image(37, 41, seed=3)
    img[0, :6, :3] = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]])
    rgb = img[..., :3].to(torch.float32)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    h, s, v = _rgb_to_hsv(rgb / 255.0)
    from engine.masks.expression import _gray, _hsv

    assert torch.equal(_gray(img), gray)
    h2, s2, v2 = _hsv(img)
    assert torch.equal(h2, h * 360.0) and torch.equal(s2, s) and torch.equal(v2, v)
    assert math.isfinite(float(h2.max()))
