"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025,
arXiv:2412.04467).

Site: `vision` (scores from the vision tower), applied before the LLM. For each image, at the
vision layer the LLM reads (LLaVA: the second to last):

- dominant tokens: the `dominant` patches with the highest attention from [CLS], averaged over
  heads, a_j = 1/H sum_h softmax_j(q_h(CLS) . k_h(j) / sqrt(d)); towers without [CLS] (SigLIP,
  Qwen2-VL) use the mean attention each patch receives, a_j = 1/(H N) sum_h sum_i softmax_j(q_h(i) . k_h(j) / sqrt(d));
- contextual tokens: of the remaining patches, `contextual` evenly strided ones become targets; every
  other remaining patch joins the target whose head-mean key is most similar (cosine), and each
  target becomes the mean of itself and the patches that joined it.

The image then enters the LLM as dominant + contextual tokens (54 + 10 = 64 of 576 in the paper).
Scores come from the one attention row needed ([CLS]) or the column sums, computed from the layer's
input with the kernels in `vlmkit.kernels`: the tower is never switched to eager attention.

Deviations from the reference code (dvlab-research/VisionZip), and why:
- Hugging Face LLaVA drops [CLS] before the projector, so the kept set is `dominant` patches (the
  reference keeps [CLS] plus dominant - 1 patches);
- the contextual average is taken in the LLM's input space (after the projector) by the engine,
  so one code path serves every family (AnyRes crops, Qwen2-VL's 2x2 patch merger); the reference
  averages vision features before the projector;
- positions="auto" re-indexes on 1-D RoPE models (the kept tokens form a shorter sequence, as in
  the reference, where pruning happens before the positions exist) and keeps the 3-D ids under M-RoPE.
A budget given as `keep` / `tokens` is split dominant : contextual as 54 : 10.
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
    needs = frozenset({"vision_attention"})

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
        samples = []
        for visual, probes in zip(context.visual, context.vision):
            keep_parts, target_parts = [], []
            for image, probe in enumerate(probes):
                members = visual.image_index(image)
                keep, target = self.select_image(probe["importance"], probe["keys"])
                keep_parts.append(members[keep])
                target_parts.append(target + sum(part.numel() for part in keep_parts[:-1]))
            samples.append(SampleSelection(torch.cat(keep_parts), merge_target=torch.cat(target_parts)))
        return Selection(samples)

    def select_image(self, importance: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: (kept indices, merge target of every token as a position in the kept list)."""
        available = importance.numel()
        dominant_count, contextual_count = self.counts(available)
        dominant = top_k_sorted(importance, dominant_count)
        is_dominant = torch.zeros(available, dtype=torch.bool, device=importance.device)
        is_dominant[dominant] = True
        rest = torch.nonzero(~is_dominant).flatten()
        if contextual_count == 0 or rest.numel() == 0:
            return dominant, _own_positions(dominant, available)
        step = max(1, rest.numel() // contextual_count)
        targets = rest[torch.arange(0, rest.numel(), step, device=rest.device)[:contextual_count]]
        keep = torch.sort(torch.cat([dominant, targets])).values
        assignment = torch.full((available,), -1, dtype=torch.long, device=importance.device)
        assignment[keep] = torch.arange(keep.numel(), device=keep.device)
        normalized = F.normalize(keys.float(), dim=-1)
        joiners = rest[assignment[rest] < 0]
        if joiners.numel():
            similarity = normalized[joiners] @ normalized[targets].T
            assignment[joiners] = assignment[targets[similarity.argmax(dim=1)]]
        return keep, assignment


def _own_positions(keep: torch.Tensor, available: int) -> torch.Tensor:
    """Merge targets when nothing merges: each kept token maps to itself, the rest are dropped."""
    target = torch.full((available,), -1, dtype=torch.long, device=keep.device)
    target[keep] = torch.arange(keep.numel(), device=keep.device)
    return target
