"""FoPru: "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (Jiang et al., 2024,
arXiv:2411.14164).

Site: `vision` (scores from the vision tower), applied before the LLM. Token significance comes
from the head-mean attention scores A (N x N over the patches of one tower pass: the scaled logits
q.k / sqrt(d), as the reference takes them before the softmax, the [CLS] row and column dropped) of
the vision layer the projector reads (LLaVA: the second to last). Of its two marginals

    s1_j = 1/N sum_i A_ij  (attention patch j receives),   s2_i = 1/N sum_j A_ij  (attention patch i pays),

the one with the larger (unbiased) variance is the significance s (s1 if Var(s1) > Var(s2), else s2).
Then, per tower row (image, AnyRes crop, video frame):

- variant="rank": keep the floor(keep * N) tokens with the highest s_j;
- variant="row": score each row of the token grid by the sum of its tokens' s_j and keep all tokens
  of the floor(keep * R) best rows (R rows), preserving continuous horizontal strips;

and the kept tokens enter the LLM in their original order ("token reordering"). s1 and s2 come
from the engine's "vision_marginals" probe ("received_logits" and "paid_logits").

Code: the authors released none that we could find. The only implementation found,
dongxianzhe/hydrainfer `hydrainfer/layer/token_prunning.py:focal_prunning` (its caller,
`dxz/model/llava.py:image_embed`, was removed in commit 5dee73e), written a week after the paper (its
relation to the authors is not stated), is followed here: the map of `vision_feature_layer` with the
[CLS] row and column dropped, the mean over heads, s1 the mean over queries and s2 the mean over keys,
the strict `>` of the variance rule, `sort` descending, rows of a square grid, counts floor(N * ratio)
tokens or floor(sqrt(N) * ratio) rows (truncation, reproduced here).

Deviations, and why:
- Qwen2-VL (packed attention: no per-image map in the probe) gives no marginals: there s is the
  probe's mean attention each token receives (summed over the 2x2 patches a token merges). That is s1:
  without [CLS] every softmax row sums to one, s2 is constant and the rule picks s1 (SigLIP towers give
  the marginals, and the rule picks s1 the same way);
- the rule and the scores are per tower row on the tokens that reach the LLM (AnyRes unpadding drops
  some; pooled videos carry the pooled marginals, N their grid's count); the reference has one map per
  image and keeps all its patches;
- rows are the token grid's rows within a tower row (any aspect ratio, AnyRes crops after unpadding;
  the reference asserts a square grid); a `tokens` budget becomes the share tokens / N;
- ties keep the lower index (row) first (torch `sort` leaves them unspecified).
Default budget: 25% of the tokens (the paper's setting within 1% of the full model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmkit.engine.selection import (
    SampleSelection,
    Selection,
    SelectionContext,
    VisualTokens,
)
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, top_k_sorted
from vlmkit.methods.prune._grid import tower_rows
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.25
VARIANTS = ("rank", "row")


@dataclass(frozen=True)
class FoPruConfig(TokenBudgetConfig):
    variant: str = field(default="rank", metadata={"help": "'rank': the most significant tokens; 'row': the most significant grid rows"})
    vision_layer: int | None = field(default=None, metadata={"help": "vision layer to score at (default: the layer the LLM reads)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"fopru: variant={self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)):
            raise ConfigError(f"fopru: vision_layer={self.vision_layer!r} must be an integer layer index")


@register_method("fopru", family="prune", sites=("vision", "embeds"))
class FoPru(TokenSelector):
    """Keep the most significant tokens (rank) or grid rows (row) by vision-tower attention."""

    Config = FoPruConfig
    example = "keep=0.25,variant=row"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2411.14164"
    needs = frozenset({"vision_attention", "vision_marginals"})

    def vision_layer(self, adapter) -> int:
        return adapter.default_vision_layer() if self.config.vision_layer is None else self.config.vision_layer

    def kept(self, available: int, units: int) -> int:
        """How many of `units` (tokens, or grid rows) of a tower row of `available` tokens are kept:
        floor(units * keep), or floor(units * tokens / available) for a `tokens` count; at least one."""
        if self.config.tokens is not None:
            count = self.config.kept_count(available, DEFAULT_KEEP)  # capped, with a warning, at `available`
            return max(1, units * count // available)
        keep = DEFAULT_KEEP if self.config.keep is None else self.config.keep
        return min(units, max(1, math.floor(units * keep)))  # truncation, as the reference

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for visual, probes in zip(context.visual, context.vision):
            kept = [
                self.select_unit(_significance(visual, probes, unit), visual.row[unit], unit)
                for unit in tower_rows(visual)
            ]
            keep = torch.sort(torch.cat(kept)).values if kept else visual.slots.new_zeros(0)
            samples.append(SampleSelection(keep))
        return Selection(samples)

    def select_unit(self, significance: torch.Tensor, rows: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Kept indices (from `unit`) of one tower row, given its tokens' significance and grid rows."""
        if self.config.variant == "rank":
            return unit[top_k_sorted(significance, self.kept(unit.numel(), unit.numel()))]
        labels, row_of = torch.unique(rows, return_inverse=True)
        row_scores = torch.zeros(labels.numel(), dtype=significance.dtype, device=significance.device)
        row_scores.index_add_(0, row_of, significance)
        chosen = top_k_sorted(row_scores, self.kept(unit.numel(), labels.numel()))
        return unit[torch.isin(row_of, chosen)]


def _significance(visual: VisualTokens, probes: list[dict[str, torch.Tensor]], unit: torch.Tensor) -> torch.Tensor:
    """The significance of the tokens of one tower row `unit` (indices into the sample's visual
    tokens, all of one image): the marginal with the larger variance where the probe has the
    marginals, else its per-token attention score."""
    image = int(visual.image[unit[0]])
    probe = probes[image]
    local = torch.searchsorted(visual.image_index(image), unit)  # the unit's place among the image's tokens
    device = visual.slots.device
    if "received_logits" not in probe or "paid_logits" not in probe:
        return probe["importance"].float().to(device)[local]
    received = probe["received_logits"].float().to(device)[local]  # s1: mean over the patch queries
    paid = probe["paid_logits"].float().to(device)[local]  # s2: mean over the patch keys
    if received.numel() > 1 and torch.var(received) > torch.var(paid):
        return received
    return paid
