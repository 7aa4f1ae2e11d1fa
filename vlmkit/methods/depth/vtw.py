"""VTW: "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid
Inference" (Lin et al., AAAI 2025, arXiv:2405.05803).

Site: `layer`. From decoder layer K on, every visual token leaves the stream: layers K and later
hold no visual key or value, and the text tokens keep their original position ids (`pe_type =
"keep"`). Withdrawal is a selection that keeps no visual token, so the engine's layer site does it
(the stream, the masks and each later layer's KV cache are simply shorter).

K is given (`layer=K`), or found by the paper's rule (`vlmkit calibrate vtw`): the first layer
from `min_layer` on whose mean KL divergence of the last prompt token's next-token distribution
(withdrawn vs. unpatched, KL(p_withdrawn || p)) over a calibration set is at most eta.

Follows lzhxmu/VTW @a3d8cfc, `llava/model/language_model/VTW.py` (`LlamaModel.forward` with
`temp_cache.k` and `pe_type="keep"`; the KL as `nn.KLDivLoss(reduction="batchmean")` over layers
5 .. L-1; eta 0.003 for LLaVA-1.5-7B on 20 ScienceQA images). Deviations, and why: visual tokens
are found per sample from the placeholder tokens (the original hard-codes a 35-token system
prompt, 576 image tokens and batch size 1); the calibration set is seeded and the file records
the model's weights hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import MethodConfig, TokenSelector
from vlmkit.methods.depth.calibration import check_calibration, read_calibration
from vlmkit.registry import register_method


@dataclass(frozen=True)
class VTWConfig(MethodConfig):
    layer: int | None = field(default=None, metadata={"help": "K: visual tokens leave before decoder layer K (>= 1)"})
    calibration: str | None = field(default=None, metadata={"help": "a `vlmkit calibrate vtw` JSON file (the K its rule found)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.layer is None) == (self.calibration is None):
            raise ConfigError("vtw: give K as layer=K or calibration=FILE.json (from `vlmkit calibrate vtw`), exactly one")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ConfigError(f"vtw: layer={self.layer!r} must be an integer >= 1 (the layer from which visual tokens are gone)")


@register_method("vtw", family="depth", sites="layer")
class VTW(TokenSelector):
    """Withdraw every visual token from decoder layer K on."""

    Config = VTWConfig
    example = "layer=2"
    neutral = None  # withdrawal is the method: no layer keeps the tokens (K = depth is no VTW at all)
    paper = "https://arxiv.org/abs/2405.05803"
    natural_positions = "keep"

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self.calibration = read_calibration("vtw", self.config.calibration, "layer")
        if self.calibration is not None and self.calibration["layer"] is None:
            raise ConfigError(f"vtw: {self.config.calibration} records no layer within eta={self.calibration.get('eta')}; give layer=K")

    def check_adapter(self, adapter) -> None:
        check_calibration("vtw", self.config.calibration, self.calibration, adapter)

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.config.layer if self.calibration is None else int(self.calibration["layer"]),)

    def select(self, context: SelectionContext) -> Selection:
        return Selection([SampleSelection(torch.zeros(0, dtype=torch.long, device=v.slots.device)) for v in context.visual])
