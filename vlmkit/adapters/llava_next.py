"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): CLIP tower on AnyRes crops, image newlines, Llama.

Each image is a base view plus high-resolution tiles; the model unpads the tiles and ends every
row of the tile grid with an image-newline token. Newline tokens are structural (never pruned);
every other token knows its crop (0 = base view) and its row/column (tiles: in the grid of all tiles).
"""
from __future__ import annotations

from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from vlmkit.adapters.anyres import packed_metas
from vlmkit.adapters.base import Adapter, cls_row_probe


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def vision_probe(self, attention, hidden, kwargs):
        return cls_row_probe(attention, hidden)

    def crop_layout(self, image_sizes) -> tuple[list[int], list[int], int]:
        """(tower rows per image, tiles per row per image, patches per crop side)."""
        config = self.model.config
        tile = config.vision_config.image_size
        crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, tile) for size in image_sizes]
        columns = [get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)[1] for size in image_sizes]
        return crops, columns, tile // config.vision_config.patch_size

    def visual_metas(self, modality, call, output, probes):
        crops, columns, side = self.crop_layout(call["image_sizes"])
        return packed_metas(
            self.base_model.pack_image_features, call["image_sizes"], crops, side, columns,
            self.patch_probe(probes, call), vision_feature_select_strategy=self.select_strategy(call),
        )
