"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): CLIP tower, AnyRes images, pooled videos, Llama.

Images are packed as in LLaVA-NeXT (base view, unpadded tiles, a newline token ending each row of
the tile grid). Videos are encoded frame by frame; the model's resampler pools each frame's patch
grid (windows and stride `spatial_pool_stride`, average by default) before the projector, and the
frames follow one another with no newline token. So each pooled token is projected from a pooled
vision feature of its own, which its probe carries ("features"); the tower's probe values are pooled
over the same windows (averaged where the resampler is a learned convolution).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from vlmkit.adapters.anyres import pooled_video_metas
from vlmkit.adapters.llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    media = ("images", "videos")

    def pool_frames(self, values: torch.Tensor) -> torch.Tensor:
        """(frames, side*side, c) per-patch values -> (frames, pooled*pooled, c), over the windows of
        the model's resampler: its own pooling where it pools each channel alone (average, max), the
        windows' mean where it is a convolution (which would mix the channels)."""
        resampler = self.base_model.vision_resampler
        if not isinstance(resampler.pool, nn.Conv2d):
            return resampler(values)
        frames, patches, width = values.shape
        side = math.isqrt(patches)
        grid = values.view(frames, side, side, width).permute(0, 3, 1, 2)
        pooled = functional.avg_pool2d(grid, resampler.pool.kernel_size, resampler.pool.stride)
        return pooled.flatten(2).transpose(1, 2)

    def visual_metas(self, modality, call, output, probes):
        if modality == "image":
            return super().visual_metas(modality, call, output, probes)
        videos, frames = call["pixel_values_videos"].shape[:2]
        vision = self.model.config.vision_config
        return pooled_video_metas(
            self.pool_frames, [frames] * videos, vision.image_size // vision.patch_size,
            self.patch_probe(probes, call), newline=False, pooled_before_projector=True,
        )
