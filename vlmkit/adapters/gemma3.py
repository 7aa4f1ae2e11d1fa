"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower without [CLS], a projector that average-pools
the patch grid and maps each pooled token alone, and a Gemma 3 decoder of sliding-window and global layers.

- Visual layout: the processor writes each image as "\\n\\n<start_of_image>", `mm_tokens_per_image`
  placeholders and "<end_of_image>\\n\\n". The projector pools the tower's (P x P) patch grid k x k (k = P /
  sqrt(mm_tokens_per_image)), RMS-norms and projects each pooled token, so an image's placeholders are its
  pooled grid in row-major order. With pan-and-scan the processor adds, after the whole image, 2 to 4 crops
  of it, each a full image sequence of its own (text between them); the model encodes every crop as one
  tower row, so each crop is one visual item on its own run of placeholders (the encoder call does not
  say which crops belong to which image).
- Attention: every decoder layer is causal, except that each run of image placeholders (one image or crop,
  as `token_type_ids` marks them) attends to itself both ways; sliding-window layers see only the keys
  less than `sliding_window` positions back. The engine keeps both after pruning: a kept visual token sees
  every kept token of its own image, and windows are measured in the prompt's original positions
  (`vlmkit.engine.runner`).
- Rotary: 1-D positions; sliding-window layers take the local base, global layers the global base.
- Decoder layers normalise the attention and MLP outputs before adding them (four norms per layer), and
  queries and keys pass through RMS norms before rotary.
- Probes: SigLIP has no [CLS], so "importance" is the mean attention a patch receives; entries are joined
  over each token's k x k patches as the projector pools them (attention masses add up, logits and vectors
  average). "features" are the pooled tower outputs, one row per token (what the projector's norm reads).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from vlmkit.adapters.base import SiglipTowerAdapter, concat_probes, grid_coords
from vlmkit.engine.state import VisualMeta

#: probe entries that are attention masses (they add up over a token's patches); the others average
_MASSES = ("importance", "received", "paid")


class Gemma3Adapter(SiglipTowerAdapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)

    # ----------------------------------------------------------------- the projector's pooling
    def pool(self, value: torch.Tensor, mass: bool = False) -> torch.Tensor:
        """Per-patch entries (images, P*P) or (images, P*P, d) -> per token (images, T) or (images, T, d), by
        the projector's own average pooling; `mass`: summed over a token's patches instead."""
        projector = self.projector
        side, kernel = projector.patches_per_image, projector.kernel_size
        channels = value if value.ndim == 3 else value[..., None]
        images, _, width = channels.shape
        grid = channels.transpose(1, 2).reshape(images, width, side, side)
        pooled = projector.avg_pool(grid).flatten(2).transpose(1, 2)
        if mass:
            pooled = pooled * kernel**2
        return pooled if value.ndim == 3 else pooled[..., 0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(n, d_vision) pooled tower outputs -> (n, d_llm), as the projector maps each pooled token."""
        projector = self.projector
        normed = projector.mm_soft_emb_norm(features)
        return torch.matmul(normed, projector.mm_input_projection_weight).type_as(features)

    def with_features(self, probes, features, call):
        """The probes joined, plus "features": the tower outputs pooled as the projector pools them (one row
        per token; the projector's norm and matrix map each row alone)."""
        return [{**(concat_probes(probes) or {}), "features": self.pool(torch.cat(features))}]

    def visual_metas(self, modality, call, output, probes):
        side = int(round(self.model.config.mm_tokens_per_image**0.5))
        probe = concat_probes(probes)
        if probe is not None:
            features = probe.pop("features", None)
            probe = {name: self.pool(value, mass=value.ndim == 2 and name.split("@")[0] in _MASSES)
                     for name, value in probe.items()}
            if features is not None:
                probe["features"] = features
        coords = grid_coords(1, side, side)
        return [
            VisualMeta("image", (1, side, side), coords, None if probe is None else {k: v[row] for k, v in probe.items()})
            for row in range(len(output.pooler_output))
        ]

    # ----------------------------------------------------------------- decoder
    def layer_type(self, index: int) -> str:
        return self.text_config.layer_types[index]

    def layer_window(self, index: int) -> int | None:
        return self.text_config.sliding_window if self.layer_type(index) == "sliding_attention" else None

    def rotary(self, hidden, positions, layer_type: str = "full_attention"):
        return self.rotary_module(hidden, positions, layer_type)

    def bidirectional_blocks(self, call_inputs: dict[str, Any]) -> torch.Tensor | None:
        """(B, T) the image block of each token of the call (-1: none) from `token_type_ids`: each run of
        image placeholders attends to itself both ways, as the model's masks have it."""
        token_type_ids = call_inputs.get("token_type_ids")
        if token_type_ids is None:
            return None
        return get_block_sequence_ids_for_mask(token_type_ids)

    def llm_queries(self, attention, normed):
        batch, length, _ = normed.shape
        return attention.q_norm(attention.q_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2))

    def llm_keys(self, attention, normed):
        batch, length, _ = normed.shape
        return attention.k_norm(attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2))

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        """The MLP's normalised output (what the layer adds to the residual stream)."""
        return layer.post_feedforward_layernorm

    def attention_options(self, attention) -> dict:
        return {"sliding_window": attention.sliding_window}

    def layer_residuals(self, layer, residual, attention_output):
        """Gemma 3 normalises the attention and MLP outputs before adding them to the residual stream."""
        states = residual + layer.post_attention_layernorm(attention_output)
        return states + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(states)))


__all__ = ["Gemma3Adapter"]
