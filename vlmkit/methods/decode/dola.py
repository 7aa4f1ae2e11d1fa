"""DoLa: "Decoding by Contrasting Layers Improves Factuality in Large Language Models" (Chuang et al.,
ICLR 2024, arXiv:2309.03883; code voidism/DoLa, later transformers' `dola_layers`).

Site: `logits`. No extra forward: the same forward's hidden states give an early-exit distribution
q_j = softmax(LM head(norm(h_j))) per candidate layer j. Per step and per row, the premature layer
M is the candidate farthest from the final distribution p_N, M = argmax_j JSD(p_N || q_j), and

    score(y) = log p_N(y) - log q_M(y)   if p_N(y) >= relative_top * max_w p_N(w),   else -inf.

Candidates follow the reference: 'low' = range(start, N/2, 2), 'high' = range(N/2, N, 2) for an
N-layer model (N > 40: the first / last 20 layers), skipping the embedding layer when the LM head is
tied to it. Defaults: layers = 'high', relative_top = 0.1.

Deviations from the reference code, and why:
- the premature layer is chosen per row (transformers averages the divergence over the batch);
- the divergence is the JSD of the paper, 1/2 KL(p || m) + 1/2 KL(q || m) summed over the vocabulary
  (the code's `kl_div(log p, m)` averages KL(m || p) terms over the vocabulary instead);
- with token pruning the hidden states of different layers have different lengths; only the last
  position (the token being predicted from) is read;
- it works under beam search too (scores re-normalised); DoLa has no neutral setting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmkit.methods.base import MethodConfig
from vlmkit.methods.decode.base import DecodeMethod, check_range, plausibility_cutoff
from vlmkit.methods.decode.layers import candidate_layers, check_layers, gather_rows, most_divergent
from vlmkit.registry import register_method


@dataclass(frozen=True)
class DoLaConfig(MethodConfig):
    layers: str | tuple[int, ...] = field(default="high", metadata={"help": "premature candidates: 'low', 'high' or a tuple of hidden_states indices"})
    relative_top: float = field(default=0.1, metadata={"help": "keep tokens with p >= relative_top * max p, in (0, 1]"})

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", check_layers("dola", self.layers))
        check_range("dola", "relative_top", self.relative_top, 0.0, 1.0, low_open=True)


@register_method("dola", family="decode", sites="logits")
class DoLa(DecodeMethod):
    """Contrast the final layer with the most different early layer of the same forward."""

    Config = DoLaConfig
    example = "layers='low'"
    neutral = None  # the layer contrast is the method: no setting turns it off
    paper = "https://arxiv.org/abs/2309.03883"

    def layers(self, num_layers: int, tied_embeddings: bool) -> tuple[int, ...]:
        return candidate_layers(self.name, self.config.layers, num_layers, tied_embeddings)

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        final = torch.log_softmax(scores, dim=-1)
        candidates = [torch.log_softmax(logits, dim=-1) for logits in step.layer_logits.values()]
        premature = gather_rows(candidates, most_divergent(final, candidates))
        return (final - premature).masked_fill(plausibility_cutoff(final, self.config.relative_top), -math.inf)
