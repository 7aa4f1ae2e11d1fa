"""Random pruning: the baseline benchmark papers find "surprisingly strong" (UniPruneBench, 2511.02650).

Site: `embeds` by default (before the LLM), or before decoder `layer` L. Keeps a uniformly random
subset of each sample's visual tokens. The subset depends only on `seed` and the number of visual
tokens, so a sample gets the same tokens alone or in a batch, in every call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.25


@dataclass(frozen=True)
class RandomPruneConfig(TokenBudgetConfig):
    seed: int = field(default=0, metadata={"help": "seed of the random subset"})
    layer: int = field(default=0, metadata={"help": "decoder layer before which tokens are dropped (0 = before the LLM)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"random: layer={self.layer!r} must be an integer >= 0")


@register_method("random", family="prune", sites=("embeds", "layer"))
class RandomPrune(TokenSelector):
    """Keep a seeded random subset of the visual tokens."""

    Config = RandomPruneConfig
    example = "keep=0.3,seed=3"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2511.02650"  # the benchmark that found this baseline strong

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.config.layer,)

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for visual in context.visual:
            count = self.config.kept_count(len(visual), DEFAULT_KEEP)
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + len(visual))
            chosen = torch.randperm(len(visual), generator=generator)[:count]
            samples.append(SampleSelection(torch.sort(chosen).values.to(visual.slots.device)))
        return Selection(samples)
