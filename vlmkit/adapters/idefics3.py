"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`): a
SigLIP-style tower without [CLS], a connector that pixel-shuffles then maps linearly, a Llama decoder.

The processor resizes each image, cuts it into square tiles of the tower's size (row-major) and adds
the whole image at one tile's size (the global image, last), unless the image fits one tile (then the
global image alone). It writes, per tile, `<fake_token_around_image><row_i_col_j>` and one `<image>`
placeholder per token (a newline after each row of tiles), then `\\n<fake_token_around_image>
<global-img>`, the global image's placeholders and `<fake_token_around_image>`. The model encodes
every tile of the batch as one independent tower row (all-zero padding tiles dropped); the connector's
pixel shuffle joins each s x s block of patches into one token (patches (s r + i, s c + j) of token
(r, c) side by side, in (i, j) row-major order; s = `scale_factor`) and the projection maps each
token alone. So a tile's tokens are a (side / s)^2 grid in row-major order.

The encoder returns one feature tensor per sample (its tiles concatenated); the adapter re-cuts it
into one tensor per tile (the model concatenates them back alike), so that each tile is one visual
item on its own run of placeholders, with row/col in its own grid. The prompt says which tiles form
one image, but the text tokens between them keep the engine from seeing them as adjacent runs, so a
method's "image" is a tile; `join_runs` gives the joined layout (tiles crops 1..n in row-major order,
the global image crop 0, as LLaVA-NeXT's base view) for when the engine groups runs by the prompt.

Tower probes: SigLIP has no [CLS], so "importance" is the mean attention a patch receives; probes are
joined over the shuffle's blocks by the connector's own pixel shuffle: attention masses add up,
logits and vectors average. "features" are the projection's inputs (one row per token). Text
positions are 1-D.
"""
from __future__ import annotations

import torch

from vlmkit.adapters.base import SiglipTowerAdapter, concat_probes, grid_coords, join_tiles
from vlmkit.engine.state import VisualMeta

#: probe entries that are attention masses (they add up over a token's patches); the others average
_MASSES = ("importance", "received", "paid")


class Idefics3Adapter(SiglipTowerAdapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration",)

    @property
    def text_model(self):
        return self.base_model.text_model

    @property
    def vision_tower(self):
        return self.base_model.vision_model

    @property
    def vision_layers(self):
        return self.base_model.vision_model.encoder.layers

    @property
    def projector(self):
        """The connector's linear projection (its input is already one row per pixel-shuffled token)."""
        return self.base_model.connector.modality_projection

    @property
    def scale_factor(self) -> int:
        return int(self.model.config.scale_factor)

    def with_features(self, probes, features, call):
        """The probes joined, plus "features": the projection's input, one row per token (its s x s
        patches side by side, as the pixel shuffle lays them out)."""
        return [{**(concat_probes(probes) or {}), "features": torch.cat(features)}]

    def join_patches(self, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-patch probe entries (tiles, patches) or (tiles, patches, d) -> per token, over the blocks
        the connector's pixel shuffle joins: attention masses add up, logits and vectors average."""
        shuffle, scale = self.base_model.connector.pixel_shuffle, self.scale_factor
        joined = {}
        for name, value in probe.items():
            channels = value if value.ndim == 3 else value[..., None]
            tiles, patches, width = channels.shape
            blocks = shuffle(channels, scale).reshape(tiles, patches // scale**2, scale**2, width)
            tokens = blocks.sum(dim=2) if value.ndim == 2 and name.split("@")[0] in _MASSES else blocks.mean(dim=2)
            joined[name] = tokens if value.ndim == 3 else tokens[..., 0]
        return joined

    def visual_metas(self, modality, call, output, probes):
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size // self.scale_factor  # tokens per tile side
        tiles = torch.cat(list(output.pooler_output)).split(side * side)
        output.pooler_output = list(tiles)  # one feature tensor per tile (the model concatenates them)
        probe = concat_probes(probes)
        if probe is not None:
            features = probe.pop("features", None)
            probe = self.join_patches(probe)
            if features is not None:
                probe["features"] = features
        coords = grid_coords(1, side, side)
        return [
            VisualMeta("image", (1, side, side), coords, None if probe is None else {k: v[tile] for k, v in probe.items()})
            for tile in range(len(tiles))
        ]

    join_runs = staticmethod(join_tiles)  # tiles crops 1..n, the last run (whole image) crop 0


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's architecture (its own classes; a wider pixel shuffle in the released models)."""

    family = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration",)
