"""LLaVA-PruMerge and PruMerge+: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models"
(Shang et al., ICCV 2025, arXiv:2403.15388). Reference: 42Shawn/LLaVA-PruMerge,
`llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionTower.token_prune_merge_advanced`.

Site: `vision` (scores, keys and features from the vision tower), applied before the LLM. Per tower
row (an image; an AnyRes crop; a video frame) of n patches, at the tower's last layer (the reference
hooks the q and k projections of `layers[23]` of CLIP ViT-L, whose input is the second-to-last
features LLaVA reads), a_j is the [CLS] attention of patch j as the reference computes it, one head
over the concatenated projections, softmax_j(q . k_j / sqrt(C)) with C the width of the features the
projector reads (the tower's width, that of q and k). With l_j the probe's "cls_logits" (mean over
the H heads of q_h . k_j,h / sqrt(d), d = C / H the head width), q . k_j = sum_h q_h . k_j,h =
H sqrt(d) l_j, so

    a_j = softmax_j(sqrt(C / d) l_j)   over the row's patches,

C / d the width of the probe's "full_keys" over that of its head-mean "keys". k_j is patch j's
key as the reference compares it: the key projection's output at that layer, all heads side by
side (the probe's "full_keys", [CLS] excluded), L2-normalised for the cosine:

1. prune (adaptive, the default): the outliers of a by the interquartile rule,
   a_j > Q3 + 1.5 (Q3 - Q1) (linear-interpolated quartiles, as `np.percentile`), give a ratio
   r = outliers / n, and the `int(n * r)` patches with the highest a_j are kept, in decreasing a_j;
2. merge: each kept patch i absorbs its `neighbours` (32) nearest other patches by cosine
   similarity of k (kept or not), weighted by their [CLS] attention, unnormalised,

       y_i = x_i + sum_{j in kNN(i)} a_j x_j,

   on the vision features the projector reads (then projected);
3. one extra token, sum_{j pruned} a_j x_j, follows the kept ones.

A tower row enters as its kept tokens in decreasing a_j, then the extra token, as the reference
concatenates them (`order`; each row within the places its kept tokens occupy, so AnyRes tiles stay
in their rows); the extra token takes the place (and, under positions="keep", the position) of the
row's pruned patch with the highest a_j.

Budget: `keep=None` (the default) is the reference's adaptive count. A `keep` share or `tokens`
count is not in the reference: it fixes the tokens a tower row contributes, the top `count - 1`
patches by a_j plus the extra token (a `tokens` count is per tower row); a row that keeps all its
patches enters unchanged (the reference would still blend every token with its 32 neighbours).

Deviations from the reference code, and why:
- the softmax runs over the row's patches; the reference's also has the [CLS] column, whose
  self-logit the probe leaves out: each a_j of a row is the reference's divided by 1 - a_CLS (the
  reference's [CLS] self-attention), so the ranking and the interquartile outliers (a scale-free
  rule) are the reference's and only the merge weights of the row are larger, all by that one
  factor (on an AnyRes crop the softmax runs over the patches that survive unpadding: again one
  factor per row);
- towers without [CLS] (SigLIP, Qwen2-VL) score by the probe's head-mean attention after the
  softmax ("importance": the [CLS] row, or the mean attention a patch receives without [CLS]);
- Qwen2-VL's tower (packed attention, fused qkv) gives no "full_keys": there k_j is the head-mean
  key (probe "keys");
- the reference is LLaVA-1.5 only (one 576-patch image per batch); here each tower row is treated as
  its image, over the patches that survive AnyRes unpadding;
- quartiles in float64; at least one patch is kept (the reference keeps none, and PruMerge+ divides
  by zero, when a row has no outlier); k = min(32, n - 1) on rows of fewer than 33 patches; ties
  in attention or similarity go to the lower index (torch `topk` leaves them open);
- where the projector does not map one vision feature to one token (Qwen2-VL's merger) or pools
  after projecting (LLaVA-OneVision's videos), the sums are taken on the LLM's input;
- a row with nothing pruned gets no extra token (the reference appends a zero vector).
Limits: the reference's numbers come with LoRA fine-tuning; training-free, PruMerge is known to do
poorly (LLaVA-PruMerge #15, FasterVLM #2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext, VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.methods.prune._grid import entry_order, probe_values, tower_rows
from vlmkit.registry import register_method


@dataclass(frozen=True)
class PruMergeConfig(TokenBudgetConfig):
    neighbours: int = field(default=32, metadata={"help": "nearest patches (key cosine) each kept patch absorbs"})
    vision_layer: int | None = field(
        default=None, metadata={"help": "vision layer to score at (default: the tower's last, as layers[23] of CLIP ViT-L)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise ConfigError(f"prumerge: neighbours={self.neighbours!r} must be an integer >= 0")
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)):
            raise ConfigError(f"prumerge: vision_layer={self.vision_layer!r} must be an integer layer index")


@register_method("prumerge", family="prune", sites=("vision", "embeds"))
class PruMerge(TokenSelector):
    """Keep the [CLS]-attention outliers, each merged with its nearest patches, plus one pooled token."""

    Config = PruMergeConfig
    example = ""
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2403.15388"
    needs = frozenset({"vision_attention", "vision_features", "vision_full_keys"})

    def vision_layer(self, adapter) -> int:
        return len(adapter.vision_layers) - 1 if self.config.vision_layer is None else self.config.vision_layer

    def select(self, context: SelectionContext) -> Selection:
        return Selection([self.select_sample(visual, probes) for visual, probes in zip(context.visual, context.vision)])

    # ---------------------------------------------------------------- which patches stay
    @property
    def adaptive(self) -> bool:
        return self.config.keep is None and self.config.tokens is None

    def choose(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Indices (within one tower row) of the patches kept, in entry order; None keeps the row whole."""
        n = scores.numel()
        if self.adaptive:
            count = max(1, int(n * outlier_ratio(scores)))
        else:
            total = self.config.kept_count(n, 1.0)
            if total >= n:
                return None
            count = total - 1  # the extra token takes the last place of the budget
        return None if count >= n else descending(scores, count)

    # ---------------------------------------------------------------- merging
    def select_sample(self, visual: VisualTokens, probes) -> SampleSelection:
        """Every tower row of one sample: kept patches (merged with their neighbours) and the extra token."""
        scores = cls_attention(visual, probes)
        full = all(p is not None and "full_keys" in p for p in probes)
        keys = probe_values(visual, probes, "full_keys" if full else "keys")  # head means: Qwen2-VL
        groups, changed = [], []  # per tower row: sample indices in entry order; (sample indices, combine rows)
        for unit in tower_rows(visual):
            chosen = self.choose(scores[unit])
            if chosen is None:
                groups.append(unit)
                continue
            merged = self.merged_rows(unit, chosen, scores, keys)
            groups.append(merged[0])
            changed.append(merged)
        if not groups:
            return SampleSelection(visual.slots.new_zeros(0))
        keep, order = entry_order(groups)
        if not changed:
            return SampleSelection(keep, order=order)
        combine = torch.zeros(keep.numel(), len(visual), device=keep.device)
        combine[torch.arange(keep.numel(), device=keep.device), keep] = 1.0
        for indices, rows in changed:
            combine[torch.searchsorted(keep, indices)] = rows
        space = "vision" if all(p is not None and "features" in p for p in probes) else "llm"
        return SampleSelection(keep, combine=combine, combine_space=space, order=order)

    def merged_rows(self, unit, chosen, scores, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """One tower row's entries (sample indices: the kept patches in `chosen` order, then the extra
        token) and their combine rows over the sample's tokens: e_i + sum_{j in kNN(i)} a_j e_j for
        a kept patch i, sum_{j pruned} a_j e_j for the extra token."""
        n, count = unit.numel(), chosen.numel()
        neighbours = min(self.config.neighbours, n - 1)
        normalized = F.normalize(keys[unit], dim=-1)
        similarity = normalized[chosen] @ normalized.T
        similarity[torch.arange(count, device=unit.device), chosen] = float("-inf")  # not itself
        nearest = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :neighbours]
        local = torch.zeros(count, n, device=unit.device)
        local.scatter_(1, nearest, scores[unit][nearest])
        local[torch.arange(count, device=unit.device), chosen] = 1.0
        entries = unit[chosen]
        pruned = torch.ones(n, dtype=torch.bool, device=unit.device)
        pruned[chosen] = False
        if pruned.any():  # the extra token, at the pruned patch with the highest a_j (first of equals)
            place = torch.nonzero(pruned).flatten()[torch.argmax(scores[unit][pruned])]
            local = torch.cat([local, torch.where(pruned, scores[unit], 0.0)[None]])
            entries = torch.cat([entries, unit[place][None]])
        rows = torch.zeros(local.shape[0], scores.numel(), device=unit.device)
        rows[:, unit] = local
        return entries, rows


def cls_attention(visual: VisualTokens, probes) -> torch.Tensor:
    """a_j per visual token of the sample: per tower row, softmax(sqrt(C / d) l) of the [CLS] logits
    where the probe has them and the full keys (of width C; d the head-mean key width), else the
    probe's "importance"."""
    scores = probe_values(visual, probes, "importance")
    scaled = torch.zeros_like(scores)
    known = torch.zeros_like(scores, dtype=torch.bool)
    for image, probe in enumerate(probes):
        if "cls_logits" in probe and "full_keys" in probe:
            members = visual.image_index(image)
            heads = probe["full_keys"].shape[-1] / probe["keys"].shape[-1]  # C / d
            scaled[members] = probe["cls_logits"].float().to(scores.device) * math.sqrt(heads)
            known[members] = True
    for unit in tower_rows(visual):
        if bool(known[unit].all()):
            scores[unit] = torch.softmax(scaled[unit], dim=0)
    return scores


def outlier_ratio(scores: torch.Tensor) -> float:
    """Share of `scores` above Q3 + 1.5 IQR (the reference's `outlier_dectection`), at least 1 / n."""
    values = scores.double()
    q1, q3 = torch.quantile(values, 0.25), torch.quantile(values, 0.75)
    count = int((values > q3 + 1.5 * (q3 - q1)).sum())
    return max(count, 1) / values.numel()


def descending(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, highest first (ties: lower index first)."""
    return torch.argsort(scores, descending=True, stable=True)[:count]


@register_method("prumerge_plus", family="prune", sites=("vision", "embeds"))
class PruMergePlus(PruMerge):
    """PruMerge, with spatially uniform samples added to the [CLS]-attention outliers.

    PruMerge+ (the same paper; reference `CLIPVisionTower.token_prune_merge_advanced_plus`, its
    inference branch): after the `int(n * r)` outliers, every s-th patch, s = int(int(1 / r) / 3),
    patches 0, s, 2s, ... < n - 1, that is not already kept joins them (about four times the
    outliers); the row enters as the outliers in decreasing attention, the added patches in patch
    order, then the extra token. A `keep` share or `tokens` count (not in the reference): a quarter of
    the row's tokens, rounded up, are the top patches, the others but one evenly strided over the
    rest (every `max(1, remaining // needed)`-th, the first `needed`), the last the extra token.
    Deviations: as PruMerge's; the sampling step is at least 1 (the reference's `arange` fails with
    step 0 when more than a third of the patches are outliers).
    """

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
