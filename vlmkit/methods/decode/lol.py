"""LOL: "Lower Layer Matters: Alleviating Hallucination via Multi-Layer Fusion Contrastive Decoding with
Truthfulness Refocused" (Chen et al., 2024, arXiv:2408.08769). No public code.

Site: `logits`. Contrastive decoding between the model and an *amateur* (a hallucination-prone
input), fused over two depths of the same batched forward: the final layer N and a lower layer L,
chosen per step and row as in DoLa (the candidate whose early-exit distribution is farthest, by
JSD, from the final one). With s_k = log softmax of the main rows' layer-k logits and a_k the
amateur's,

    score = s_N + alpha (s_N - a_N) + omega (s_L - a_L),

restricted to the plausible set {y : p_N(y) >= beta max_w p_N(w)}. The amateur is the ICD
disturbance instruction by default (the paper's amateur is a model fine-tuned to hallucinate; ICD's
instruction is its training-free VLM analogue), or VCD's noised image, or no image.

Defaults: alpha = 1, omega = 1, beta = 0.1, lower layers 'low'. The paper's fusion weight was not
available to us; omega = 1 weighs both depths equally. Not implemented: the paper's "truthfulness
refocused" prompt on the main rows (a change of the user's prompt, not of decoding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.decode.base import BranchConfig, DecodeMethod, check_range, plausibility_cutoff
from vlmkit.methods.decode.images import check_noise_step, noised_branch
from vlmkit.methods.decode.layers import candidate_layers, check_layers, gather_rows, most_divergent
from vlmkit.methods.decode.prompts import DISTURBANCE, instruction_branch
from vlmkit.registry import register_method

AMATEURS = ("instruction", "noise", "none")


@dataclass(frozen=True)
class LOLConfig(BranchConfig):
    alpha: float = field(default=1.0, metadata={"help": "final-layer contrast weight, >= 0"})
    omega: float = field(default=1.0, metadata={"help": "lower-layer contrast weight, >= 0 (alpha = omega = 0: plain decoding)"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility threshold beta in (0, 1]"})
    layers: str | tuple[int, ...] = field(default="low", metadata={"help": "lower-layer candidates: 'low', 'high' or a tuple of hidden_states indices"})
    amateur: str = field(default="instruction", metadata={"help": f"the amateur input: one of {', '.join(AMATEURS)}"})
    instruction: str = field(default=DISTURBANCE, metadata={"help": "disturbance instruction (amateur='instruction')"})
    noise_step: int = field(default=500, metadata={"help": "diffusion step of the noised image (amateur='noise')"})
    seed: int = field(default=0, metadata={"help": "noise seed (amateur='noise')"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lol", "alpha", self.alpha, 0.0)
        check_range("lol", "omega", self.omega, 0.0)
        check_range("lol", "beta", self.beta, 0.0, 1.0, low_open=True)
        object.__setattr__(self, "layers", check_layers("lol", self.layers))
        if self.amateur not in AMATEURS:
            raise ConfigError(f"lol: amateur={self.amateur!r} is not one of {', '.join(map(repr, AMATEURS))}")
        check_noise_step("lol", self.noise_step)


@register_method("lol", family="decode", sites="logits")
class LOL(DecodeMethod):
    """Contrast with an amateur input at the final layer and at the most divergent lower layer."""

    Config = LOLConfig
    example = ""
    neutral = "alpha=0,omega=0"
    paper = "https://arxiv.org/abs/2408.08769"

    def branches(self, call):
        config = self.config
        if config.amateur == "instruction":
            return [instruction_branch(call, config.instruction, self.name)]
        if config.amateur == "noise":
            return [noised_branch(call, config.noise_step, config.seed, self.name)]
        return [call.without_visual()]

    def layers(self, num_layers: int, tied_embeddings: bool) -> tuple[int, ...]:
        return candidate_layers(self.name, self.config.layers, num_layers, tied_embeddings)

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        config = self.config
        if config.alpha == 0 and config.omega == 0:
            return scores.clone()
        rows = scores.shape[0]
        final = torch.log_softmax(scores, dim=-1)
        amateur = torch.log_softmax(step.branch_logits[0], dim=-1)
        lower = [torch.log_softmax(logits, dim=-1) for logits in step.layer_logits.values()]
        choice = most_divergent(final, [layer[:rows] for layer in lower])
        main_lower = gather_rows([layer[:rows] for layer in lower], choice)
        amateur_lower = gather_rows([layer[rows:] for layer in lower], choice)
        combined = final + config.alpha * (final - amateur) + config.omega * (main_lower - amateur_lower)
        return combined.masked_fill(plausibility_cutoff(final, config.beta), -math.inf)
