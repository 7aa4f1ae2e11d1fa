"""Spatial average pooling: the downsampling baseline (VTC-Bench, arXiv:2510.07143).

Site: `embeds`. Each image's token grid is cut into windows of `rows x cols` tokens (per frame and
per AnyRes crop); a window becomes one token, the mean of its members, placed at the window's first
(top-left) token. The window, square or one column wider, is the one whose size is closest to
1 / keep, so `keep=0.5` pools 1x2, `keep=0.25` 2x2 and `keep=1/9` 3x3 (the kept count can differ a
little from the budget when the grid does not divide evenly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext, VisualTokens
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.25


@dataclass(frozen=True)
class PoolConfig(TokenBudgetConfig):
    pass


@register_method("pool", family="prune", sites="embeds")
class Pool(TokenSelector):
    """Average-pool each image's token grid down to the budget."""

    Config = PoolConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2510.07143"  # the benchmark that found this baseline strong

    def select(self, context: SelectionContext) -> Selection:
        return Selection([self._pool(visual) for visual in context.visual])

    def _pool(self, visual: VisualTokens) -> SampleSelection:
        window_of = torch.empty(len(visual), dtype=torch.long)
        for image in range(len(visual.grids)):
            members = visual.image_index(image).cpu()
            target = self.config.kept_count(members.numel(), DEFAULT_KEEP)
            height, width = _window(members.numel() / target)
            key = torch.stack(
                [visual.frame[members], visual.crop[members], visual.row[members] // height, visual.col[members] // width],
                dim=1,
            ).cpu()
            window_of[members] = torch.unique(key, dim=0, return_inverse=True)[1] + (image << 32)
        _, window = torch.unique(window_of, return_inverse=True)
        first = torch.full((int(window.max()) + 1,), len(visual), dtype=torch.long).scatter_reduce(
            0, window, torch.arange(len(visual)), reduce="amin"
        )
        keep = torch.sort(first).values
        merge_target = torch.searchsorted(keep, first[window])
        device = visual.slots.device
        return SampleSelection(keep.to(device), merge_target=merge_target.to(device))


def _window(area: float) -> tuple[int, int]:
    """The (rows, cols) window, square or one column wider, whose size is closest to `area` tokens."""
    candidates = [(side, side + extra) for side in range(1, math.isqrt(int(area)) + 2) for extra in (0, 1)]
    return min(candidates, key=lambda window: (abs(window[0] * window[1] - area), window[0] * window[1]))
