"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower (no [CLS]), AnyRes, Qwen2.

Images are packed as in LLaVA-NeXT (with OneVision's cap on the number of tile tokens); videos are
encoded frame by frame, pooled 2x2 (bilinear) and end with one newline token. SigLIP has no [CLS],
so attention-based methods score a patch by the mean attention it receives; with a CLIP tower
(strategy "default", as in `shapes-video`) they use the [CLS] row, as for LLaVA-1.5.
"""
from __future__ import annotations

from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from vlmkit.adapters.anyres import packed_metas, pooled_video_metas
from vlmkit.adapters.base import Adapter, cls_row_probe, received_attention_probe


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    media = ("images", "videos")

    def vision_probe(self, attention, hidden, kwargs):
        if self.select_strategy() == "default":  # a CLIP tower: its [CLS] row scores the patches
            return cls_row_probe(attention, hidden)
        return received_attention_probe(attention, hidden)

    def visual_metas(self, modality, call, output, probes):
        config = self.model.config
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        probe = self.patch_probe(probes, call)
        if modality == "video":
            frames = [call["pixel_values_videos"].shape[1]] * call["pixel_values_videos"].shape[0]
            return pooled_video_metas(self.base_model.apply_pooling, frames, side, probe, newline=True)
        sizes = call["image_sizes"]
        batch_num_images = call.get("batch_num_images")
        tiled = [True] * len(sizes) if batch_num_images is None else [n == 1 for n in batch_num_images for _ in range(n)]
        crops = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, tile) if tile_it else 1
            for size, tile_it in zip(sizes, tiled)
        ]
        columns = [get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)[1] for size in sizes]
        return packed_metas(
            self.base_model.pack_image_features, sizes, crops, side, columns, probe,
            vision_aspect_ratio=call.get("vision_aspect_ratio") or config.vision_aspect_ratio,
        )
