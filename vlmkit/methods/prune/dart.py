"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., EMNLP 2025, arXiv:2502.11494).

Site: `layer`. Before decoder layer K (default 2) a few pivot tokens are chosen, P_v among the visual
tokens and P_t among the text tokens after them (4 and 4), those with the largest L1 norm; then, one
pivot after the other, the T visual tokens least similar to that pivot,

    argmin_j  cos(h_pivot, h_j)   over the visual tokens not yet kept (visual pivots excluded),

join the kept set. The kept set is the visual pivots plus what the pivots picked: P_v + (P_v + P_t) * T
tokens, with T = int(n * keep / (P_v + P_t)) of the sample's n visual tokens (or tokens // (P_v + P_t)
for a count budget). The others leave the sequence; kept tokens keep their positions.

Reference: ZichenWen1/DART (read at its last upstream commit 5a19452), `llava/model/language_model/
modeling_llama_self.py` and `Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`, `DART.forward` and
`DART.get_retained_image_token`: pivots by the L1 norm of layer K-1's keys (after RoPE, all heads),
similarity on the final norm of the hidden state entering layer K; pivots are visited in the iteration
order of a Python set of their sequence positions, which this module reproduces (positions counted
without padding). Defaults: K = 2, 4 + 4 pivots; the budget `keep` defaults to 128/576 (the LLaVA-1.5
scripts' `max_num_trunction=128`: T = 16, 132 tokens kept); the Qwen2-VL scripts' reduction ratio
0.778 is `keep=0.222`; `tokens=128` gives the LLaVA-1.5 path's count rule `ceil(128 // 8)`.

Deviations from the reference, and why:
- pivots are ranked by the L1 norm of the hidden state entering layer K, not of layer K-1's keys, and
  the cosine is taken on that hidden state without the model's final RMSNorm: a selector sees the
  hidden state only (keys and norm weights are not in vlmkit's selection context);
- per sample over all its visual tokens, text pivots among the text tokens after its last visual token
  (the reference: one image block at a hard-coded offset, batch size 1); structural tokens (LLaVA-NeXT's
  image newlines) are never pivots of the visual kind nor pruned;
- norms and cosines in float32; ties go to the lower index; when fewer tokens than T remain, a pivot
  takes what is left (the reference's topk would fail); `keep=1.0` keeps every token (the count rule
  would drop up to P_v + P_t - 1 of them).
"""
from __future__ import annotations

import math
import warnings
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
from vlmkit.registry import register_method

DEFAULT_KEEP = 128 / 576
_FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class DARTConfig(TokenBudgetConfig):
    layer: int = field(default=2, metadata={"help": "K: the decoder layer before which tokens are pruned (>= 1)"})
    pivot_image_tokens: int = field(default=4, metadata={"help": "P_v: visual pivots (largest L1 norm), kept"})
    pivot_text_tokens: int = field(default=4, metadata={"help": "P_t: text pivots (largest L1 norm, after the visual tokens)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ConfigError(f"dart: layer={self.layer!r} must be an integer >= 1 (the hidden state entering layer K)")
        for name in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"dart: {name}={value!r} must be an integer >= 0")
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            raise ConfigError("dart: pivot_image_tokens and pivot_text_tokens are both 0; at least one pivot is needed")


@register_method("dart", family="prune", sites="layer")
class DART(TokenSelector):
    """Keep a few high-norm pivots and the visual tokens least similar to them (duplicates leave)."""

    Config = DARTConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2502.11494"
    natural_positions = "keep"

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.config.layer,)

    def picks_per_pivot(self, available: int) -> int | None:
        """T, the tokens each pivot picks for a sample with `available` visual tokens; None keeps all."""
        config, pivots = self.config, self.config.pivot_image_tokens + self.config.pivot_text_tokens
        if config.tokens is not None:
            if config.tokens >= available:
                if config.tokens > available:
                    warnings.warn(
                        f"tokens={config.tokens} exceeds the {available} visual tokens available; keeping all {available}",
                        stacklevel=4,
                    )
                return None
            return config.tokens // pivots
        keep = DEFAULT_KEEP if config.keep is None else config.keep
        if keep >= 1.0:
            return None
        return math.floor(available * keep / pivots + _FLOAT_SLACK)

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for row, visual in enumerate(context.visual):
            valid = context.valid[row] if context.valid is not None else None
            samples.append(self.select_sample(context.hidden[row], valid, visual))
        return Selection(samples)

    def select_sample(self, hidden: torch.Tensor, valid: torch.Tensor | None, visual: VisualTokens) -> SampleSelection:
        """One sample: `hidden` (L, D) entering layer K, `valid` (L,) False on padding."""
        n = len(visual)
        device = visual.slots.device
        per_pivot = self.picks_per_pivot(n) if n else None
        if per_pivot is None or n <= self.config.pivot_image_tokens:
            return SampleSelection(torch.arange(n, device=device))
        hidden = hidden.float()
        if valid is None:
            valid = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        position = valid.long().cumsum(dim=0) - 1  # sequence position without padding
        features = hidden[visual.slots]

        image_pivots = top_k_sorted_by_rank(features.abs().sum(dim=-1), self.config.pivot_image_tokens)
        is_text = valid.clone()
        is_text[visual.slots] = False
        is_text[: int(visual.slots.max()) + 1] = False  # the text after the sample's visual tokens
        text_slots = torch.nonzero(is_text).flatten()
        text_pivots = text_slots[top_k_sorted_by_rank(hidden[text_slots].abs().sum(dim=-1), self.config.pivot_text_tokens)]

        pivot_slots = {int(position[visual.slots[i]]): visual.slots[i] for i in image_pivots.tolist()}
        pivot_slots.update({int(position[s]): s for s in text_pivots.tolist()})
        order = [int(position[visual.slots[i]]) for i in image_pivots.tolist()] + [int(position[s]) for s in text_pivots.tolist()]

        kept = torch.zeros(n, dtype=torch.bool, device=device)
        kept[image_pivots] = True
        for pivot in list(set(order)):  # the reference visits its pivots in a Python set's order
            pool = torch.nonzero(~kept).flatten()
            if pool.numel() == 0:
                break
            similarity = F.cosine_similarity(hidden[pivot_slots[pivot]][None], features[pool], dim=-1)
            least = torch.argsort(similarity, stable=True)[:per_pivot]
            kept[pool[least]] = True
        return SampleSelection(torch.nonzero(kept).flatten())


def top_k_sorted_by_rank(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, highest first (ties: lower index first)."""
    return torch.argsort(scores, descending=True, stable=True)[:count]
