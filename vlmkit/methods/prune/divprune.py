"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025,
arXiv:2503.02175).

Site: `embeds` (the projector's output, before the LLM). Pruning as a Max-Min Diversity Problem: keep
the subset S of k visual tokens that maximises the smallest pairwise distance, solved greedily with
d(i, j) = 1 - cos(x_i, x_j):

    s_1 = argmax_i  (second smallest d(i, j) over j),   s_{t+1} = argmax_j  min_{s in S} d(s, j),

(the first pick skips the token's zero distance to itself). No attention scores are needed, so any
attention implementation works. The greedy picks run in `vlmkit.kernels.greedy_maxmin`, which
computes distances in tiles and never holds the N x N matrix.

Deviations from the reference code (vbdi/divprune): per sample over all its visual tokens, found from
the placeholder tokens (the reference hard-codes the prompt offset, 576 tokens, batch size 1); the
budget default is the paper's 9.8 % of the visual tokens. The kept count is `round(keep * n)` with
Python's rule (halves to even), as the reference computes it; at least one token is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit import kernels
from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.098


@dataclass(frozen=True)
class DivPruneConfig(TokenBudgetConfig):
    pass


@register_method("divprune", family="prune", sites="embeds")
class DivPrune(TokenSelector):
    """Keep the most mutually different visual tokens (greedy Max-Min diversity on cosine distance)."""

    Config = DivPruneConfig
    example = "keep=0.2"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2503.02175"

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for row, visual in enumerate(context.visual):
            count = self.config.kept_count(len(visual), DEFAULT_KEEP, rounding="half_even")
            if count == len(visual):
                samples.append(SampleSelection(torch.arange(count, device=visual.slots.device)))
                continue
            features = context.hidden[row, visual.slots].float()[None]
            picked = kernels.greedy_maxmin(features, count, metric="cosine")[0]
            samples.append(SampleSelection(torch.sort(picked).values))
        return Selection(samples)
