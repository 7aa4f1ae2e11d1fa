"""Training-free mixture-of-depths for visual tokens, executed as p-MoD does it.

Site: `route`, mode "skip". In each routed decoder layer only the top share of the visual tokens
runs the layer; the others ride the residual and write no key or value there. Text tokens always
run. Kept tokens keep their position ids, and decoding runs every layer for new tokens.

Execution follows p-MoD (Zhang et al. 2024, arXiv:2412.04449; MCG-NJU/p-MoD @459f6df,
`llava/model/language_model/pmod_llava_llama.py`, `ModLayer.forward`): gather the kept tokens, run
the layer, scatter back; per sample `k = trunc(n_visual * r_l)`; progressive ratio decay r_l
(`vlmkit.methods.depth.schedules.progressive_ratios`, shifted cosine over the model's own depth,
layers with r_l <= `start` routed, floor `floor`) or an explicit per-layer list. p-MoD learns its
router and weighs the MLP output by it (TanhNorm, STRing); here no router is trained and every
running token is weighted 1, so the score is free:
- `score="attention"`: the last token's attention to each visual token at the routed layer's
  input (mean over heads), recomputed from one query row as FastV's is (no eager attention);
- `score="update"`: the norm of each visual token's update in the previous layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmkit.engine.contexts import Route, RouteContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, Router, top_k_sorted
from vlmkit.methods.depth.schedules import kept_tokens, progressive_ratios
from vlmkit.registry import register_method

SCORES = ("attention", "update")


def _ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"mod: {name}={value!r} is out of range: a keep ratio lies in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class MoDConfig(MethodConfig):
    ratios: tuple[float, ...] | None = field(
        default=None, metadata={"help": "keep ratio of every decoder layer (1.0: dense), instead of the progressive decay"}
    )
    start: float = field(default=0.85, metadata={"help": "layers whose decayed ratio is at most this are routed"})
    floor: float = field(default=0.15, metadata={"help": "the lowest keep ratio of a routed layer"})
    average: float = field(default=0.5, metadata={"help": "shift of the cosine decay (p-MoD's router factor)"})
    score: str = field(default="attention", metadata={"help": "'attention' (last token's attention) or 'update' (previous layer's update norm)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratios is not None:
            values = (self.ratios,) if isinstance(self.ratios, (int, float)) else tuple(self.ratios)
            object.__setattr__(self, "ratios", tuple(_ratio("ratios", v) for v in values))
        for name in ("start", "floor"):
            _ratio(name, getattr(self, name))
        if isinstance(self.average, bool) or not isinstance(self.average, (int, float)):
            raise ConfigError(f"mod: average={self.average!r} must be a number")
        if self.score not in SCORES:
            raise ConfigError(f"mod: score={self.score!r} is not one of {', '.join(SCORES)}")


@register_method("mod", family="depth", sites="route")
class MoD(Router):
    """Run only the top share of visual tokens through each routed layer (p-MoD's execution, no training)."""

    Config = MoDConfig
    example = "floor=0.25"
    neutral = "floor=1.0"
    paper = "https://arxiv.org/abs/2412.04449"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({self.config.score})

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        """The keep ratio of every decoder layer (None: dense, not routed)."""
        if self.config.ratios is not None:
            return [None if ratio == 1 else ratio for ratio in self.config.ratios]
        return progressive_ratios(num_layers, self.config.start, self.config.floor, self.config.average)

    def check_adapter(self, adapter) -> None:
        layers = len(adapter.decoder_layers)
        if self.config.ratios is not None and len(self.config.ratios) != layers:
            raise ConfigError(f"mod: ratios has {len(self.config.ratios)} entries; this model has {layers} decoder layers")
        if self.config.score == "update" and self.layer_ratios(layers)[0] is not None:
            raise ConfigError("mod: score='update' reads the previous layer's update, so layer 0 cannot be routed")

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(layer for layer, ratio in enumerate(self.layer_ratios(num_layers)) if ratio is not None)

    def route(self, context: RouteContext) -> Route:
        ratio = self.layer_ratios(context.num_layers)[context.layer]
        scores = context.attention if self.config.score == "attention" else context.update
        return Route([top_k_sorted(s, kept_tokens(s.numel(), ratio)) for s in scores], mode="skip")
