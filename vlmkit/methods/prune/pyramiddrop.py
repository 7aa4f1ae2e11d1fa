"""PyramidDrop: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (Xing et al., CVPR 2025, arXiv:2410.17247).

Site: `layer`, several times. The decoder is cut into stages at layers L_1 < ... < L_S; before each
L_s, the visual tokens still in the sequence are ranked by the attention the last instruction token
(the last token of the prompt) pays them in layer L_s itself, from L_s's own query and key
projections (after its input norm and RoPE) of the hidden state entering L_s, averaged over heads,

    a_j = 1/H * sum_h softmax_j(q_h(last) . k_h(j) / sqrt(d)),   softmax over the whole sequence,

and the top ones are kept, so that after stage s the sample holds int(n * c_s) of its n visual
tokens, with cumulative shares c_s = lambda^s (the paper's lambda = 0.5 at layers 8, 16, 24 of
LLaVA-1.5-7B's 32: 50%, 25%, 12.5% remain). Kept tokens are re-indexed 0..len-1 as in the reference.

Reference: Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py`, `LlamaModel.pdrop_forward`
and `pdrop_rank_drop` (inference branch: the query is the token at `prompt_len + image_tokens - 1`,
the last token of the prompt; `--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"`,
counts `int(n * ratio)` of the sample's original visual-token count n, the top-k of the head-mean).
After decoder layer `layer_idx` runs, `rank_layer = layer_idx + 1` in `layer_list` ranks with
`self.layers[rank_layer]`'s input norm and q/k projections on that output, i.e. on the input of layer
L_s, and drops before L_s runs: vlmkit's stage "before layer L_s" with `attention_layer = "own"`.

Parameters: `layers=` the stage layers (default: 8, 16, 24 scaled to the model's depth as
`round(l * num_layers / 32)` with Python's rounding, clipped to 1..num_layers-1, repeats removed:
1, 2, 3 on a 4-layer model, 7, 14, 21 on 28 layers); `ratio=` lambda (c_s = lambda^s); or `keep=` /
`tokens=` the share / count left after the last stage, with c_s = keep^(s/S) (lambda = keep^(1/S),
c_S = keep exactly). With none of them lambda = 0.5 (12.5% after three stages).

Deviations from the reference, and why:
- per sample over all its visual tokens, found from the placeholders (the reference takes one image
  block per sample at its first image placeholder); structural tokens (LLaVA-NeXT's image newlines)
  are never scored nor dropped;
- counts are `int(n * c_s + 1e-9)` (the reference's truncation; the 1e-9 absorbs the floating error
  of keep^(s/S)), at least one token; ties go to the lower index (torch.topk leaves them unspecified);
  softmax and head mean in float32 (the reference casts the softmax back to the model's dtype first).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError, InputError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, layer_list, scaled_layers, top_k_sorted
from vlmkit.registry import register_method

DEFAULT_LAYERS = (8, 16, 24)  # of LLaVA-1.5-7B's 32 decoder layers
DEFAULT_DEPTH = 32
DEFAULT_RATIO = 0.5  # lambda
_FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class PyramidDropConfig(TokenBudgetConfig):
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "stage layers (>= 1): prune before each (default: 8, 16, 24 of 32, scaled to the model's depth)"},
    )
    ratio: float | None = field(
        default=None,
        metadata={"help": f"lambda: share of the remaining visual tokens kept at each stage (default {DEFAULT_RATIO}; "
                          "instead of keep/tokens, which set the share left after the last stage)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            layers = layer_list("pyramiddrop", "layers", self.layers, minimum=1, reason="the reference ranks after a layer ran")
            if not layers:
                raise ConfigError("pyramiddrop: layers=() names no stage; give one or more decoder layers, e.g. layers=(8, 16, 24)")
            object.__setattr__(self, "layers", layers)
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio <= 1.0:
                raise ConfigError(f"pyramiddrop: ratio={self.ratio!r} must be a number in (0, 1] (lambda, kept per stage)")
            if self.keep is not None or self.tokens is not None:
                raise ConfigError(
                    f"pyramiddrop: give ratio={self.ratio} (kept per stage) or keep/tokens (left after the last stage), not both"
                )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference's stage layers 8, 16, 24 (of 32) scaled to `num_layers`, clipped to 1..num_layers-1."""
    return tuple(sorted(set(scaled_layers(DEFAULT_LAYERS, num_layers, DEFAULT_DEPTH))))


@register_method("pyramiddrop", family="prune", sites="layer")
class PyramidDrop(TokenSelector):
    """Drop visual tokens in stages: at each stage keep the share lambda the last token attends to most."""

    Config = PyramidDropConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2410.17247"
    needs = frozenset({"last_row_attention"})
    attention_layer = "own"  # layer L_s's own q/k on its input, as pdrop_rank_drop
    natural_positions = "reindex"

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._entering: list[int] | None = None  # per sample, visual tokens at the first stage of this prefill

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.config.layers if self.config.layers is not None else default_layers(num_layers)

    def cumulative_shares(self, available: int, stages: int) -> list[float]:
        """c_1..c_S for a sample entering the first stage with `available` visual tokens."""
        config = self.config
        if config.keep is None and config.tokens is None:
            ratio = DEFAULT_RATIO if config.ratio is None else config.ratio
            return [ratio**s for s in range(1, stages + 1)]
        if config.tokens is not None:
            if config.tokens > available:
                warnings.warn(
                    f"tokens={config.tokens} exceeds the {available} visual tokens available; keeping all {available}",
                    stacklevel=4,
                )
            final = min(config.tokens, available) / available
        else:
            final = config.keep
        return [final ** (s / stages) for s in range(1, stages)] + [final]

    def stage_count(self, available: int, stage: int, stages: int) -> int:
        """Visual tokens left after stage `stage` (0-based) of a sample that entered with `available`."""
        if available == 0:
            return 0
        share = self.cumulative_shares(available, stages)[stage]
        return max(1, math.floor(available * share + _FLOAT_SLACK))

    def select(self, context: SelectionContext) -> Selection:
        layers = self.selection_layers(context.num_layers)
        if context.layer not in layers:
            raise InputError(f"pyramiddrop: asked to select before layer {context.layer}, not one of its stages {layers}")
        stage = layers.index(context.layer)
        if stage == 0:
            self._entering = [len(visual) for visual in context.visual]
        elif self._entering is None or len(self._entering) != len(context.visual):
            raise InputError(f"pyramiddrop: stage {stage + 1} (layer {context.layer}) ran without its first stage")
        samples = []
        for scores, visual, entering in zip(context.last_row_attention, context.visual, self._entering):
            count = min(len(visual), self.stage_count(entering, stage, len(layers)))
            samples.append(SampleSelection(top_k_sorted(scores, count)))
        return Selection(samples)
