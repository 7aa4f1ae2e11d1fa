"""LLaVA-PruMerge+ (Shang et al., ICCV 2025, arXiv:2403.15388): PruMerge plus spatially uniform samples.
Reference: 42Shawn/LLaVA-PruMerge, `llava/model/multimodal_encoder/clip_encoder.py`,
`CLIPVisionTower.token_prune_merge_advanced_plus` (its inference branch, `if_adaptive=True`).

As `prumerge` (same scores, merge and extra token; see its docstring), with more patches kept: after
the `int(n * r)` [CLS]-attention outliers (r the outlier ratio), every s-th patch,

    s = int(int(1 / r) / 3),  patches 0, s, 2s, ... < n - 1  (the reference: < 575 of 576),

that is not already kept joins them, so a row keeps about four times the outliers. The image enters
as the outliers in decreasing attention, then the added patches in patch order, then the extra token.

A `keep` share or `tokens` count (not in the reference) fixes the tokens a tower row contributes:
a quarter of them, rounded up, are the top patches by attention (the reference's proportion: three
samples per outlier), the others but one are evenly strided over the remaining patches (every
`max(1, remaining // needed)`-th, in patch order, the first `needed`), and the last is the extra token.

Deviations: as `prumerge`; besides, the sampling step is at least 1 (the reference's `arange` fails
with step 0 when more than a third of the patches are outliers).
"""
from __future__ import annotations

import math

import torch

from vlmkit.methods.prune.prumerge import PruMerge, descending, outlier_ratio
from vlmkit.registry import register_method


@register_method("prumerge_plus", family="prune", sites=("vision", "embeds"))
class PruMergePlus(PruMerge):
    """PruMerge, with spatially uniform samples added to the [CLS]-attention outliers."""

    example = "keep=0.25"

    def choose(self, scores: torch.Tensor) -> torch.Tensor | None:
        n = scores.numel()
        if self.adaptive:
            ratio = outlier_ratio(scores)
            top = descending(scores, max(1, int(n * ratio)))
            step = max(1, int(int(1 / ratio) / 3))
            sequence = torch.arange(0, n - 1, step, device=scores.device)
            added = sequence[~torch.isin(sequence, top)]
        else:
            total = self.config.kept_count(n, 1.0)
            if total >= n:
                return None
            top = descending(scores, math.ceil((total - 1) / 4))
            needed = total - 1 - top.numel()
            rest = torch.ones(n, dtype=torch.bool, device=scores.device)
            rest[top] = False
            rest = torch.nonzero(rest).flatten()
            step = max(1, rest.numel() // max(needed, 1))
            added = rest[torch.arange(0, rest.numel(), step, device=scores.device)[:needed]]
        return torch.cat([top, added])
