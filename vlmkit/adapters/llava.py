"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower with [CLS], MLP projector, Llama decoder.

Each image becomes `(image_size / patch_size) ** 2` placeholder tokens in row-major order (the
[CLS] token is dropped by the default feature-select strategy; with "full" it is kept and treated
as a structural token that is never pruned).
"""
from __future__ import annotations

import math

import torch

from vlmkit.adapters.base import Adapter, cls_row_probe, concat_probes, grid_coords
from vlmkit.engine.state import VisualMeta


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def vision_probe(self, attention, hidden, kwargs):
        return cls_row_probe(attention, hidden)

    def visual_metas(self, modality, call, output, probes):
        strategy = self.select_strategy(call)
        features = output.pooler_output
        probe = concat_probes(probes)
        metas = []
        for index, image_features in enumerate(features):
            count = image_features.shape[0]
            with_cls = strategy == "full"
            side = math.isqrt(count - int(with_cls))
            coords = grid_coords(1, side, side)
            if with_cls:
                coords = torch.cat([torch.tensor([[0, 0, 0, -1]]), coords])
            image_probe = None
            if probe is not None:
                start = 0 if with_cls else 1  # the tower always has [CLS] at index 0
                image_probe = {name: value[index, start:] for name, value in probe.items()}
            metas.append(VisualMeta("image", (1, side, side), coords, image_probe))
        return metas

