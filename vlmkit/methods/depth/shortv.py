"""ShortV: "ShortV: Efficient Multimodal Large Language Models by Freezing Visual Tokens in
Ineffective Layers" (Yuan et al., 2025, arXiv:2504.00502).

Site: `route`, mode "freeze". In each chosen decoder layer the visual tokens get no query, no
attention output and no MLP: their hidden state passes the layer unchanged. Their keys and values
are still computed from that state (and cached), so the text tokens attend to them as before.

The layers come from Layer Contribution (LC): for layer l, the KL divergence of the last prompt
token's next-token distribution when only layer l's visual tokens are frozen, to the unpatched
one, LC(l) = KL(p_frozen(l) || p), averaged over a calibration set; the layers with the lowest LC
are frozen (`vlmkit calibrate shortv` writes the ranking; `vlmkit.methods.depth.calibration`).

Follows icip-cas/ShortV @737c28c, `llava/model/language_model/llava_llama.py`: `ShortvDecoderLayer`
(queries and MLP for the text rows only, visual rows left as they were; at decoding steps the
layer runs whole for the new token over the cached keys), `ShortvDecoderLayer_LC` and
`ShortvLlamaForCausalLM.forward` (LC as `nn.KLDivLoss(reduction="batchmean")` of the full log-softmax
against the frozen softmax). Deviations, and why:
- visual tokens are found per sample from the placeholder tokens (the original hard-codes a
  35-token system prompt and batch size 1);
- the calibration set is seeded (the original's lmms-eval run shuffles with `seed=time.time()`, so
  its layer order is not reproducible), and the file records the model's weights hash;
- `fraction` of the layers is rounded with Python's `round` (the original takes a count).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.engine.contexts import Route, RouteContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, Router, layer_list
from vlmkit.methods.depth.calibration import check_calibration, read_calibration
from vlmkit.registry import register_method

DEFAULT_FRACTION = 0.6  # ShortV freezes 19 of LLaVA-1.5-7B's 32 layers


@dataclass(frozen=True)
class ShortVConfig(MethodConfig):
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "decoder layers to freeze visual tokens in"})
    fraction: float | None = field(
        default=None, metadata={"help": f"share of the layers to freeze, lowest contribution first (with calibration; default {DEFAULT_FRACTION})"}
    )
    calibration: str | None = field(default=None, metadata={"help": "a `vlmkit calibrate shortv` JSON file (layer ranking)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_list("shortv", "layers", self.layers))
        if (self.layers is None) == (self.calibration is None):
            raise ConfigError(
                "shortv: give the layers to freeze as layers=(...) or a ranking as calibration=FILE.json "
                "(from `vlmkit calibrate shortv`), exactly one of them"
            )
        if self.fraction is not None:
            if self.calibration is None:
                raise ConfigError("shortv: fraction= picks layers from a ranking: give calibration=FILE.json too")
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
                raise ConfigError(f"shortv: fraction={self.fraction!r} is out of range: it must lie in (0, 1)")


@register_method("shortv", family="depth", sites="route")
class ShortV(Router):
    """Freeze the visual tokens in the layers that contribute least (no query, no MLP; keys and values kept)."""

    Config = ShortVConfig
    example = "layers=(1, 2)"
    neutral = "layers=()"
    paper = "https://arxiv.org/abs/2504.00502"

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.calibration = read_calibration("shortv", self.config.calibration, "ranking")

    def check_adapter(self, adapter) -> None:
        check_calibration("shortv", self.config.calibration, self.calibration, adapter)

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.config.layers is not None:
            return self.config.layers
        fraction = DEFAULT_FRACTION if self.config.fraction is None else self.config.fraction
        return tuple(sorted(self.calibration["ranking"][: round(fraction * num_layers)]))

    def route(self, context: RouteContext) -> Route:
        nobody = torch.zeros(0, dtype=torch.long, device=context.hidden.device)
        return Route([nobody for _ in context.visual], mode="freeze")
