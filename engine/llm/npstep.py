"""One decode step of `engine.llm.model.Transformer` in NumPy, for fp32 weights and a `FullCache` on the CPU.

    step = NumpyStep(model)                   # views of the model's weights, no copies
    logits = step(cache, slots, tokens)       # tokens: [B] -> logits [B, V] (torch, fp32)

Why: a decode step is 30 layers of tiny vector ops around weight products that
read every weight once. On the CPU the products are memory-bound and the small
ops are dispatch-bound. NumPy's OpenBLAS streams the weights faster than
torch's MKL does on our CI's AMD CPUs (~15 vs ~9 GB/s for a matrix-vector
product), and a NumPy op on a 576-vector costs ~1 us where a torch op costs
~10 us. Mixing the two in one step is the worst case: OpenBLAS's idle threads
spin while torch's OpenMP threads wait for the same two cores. So the whole
step runs here: products on OpenBLAS threads, everything else single-threaded.

What it knows: the same network as `Transformer.forward` for S = 1 (RoPE on the
interleaved layout, grouped-query attention over each row's own length,
RMSNorm/LayerNorm, SwiGLU/tanh-GELU, biases, tied embeddings) and the
FullCache layout `[layers, slots, kv_heads, max_len, head_dim]`, written in
place through NumPy views. The torch forward stays the reference: tests check
this step against it and against transformers' `generate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def supports(model: Any) -> bool:
    """Whether this step implements `model` (CPU fp32 weights; GPT-2 only with the tanh GELU)."""
    a = model.args
    w = model.tok.weight
    return (w.device.type == "cpu" and w.dtype == torch.float32
            and not (a.arch == "gpt2" and a.activation != "gelu_tanh"))


def serves(cache: Any) -> bool:
    """Whether this step can use `cache`: a full fp32 cache on the CPU."""
    return getattr(cache, "kind", "") == "full" and cache.device.type == "cpu" and cache.dtype == torch.float32


def _mm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, wide: bool = False) -> np.ndarray:
    """x: [B, in]; w: [out, in] -> [B, out]. One row: a matrix-vector product (no packing in BLAS); a few
    rows: w @ x.T, measured faster in OpenBLAS for the layers, x @ w.T for the wide vocabulary matrix."""
    if x.shape[0] == 1:
        out = (w @ x[0])[None]
    else:
        out = x @ w.T if wide else (w @ x.T).T
    if b is not None:
        out = out + b
    return out


class NumpyStep:
    def __init__(self, model: Any) -> None:
        a = model.args
        self.args = a
        self.scale = np.float32(model.attn_scale)

        def npv(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().numpy()

        self.tok = npv(model.tok.weight)
        self.pos = npv(model.pos.weight) if model.pos is not None else None
        self.head = npv(model.tok.weight if model.output is None else model.output.weight)
        self.norm = (npv(model.norm.weight), npv(getattr(model.norm, "bias", None)))
        self.layers = []
        for layer in model.layers:
            self.layers.append(tuple(npv(t) for t in (
                layer.ln1.weight, getattr(layer.ln1, "bias", None), layer.wqkv.weight, layer.wqkv.bias,
                layer.wo.weight, layer.wo.bias, layer.ln2.weight, getattr(layer.ln2, "bias", None),
                layer.w13.weight, layer.w13.bias, layer.w2.weight, layer.w2.bias)))
        if a.rope:
            f = model.rope_freqs(a.max_pos)  # complex [P, hd/2]
            self.cos = f.real.float().numpy().copy()
            self.sin = f.imag.float().numpy().copy()
        self.eps = np.float32(a.norm_eps)

    def _norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        if self.args.arch == "gpt2":  # LayerNorm
            mu = x.mean(axis=-1, keepdims=True)
            d = x - mu
            return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + self.eps) * w + b
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps) * w

    def __call__(self, cache: Any, slots: list[int], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """One token per slot: tokens [B] at each slot's current length -> logits [B, V]."""
        tok = np.asarray(torch.as_tensor(tokens).view(-1).tolist(), dtype=np.int64)
        pos = [cache.lengths[s] for s in slots]
        return self._run(cache, slots, pos, tok, 1)

    def extend(self, cache: Any, slot: int, tokens: list[int]) -> torch.Tensor:
        """S tokens for one slot (causal among themselves), e.g. verifying drafted tokens -> logits [S, V]."""
        return self._run(cache, [slot], [cache.lengths[slot]], np.asarray(tokens, dtype=np.int64), len(tokens))

    def _run(self, cache: Any, slots: list[int], pos: list[int], tok: np.ndarray, S: int) -> torch.Tensor:
        """Rows are (slot, position) pairs: B slots x 1 token, or 1 slot x S tokens (S > 1)."""
        a = self.args
        for s, p in zip(slots, pos):
            if p + S > cache.max_len:
                raise ValueError(f"slot {s}: {p + S} tokens exceed the cache length {cache.max_len}")
        views = getattr(cache, "_np_views", None)
        if views is None:
            views = cache._np_views = (cache.k.numpy(), cache.v.numpy())
        K, V = views
        H, KVH, hd = a.n_heads, a.n_kv_heads, a.head_dim
        G, nq, nk = H // KVH, H * hd, KVH * hd
        R = len(tok)  # rows
        row_slot = np.asarray(slots * R if S > 1 else slots)
        row_pos = np.asarray([pos[0] + j for j in range(S)] if S > 1 else pos)
        x = self.tok[tok]  # [R, D]
        if self.pos is not None:
            x = x + self.pos[row_pos]
        if a.rope:
            c = self.cos[row_pos][:, None, :]  # [R, 1, hd/2]
            s = self.sin[row_pos][:, None, :]
        if S > 1:  # causal mask among the new tokens: row j sees keys 0 .. pos + j
            T = pos[0] + S
            future = np.arange(T)[None, :] > row_pos[:, None]  # [S, T]
        span = (slots[0], slots[0] + R) if S == 1 and R > 1 and slots == list(range(slots[0], slots[0] + R)) else None
        if span is not None:
            Tmax = max(pos) + 1
            pad = np.where(np.arange(Tmax)[None, :] > row_pos[:, None], -np.inf, 0.0).astype(np.float32)
            pad = pad[:, None, None, :]  # [B, 1, 1, T]
        for i, (l1w, l1b, wqkv, bqkv, wo, bo, l2w, l2b, w13, b13, w2, b2) in enumerate(self.layers):
            qkv = _mm(self._norm(x, l1w, l1b), wqkv, bqkv)  # [R, (H + 2 KVH) hd]
            q = qkv[:, :nq].reshape(R, H, hd)
            k = qkv[:, nq:nq + nk].reshape(R, KVH, hd)
            v = qkv[:, nq + nk:].reshape(R, KVH, hd)
            if a.rope:  # pairs (2j, 2j + 1) rotated by angle pos * theta_j
                q = _rotate(q, c, s)
                k = _rotate(k, c, s)
            K[i, row_slot, :, row_pos] = k
            V[i, row_slot, :, row_pos] = v
            if S > 1:
                kb, vb = K[i, slots[0], :, :T], V[i, slots[0], :, :T]  # [KVH, T, hd]
                qh = q.reshape(S, KVH, G, hd).transpose(1, 2, 0, 3)  # [KVH, G, S, hd]
                sc = qh @ kb.transpose(0, 2, 1)[:, None]  # [KVH, G, S, T]
                sc[..., future] = -np.inf
                o = (_softmax(sc, self.scale) @ vb[:, None]).transpose(2, 0, 1, 3).reshape(S, nq)
            elif span is not None:  # contiguous slots: one batched product over views, shorter rows masked
                kb, vb = K[i, span[0]:span[1], :, :Tmax], V[i, span[0]:span[1], :, :Tmax]  # [B, KVH, T, hd]
                sc = q.reshape(R, KVH, G, hd) @ kb.transpose(0, 1, 3, 2)  # [B, KVH, G, T]
                sc += pad
                o = (_softmax(sc, self.scale) @ vb).reshape(R, nq)
            else:
                o = np.empty((R, nq), np.float32)
                for b in range(R):
                    T = pos[b] + 1
                    kb, vb = K[i, slots[b], :, :T], V[i, slots[b], :, :T]  # [KVH, T, hd]
                    sc = q[b].reshape(KVH, G, hd) @ kb.transpose(0, 2, 1)  # [KVH, G, T]
                    o[b] = (_softmax(sc, self.scale) @ vb).reshape(nq)
            x = x + _mm(o, wo, bo)
            h = _mm(self._norm(x, l2w, l2b), w13, b13)
            if a.arch == "gpt2":  # tanh GELU
                h = 0.5 * h * (1.0 + np.tanh(np.float32(0.7978845608028654) * (h + np.float32(0.044715) * h ** 3)))
            else:
                g, u = h[:, :a.intermediate], h[:, a.intermediate:]
                h = g / (1.0 + np.exp(-g)) * u
            x = x + _mm(h, w2, b2)
        logits = _mm(self._norm(x, *self.norm), self.head, None, wide=True)
        for sl, p in zip(slots, pos):
            cache.lengths[sl] = p + S
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))


def _softmax(sc: np.ndarray, scale: np.float32) -> np.ndarray:
    """In place over the last axis (after scaling)."""
    if scale != 1.0:
        sc *= scale
    sc -= sc.max(axis=-1, keepdims=True)
    np.exp(sc, out=sc)
    sc /= sc.sum(axis=-1, keepdims=True)
    return sc


def _rotate(x: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x: [B, heads, hd] with pairs (2j, 2j + 1); c, s: [B, 1, hd/2] -> rotated, same shape."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out
