"""LOOK-M: "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference" (Wan, Wu, Wang, Yang, Zhao, Wong, Fang, Zhang; Findings of EMNLP 2024, arXiv:2406.18139).

Reference: SUSTechBruce/LOOK-M @ecf0f51, `LLaVA-mix_merge_v1/llava/model/kv_token_merge/
modify_llama.py`: `TextPivotMerge_LayerWise` (the default of `scripts/text-prior-pivot-merge_eval.sh`,
KV_MODE=text_prior_pivot_merge, HH_R = RECENT_R = 0.1), `TextAVGMergeKVCache_LayerWise`,
`TextWeightedMerge_LayerWise`, the text-prior H2O without merging, and `H2OLlamaAttention_drop.forward`
which calls them.

Site: `cache`. The prefill runs on the whole prompt (its logits are the dense model's); then, in
every decoder layer, the cache kept for decoding is compressed per KV head. With L the prompt's
length in that layer's cache, hh = int(L `heavy`), r = int(L `recent`) (nothing happens when
L <= hh + r), and per head h the accumulated attention (H2O)

    A_h[j] = sum over valid queries i, and over the query heads of KV head h, of softmax_j(q_i . k_j / sqrt(d)),

- text prior: visual tokens (every image and video token of the prompt) rank below every text
  token (the reference adds -65516 to their scores); the last r tokens are kept;
- of the others, head h keeps the hh of the highest prior-ranked score and every text token: the
  top max(T, hh) of the ranking, T the text tokens outside the recent window. Every head of a
  layer keeps the same count; text is never evicted, visual tokens outside the top hh are;
- merge = "pivot" (default): each evicted entry e finds its pivot p(e) = argmax_j cos(k_e, k_j) over
  the head's kept keys; with m_e = (x_e + x_p(e)) / 2 (x a key, and a value with the keys' pivot),
  a kept entry becomes the mean of itself and the m_e merged into it:

      x_j <- (x_j + sum_{p(e) = j} m_e) / (1 + n_j),   n_j = |{e : p(e) = j}|;

- merge = "weighted": only the evicted entries of a high similarity merge, s_e = max_j cos(k_e,
  k_j) >= mean s: x_j <- (x_j + sum s_e x_e) / (1 + n_j); merge = "average": the same without the
  weights s_e; merge = "none": text-prior eviction only.

Keys are merged after RoPE, and a merged entry keeps the place of its kept token: later tokens keep
their positions. The engine applies the edit per head (`vlmkit.engine.contexts.HeadEdit`) and
computes the scores with one extra query-key pass per layer, under any attention implementation.

With `decode=True`, also after each decoding step while a layer's cache holds more than the budget
the prefill set (the kept count, or hh + r where the prefill evicted nothing), the entries of the
lowest accumulated score leave the same way (prior ranking, the last r kept, merged as above); the
reference compresses at the prefill only, which is the default.

Deviations from the reference, and why:
- per sample, per layer and per KV head on any family: the reference hard-codes 576 tokens per image
  and head_dim 128, batch size 1 and multi-head attention; the visual tokens are the engine's
  (structural tokens such as image newlines count as text), padding never counts;
- grouped-query attention: a KV head's score is the sum of its query heads' scores (the reference
  assumes one query head per KV head);
- no eager attention: the scores are computed by the engine (the reference reads the eager
  attention weights);
- "average": the reference scatters the first F evicted entries (F the number that pass the
  similarity filter) into the pivots of the F filtered entries (`src=k_hh_pruned` next to the
  filtered index); here each filtered entry is averaged into its own pivot, which is what the
  class computes for the weighted variant and what its name says. The filter itself is the
  reference's: per place in each head's list of evicted entries (in sequence order), the mean over
  heads of s compared with the mean over all;
- ties in the ranking go to the earlier token (a stable sort; `topk` leaves them unspecified), the
  rank of text over visual tokens does not depend on the size of the scores (the reference's
  offset of -65516 does), ties in the pivot to the first kept entry; merges in float32;
- with `decode=True`, a kept entry keeps its own accumulated score after absorbing others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.engine.contexts import CacheContext, HeadEdit
from vlmkit.errors import ConfigError
from vlmkit.methods.base import CacheMethod, MethodConfig
from vlmkit.registry import register_method

MERGES = ("pivot", "average", "weighted", "none")


@dataclass(frozen=True)
class LookMConfig(MethodConfig):
    heavy: float = field(default=0.1, metadata={"help": "hh: share of the prompt's length kept as heavy hitters (HH_R), in [0, 1]"})
    recent: float = field(default=0.1, metadata={"help": "r: share of the prompt's length kept as the recent window (RECENT_R), in [0, 1]"})
    merge: str = field(default="pivot", metadata={"help": "how evicted entries merge into kept ones: 'pivot', 'average', 'weighted' or 'none'"})
    decode: bool = field(default=False, metadata={"help": "also evict and merge after each decoding step over the prefill's budget (the reference: prefill only)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, meaning in (("heavy", "the heavy-hitter share"), ("recent", "the recent-window share")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"lookm: {name}={value!r} is out of range: {meaning} must be a number in [0, 1]")
        if self.merge not in MERGES:
            raise ConfigError(f"lookm: merge={self.merge!r} is not one of {', '.join(MERGES)}")
        if not isinstance(self.decode, bool):
            raise ConfigError(f"lookm: decode={self.decode!r} must be True or False")


def text_prior_keep(scores: torch.Tensor, visual: torch.Tensor, count: int, recent: int) -> torch.Tensor:
    """(H, n) bool, per head, the entries kept: the last `recent`, and of the others the `count` first
    in the text-prior ranking (text before visual, then by decreasing score, ties to the earlier).

    Args:
        scores: (H, n) accumulated attention of each entry, per head.
        visual: (H, n) bool, the entries that hold a visual token.
    """
    heads, length = scores.shape
    older = length - recent
    keep = torch.zeros(heads, length, dtype=torch.bool, device=scores.device)
    keep[:, older:] = True
    if count > 0 and older > 0:
        order = torch.argsort(scores[:, :older].float(), dim=1, descending=True, stable=True)
        order = order.gather(1, torch.argsort(visual[:, :older].gather(1, order).long(), dim=1, stable=True))
        keep.scatter_(1, order[:, :count], True)
    return keep


def merge_weights(keys: torch.Tensor, keep: torch.Tensor, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, where each entry goes and with which weight (a `HeadEdit`'s target and weight).

    Args:
        keys: (H, n, d) the entries' keys (rotated).
        keep: (H, n) bool, the kept entries (the same count per head).
        merge: one of `MERGES`.

    Returns:
        target: (H, n) long, a kept entry's own index, an evicted entry's pivot, or -1 (dropped);
        weight: (H, n) float32, each entry's coefficient in its target.
    """
    heads, length = keep.shape
    device = keys.device
    target = torch.arange(length, device=device).expand(heads, length).masked_fill(~keep, -1)
    weight = keep.float()
    kept_count = int(keep[0].sum()) if heads else 0
    if merge == "none" or kept_count == length or kept_count == 0:
        return target, weight
    position = torch.arange(length, device=device).expand(heads, length)
    kept = position[keep].view(heads, -1)
    evicted = position[~keep].view(heads, -1)
    width = keys.shape[-1]
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    similarity = unit.gather(1, evicted[..., None].expand(-1, -1, width)) @ unit.gather(1, kept[..., None].expand(-1, -1, width)).transpose(1, 2)
    pivot = similarity.argmax(dim=-1)  # (H, m): first kept entry on ties
    best = similarity.gather(2, pivot[..., None])[..., 0]
    pivot = kept.gather(1, pivot)
    if merge == "pivot":
        used, coefficient = torch.ones_like(best, dtype=torch.bool), torch.full_like(best, 0.5)
    else:
        used = (best.mean(dim=0) >= best.mean())[None, :].expand_as(best)
        coefficient = torch.ones_like(best) if merge == "average" else best
    merged = torch.zeros(heads, length, device=device).scatter_add(1, pivot, used.float())
    own = (1 + 0.5 * merged) / (1 + merged) if merge == "pivot" else 1 / (1 + merged)
    weight = torch.where(keep, own, weight)
    target = target.scatter(1, evicted, torch.where(used, pivot, -1))
    weight = weight.scatter(1, evicted, torch.where(used, coefficient / (1 + merged.gather(1, pivot)), 0.0))
    return target, weight


@register_method("lookm", family="video", sites=("cache",))
class LookM(CacheMethod):
    """Evict visual KV entries by accumulated attention behind text, and merge each into its most similar kept key."""

    Config = LookMConfig
    example = "heavy=0.1,recent=0.1,decode=True"
    neutral = "heavy=1.0"
    paper = "https://arxiv.org/abs/2406.18139"
    cache_needs = frozenset({"head_attention"})
    per_head = True
    unsupported = {
        "gemma3": "its sliding-window layers see and keep only the keys of recent positions, and each image's tokens attend "
                  "to each other both ways; LOOK-M's per-head merged entries carry neither a single position nor that "
                  "structure into a recomputation",
    }

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._budgets: dict[tuple[int, int], tuple[int, int]] = {}
        self._held: list = []

    @property
    def edits_while_decoding(self) -> bool:
        return self.config.decode

    def edit_cache(self, context: CacheContext) -> dict[int, HeadEdit] | None:
        """After the prefill (and, with `decode`, each decoding step): each layer's per-head edit."""
        if context.visual is None or context.head_attention is None:
            return None
        if context.prefill:
            # budgets are per prefill row, named by the row's visual tokens (they follow beam reorders)
            self._budgets, self._held = {}, list(context.visual)
        elif not self.config.decode or not self._budgets:
            return None
        edits = {}
        for index, scores in enumerate(context.head_attention):
            if scores is not None:
                edit = self._edit_layer(context, index, scores)
                if edit is not None:
                    edits[index] = edit
        return edits or None

    def _edit_layer(self, context: CacheContext, index: int, scores: torch.Tensor) -> HeadEdit | None:
        keys, valid, slots = context.keys[index], context.valid[index], context.head_slots[index]
        batch, heads, length = slots.shape
        keep = valid[:, None, :].expand(batch, heads, length).clone()
        target = torch.arange(length, device=valid.device).expand(batch, heads, length).masked_fill(~keep, -1)
        weight = keep.float()
        acted = False
        for row, visual in enumerate(context.visual):
            present = torch.nonzero(valid[row]).flatten()
            count = int(present.numel())
            key = (id(visual), index)
            if context.prefill:
                heavy, recent = int(count * self.config.heavy), int(count * self.config.recent)
                if count <= heavy + recent:
                    self._budgets[key] = (heavy + recent, recent)
                    continue
            elif key not in self._budgets or count <= self._budgets[key][0]:
                continue
            row_slots = slots[row][:, present]
            is_visual = torch.isin(row_slots, visual.slots.to(row_slots.device))
            if context.prefill:
                text = int((~is_visual[0, : count - recent]).sum())
                kept = max(text, heavy)
                self._budgets[key] = (kept + recent, recent)
            else:
                budget, recent = self._budgets[key]
                recent = min(recent, budget)
                kept = budget - recent
            row_keep = text_prior_keep(scores[row][:, present], is_visual, kept, recent)
            if bool(row_keep.all()):
                continue
            acted = True
            keep[row][:, present] = row_keep
            row_target, row_weight = merge_weights(keys[row][:, present], row_keep, self.config.merge)
            target[row][:, present] = torch.where(row_target >= 0, present[row_target.clamp(min=0)], -1)
            weight[row][:, present] = row_weight
        if not acted:
            return None
        if self.config.merge == "none":
            return HeadEdit(keep)
        return HeadEdit(keep, target, weight)
