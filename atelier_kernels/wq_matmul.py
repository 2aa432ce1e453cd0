"""Weight-only quantised products for CUDA: Triton kernels on int8 / int4 blocks, and their torch twins.

    y = matmul(x, "Q8_0", qs, d)         # x [M, K] float; int8 weights in blocks of 32, one fp16 scale each
    y = matmul(x, "Q4_1", qs, d, m)      # int4 weights (two per byte), an fp16 scale and min per block of 32
    y = matmul(x, "Q4_0", qs, d)         # int4 weights stored as q + 8, an fp16 scale per block of 32

gpt-fast style: the weights stay packed in GPU memory and are de-quantised in
registers, tile by tile, inside the product; no fp32 (or fp16) copy of a
matrix ever exists. The blocks are the ones the engine holds on the CPU
(`engine.llm.qweights.Packed`: a GGUF's own Q8_0 / Q4_1 blocks, or what
`models.llm_weights = "int8"` / `"int4"` makes of an fp32/fp16/bf16 folder):
qs [N, K/32, 32] int8 (Q8_0) or [N, K/32, 16] uint8 (Q4_0 / Q4_1: low nibbles
are a block's values 0..15, high nibbles 16..31), d and m [N, K/32] fp16 (as
stored: uint16 or int16 bits are viewed as fp16). w = d q (Q8_0),
w = d (q - 8) (Q4_0), w = d q + m (Q4_1).

One program computes a [BLOCK_M, BLOCK_N] tile of y: for each block of 32
along K it loads x's two 16-column halves and the tile's weight bytes,
de-quantises them to fp32 in registers (nibbles split, times d, plus m) and
accumulates two `tl.dot`s in fp32 — so Q4_1's low and high nibbles meet
their own halves of x without an interleave. BLOCK_M is at least 16 (tl.dot's
smallest tile); a decode step's single row is masked.

The torch twins de-quantise the blocks and multiply in float64 (the oracle of
the tests). Run on CPU tensors under TRITON_INTERPRET=1 (the tests, this
machine has no GPU) and on CUDA tensors (`benchmarks/gpu_check.py`). The
engine calls them through `engine.llm.qweights.PackedLinear` once a packed
model is placed on a CUDA device (`qweights.place_model`, backend operation
`wq_matmul`).
"""

from __future__ import annotations

import torch

from ._backend import choose, triton_available

FORMATS = ("Q8_0", "Q4_0", "Q4_1")
KIND = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}
BLOCK = 32


def _check(fmt: str, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {', '.join(FORMATS)}")
    width = BLOCK if fmt == "Q8_0" else BLOCK // 2
    if qs.dtype not in ((torch.int8, torch.uint8) if fmt == "Q8_0" else (torch.uint8,)):
        raise ValueError(f"qs dtype {qs.dtype}: {fmt} blocks are {'int8' if fmt == 'Q8_0' else 'uint8'} bytes")
    if qs.ndim != 3 or qs.shape[2] != width:
        raise ValueError(f"qs {tuple(qs.shape)}: expected [N, K/32, {width}] for {fmt}")
    N, nb = qs.shape[:2]
    if tuple(d.shape) != (N, nb) or (fmt == "Q4_1" and (m is None or tuple(m.shape) != (N, nb))):
        raise ValueError(f"scales {tuple(d.shape)} / mins {None if m is None else tuple(m.shape)}: "
                         f"expected [{N}, {nb}]")
    if x.ndim != 2 or x.shape[1] != nb * BLOCK:
        raise ValueError(f"x {tuple(x.shape)}: expected [M, {nb * BLOCK}]")


def _half(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float16) if t.dtype in (torch.uint16, torch.int16) else t.to(torch.float16)


def dequant_reference(fmt: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The blocks -> W [N, K] float64."""
    N, nb = qs.shape[:2]
    dd = _half(d).double()[..., None]
    if fmt == "Q8_0":
        return (qs.view(torch.int8).double() * dd).reshape(N, nb * BLOCK)
    b = qs.view(torch.uint8).to(torch.int16)
    q = torch.cat([b & 0x0F, b >> 4], dim=-1).double()
    if fmt == "Q4_0":
        return ((q - 8) * dd).reshape(N, nb * BLOCK)
    return (q * dd + _half(m).double()[..., None]).reshape(N, nb * BLOCK)


def matmul_reference(x: torch.Tensor, fmt: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """x [M, K] @ W.T in float64 on the de-quantised blocks -> [M, N] in x's dtype."""
    _check(fmt, x, qs, d, m)
    return (x.double() @ dequant_reference(fmt, qs, d, m).T).to(x.dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _wq_kernel(x_ptr, qs_ptr, d_ptr, m_ptr, y_ptr, M, N, nb, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < M
        mc = cols < N
        half = tl.arange(0, 16)
        K = nb * 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b in range(0, nb):
            x_lo = tl.load(x_ptr + rows[:, None] * K + b * 32 + half[None, :], mask=mr[:, None], other=0.0)
            x_hi = tl.load(x_ptr + rows[:, None] * K + b * 32 + 16 + half[None, :], mask=mr[:, None], other=0.0)
            dw = tl.load(d_ptr + cols * nb + b, mask=mc, other=0.0).to(tl.float32)
            if KIND == 2:  # Q4_1: d q + m
                byte = tl.load(qs_ptr + (cols[:, None] * nb + b) * 16 + half[None, :], mask=mc[:, None], other=0)
                byte = byte.to(tl.int32) & 0xFF
                mw = tl.load(m_ptr + cols * nb + b, mask=mc, other=0.0).to(tl.float32)
                w_lo = (byte & 0x0F).to(tl.float32) * dw[:, None] + mw[:, None]
                w_hi = (byte >> 4).to(tl.float32) * dw[:, None] + mw[:, None]
            elif KIND == 1:  # Q4_0: d (q - 8)
                byte = tl.load(qs_ptr + (cols[:, None] * nb + b) * 16 + half[None, :], mask=mc[:, None], other=0)
                byte = byte.to(tl.int32) & 0xFF
                w_lo = ((byte & 0x0F) - 8).to(tl.float32) * dw[:, None]
                w_hi = ((byte >> 4) - 8).to(tl.float32) * dw[:, None]
            else:
                base = (cols[:, None] * nb + b) * 32
                w_lo = tl.load(qs_ptr + base + half[None, :], mask=mc[:, None], other=0).to(tl.float32) * dw[:, None]
                w_hi = tl.load(qs_ptr + base + 16 + half[None, :], mask=mc[:, None], other=0).to(tl.float32) \
                    * dw[:, None]
            acc += tl.dot(x_lo.to(tl.float32), tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(x_hi.to(tl.float32), tl.trans(w_hi), input_precision="ieee")
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mr[:, None] & mc[None, :])


def _matmul_triton(x: torch.Tensor, fmt: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None
                   ) -> torch.Tensor:
    M = x.shape[0]
    N, nb = qs.shape[:2]
    x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    dh = _half(d).contiguous()
    mh = _half(m).contiguous() if m is not None else dh
    q = qs.contiguous().view(torch.int8 if fmt == "Q8_0" else torch.uint8)
    bm = 16 if M <= 16 else 32
    bn = 64
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _wq_kernel[grid](x, q, dh, mh, y, M, N, nb, KIND=KIND[fmt], BLOCK_M=bm, BLOCK_N=bn)
    return y


def matmul(x: torch.Tensor, fmt: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """x [M, K] float @ W.T, W in `fmt` blocks (Q8_0: int8 weight-only; Q4_0 / Q4_1: int4 weight-only, Q4_1
    with a min)
    -> [M, N] in x's dtype. Triton where `atelier_kernels._backend.choose` picks it (CUDA, or CPU tensors under
    TRITON_INTERPRET=1 with backend="triton"), else the float64 twin."""
    _check(fmt, x, qs, d, m)
    if choose(x, backend) == "triton":
        return _matmul_triton(x, fmt, qs, d, m)
    return matmul_reference(x, fmt, qs, d, m)


def _cases(fmt: str):  # noqa: ANN202
    def cases(device: str, large: bool):  # noqa: ANN202
        g = torch.Generator().manual_seed(13 + KIND[fmt])
        shapes = [(1, 96, 64), (5, 67, 96), (17, 130, 32)] + ([(8, 4096, 4096), (64, 11008, 4096)] if large else [])
        for M, N, K in shapes:
            nb = K // BLOCK
            if fmt == "Q8_0":
                qs = torch.randint(-127, 128, (N, nb, BLOCK), generator=g, dtype=torch.int8)
            else:
                qs = torch.randint(0, 256, (N, nb, BLOCK // 2), generator=g, dtype=torch.int16).to(torch.uint8)
            d = (torch.rand(N, nb, generator=g) * 0.02 + 1e-3).half()
            m = (-torch.rand(N, nb, generator=g) * 0.1).half() if fmt == "Q4_1" else None
            x = torch.randn(M, K, generator=g)
            on = lambda t: None if t is None else t.to(device)  # noqa: E731
            yield (on(x), fmt, on(qs), on(d), on(m)), f"{M} x {K} @ {N} x {K}"
    return cases


def _register() -> None:
    from .registry import Kernel, register

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        g, w = got.double().cpu(), want.double().cpu()
        scale = max(float(w.abs().max()), 1e-30)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * scale)

    for fmt in FORMATS:
        register(Kernel(f"wq_matmul_{fmt.lower()}", "triton", lambda *a: matmul(*a, backend="triton"),
                        lambda *a: matmul_reference(*a), _cases(fmt), close,
                        f"x @ W.T with W in {fmt} blocks de-quantised in registers "
                        f"({'int8' if fmt == 'Q8_0' else 'int4'} weight-only, gpt-fast style)"))


_register()
