"""Per-layer keep ratios shared by the routing methods.

p-MoD's progressive ratio decay (Zhang et al. 2024, MCG-NJU/p-MoD
`llava/model/language_model/pmod_llava_llama.py`: `shifted_cos_with_ratio`, `build_mod_layers`),
over the model's own depth L instead of the original's hard-coded 32 layers:

    r_l = cos(l * pi / (L - 1)) / 2 + average

a layer is routed when r_l <= start, with keep ratio max(r_l, floor); the other layers are dense.
With L = 32, average 0.5, start 0.85 and floor 0.15 (the paper's "shiftedcos_decay_0.85_0.15")
layers 8-31 are routed, 24-31 at the floor, and the mean keep ratio over all 32 layers is 0.5375.
"""
from __future__ import annotations

import math


def progressive_ratios(num_layers: int, start: float = 0.85, floor: float = 0.15, average: float = 0.5) -> list[float | None]:
    """Keep ratio of every decoder layer: None for the dense layers, max(r_l, floor) for the routed ones."""
    ratios: list[float | None] = []
    for layer in range(num_layers):
        ratio = math.cos(layer * math.pi / max(num_layers - 1, 1)) / 2 + average
        ratios.append(None if ratio > start else max(ratio, floor))
    return ratios


def kept_tokens(available: int, ratio: float) -> int:
    """Visual tokens a layer keeps at `ratio`: truncated, as p-MoD's `int(n * ratio)`."""
    return int(available * ratio)
