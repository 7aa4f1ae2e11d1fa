"""Bilinear downsampling of the token grid: a baseline (VTC-Bench, arXiv:2510.07143, finds plain image
downsampling beats many compressors).

Site: `embeds`. Each view's token grid (an image; an AnyRes crop, after unpadding; a video frame) of
H x W tokens becomes h x w tokens, as

    F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=False)

computes them on the LLM's input: output cell (p, q) is the bilinear mix of the (up to) four tokens
around its sampling point (s_p, s_q), s = max(0, (p + 0.5) H / h - 0.5). The cell takes the place
(and, under positions="keep", the position) of the grid token nearest its sampling point (halves
to the lower row / column). The target sides keep the share: with `k` the budget's count for the
view's n tokens, h = floor(H sqrt(k / n) + 0.5) and w = floor(W sqrt(k / n) + 0.5), each at least 1
(`keep=0.25` turns 24 x 24 into 12 x 12; the kept count can differ a little from the budget when
the sides do not scale evenly). A `tokens` count is per view.

Unlike `pool` (box average over windows of whole tokens, the window's first token keeps its
place), every output token mixes its neighbours with bilinear weights, as image resizing does.
Limits: the grid of tokens is resized, not the image (VTC-Bench resizes the image before encoding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext, VisualTokens
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.methods.prune._grid import bilinear_matrix, bilinear_sources, grid_box, tower_rows
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.25


@dataclass(frozen=True)
class DownsampleConfig(TokenBudgetConfig):
    pass


@register_method("downsample", family="prune", sites="embeds")
class Downsample(TokenSelector):
    """Resize each view's token grid bilinearly to the budget."""

    Config = DownsampleConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2510.07143"  # the benchmark that found downsampling a strong baseline

    def select(self, context: SelectionContext) -> Selection:
        return Selection([self.select_sample(visual) for visual in context.visual])

    def sides(self, rows: int, cols: int) -> tuple[int, int]:
        """The (h, w) a rows x cols grid is resized to."""
        share = self.config.kept_count(rows * cols, DEFAULT_KEEP) / (rows * cols)
        scale = math.sqrt(share)
        return min(rows, max(1, math.floor(rows * scale + 0.5))), min(cols, max(1, math.floor(cols * scale + 0.5)))

    def select_sample(self, visual: VisualTokens) -> SampleSelection:
        device = visual.slots.device
        kept, weights = [], []  # per view: sample indices of the output cells' places, (cells, n) weights
        for unit in tower_rows(visual):
            _, _, rows, cols, local = grid_box(visual, unit.cpu())
            height, width = self.sides(rows, cols)
            if (height, width) == (rows, cols):
                kept.append(unit)
                weights.append(None)
                continue
            at = torch.empty(rows * cols, dtype=torch.long)
            at[local] = unit.cpu()  # grid cell -> sample index
            places = bilinear_sources(rows, height)[:, None] * cols + bilinear_sources(cols, width)[None, :]
            kept.append(at[places.flatten()].to(device))
            vertical, horizontal = bilinear_matrix(rows, height), bilinear_matrix(cols, width)
            cell_weights = (vertical[:, :, None, None] * horizontal[None, None, :, :]).permute(0, 2, 1, 3)
            block = torch.zeros(height * width, len(visual))
            block[:, at] = cell_weights.reshape(height * width, rows * cols)
            weights.append(block)
        if not kept:
            return SampleSelection(visual.slots.new_zeros(0))
        keep, sort = torch.sort(torch.cat(kept))
        if all(w is None for w in weights):
            return SampleSelection(keep)
        combine = torch.cat([
            torch.zeros(u.numel(), len(visual)).index_put_((torch.arange(u.numel()), u.cpu()), torch.tensor(1.0))
            if w is None else w
            for u, w in zip(kept, weights)
        ])
        return SampleSelection(keep, combine=combine[sort.cpu()].to(device))
