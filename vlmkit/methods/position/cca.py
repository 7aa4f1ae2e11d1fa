"""CCA: "Mitigating Object Hallucination via Concentric Causal Attention" (Xing et al., NeurIPS
2024, arXiv:2410.15926).

Sites: `position` and `attention`. Each image's visual tokens get concentric ring positions

    ring(i, j) = min(i, j, H - 1 - i, W - 1 - j)        (0 on the border, the centre highest),

position = (the image's first position) + ring, so an image occupies as many positions as it has
rings, ceil(min(H, W) / 2), and the text after it resumes right after those (central patches are
closest to the instruction, against RoPE's long-term decay). The concentric causal mask: a visual
query in ring p sees the same image's visual keys in rings <= p (outer to inner, the same ring both
ways), whatever their sequence order; everything else stays causal. Decoding continues from the
last prompt position plus one per new token.

Follows xing0047/cca-llava @8b5bb61, `llava/cca_utils/cca.py`, `cca_forward` (the ring table built
from the centre out, the image at `img_pos + ring`, text at `img_pos + 12 + k`, decoding at
`past - 576 + 12`, the mask's visual block set per ring). Deviations, and why: any grid size, not
only 24 x 24 (the original hard-codes 576 tokens); each AnyRes crop (the base view and each tile, in
its nominal side x side grid) and each video frame gets its own rings and positions, one after
another; LLaVA-NeXT's image newlines take the position of their crop's outer ring and attend
causally; every sample keeps its own positions (the original's batch loop keeps only the last
sample's) and left padding keeps the model's own; SDPA and eager attention both get the mask (the
original needs SDPA). Pruning keeps each kept token's ring position. CCA-LLaVA retrains the model
with it; untrained, it changes the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.engine.contexts import AttentionContext, PositionContext
from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.base import AttentionMethod, MethodConfig, PositionMethod
from vlmkit.methods.position.layout import sequential_positions
from vlmkit.registry import register_method

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


def rings(row: torch.Tensor, col: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Concentric ring index of grid cells: min(i, j, H - 1 - i, W - 1 - j)."""
    return torch.minimum(torch.minimum(row, col), torch.minimum(height - 1 - row, width - 1 - col))


def crop_rings(visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per visual token: its group (one per image, frame and crop, in that order of precedence), its
    ring in that group's grid (the base view's or video frame's grid; a tile's nominal side x side),
    and the number of rings of its group's grid."""
    height = torch.tensor([visual.grids[i][1] for i in visual.image.tolist()], dtype=torch.long)
    width = torch.tensor([visual.grids[i][2] for i in visual.image.tolist()], dtype=torch.long)
    tiled = visual.crop > 0
    row = torch.where(tiled, visual.row % height, visual.row)
    col = torch.where(tiled, visual.col % height, visual.col)
    width = torch.where(tiled, height, width)
    key = torch.stack([visual.image, visual.frame, visual.crop], dim=1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    return group, rings(row, col, height, width), (torch.minimum(height, width) + 1) // 2


@dataclass(frozen=True)
class CCAConfig(MethodConfig):
    """CCA has no parameters: the positions and the mask are the method."""


@register_method("cca", family="position", sites=("position", "attention"))
class CCA(PositionMethod, AttentionMethod):
    """Concentric ring positions for visual tokens and the concentric causal mask (outer rings first)."""

    Config = CCAConfig
    example = ""
    neutral = None  # the rings and the mask are the method: no setting leaves the model unchanged
    paper = "https://arxiv.org/abs/2410.15926"
    replaces_causal = True
    unsupported = {
        family: "CCA sets 1-D rotary positions; M-RoPE gives each visual token a 3-D position"
        for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    }

    def check_adapter(self, adapter) -> None:
        implementation = adapter.attention_implementation
        if implementation not in MASKED_IMPLEMENTATIONS:
            raise ConfigError(
                f"cca needs an attention implementation that takes an arbitrary mask; this model uses "
                f"{implementation!r}. Load it with attn_implementation= one of {', '.join(MASKED_IMPLEMENTATIONS)}"
            )

    def positions(self, context: PositionContext) -> torch.Tensor:
        def place(row: int, item: int, start: int, count: int, first: float) -> tuple[torch.Tensor, float]:
            visual = context.visual[row]
            group, ring, size = crop_rings(visual)
            mine = visual.image == item
            groups = torch.unique(group[mine])
            sizes = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_(0, group, size)[groups]
            group_start = int(first) + torch.cumsum(sizes, 0) - sizes  # each crop after the previous ones' rings
            starts = group_start[torch.searchsorted(groups, group[mine])]
            inside = visual.slots[mine] - start
            # structural tokens (image newlines) take the outer ring of the crop they close
            owner = torch.full((count,), -1, dtype=torch.long)
            owner[inside] = torch.arange(inside.numel())
            span = starts[torch.cummax(owner, 0).values.clamp(min=0)]
            span[inside] = starts + ring[mine]
            return span, first - 1 + float(sizes.sum())

        return sequential_positions(context, place, dtype=context.positions.dtype)

    def mask_function(self, context: AttentionContext):
        if context.visual is None:
            return None
        width = int(max(context.key_slots.max(), context.query_slots.max())) + 2
        group = torch.full((len(context.visual), width), -1, dtype=torch.long)
        ring = torch.zeros_like(group)
        for row, visual in enumerate(context.visual):
            if len(visual):
                group[row, visual.slots], ring[row, visual.slots], _ = crop_rings(visual)
        key_slots, query_slots = context.key_slots, context.query_slots

        def concentric(b, h, q, kv):
            key, query = key_slots[b, kv], query_slots[b, q]
            key_group, query_group = group[b, key.clamp(min=0)], group[b, query.clamp(min=0)]
            same = (key_group == query_group) & (query_group >= 0)
            inner = ring[b, key.clamp(min=0)] <= ring[b, query.clamp(min=0)]
            return torch.where(same, inner, key <= query)

        return concentric

