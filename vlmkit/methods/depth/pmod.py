"""p-MoD: "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay" (Zhang et al., 2024,
arXiv:2412.04449), inference with learned routers.

Site: `route`, mode "skip". Every routed decoder layer l has its own router, a `Linear(d, 1)` (with
bias) on the hidden state entering the layer. Only the visual tokens compete; text tokens always
run the layer. Per sample, with n visual tokens:

    w_i = 0.2 * tanh(router_l(x_i)) + 1                   (TanhNorm, "tanh_0.2_1")
    k   = trunc(n * r_l)                                  (the k highest w run the layer)
    running visual token:  x + attn(x) + w * mlp(...)     (STRing)
    resting visual token:  w * x                          (no query, no key or value, no MLP)

r_l is the progressive ratio decay (`vlmkit.methods.depth.schedules.progressive_ratios`):
r_l = cos(l * pi / (L - 1)) / 2 + average over the model's own depth L; layers with r_l <= start
are routed, with keep ratio max(r_l, floor) ("shiftedcos_decay_0.85_0.15": on 32 layers, layers
8-31 routed, 24-31 at 0.15). Resting tokens write no key or value in that layer; kept tokens keep
their positions; decoding runs every layer for new tokens.

Follows MCG-NJU/p-MoD @459f6df, `llava/model/language_model/pmod_llava_llama.py`: `TokenRouter`,
`ModLayer.forward` (top-k over the normalised weights, `torch.trunc(n * ratio)`, the scaling of
the visual rows after the layer then the residual added back for the kept rows),
`ModLayer.weight_normalization`, `shifted_cos_with_ratio`; router settings from
`scripts/train/finetune_eval_7b_pmod_llava_1_5.sh` (`mod_bias_enabled=True`,
`mod_special_init=True`: zero-initialised weight and bias). Deviations, and why:
- the decay runs over the model's own depth (the original hard-codes 31 = 32 layers - 1);
- per sample over its own visual tokens (the original squeezes batch size 1 at inference);
- ties are broken towards the lower index (`torch.topk` leaves their order unspecified). So an
  untrained (zero) router, whose weights are all 1, keeps the FIRST k visual tokens of every
  routed layer and leaves the model otherwise unchanged (w = 1);
- the routers live on this method, not in the model: `model.state_dict()` is unchanged while it
  is applied. Trained routers come from a safetensors file (`routers=FILE`, written by
  `save_routers`) that records the base model's weights hash, and a file for another model is
  refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vlmkit.engine.contexts import Route, RouteContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, Router, top_k_sorted
from vlmkit.methods.depth.router_files import check_routers, read_routers, write_routers
from vlmkit.methods.depth.schedules import kept_tokens, progressive_ratios
from vlmkit.registry import register_method

NORM_SCALE = 0.2  # TanhNorm "tanh_0.2_1": w = 0.2 * tanh(logit) + 1
NORM_BIAS = 1.0
SCHEDULE_FIELDS = ("start", "floor", "average")


def tanh_norm(logits: torch.Tensor) -> torch.Tensor:
    """p-MoD's TanhNorm: w = 0.2 * tanh(logit) + 1."""
    return torch.tanh(logits) * NORM_SCALE + NORM_BIAS


def _ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"pmod: {name}={value!r} is out of range: a keep ratio lies in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class PMoDConfig(MethodConfig):
    start: float = field(default=0.85, metadata={"help": "layers whose decayed ratio is at most this are routed"})
    floor: float = field(default=0.15, metadata={"help": "the lowest keep ratio of a routed layer"})
    average: float = field(default=0.5, metadata={"help": "shift of the cosine decay (p-MoD's router factor)"})
    routers: str | None = field(
        default=None, metadata={"help": "trained routers: a safetensors file, its folder or a shipped name (vlmkit train mod); none: zero routers"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("start", "floor"):
            _ratio(name, getattr(self, name))
        if isinstance(self.average, bool) or not isinstance(self.average, (int, float)):
            raise ConfigError(f"pmod: average={self.average!r} must be a number")


@register_method("pmod", family="depth", sites="route")
class PMoD(Router):
    """p-MoD: learned per-layer routers pick the visual tokens that run each routed layer (TanhNorm, STRing)."""

    Config = PMoDConfig
    example = "floor=0.25"
    neutral = "floor=1.0"
    paper = "https://arxiv.org/abs/2412.04449"

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.routers = nn.ModuleList()  # one Linear(d, 1) per routed layer, in layer order
        self.router_layers: tuple[int, ...] = ()
        self._file = None if self.config.routers is None else read_routers("pmod", self.config.routers)

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        """The keep ratio of every decoder layer (None: dense, not routed)."""
        return progressive_ratios(num_layers, self.config.start, self.config.floor, self.config.average)

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(layer for layer, ratio in enumerate(self.layer_ratios(num_layers)) if ratio is not None)

    def check_adapter(self, adapter) -> None:
        hidden = adapter.text_config.hidden_size
        depth = len(adapter.decoder_layers)
        routed = self.routed_layers(depth)
        settings = ", ".join(f"{name}={getattr(self.config, name)}" for name in SCHEDULE_FIELDS)
        if not routed:
            raise ConfigError(f"pmod: the schedule ({settings}) routes none of the {depth} decoder layers; raise start")
        ratios = self.layer_ratios(depth)
        empty = [layer for layer in routed if ratios[layer] <= 0]
        if empty:
            raise ConfigError(
                f"pmod: the schedule ({settings}) keeps no visual token in layers {empty} (keep ratio 0); raise floor"
            )
        if self._file is not None:
            check_routers("pmod", self._file, adapter, routed)
        if self.router_layers == routed and len(self.routers) and self.routers[0].in_features == hidden:
            return  # already built for this shape (e.g. applied again)
        self.router_layers = routed
        self.routers = nn.ModuleList(_zero_router(hidden) for _ in routed)
        if self._file is not None:
            tensors = self._file[0]
            with torch.no_grad():
                for layer, router in zip(routed, self.routers):
                    router.weight.copy_(tensors[f"layer.{layer}.weight"])
                    router.bias.copy_(tensors[f"layer.{layer}.bias"])

    def router(self, layer: int) -> nn.Linear:
        """The router of decoder layer `layer`."""
        if layer not in self.router_layers:
            raise ConfigError(f"pmod: layer {layer} is not routed (routed: {self.router_layers})")
        return self.routers[self.router_layers.index(layer)]

    def route(self, context: RouteContext) -> Route:
        ratio = self.layer_ratios(context.num_layers)[context.layer]
        router = self.router(context.layer).to(device=context.hidden.device, dtype=context.hidden.dtype)
        runs, weights = [], []
        with torch.set_grad_enabled(context.training and torch.is_grad_enabled()):  # training: STRing's gradient
            for row, visual in enumerate(context.visual):
                w = tanh_norm(router(context.hidden[row, visual.slots]).squeeze(-1))
                runs.append(top_k_sorted(w.detach(), kept_tokens(len(visual), ratio)))
                weights.append(w)
        return Route(runs, mode="skip", weights=weights)

    def trainable(self) -> nn.Module:
        """The parameters a fine-tune trains besides the model: the routers."""
        return self.routers

    def save(self, adapter, path) -> None:
        """`save_routers(self, adapter, path)`."""
        save_routers(self, adapter, path)


def _zero_router(hidden: int) -> nn.Linear:
    router = nn.Linear(hidden, 1, bias=True)
    nn.init.zeros_(router.weight)
    nn.init.zeros_(router.bias)
    return router


def save_routers(method: PMoD, adapter, path) -> None:
    """Write `method`'s routers to a safetensors file, with the base model's weights hash and the schedule
    (`adapter`: `vlmkit.adapters.adapter_for(model)` of the model they were trained on)."""
    if not len(method.routers):
        method.check_adapter(adapter)
    tensors = {}
    for layer, router in zip(method.router_layers, method.routers):
        tensors[f"layer.{layer}.weight"] = router.weight
        tensors[f"layer.{layer}.bias"] = router.bias
    config = {k: v for k, v in asdict(method.config).items() if k in SCHEDULE_FIELDS}
    write_routers("pmod", path, tensors, adapter, method.router_layers, config)
