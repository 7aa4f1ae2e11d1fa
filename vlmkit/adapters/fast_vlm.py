"""FastVLM (`FastVlmForConditionalGeneration`): a FastViTHD tower (timm through `TimmWrapperModel`), a
2-layer MLP projector, Qwen2.

The tower is convolutional: a stem and RepMixer stages shrink the image 4x and then 2x per stage, and
the last stages mix tokens with self-attention over their feature grid; a final conv (3 x 3, with
squeeze-excite) widens the last stage's grid. The model flattens that grid, (B, C, H, W) -> (B, H*W, C)
in row-major order, and projects each cell alone: an image is H x W placeholders (one per 64 x 64
pixels: 16 x 16 for the released models' 1024-pixel images), the token at (row, col) in position
row * W + col of its run. There is no [CLS]; text positions are 1-D.

Tower probes: the self-attention blocks of the last stage attend over exactly the grid the LLM reads
(the final conv keeps its size), so they are the adapter's vision layers (the last one is the default,
the layer nearest the features); "importance" is the mean attention a cell receives (no [CLS]), as for
SigLIP towers. Earlier stages (coarser attention grids, RepMixer convolutions) are not probed. The
tower is no stack of ViT blocks over one token sequence, so tower merging (ToMe, DyMU) does not apply.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.adapters.base import Adapter, attention_marginals, concat_probes, grid_coords, received_attention_probe
from vlmkit.engine.state import VisualMeta


class _GridAttention:
    """A FastViT attention (one fused `qkv` projection) seen as a CLIP-style one: `q_proj` and `k_proj`
    of (B, N, C) tokens give the queries and keys it attends with, so the shared probes read them."""

    def __init__(self, attention: nn.Module):
        width = attention.qkv.in_features
        self.q_proj = lambda tokens: attention.qkv(tokens)[..., :width]
        self.k_proj = lambda tokens: attention.qkv(tokens)[..., width : 2 * width]
        self.head_dim, self.scale = attention.head_dim, attention.scale


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) attention input -> (B, H*W, C) tokens in row-major order, as the attention flattens it."""
    return grid.flatten(2).transpose(1, 2)


class FastVlmAdapter(Adapter):
    family = "fast_vlm"
    model_classes = ("FastVlmForConditionalGeneration",)

    @property
    def timm_model(self) -> nn.Module:
        """The timm FastViT inside the tower's `TimmWrapperModel`."""
        return self.base_model.vision_tower.timm_model

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The self-attention blocks of the tower's last stage (its grid is the one the LLM reads)."""
        blocks = self.timm_model.stages[-1].blocks
        return nn.ModuleList(block for block in blocks if hasattr(block, "token_mixer") and hasattr(block.token_mixer, "qkv"))

    def vision_attention(self, layer_index):
        return self.vision_layers[layer_index].token_mixer

    def select_strategy(self, call: dict | None = None) -> str:
        """"full": no [CLS]; every grid cell reaches the LLM."""
        return "full"

    def vision_probe(self, attention, hidden, kwargs):
        return received_attention_probe(_GridAttention(attention), _tokens(hidden))

    def vision_marginals(self, attention, hidden, kwargs):
        return attention_marginals(_GridAttention(attention), _tokens(hidden), skip_first=False)

    def vision_full_keys(self, attention, hidden, kwargs):
        return {"full_keys": _GridAttention(attention).k_proj(_tokens(hidden))}

    def visual_metas(self, modality, call, output, probes):
        rows, cols = output.last_hidden_state.shape[-2:]  # the final conv's (B, C, H, W) grid
        probe = concat_probes(probes)
        coords = grid_coords(1, rows, cols)
        return [
            VisualMeta("image", (1, rows, cols), coords, None if probe is None else {k: v[index] for k, v in probe.items()})
            for index in range(output.pooler_output.shape[0])
        ]
