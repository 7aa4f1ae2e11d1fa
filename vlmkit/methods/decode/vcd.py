"""VCD: "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive
Decoding" (Leng et al., CVPR 2024, arXiv:2311.16922; code DAMO-NLP-SG/VCD).

Site: `logits`. One extra branch sees the image distorted by forward diffusion, v' ~ q(x_t | v) at
`noise_step` t of a 1000-step sigmoid beta schedule; each step decodes from

    p_vcd(y | v, v', x) = softmax[(1 + alpha) logit(y | v, x) - alpha logit(y | v', x)],

restricted to the plausible set {y : p(y | v, x) >= beta max_w p(w | v, x)} (the others get -inf).
Defaults are the paper's scripts: alpha = 1, beta = 0.1, t = 500.

Deviations from the reference code, and why:
- it works under greedy and beam search too (the reference patches the sampling loop only, and
  greedy silently ignores VCD: VCD #8); under beam search the contrasted scores are re-normalised;
- the noise is drawn per image from a generator seeded by `seed` and the image's content (the
  reference uses the global RNG), so results are reproducible and independent of batching;
- the noised branch runs in the same batched forward as the main rows after a separate prefill,
  with the main rows' visual-token selection under pruning (`branch_pruning="same"`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.decode.base import BranchConfig, DecodeMethod, check_range, contrast, plausible_tokens
from vlmkit.methods.decode.images import check_noise_step, noised_branch
from vlmkit.registry import register_method


@dataclass(frozen=True)
class VCDConfig(BranchConfig):
    alpha: float = field(default=1.0, metadata={"help": "contrast strength alpha >= 0 (0: plain decoding)"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility threshold beta in (0, 1]"})
    noise_step: int = field(default=500, metadata={"help": "diffusion step t of the distorted image, 0..999"})
    seed: int = field(default=0, metadata={"help": "seed of the noise (combined with each image's content)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("vcd", "alpha", self.alpha, 0.0)
        check_range("vcd", "beta", self.beta, 0.0, 1.0, low_open=True)
        check_noise_step("vcd", self.noise_step)
        if not isinstance(self.seed, int):
            raise ConfigError(f"vcd: seed={self.seed!r} must be an integer")


@register_method("vcd", family="decode", sites="logits")
class VCD(DecodeMethod):
    """Contrast against the same prompt with a diffusion-noised image."""

    Config = VCDConfig
    example = ""
    neutral = "alpha=0"
    paper = "https://arxiv.org/abs/2311.16922"

    def branches(self, call):
        return [noised_branch(call, self.config.noise_step, self.config.seed, self.name)]

    def branch_vocabulary(self, scores: torch.Tensor) -> torch.Tensor:
        return plausible_tokens(scores, self.config.beta, active=self.config.alpha > 0)

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        return contrast(scores, step.branch_logits[0], self.config.alpha, self.config.beta)
