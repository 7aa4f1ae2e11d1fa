"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., EMNLP 2025, arXiv:2502.11494).

Site: `layer`. Before decoder layer K (default 2) a few pivot tokens are chosen, P_v among the visual
tokens and P_t among the text tokens after them (4 and 4): those whose keys at layer K-1 (after RoPE,
all heads) have the largest L1 norm, here taken over the rotary planes (see the deviations),

    pivot score of token j = sum_h sum_i |(k_j^h[i], k_j^h[i + d/2])|_2,

then, one pivot after the other, the T visual tokens least similar to that pivot,

    argmin_j  cos(n_pivot, n_j),   n = FinalNorm(h) of the hidden state h entering layer K,

over the visual tokens not yet kept (visual pivots excluded), join the kept set. The kept set is the
visual pivots plus what the pivots picked: P_v + (P_v + P_t) * T tokens, with T = int(n * keep /
(P_v + P_t)) of the sample's n visual tokens (or tokens // (P_v + P_t) for a count budget). The others
leave the sequence; kept tokens keep their positions.

Reference: ZichenWen1/DART (read at its last upstream commit 5a19452), `llava/model/language_model/
modeling_llama_self.py` and `Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py`, `DART.forward` and
`DART.get_retained_image_token`: the keys are layer K-1's attention keys after RoPE and `repeat_kv`,
reshaped to one (H * d) row per token; the similarity is on the model's final norm of layer K-1's
output. Pivots are visited in the iteration order of a Python set of their sequence positions, which
this module reproduces (positions counted without padding). Defaults: K = 2, 4 + 4 pivots; the
budget `keep` defaults to 128/576 (the LLaVA-1.5 scripts' `max_num_trunction=128`: T = 16, 132 tokens
kept); the Qwen2-VL scripts' reduction ratio 0.778 is `keep=0.222`; `tokens=128` gives the LLaVA-1.5
path's count rule `ceil(128 // 8)`.

Deviations from the reference, and why:
- the keys' L1 norm is taken over the rotary planes: each pair (k[i], k[i + d/2]) that RoPE rotates
  together counts with its length, not |k[i]| + |k[i + d/2]|. The plain L1 norm of a rotated key
  changes with the token's absolute position, and the engine rotates a left-padded batch's keys at
  positions that count the padding (as the unpatched model), so the pivots of a padded sample would
  differ from its single run; the plane lengths do not move with the position. (Per plane, the plain
  L1 norm, averaged over the rotation angle, is 4/pi times the length.)
  The sum runs over the H_kv key heads, not their `repeat_kv` copies to all H query heads, which
  multiply every score by H / H_kv;
- per sample over all its visual tokens, text pivots among the text tokens after its last visual token
  (the reference: one image block at a hard-coded offset, batch size 1); structural tokens (LLaVA-NeXT's
  image newlines) are never pivots of the visual kind nor pruned;
- norms and cosines in float32 (the final norm itself in the model's dtype, as the reference); ties go
  to the lower index; when fewer tokens than T remain, a pivot takes what is left (the reference's topk
  would fail); `keep=1.0` keeps every token (the count rule would drop up to P_v + P_t - 1 of them).
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
from vlmkit.errors import ConfigError, InputError
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
    needs = frozenset({"keys"})  # layer K-1's rotated keys (pivots); the hidden state entering K (similarity)
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
        if context.keys is None:
            raise InputError("dart: the pivots need layer K-1's keys (needs={'keys'}), which this call did not record")
        # the similarity space: the model's final norm of the hidden state entering layer K (identity when
        # a hand-made context has no norm)
        normed = context.final_norm(context.hidden) if context.final_norm is not None else context.hidden
        norms = key_norms(context.keys)
        samples = []
        for row, visual in enumerate(context.visual):
            valid = context.valid[row] if context.valid is not None else None
            samples.append(self.select_sample(normed[row], norms[row], valid, visual))
        return Selection(samples)

    def select_sample(
        self, normed: torch.Tensor, norms: torch.Tensor, valid: torch.Tensor | None, visual: VisualTokens
    ) -> SampleSelection:
        """One sample: `normed` (L, D) the final norm of the hidden state entering layer K, `norms` (L,)
        the pivot scores (`key_norms`), `valid` (L,) False on padding."""
        n = len(visual)
        device = visual.slots.device
        per_pivot = self.picks_per_pivot(n) if n else None
        if per_pivot is None or n <= self.config.pivot_image_tokens:
            return SampleSelection(torch.arange(n, device=device))
        normed = normed.float()
        if valid is None:
            valid = torch.ones(normed.shape[0], dtype=torch.bool, device=normed.device)
        position = valid.long().cumsum(dim=0) - 1  # sequence position without padding
        features = normed[visual.slots]

        image_pivots = top_k_sorted_by_rank(norms[visual.slots], self.config.pivot_image_tokens)
        is_text = valid.clone()
        is_text[visual.slots] = False
        is_text[: int(visual.slots.max()) + 1] = False  # the text after the sample's visual tokens
        text_slots = torch.nonzero(is_text).flatten()
        text_pivots = text_slots[top_k_sorted_by_rank(norms[text_slots], self.config.pivot_text_tokens)]

        pivot_slots = {int(position[visual.slots[i]]): visual.slots[i] for i in image_pivots.tolist()}
        pivot_slots.update({int(position[s]): s for s in text_pivots.tolist()})
        order = [int(position[visual.slots[i]]) for i in image_pivots.tolist()] + [int(position[s]) for s in text_pivots.tolist()]

        kept = torch.zeros(n, dtype=torch.bool, device=device)
        kept[image_pivots] = True
        for pivot in list(set(order)):  # the reference visits its pivots in a Python set's order
            pool = torch.nonzero(~kept).flatten()
            if pool.numel() == 0:
                break
            similarity = F.cosine_similarity(normed[pivot_slots[pivot]][None], features[pool], dim=-1)
            least = torch.argsort(similarity, stable=True)[:per_pivot]
            kept[pool[least]] = True
        return SampleSelection(torch.nonzero(kept).flatten())


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """Pivot scores (B, L) from rotated keys (B, H_kv, L, d): the L1 norm over the rotary planes, the
    summed lengths of the pairs (k[i], k[i + d/2]) that RoPE rotates together, over every head."""
    first, second = keys.float().chunk(2, dim=-1)
    return torch.sqrt(first.square() + second.square()).sum(dim=(1, 3))


def top_k_sorted_by_rank(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, highest first (ties: lower index first)."""
    return torch.argsort(scores, descending=True, stable=True)[:count]
