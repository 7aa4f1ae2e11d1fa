"""Fine-tune mixture-of-depths routers (p-MoD, gamma-MoD) into a shapes model, and the control run.

Both papers train their routers during LLaVA's instruction tuning, with the language model and the
projector trained alongside and the vision tower frozen; `ModRecipe` does the same on a shipped shapes
model (`shapes-llava-deep` by default): the base model's own data mixture, fresh scenes, the method
applied in training mode (`model.train()`: p-MoD's STRing weights carry the router's gradient;
gamma-MoD routes by top-k with its auxiliary loss), and the control run (`method="none"`) taking the
same steps, batches and trainable weights without routers. The export is the fine-tuned model
(`save_pretrained`) plus `routers.safetensors`, written with the fine-tuned model's weights hash:

    vlmkit train mod --from shapes-llava-deep --method pmod --out runs/mod/pmod
    vlmkit.apply(model, "pmod:routers=runs/mod/pmod/final/routers.safetensors")
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.errors import ConfigError
from vlmkit.train.finetune import FinetuneConfig, FinetuneRecipe
from vlmkit.train.trainer import Stage

METHODS = ("pmod", "gammamod")
TRAINED = ("model.model.language_model.", "model.model.multi_modal_projector.", "model.lm_head.", "routers.")
"""What a MoD fine-tune trains (the control run: the same minus the routers); the vision tower is frozen."""
ROUTERS_FILE = "routers.safetensors"


def mod_config(base: str = "shapes-llava-deep", method: str = "pmod", **overrides) -> FinetuneConfig:
    """The fine-tune settings of `vlmkit train mod` (fewer steps than a position fine-tune: the routers are
    small and the deep model is slower)."""
    name = method.split(":")[0]
    if name not in METHODS + ("none",):
        raise ConfigError(f"vlmkit train mod: --method {method!r} is not one of {', '.join(METHODS)}, none")
    settings = dict(base=base, method=method, steps=1000, batch=16, lr=3e-4, eval_every=250, eval_images=24)
    return FinetuneConfig(**{**settings, **overrides})


class ModRecipe(FinetuneRecipe):
    """One stage, "finetune": the language model, projector and (unless the control run) routers train."""

    def __init__(self, config: FinetuneConfig):
        name = config.method.split(":")[0]
        if name not in METHODS + ("none",):
            raise ConfigError(f"vlmkit train mod: method {config.method!r} is not one of {', '.join(METHODS)}, none")
        if not config.name:
            from dataclasses import replace

            from vlmkit.train.finetune import base_training

            config = replace(config, name=f"{base_training(config.base)['recipe']}-{'control' if name == 'none' else name}")
        super().__init__(config)
        self.router = None if self.patch is None else self.patch.methods[0]
        if self.router is not None:
            self.modules["routers"] = self.router.trainable()
        self.stages = [Stage("finetune", config.steps, config.batch, config.lr, TRAINED)]

    def loss(self, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics = super().loss(stage, batch)
        auxiliary = getattr(self.router, "auxiliary_loss", None)
        if auxiliary is not None:
            extra = auxiliary()
            if extra is not None:
                loss = loss + extra
                metrics["router_loss"] = round(extra.item(), 5)
        return loss, metrics

    def export(self, path: str | Path) -> None:
        """The fine-tuned model, and beside it its routers with the fine-tuned weights' hash."""
        router, adapter = self.router, None if self.patch is None else self.patch.adapter
        super().export(path)  # removes the patch first
        if router is not None:
            router.save(adapter, Path(path) / ROUTERS_FILE)
