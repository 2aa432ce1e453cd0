"""The mask expression language: tokenizer, parser and type checker (no evaluation).

Client text is never handed to `eval`: it is tokenized and parsed by the small
recursive-descent grammar below into a tree of plain frozen dataclasses, which
`engine.masks` evaluates on device tensors. There is no attribute access, no
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
more). The memory an expression needs is bounded before evaluation by
`engine.mask_eval.expression_memory`. Every error is `InvalidInput("expression", text, "<what> at column N")`
with a 1-based column.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Union

from .errors import InvalidInput

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


def _error(text: str, rule: str, col: int) -> InvalidInput:
    return InvalidInput("expression", text, f"{rule} at column {col}")


def tokenize(text: str) -> list[Token]:
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
            raise _error(text, f"unexpected character {ch!r}{hint}", pos + 1)
        kind = m.lastgroup
        if kind == "num" and m.end() < len(text) and (text[m.end()].isalnum() or text[m.end()] in "_."):
            raise _error(text, f"malformed number {text[pos:m.end() + 1]!r}", pos + 1)
        if kind != "ws":
            out.append(Token(kind or "op", m.group(), pos + 1))
        pos = m.end()
    out.append(Token("end", "", len(text) + 1))
    return out


# -- parser ---------------------------------------------------------------------
class _Parser:
    def __init__(self, text: str, max_depth: int) -> None:
        self.text = text
        self.tokens = tokenize(text)
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
        return _error(self.text, rule, col)

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
                raise self.error(f"expected ')' to close the '(' opened at character {tok.col}, found {_describe(close)}",
                                 close.col)
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


def parse(text: str, *, max_chars: int = 2000, max_depth: int = 32) -> Node:
    """Parse and type-check `text` into a condition tree; `InvalidInput("expression", ...)` otherwise."""
    if not isinstance(text, str):
        raise InvalidInput("expression", text, "must be a string")
    if len(text) > max_chars:
        raise _error(text, f"longer than the limit of {max_chars} characters", max_chars + 1)
    try:
        return _Parser(text, max_depth).parse()
    except RecursionError:  # only reachable with an enormous configured max_depth
        raise _error(text, "nested too deeply", 1) from None


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
