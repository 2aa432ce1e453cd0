"""The mask expression language: errors with columns, limits, and property tests against a NumPy oracle.

The oracle evaluates a hypothesis-generated tree with NumPy float32 arrays
(np.errstate(all="ignore")), independently of engine.masks; the same tree is
rendered to text with only the parentheses the documented precedence needs
(plus random redundant ones), parsed and evaluated by the engine.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidInput
from engine.masks import evaluate_expression
from engine.masks.expression import Binary, Channel, parse, tokenize

H, W = 9, 13
_RNG = np.random.default_rng(7)
IMG = _RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
IMG[0, :4, :3] = [[0, 0, 0], [255, 255, 255], [200, 50, 50], [201, 49, 49]]  # edge values
IMG_T = torch.from_numpy(IMG)


def column_of(err: InvalidInput) -> int:
    m = re.search(r"at column (\d+)", str(err))
    assert m, str(err)
    return int(m.group(1))


# -- errors --------------------------------------------------------------------------
@pytest.mark.parametrize("text,col,words", [
    ("r >", 4, "ends too early"),
    ("(r > 200) & (foo < 3)", 14, "unknown channel 'foo'"),
    ("(r > 1", 7, "expected ')'"),
    ("r.__class__ > 1", 2, "no attribute access"),
    ("r > 1 < 2", 7, "cannot be chained"),
    ("r + 1", 3, "is a number, not a condition"),
    ("(r > 5) + 1", 9, "needs numbers"),
    ("r & g", 3, "needs conditions"),
    ("r = 5", 3, "use =="),
    ("#ff0000 > 1", 1, "only appear inside delta_e"),
    ("delta_e(#12) < 3", 9, "malformed colour"),
    ("delta_e(red) < 3", 9, "needs a colour"),
    ("1e999 > r", 1, "out of range"),
    ("", 1, "empty"),
    ("r > 200 )", 9, "unexpected ')'"),
    ("abs(r, g) > 1", 1, "takes 1"),
    ("min(r) > 1", 1, "at least 2"),
    ("r > 12abc", 5, "malformed number"),
    ("__import__('os') > 1", 12, "unexpected character"),
    ("r > 1 and", 10, "ends too early"),
    ("and r > 1", 1, "needs a condition on its left"),
    ("r > 2 ¬ g", 7, "unexpected character"),
])
def test_errors_name_the_column(text: str, col: int, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        evaluate_expression(text, IMG_T)
    assert info.value.argument == "expression"
    assert words in str(info.value)
    assert column_of(info.value) == col


def test_length_and_depth_limits() -> None:
    ok = "r > 1" + " " * 1995
    assert evaluate_expression(ok, IMG_T).shape == (H, W)
    with pytest.raises(InvalidInput, match="longer than the limit of 2000"):
        evaluate_expression(ok + " ", IMG_T)
    with pytest.raises(InvalidInput, match="limit of 10 characters"):
        evaluate_expression("r > 1 & g > 1", IMG_T, max_chars=10)
    with pytest.raises(InvalidInput, match="nested deeper than the limit of 32"):
        evaluate_expression("(" * 40 + "r > 1" + ")" * 40, IMG_T)
    with pytest.raises(InvalidInput, match="deeper than the limit of 32"):
        evaluate_expression(" & ".join(["r > 1"] * 40), IMG_T)
    with pytest.raises(InvalidInput, match="limit of 3"):
        evaluate_expression("(r + 1) * 2 > 1", IMG_T, max_depth=3)
    # ten thousand nested parentheses: an error, never a RecursionError
    with pytest.raises(InvalidInput):
        evaluate_expression("(" * 10000 + "r>1" + ")" * 10000, IMG_T, max_chars=30000, max_depth=100000)


def test_tree_is_plain_dataclasses_and_types() -> None:
    tree = parse("r > 200 & g < 50")
    assert isinstance(tree, Binary) and tree.op == "and" and tree.kind == "bool"
    assert isinstance(tree.left, Binary) and tree.left.op == ">" and tree.left.left == Channel("r", 1)
    assert [t.type for t in tokenize("delta_e(#1E90ff) <= 1.5e1")] == ["name", "op", "hex", "op", "op", "num", "end"]
    assert parse("delta_e(#abc) < 1").left.color == "#aabbcc"  # type: ignore[union-attr]


def test_precedence_and_keywords() -> None:
    r, g, b = (IMG[..., i].astype(np.float32) for i in range(3))
    with np.errstate(all="ignore"):
        cases = _precedence_cases(r, g, b)
    with np.errstate(all="ignore"):
        for text, want in cases.items():
            got = evaluate_expression(text, IMG_T).numpy()
            np.testing.assert_array_equal(got, want, err_msg=text)


def _precedence_cases(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "r > 100 & g < 100 | b > 200": ((r > 100) & (g < 100)) | (b > 200),
        "r > 100 | g < 100 & b > 200": (r > 100) | ((g < 100) & (b > 200)),
        "r > 100 ^ g < 100 & b > 200": (r > 100) ^ ((g < 100) & (b > 200)),
        "r > 100 or g < 100 xor b > 200": (r > 100) | ((g < 100) ^ (b > 200)),
        "~r > 100 & g > 5": (~(r > 100)) & (g > 5),
        "NOT r > 100 AND not g > 5": (~(r > 100)) & (~(g > 5)),
        "!(r > 100 | g > 5)": ~((r > 100) | (g > 5)),
        "r - g - b > -100": (r - g - b) > -100,
        "r / g / 2 > 0.5": (r / g / np.float32(2)) > np.float32(0.5),
        "r + g * 2 > 300": (r + g * 2) > 300,
        "-r + 300 > g": (-r + 300) > g,
        "abs(r - g) < 30 & max(r, g, b) - min(r, g, b) > 20":
            (np.abs(r - g) < 30) & ((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)) > 20),
        "r == 200 | r != r": (r == 200) | (r != r),
        "r > 200.5 & r <= 250.5 & g >= 49.5": (r > 200.5) & (r <= 250.5) & (g >= 49.5),
        "a == 255 | a < 3": (IMG[..., 3] == 255) | (IMG[..., 3] < 3),
        "r == 100.5": np.zeros((H, W), bool),
        "300 < r | -1 > g": np.zeros((H, W), bool),
    }


def test_division_by_zero_follows_float32() -> None:
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = [5, 0, 0]
    t = torch.from_numpy(img)
    # 5/0 = inf, 0/0 = nan: nan compares false except !=
    assert evaluate_expression("r / g > 1000000", t).numpy().tolist() == [[True, False, False], [False] * 3]
    assert evaluate_expression("r / g != r / g", t).numpy().tolist() == [[False, True, True], [True] * 3]
    assert not evaluate_expression("r / g == r / g", t).numpy()[1].any()
    assert evaluate_expression("-r / g < 0", t).numpy()[0, 0]  # -inf


def test_x_y_width_height_and_rgb_alpha() -> None:
    rgb = torch.from_numpy(IMG[..., :3].copy())
    got = evaluate_expression("x >= width - 3 & y < height / 2 & a == 255", rgb).numpy()
    yy, xx = np.mgrid[0:H, 0:W]
    np.testing.assert_array_equal(got, (xx >= W - 3) & (yy < H / 2))
    assert not evaluate_expression("a < 255", rgb).numpy().any()
    assert evaluate_expression("1 < 2", rgb).shape == (H, W)


# -- property tests --------------------------------------------------------------------
PREC = {"or": 1, "xor": 2, "and": 3, "not": 4, "cmp": 5, "+": 6, "-": 6, "*": 7, "/": 7, "neg": 8, "atom": 9}
OR_TEXT = {"or": ["|", "or"], "xor": ["^", "xor"], "and": ["&", "and"]}


def _num_leaf() -> st.SearchStrategy:
    chans = st.sampled_from(["r", "g", "b", "a", "x", "y", "width", "height"]).map(lambda c: ("chan", c))
    consts = st.one_of(st.integers(0, 300).map(float), st.sampled_from([0.5, 127.5, 0.001, 2.25, 1e-5, 255.0]))
    return st.one_of(chans, consts.map(lambda v: ("num", v)))


def _num_tree() -> st.SearchStrategy:
    return st.recursive(_num_leaf(), lambda kids: st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "/"]), kids, kids),
        st.tuples(st.just("neg"), kids),
        st.tuples(st.just("abs"), kids),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(kids, min_size=2, max_size=3)),
    ), max_leaves=6)


def _bool_tree() -> st.SearchStrategy:
    cmp = st.tuples(st.just("cmp"), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), _num_tree(), _num_tree())
    return st.recursive(cmp, lambda kids: st.one_of(
        st.tuples(st.sampled_from(["and", "or", "xor"]), kids, kids),
        st.tuples(st.just("not"), kids),
    ), max_leaves=5)


def _prec(node: tuple) -> int:
    tag = node[0]
    if tag in ("chan", "num", "abs", "min", "max"):
        return PREC["atom"]
    return PREC[tag]


def render(node: tuple, draw_bool) -> str:
    """Text with the parentheses the precedence needs, plus random redundant ones."""
    def wrap(child: tuple, need: bool) -> str:
        text = render(child, draw_bool)
        return f"({text})" if need or draw_bool() else text

    tag = node[0]
    if tag == "chan":
        return node[1]
    if tag == "num":
        return repr(node[1])
    if tag == "neg":
        return "-" + wrap(node[1], _prec(node[1]) < PREC["neg"])
    if tag == "abs":
        return f"abs({render(node[1], draw_bool)})"
    if tag in ("min", "max"):
        return f"{tag}({', '.join(render(k, draw_bool) for k in node[1])})"
    if tag == "not":
        return ("~" if draw_bool() else "not ") + wrap(node[1], _prec(node[1]) < PREC["not"])
    if tag == "cmp":
        return f"{wrap(node[2], False)} {node[1]} {wrap(node[3], False)}"
    op = tag
    p = PREC[op]
    sym = (OR_TEXT[op][0] if draw_bool() else OR_TEXT[op][1]) if op in OR_TEXT else op
    return f"{wrap(node[1], _prec(node[1]) < p)} {sym} {wrap(node[2], _prec(node[2]) <= p)}"


def oracle(node: tuple, img: np.ndarray):
    h, w = img.shape[:2]
    chans = {"r": img[..., 0], "g": img[..., 1], "b": img[..., 2], "a": img[..., 3]}
    tag = node[0]
    if tag == "chan":
        name = node[1]
        if name in chans:
            return chans[name].astype(np.float32)
        return {"x": np.arange(w, dtype=np.float32)[None, :], "y": np.arange(h, dtype=np.float32)[:, None],
                "width": np.float32(w), "height": np.float32(h)}[name]
    if tag == "num":
        return np.float32(node[1])
    if tag == "neg":
        return -oracle(node[1], img)
    if tag == "abs":
        return np.abs(oracle(node[1], img))
    if tag in ("min", "max"):
        fn = np.minimum if tag == "min" else np.maximum
        acc = oracle(node[1][0], img)
        for k in node[1][1:]:
            acc = fn(acc, oracle(k, img))
        return acc
    if tag == "not":
        return ~oracle(node[1], img)
    if tag == "cmp":
        a, b = oracle(node[2], img), oracle(node[3], img)
        return {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
                "!=": np.not_equal}[node[1]](a, b)
    a, b = oracle(node[1], img), oracle(node[2], img)
    return {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "and": np.logical_and,
            "or": np.logical_or, "xor": np.logical_xor}[tag](a, b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_bool_tree(), data=st.data())
def test_random_expressions_match_numpy_oracle(tree: tuple, data: st.DataObject) -> None:
    text = render(tree, lambda: data.draw(st.booleans()))
    with np.errstate(all="ignore"):
        want = np.broadcast_to(oracle(tree, IMG), (H, W))
    got = evaluate_expression(text, IMG_T, max_depth=64)
    assert got.dtype == torch.bool and tuple(got.shape) == (H, W)
    np.testing.assert_array_equal(got.numpy(), want, err_msg=text)


_VOCAB = ["r", "g", "b", "x", "h", "delta_e", "(", ")", "#1e90ff", "&", "|", "^", "~", "and", "or", "not", "<",
          ">=", "==", "!=", "=", "+", "-", "*", "/", "1", "2.5", ".", ",", "abs", "min", "foo", "__import__", "'",
          "1e", "lambda", ":", "[", "]", "0x10", "@", "\\", "\n", "  "]


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=80), st.lists(st.sampled_from(_VOCAB), max_size=25).map(" ".join),
                      st.lists(st.sampled_from(_VOCAB), max_size=25).map("".join)))
def test_garbage_is_rejected_with_invalid_input(text: str) -> None:
    try:
        out = evaluate_expression(text, IMG_T)
    except InvalidInput as exc:
        assert exc.argument == "expression"
        assert column_of(exc) >= 1
    else:  # a few random strings are valid expressions: they must give a mask
        assert out.dtype == torch.bool and tuple(out.shape) == (H, W)
