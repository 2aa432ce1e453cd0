"""Next-token selection on device: greedy, temperature, top-k, top-p, repetition penalty.

The order follows transformers' logits processors: repetition penalty, then
temperature, top-k, top-p, then a draw from the softmax with the request's
own seeded `torch.Generator` (so a request's draws do not depend on what else
is in the batch). temperature == 0 means greedy: argmax, the lowest index on
ties. Top-k uses `kernels.topk.topk` (values descending, ties -> lower index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidInput("temperature", self.temperature, "must be in [0, 100] (0 = greedy)")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            raise InvalidInput("top_k", self.top_k, f"must be in [0, {vocab_size or 'vocab size'}] (0 = off)")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidInput("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0):
            raise InvalidInput("repetition_penalty", self.repetition_penalty, "must be in (0, 10] (1 = off)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInput("seed", self.seed, "must be in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [1, V] -> (values [1, k] descending, indices [1, k]); ties -> lower index."""
    from kernels.topk import topk

    return topk(x, k)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: [V]; seen: [N] token ids. Positive logits are divided by the penalty, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    idx = seen.unique()
    g = logits.index_select(0, idx)
    logits = logits.clone()
    logits.index_copy_(0, idx, torch.where(g > 0, g / penalty, g * penalty))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None = None) -> int:
    """One token from logits [V] (any float dtype)."""
    x = logits.float()
    if seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
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
