"""ICD: "Mitigating Hallucinations in Large Vision-Language Models with Instruction Contrastive
Decoding" (Wang et al., Findings of ACL 2024, arXiv:2403.18715; code p1k0pan/ICD).

Site: `logits`. One extra branch keeps the image but reads a *disturbance instruction* that makes
the model uncertain about what it sees; each step decodes from

    p_icd(y | v, x) = softmax[(1 + alpha) logit(y | v, x) - alpha logit(y | v, x_d)],

restricted to the plausible set {y : p(y | v, x) >= beta max_w p(w | v, x)}. Defaults are the
paper's scripts: alpha = 1, beta = 0.1, instruction "You are a confused objects detector to provide
a fuzzy overview or impression of the image."

Deviations from the reference code, and why:
- the reference *replaces the system prompt* of LLaVA's conversation template with the instruction;
  Hugging Face chat templates differ per family (LLaVA-1.5's has no system prompt), so vlmkit
  inserts the instruction at the start of each prompt (after BOS), where a system prompt sits;
- it works under greedy and beam search too, and for batches (prompts are re-padded on the left);
- the instruction is tokenized with the tokenizer passed as `generate(..., tokenizer=...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.decode.base import BranchConfig, DecodeMethod, check_range, contrast, plausible_tokens
from vlmkit.methods.decode.prompts import DISTURBANCE, instruction_branch
from vlmkit.registry import register_method

@dataclass(frozen=True)
class ICDConfig(BranchConfig):
    alpha: float = field(default=1.0, metadata={"help": "contrast strength alpha >= 0 (0: plain decoding)"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility threshold beta in (0, 1]"})
    instruction: str = field(default=DISTURBANCE, metadata={"help": "the disturbance instruction of the negative branch"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("icd", "alpha", self.alpha, 0.0)
        check_range("icd", "beta", self.beta, 0.0, 1.0, low_open=True)
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ConfigError(f"icd: instruction={self.instruction!r} must be a non-empty string")


@register_method("icd", family="decode", sites="logits")
class ICD(DecodeMethod):
    """Contrast against the same image read under a disturbance instruction."""

    Config = ICDConfig
    example = ""
    neutral = "alpha=0"
    paper = "https://arxiv.org/abs/2403.18715"

    def branches(self, call):
        return [instruction_branch(call, self.config.instruction, self.name)]

    def branch_vocabulary(self, scores: torch.Tensor) -> torch.Tensor:
        return plausible_tokens(scores, self.config.beta, active=self.config.alpha > 0)

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        return contrast(scores, step.branch_logits[0], self.config.alpha, self.config.beta)
