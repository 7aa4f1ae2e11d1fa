"""Qwen2-VL and Qwen2.5-VL: a ViT with 2-D RoPE and no [CLS], a 2x2 patch merger, M-RoPE in the LLM.

Each image or video becomes (t, h/2, w/2) tokens in t-major, row-major order (the merger joins four
consecutive patches). Rotary positions are 3-D (temporal, height, width); after pruning the kept
tokens keep their 3-D ids, so `rope_deltas` (max position + 1 - length) stays valid for decoding.
The vision probe scores patches by the mean attention they receive within their own image/frame
window (the tower's `cu_seqlens`) and sums them over each 2x2 merge group.
"""
from __future__ import annotations

import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from vlmkit import kernels
from vlmkit.adapters.base import Adapter, concat_probes, grid_coords
from vlmkit.engine.state import VisualMeta
from vlmkit.errors import UnsupportedModelError


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    media = ("images", "videos")
    mrope = True

    def __init__(self, model):
        super().__init__(model)
        if any(kind != "full_attention" for kind in getattr(self.text_config, "layer_types", None) or []):
            raise UnsupportedModelError(
                f"{type(model).__name__} with sliding-window layers is not supported by vlmkit's token engine; "
                "load it with use_sliding_window=False"
            )

    @property
    def vision_layers(self):
        return self.base_model.visual.blocks

    def vision_attention(self, layer_index):
        return self.vision_layers[layer_index].attn

    def default_vision_layer(self) -> int:
        # The LLM reads the last block (through the merger); like LLaVA's -2, score one block earlier.
        return len(self.vision_layers) - 2

    #: the tower's rotary function (each family's modelling module has its own)
    rotary_vision = staticmethod(apply_rotary_pos_emb_vision)

    def vision_marginals(self, attention, hidden, kwargs):
        return None  # the tower attends within each image of a packed sequence: no dense map per row

    def vision_full_keys(self, attention, hidden, kwargs):
        return None

    def vision_probe(self, attention, hidden, kwargs):
        length = hidden.shape[0]
        query, key, _ = attention.qkv(hidden).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        query, key = self.rotary_vision(query, key, cos, sin)
        query, key = query.transpose(0, 1)[None], key.transpose(0, 1)[None]  # (1, heads, length, d)
        bounds = kwargs["cu_seqlens"].tolist()
        received = torch.cat(
            [
                kernels.attention_colsum(query[:, :, a:b], key[:, :, a:b], scale=attention.scaling, causal=False)[0]
                / ((b - a) * attention.num_heads)
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
        )
        return {"importance": received[None], "keys": key.mean(dim=1)}

    def visual_metas(self, modality, call, output, probes):
        grids = call["image_grid_thw" if modality == "image" else "video_grid_thw"]
        merge = self.base_model.visual.spatial_merge_size
        probe = concat_probes(probes)
        if probe is not None:  # patches -> merged tokens (groups of merge**2 consecutive patches), in sequence order
            unit, order = merge * merge, self.token_order(grids)
            merged = {}
            for name, value in probe.items():  # scores add up over a token's patches; vectors average
                value = value[0]
                value = value.reshape(-1, unit).sum(dim=1) if value.ndim == 1 else value.reshape(-1, unit, value.shape[-1]).mean(dim=1)
                merged[name] = value if order is None else value[order]
        metas, start = [], 0
        for t, h, w in grids.tolist():
            rows, cols = h // merge, w // merge
            count = t * rows * cols
            meta_probe = None
            if probe is not None:
                meta_probe = {name: value[start : start + count] for name, value in merged.items()}
            metas.append(VisualMeta(modality, (t, rows, cols), grid_coords(t, rows, cols), meta_probe))
            start += count
        return metas

    def token_order(self, grids: torch.Tensor) -> torch.Tensor | None:
        """Permutation from the tower's internal token order to sequence order (None: the same)."""
        return None

    def split_positions(self, position_ids, batch, length, past, device):
        """As `Qwen2VLTextModel.forward`: 3-D rotary positions, plus a text row when 4 rows are given."""
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            return position_ids[1:], position_ids[0]
        return position_ids, None


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, but its tower runs most blocks on windows of merged tokens, in a
    window-major order that it undoes after the merger; probe results are put back in sequence order."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def token_order(self, grids):
        visual = self.base_model.visual
        window_index, _ = get_vision_window_index(
            grids, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
        )
        return torch.argsort(window_index)
