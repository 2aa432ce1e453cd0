"""Mask expressions: the language (tokenizer, parser, type checker), its evaluation on an image, and an
upper bound of the memory that evaluation holds.

Client text is never handed to `eval`: it is tokenized and parsed by the small
recursive-descent grammar below into a tree of plain frozen dataclasses, which
`evaluate_tree` evaluates on device tensors. There is no attribute access, no
subscripting, no strings, no user-defined names: only the channels and the
functions listed here.

Grammar (lowest precedence first; binary operators are left-associative):

    expr    := or
    or      := xor  (("|" | "or")  xor)*
    xor     := and  (("^" | "xor") and)*
    and     := not  (("&" | "and") not)*
    not     := ("~" | "!" | "not") not  |  cmp
    cmp     := sum [("<" | "<=" | ">" | ">=" | "==" | "!=") sum]     # no chains: a < b < c is an error
    sum     := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := ("-" | "+") unary  |  primary
    primary := NUMBER | CHANNEL | "delta_e" "(" HEX ")" | ("abs" | "min" | "max") "(" sum ("," sum)* ")"
             | "(" expr ")"

Unlike Python/NumPy, comparisons bind tighter than `& | ^ ~`, so
`r > 200 & g < 50` means `(r > 200) & (g < 50)`; parentheses are still welcome.

Types: every node is a number ("num") or a condition ("bool"). Comparisons take
numbers and give a condition; `& | ^ ~ and or xor not` take conditions;
`+ - * /`, `abs`, `min`, `max` take numbers. Using a condition as a number (or
the reverse) is an error, so `(r > 5) + 1` and `r & g` are rejected, and the
whole expression must be a condition. Keywords are case-insensitive; channel
names are lower case.

Channels: r g b a (0-255), h (hue, degrees 0-360), s v (0-1), l lab_a lab_b
(CIELAB), gray (0.299 r + 0.587 g + 0.114 b), x y (pixel column / row, from
0), width height (the image size). `delta_e(#rgb | #rrggbb)` is the CIEDE2000
distance of each pixel to that colour. NUMBER is decimal (`200`, `0.5`, `.5`,
`1e3`); a literal that is not finite in float32 is an error.

Limits: at most `max_chars` characters, at most `max_depth` levels of
nesting, counting both the height of the tree and the parenthesis/unary/call
nesting, and `min` / `max` take 2 to `MAX_ARGS` (32) arguments (nest them for
more). Every error is `InvalidInput(argument, text, "<what> at column N")`
with a 1-based column; `argument` is "expression" unless the caller names its
own (color_compare's "mask_expression").

Semantics (`evaluate_tree`, `evaluate_expression`): channels and numbers are
float32; `+ - * /` follow IEEE float32 exactly like NumPy float32 arrays
(x/0 = +-inf, 0/0 = nan, inf-inf = nan); comparisons with nan are false except
`!=`; `min`/`max` propagate nan (np.minimum / np.maximum). Channels: r g b a
as 0..255 (a = 255 for RGB input), h in degrees [0, 360) and s, v in 0..1 (as
skimage.color.rgb2hsv, hue * 360), gray = 0.299 r + 0.587 g + 0.114 b, l lab_a
lab_b = skimage rgb2lab via `engine.color.rgb_to_lab`, x / y the column / row
index, width / height the image size, delta_e(#hex) the CIEDE2000 distance via
`engine.color.delta_e_to_color`. Only the channels the expression names are
computed. Fast path (same results): a conjunction of comparisons of r g b a
with constants is turned into one per-channel integer range [lo, hi] and
evaluated in uint8 (OpenCV `inRange` on CPU, torch elsewhere).

Memory (`expression_memory(tree, height, width, channels=4, device="cpu")` ->
bytes): an upper bound of the extra memory the evaluation holds at its peak
(the input image itself is not counted). One walker drives both the evaluator
and the estimate (`_TorchOps` computes, `_CostOps` only counts bytes), so both
follow the same order and the same rules:
  * children left to right; a value is held until its parent combines it;
  * n-ary min/max and chains of & | ^ are folded pairwise: the accumulator
    and one argument are alive, never all the arguments;
  * a result is written into an operand that is a temporary of the result's
    shape and dtype (in place); otherwise a new array is allocated while
    both operands are alive;
  * float32 (4 B/px) for numbers, bool (1 B/px) for conditions; x is one
    row, y one column, width, height and numbers are scalars;
  * channels are computed once and kept for the whole evaluation: r g b a
    gray 4 B/px each (gray needs 8 B/px while computing), h s v 12 B/px
    together (36 B/px while computing), l lab_a lab_b 12 B/px together (a
    3 B/px copy of RGB and `_LAB_PIECE_BYTES` while computing);
  * delta_e(#hex) is recomputed at each use: a 4 B/px result, a 3 B/px copy
    of RGB and at most `_DE_BYTES_PER_PIECE_PIXEL` per pixel of each piece in
    flight while computing (caching it would let ~60 colours hold 240 B/px);
  * comparisons of r g b a with constants become one uint8 range test
    (1 B/px result, at most 2 B/px while computing);
  * a result narrower than the image (e.g. `x > 5`) is expanded: + 1 B/px.
  Plus `_OVERHEAD` for the interpreter and the allocator's rounding.
`check_expression_memory(...)` raises `engine.workmem.MemoryLimitExceeded`
when that bound is over the limit, before anything is allocated. After an
evaluation that may have held >= `workmem.TRIM_BYTES`, freed heap memory is
handed back to the OS (`workmem.release`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch

from .. import workmem
from ..errors import InvalidInput
from .tensors import check_image

__all__ = ["parse", "tokenize", "channels_used", "evaluate_tree", "evaluate_expression", "expression_memory",
           "check_expression_memory", "CHANNELS", "FUNCTIONS", "MAX_ARGS", "Node", "Num", "Channel", "DeltaE",
           "Call", "Unary", "Binary", "Token"]

Kind = Literal["num", "bool"]

CHANNELS: tuple[str, ...] = ("r", "g", "b", "a", "h", "s", "v", "l", "lab_a", "lab_b", "gray", "x", "y",
                             "width", "height")
MAX_ARGS = 32  # min / max: evaluation folds pairwise, the cap bounds the passes over the image per call
FUNCTIONS: dict[str, tuple[int, int | None]] = {"abs": (1, 1), "min": (2, MAX_ARGS), "max": (2, MAX_ARGS)}
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")
_KEYWORDS = {"and": "and", "or": "or", "xor": "xor", "not": "not"}
_SYMBOL_LOGIC = {"&": "and", "|": "or", "^": "xor", "~": "not", "!": "not"}
_FLOAT32_MAX = 3.4028234663852886e38


# -- the tree --------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: float
    col: int
    kind: Kind = "num"
    height: int = 1


@dataclass(frozen=True)
class Channel:
    name: str
    col: int
    kind: Kind = "num"
    height: int = 1


@dataclass(frozen=True)
class DeltaE:
    color: str  # "#rrggbb" (normalised from #rgb)
    col: int
    kind: Kind = "num"
    height: int = 1


@dataclass(frozen=True)
class Call:
    func: str  # abs | min | max
    args: tuple[Node, ...]
    col: int
    kind: Kind = "num"
    height: int = 1


@dataclass(frozen=True)
class Unary:
    op: str  # "-" (num) | "not" (bool)
    operand: Node
    col: int
    kind: Kind = "num"
    height: int = 1


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / < <= > >= == != and or xor
    left: Node
    right: Node
    col: int
    kind: Kind = "num"
    height: int = 1


Node = Union[Num, Channel, DeltaE, Call, Unary, Binary]


# -- tokens ---------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    type: str  # num | name | hex | op | end
    text: str
    col: int  # 1-based


_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<hex>\#[0-9A-Za-z]*)
  | (?P<op><=|>=|==|!=|[<>&|^~!+\-*/(),])
""", re.VERBOSE)


def _error(text: str, rule: str, col: int, argument: str = "expression") -> InvalidInput:
    return InvalidInput(argument, text, f"{rule} at column {col}")


def tokenize(text: str, *, argument: str = "expression") -> list[Token]:
    """Split `text` into tokens; an unknown character is an error naming its column."""
    out: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            hint = ""
            if ch == "=":
                hint = " (use == to compare)"
            elif ch == ".":
                hint = " (there is no attribute access)"
            raise _error(text, f"unexpected character {ch!r}{hint}", pos + 1, argument)
        kind = m.lastgroup
        if kind == "num" and m.end() < len(text) and (text[m.end()].isalnum() or text[m.end()] in "_."):
            raise _error(text, f"malformed number {text[pos:m.end() + 1]!r}", pos + 1, argument)
        if kind != "ws":
            out.append(Token(kind or "op", m.group(), pos + 1))
        pos = m.end()
    out.append(Token("end", "", len(text) + 1))
    return out


# -- parser ---------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str, max_depth: int, argument: str) -> None:
        self.text = text
        self.argument = argument
        self.tokens = tokenize(text, argument=argument)
        self.i = 0
        self.max_depth = max_depth
        self.nesting = 0

    # helpers
    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, rule: str, col: int) -> InvalidInput:
        return _error(self.text, rule, col, self.argument)

    def logic_op(self, tok: Token) -> str | None:
        if tok.type == "op":
            return _SYMBOL_LOGIC.get(tok.text)
        if tok.type == "name":
            return _KEYWORDS.get(tok.text.lower())
        return None

    def expect(self, text: str, what: str) -> Token:
        tok = self.peek()
        if tok.type == "op" and tok.text == text:
            return self.take()
        raise self.error(f"expected {what}, found {_describe(tok)}", tok.col)

    def enter(self, col: int) -> None:
        self.nesting += 1
        if self.nesting > self.max_depth:
            raise self.error(f"nested deeper than the limit of {self.max_depth} levels", col)

    def leave(self) -> None:
        self.nesting -= 1

    def node(self, cls: type, *fields: object, kind: Kind, children: tuple[Node, ...], col: int) -> Node:
        height = 1 + max((c.height for c in children), default=0)
        if height > self.max_depth:
            raise self.error(f"expression tree deeper than the limit of {self.max_depth} levels", col)
        return cls(*fields, col=col, kind=kind, height=height)

    def need(self, node: Node, kind: Kind, op: str, col: int) -> None:
        if node.kind != kind:
            if kind == "bool":
                rule = f"'{op}' needs conditions (comparisons such as r > 200) on both sides, not a number"
            else:
                rule = f"'{op}' needs numbers, not a condition (a comparison or logic result)"
            raise self.error(rule, col)

    # grammar
    def parse(self) -> Node:
        tok = self.peek()
        if tok.type == "end":
            raise self.error("the expression is empty", tok.col)
        node = self.parse_binary_logic(0)
        tok = self.peek()
        if tok.type != "end":
            raise self.error(f"unexpected {_describe(tok)}", tok.col)
        if node.kind != "bool":
            raise self.error("the expression is a number, not a condition; compare it, e.g. 'r > 128'", node.col)
        return node

    _LEVELS = ("or", "xor", "and")

    def parse_binary_logic(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.parse_not()
        name = self._LEVELS[level]
        left = self.parse_binary_logic(level + 1)
        while self.logic_op(self.peek()) == name:
            tok = self.take()
            right = self.parse_binary_logic(level + 1)
            self.need(left, "bool", tok.text, tok.col)
            self.need(right, "bool", tok.text, tok.col)
            left = self.node(Binary, name, left, right, kind="bool", children=(left, right), col=tok.col)
        return left

    def parse_not(self) -> Node:
        tok = self.peek()
        if self.logic_op(tok) == "not":
            self.take()
            self.enter(tok.col)
            operand = self.parse_not()
            self.leave()
            self.need(operand, "bool", tok.text, tok.col)
            return self.node(Unary, "not", operand, kind="bool", children=(operand,), col=tok.col)
        if self.logic_op(tok) is not None:
            raise self.error(f"'{tok.text}' needs a condition on its left", tok.col)
        return self.parse_cmp()

    def parse_cmp(self) -> Node:
        left = self.parse_sum()
        tok = self.peek()
        if tok.type == "op" and tok.text in COMPARISONS:
            self.take()
            right = self.parse_sum()
            self.need(left, "num", tok.text, tok.col)
            self.need(right, "num", tok.text, tok.col)
            after = self.peek()
            if after.type == "op" and after.text in COMPARISONS:
                raise self.error("comparisons cannot be chained; join them with &", after.col)
            return self.node(Binary, tok.text, left, right, kind="bool", children=(left, right), col=tok.col)
        return left

    def parse_sum(self) -> Node:
        left = self.parse_term()
        while self.peek().type == "op" and self.peek().text in "+-":
            tok = self.take()
            right = self.parse_term()
            self.need(left, "num", tok.text, tok.col)
            self.need(right, "num", tok.text, tok.col)
            left = self.node(Binary, tok.text, left, right, kind="num", children=(left, right), col=tok.col)
        return left

    def parse_term(self) -> Node:
        left = self.parse_unary()
        while self.peek().type == "op" and self.peek().text in "*/":
            tok = self.take()
            right = self.parse_unary()
            self.need(left, "num", tok.text, tok.col)
            self.need(right, "num", tok.text, tok.col)
            left = self.node(Binary, tok.text, left, right, kind="num", children=(left, right), col=tok.col)
        return left

    def parse_unary(self) -> Node:
        tok = self.peek()
        if tok.type == "op" and tok.text in "+-":
            self.take()
            self.enter(tok.col)
            operand = self.parse_unary()
            self.leave()
            self.need(operand, "num", tok.text, tok.col)
            if tok.text == "+":
                return operand
            return self.node(Unary, "-", operand, kind="num", children=(operand,), col=tok.col)
        return self.parse_primary()

    def parse_primary(self) -> Node:
        tok = self.take()
        if tok.type == "num":
            value = float(tok.text)
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                raise self.error(f"number {tok.text} is out of range", tok.col)
            return Num(value, tok.col)
        if tok.type == "op" and tok.text == "(":
            self.enter(tok.col)
            if self.peek().type == "end":
                raise self.error("unclosed '('", tok.col)
            inner = self.parse_binary_logic(0)
            self.leave()
            close = self.peek()
            if not (close.type == "op" and close.text == ")"):
                raise self.error(f"expected ')' to close the '(' opened at character {tok.col}, "
                                 f"found {_describe(close)}", close.col)
            self.take()
            return inner
        if tok.type == "name":
            name = tok.text
            low = name.lower()
            if low == "delta_e":
                return self.parse_delta_e(tok)
            if low in FUNCTIONS:
                return self.parse_call(tok, low)
            if name in CHANNELS:
                return Channel(name, tok.col)
            if low in _KEYWORDS:
                raise self.error(f"'{name}' needs a condition on its left", tok.col)
            raise self.error(f"unknown channel {name!r}; known channels: {' '.join(CHANNELS)}, "
                             f"functions: delta_e(#hex) {' '.join(FUNCTIONS)}", tok.col)
        if tok.type == "hex":
            raise self.error(f"a colour {tok.text!r} can only appear inside delta_e(...)", tok.col)
        if tok.type == "end":
            raise self.error("the expression ends too early", tok.col)
        raise self.error(f"unexpected {_describe(tok)}", tok.col)

    def parse_delta_e(self, name: Token) -> Node:
        self.expect("(", "'(' after delta_e")
        tok = self.take()
        if tok.type != "hex":
            raise self.error(f"delta_e needs a colour like #1e90ff, found {_describe(tok)}", tok.col)
        digits = tok.text[1:]
        if len(digits) not in (3, 6) or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise self.error(f"malformed colour {tok.text!r}: expected #rgb or #rrggbb", tok.col)
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        self.expect(")", "')' after the colour")
        return DeltaE("#" + digits.lower(), name.col)

    def parse_call(self, name: Token, func: str) -> Node:
        self.expect("(", f"'(' after {func}")
        self.enter(name.col)
        args = [self.parse_sum()]
        while self.peek().type == "op" and self.peek().text == ",":
            self.take()
            args.append(self.parse_sum())
        self.leave()
        self.expect(")", f"')' to close {func}(")
        lo, hi = FUNCTIONS[func]
        if len(args) < lo or (hi is not None and len(args) > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"at least {lo} and at most {hi}")
            raise self.error(f"{func} takes {want} argument(s), got {len(args)}", name.col)
        for arg in args:
            self.need(arg, "num", func, arg.col)
        return self.node(Call, func, tuple(args), kind="num", children=tuple(args), col=name.col)


def _describe(tok: Token) -> str:
    return "the end of the expression" if tok.type == "end" else repr(tok.text)


def parse(text: str, *, max_chars: int = 2000, max_depth: int = 32, argument: str = "expression") -> Node:
    """Parse and type-check `text` into a condition tree; `InvalidInput(argument, ...)` otherwise."""
    if not isinstance(text, str):
        raise InvalidInput(argument, text, "must be a string")
    if len(text) > max_chars:
        raise _error(text, f"longer than the limit of {max_chars} characters", max_chars + 1, argument)
    try:
        return _Parser(text, max_depth, argument).parse()
    except RecursionError:  # only reachable with an enormous configured max_depth
        raise _error(text, "nested too deeply", 1, argument) from None


def channels_used(node: Node) -> set[str]:
    """The channel names a tree reads ("delta_e" counts as a channel here)."""
    stack, out = [node], set()
    while stack:
        n = stack.pop()
        if isinstance(n, Channel):
            out.add(n.name)
        elif isinstance(n, DeltaE):
            out.add("delta_e")
        elif isinstance(n, Call):
            stack.extend(n.args)
        elif isinstance(n, Unary):
            stack.append(n.operand)
        elif isinstance(n, Binary):
            stack.extend((n.left, n.right))
    return out


# == evaluation ==================================================================================
BYTE_CHANNELS = {"r": 0, "g": 1, "b": 2, "a": 3}
_CPU_PIECE = 32767  # engine.color.CPU_PIECE (engine.color is imported when a Lab / ΔE channel is used: it loads Triton)
_LAB_PIECE_BYTES = _CPU_PIECE * 128
_DE_BYTES_PER_PIECE_PIXEL = 256
_OVERHEAD = 2 * 1024 * 1024
# channel group -> (bytes per pixel kept, bytes per pixel at the peak of computing it, the kept included)
_GROUPS = {"byte": (4, 4), "gray": (4, 8), "hsv": (12, 36), "lab": (12, 15)}
_GROUP_OF = {"r": "byte", "g": "byte", "b": "byte", "a": "byte", "gray": "gray", "h": "hsv", "s": "hsv",
             "v": "hsv", "l": "lab", "lab_a": "lab", "lab_b": "lab"}
_COMPARE = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}
_ARITH = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "min": torch.minimum,
          "max": torch.maximum}
_LOGIC = {"and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _cv2() -> Any | None:
    try:
        import cv2
    except Exception:  # pragma: no cover - opencv ships with ultralytics
        return None
    return cv2


# -- constant folding of byte-channel comparisons (the uint8 fast path) ---------------------
def _constant(node: Node) -> float | None:
    if isinstance(node, Num):
        return float(np.float32(node.value))
    if isinstance(node, Unary) and node.op == "-":
        inner = _constant(node.operand)
        return None if inner is None else -inner
    return None


def _byte_bounds(node: Node) -> tuple[str, int, int] | None:
    """`r > 200`-like comparisons as an integer range (channel, lo, hi) on 0..255, else None."""
    if not isinstance(node, Binary) or node.op not in ("<", "<=", ">", ">=", "=="):
        return None
    op, left, right = node.op, node.left, node.right
    if isinstance(right, Channel) and _constant(left) is not None:
        op, left, right = _MIRROR[op], right, left
    c = _constant(right)
    if not (isinstance(left, Channel) and left.name in BYTE_CHANNELS and c is not None):
        return None
    lo, hi = 0, 255
    if op == ">":
        lo = math.floor(c) + 1
    elif op == ">=":
        lo = math.ceil(c)
    elif op == "<":
        hi = math.ceil(c) - 1
    elif op == "<=":
        hi = math.floor(c)
    elif c == math.floor(c):
        lo = hi = int(c)
    else:
        lo, hi = 1, 0
    return left.name, max(lo, 0), min(hi, 255)


def _box_mask(img: torch.Tensor, bounds: Mapping[str, tuple[int, int]], *, backend: str | None = None
              ) -> torch.Tensor:
    """bool [H, W]: every bounded byte channel within its inclusive [lo, hi] (alpha of RGB is 255).

    Memory: the 1 B/px result and, on the torch path, one 1 B/px comparison beside it.
    """
    h, w, c = img.shape
    if any(lo > hi for lo, hi in bounds.values()):
        return torch.zeros(h, w, dtype=torch.bool, device=img.device)
    if c == 3 and "a" in bounds:
        lo, hi = bounds["a"]
        if not lo <= 255 <= hi:
            return torch.zeros(h, w, dtype=torch.bool, device=img.device)
        bounds = {k: v for k, v in bounds.items() if k != "a"}
    cv2 = _cv2()
    if backend is None:
        backend = "cv2" if (cv2 is not None and img.device.type == "cpu" and img.is_contiguous()) else "torch"
    if backend == "cv2":
        lows = tuple(float(bounds.get(n, (0, 255))[0]) for n in "rgba"[:c])
        highs = tuple(float(bounds.get(n, (0, 255))[1]) for n in "rgba"[:c])
        out = cv2.inRange(img.numpy(), lows, highs)  # uint8 0 / 255 [H, W]
        np.bitwise_and(out, 1, out=out)
        return torch.from_numpy(out).view(torch.bool)
    result: torch.Tensor | None = None
    for name, (lo, hi) in bounds.items():
        ch = img[..., BYTE_CHANNELS[name]]
        for keep, part in ((lo > 0, lambda: ch >= lo), (hi < 255, lambda: ch <= hi)):
            if keep:
                result = part() if result is None else result.bitwise_and_(part())
    if result is None:
        return torch.ones(h, w, dtype=torch.bool, device=img.device)
    return result


def _flatten(node: Node, op: str) -> list[Node]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Binary) and n.op == op:
            stack.extend((n.right, n.left))
        else:
            out.append(n)
    return out


# -- channels ----------------------------------------------------------------------------------
def _color_engine() -> Any:
    from .. import color  # imported on first use: it loads the ΔE kernels (and Triton)

    return color


def _gray(img: torch.Tensor) -> torch.Tensor:
    """0.299 r + 0.587 g + 0.114 b in float32, summed left to right; 8 B/px at the peak."""
    out = img[..., 0].to(torch.float32).mul_(0.299)
    tmp = img[..., 1].to(torch.float32).mul_(0.587)
    out.add_(tmp)
    tmp.copy_(img[..., 2]).mul_(0.114)
    return out.add_(tmp)


def _hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [H, W, C] -> h (degrees, [0, 360)), s, v float32 (skimage.color.rgb2hsv's formulas).

    The same arithmetic as `engine.masks.edits.rgb_to_hsv`, in place: 34 B/px at the peak, 12 B/px kept.
    """
    rgb = img[..., :3].to(torch.float32).div_(255.0)  # [H, W, 3]
    r, g, b = rgb.unbind(-1)
    v = torch.maximum(r, g)
    torch.maximum(v, b, out=v)
    delta = torch.minimum(r, g)
    torch.minimum(delta, b, out=delta)
    torch.sub(v, delta, out=delta)
    zero = delta == 0
    safe = delta.masked_fill(zero, 1.0)
    s = v.masked_fill(v == 0, 1.0)
    torch.div(delta, s, out=s)
    s.masked_fill_(zero, 0.0)
    del delta
    h = torch.sub(g, b).div_(safe)
    h.masked_fill_(r != v, 0.0)
    t = torch.sub(b, r).div_(safe).add_(2.0)
    torch.where(g == v, t, h, out=h)
    torch.sub(r, g, out=t).div_(safe).add_(4.0)
    torch.where(b == v, t, h, out=h)
    del t, safe, rgb, r, g, b
    h.div_(6.0)
    torch.remainder(h, 1.0, out=h)
    h.masked_fill_(zero, 0.0)
    return h.mul_(360.0), s, v


class _Channels:
    """Lazily computed channels of one image; each computed at most once and kept for the evaluation."""

    def __init__(self, rgba: torch.Tensor, text: str) -> None:
        self.img = rgba  # uint8 [H, W, C]
        self.text = text
        self.h, self.w = rgba.shape[:2]
        self.device = rgba.device
        self.cache: dict[str, torch.Tensor] = {}

    def get(self, name: str, col: int) -> torch.Tensor:
        if name not in self.cache:
            self.cache.update(self._compute(name, col))
        return self.cache[name]

    def _compute(self, name: str, col: int) -> dict[str, torch.Tensor]:
        f32 = torch.float32
        if name in BYTE_CHANNELS:
            i = BYTE_CHANNELS[name]
            if i < self.img.shape[2]:
                return {name: self.img[..., i].to(f32)}
            return {name: torch.tensor(255.0, device=self.device)}
        if name == "x":
            return {"x": torch.arange(self.w, dtype=f32, device=self.device).view(1, self.w)}
        if name == "y":
            return {"y": torch.arange(self.h, dtype=f32, device=self.device).view(self.h, 1)}
        if name == "width":
            return {"width": torch.tensor(float(self.w), device=self.device)}
        if name == "height":
            return {"height": torch.tensor(float(self.h), device=self.device)}
        if name == "gray":
            return {"gray": _gray(self.img)}
        if name in ("h", "s", "v"):
            h, s, v = _hsv(self.img)
            return {"h": h, "s": s, "v": v}
        if name in ("l", "lab_a", "lab_b"):
            color = _color_engine()
            lab = torch.as_tensor(color.rgb_to_lab(self.img[..., :3].contiguous()), device=self.device).to(f32)
            return {"l": lab[..., 0], "lab_a": lab[..., 1], "lab_b": lab[..., 2]}
        raise InvalidInput("expression", self.text, f"unknown channel {name!r}")  # the parser prevents this

    def delta_e(self, color_hex: str, col: int) -> torch.Tensor:
        color = _color_engine()
        ref = color.parse_color(color_hex)
        de = color.delta_e_to_color(self.img[..., :3].contiguous(), ref)
        return torch.as_tensor(de, device=self.device).to(torch.float32)


# -- one walker, two back ends -------------------------------------------------------------------
def _place(op: str, a_shape: tuple[int, ...], a_bool: bool, a_owned: bool, b_shape: tuple[int, ...],
           b_bool: bool, b_owned: bool) -> tuple[tuple[int, ...], bool, str]:
    """(result shape, result is bool, where it goes: "left" | "right" in place, or "new")."""
    shape = tuple(torch.broadcast_shapes(a_shape, b_shape))
    is_bool = op in _COMPARE or op in _LOGIC
    if a_owned and a_bool == is_bool and a_shape == shape:
        return shape, is_bool, "left"
    if b_owned and b_bool == is_bool and b_shape == shape:
        return shape, is_bool, "right"
    return shape, is_bool, "new"


def _walk(node: Node, ops: Any) -> Any:
    if isinstance(node, Num):
        return ops.const(node.value)
    if isinstance(node, Channel):
        return ops.channel(node.name, node.col)
    if isinstance(node, DeltaE):
        return ops.delta_e(node.color, node.col)
    if isinstance(node, Call):
        if node.func == "abs":
            return ops.unary("abs", _walk(node.args[0], ops))
        acc = _walk(node.args[0], ops)
        for arg in node.args[1:]:
            acc = ops.combine(node.func, acc, _walk(arg, ops))
        return acc
    if isinstance(node, Unary):
        return ops.unary(node.op, _walk(node.operand, ops))
    assert isinstance(node, Binary)
    if node.op == "and":
        bounds: dict[str, tuple[int, int]] = {}
        rest: list[Node] = []
        for leaf in _flatten(node, "and"):
            b = _byte_bounds(leaf)
            if b is None:
                rest.append(leaf)
                continue
            name, lo, hi = b
            old = bounds.get(name, (0, 255))
            bounds[name] = (max(old[0], lo), min(old[1], hi))
        acc = ops.box(bounds) if bounds else None
        for leaf in rest:
            acc = _walk(leaf, ops) if acc is None else ops.combine("and", acc, _walk(leaf, ops))
        return acc
    if node.op in ("or", "xor"):
        leaves = _flatten(node, node.op)
        acc = _walk(leaves[0], ops)
        for leaf in leaves[1:]:
            acc = ops.combine(node.op, acc, _walk(leaf, ops))
        return acc
    bounds1 = _byte_bounds(node)
    if bounds1 is not None:
        name, lo, hi = bounds1
        return ops.box({name: (lo, hi)})
    return ops.combine(node.op, _walk(node.left, ops), _walk(node.right, ops))


@dataclass
class _V:
    t: torch.Tensor
    owned: bool  # a temporary of this evaluation (may be overwritten), not a channel or a constant


class _TorchOps:
    def __init__(self, channels: _Channels) -> None:
        self.ch = channels

    def const(self, value: float) -> _V:
        return _V(torch.tensor(value, dtype=torch.float32, device=self.ch.device), False)

    def channel(self, name: str, col: int) -> _V:
        return _V(self.ch.get(name, col), False)

    def delta_e(self, color: str, col: int) -> _V:
        return _V(self.ch.delta_e(color, col), True)

    def box(self, bounds: Mapping[str, tuple[int, int]]) -> _V:
        return _V(_box_mask(self.ch.img, bounds), True)

    def unary(self, op: str, x: _V) -> _V:
        fn = {"not": torch.logical_not, "-": torch.neg, "abs": torch.abs}[op]
        if x.owned:
            fn(x.t, out=x.t)
            return x
        return _V(fn(x.t), True)

    def combine(self, op: str, a: _V, b: _V) -> _V:
        fn = _ARITH.get(op) or _COMPARE.get(op) or _LOGIC[op]
        _, _, where = _place(op, tuple(a.t.shape), a.t.dtype == torch.bool, a.owned,
                             tuple(b.t.shape), b.t.dtype == torch.bool, b.owned)
        if where == "left":
            fn(a.t, b.t, out=a.t)
            return a
        if where == "right":
            fn(a.t, b.t, out=b.t)
            return b
        return _V(fn(a.t, b.t), True)


@dataclass
class _S:
    shape: tuple[int, ...]
    is_bool: bool
    owned: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (1 if self.is_bool else 4) if self.owned else 0


class _CostOps:
    """Counts the bytes `_TorchOps` holds: `live` now, `peak` the most so far."""

    def __init__(self, height: int, width: int, channels: int, device: torch.device) -> None:
        self.h, self.w, self.c = height, width, channels
        self.hw = height * width
        self.device = device
        self.live = 0
        self.peak = 0
        self.groups: set[str] = set()

    def _hold(self, extra: int) -> None:
        self.peak = max(self.peak, self.live + extra)

    def _shape(self, name: str) -> tuple[int, ...]:
        if name == "x":
            return (1, self.w)
        if name == "y":
            return (self.h, 1)
        if name in ("width", "height") or (name == "a" and self.c == 3):
            return ()
        return (self.h, self.w)

    def const(self, value: float) -> _S:
        return _S((), False, False)

    def channel(self, name: str, col: int) -> _S:
        group = _GROUP_OF.get(name, name)
        if group == "byte":
            group = name
        if group not in self.groups:
            self.groups.add(group)
            if name in ("x", "y"):
                kept = peak = 4 * math.prod(self._shape(name))
            elif name in ("width", "height") or (name == "a" and self.c == 3):
                kept = peak = 0
            else:
                kept_px, peak_px = _GROUPS[_GROUP_OF[name]]
                kept, peak = kept_px * self.hw, peak_px * self.hw
                if _GROUP_OF[name] == "lab":
                    peak += _LAB_PIECE_BYTES
            self._hold(peak)
            self.live += kept
        return _S(self._shape(name), False, False)

    def delta_e(self, color: str, col: int) -> _S:
        cpu = self.device.type == "cpu"
        workers = max(1, min(torch.get_num_threads(), 8)) if cpu else 1
        piece = min(_CPU_PIECE, self.hw) if cpu else min(1 << 18, self.hw)
        self._hold((4 + 3) * self.hw + workers * piece * _DE_BYTES_PER_PIECE_PIXEL)
        self.live += 4 * self.hw
        return _S((self.h, self.w), False, True)

    def box(self, bounds: Mapping[str, tuple[int, int]]) -> _S:
        self._hold(2 * self.hw)
        self.live += self.hw
        return _S((self.h, self.w), True, True)

    def unary(self, op: str, x: _S) -> _S:
        if x.owned:
            return x
        out = _S(x.shape, op == "not", True)
        self._hold(out.nbytes)
        self.live += out.nbytes
        return out

    def combine(self, op: str, a: _S, b: _S) -> _S:
        shape, is_bool, where = _place(op, a.shape, a.is_bool, a.owned, b.shape, b.is_bool, b.owned)
        if where == "left":
            self.live -= b.nbytes
            return a
        if where == "right":
            self.live -= a.nbytes
            return b
        out = _S(shape, is_bool, True)
        self._hold(out.nbytes)
        self.live += out.nbytes - a.nbytes - b.nbytes
        return out


def expression_memory(tree: Node, height: int, width: int, *, channels: int = 4,
                      device: torch.device | str = "cpu") -> int:
    """Upper bound, in bytes, of the extra memory `evaluate_tree` holds on a [height, width, channels] image."""
    ops = _CostOps(int(height), int(width), int(channels), torch.device(device))
    result = _walk(tree, ops)
    if tuple(result.shape) != (ops.h, ops.w):
        ops._hold(ops.hw)
    return ops.peak + _OVERHEAD


def check_expression_memory(tree: Node, text: str, height: int, width: int, limit: int | None, *,
                            channels: int = 4, device: torch.device | str = "cpu",
                            argument: str = "expression") -> int:
    """The bound of `expression_memory`; `MemoryLimitExceeded` naming `argument` when over `limit`."""
    need = expression_memory(tree, height, width, channels=channels, device=device)
    arrays = need / (4.0 * height * width)
    workmem.require(argument, text, need, limit,
                    f"evaluating it on a {width}x{height} image holds up to {arrays:.1f} float32 image-sized "
                    f"arrays at once; simplify the expression, use a smaller image or raise "
                    f"limits.max_call_memory_mb")
    return need


def evaluate_tree(tree: Node, rgba: torch.Tensor, text: str = "") -> torch.Tensor:
    """Evaluate a parsed condition on uint8 [H, W, 3|4] -> bool [H, W] on the image's device."""
    check_image(rgba)
    h, w = rgba.shape[:2]
    v = _walk(tree, _TorchOps(_Channels(rgba, text)))
    out = v.t
    del v
    if tuple(out.shape) != (h, w):
        out = out.expand(h, w).contiguous()
    workmem.release(expression_memory(tree, h, w, channels=rgba.shape[2], device=rgba.device))
    return out


def evaluate_expression(expr: str, rgba: torch.Tensor | np.ndarray, *, max_chars: int = 2000, max_depth: int = 32,
                        memory_limit: int | None = None, argument: str = "expression") -> torch.Tensor:
    """Parse `expr` (see the module docstring), check its memory bound against `memory_limit`, evaluate it.

    uint8 [H, W, 3|4] -> bool [H, W]. Over the limit: `MemoryLimitExceeded` naming `argument`, before any
    image-sized allocation.
    """
    if isinstance(rgba, np.ndarray):
        rgba = torch.from_numpy(np.ascontiguousarray(rgba))
    tree = parse(expr, max_chars=max_chars, max_depth=max_depth, argument=argument)
    check_image(rgba)
    check_expression_memory(tree, expr, rgba.shape[0], rgba.shape[1], memory_limit, channels=rgba.shape[2],
                            device=rgba.device, argument=argument)
    return evaluate_tree(tree, rgba, expr)
