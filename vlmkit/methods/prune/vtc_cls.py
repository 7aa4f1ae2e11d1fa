"""VTC-CLS: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (Wang et al., 2024,
arXiv:2412.05819). Reference: THU-MIG/VTC-CLS, `llava/model/multimodal_encoder/clip_encoder.py`,
`CLIPVisionTower.cls_token_only`, and `llava/model/llava_arch.py`, `encode_images` (method "VTC-CLS").

Site: `vision` (scores from the vision tower), applied before the LLM. Each patch is scored by the
attention [CLS] pays it, averaged over heads, summed over the vision layers from `start_layer` to the
layer the LLM reads,

    s_j = sum_{l = start .. L_read} 1/H sum_h softmax_j(q_h^l(CLS) . k_h^l(j) / sqrt(d)),

(the reference: `sum(attentions[start_layer:-1])`, i.e. layers 16..22 of CLIP ViT-L, whose layer 22
gives the second-to-last features LLaVA reads), and the `keep` share with the highest s_j enters the
LLM, in patch order (the reference sorts the kept indices). Towers without [CLS] (SigLIP in
LLaVA-OneVision, Qwen2-VL) score a patch by the mean attention it receives, layer by layer.

Defaults as the reference's evaluation scripts: `--layer 16` (of the 24-layer CLIP ViT-L, i.e.
two thirds of the depth: `start_layer=None` takes `2 * depth // 3` on any tower) and `--token_num 36`
(of 576 tokens: keep = 0.0625).

Deviations from the reference code, and why:
- scores come from one attention row per layer, computed from the layer's input with the kernels in
  `vlmkit.kernels` (the reference asks the tower for every attention map), and are summed in float32;
- the budget applies per tower row (an image; an AnyRes crop; a video frame) over the tokens that
  survive AnyRes unpadding (the reference is LLaVA-1.5 only, one image per batch); a `tokens` count
  is per tower row; a share rounds halves up; ties keep the lower index (torch `topk` leaves them open);
- on towers shallower than the default start, the start is the read layer (one layer, no ensemble).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, top_k_sorted
from vlmkit.methods.prune._grid import probe_values, tower_rows
from vlmkit.registry import register_method

DEFAULT_KEEP = 36 / 576  # the reference's --token_num 36


@dataclass(frozen=True)
class VTCCLSConfig(TokenBudgetConfig):
    start_layer: int | None = field(
        default=None,
        metadata={"help": "first vision layer of the [CLS]-attention ensemble (default: 2/3 of the depth, 16 of 24)"},
    )
    vision_layer: int | None = field(
        default=None, metadata={"help": "last vision layer of the ensemble (default: the layer the LLM reads)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("start_layer", "vision_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"vtc_cls: {name}={value!r} must be a vision layer index >= 0")
        if self.start_layer is not None and self.vision_layer is not None and self.start_layer > self.vision_layer:
            raise ConfigError(
                f"vtc_cls: start_layer={self.start_layer} is after vision_layer={self.vision_layer}; the ensemble "
                "runs from start_layer up to vision_layer"
            )


@register_method("vtc_cls", family="prune", sites=("vision", "embeds"))
class VTCCLS(TokenSelector):
    """Keep the patches [CLS] attends to most, summed over several vision layers, per tower row."""

    Config = VTCCLSConfig
    example = "keep=0.25,start_layer=0"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2412.05819"
    needs = frozenset({"vision_attention"})

    def vision_layer(self, adapter) -> int:
        return adapter.default_vision_layer() if self.config.vision_layer is None else self.config.vision_layer

    def start_layer(self, adapter) -> int:
        last = self.vision_layer(adapter)
        if self.config.start_layer is not None:
            return self.config.start_layer
        return min(2 * len(adapter.vision_layers) // 3, last)

    def check_adapter(self, adapter) -> None:
        last, depth = self.vision_layer(adapter), len(adapter.vision_layers)
        if last >= depth:
            raise ConfigError(f"vtc_cls: vision_layer={last} is out of range for a vision tower with {depth} layers")
        if self.start_layer(adapter) > last:
            raise ConfigError(
                f"vtc_cls: start_layer={self.config.start_layer} is after the last layer of the ensemble ({last}, the "
                f"layer the LLM reads); give start_layer <= {last}"
            )

    def extra_vision_layers(self, adapter) -> tuple[int, ...]:
        return tuple(range(self.start_layer(adapter), self.vision_layer(adapter)))

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for visual, probes in zip(context.visual, context.vision):
            scores = self.scores(visual, probes)
            kept = [
                unit[top_k_sorted(scores[unit], self.config.kept_count(unit.numel(), DEFAULT_KEEP))]
                for unit in tower_rows(visual)
            ]
            keep = torch.sort(torch.cat(kept)).values if kept else visual.slots.new_zeros(0)
            samples.append(SampleSelection(keep))
        return Selection(samples)

    @staticmethod
    def scores(visual, probes) -> torch.Tensor:
        """The ensemble score of every visual token: the sum of its importance over the probed layers."""
        layers = sorted({int(k.split("@")[1]) for p in probes for k in p if k.startswith("importance@")})
        names = [*(f"importance@{layer}" for layer in layers), "importance"]  # in layer order, as the reference
        return torch.stack([probe_values(visual, probes, name) for name in names]).sum(dim=0)
