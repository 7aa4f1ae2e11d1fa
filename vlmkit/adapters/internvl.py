"""InternVL (`InternVLForConditionalGeneration`): InternViT tower with [CLS], pixel shuffle, MLP projector, Qwen2.

The processor cuts each image into tiles of the tower's size (the tile grid closest to the image's
aspect ratio, row-major) plus a thumbnail when there are several, and writes `<img>`, one
placeholder per token of every tile, `</img>`. The model encodes the tiles as a batch of
independent images: the "default" strategy drops [CLS] (index 0), the pixel shuffle joins each 2 x 2
block of patches into one token ((2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) become token (r, c)),
and the projector maps each token alone. Nothing in that call says which tiles belong to one image,
but the prompt does: an image's tiles fill one run of placeholders, and images are apart (`</img><img>`).
So the engine joins adjacent runs into one image (`join_runs`): its tiles are crops 1..n in the
processor's row-major order and the thumbnail, last in the run, is crop 0 (the base view, as
LLaVA-NeXT's); rows and columns stay those of each tile's own grid (the tile grid's shape is not in
the encoder call). Tower probes are joined over the same 2 x 2 blocks by the model's own pixel
shuffle: attention masses add up, logits and vectors average. Text positions are 1-D.
"""
from __future__ import annotations

import math

import torch

from vlmkit.adapters.base import Adapter, attention_marginals, cls_row_probe, concat_probes, grid_coords, join_tiles
from vlmkit.engine.state import VisualMeta


class _NormedProjections:
    """An InternViT attention whose `q_proj` and `k_proj` give the queries and keys it attends with
    (after its optional q/k norms), so the shared CLIP-style probes read them unchanged."""

    def __init__(self, attention):
        self.q_proj = lambda hidden: attention.q_norm(attention.q_proj(hidden))
        self.k_proj = lambda hidden: attention.k_norm(attention.k_proj(hidden))
        self.head_dim, self.scale = attention.head_dim, attention.scale


class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    @property
    def vision_layers(self):
        return self.base_model.vision_tower.encoder.layer

    def vision_attention(self, layer_index):
        return self.vision_layers[layer_index].attention

    def vision_probe(self, attention, hidden, kwargs):
        return cls_row_probe(_NormedProjections(attention), hidden)

    def vision_marginals(self, attention, hidden, kwargs):
        return attention_marginals(_NormedProjections(attention), hidden, skip_first=self.select_strategy() == "default")

    def vision_full_keys(self, attention, hidden, kwargs):
        return {"full_keys": _NormedProjections(attention).k_proj(hidden)}

    def with_features(self, probes, features, call):
        """The probes joined, plus "features": the projector's input, already one row per token (its
        2 x 2 patches side by side, as the pixel shuffle lays them out)."""
        return [{**(concat_probes(probes) or {}), "features": torch.cat(features)}]

    def join_patches(self, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-patch probe entries (tiles, patches) or (tiles, patches, d) -> per token, over the blocks
        the model's pixel shuffle joins: attention masses add up, logits and vectors average."""
        joined = {}
        for name, value in probe.items():
            channels = value if value.ndim == 3 else value[..., None]
            tiles, patches, width = channels.shape
            side = math.isqrt(patches)
            shuffled = self.base_model.pixel_shuffle(
                channels.reshape(tiles, side, side, width), scale_factor=self.model.config.downsample_ratio
            )
            blocks = shuffled.reshape(tiles, -1, shuffled.shape[-1] // width, width)
            masses = value.ndim == 2 and not name.endswith("logits")
            tokens = blocks.sum(dim=2) if masses else blocks.mean(dim=2)
            joined[name] = tokens if value.ndim == 3 else tokens[..., 0]
        return joined

    def visual_metas(self, modality, call, output, probes):
        tiles, tokens = output.pooler_output.shape[:2]
        side = math.isqrt(tokens)
        probe = concat_probes(probes)
        if probe is not None:
            features = probe.pop("features", None)
            probe = self.join_patches(self.patch_probe([probe], call))
            if features is not None:
                probe["features"] = features
        coords = grid_coords(1, side, side)
        return [
            VisualMeta("image", (1, side, side), coords, None if probe is None else {k: v[tile] for k, v in probe.items()})
            for tile in range(tiles)
        ]

    join_runs = staticmethod(join_tiles)  # tiles crops 1..n, the last run (whole image) crop 0
