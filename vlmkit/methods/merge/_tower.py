"""What the methods that merge inside vision towers (ToMe, DyMU) share: the families whose towers they
cannot act in, and the selection of the tokens that stand for the merged ones."""
from __future__ import annotations

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.methods.base import TokenSelector
from vlmkit.methods.prune._grid import probe_values

MERGE_UNSUPPORTED: dict[str, str] = dict.fromkeys(
    ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    "its packed ViT joins 2 x 2 patches in a merger after the blocks; merging inside breaks that grouping",
) | {
    "internvl": "its pixel shuffle joins 2 x 2 patches after the InternViT blocks (no ToMe layout); merging inside breaks "
    "that grouping",
} | dict.fromkeys(
    ("idefics3", "smolvlm"),
    "its connector's pixel shuffle joins s x s patches after the SigLIP blocks (no ToMe layout); merging inside breaks "
    "that grouping",
) | {
    "fast_vlm": "its FastViTHD tower is convolutional stages with self-attention over a shrinking feature grid, not a stack "
    "of ViT blocks over one token sequence (no ToMe layout)",
    "gemma3": "its projector average-pools k x k patches into one token after the SigLIP blocks (no ToMe layout); merging "
    "inside breaks that grouping",
}


class TowerMerge(TokenSelector):
    """A method that merges tokens in the vision tower: the engine installs it there (`install_tower_merge`)
    and keeps the handle; the LLM receives one token per merged group, its representative."""

    needs = frozenset({"vision_merge"})
    unsupported = MERGE_UNSUPPORTED

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.handle = None

    @property
    def state(self):
        """What the tower's last forward recorded (sizes, sources; the handle's state)."""
        return None if self.handle is None else self.handle.state

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for visual, probes in zip(context.visual, context.vision):
            stands_for = probe_values(visual, probes, "representative") > 0.5
            for image, modality in enumerate(visual.modality):
                if modality == "video":  # pooled after the projector: every pooled token enters
                    stands_for[visual.image_index(image)] = True
            samples.append(SampleSelection(torch.nonzero(stands_for).flatten()))
        return Selection(samples)
