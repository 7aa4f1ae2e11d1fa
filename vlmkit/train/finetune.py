"""Fine-tune a shapes model with a vlmkit method applied, and the control run without it.

Methods that change positions or the attention structure (CCA, V2PE) were proposed with training:
their papers fine-tune or retrain the model with the method in place. `FinetuneRecipe` continues a
shipped shapes model (`shapes-llava` by default) on the same data mixture it was trained on, fresh
scenes, with `vlmkit.apply(model, method)` installed during every training step and check; the
control run (`method="none"`) takes exactly the same steps, batches and schedule without it, so that
a difference between the two is the method's and not the extra training. The exported weights are a
plain `save_pretrained` folder; `training.json` records the method to apply at inference.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmkit.errors import ConfigError
from vlmkit.train.data import Mixture
from vlmkit.train.models import LlavaSizes
from vlmkit.train.recipes import LlavaRecipe, LlavaRecipeConfig
from vlmkit.train.trainer import Stage

FRESH_SEEDS = 600_000_000
"""First training scene of a fine-tune: past the six stages of the shapes recipes (100M each)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tune of a shapes model with a method applied.

    Attributes:
        base: a shipped shapes checkpoint name or a `save_pretrained` folder of one.
        method: a method spec applied during training (e.g. "cca", "v2pe:train=True"), or "none"
            for the control run.
        steps: optimizer steps.
        batch: samples per step.
        lr: peak learning rate (warm-up, then cosine decay to a tenth).
        seed: first training scene.
        eval_every: steps between the POPE / MME position checks (0: never).
        eval_images: images per check.
        name: the exported model's recipe name.
    """

    base: str = "shapes-llava"
    method: str = "none"
    steps: int = 800
    batch: int = 16
    lr: float = 3e-4
    seed: int = FRESH_SEEDS
    eval_every: int = 200
    eval_images: int = 24
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def base_training(base: str) -> dict:
    """The `training.json` of a shipped or local shapes checkpoint."""
    from vlmkit.zoo.shipped import _resolve

    path = _resolve(base) / "training.json"
    if not path.is_file():
        raise ConfigError(f"{base}: no training.json beside the weights; fine-tunes start from shapes models")
    training = json.loads(path.read_text())
    if "sizes" not in training.get("config", {}) or "video" in training.get("recipe", ""):
        raise ConfigError(f"{base}: fine-tunes start from a shapes-llava model (recipe {training.get('recipe')!r})")
    return training


class FinetuneRecipe(LlavaRecipe):
    """One stage, "finetune", on the base model's own mixture, with `config.method` applied."""

    def __init__(self, config: FinetuneConfig):
        import vlmkit
        from vlmkit import zoo

        training = base_training(config.base)
        trained = training["config"]
        name = config.name or f"{training['recipe']}-{config.method.split(':')[0]}"
        super().__init__(LlavaRecipeConfig(
            sizes=LlavaSizes(**trained["sizes"]), seed=config.seed, vision_steps=0, chat_steps=0, polish_steps=0,
            position_steps=0, locate_steps=0, recall_steps=0, mixture=Mixture(**trained["mixture"]),
            dense_weight=trained["dense_weight"], side_weight=trained["side_weight"],
            eval_every=config.eval_every, eval_images=config.eval_images, name=name))
        self.finetune = config
        base, _ = zoo.load(config.base)
        self.model.load_state_dict(base.state_dict())
        self.patch = None if config.method == "none" else vlmkit.apply(self.model, config.method)
        self.stages = [Stage("finetune", config.steps, config.batch, config.lr, ("model.",))]

    def export(self, path: str | Path) -> None:
        """The plain fine-tuned weights (the patch removed first); `training.json` names the method."""
        from vlmkit.train.losses import export

        if self.patch is not None:
            self.patch.remove()
        trained = base_training(self.finetune.base)["config"]
        export(self.model, self.processor, path, self.config.name, {**trained, "finetune": self.finetune.to_dict()},
               self.world)
