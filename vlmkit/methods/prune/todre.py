"""ToDRE: "Effective Visual Token Pruning via Token Diversity and Task Relevance" (Li, Yang, Zhang, Shao
and Lu, arXiv:2505.18757 v2, Nov. 2025; v1, May 2025, was titled "... via Diversity and Task Awareness").

Two stages.

1. Diversity (site `embeds`: the projector's output, before the LLM). The pivot p is the token with
   the highest [CLS] attention (mean over heads) at the vision tower's last layer, among the base
   view's tokens for AnyRes and over all frames for video. Greedy max-sum diversification on cosine
   similarity s(i, j) = x_i . x_j / (|x_i| |x_j|) then keeps k tokens:

       C = {p},   c_t = argmin_{v not in C} sum_{c in C} s(x_v, x_c),   until |C| = k,

   with the sums updated once per pick (the paper's Algorithm 1; ties go to the lowest index).
2. Relevance (site `layer`). At a deep layer l (7L/8) the attention ratios alpha_{t->v} and
   alpha_{v->t} are measured,

       alpha_{t->v} = 1/T * sum_t sum_{j visual} A[t, j]

   with A[t, j] the attention of text query t to key j (softmax over what t sees, mean over heads)
   and T the text queries; when both are below tau (0.10), every visual token leaves the layers
   after l. Here the selection is before decoder layer K = floor(7L/8), from layer K-1's attention.

`keep` is stage 1's share (the paper's retention ratio: 10 % keeps 288 of 2880 tokens); stage 2 then
keeps all of those or none. No code has been released: this follows the paper's text and its
Algorithm 1. The kept count is `floor(keep * n + 0.5)`, at least one.

Deviations, and why:
- the text queries of alpha_{t->v} are the text tokens after the sample's last visual token (the
  question and the template's answer prefix; the system prompt before the image is not among them);
  alpha_{v->t} is taken as 0, which it is whenever the text follows the images (the LLaVA and
  Qwen2-VL prompts): causal visual queries cannot see later tokens; with no text after the images
  nothing is withdrawn;
- towers without [CLS] (SigLIP, Qwen2-VL) take the pivot from the mean attention each patch receives,
  where the paper allows a random pivot (its Table S1: within 0.2 points of [CLS]);
- per sample over all its visual tokens; several images share one pivot (the highest over their
  base views).
Both stages run by default (tau = 0.10); `threshold=None` turns stage 2 off. positions="auto"
re-indexes at stage 1 (pruning before the LLM, as DivPrune) and keeps the ids at stage 2 (as VTW,
whose withdrawal it makes adaptive).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import (
    SampleSelection,
    Selection,
    SelectionContext,
    VisualTokens,
)
from vlmkit.errors import ConfigError, InputError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.10  # the paper's main setting: 90 % of the visual tokens pruned before the LLM
PAPER_THRESHOLD = 0.10  # the paper's tau
RELEVANCE_DEPTH = 7 / 8  # the paper's layer 7L/8
NORM_EPS = 1e-12


@dataclass(frozen=True)
class ToDREConfig(TokenBudgetConfig):
    threshold: float | None = field(
        default=PAPER_THRESHOLD,
        metadata={"help": "tau of the relevance stage: all visual tokens leave after layer K-1 when the text "
                  "queries' mean visual attention share there is below tau; None = stage off"},
    )
    relevance_layer: int | None = field(
        default=None, metadata={"help": "K: the relevance stage acts before decoder layer K (default 7L/8)"}
    )
    vision_layer: int = field(default=-1, metadata={"help": "vision layer of the pivot's [CLS] attention (the paper: the last)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1
        ):
            raise ConfigError(f"todre: threshold={self.threshold!r} must be a number in [0, 1] (the paper's is {PAPER_THRESHOLD})")
        if self.relevance_layer is not None and (
            isinstance(self.relevance_layer, bool) or not isinstance(self.relevance_layer, int) or self.relevance_layer < 1
        ):
            raise ConfigError(f"todre: relevance_layer={self.relevance_layer!r} must be an integer >= 1 (scores come from layer K-1)")
        if isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int):
            raise ConfigError(f"todre: vision_layer={self.vision_layer!r} must be an integer (negative counts from the last)")

    @property
    def diversity_stage(self) -> bool:
        """Whether stage 1 can drop tokens (any budget but keep=1.0)."""
        return not (self.tokens is None and self.keep == 1.0)


@register_method("todre", family="prune", sites=("vision", "embeds", "layer"))
class ToDRE(TokenSelector):
    """Keep a maximally diverse subset (greedy max-sum from a [CLS] pivot); optionally drop all visual
    tokens once the text stops attending to them."""

    Config = ToDREConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2505.18757"
    needs = frozenset({"vision_attention", "text_attention"})  # each instance needs what its stages use

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        relevance, diversity = self.config.threshold is not None, self.config.diversity_stage
        self.needs = frozenset({"text_attention"} if relevance else ()) | frozenset({"vision_attention"} if diversity else ())

    def natural_positions_at(self, layer: int | None) -> str:
        """Stage 1 re-indexes (pruning before the LLM, as DivPrune); stage 2 keeps the ids (as VTW)."""
        return "reindex" if layer == 0 or (layer is None and self.config.diversity_stage) else "keep"

    def vision_layer(self, adapter) -> int:
        return self.config.vision_layer

    def relevance_layer(self, num_layers: int) -> int:
        """K: the relevance stage selects before decoder layer K, from layer K-1's attention."""
        if self.config.relevance_layer is not None:
            return self.config.relevance_layer
        return max(1, int(RELEVANCE_DEPTH * num_layers))

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        relevance = (self.relevance_layer(num_layers),) if self.config.threshold is not None else ()
        return ((0,) if self.config.diversity_stage else ()) + relevance or (0,)

    def select(self, context: SelectionContext) -> Selection:
        if context.layer > 0:
            return Selection([self.relevance(a, v) for a, v in zip(context.text_attention, context.visual)])
        samples = []
        for row, visual in enumerate(context.visual):
            count = self.config.kept_count(len(visual), DEFAULT_KEEP)
            device = visual.slots.device
            if count >= len(visual):
                samples.append(SampleSelection(torch.arange(len(visual), device=device)))
                continue
            pivot = self.pivot(visual, context.vision[row] if context.vision is not None else None)
            picked = greedy_max_sum(context.hidden[row, visual.slots], count, pivot)
            samples.append(SampleSelection(torch.sort(picked).values))
        return Selection(samples)

    def pivot(self, visual: VisualTokens, probes) -> int:
        """The token with the highest [CLS] attention among the base views' tokens (all frames of a video)."""
        if not probes or any(p is None or "importance" not in p for p in probes):
            raise InputError("todre: the pivot needs the vision tower's [CLS] attention, which this call did not record")
        importance = torch.full((len(visual),), float("-inf"), device=visual.slots.device)
        for image, probe in enumerate(probes):
            importance[visual.image_index(image)] = probe["importance"].float().to(importance.device)
        importance = importance.masked_fill(visual.crop != 0, float("-inf"))
        return int(torch.argmax(importance))  # first maximum on ties

    def relevance(self, attention: torch.Tensor, visual: VisualTokens) -> SampleSelection:
        """All of the sample's visual tokens, or none when alpha_{t->v}, the text queries' mean visual
        attention share (`attention` (T, n): each text query's attention to each visual token), is below tau."""
        device = visual.slots.device
        if attention.shape[0] and float(attention.float().sum(dim=1).mean()) < self.config.threshold:
            return SampleSelection(torch.zeros(0, dtype=torch.long, device=device))
        return SampleSelection(torch.arange(len(visual), device=device))


def greedy_max_sum(features: torch.Tensor, count: int, pivot: int) -> torch.Tensor:
    """Greedy max-sum diversification (ToDRE's Algorithm 1): indices of `count` tokens in pick order.

    Starts from `pivot`, then repeatedly picks the unpicked token whose summed cosine similarity to the
    picked ones is smallest (the lowest index on ties). Float32, O(count * n * d), never n x n.

    Args:
        features: (n, d) token features.
        count: tokens to pick, 1 <= count <= n.
        pivot: index of the first pick.
    """
    unit = F.normalize(features.float(), dim=-1, eps=NORM_EPS)
    picks = torch.empty(count, dtype=torch.long, device=features.device)
    picks[0] = pivot
    total = unit @ unit[pivot]
    total[pivot] = float("inf")
    for step in range(1, count):
        pick = torch.argmin(total)  # first minimum on ties
        picks[step] = pick
        total = total + unit @ unit[pick]
        total[pick] = float("inf")
    return picks
