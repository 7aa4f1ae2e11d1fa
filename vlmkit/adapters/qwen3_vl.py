"""Qwen3-VL: Qwen2-VL's packed ViT (2-D RoPE, no [CLS], a 2x2 patch merger) with a learned position grid
and DeepStack, and a Qwen3 decoder (q/k RMS norms) with interleaved M-RoPE sections.

- Visual layout: each image becomes (1, h/2, w/2) tokens in row-major order; a video becomes one run of
  (h/2, w/2) tokens per temporal patch, each run after its timestamp text ("<0.5 seconds>
  <|vision_start|>...<|vision_end|>"), so a video's placeholders are `t` runs (`VisualMeta.runs`) and
  frame f of the grid is run f.
- Rotary: 3-D (temporal, height, width) positions; the text model's rotary module interleaves the
  sections (frequency pair j takes height where j % 3 == 1 and j < 3 * section_h, width where
  j % 3 == 2 and j < 3 * section_w, else temporal). After pruning the kept tokens keep their 3-D ids,
  so `rope_deltas` stays valid for decoding, as for Qwen2-VL.
- DeepStack: the tower's `deepstack_visual_indexes` blocks each feed a merger of their own; the text
  model adds level i's features to the visual tokens' hidden states after decoder layer i. The adapter
  hands them to the engine (`deepstack_inputs`), which adds to every visual token still in the stream
  its own features (`vlmkit.engine.runner`).
- Probes: as Qwen2-VL's, the mean attention a patch receives within its image or frame window, summed
  over each 2x2 merge group. There is no [CLS]: methods that read a [CLS] row fall back to that score
  where they can, or refuse the family.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from vlmkit.adapters.base import DeepStackInputs
from vlmkit.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)

    rotary_vision = staticmethod(apply_rotary_pos_emb_vision)

    def visual_metas(self, modality, call, output, probes):
        metas = super().visual_metas(modality, call, output, probes)
        if modality == "video":  # one placeholder run per temporal patch, timestamps between them
            for meta in metas:
                frames, rows, cols = meta.grid
                meta.runs = (rows * cols,) * frames
        return metas

    # ----------------------------------------------------------------- decoder
    def llm_queries(self, attention, normed):
        batch, length, _ = normed.shape
        return attention.q_norm(attention.q_proj(normed).view(batch, length, -1, attention.head_dim)).transpose(1, 2)

    def llm_keys(self, attention, normed):
        batch, length, _ = normed.shape
        return attention.k_norm(attention.k_proj(normed).view(batch, length, -1, attention.head_dim)).transpose(1, 2)

    def deepstack_inputs(self, kwargs: dict[str, Any]) -> DeepStackInputs | None:
        """`visual_pos_masks` and `deepstack_visual_embeds` (level i after decoder layer i), as
        `Qwen3VLTextModel.forward` takes them."""
        mask = kwargs.pop("visual_pos_masks", None)
        features = kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or not features:
            return None
        return DeepStackInputs(mask.to(torch.bool), torch.stack(list(features)), tuple(range(len(features))))


__all__ = ["Qwen3VLAdapter"]
