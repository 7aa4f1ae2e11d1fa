"""CDPruner: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (Zhang et al., NeurIPS 2025, arXiv:2506.10967).

Site: `embeds` (the projector's output, before the LLM). The kept set is the greedy MAP of a
conditional determinantal point process over the visual tokens x_i, with kernel

    L = diag(r) S diag(r),   S_ij = cos(x_i, x_j),
    r_i = (m_i - min m + 1e-6) / (max m - min m),   m_i = 1/M sum_t cos(x_i, t_t),

(r_i -> exp(alpha r_i), alpha = theta / (2 (1 - theta)), when `theta` is given). Greedy MAP with the
incremental Cholesky update: d_i = L_ii; at each step pick j = argmax d, then
e = (L_j - sum_{s<step} c_s[j] c_s) / sqrt(d_j), append e to the c's, d <- d - e^2, d_j <- -inf.
Each tower row (an image; an AnyRes crop; a video frame) keeps its own count; r is normalised over
all of the sample's visual tokens.

Follows Theia-4869/CDPruner `llava/model/llava_arch.py:LlavaMetaForCausalLM.encode_images` (kernel,
relevance normalisation, fast greedy MAP, `visual_token_num` picks per tower row, then sorted) and
`llava/model/multimodal_encoder/clip_encoder.py` (text side).

Deviations from the reference code, and why:
- relevance: the reference compares CLIP's projected patch embeddings (post-layernorm and
  `visual_projection` of the features the projector reads) with CLIP text-tower embeddings of the
  question. Hugging Face VLMs carry no text tower, so here t_t are the instruction's token
  embeddings and x_i the visual tokens, both as they enter the LLM (context.hidden at layer 0). The
  instruction is the sample's text tokens after its last visual token (`instruction="after"`: the
  question and the chat template's tail; what precedes the image is mostly the system prompt), or
  all its text tokens (`instruction="all"`); without text, r = 1 (plain DPP on similarity);
- sign: the reference negates the similarity (m_i = -mean cos), a property its authors observed
  for CLIP features only (CDPruner issues #9, #14); in the LLM's input space the relevance keeps its
  sign unless `negate_relevance=True`;
- the normalisation spans one sample (the reference's whole batch, which is one sample with its
  crops); when all m_i are equal (the reference divides by zero), r = 1;
- when the largest remaining d is not positive (the kernel's rank is exhausted; the reference then
  propagates NaN and so takes the untaken tokens in index order), the remaining picks are the untaken
  tokens in index order, explicitly;
- the reference takes a count per tower row (64; LLaVA-NeXT 32 x 5); a share rounds halves up,
  counted over the tokens of a crop left after AnyRes unpadding.
Default budget: 64 of 576 tokens, the paper's headline setting.
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
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector
from vlmkit.methods.prune._grid import tower_rows
from vlmkit.registry import register_method

DEFAULT_KEEP = 64 / 576
INSTRUCTIONS = ("after", "all")


@dataclass(frozen=True)
class CDPrunerConfig(TokenBudgetConfig):
    theta: float | None = field(
        default=None,
        metadata={"help": "relevance weight in (0, 1): r -> exp(theta / (2 (1 - theta)) r); None uses r (the reference's default)"},
    )
    instruction: str = field(
        default="after",
        metadata={"help": "text tokens the relevance compares with: 'after' the last visual token, or 'all'"},
    )
    negate_relevance: bool = field(
        default=False, metadata={"help": "negate the text similarity, as the reference does for CLIP features"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None and (
            isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0.0 < self.theta < 1.0
        ):
            raise ConfigError(f"cdpruner: theta={self.theta!r} must be a number in (0, 1), or None for no weighting")
        if self.instruction not in INSTRUCTIONS:
            raise ConfigError(f"cdpruner: instruction={self.instruction!r} is not one of {', '.join(INSTRUCTIONS)}")
        if not isinstance(self.negate_relevance, bool):
            raise TypeError(f"cdpruner: negate_relevance must be True or False, got {self.negate_relevance!r}")


@register_method("cdpruner", family="prune", sites="embeds")
class CDPruner(TokenSelector):
    """Keep the visual tokens a conditional DPP finds most diverse and relevant to the instruction."""

    Config = CDPrunerConfig
    example = "keep=0.2"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2506.10967"

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for row, visual in enumerate(context.visual):
            if len(visual) == 0:
                samples.append(SampleSelection(visual.slots.new_zeros(0)))
                continue
            features = context.hidden[row, visual.slots].float()
            relevance = self.relevance(features, context.hidden[row, self.text_slots(context, row, visual)].float())
            kept = []
            for unit in tower_rows(visual):
                count = self.config.kept_count(unit.numel(), DEFAULT_KEEP)
                if count == unit.numel():
                    kept.append(unit)
                    continue
                normalized = F.normalize(features[unit], dim=-1)
                kernel = relevance[unit, None] * (normalized @ normalized.T) * relevance[None, unit]
                kept.append(unit[dpp_greedy(kernel, count)])
            samples.append(SampleSelection(torch.sort(torch.cat(kept)).values))
        return Selection(samples)

    def text_slots(self, context: SelectionContext, row: int, visual: VisualTokens) -> torch.Tensor:
        """Slots of the sample's instruction tokens: valid, not visual (and after its last visual token)."""
        text = torch.ones(context.hidden.shape[1], dtype=torch.bool, device=context.hidden.device)
        if context.valid is not None:
            text &= context.valid[row].to(text.device)
        text[visual.slots] = False
        for start, count in visual.spans:  # structural tokens (image newlines) are not text either
            text[start : start + count] = False
        if self.config.instruction == "after":
            after = text.clone()
            after[: int(visual.slots.max()) + 1] = False
            if after.any():
                text = after
        return torch.nonzero(text).flatten()

    def relevance(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """r: each visual token's mean cosine similarity to the text tokens, min-max normalised."""
        if text.shape[0] == 0:
            return torch.ones(features.shape[0], dtype=features.dtype, device=features.device)
        similarity = F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
        mean = similarity.mean(dim=1)
        if self.config.negate_relevance:
            mean = -mean
        spread = mean.max() - mean.min()
        if not bool(spread > 0):
            return torch.ones_like(mean)
        relevance = (mean - mean.min() + 1e-6) / spread
        if self.config.theta is not None:
            relevance = torch.exp(self.config.theta / (2 * (1 - self.config.theta)) * relevance)
        return relevance


def dpp_greedy(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel `kernel` (n x n, PSD): `count` sorted indices.

    Incremental Cholesky (fast greedy MAP): d holds each candidate's conditional gain; ties pick the
    lower index (argmax's first maximum). Once no candidate has a positive gain, the untaken indices
    follow in index order.
    """
    n = kernel.shape[0]
    factors = kernel.new_zeros(count, n)
    gains = torch.diagonal(kernel).clone()
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picks = []
    for step in range(count):
        best = int(torch.argmax(gains))
        if not bool(gains[best] > 0):
            picks.extend(torch.nonzero(~taken).flatten()[: count - step].tolist())
            break
        picks.append(best)
        taken[best] = True
        update = (kernel[best] - factors[:step, best] @ factors[:step]) / torch.sqrt(gains[best])
        factors[step] = update
        gains -= update * update
        gains[best] = float("-inf")
    return torch.sort(torch.tensor(picks, dtype=torch.long, device=kernel.device)).values
