"""The fused Q8 step against its twin, the layer-by-layer step (`engine.llm.npstep.NumpyStep`), on one model."""

from __future__ import annotations

from typing import Any

import torch

from engine.llm.cache import FullCache, Int8Cache


def fused_and_layer_by_layer(step: Any, a: Any, steps: int = 8, ring: int | None = None
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The logits of the same work through the fused step and through the layer-by-layer one: prompts in 9
    slots (one of 5 tokens, one of 3, seven of 2), then `steps` greedy steps of 1, 2, 5 and 9 rows in turn
    (single rows, a pair, a tile of 4 and one more, a tile of 8 and one more). ring: on an `Int8Cache` whose
    ring holds that many positions (the fused step then takes its decode steps), else on a full cache."""

    def run(fused: bool) -> list[torch.Tensor]:
        keep = step.fused
        step.fused = keep if fused else None
        try:
            c = FullCache(a.n_layers, 9, a.n_kv_heads, a.head_dim, 64) if ring is None else \
                Int8Cache(a.n_layers, 9, a.n_kv_heads, a.head_dim, 64, recent=ring)
            out = [step.extend(c, 0, [3, 17, 99, 5, 42]), step.extend(c, 1, [7, 150, 1])]
            out += [step.extend(c, s, [11 * s + 1, 13 * s + 2]) for s in range(2, 9)]
            toks = [int(o[-1].argmax()) for o in out]
            for i in range(steps):
                rows = list(range((1, 2, 5, 9)[i % 4]))
                lg = step(c, rows, toks[:len(rows)])
                out.append(lg)
                toks = lg.argmax(-1).tolist() + toks[len(rows):]
            if ring is not None:  # prompts that continue a slot past its ring: the positions they push out first
                out.append(step.extend(c, 0, [5, 6, 7]))
                out.append(step.extend(c, 1, [8, 9, 10, 11, 12], batch=False))  # a draft check's sums
            return out
        finally:
            step.fused = keep

    return run(True), run(False)
