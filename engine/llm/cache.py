"""Hand-managed static KV caches, preallocated per sequence slot and written by index.

Three kinds share one interface (`plan` once per forward, `update` per layer,
`commit` after the forward):

- `FullCache`: k, v `[layers, slots, kv_heads, max_len, head_dim]` in the model
  dtype; keys are stored already rotated (RoPE at their absolute position).
- `Int8Cache`: the same layout in int8 plus per-token, per-head absmax scales
  `[layers, slots, kv_heads, max_len]` (fp32), with the most recent `recent`
  (128) tokens of every slot kept in full precision in a ring
  `[layers, slots, kv_heads, recent, head_dim]`; a token is quantised (by
  `atelier_kernels.kv_quant`) when it leaves the ring. Reads dequantise the int8 part
  and overlay the ring.
- `WindowCache`: StreamingLLM: `sinks` first tokens plus a ring of the most
  recent `window - sinks` tokens; keys are stored *unrotated* and rotated at
  read time by their position inside the cache (sinks 0..s-1, then the ring in
  chronological order), so generation continues past the model's context in
  constant memory.

`lengths[slot]` is the number of tokens a slot holds (its next position).
Setting it lower (prefix reuse, slot reuse) is all it takes to forget the rest.
The caches know nothing about tokens or requests; `engine.llm.batcher` owns
slots and prefix matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atelier_kernels.kv_quant import dequantize, quantize


@dataclass
class Plan:
    slots: list[int]
    starts: list[int]  # tokens held before this forward, per row
    S: int  # new tokens per row
    T: int  # key length attended to
    slot_t: torch.Tensor  # [B] long
    span: tuple[int, int] | None  # contiguous slot range (a view instead of a gather)
    write_pos: torch.Tensor  # [B, S] absolute positions of the new tokens
    rope_pos: torch.Tensor  # [B, S] positions used for RoPE of q (and of new k unless k_rope_pos)
    mask: torch.Tensor | None  # [B, 1, S, T] bool (True = attend) or None
    is_causal: bool = False
    k_rope_pos: torch.Tensor | None = None  # [B, T] positions to rotate cached keys with (window)
    phys: torch.Tensor | None = None  # [B, S] physical cache index of the new tokens (window)


def _span(slots: list[int]) -> tuple[int, int] | None:
    a = slots[0]
    return (a, a + len(slots)) if slots == list(range(a, a + len(slots))) else None


class KVCache:
    kind = "base"

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.layers, self.n_slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.max_len, self.dtype, self.device = max_len, dtype, torch.device(device)
        self.lengths = [0] * slots
        self._heads = torch.arange(kv_heads, device=self.device).view(1, -1)

    # -- sizes ------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        """Most tokens a slot can hold (None: unbounded, old tokens are dropped)."""
        return self.max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def slot_bytes(self) -> int:
        return self.nbytes() // self.n_slots

    def bytes_per_token(self) -> float:
        """Bytes each cached token costs (all layers, k and v), excluding fixed per-slot buffers."""
        raise NotImplementedError

    @property
    def storage_dtype(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def _tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- planning ---------------------------------------------------------------
    def _base_plan(self, slots: list[int], starts: list[int], S: int) -> tuple:
        dev = self.device
        starts_t = torch.tensor(starts, dtype=torch.long, device=dev).view(-1, 1)
        write_pos = starts_t + torch.arange(S, device=dev).view(1, -1)  # [B, S]
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        return slot_t, _span(slots), write_pos

    def plan(self, slots: list[int], starts: list[int], S: int) -> Plan:
        for s, st in zip(slots, starts):
            if st + S > self.max_len:
                raise ValueError(f"slot {s}: {st + S} tokens exceed the cache length {self.max_len}")
        slot_t, span, write_pos = self._base_plan(slots, starts, S)
        ends = [st + S for st in starts]
        T = max(ends)
        mask, causal = None, False
        if S > 1 and len(slots) == 1 and starts[0] == 0:
            causal = True
        elif S > 1 or min(ends) != T:
            keys = torch.arange(T, device=self.device).view(1, 1, -1)
            mask = (keys <= write_pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, S, T]
        return Plan(slots, list(starts), S, T, slot_t, span, write_pos, write_pos, mask, causal)

    def commit(self, plan: Plan) -> None:
        for s, st in zip(plan.slots, plan.starts):
            self.lengths[s] = st + plan.S

    def update(self, layer: int, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self, slot: int, length: int = 0) -> None:
        self.lengths[slot] = length


def _write(buf: torch.Tensor, plan: Plan, x: torch.Tensor, heads: torch.Tensor,
           pos: torch.Tensor | None = None) -> None:
    """buf: [slots, KVH, L, hd] (one layer); x: [B, KVH, S, hd] written at `pos` (default plan.write_pos)."""
    pos = plan.write_pos if pos is None else pos
    if plan.S == 1:
        buf[plan.slot_t.view(-1, 1), heads, pos.view(-1, 1)] = x[:, :, 0]
    else:
        for b in range(len(plan.slots)):
            p = pos[b]
            if plan.phys is None and plan.starts[b] + plan.S <= buf.shape[2]:
                st = plan.starts[b]
                buf[plan.slots[b], :, st:st + plan.S] = x[b]
            else:
                buf[plan.slots[b]].index_copy_(1, p, x[b])


def _read(buf: torch.Tensor, plan: Plan, T: int) -> torch.Tensor:
    """[B, KVH, T, hd]: a view for a contiguous slot range, a gather otherwise."""
    if plan.span is not None:
        return buf[plan.span[0]:plan.span[1], :, :T]
    return buf[plan.slot_t, :, :T]


class FullCache(KVCache):
    kind = "full"

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(layers, slots, kv_heads, head_dim, max_len, dtype, device)
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.k.element_size()

    def update(self, layer: int, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.k[layer], self.v[layer]
        _write(kb, plan, k, self._heads)
        _write(vb, plan, v, self._heads)
        return _read(kb, plan, plan.T), _read(vb, plan, plan.T)


class Int8Cache(KVCache):
    kind = "int8"

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", recent: int = 128,
                 backend: str | None = None) -> None:
        super().__init__(layers, slots, kv_heads, head_dim, max_len, dtype, device)
        self.recent, self.backend = recent, backend
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.qk = torch.zeros(shape, dtype=torch.int8, device=self.device)
        self.qv = torch.zeros(shape, dtype=torch.int8, device=self.device)
        self.sk = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
        self.sv = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
        rshape = (layers, slots, kv_heads, recent, head_dim)
        self.rk = torch.zeros(rshape, dtype=dtype, device=self.device)
        self.rv = torch.zeros(rshape, dtype=dtype, device=self.device)
        self._ar = torch.arange(recent, device=self.device).view(1, -1)

    @property
    def storage_dtype(self) -> str:
        return "int8"

    def _tensors(self) -> list[torch.Tensor]:
        return [self.qk, self.qv, self.sk, self.sv, self.rk, self.rv]

    def bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * (self.head_dim * 1 + 4)

    def _evict(self, q: torch.Tensor, s: torch.Tensor, ring: torch.Tensor, slot: torch.Tensor,
               pos: torch.Tensor) -> None:
        """Quantise the ring entries of absolute positions `pos` ([N], rows `slot` [N]) into q/s."""
        x = ring[slot.view(-1, 1), self._heads, (pos % self.recent).view(-1, 1)]  # [N, KVH, hd]
        qq, sc = quantize(x, backend=self.backend)
        q[slot.view(-1, 1), self._heads, pos.view(-1, 1)] = qq
        s[slot.view(-1, 1), self._heads, pos.view(-1, 1)] = sc

    def _update_one(self, q: torch.Tensor, s: torch.Tensor, ring: torch.Tensor, plan: Plan, x: torch.Tensor) -> None:
        R = self.recent
        if plan.S == 1:
            pos = plan.write_pos.view(-1)
            # the token leaving the ring (clamped: for short rows this re-quantises a token still in the ring,
            # which is harmless because reads take ring tokens from the ring)
            self._evict(q, s, ring, plan.slot_t, (pos - R).clamp(min=0))
            ring[plan.slot_t.view(-1, 1), self._heads, (pos % R).view(-1, 1)] = x[:, :, 0]
            return
        for b, (slot, st) in enumerate(zip(plan.slots, plan.starts)):
            n = st + plan.S
            cut = max(n - R, 0)  # positions < cut live in int8 after this write
            old = torch.arange(max(st - R, 0), min(st, cut), device=self.device)
            if old.numel():
                self._evict(q, s, ring, torch.full_like(old, slot), old)
            if cut > st:
                qq, sc = quantize(x[b, :, :cut - st].transpose(0, 1), backend=self.backend)  # [N, KVH, hd]
                q[slot, :, st:cut] = qq.transpose(0, 1)
                s[slot, :, st:cut] = sc.transpose(0, 1)
            keep = torch.arange(max(st, cut), n, device=self.device)
            ring[slot].index_copy_(1, keep % R, x[b, :, keep - st])

    def _fetch(self, q: torch.Tensor, s: torch.Tensor, ring: torch.Tensor, plan: Plan) -> torch.Tensor:
        out = dequantize(_read(q, plan, plan.T), _read(s, plan, plan.T), self.dtype, backend=self.backend)
        ends = torch.tensor([st + plan.S for st in plan.starts], device=self.device).view(-1, 1)
        p = (ends - self.recent + self._ar).clamp(min=0)  # [B, R]; clamped entries repeat position 0 (same value)
        rows = torch.arange(len(plan.slots), device=self.device).view(-1, 1)
        out[rows, :, p] = ring[plan.slot_t.view(-1, 1), :, p % self.recent]
        return out

    def update(self, layer: int, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._update_one(self.qk[layer], self.sk[layer], self.rk[layer], plan, k)
        self._update_one(self.qv[layer], self.sv[layer], self.rv[layer], plan, v)
        return (self._fetch(self.qk[layer], self.sk[layer], self.rk[layer], plan),
                self._fetch(self.qv[layer], self.sv[layer], self.rv[layer], plan))


class WindowCache(KVCache):
    kind = "window"

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, window: int, sinks: int = 4,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if not 0 <= sinks < window:
            raise ValueError(f"sinks={sinks} must be in [0, window={window})")
        super().__init__(layers, slots, kv_heads, head_dim, window, dtype, device)
        self.window, self.sinks, self.ring = window, sinks, window - sinks
        shape = (layers, slots, kv_heads, window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.abs_pos = torch.full((slots, window), -1, dtype=torch.long, device=self.device)

    @property
    def capacity(self) -> int | None:
        return None

    @property
    def max_chunk(self) -> int:
        """Most new tokens one forward may write (a prefill longer than this is chunked)."""
        return self.ring

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.k.element_size()

    def reset(self, slot: int, length: int = 0) -> None:
        if length:
            raise ValueError("a window cache cannot keep a prefix")
        self.lengths[slot] = 0
        self.abs_pos[slot] = -1

    def plan(self, slots: list[int], starts: list[int], S: int) -> Plan:
        if S > self.ring:
            raise ValueError(f"{S} new tokens exceed the window ring ({self.ring}); chunk the prefill")
        slot_t, span, write_pos = self._base_plan(slots, starts, S)
        s, R = self.sinks, self.ring
        phys = torch.where(write_pos < s, write_pos, s + (write_pos - s) % R)  # [B, S]
        self.abs_pos[slot_t.view(-1, 1), phys] = write_pos
        n = torch.tensor([st + S for st in starts], device=self.device).view(-1, 1)
        T = min(self.window, max(starts) + S)
        ab = self.abs_pos[slot_t, :T]  # [B, T]
        lo = torch.clamp(n - R, min=s)  # lowest absolute position in the ring
        k_rope = torch.where(ab < s, ab, s + ab - lo).clamp(min=0)
        q_rope = torch.where(write_pos < s, write_pos, s + write_pos - lo)
        mask = ((ab.unsqueeze(1) >= 0) & (ab.unsqueeze(1) <= write_pos.unsqueeze(-1))).unsqueeze(1)
        return Plan(slots, list(starts), S, T, slot_t, span, write_pos, q_rope, mask, False, k_rope, phys)

    def update(self, layer: int, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.k[layer], self.v[layer]
        _write(kb, plan, k, self._heads, plan.phys)
        _write(vb, plan, v, self._heads, plan.phys)
        return _read(kb, plan, plan.T), _read(vb, plan, plan.T)
