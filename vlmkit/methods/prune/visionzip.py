"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025,
arXiv:2412.04467). Reference: dvlab-research/VisionZip, `visionzip/clip_encoder.py`,
`CLIPVisionTower_VisionZip.forward`.

Site: `vision` (scores and features from the vision tower), applied before the LLM. For each image,
at the vision layer the LLM reads (LLaVA: the second to last):

- dominant tokens: the `dominant` patches with the highest attention from [CLS],
  a_j = sum_h softmax_j(q_h(CLS) . k_h(j) / sqrt(d)); towers without [CLS] (SigLIP, Qwen2-VL) use the
  mean attention each patch receives;
- contextual tokens: of the remaining patches, `contextual` evenly strided ones become targets
  (every `max(1, remaining // contextual)`-th, in patch order); every other remaining patch joins the
  target whose head-mean key is most similar (cosine), and each target becomes

      c_t = x_t + 1/|J_t| sum_{j in J_t} x_j        (c_t = x_t when nothing joins it),

  computed on the vision features the projector reads, then projected.

The image enters the LLM as its dominant tokens in patch order followed by its contextual tokens in
patch order (54 + 10 = 64 of 576 in the paper), as the reference concatenates them. Scores come from
the one attention row needed ([CLS]) or the column sums, computed from the layer's input with the
kernels in `vlmkit.kernels`: the tower is never switched to eager attention.

Deviations from the reference, and why:
- Hugging Face LLaVA drops [CLS] before the projector, so the kept set is `dominant` patches (the
  reference keeps [CLS] plus the dominant patches);
- where the projector does not map one vision feature to one token (Qwen2-VL's 2x2 merger) or pools
  after projecting (LLaVA-OneVision's videos), the contextual sum is taken on the LLM's input instead;
- the sum is accumulated in float32 (the reference: the model's dtype);
- positions="auto" re-indexes on 1-D RoPE models (the kept tokens form a new sequence, as in the
  reference, where pruning happens before the positions exist) and keeps the 3-D ids under M-RoPE.
A budget given as `keep` / `tokens` is split dominant : contextual as 54 : 10; an image that keeps
all its tokens enters unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, top_k_sorted
from vlmkit.registry import register_method

DEFAULT_KEEP = 64 / 576
CONTEXTUAL_SHARE = 10 / 64


@dataclass(frozen=True)
class VisionZipConfig(TokenBudgetConfig):
    dominant: int | None = field(default=None, metadata={"help": "dominant tokens per image (with contextual, instead of keep/tokens)"})
    contextual: int | None = field(default=None, metadata={"help": "contextual (merged) tokens per image"})
    vision_layer: int | None = field(default=None, metadata={"help": "vision layer to score at (default: the layer the LLM reads)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        explicit = (self.dominant is not None) or (self.contextual is not None)
        if explicit and (self.keep is not None or self.tokens is not None):
            raise ConfigError("visionzip: give dominant/contextual counts or a keep/tokens budget, not both")
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ConfigError(f"visionzip: {name}={value!r} must be an integer >= 0")
        if explicit and (self.dominant or 0) + (self.contextual or 0) < 1:
            raise ConfigError("visionzip: dominant + contextual must keep at least one token")


@register_method("visionzip", family="prune", sites=("vision", "embeds"))
class VisionZip(TokenSelector):
    """Keep the most attended patches and merge the rest into a few contextual tokens, per image."""

    Config = VisionZipConfig
    example = "tokens=20"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2412.04467"
    needs = frozenset({"vision_attention", "vision_features"})

    def vision_layer(self, adapter) -> int:
        return adapter.default_vision_layer() if self.config.vision_layer is None else self.config.vision_layer

    def counts(self, available: int) -> tuple[int, int]:
        """(dominant, contextual) for an image of `available` tokens."""
        if self.config.dominant is not None or self.config.contextual is not None:
            dominant = min(self.config.dominant or 0, available)
            return dominant, min(self.config.contextual or 0, available - dominant)
        total = self.config.kept_count(available, DEFAULT_KEEP)
        contextual = min(round(total * CONTEXTUAL_SHARE), total - 1)
        return total - contextual, contextual

    def select(self, context: SelectionContext) -> Selection:
        return Selection([self.select_sample(visual, probes) for visual, probes in zip(context.visual, context.vision)])

    def select_sample(self, visual, probes) -> SampleSelection:
        """Every image of one sample: its dominant then its contextual tokens, contextual sums as `combine`."""
        device = visual.slots.device
        output, merges = [], []  # output: sample indices in entry order; merges: (target, joiners) per target
        for image, probe in enumerate(probes):
            members = visual.image_index(image)
            dominant, targets, joined = self.select_image(probe["importance"], probe["keys"])
            output += [members[dominant], members[targets]]
            merges += [(members[t], members[joined == i]) for i, t in enumerate(targets.tolist())]
        output = torch.cat(output)
        keep = torch.sort(output).values
        order = torch.searchsorted(keep, output)
        if not any(joiners.numel() for _, joiners in merges):
            return SampleSelection(keep, order=order)
        combine = torch.zeros(keep.numel(), len(visual), device=device)
        combine[torch.arange(keep.numel(), device=device), keep] = 1.0
        for target, joiners in merges:
            combine[torch.searchsorted(keep, target), joiners] = 1.0 / max(1, joiners.numel())
        space = "vision" if all(p is not None and "features" in p for p in probes) else "llm"
        return SampleSelection(keep, combine=combine, combine_space=space, order=order)

    def select_image(self, importance: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image: (dominant indices in patch order, contextual targets in patch order, and for every
        patch the position in `targets` of the target it joins, -1 for dominant patches and targets)."""
        available = importance.numel()
        dominant_count, contextual_count = self.counts(available)
        if dominant_count + contextual_count >= available:  # nothing dropped or merged: the image as it is
            dominant_count, contextual_count = available, 0
        dominant = top_k_sorted(importance, dominant_count)
        is_dominant = torch.zeros(available, dtype=torch.bool, device=importance.device)
        is_dominant[dominant] = True
        rest = torch.nonzero(~is_dominant).flatten()
        joined = torch.full((available,), -1, dtype=torch.long, device=importance.device)
        if contextual_count == 0 or rest.numel() == 0:
            return dominant, rest[:0], joined
        step = max(1, rest.numel() // contextual_count)
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:contextual_count]] = True
        targets, joiners = rest[is_target], rest[~is_target]
        if joiners.numel():
            normalized = F.normalize(keys.float(), dim=-1)
            joined[joiners] = (normalized[joiners] @ normalized[targets].T).argmax(dim=1)
        return dominant, targets, joined
