"""HoPE: "HoPE: Hybrid of Position Embedding for Length Generalization in Vision-Language Models"
(Li et al., 2025, arXiv:2505.20444), for the M-RoPE families (Qwen2-VL, Qwen2.5-VL).

Site: `position` (positions and the rotary tables). Three changes to M-RoPE:

- Hybrid frequency allocation (HFA): of the P rotary frequency pairs (pair j rotates by
  theta^(-2j/d), j = 0 the highest), the t + h + w = P pairs of `mrope_section`: the h + w highest
  alternate height (even j) and width (odd j); the t lowest get no rotation (cos 1, sin 0: NoPE).
- Dynamic temporal scaling (DTS): a visual item's temporal index is scaled by s (inference: given,
  0.75 by default as the paper's V-NIAH; training: drawn per image or video from
  {0.5, 0.75, 1, 1.25, 1.5}).
- Spatial indices centred and shifted by the temporal one: for a token at (frame f, row i, col j)
  of an item starting at position p, t = p + s * f, h = t + i - (H - 1) // 2, w = t + j - (W - 1) // 2;
  the text after the item resumes at max(t) + 1.

Follows hrlics/HoPE @85b76c0, `modeling_hope.py`: `apply_hybrid_multimodal_rotary_pos_emb`
(`mrope_section` [16, 24, 24] -> 48 spatial pairs alternating h / w, 16 NoPE) and `get_rope_index`
(`t_index * scalor`, `h_index - (llm_grid_h - 1) // 2 + t_index`, the next text at the temporal
maximum + 1). Deviations, and why: the temporal index is the model's own (Qwen2.5-VL's is
time-aligned, `second_per_grid_t`; the original, built on Qwen2-VL, uses the frame number); the
training draw uses a seeded generator (the original Python's `random`); inference needs no assert
on s (it has a default). `allocation="mrope"` keeps M-RoPE's frequency allocation and
`layout="mrope"` M-RoPE's index layout (with DTS on its temporal index), so that each component can
be measured alone; `scale=1,allocation=mrope,layout=mrope` is the unpatched model. Decoding
continues from the last prompt position plus one per new token. HoPE needs fine-tuning to profit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.engine.contexts import PositionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, PositionMethod
from vlmkit.methods.position.layout import ItemDraws, sequential_positions
from vlmkit.registry import register_method

TRAINING_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
ALLOCATIONS = ("hybrid", "mrope")
LAYOUTS = ("hope", "mrope")


@dataclass(frozen=True)
class HoPEConfig(MethodConfig):
    scale: float = field(default=0.75, metadata={"help": "temporal scaling s of visual items, > 0"})
    train: bool = field(default=False, metadata={"help": "draw s per image or video from {0.5, 0.75, 1, 1.25, 1.5}"})
    seed: int = field(default=0, metadata={"help": "seed of the training draws"})
    allocation: str = field(default="hybrid", metadata={"help": "'hybrid' (HFA: spatial high frequencies, NoPE low) or 'mrope'"})
    layout: str = field(default="hope", metadata={"help": "'hope' (centred spatial indices shifted by t) or 'mrope'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ConfigError(f"hope: scale={self.scale!r} must be a number > 0 (the temporal scaling s)")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"hope: allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"hope: layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if not isinstance(self.train, bool):
            raise ConfigError(f"hope: train={self.train!r} must be True or False")


def hybrid_tables(module, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HFA rotary tables (B, L, 2P) for M-RoPE positions (3, B, L): the h + w highest-frequency
    pairs alternate height (even j) and width (odd j), the t lowest are not rotated."""
    temporal = module.mrope_section[0]
    pairs = module.inv_freq.numel()
    spatial = pairs - temporal
    positions = positions.expand(3, -1, -1).float()
    freqs = positions[..., None] * module.inv_freq.to(device=hidden.device, dtype=torch.float)  # (3, B, L, P)
    axis = torch.tensor([1 if j % 2 == 0 else 2 for j in range(spatial)], device=hidden.device)
    chosen = freqs[axis, :, :, torch.arange(spatial, device=hidden.device)].permute(1, 2, 0)  # (B, L, spatial)
    scaling = module.attention_scaling
    ones = torch.ones(*chosen.shape[:2], temporal, device=hidden.device)
    cos = torch.cat([chosen.cos() * scaling, ones], dim=-1)
    sin = torch.cat([chosen.sin() * scaling, torch.zeros_like(ones)], dim=-1)
    return torch.cat([cos, cos], dim=-1).to(hidden.dtype), torch.cat([sin, sin], dim=-1).to(hidden.dtype)


@register_method("hope", family="position", sites="position")
class HoPE(PositionMethod):
    """Hybrid frequency allocation (NoPE on M-RoPE's temporal pairs), temporal scaling, centred spatial indices."""

    Config = HoPEConfig
    example = "scale=0.75"
    neutral = "scale=1,allocation=mrope,layout=mrope"
    paper = "https://arxiv.org/abs/2505.20444"
    unsupported = {
        family: "HoPE re-allocates M-RoPE's frequencies; this family has 1-D rotary positions"
        for family in ("llava", "llava_next", "llava_onevision", "llava_next_video", "internvl", "idefics3", "smolvlm",
                       "fast_vlm", "gemma3")
    } | {
        "qwen3_vl": "HoPE re-allocates M-RoPE's contiguous (t, h, w) frequency sections; Qwen3-VL interleaves them, "
                    "and its videos are one grid per frame with timestamps between",
    }

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        # s for the next image or video: the configured one, or a training draw.
        self.item_scale = ItemDraws(self.config.scale, TRAINING_SCALES, self.config.train, self.config.seed)

    def rotary_tables(self, module, hidden, positions):
        return hybrid_tables(module, hidden, positions) if self.config.allocation == "hybrid" else None

    def positions(self, context: PositionContext) -> torch.Tensor:
        stock = context.positions.expand(3, *context.valid.shape)

        def place(row: int, item: int, start: int, count: int, first: float) -> tuple[torch.Tensor, float]:
            visual = context.visual[row]
            slots = visual.slots[visual.image == item]
            relative = (stock[:, row, slots] - stock[0, row, slots[0]]).to(torch.float32)  # (t, i, j) from its start
            t = first + relative[0] * self.item_scale()
            if self.config.layout == "hope":
                _, height, width = visual.grids[item]
                h, w = t + relative[1] - (height - 1) // 2, t + relative[2] - (width - 1) // 2
                last = float(t.max())
            else:
                h, w = first + relative[1], first + relative[2]
                last = float(torch.stack([t, h, w]).max())
            span = stock[:, row, start : start + count].to(torch.float32).clone()
            span[:, slots - start] = torch.stack([t, h, w])
            return span, last

        return sequential_positions(context, place)
