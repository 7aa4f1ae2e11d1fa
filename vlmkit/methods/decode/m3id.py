"""M3ID: "Multi-Modal Hallucination Control by Visual Information Grounding" (Favero et al., CVPR 2024,
arXiv:2403.14003). No official code; the reference is RITUAL's `use_m3id` branch (sangminwoo/RITUAL).

Site: `logits`. One extra branch reads the prompt without the image. As generation proceeds the
model forgets the image, so the contrast grows with the number t of tokens generated so far:

    l_m3id = l(y | v, x) + (1 - gamma_t) / gamma_t * (l(y | v, x) - l(y | x)),   gamma_t = exp(-lambda t),

restricted to the plausible set {y : p(y | v, x) >= beta max_w p(w | v, x)}. Defaults: lambda = 0.02
(the reference), beta = 0.1.

Deviations from the reference code, and why:
- none in the formula: as in the reference, the plausibility mask applies from the first step
  (at t = 0 the weight is 0, so the step is plain decoding restricted to the plausible set, which
  truncates sampling and leaves greedy answers, e.g. POPE's one-token ones, as they are); only
  `decay=0` (no contrast at any step) skips the mask, so that it is exactly plain decoding;
- the no-image branch drops every image/video placeholder token and visual input from the prompt
  (the reference passes no image to a LLaVA fork);
- it works under greedy and beam search, and for batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmkit.methods.decode.base import BranchConfig, DecodeMethod, check_range, plausibility_cutoff, plausible_tokens
from vlmkit.registry import register_method


@dataclass(frozen=True)
class M3IDConfig(BranchConfig):
    decay: float = field(default=0.02, metadata={"help": "lambda >= 0 of gamma_t = exp(-lambda t) (0: plain decoding)"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility threshold beta in (0, 1]"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("m3id", "decay", self.decay, 0.0)
        check_range("m3id", "beta", self.beta, 0.0, 1.0, low_open=True)


@register_method("m3id", family="decode", sites="logits")
class M3ID(DecodeMethod):
    """Contrast against the prompt without the image, more strongly as generation goes on."""

    Config = M3IDConfig
    example = "decay=0.5"
    neutral = "decay=0"
    paper = "https://arxiv.org/abs/2403.14003"

    def branches(self, call):
        return [call.without_visual()]

    def weight(self, index: int) -> float:
        """(1 - gamma_t) / gamma_t at step t = `index`."""
        return math.expm1(self.config.decay * index)  # 1 / exp(-lambda t) - 1

    def branch_vocabulary(self, scores: torch.Tensor) -> torch.Tensor:
        return plausible_tokens(scores, self.config.beta, active=self.config.decay > 0)

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        if self.config.decay == 0:
            return scores.clone()
        weight = self.weight(step.index)
        combined = scores.clone() if weight == 0 else scores + weight * (scores - step.branch_logits[0])
        return combined.masked_fill(plausibility_cutoff(scores, self.config.beta), -math.inf)
