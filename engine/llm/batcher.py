"""Continuous batching: one decode loop per model shared by every concurrent request.

`LLMService.generate(request, token, on_progress)` may be called from many
threads at once. Each call queues a sequence and waits. A background thread
runs the loop:

1. admit waiting sequences while a cache slot is free: pick a slot (the free
   slot whose held tokens share the longest prefix with the prompt, for prefix
   reuse);
2. prefill admitted prompts (each alone, B = 1) in pieces of at most
   `PREFILL_PIECE` tokens, oldest first, about `PREFILL_PIECE` tokens per round
   (at least one piece); a prompt's last piece samples its first token;
3. one decode step for all decoding sequences of a cache pool together (B rows,
   each at its own position, masked per row), sample per row with the row's
   own seeded generator;
4. finished sequences (EOS, stop string, max_new_tokens, full context,
   cancelled, failed) leave at once and free their slot.

So new requests join at a step boundary after their prefill, and a long prompt
costs the running streams one piece's time between two of their steps, not its
whole prefill (a 1500-token prompt stalled them 3.8 s on 2 cores; now 1.6 s at most);
the pieces are the micro-batches the model's prefill takes anyway (llama.cpp's
n_ubatch with Q8 activations), so a prompt's bits do not change. A cancel
takes effect at the next step or piece. Slots live in pools, one per cache configuration
(full, int8, window W/sinks); a pool's slot count is bounded by the memory
budget left after the models. A failed or cancelled sequence always returns
its slot (`finally`). Models the decoder does not implement run through
transformers' `generate`, one at a time, with the same cancellation.

The service knows token ids and (for stop strings and progress) a decode
function; it knows nothing about MCP or chat messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import Cancelled, InsufficientMemory, InvalidInput
from .._compat import model_libraries
from ..scheduler import CancelToken
from .cache import FullCache, Int8Cache, KVCache, WindowCache
from .load import LoadedLLM
from .sampling import SamplingParams, make_generator, sample

# prompt tokens prefilled per scheduling round (one piece at most this long): llama.cpp's default micro-batch,
# which the Q8 step's prefill uses anyway (`npstep.NumpyStep.ubatch`), so pieces change no bits there
PREFILL_PIECE = 512

log = logging.getLogger("atelier.engine.llm")

CacheKind = Literal["full", "int8", "window"]
ProgressFn = Callable[[int, str], None]


@dataclass(frozen=True)
class CacheSpec:
    kind: CacheKind = "full"
    window: int = 1024  # window cache: total tokens kept (sinks included)
    sinks: int = 4  # window cache: attention-sink tokens kept from the start


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    cache: CacheSpec = field(default_factory=CacheSpec)
    reuse_prefix: bool = True
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    reused_tokens: int
    completion_tokens: int
    tokens_per_s: float
    seconds: float
    model: str
    cache_kind: str
    cache_dtype: str
    cache_bytes: int  # bytes of the cache this request's slot occupies
    cache_bytes_per_token: float
    note: str = ""


class _Pool:
    """One cache plus the bookkeeping of its slots."""

    def __init__(self, cache: KVCache, reusable: bool) -> None:
        self.cache = cache
        self.reusable = reusable
        self.free = list(range(cache.n_slots))
        self.held: list[list[int]] = [[] for _ in range(cache.n_slots)]
        self.active = 0

    def acquire(self, prompt: list[int], allow_reuse: bool) -> tuple[int, int] | None:
        if not self.free:
            return None
        best, best_len = self.free[0], 0
        if self.reusable and allow_reuse:
            for s in self.free:
                held, n = self.held[s], 0
                m = min(len(held), len(prompt) - 1)
                while n < m and held[n] == prompt[n]:
                    n += 1
                if n > best_len:
                    best, best_len = s, n
        if best_len == 0:  # no reuse: prefer the lowest empty-ish slot to keep slots contiguous
            best = min(self.free)
        self.free.remove(best)
        self.active += 1
        self.cache.reset(best, best_len)
        self.held[best] = self.held[best][:best_len]
        return best, best_len

    def release(self, slot: int, keep: bool) -> None:
        if not keep or not self.reusable:
            self.held[slot] = []
            self.cache.reset(slot, 0)
        self.free.append(slot)
        self.active -= 1


class _Seq:
    def __init__(self, req: GenerationRequest, token: CancelToken) -> None:
        self.req = req
        self.token = token
        self.gen = make_generator(req.sampling.seed)
        self.out: list[int] = []
        self.pool: _Pool | None = None
        self.slot = -1
        self.reused = 0
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.t0 = 0.0
        self.t1 = 0.0
        self.text_cut: int | None = None  # char index where a stop string starts
        self.seen: torch.Tensor | None = None
        self.model: LoadedLLM | None = None
        self.fill: int | None = None  # the next prompt index to prefill; None once the prompt is in the cache
        self.draft_misses = 0  # drafts in a row with no token accepted
        self.draft_pause = 0  # plain steps left before drafting again
        self.draft_pauses = 0  # pauses since a draft last paid off (each one twice as long)


class LLMService:
    """The per-model continuous-batching service (see the module docstring)."""

    def __init__(self, get_model: Callable[[], LoadedLLM], *, budget_bytes: Callable[[], int | None] | None = None,
                 max_slots: int = 8, max_len: int = 2048, compile_step: bool = False,
                 speculate: bool = True, kv_backend: str | None = None) -> None:
        self._get_model = get_model
        self.kv_backend = kv_backend  # issue 16 (H4): the engine's kv_quant choice (engine.backends); None = auto
        self._budget = budget_bytes or (lambda: None)
        self.max_slots, self.max_len, self.compile_step = max_slots, max_len, compile_step
        self._pools: dict[CacheSpec, _Pool] = {}
        self._pending: list[_Seq] = []
        self._active: list[_Seq] = []
        self._cv = threading.Condition()
        self._closed = False
        self._hf_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="atelier-llm-decode", daemon=True)
        self.steps = 0
        self.speculate, self.draft_tokens = speculate, 4
        self.spec_drafted = self.spec_accepted = 0
        self._thread.start()

    # -- public -----------------------------------------------------------------------
    def model(self) -> LoadedLLM:
        return self._get_model()

    def context_limit(self, spec: CacheSpec) -> int | None:
        """Most prompt + generated tokens a request can hold with this cache (None: unbounded)."""
        m = self.model()
        if spec.kind == "window":
            return None
        return min(m.context_len, self.max_len)

    def generate(self, request: GenerationRequest, token: CancelToken | None = None,
                 on_progress: ProgressFn | None = None) -> GenerationResult:
        token = token or CancelToken()
        self._validate(request)
        m = self.model()
        if not m.native:
            return self._generate_hf(m, request, token, on_progress)
        seq = _Seq(request, token)
        with self._cv:
            if self._closed:
                raise Cancelled("the language model service is shut down")
            self._pending.append(seq)
            self._cv.notify_all()
        shown = 0
        while not seq.done.wait(0.05):
            if on_progress is not None and len(seq.out) != shown:
                shown = len(seq.out)
                try:
                    on_progress(shown, self._decode(m, seq.out[:shown]))
                except BaseException:  # the caller is gone: stop the sequence, free its slot, re-raise
                    token.cancel("progress callback failed")
                    seq.done.wait()
                    raise
        if seq.error is not None:
            raise seq.error
        result = self._result(seq)
        if on_progress is not None and result.completion_tokens != shown:  # the final count and text too
            on_progress(result.completion_tokens, result.text)
        return result

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {"active": len(self._active), "waiting": len(self._pending), "steps": self.steps,
                    "pools": {f"{k.kind}" + (f"/{k.window}/{k.sinks}" if k.kind == "window" else ""):
                              {"slots": p.cache.n_slots, "busy": p.active, "bytes": p.cache.nbytes()}
                              for k, p in self._pools.items()}}

    def cache_bytes(self) -> int:
        return sum(p.cache.nbytes() for p in self._pools.values())

    def size_bytes(self) -> int:
        return self.cache_bytes()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # -- checks -------------------------------------------------------------------------
    def _validate(self, r: GenerationRequest) -> None:
        if not r.prompt_ids:
            raise InvalidInput("prompt", "", "must not be empty")
        if r.max_new_tokens < 1:
            raise InvalidInput("max_new_tokens", r.max_new_tokens, "must be >= 1")
        m = self.model()
        r.sampling.validate(m.config.get("vocab_size"))
        spec = r.cache
        if spec.kind not in ("full", "int8", "window"):
            raise InvalidInput("kv_cache", spec.kind, "must be full, int8 or window")
        if spec.kind == "window":
            if not m.native or m.model.args.arch == "gpt2":
                raise InvalidInput("kv_cache", "window", "the window cache needs a RoPE model (Llama family)")
            if not 0 <= spec.sinks < spec.window // 2:
                raise InvalidInput("sink_tokens", spec.sinks, f"must be in [0, window/2 = {spec.window // 2})")
            if not 16 <= spec.window <= self.max_len:
                raise InvalidInput("window", spec.window, f"must be in [16, {self.max_len}]")
        limit = self.context_limit(spec)
        if limit is not None and len(r.prompt_ids) >= limit:
            raise InvalidInput("prompt", f"{len(r.prompt_ids)} tokens",
                               f"longer than the context ({limit} tokens) of the {spec.kind} cache; "
                               f"use kv_cache='window' for longer inputs")

    # -- pools --------------------------------------------------------------------------
    def _pool(self, spec: CacheSpec, m: LoadedLLM) -> _Pool:
        pool = self._pools.get(spec)
        if pool is not None:
            return pool
        a = m.model.args
        dev, dt = m.model.norm.weight.device, m.model.norm.weight.dtype
        L = min(m.context_len, self.max_len)

        def make(n: int) -> KVCache:
            if spec.kind == "full":
                return FullCache(a.n_layers, n, a.n_kv_heads, a.head_dim, L, dt, dev)
            if spec.kind == "int8":
                return Int8Cache(a.n_layers, n, a.n_kv_heads, a.head_dim, L, dt, dev, backend=self.kv_backend)
            return WindowCache(a.n_layers, n, a.n_kv_heads, a.head_dim, spec.window, spec.sinks, dt, dev)

        per_slot = make(1).nbytes()
        budget = self._budget()
        n = self.max_slots
        if budget is not None:
            # drop idle pools of other configurations before refusing
            left = budget - sum(p.cache.nbytes() for p in self._pools.values())
            if left < per_slot:
                for k in [k for k, p in self._pools.items() if p.active == 0]:
                    del self._pools[k]
                left = budget - sum(p.cache.nbytes() for p in self._pools.values())
            n = min(n, left // per_slot)
            if n < 1:
                raise InsufficientMemory(f"a {spec.kind} cache slot needs {per_slot} bytes; "
                                         f"{max(left, 0)} bytes of the memory budget are left")
        pool = _Pool(make(int(n)), reusable=spec.kind == "full")
        self._pools[spec] = pool
        return pool

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._active:
                    self._cv.wait()
                if self._closed:
                    for s in self._pending + self._active:
                        self._finish(s, error=Cancelled("the language model service is shut down"))
                    return
                pending, self._pending = self._pending, []
            waiting = []
            for seq in pending:
                if seq.token.cancelled:
                    seq.finish = "cancelled"
                    self._finish(seq)
                elif not self._admit(seq):
                    waiting.append(seq)
            if waiting:
                with self._cv:
                    self._pending[:0] = waiting
            groups: dict[int, list[_Seq]] = {}
            filling: list[_Seq] = []
            for seq in list(self._active):
                if seq.token.cancelled:
                    seq.finish = "cancelled"
                    self._finish(seq)
                elif seq.fill is not None:
                    filling.append(seq)
                else:
                    groups.setdefault(id(seq.pool), []).append(seq)
            if filling:
                self._prefill(filling)
            for seqs in groups.values():
                self._step(seqs)
            if waiting and not self._active:
                time.sleep(0.01)  # nothing running frees a slot; cannot spin

    def _admit(self, seq: _Seq) -> bool:
        req = seq.req
        try:
            m = self.model()
            pool = self._pool(req.cache, m)
            got = pool.acquire(req.prompt_ids, req.reuse_prefix)
        except BaseException as exc:  # model load or memory failure: this request fails, the loop lives
            self._finish(seq, error=exc)
            return True
        if got is None:
            return False
        seq.pool, (seq.slot, seq.reused), seq.model = pool, got, m
        seq.t0 = time.perf_counter()
        seq.fill = seq.reused  # < len(prompt): `_Pool.acquire` reuses at most all but the last token
        with self._cv:
            self._active.append(seq)
        return True

    def _prefill(self, seqs: list[_Seq]) -> None:
        """One round of prefill between decode steps: the prompts' next pieces, oldest request first, while
        the round stays within PREFILL_PIECE tokens (at least one piece)."""
        used = 0
        for seq in seqs:
            while seq.fill is not None and seq.slot >= 0:
                n = min(PREFILL_PIECE, getattr(seq.pool.cache, "max_chunk", PREFILL_PIECE),
                        len(seq.req.prompt_ids) - seq.fill)
                if used and used + n > PREFILL_PIECE:
                    return
                self._fill(seq, n)
                used += n

    def _fill(self, seq: _Seq, n: int) -> None:
        """Prefill the next n prompt tokens of seq; after its last piece, sample its first token."""
        req, pool, m = seq.req, seq.pool, seq.model
        ids = req.prompt_ids
        try:
            seq.token.check()
            logits = m.model.prefill(pool.cache, seq.slot, ids[seq.fill:seq.fill + n], seq.fill)
            seq.fill += n
            if seq.fill < len(ids):
                return
            seq.fill = None
            pool.held[seq.slot] = list(ids)
            if req.sampling.repetition_penalty != 1.0:  # the tokens the penalty may apply to (sampling.py)
                seq.seen = torch.tensor(ids if req.sampling.repetition_scope == "all" else [], dtype=torch.long,
                                        device=logits.device)
            self._push(seq, sample(logits, req.sampling, seq.gen, seq.seen))
        except Cancelled:
            seq.finish = "cancelled"
            self._finish(seq)
        except BaseException as exc:
            self._finish(seq, error=exc)

    def _step(self, seqs: list[_Seq]) -> None:
        seqs.sort(key=lambda s: s.slot)
        pool = seqs[0].pool
        m = seqs[0].model
        if self.compile_step and m.model.step_fn is None:
            from .model import compile_decode

            compile_decode(m.model)
        if len(seqs) == 1 and self.speculate and pool.reusable:
            sp = seqs[0].req.sampling
            if sp.greedy and sp.repetition_penalty == 1.0 and self._speculative_step(seqs[0]):
                return
        try:
            slots = [s.slot for s in seqs]
            fed = [s.out[-1] for s in seqs]
            logits = m.model.decode(pool.cache, slots, fed)  # [B, V]
            self.steps += 1
            if all(s.req.sampling.greedy and s.req.sampling.repetition_penalty == 1.0 for s in seqs):
                nxt = _argmax(logits)
            else:
                nxt = []
                for i, s in enumerate(seqs):
                    if s.seen is not None:
                        s.seen = torch.cat([s.seen, s.seen.new_tensor([fed[i]])])
                        if s.req.sampling.repetition_window:
                            s.seen = s.seen[-s.req.sampling.repetition_window:]
                    nxt.append(sample(logits[i], s.req.sampling, s.gen, s.seen))
        except BaseException as exc:
            for s in seqs:
                self._finish(s, error=exc)
            return
        for s, f, t in zip(seqs, fed, nxt):
            pool.held[s.slot].append(f)
            self._push(s, t)

    def _speculative_step(self, seq: _Seq) -> bool:
        """Prompt-lookup decoding for a lone greedy sequence: draft the tokens that followed the latest
        earlier occurrence of the current n-gram, verify them in one forward, keep the agreeing prefix plus
        the model's own next token. Greedy-exact: every kept token is the argmax given its prefix. False when
        there is no draft (the caller then runs a normal step). Two drafts in a row with nothing accepted
        pause drafting for 16 steps, then 32, 64 and 128 while drafts keep failing (an accepted token resets
        this): a check costs about two plain steps, so text that does not repeat itself should not pay for it."""
        pool, m, slot = seq.pool, seq.model, seq.slot
        if seq.draft_pause > 0:  # recent drafts were all rejected: this text does not repeat itself
            seq.draft_pause -= 1
            return False
        ctx = pool.held[slot] + [seq.out[-1]]
        start = pool.cache.lengths[slot]
        room = min(self.draft_tokens, seq.req.max_new_tokens - len(seq.out) - 1,
                   pool.cache.capacity - start - 2)
        if room < 1:
            return False
        draft = _lookup(ctx, room)
        if not draft:
            return False
        try:
            fed = [seq.out[-1]] + draft
            logits = m.model.extend(pool.cache, slot, fed)  # [k + 1, V]
            best = _argmax(logits)
            self.steps += 1
        except BaseException as exc:
            self._finish(seq, error=exc)
            return True
        j = 0
        while j < len(draft) and draft[j] == best[j]:
            j += 1
        pool.cache.lengths[slot] = start + 1 + j  # forget the K/V of rejected draft tokens
        pool.held[slot].extend(fed[:1 + j])
        self.spec_drafted += len(draft)
        self.spec_accepted += j
        if j:
            seq.draft_misses = seq.draft_pauses = 0
        else:
            seq.draft_misses += 1
        if seq.draft_misses >= 2:
            seq.draft_misses, seq.draft_pause = 0, 16 << min(seq.draft_pauses, 3)
            seq.draft_pauses += 1
        for t in draft[:j] + [best[j]]:
            self._push(seq, t)
            if seq.finish is not None:
                # finished early: the cache holds K/V for tokens after the last one kept; trim them
                break
        return True

    def _push(self, seq: _Seq, tok: int) -> None:
        """Record a sampled token and finish the sequence if it is done."""
        m, req = seq.model, seq.req
        if tok in m.eos_ids and not req.ignore_eos:
            seq.finish = "stop"
        else:
            seq.out.append(tok)
            if req.stop:
                text = self._decode(m, seq.out)
                hits = [text.find(s) for s in req.stop if s and s in text]
                if hits:
                    seq.text_cut = min(hits)
                    seq.finish = "stop"
        if seq.finish is None:
            cap = seq.pool.cache.capacity
            if len(seq.out) >= req.max_new_tokens or (cap is not None and seq.pool.cache.lengths[seq.slot] + 1 >= cap):
                seq.finish = "length"
        if seq.finish is not None:
            self._finish(seq)

    def _finish(self, seq: _Seq, error: BaseException | None = None) -> None:
        seq.t1 = time.perf_counter()
        if error is not None:
            seq.error = error
            log.warning("generation failed", exc_info=error)
        if seq.pool is not None and seq.slot >= 0:
            seq.pool.release(seq.slot, keep=error is None)
            seq.slot = -1
        with self._cv:
            if seq in self._active:
                self._active.remove(seq)
        seq.done.set()

    # -- results --------------------------------------------------------------------------
    @staticmethod
    def _decode(m: LoadedLLM, ids: list[int]) -> str:
        return m.tokenizer.decode(ids) if m.tokenizer is not None else ""

    def _result(self, seq: _Seq) -> GenerationResult:
        m = seq.model or self.model()
        text = self._decode(m, seq.out)
        if seq.text_cut is not None:
            text = text[:seq.text_cut]
        dt = max((seq.t1 - seq.t0) if seq.t0 else 0.0, 1e-9)
        cache = seq.pool.cache if seq.pool is not None else None
        return GenerationResult(
            token_ids=list(seq.out), text=text, finish_reason=seq.finish or "cancelled",
            prompt_tokens=len(seq.req.prompt_ids), reused_tokens=seq.reused, completion_tokens=len(seq.out),
            tokens_per_s=len(seq.out) / dt, seconds=dt, model=m.name,
            cache_kind=seq.req.cache.kind, cache_dtype=cache.storage_dtype if cache else "",
            cache_bytes=cache.slot_bytes() if cache else 0,
            cache_bytes_per_token=cache.bytes_per_token() if cache else 0.0,
            note="; ".join(n for n in (m.note, f"weights: {m.weights}, {m.size_bytes() / 1e6:.1f} MB resident") if n))

    # -- fallback: transformers' generate ----------------------------------------------------
    def _generate_hf(self, m: LoadedLLM, req: GenerationRequest, token: CancelToken,
                     on_progress: ProgressFn | None) -> GenerationResult:
        model_libraries()
        from transformers import StoppingCriteria, StoppingCriteriaList

        if req.cache.kind != "full":
            raise InvalidInput("kv_cache", req.cache.kind, f"not available for {m.name}: {m.note}")
        n0 = len(req.prompt_ids)
        state = {"cancelled": False, "stop": False}
        svc = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                out = input_ids[0, n0:].tolist()
                if token.cancelled:
                    state["cancelled"] = True
                if req.stop and any(s in svc._decode(m, out) for s in req.stop):
                    state["stop"] = True
                if on_progress is not None:
                    on_progress(len(out), svc._decode(m, out))
                done = state["cancelled"] or state["stop"]
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        sp = req.sampling
        kw: dict[str, Any] = {"max_new_tokens": req.max_new_tokens, "do_sample": not sp.greedy,
                              "stopping_criteria": StoppingCriteriaList([_Stop()]),
                              "repetition_penalty": sp.repetition_penalty, "eos_token_id": m.eos_ids or None,
                              "pad_token_id": (m.eos_ids or [0])[0]}
        if not sp.greedy:
            kw.update(temperature=sp.temperature, top_k=sp.top_k or None, top_p=sp.top_p)
        dev = next(m.model.parameters()).device
        t0 = time.perf_counter()
        with self._hf_lock, torch.inference_mode():
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
            ids = m.model.generate(torch.tensor([req.prompt_ids], device=dev), **kw)[0, n0:].tolist()
        dt = max(time.perf_counter() - t0, 1e-9)
        finish = "length"
        if ids and ids[-1] in m.eos_ids:
            ids, finish = ids[:-1], "stop"
        text = self._decode(m, ids)
        if state["cancelled"]:
            finish = "cancelled"
        elif req.stop:
            hits = [text.find(s) for s in req.stop if s and s in text]
            if hits:
                text, finish = text[:min(hits)], "stop"
        return GenerationResult(token_ids=ids, text=text, finish_reason=finish, prompt_tokens=n0, reused_tokens=0,
                                completion_tokens=len(ids), tokens_per_s=len(ids) / dt, seconds=dt, model=m.name,
                                cache_kind="full", cache_dtype=str(next(m.model.parameters()).dtype)[6:],
                                cache_bytes=0, cache_bytes_per_token=0.0, note=m.note)


def _argmax(logits: torch.Tensor) -> list[int]:
    """Greedy tokens of logits [B, V]. On the CPU in NumPy: a torch op here would wake torch's thread pool
    between two steps that run on Numba's (see `engine.llm.npstep`); bf16 (no NumPy type) in torch."""
    if logits.device.type == "cpu" and logits.dtype != torch.bfloat16:
        return logits.numpy().argmax(axis=-1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def _lookup(ctx: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of ctx's final n-gram (n = 3, 2, 1)."""
    n_ctx = len(ctx)
    for n in range(min(max_ngram, n_ctx - 1), 0, -1):
        tail = ctx[-n:]
        first = tail[0]
        for i in range(n_ctx - n - 1, -1, -1):
            if ctx[i] == first and ctx[i:i + n] == tail:
                follow = ctx[i + n:i + n + k]
                if follow:
                    return follow
    return []


_LOAD_LISTENERS: dict[tuple[int, str], list[Any]] = {}


def service_for(engine: Any, spec: str, *, compile_step: bool = False, max_slots: int = 8,
                max_len: int = 2048, decode: str = "auto", weights: str = "auto",
                progress: Callable[[str], None] | None = None, activations: str = "fp32") -> LLMService:
    """The engine's LLMService for the model `spec` (models.llm: '' = embedded SmolLM2) with weights in
    `weights` (models.llm_weights) and packed products' `activations` (models.llm_activations), created
    once; `progress(message)` hears about loading."""
    from .load import estimate_llm_bytes, load_llm

    key = f"llm:{spec or 'embedded'}" + (f":{weights}" if weights != "auto" else "") \
        + (f":{activations}" if activations != "fp32" else "")
    device, dtype = engine.device, (engine.dtype if engine.device.type != "cpu" else torch.float32)
    # the latest caller hears the loading messages (the loader is registered once, callers change)
    listener = _LOAD_LISTENERS.setdefault((id(engine), key), [None])
    listener[0] = progress

    def say(message: str) -> None:
        fn = listener[0]
        if fn is not None:
            try:
                fn(message)
            except Exception:  # a progress sink must never break a load
                log.debug("load progress listener failed", exc_info=True)

    backends = getattr(engine, "backends", None)
    packed_on = backends.wq_matmul.impl if backends is not None else "cpu"  # "triton": packed on a GPU
    engine.registry.register(key, lambda: load_llm(spec, engine.config.cache_dir, device, dtype, decode, weights,
                                                   progress=say, activations=activations,
                                                   device_products=packed_on),
                             family="llm", source=(spec or "embedded SmolLM2-135M-Instruct") + f" (weights: {weights}"
                             + (f", activations: {activations})" if activations != "fp32" else ")"),
                             estimate=lambda: estimate_llm_bytes(spec, device, dtype, weights, packed_on))

    def budget() -> int | None:
        b = engine.registry.budget_bytes
        return None if b is None else b - engine.registry.used_bytes

    def factory(eng: Any) -> LLMService:
        return LLMService(lambda: eng.registry.get(key), budget_bytes=budget, max_slots=max_slots,
                          max_len=max_len, compile_step=compile_step,
                          kv_backend=eng.backends.kv_quant.impl if hasattr(eng, "backends") else None)  # issue 16

    return engine.service(key, factory)
