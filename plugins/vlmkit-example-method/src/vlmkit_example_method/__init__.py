"""An example third-party vlmkit method, registered through the `vlmkit.methods` entry point.

`center` keeps, in each image, the visual tokens nearest the centre of its token grid (a crude
"centre crop" prior): a method only returns a selection; vlmkit's engine does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.methods import TokenBudgetConfig, TokenSelector
from vlmkit.registry import register_method


@dataclass(frozen=True)
class CenterConfig(TokenBudgetConfig):
    pass


@register_method("center", family="prune", site="embeds")
class Center(TokenSelector):
    """Keep the visual tokens nearest the centre of each image's grid."""

    Config = CenterConfig

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for visual in context.visual:
            keep_parts = []
            for image, (_, rows, cols) in enumerate(visual.grids):
                members = visual.image_index(image)
                distance = (visual.row[members] - (rows - 1) / 2) ** 2 + (visual.col[members] - (cols - 1) / 2) ** 2
                count = self.config.kept_count(members.numel(), 0.25)
                nearest = torch.argsort(distance, stable=True)[:count]
                keep_parts.append(members[nearest])
            samples.append(SampleSelection(torch.sort(torch.cat(keep_parts)).values))
        return Selection(samples)
