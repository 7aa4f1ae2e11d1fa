"""V2PE: "Improving Multimodal Long-Context Capability of Vision-Language Models with Variable
Visual Position Encoding" (Ge et al., ICCV 2025, arXiv:2412.09616).

Site: `position`. Text advances the rotary position by 1, each visual token by delta < 1, so long
multimodal prompts use fewer positions:

    p(text_k) = p(previous) + 1,    p(image token j of n) = s + j * delta (j = 1 .. n),

where s is the position of the token before the image; after the image the position resumes at
ceil(s + n * delta) + 1. Rotary tables come from the float positions; decoding continues from the
last prompt position plus one per new token. delta = 1 gives the model's own positions.

Follows OpenGVLab/V2PE @f96f189, `internvl/model/internvl_chat/modeling_internvl_chat.py`,
`get_rope_pos_id` (`v2pe_fix`: delta = rope_pos_id_stride / 256, the evaluation stride 64, so
0.25; an image's positions are `torch.linspace(s, s + delta * n, n + 1)[1:]` in float32, then
`ceil`) and its `V2PE` rotary module (`torch.outer(positions, inv_freq)`). Training (`train=True`)
draws delta per image from {1, 1/2, ..., 1/256} as `v2pe_rnd` does (the original draws per image
with Python's `random`; here a seeded generator). Deviations, and why: images are found per sample
from their placeholder runs, LLaVA-NeXT's image newlines included (the original reads InternVL's
<img>...</img> tokens and handles batch size 1 only); padding keeps the model's own positions.
Kept tokens of a pruned image keep their fractional positions (a pruning method's `positions`
policy is 'keep' under V2PE). The model needs V2PE fine-tuning to profit; untrained, small delta
changes its outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlmkit.engine.contexts import PositionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, PositionMethod
from vlmkit.methods.position.layout import ItemDraws, sequential_positions
from vlmkit.registry import register_method

#: the strides `v2pe_rnd` draws from, over 256 image tokens: delta in {1, 1/2, ..., 1/256}
TRAINING_DELTAS = tuple(1 / 2**k for k in range(9))


@dataclass(frozen=True)
class V2PEConfig(MethodConfig):
    delta: float = field(default=0.25, metadata={"help": "position increment of each visual token, in (0, 1] (text: 1)"})
    train: bool = field(default=False, metadata={"help": "draw delta per image from {1, 1/2, ..., 1/256} (fine-tuning)"})
    seed: int = field(default=0, metadata={"help": "seed of the training draws"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta <= 1:
            raise ConfigError(f"v2pe: delta={self.delta!r} must be a number in (0, 1] (the visual position increment)")
        if not isinstance(self.train, bool):
            raise ConfigError(f"v2pe: train={self.train!r} must be True or False")


@register_method("v2pe", family="position", sites="position")
class V2PE(PositionMethod):
    """Visual tokens advance the rotary position by delta, text by 1 (variable visual position encoding)."""

    Config = V2PEConfig
    example = "delta=0.25"
    neutral = "delta=1"
    paper = "https://arxiv.org/abs/2412.09616"
    unsupported = {
        family: "V2PE is defined for 1-D rotary positions; M-RoPE gives each visual token a 3-D position"
        for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    }

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        # delta for the next image: the configured one, or a training draw.
        self.image_delta = ItemDraws(self.config.delta, TRAINING_DELTAS, self.config.train, self.config.seed)

    def positions(self, context: PositionContext) -> torch.Tensor:
        def place(row: int, item: int, start: int, count: int, first: float) -> tuple[torch.Tensor, float]:
            before, delta = first - 1, self.image_delta()
            span = torch.linspace(before, before + delta * count, count + 1)[1:]
            return span, float(math.ceil(float(span[-1])))

        return sequential_positions(context, place)
