"""One decode step of `engine.llm.model.Transformer` in NumPy, for fp32 or GGUF-packed weights
(`engine.llm.qweights`, products in `atelier_kernels.cpu_qmatmul`) and a `FullCache` or `Int8Cache` on the CPU.

    step = NumpyStep(model)                   # views of the model's weights, no copies
    logits = step(cache, slots, tokens)       # tokens: [B] -> logits [B, V] (torch, fp32)
    logits = step.extend(cache, slot, ids)    # S tokens of one slot -> [S, V] (draft checks, short prompts)

Why: a decode step is 30 layers of tiny vector ops around weight products that
read every weight once. On the CPU the products are memory-bound and the small
ops are dispatch-bound. Torch's MKL streams the weights slowly on our CI's AMD
CPUs (~9 GB/s for a matrix-vector product), BLAS's GEMM packs the weights first
(8 rows cost 2x one row), and a torch op on a 576-vector costs ~10 us where a
NumPy op costs ~1 us. So the step runs here: the weight products and the
attention in the Numba kernels of `atelier_kernels.cpu_decode` (weights read once for
all rows, ~17 GB/s), everything else in single-threaded NumPy. Where Numba is
not used (`engine.backends` cpu_kernels = numpy) the kernels' NumPy twins run:
OpenBLAS for the products, NumPy for the attention; that is the kernels'
dispatch, not a second fallback here.
Two thread pools never share a step: OpenBLAS's, torch's and Numba's idle
threads spin on the same two cores, and a step that mixes them runs several
times slower.

What it knows: the same network as `Transformer.forward` (RoPE on the
interleaved layout, grouped-query attention over each row's own length,
RMSNorm/LayerNorm, SwiGLU/tanh-GELU, biases, tied embeddings) and the
FullCache layout `[layers, slots, kv_heads, max_len, head_dim]`, written in
place through NumPy views, and the Int8Cache layout (int8 rows and scales for
positions older than each slot's fp32 ring of recent tokens; a token leaving
the ring is quantised with the same arithmetic as the torch side, and the
attention reads the int8 rows as they are: `atelier_kernels.cpu_decode.attend_q8`).
With Q8 activations (`models.llm_activations = "q8"`) the steps between the
products follow llama.cpp's arithmetic (`atelier_kernels.cpu_ggml`: its RMSNorm, RoPE
tables, SwiGLU exp and attention sums), so the logits are llama.cpp's bit for
bit on an AVX2 CPU; every prompt then runs here, in llama.cpp's micro-batches
(`ubatch`). With a full cache, a Llama/Qwen2 model whose products are
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K blocks runs every layer in one Numba call instead
(`atelier_kernels.cpu_step`: the same kernels, no Python between the layers); the
layer-by-layer path below is its twin.
Both caches can be filled by either path: a long prompt goes through the torch
forward, the decode steps after it through this one. The torch forward stays
the reference: tests check this step against it and against transformers'
`generate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from atelier_kernels import cpu_decode, cpu_ggml, cpu_step
from atelier_kernels.kv_quant import evict_ring_np, quantize_np


def supports(model: Any) -> bool:
    """Whether this step implements `model` (CPU fp32 weights; GPT-2 only with the tanh GELU)."""
    a = model.args
    w = model.norm.weight
    return (w.device.type == "cpu" and w.dtype == torch.float32
            and not (a.arch == "gpt2" and a.activation != "gelu_tanh"))


def serves(cache: Any) -> bool:
    """Whether this step can use `cache`: a full or int8 cache on the CPU (fp32 values; an int8 cache's ring)."""
    return getattr(cache, "kind", "") in ("full", "int8") and cache.device.type == "cpu" \
        and cache.dtype == torch.float32


def _mm(x: np.ndarray, w: Any, b: np.ndarray | None, prompt: bool = False) -> np.ndarray:
    """x: [R, in]; w: [out, in] -> [R, out]: `atelier_kernels.cpu_decode.rows_matmul`, one dispatch (its Numba kernel
    reads each weight row once for all rows; its NumPy twin, where Numba is not used, is OpenBLAS: a
    matrix-vector product for one row). A `qweights.PackedLinear` (GGUF blocks, its bias included) runs
    `atelier_kernels.cpu_qmatmul` (prompt: the rows are a prompt's micro-batch, see `cpu_qmatmul.matmul_q8`)."""
    if not isinstance(w, np.ndarray):
        return w.matmul_np(x, prompt)
    out = cpu_decode.rows_matmul(x, w)
    if b is not None:
        out = out + b
    return out


class NumpyStep:
    # Prompts up to this many tokens are prefilled here too; longer ones by the torch forward, whose GEMM
    # wins once the products are compute-bound (measured: 35 tokens 219 vs 281 ms, 128 tokens 691 vs 485).
    max_prompt_rows = 48
    # With Q8 activations every prompt runs here (llama.cpp's arithmetic, `refresh`), in chunks of this many
    # tokens: llama.cpp's default micro-batch (n_ubatch), so that a chunk of one token takes its one-token sums
    ubatch = 512

    def __init__(self, model: Any) -> None:
        a = model.args
        self.args = a
        self.scale = np.float32(model.attn_scale)

        def npv(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().numpy()

        def weight(lin: Any) -> Any:  # an fp32 array, or the PackedLinear itself (GGUF blocks)
            return npv(lin.weight) if isinstance(lin, torch.nn.Linear) else lin

        def bias(lin: Any) -> np.ndarray | None:  # a PackedLinear adds its own
            return npv(lin.bias) if isinstance(lin, torch.nn.Linear) else None

        if isinstance(model.tok, torch.nn.Embedding):
            table = npv(model.tok.weight)
            self.embed = table.__getitem__
            self.head = table if model.output is None else weight(model.output)
        else:  # qweights.PackedEmbedding: de-quantise the looked-up rows; the tied head on the blocks
            self.embed = model.tok.lookup_np
            self.head = model.tok.head if model.output is None else weight(model.output)
        self.pos = npv(model.pos.weight) if model.pos is not None else None
        self.norm = (npv(model.norm.weight), npv(getattr(model.norm, "bias", None)))
        self.layers = []
        for layer in model.layers:
            self.layers.append((
                npv(layer.ln1.weight), npv(getattr(layer.ln1, "bias", None)), weight(layer.wqkv), bias(layer.wqkv),
                weight(layer.wo), bias(layer.wo), npv(layer.ln2.weight), npv(getattr(layer.ln2, "bias", None)),
                weight(layer.w13), bias(layer.w13), weight(layer.w2), bias(layer.w2)))
        if a.rope:
            f = model.rope_freqs(a.max_pos)  # complex [P, hd/2]
            self.cos = f.real.float().numpy().copy()
            self.sin = f.imag.float().numpy().copy()
        self.eps = np.float32(a.norm_eps)
        self.refresh(model)

    def refresh(self, model: Any) -> None:
        """Decide again whether the fused Q8 step applies and which arithmetic the steps between the products
        follow (`qweights.set_activations` calls this)."""
        a = self.args
        # Q8 activations: llama.cpp's arithmetic between the products too (atelier_kernels.cpu_ggml), for Llama-style
        # layers (RMSNorm, RoPE, SwiGLU) where those kernels run
        self.ggml = (a.arch != "gpt2" and a.rope and cpu_ggml.available()
                     and any(getattr(m, "activations", "") == "q8" for m in model.modules()))
        if self.ggml and getattr(self, "gcos", None) is None:
            self.gcos, self.gsin = cpu_ggml.rope_tables(a.rope_theta, a.head_dim, self.cos.shape[0])
        self.fused = self._fused_layers(model)

    def _fused_layers(self, model: Any) -> Any:
        """`atelier_kernels.cpu_step.Q8Layers` when every layer can run in the fused Q8 step (Llama/Qwen2 layers whose
        four products are Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 matrices with Q8 activations or Q4_K/Q6_K ones, one block
        type or several side by side, Numba with AVX2), else None."""
        a = self.args
        if not self.ggml or not cpu_step.available():
            return None
        layers = []
        for (l1w, l1b, wqkv, _, wo, _, l2w, l2b, w13, _, w2, _) in self.layers:
            lins = (wqkv, wo, w13, w2)
            if l1b is not None or l2b is not None or not all(
                    getattr(lin, "activations", "") == "q8" and all(p.fmt in cpu_step.KIND for p in lin.parts)
                    for lin in lins):
                return None
            layers.append((l1w, l2w, lins))
        return cpu_step.Q8Layers(layers, a.norm_eps)

    def _norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        if self.ggml:
            return cpu_ggml.rmsnorm(x, w, self.eps)
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

    def extend(self, cache: Any, slot: int, tokens: list[int], start: int | None = None,
               all_logits: bool = True, batch: bool | None = None) -> torch.Tensor:
        """S tokens for one slot at positions start.. (default: its current length), causal among
        themselves: a prompt, or drafted tokens to verify -> logits [S, V] (all_logits) or [V] (the last).
        batch (Q8 activations): the attention's sums as llama.cpp's prompt evaluation takes them (None: when
        a micro-batch has more than one token, as llama.cpp does) or as its one-token step does (False: a
        draft check then computes exactly what decoding its tokens one by one computes)."""
        p = cache.lengths[slot] if start is None else start
        ids = np.asarray(tokens, dtype=np.int64)
        if self.ggml and ids.size > self.ubatch:  # llama.cpp's micro-batches: the same sums chunk by chunk
            outs = []
            for i in range(0, ids.size, self.ubatch):
                part = ids[i:i + self.ubatch]
                last = i + self.ubatch >= ids.size
                if all_logits or last:
                    outs.append(self._run(cache, [slot], [p + i], part, part.size, not all_logits, batch))
                else:
                    self._run(cache, [slot], [p + i], part, part.size, True, batch)
            out = torch.cat(outs) if all_logits else outs[-1]
        else:
            out = self._run(cache, [slot], [p], ids, ids.size, not all_logits, batch)
        return out if all_logits else out[0]

    def _run(self, cache: Any, slots: list[int], pos: list[int], tok: np.ndarray, S: int,
             last_only: bool = False, batch: bool | None = None) -> torch.Tensor:
        """Rows are (slot, position) pairs: B slots x 1 token, or 1 slot x S tokens (S > 1). batch: see
        `extend` (None: S > 1)."""
        a = self.args
        batch = S > 1 if batch is None else batch
        for s, p in zip(slots, pos):
            if p + S > cache.max_len:
                raise ValueError(f"slot {s}: {p + S} tokens exceed the cache length {cache.max_len}")
        views = getattr(cache, "_np_views", None)
        if views is None:
            views = cache._np_views = tuple(t.numpy() for t in cache._tensors())
        int8 = cache.kind == "int8"
        H, KVH, hd = a.n_heads, a.n_kv_heads, a.head_dim
        nq, nk = H * hd, KVH * hd
        R = len(tok)  # rows
        row_slot = np.asarray(slots * R if S > 1 else slots)
        row_pos = np.asarray([pos[0] + j for j in range(S)] if S > 1 else pos)
        row_end = row_pos + 1 if S == 1 else np.full(R, row_pos[-1] + 1)  # each row's slot length after the step
        x = self.embed(tok)  # [R, D]
        if self.pos is not None:
            x = x + self.pos[row_pos]
        if self.fused is not None:
            # every layer in one Numba call (atelier_kernels.cpu_step): no Python between the layers; an int8
            # cache too (its rings as K / V, its int8 arrays beside them)
            if int8:
                QK, QV, SK, SV, RK, RV = views
                x = cpu_step.step_q8(self.fused, x, RK, RV, self.gcos, self.gsin, row_slot, row_pos, H, KVH, hd,
                                     a.intermediate, self.scale, batch, int8=(QK, SK, QV, SV))
            else:
                x = cpu_step.step_q8(self.fused, x, views[0], views[1], self.gcos, self.gsin, row_slot, row_pos, H,
                                     KVH, hd, a.intermediate, self.scale, batch)
            return self._finish(cache, slots, pos, S, x, last_only, batch)
        if self.ggml:
            gc, gs = self.gcos[row_pos], self.gsin[row_pos]
        elif a.rope:
            c = self.cos[row_pos][:, None, :]  # [R, 1, hd/2]
            s = self.sin[row_pos][:, None, :]
        for i, (l1w, l1b, wqkv, bqkv, wo, bo, l2w, l2b, w13, b13, w2, b2) in enumerate(self.layers):
            qkv = _mm(self._norm(x, l1w, l1b), wqkv, bqkv, batch)  # [R, (H + 2 KVH) hd]
            q = qkv[:, :nq].reshape(R, H, hd)
            k = qkv[:, nq:nq + nk].reshape(R, KVH, hd)
            v = qkv[:, nq + nk:].reshape(R, KVH, hd)
            if self.ggml:  # llama.cpp's tables and fused multiply-adds
                q = cpu_ggml.rope(q, gc, gs)
                k = cpu_ggml.rope(k, gc, gs)
            elif a.rope:  # pairs (2j, 2j + 1) rotated by angle pos * theta_j
                q = _rotate(q, c, s)
                k = _rotate(k, c, s)
            if int8:
                QK, QV, SK, SV, RK, RV = (t[i] for t in views)
                _int8_write(QK, SK, RK, row_slot, row_pos, k, S)
                _int8_write(QV, SV, RV, row_slot, row_pos, v, S)
                o = self._attend_int8(q, QK, SK, QV, SV, RK, RV, row_slot, row_pos, row_end, batch).reshape(R, nq)
            else:
                K, V = views[0][i], views[1][i]
                K[row_slot, :, row_pos] = k
                V[row_slot, :, row_pos] = v
                o = self._attend(q, K, V, row_slot, row_pos, batch).reshape(R, nq)
            x = x + _mm(o, wo, bo, batch)
            h = _mm(self._norm(x, l2w, l2b), w13, b13, batch)
            if a.arch == "gpt2":  # tanh GELU
                h = 0.5 * h * (1.0 + np.tanh(np.float32(0.7978845608028654) * (h + np.float32(0.044715) * h ** 3)))
            elif self.ggml:
                h = cpu_ggml.swiglu(h)
            else:
                g, u = h[:, :a.intermediate], h[:, a.intermediate:]
                h = g / (1.0 + np.exp(-g)) * u
            x = x + _mm(h, w2, b2, batch)
        return self._finish(cache, slots, pos, S, x, last_only, batch)

    def _attend(self, q: np.ndarray, K: np.ndarray, V: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray,
                batch: bool) -> np.ndarray:
        """Attention over fp32 K/V [slots, KVH, L, hd] holding positions 0.. in order (the full cache, or an
        int8 cache's ring while it holds the whole conversation)."""
        if self.ggml:  # llama.cpp's sums: a prompt's (several tokens of a slot) or a decode step's
            return cpu_ggml.attend(q, K, V, row_slot, row_pos, self.scale, batch)
        return cpu_decode.attend(q, K, V, row_slot, row_pos, self.scale)

    def _attend_int8(self, q: np.ndarray, QK: np.ndarray, SK: np.ndarray, QV: np.ndarray, SV: np.ndarray,
                     RK: np.ndarray, RV: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray, row_end: np.ndarray,
                     batch: bool) -> np.ndarray:
        """Attention over an `Int8Cache` layer. A row whose slot still fits in the ring (row_end <= ring size:
        position p sits at ring index p, nothing was quantised) reads the ring with the full cache's
        arithmetic, so the int8 cache gives the full cache's logits bit for bit until the conversation outgrows
        the ring; the other rows read int8 history plus the ring (`cpu_decode.attend_q8`)."""
        inring = row_end <= RK.shape[2]
        if inring.all():
            return self._attend(q, RK, RV, row_slot, row_pos, batch)
        if not inring.any():
            return cpu_decode.attend_q8(q, QK, SK, QV, SV, RK, RV, row_slot, row_pos, row_end, self.scale)
        out = np.empty(q.shape, np.float32)
        a, b = np.flatnonzero(inring), np.flatnonzero(~inring)
        out[a] = self._attend(q[a], RK, RV, row_slot[a], row_pos[a], batch)
        out[b] = cpu_decode.attend_q8(q[b], QK, SK, QV, SV, RK, RV, row_slot[b], row_pos[b], row_end[b],
                                      self.scale)
        return out

    def _finish(self, cache: Any, slots: list[int], pos: list[int], S: int, x: np.ndarray,
                last_only: bool, batch: bool = False) -> torch.Tensor:
        """The final norm and the output head over the rows (or the last), and the slots' new lengths."""
        if last_only:
            x = x[-1:]
        logits = _mm(self._norm(x, *self.norm), self.head, None, batch)
        for sl, p in zip(slots, pos):
            cache.lengths[sl] = p + S
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))


def _int8_write(Q: np.ndarray, Sc: np.ndarray, ring: np.ndarray, row_slot: np.ndarray, row_pos: np.ndarray,
                x: np.ndarray, S: int) -> None:
    """Write the rows' K or V (x [R, KVH, hd]) into one layer of an `Int8Cache` the way its `update` does:
    Q [slots, KVH, L, hd] int8, Sc [slots, KVH, L] scales, ring [slots, KVH, Rr, hd] holding each slot's last
    Rr positions (position p at index p % Rr); a position leaving the ring is quantised into Q/Sc
    (`atelier_kernels.kv_quant.quantize_np`, the same arithmetic as the torch side)."""
    Rr = ring.shape[2]
    if S == 1:  # one token per slot at row_pos: quantise the token leaving the ring (clamped like the cache)
        old = np.maximum(row_pos - Rr, 0)
        Q[row_slot, :, old], Sc[row_slot, :, old] = quantize_np(ring[row_slot, :, old % Rr])
        ring[row_slot, :, row_pos % Rr] = x
        return
    slot, st = int(row_slot[0]), int(row_pos[0])  # S tokens of one slot at st..n-1
    n = st + S
    cut = max(n - Rr, 0)  # positions < cut live in int8 after this write
    evict_ring_np(ring, Q, Sc, slot, st, n)
    if cut > st:
        q, sc = quantize_np(x[:cut - st])  # [N, KVH, hd]
        Q[slot][:, st:cut], Sc[slot][:, st:cut] = q.transpose(1, 0, 2), sc.T
    keep = np.arange(max(st, cut), n)
    ring[slot][:, keep % Rr] = x[keep - st].transpose(1, 0, 2)


def _rotate(x: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x: [B, heads, hd] with pairs (2j, 2j + 1); c, s: [B, 1, hd/2] -> rotated, same shape."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out
