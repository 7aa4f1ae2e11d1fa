"""FasterVLM: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (Zhang et al., 2024, arXiv:2412.01818; the later version is VisPruner, ICCV 2025).

Site: `vision` (scores from the vision tower), applied before the LLM. Each visual token is scored
by the attention [CLS] pays it at the vision layer the projector reads (LLaVA: the second to last),
averaged over heads,

    a_j = 1/H sum_h softmax_j(q_h(CLS) . k_h(j) / sqrt(d)),

and the `keep` share of each tower row (an image; an AnyRes crop; a video frame) with the highest
a_j enters the LLM, in patch order. Towers without [CLS] (SigLIP in LLaVA-OneVision, Qwen2-VL) have
no such row: there the score is the mean attention each patch receives (over queries and heads),
which is what `vision_attention` gives for them (Qwen2-VL: summed over the 2x2 patches of a token).

Follows Theia-4869/FasterVLM: `llava/model/multimodal_encoder/clip_encoder.py:feature_select`
(`attentions[select_layer][:, :, 0, 1:]`) and `llava/model/llava_arch.py:encode_images`
(head mean, `topk` of the kept count per tower row, an index mask so the order is kept; AnyRes
image newlines are always kept). The `video` branch likewise keeps a count per frame.

Deviations from the reference code, and why:
- the scores are computed from the layer's input with `vlmkit.kernels` (one attention row), so the
  tower never runs eager attention (the reference asks the tower for all attention maps);
- AnyRes (LLaVA-NeXT / OneVision): the budget applies to the tokens of a crop that survive the
  model's unpadding (the reference takes its top-k over the whole crop, then unpads, so a crop may
  keep fewer than k); a `tokens` count is per crop, as the reference's count (29 x 5 = 145);
- the reference takes a kept count (the README derives 58 = 576 x 10% and 29 = 576 x 5% by
  rounding to the nearest); a share rounds halves up here; ties keep the lower index first (torch
  `topk` leaves them unspecified).
Default budget: the paper's 90% reduction (58 of 576 tokens).
"""
from __future__ import annotations

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

DEFAULT_KEEP = 0.1  # 90% reduction: 58 of 576 tokens


@dataclass(frozen=True)
class FasterVLMConfig(TokenBudgetConfig):
    vision_layer: int | None = field(default=None, metadata={"help": "vision layer to score at (default: the layer the LLM reads)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)):
            raise ConfigError(f"fastervlm: vision_layer={self.vision_layer!r} must be an integer layer index")


@register_method("fastervlm", family="prune", sites=("vision", "embeds"))
class FasterVLM(TokenSelector):
    """Keep the patches [CLS] attends to most, per image / crop / frame, in patch order."""

    Config = FasterVLMConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2412.01818"
    needs = frozenset({"vision_attention"})

    def vision_layer(self, adapter) -> int:
        return adapter.default_vision_layer() if self.config.vision_layer is None else self.config.vision_layer

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for visual, probes in zip(context.visual, context.vision):
            importance = _importance(visual, probes)
            kept = []
            for unit in tower_rows(visual):
                count = self.config.kept_count(unit.numel(), DEFAULT_KEEP)
                kept.append(unit[top_k_sorted(importance[unit], count)])
            keep = torch.sort(torch.cat(kept)).values if kept else visual.slots.new_zeros(0)
            samples.append(SampleSelection(keep))
        return Selection(samples)


def _importance(visual: VisualTokens, probes: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The probe's per-token score for each of the sample's visual tokens (sequence order)."""
    importance = torch.zeros(len(visual), dtype=torch.float32, device=visual.slots.device)
    for image, probe in enumerate(probes):
        importance[visual.image_index(image)] = probe["importance"].float().to(importance.device)
    return importance
