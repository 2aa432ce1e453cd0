"""Next-token selection on device: greedy, temperature, top-k, top-p, repetition penalty.

The order follows transformers' logits processors: repetition penalty, then
temperature, top-k, top-p, then a draw from the softmax with the request's
own seeded `torch.Generator` (so a request's draws do not depend on what else
is in the batch). temperature == 0 means greedy: argmax, the lowest index on
ties. Top-k uses `atelier_kernels.topk.topk` (values descending, ties -> lower index).

The repetition penalty looks at the last `repetition_window` tokens (0 = all).
Scope "all" is transformers' convention: every token of the prompt and of the
text so far, penalised once seen. Scope "generated" (the tool's default) looks
only at the model's own tokens and penalises those it already wrote
`GENERATED_MIN_COUNT` times in the window: the prompt's words and a word used
once more stay free, so short answers come out as without a penalty, while a
loop (a phrase written again and again) is penalised from its third turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidInput


# scope "generated": a token the model wrote once in the window is language ("2 + 2", a second comma); one it
# wrote twice already is penalised (loops repeat a phrase many times). Short answers then come out as with no
# penalty (tests/test_sampling_defaults.py: 12 prompts against transformers at penalty 1.0).
GENERATED_MIN_COUNT = 2


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    # which tokens the penalty applies to: the last `repetition_window` tokens (0 = all) of the generated
    # text only ("generated"), or of the prompt and the generated text ("all", transformers' convention)
    repetition_window: int = 64
    repetition_scope: str = "generated"

    def validate(self, vocab_size: int | None = None) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidInput("temperature", self.temperature, "must be in [0, 100] (0 = greedy)")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            raise InvalidInput("top_k", self.top_k, f"must be in [0, {vocab_size or 'vocab size'}] (0 = off)")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidInput("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0):
            raise InvalidInput("repetition_penalty", self.repetition_penalty, "must be in (0, 10] (1 = off)")
        if not 0 <= self.repetition_window <= 1_000_000:
            raise InvalidInput("repetition_window", self.repetition_window, "must be in [0, 1000000] (0 = all)")
        if self.repetition_scope not in ("generated", "all"):
            raise InvalidInput("repetition_scope", self.repetition_scope, "must be 'generated' or 'all'")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInput("seed", self.seed, "must be in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [1, V] -> (values [1, k] descending, indices [1, k]); ties -> lower index."""
    from atelier_kernels.topk import topk

    return topk(x, k)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float,
                             min_count: int = 1) -> torch.Tensor:
    """logits: [V]; seen: [N] token ids. The logits of tokens that occur at least `min_count` times in `seen`:
    positive ones are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    idx, counts = seen.unique(return_counts=True)
    if min_count > 1:
        idx = idx[counts >= min_count]
        if idx.numel() == 0:
            return logits
    g = logits.index_select(0, idx)
    logits = logits.clone()
    logits.index_copy_(0, idx, torch.where(g > 0, g / penalty, g * penalty))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> int:
    """One token from logits [V] (any float dtype)."""
    x = logits.float()
    if seen is not None:
        if params.repetition_window:
            seen = seen[-params.repetition_window:]
        x = apply_repetition_penalty(x, seen, params.repetition_penalty,
                                     GENERATED_MIN_COUNT if params.repetition_scope == "generated" else 1)
    if params.greedy:
        return int(torch.argmax(x))
    x = x / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        vals, idx = _topk(x.view(1, -1), params.top_k)
        vals, idx = vals[0], idx[0]
    elif params.top_p < 1.0:
        vals, idx = torch.sort(x, descending=True, stable=True)
    else:
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))
    probs = torch.softmax(vals, dim=-1)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        keep = (cum - probs) < params.top_p  # the first token is always kept
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(idx[choice])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
