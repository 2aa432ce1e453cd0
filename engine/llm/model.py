"""A small gpt-fast-style decoder for the Llama family (Llama, SmolLM, Qwen2, Mistral) and GPT-2.

What it knows: the network (RoPE, grouped-query attention, RMSNorm/LayerNorm,
SwiGLU/GELU MLPs, tied embeddings) and how to load Hugging Face weights into
it (fusing Q/K/V and gate/up into single matmuls). What it does not know:
tokenisation, sampling, scheduling. The K/V storage is a cache object from
`engine.llm.cache`; the model asks it for a `Plan` once per forward and calls
`cache.update(layer, plan, k, v)` in every layer.

    logits = model.prefill(cache, slot, ids, start)        # ids: [S] -> [V] (last position)
    logits = model.decode(cache, slots, tokens)            # tokens: [B] -> [B, V]

Shapes: hidden [B, S, D]; q [B, H, S, hd]; k, v [B, KVH, S, hd].

Decode steps on the CPU in fp32 with a full or int8 cache run in NumPy (`engine.llm.npstep`),
and so do draft checks and short prompts there; longer prompts, the window
cache and other devices use this torch forward. Both compute the same fp32 network
up to summation order. The choice is `models.llm_decode` (auto | numpy | torch),
resolved by `decode_step_choice` (the engine reports it: `engine.backends`) and
applied by `Transformer.set_decode_step`; `model.decode_step` says which runs.
(The older names `blas_backend`, `set_blas`, `.blas`, `build(blas=)` are kept as
deprecated aliases.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


class UnsupportedModel(Exception):
    """The config describes an architecture (or option) this decoder does not implement."""


@dataclass
class ModelArgs:
    arch: str  # "llama" (incl. mistral, qwen2) or "gpt2"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_pos: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"

    @property
    def rope(self) -> bool:
        return self.arch != "gpt2"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArgs:
        mt = cfg.get("model_type", "")
        if mt not in SUPPORTED:
            raise UnsupportedModel(f"model_type {mt!r} (supported: {', '.join(SUPPORTED)})")
        if mt == "gpt2":
            d = cfg["n_embd"]
            nh = cfg["n_head"]
            act = cfg.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
                raise UnsupportedModel(f"gpt2 activation {act!r}")
            if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False) \
                    or cfg.get("reorder_and_upcast_attn", False):
                raise UnsupportedModel("gpt2 attention-scaling variants")
            return cls(arch="gpt2", vocab_size=cfg["vocab_size"], dim=d, n_layers=cfg["n_layer"], n_heads=nh,
                       n_kv_heads=nh, head_dim=d // nh, intermediate=cfg.get("n_inner") or 4 * d,
                       norm_eps=cfg.get("layer_norm_epsilon", 1e-5), max_pos=cfg.get("n_positions", 1024),
                       tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                       activation="gelu" if act == "gelu" else "gelu_tanh")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rtype not in ("default", None):
            raise UnsupportedModel(f"rope_type {rtype!r}")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {cfg.get('hidden_act')!r}")
        nh = cfg["num_attention_heads"]
        d = cfg["hidden_size"]
        return cls(arch="llama", vocab_size=cfg["vocab_size"], dim=d, n_layers=cfg["num_hidden_layers"],
                   n_heads=nh, n_kv_heads=cfg.get("num_key_value_heads") or nh,
                   head_dim=cfg.get("head_dim") or d // nh, intermediate=cfg["intermediate_size"],
                   norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   max_pos=cfg.get("max_position_embeddings", 2048),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=(mt == "qwen2") or bool(cfg.get("attention_bias", False)),
                   o_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))


DECODE_STEPS = ("auto", "numpy", "torch")  # models.llm_decode
BLAS_BACKENDS = DECODE_STEPS  # deprecated alias


def decode_step_choice(setting: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The decode step for `models.llm_decode` = `setting`: "numpy" (CPU fp32 only) or "torch". `auto` = numpy
    where it applies; an explicit `numpy` on another device or dtype falls back to torch (the one fallback)."""
    if setting not in DECODE_STEPS:
        raise ValueError(f"models.llm_decode={setting!r}: expected one of {', '.join(DECODE_STEPS)}")
    cpu_fp32 = torch.device(device).type == "cpu" and dtype == torch.float32
    return "numpy" if setting in ("auto", "numpy") and cpu_fp32 else "torch"


blas_backend = decode_step_choice  # deprecated alias (the decode step was once called the "blas" backend)


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        qkv_out = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
        self.wqkv = nn.Linear(a.dim, qkv_out, bias=a.qkv_bias)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        if a.arch == "gpt2":
            self.w13 = nn.Linear(a.dim, a.intermediate, bias=True)
            self.ln1 = nn.LayerNorm(a.dim, eps=a.norm_eps)
            self.ln2 = nn.LayerNorm(a.dim, eps=a.norm_eps)
        else:
            self.w13 = nn.Linear(a.dim, 2 * a.intermediate, bias=a.mlp_bias)
            self.ln1 = RMSNorm(a.dim, a.norm_eps)
            self.ln2 = RMSNorm(a.dim, a.norm_eps)
        self.w2 = nn.Linear(a.intermediate, a.dim, bias=a.mlp_bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x)
        if self.a.arch == "gpt2":
            h = F.gelu(h, approximate="tanh" if self.a.activation == "gelu_tanh" else "none")
        else:
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        return self.w2(h)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _decode_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """One query per row. q: [B, H, 1, hd]; K, V: [B, KVH, T, hd]; mask: additive [B, 1, 1, T] -> [B, H, hd].

    Query heads are grouped per KV head ([B, KVH, G, hd]) so K and V are never repeated.
    """
    B, H, _, hd = q.shape
    kvh = K.shape[1]
    qg = q.view(B, kvh, H // kvh, hd)
    s = torch.matmul(qg, K.transpose(-1, -2))  # [B, KVH, G, T]
    if scale != 1.0:
        s = s * scale
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, V).view(B, H, hd)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on an interleaved head layout. x: [..., hd] (pairs (2i, 2i+1)); freqs: complex, broadcastable
    to [..., hd/2]. Equivalent to transformers' rotate_half on the original layout (see `_interleave`)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        # built on the meta device (the loaders), the checkpoint fills the tables: no random init there (on
        # meta, normal_'s first call imports torch's decompositions: 1.5-1.9 s of a first load)
        meta = torch.empty(0).device.type == "meta"

        def table(n: int) -> nn.Embedding:
            return nn.Embedding(n, a.dim, _weight=torch.empty(n, a.dim)) if meta else nn.Embedding(n, a.dim)

        self.tok = table(a.vocab_size)
        self.pos = table(a.max_pos) if a.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = nn.LayerNorm(a.dim, eps=a.norm_eps) if a.arch == "gpt2" else RMSNorm(a.dim, a.norm_eps)
        self.output = None if a.tie_embeddings else nn.Linear(a.dim, a.vocab_size, bias=False)
        self._freqs: torch.Tensor | None = None
        # 1/sqrt(head_dim) is folded into the q weights when it is a power of two (exact); else applied here
        self.attn_scale = 1.0 / math.sqrt(a.head_dim)
        self.step_fn: Any = None  # optional compiled forward for decode steps (compile_decode)
        self.decode_step = "torch"  # "numpy" | "torch": set_decode_step
        self._np_step: Any = None

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def packed(self) -> bool:
        """Whether weight matrices are kept in GGUF blocks (`engine.llm.qweights`)."""
        from .qweights import PackedLinear

        return isinstance(self.layers[0].wqkv, PackedLinear)

    def set_decode_step(self, step: str) -> Transformer:
        """Decode steps in `step` (`decode_step_choice`'s answer): "numpy" (`engine.llm.npstep`, CPU fp32) or
        "torch" (this forward). A model the NumPy step does not implement keeps the torch forward."""
        if step not in ("numpy", "torch"):
            raise ValueError(f"step={step!r}: expected numpy or torch")
        if step == "numpy":
            if self.device.type != "cpu" or self.norm.weight.dtype != torch.float32:
                raise ValueError("the numpy decode step needs fp32 weights on the CPU")
            from .npstep import NumpyStep, supports

            if not supports(self):  # e.g. GPT-2 with exact GELU: the torch forward serves it
                step = "torch"
        self._np_step = NumpyStep(self) if step == "numpy" else None
        self.decode_step = step
        return self

    set_blas = set_decode_step  # deprecated alias

    @property
    def blas(self) -> str:
        """Deprecated alias of `decode_step`."""
        return self.decode_step

    def _numpy_step_for(self, cache: Any) -> Any:
        """The NumPy step when it serves this cache (CPU fp32, a full or int8 cache, not compiled), else None."""
        if self._np_step is None or self.step_fn is not None:
            return None
        from .npstep import serves

        return self._np_step if serves(cache) else None

    # -- rope tables ------------------------------------------------------------
    def rope_freqs(self, n: int) -> torch.Tensor:
        """Complex rotations [n, hd/2] (angles computed in fp32 like transformers)."""
        if self._freqs is None or self._freqs.shape[0] < n:
            a = self.args
            dev = self.device
            inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64, device=dev).float()
                                          / a.head_dim))
            t = torch.arange(max(n, a.max_pos), device=dev, dtype=torch.float32)
            f = torch.outer(t, inv)
            self._freqs = torch.polar(torch.ones_like(f), f)
        return self._freqs

    def _freqs_at(self, pos: torch.Tensor) -> torch.Tensor:
        return self.rope_freqs(int(pos.max()) + 1)[pos]

    # -- forward ----------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: Any, plan: Any, last_only: bool = True) -> torch.Tensor:
        """tokens: [B, S] -> logits [B, V] (last_only) or [B, S, V]."""
        a = self.args
        B, S = tokens.shape
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(plan.rope_pos)
        nq, nk, hd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.head_dim
        fq = fk = None
        if a.rope:
            fq = self._freqs_at(plan.rope_pos).unsqueeze(2)  # [B, S, 1, hd/2]
            if plan.k_rope_pos is not None:
                fk = self._freqs_at(plan.k_rope_pos).unsqueeze(1)  # [B, 1, T, hd/2]
        mask, causal = plan.mask, plan.is_causal
        scale = self.attn_scale
        if S == 1 and mask is not None:  # additive mask for the decode path: [B, 1, 1, T]
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            qkv = layer.wqkv(layer.ln1(x))  # [B, S, (H + 2 KVH) hd]
            if fq is not None:
                if fk is None:  # q and k rotated together
                    qk = rotate(qkv[..., :nq + nk].unflatten(-1, (-1, hd)), fq).flatten(-2)
                    q, k = qk[..., :nq], qk[..., nq:]
                else:  # window cache: k is stored unrotated and rotated at read time
                    q = rotate(qkv[..., :nq].unflatten(-1, (-1, hd)), fq).flatten(-2)
                    k = qkv[..., nq:nq + nk]
            else:
                q, k = qkv[..., :nq], qkv[..., nq:nq + nk]
            q = q.view(B, S, a.n_heads, hd).transpose(1, 2)
            k = k.view(B, S, a.n_kv_heads, hd).transpose(1, 2)
            v = qkv[..., nq + nk:].view(B, S, a.n_kv_heads, hd).transpose(1, 2)
            K, V = cache.update(i, plan, k, v)
            if fk is not None:
                K = rotate(K, fk)
            if S == 1:
                o = _decode_attention(q, K, V, mask, scale).view(B, S, nq)
            else:
                o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, is_causal=causal, scale=scale,
                                                   enable_gqa=a.n_kv_heads != a.n_heads)
                o = o.transpose(1, 2).reshape(B, S, nq)
            x = x + layer.wo(o)
            x = x + layer.mlp(layer.ln2(x))
        if last_only:
            x = x[:, -1]
        x = self.norm(x)
        if self.output is not None:
            return self.output(x)
        return self.tok.linear(x) if hasattr(self.tok, "linear") else F.linear(x, self.tok.weight)

    @torch.inference_mode()
    def prefill(self, cache: Any, slot: int, ids: list[int] | torch.Tensor, start: int = 0,
                all_logits: bool = False, prompt: bool = True) -> torch.Tensor:
        """Write `ids` at positions start.. of `slot`; logits [V] of the last token ([S, V] if all_logits).
        prompt=False (drafted tokens to check): with Q8 activations each token is summed as a decode step would
        sum it, so a draft check keeps exactly the tokens plain decoding would give."""
        step = self._numpy_step_for(cache)
        n = len(ids) if isinstance(ids, list) else int(torch.as_tensor(ids).numel())
        if step is not None and (n <= step.max_prompt_rows or step.ggml):  # Q8 activations: any length
            return step.extend(cache, slot, torch.as_tensor(ids).view(-1).tolist(), start, all_logits,
                               batch=None if prompt else False)
        tokens = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        plan = cache.plan([slot], [start], tokens.shape[1])
        out = self(tokens, cache, plan, last_only=not all_logits)
        cache.commit(plan)
        return out[0]

    @torch.inference_mode()
    def extend(self, cache: Any, slot: int, ids: list[int]) -> torch.Tensor:
        """Append `ids` to `slot` at its current length; logits [S, V] of every new token (draft checks)."""
        return self.prefill(cache, slot, ids, cache.lengths[slot], all_logits=True, prompt=False)

    @torch.inference_mode()
    def decode(self, cache: Any, slots: list[int], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """One step for B sequences: tokens [B] at each slot's current length -> logits [B, V]."""
        step = self._numpy_step_for(cache)
        if step is not None:
            return step(cache, slots, tokens)
        t = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        plan = cache.plan(slots, [cache.lengths[s] for s in slots], 1)
        out = (self.step_fn or self)(t, cache, plan)
        cache.commit(plan)
        return out

    def size_bytes(self) -> int:
        seen, total = set(), 0
        for p in list(self.parameters()) + list(self.buffers()):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total


# -- weights ----------------------------------------------------------------------
def _llama_state(a: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def g(name: str) -> torch.Tensor:
        for prefix in ("model.", ""):
            if prefix + name in sd:
                return sd[prefix + name]
        raise KeyError(name)

    out = {"tok.weight": g("embed_tokens.weight"), "norm.weight": g("norm.weight")}
    if not a.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"] if "lm_head.weight" in sd else g("embed_tokens.weight")
    for i in range(a.n_layers):
        p = f"layers.{i}."
        out[p + "wqkv.weight"] = torch.cat([g(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if a.qkv_bias:
            out[p + "wqkv.bias"] = torch.cat([g(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[p + "wo.weight"] = g(p + "self_attn.o_proj.weight")
        if a.o_bias:
            out[p + "wo.bias"] = g(p + "self_attn.o_proj.bias")
        out[p + "w13.weight"] = torch.cat([g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")])
        out[p + "w2.weight"] = g(p + "mlp.down_proj.weight")
        if a.mlp_bias:
            out[p + "w13.bias"] = torch.cat([g(p + "mlp.gate_proj.bias"), g(p + "mlp.up_proj.bias")])
            out[p + "w2.bias"] = g(p + "mlp.down_proj.bias")
        out[p + "ln1.weight"] = g(p + "input_layernorm.weight")
        out[p + "ln2.weight"] = g(p + "post_attention_layernorm.weight")
    return out


def _gpt2_state(a: ModelArgs, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def g(name: str) -> torch.Tensor:
        for prefix in ("transformer.", ""):
            if prefix + name in sd:
                return sd[prefix + name]
        raise KeyError(name)

    out = {"tok.weight": g("wte.weight"), "pos.weight": g("wpe.weight"),
           "norm.weight": g("ln_f.weight"), "norm.bias": g("ln_f.bias")}
    for i in range(a.n_layers):
        p, h = f"layers.{i}.", f"h.{i}."
        # GPT-2 uses Conv1D: weight [in, out] -> transpose to Linear's [out, in]
        out[p + "wqkv.weight"] = g(h + "attn.c_attn.weight").t()
        out[p + "wqkv.bias"] = g(h + "attn.c_attn.bias")
        out[p + "wo.weight"] = g(h + "attn.c_proj.weight").t()
        out[p + "wo.bias"] = g(h + "attn.c_proj.bias")
        out[p + "w13.weight"] = g(h + "mlp.c_fc.weight").t()
        out[p + "w13.bias"] = g(h + "mlp.c_fc.bias")
        out[p + "w2.weight"] = g(h + "mlp.c_proj.weight").t()
        out[p + "w2.bias"] = g(h + "mlp.c_proj.bias")
        for n in ("ln1", "ln2"):
            src = "ln_1" if n == "ln1" else "ln_2"
            out[p + f"{n}.weight"] = g(h + f"{src}.weight")
            out[p + f"{n}.bias"] = g(h + f"{src}.bias")
    return out


def build(cfg: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32, decode: str = "auto", *, blas: str | None = None) -> Transformer:
    """Our Transformer from an HF config dict and an HF state dict (any dtype; cast to `dtype`);
    `decode` (models.llm_decode; `blas` is its deprecated alias) picks the decode step (`decode_step_choice`)."""
    if blas is not None:
        decode = blas
    a = ModelArgs.from_hf(cfg)
    with torch.device("meta"):
        model = Transformer(a)
    sd = _gpt2_state(a, state) if a.arch == "gpt2" else _llama_state(a, state)
    scale = 1.0 / math.sqrt(a.head_dim)
    fold = math.log2(scale).is_integer()
    if a.rope or fold:
        nq, nk = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        for i in range(a.n_layers):
            for name in ("wqkv.weight", "wqkv.bias"):
                key = f"layers.{i}.{name}"
                if key not in sd:
                    continue
                w = sd[key].float()
                q, k, v = w[:nq], w[nq:nq + nk], w[nq + nk:]
                if a.rope:
                    q, k = _interleave(q, a.n_heads, a.head_dim), _interleave(k, a.n_kv_heads, a.head_dim)
                if fold:
                    q = q * scale  # exact: a power of two
                sd[key] = torch.cat([q, k, v]).to(sd[key].dtype)
    sd = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if fold:
        model.attn_scale = 1.0
    model = model.eval().requires_grad_(False)
    return model.set_decode_step(decode_step_choice(decode, device, dtype))


def _interleave(w: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' halves [x_0..x_{d/2-1}, y_0..] to pairs [x_0, y_0, x_1, ...].

    q and k get the same permutation, so q.k is unchanged; RoPE becomes a complex multiply per pair.
    """
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def compile_decode(model: Transformer) -> Transformer:
    """Use torch.compile for decode steps (models.llm_compile; off by default: see the benchmark).
    The compiled graph uses torch's products (NumPy calls would break it), so packed weights are left
    uncompiled."""
    if model.packed:
        return model
    model.set_decode_step("torch")
    model.step_fn = torch.compile(model.forward, dynamic=True)
    return model

