"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv:2403.06764).

Site: `layer`. Before decoder layer K, every visual token is scored by the attention the last token
of the prompt pays it at layer K-1, averaged over heads,

    s_j = 1/H * sum_h softmax_j(q_h(last) . k_h(j) / sqrt(d)),

the top `keep` share (the paper's 1 - R) is kept and the others leave the sequence: layers K and
later run on fewer tokens and cache fewer keys. Positions keep their original ids, as in the
paper's code.

Deviations from the reference code (pkunlp-icler/FastV), and why:
- the scoring row is recomputed from layer K-1's input and scored against that layer's cached keys
  (PyramidDrop's trick), so any attention implementation works and no layer runs twice (the
  reference needs eager attention and, in its KV-cache path, runs layer K-1 twice: FastV #18);
- the budget applies per sample over all its visual tokens, found from the placeholder tokens of
  each sample (the reference hard-codes the prompt offset and 576 tokens, batch size 1).
The kept count is `round(keep * n)` with Python's rule (halves to even), as in the reference's
Hugging Face port; at least one token is kept.
Limits: the scores use the last prompt token only (as the code, not the paper's mean over queries).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, top_k_sorted
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.5  # the paper's R = 50% at K = 2


@dataclass(frozen=True)
class FastVConfig(TokenBudgetConfig):
    layer: int = field(default=2, metadata={"help": "K: the decoder layer from which pruned tokens are gone (>= 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ConfigError(f"fastv: layer={self.layer!r} must be an integer >= 1 (scores come from layer K-1)")


@register_method("fastv", family="prune", sites="layer")
class FastV(TokenSelector):
    """Drop the visual tokens the last token attends to least, from decoder layer K on."""

    Config = FastVConfig
    example = "layer=2,keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2403.06764"
    needs = frozenset({"last_row_attention"})
    natural_positions = "keep"

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.config.layer,)

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for scores, visual in zip(context.last_row_attention, context.visual):
            count = self.config.kept_count(len(visual), DEFAULT_KEEP, rounding="half_even")
            samples.append(SampleSelection(top_k_sorted(scores, count)))
        return Selection(samples)
