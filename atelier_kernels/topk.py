"""Top-k along the last axis with a deterministic tie rule: a Triton kernel and its torch twin.

    values, indices = topk(x, k)     # x: [B, N] or [N] float -> values, indices: [B, k] or [k]

Contract (both backends, bit-identical results):
- values sorted descending; among equal values the lower index comes first
  (`torch.topk` does not promise this; we do);
- `-inf` entries are allowed and sort last (by index among themselves), so
  k may exceed the number of finite entries;
- `1 <= k <= N`; values keep x's dtype, indices are int64;
- NaN entries are not supported (the result is then unspecified).

Triton (block-wise, CUDA or the interpreter): pass 1 launches one program
per (row, tile of BLOCK elements); each keeps the top-k of its tile as
(value, index) candidates by k rounds of "max, then lowest index holding the
max". Later passes run the same kernel over the candidates (carrying their
original indices) until one tile holds them all; the last pass writes the
sorted top-k. Each pass shrinks the candidates at least twofold
(BLOCK >= 4k). Memory traffic: one read of x (N values) plus about
2 * (N / BLOCK) * k candidates; the selection is O(k * BLOCK) compute per
program, meant for the small k of sampling and recommendation.
"""

from __future__ import annotations

import torch

from ._backend import choose, triton_available

__all__ = ["topk", "topk_reference"]


def _check(x: torch.Tensor, k: int) -> None:
    if x.dim() not in (1, 2):
        raise ValueError(f"x: expected [N] or [B, N], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    if not isinstance(k, int) or k < 1 or k > n:
        raise ValueError(f"k={k!r}: must be an integer with 1 <= k <= N={n}")


def _stable_sort_topk(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = torch.sort(x2, dim=-1, descending=True, stable=True)
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


def topk_reference(x: torch.Tensor, k: int, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch. `torch.topk` finds the candidates and the k-th value; when
    no entry outside them equals it (one counting pass) the set is right and
    only equal values need reordering by index. Otherwise entries above the
    k-th value are in and entries equal to it are taken lowest index first.
    A stable sort of the k winners orders them. O(N) passes, no full sort."""
    _check(x, k)
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    B, N = x2.shape
    if B == 0:
        empty = x2.new_empty((0, k)), torch.empty((0, k), dtype=torch.int64, device=x.device)
        return (empty[0].squeeze(0), empty[1].squeeze(0)) if squeeze else empty
    if k * 8 >= N:
        vals, idx = _stable_sort_topk(x2, k)
        return (vals.squeeze(0), idx.squeeze(0)) if squeeze else (vals, idx)
    v, i = torch.topk(x2, k, dim=-1)  # [B, k], the right set unless ties straddle the k-th value
    kth = v[:, -1:]  # [B, 1]
    if bool((torch.count_nonzero(x2 >= kth, dim=-1) == k).all()):
        # the set is right; order equal values by index: sort by index, then stable by value
        by_idx = torch.argsort(i, dim=-1)
        i = torch.gather(i, 1, by_idx)
        v = torch.gather(v, 1, by_idx)
        order = torch.sort(v, dim=-1, descending=True, stable=True).indices
        vals, idx = torch.gather(v, 1, order), torch.gather(i, 1, order)
    else:
        above = x2 > kth
        equal = x2 == kth
        need = k - above.sum(dim=-1, keepdim=True)  # [B, 1] how many ties at the k-th value to take
        take = above | (equal & (torch.cumsum(equal, dim=-1) <= need))
        if int(take.sum()) != B * k:  # NaN somewhere: fall back to torch's own ordering
            vals, idx = _stable_sort_topk(x2, k)
        else:
            cols = torch.nonzero(take)[:, 1].view(B, k)  # ascending index within each row
            picked = torch.gather(x2, 1, cols)
            order = torch.sort(picked, dim=-1, descending=True, stable=True).indices
            idx = torch.gather(cols, 1, order)
            vals = torch.gather(picked, 1, order)
    return (vals.squeeze(0), idx.squeeze(0)) if squeeze else (vals, idx)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _topk_tile_kernel(v_ptr, i_ptr, ov_ptr, oi_ptr, M, k, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
        # v_ptr: [B, M] values; i_ptr: [B, M] int64 original indices (HAS_IDX) or none (index = column)
        # ov_ptr, oi_ptr: [B, T * k] candidates of tile t at [t * k, (t + 1) * k), sorted
        row = tl.program_id(0)
        tile = tl.program_id(1)
        num_tiles = tl.num_programs(1)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        inb = offs < M
        v = tl.load(v_ptr + row * M + offs, mask=inb, other=float("-inf")).to(ov_ptr.dtype.element_ty)
        if HAS_IDX:
            idx = tl.load(i_ptr + row * M + offs, mask=inb, other=0)
            # padding sorts after every real entry: -inf with an index above any real one
            idx = tl.where(inb, idx, offs.to(tl.int64) + 4611686018427387904)
        else:
            idx = offs.to(tl.int64)
        alive = offs >= 0
        big = tl.full([BLOCK], 9223372036854775807, tl.int64)
        out_base = row * num_tiles * k + tile * k
        for j in range(0, k):
            m = tl.max(tl.where(alive, v, float("-inf")), axis=0)
            cand = alive & (v == m)
            sel = tl.min(tl.where(cand, idx, big), axis=0)
            tl.store(ov_ptr + out_base + j, m)
            tl.store(oi_ptr + out_base + j, sel)
            alive = alive & ~(cand & (idx == sel))


def _topk_triton(x2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, N = x2.shape
    work_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    block = max(256, triton.next_power_of_2(4 * k))
    vals: torch.Tensor = x2.contiguous()
    idx: torch.Tensor | None = None
    M = N
    while True:
        final = M <= block
        tile = triton.next_power_of_2(M) if final else block
        T = 1 if final else triton.cdiv(M, block)
        ov = torch.empty((B, T * k), dtype=work_dtype, device=x2.device)
        oi = torch.empty((B, T * k), dtype=torch.int64, device=x2.device)
        _topk_tile_kernel[(B, T)](vals, idx if idx is not None else vals, ov, oi, M, k,
                                  HAS_IDX=idx is not None, BLOCK=tile)
        vals, idx, M = ov, oi, T * k
        if final:
            break
    assert idx is not None
    return torch.gather(x2, 1, idx), idx


def topk(x: torch.Tensor, k: int, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of x along its last axis (see the module contract).

    x: [B, N] or [N] floating point; returns (values [B, k] x.dtype, indices [B, k] int64),
    or [k] each for a 1-D x.
    """
    if choose(x, backend) == "torch":
        return topk_reference(x, k)
    _check(x, k)
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    if x2.shape[0] == 0:
        return topk_reference(x, k)
    vals, idx = _topk_triton(x2, k)
    return (vals.squeeze(0), idx.squeeze(0)) if squeeze else (vals, idx)
