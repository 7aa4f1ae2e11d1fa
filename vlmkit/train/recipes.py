"""Training recipes of the shipped shapes models: modules, stages, batches and losses.

`LlavaRecipe` trains `shapes-llava` in six stages:

1. **vision**: the ViT and the projector learn dense per-patch targets (category and colour of
   the object under each patch, the side of the image that holds its centre, object centres, and
   the scene's categories on [CLS]). Category, colour and side logits are dot products with the
   language model's (tied) word embeddings of those words, so each visual token starts out
   "spelling" what it shows and where. The side loss (`dense_side_loss`) stays on in every stage:
   without it the tokens carry no position at all (a linear probe reads left/right at chance).
2. **chat**: everything trains on captions and questions (loss on answer tokens, plus the
   focus-word supervision of `ConversationEncoder`), on a curriculum from sparse, clean scenes to
   the full world; the dense per-patch loss stays on (weight `dense_weight`) so the vision tower
   keeps improving while the language model learns to ground words.
3. **polish**: the chat stage's objective on the full-difficulty world only, with fresh scenes and
   a second, lower-peak cosine schedule (a warm restart), for the late gains in grounding.
4. **position**: a short stage whose question mixture leans on position questions, which the
   earlier mixture (position 20% of questions) left at chance in yes/no form.
5. **locate**: position questions only, at a high learning rate. With the side in every token,
   the language model still answered yes/no position questions at chance after stages 1-4; on
   position questions alone it learns to read the side within a few hundred steps, while
   existence and captions suffer.
6. **recall**: the main mixture again, at a low learning rate, to restore what stage 5 cost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.data.shapes import CATEGORIES, COLOURS, WorldConfig
from vlmkit.errors import ConfigError
from vlmkit.train.data import ConversationEncoder, Mixture, ShapesStream, collate
from vlmkit.train.evaluate import mme_eval, pope_eval
from vlmkit.train.losses import dense_side_loss, dense_word_loss, export
from vlmkit.train.models import LlavaSizes, build_llava, build_llava_processor, pixel_values
from vlmkit.train.tokenizer import build_tokenizer
from vlmkit.train.trainer import Stage, check_due

_STAGE_SEED_STRIDE = 100_000_000
"""Stage k draws its scenes from training seeds `seed + k * stride` onward."""


@dataclass(frozen=True)
class LlavaRecipeConfig:
    """Everything that defines a `shapes-llava` training run.

    Attributes:
        sizes: the architecture.
        seed: initialisation seed and first training scene seed.
        vision_steps: steps of the vision stage.
        vision_batch: batch size of the vision stage.
        vision_lr: learning rate of the vision stage.
        chat_steps: steps of the chat stage.
        chat_batch: batch size of the chat stage.
        chat_lr: learning rate of the chat stage.
        dense_weight: weight of the per-patch category/colour loss in the chat stage.
        side_weight: weight of the per-patch side loss (`dense_side_loss`), in every stage.
        polish_steps: steps of the polish stage (0: none).
        polish_lr: peak learning rate of the polish stage.
        position_steps: steps of the position stage (0: none).
        position_lr: peak learning rate of the position stage.
        position_mixture: the question mixture of the position stage.
        locate_steps: steps of the locate stage (0: none).
        locate_lr: peak learning rate of the locate stage.
        locate_mixture: the question mixture of the locate stage (position questions only).
        recall_steps: steps of the recall stage (0: none).
        recall_lr: peak learning rate of the recall stage (the main mixture again).
        curriculum_start: scene difficulty at the start of the chat stage.
        curriculum_fraction: share of the chat stage spent ramping difficulty to 1.
        mixture: the question mixture.
        eval_every: steps between POPE checks in the chat and joint stages (0: never).
        eval_images: images per POPE check.
        name: the exported model's recipe name (recorded in `training.json`).
        init_from: a shipped checkpoint name or `save_pretrained` folder whose vision tower,
            projector and word embeddings start the model ("" : all from scratch); its vision
            sizes must equal `sizes`'.
    """

    sizes: LlavaSizes = field(default_factory=LlavaSizes)
    seed: int = 0
    vision_steps: int = 1500
    vision_batch: int = 32
    vision_lr: float = 2e-3
    chat_steps: int = 1600
    chat_batch: int = 16
    chat_lr: float = 1e-3
    polish_steps: int = 1200
    polish_lr: float = 5e-4
    position_steps: int = 600
    position_lr: float = 3e-4
    position_mixture: Mixture = field(default_factory=lambda: Mixture(
        caption=0.2, existence=0.3, count=0.1, color=0.1, position=0.6))
    locate_steps: int = 600
    locate_lr: float = 1e-3
    locate_mixture: Mixture = field(default_factory=lambda: Mixture(
        caption=0.0, existence=0.05, count=0.0, color=0.0, position=1.0))
    recall_steps: int = 600
    recall_lr: float = 3e-4
    dense_weight: float = 0.5
    side_weight: float = 0.5
    curriculum_start: float = 0.3
    curriculum_fraction: float = 0.3
    mixture: Mixture = field(default_factory=Mixture)
    eval_every: int = 200
    eval_images: int = 24
    name: str = "shapes-llava"
    init_from: str = ""

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


class PatchHeads(torch.nn.Module):
    """Auxiliary heads of the vision stage (not shipped): background/none class vectors, the
    centre detector on projected tokens and the category-presence head on [CLS]."""

    def __init__(self, text_width: int, vision_width: int):
        super().__init__()
        self.background = torch.nn.Parameter(torch.zeros(text_width))
        self.no_colour = torch.nn.Parameter(torch.zeros(text_width))
        self.centre = torch.nn.Linear(text_width, 1)
        self.present = torch.nn.Linear(vision_width, len(CATEGORIES))


class LlavaRecipe:
    """The `shapes-llava` recipe (see the module docstring).

    Args:
        config: the run's configuration.
    """

    def __init__(self, config: LlavaRecipeConfig):
        self.config = config
        self.tokenizer = build_tokenizer()
        self.model = build_llava(config.sizes, self.tokenizer, seed=config.seed)
        if config.init_from:
            copy_vision_and_words(config.init_from, self.model)
        self.model.set_attn_implementation("eager")  # SDPA backward with masks is slow on CPU
        self.processor = build_llava_processor(config.sizes, self.tokenizer)
        self.heads = PatchHeads(config.sizes.text_width, config.sizes.vision_width)
        self.modules = torch.nn.ModuleDict({"model": self.model, "heads": self.heads})
        self.world = WorldConfig(image_size=config.sizes.image_size)
        self.category_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(CATEGORIES)))
        self.colour_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(COLOURS)))
        self.side_ids = torch.tensor([self.tokenizer.convert_tokens_to_ids(pair)
                                      for pair in (["left", "right"], ["top", "bottom"])])
        image_id = self.model.config.image_token_id
        self.encoder = ConversationEncoder(self.tokenizer, [image_id] * config.sizes.num_patches)
        c = config
        self.stages = [
            Stage("vision", c.vision_steps, c.vision_batch, c.vision_lr,
                  ("model.model.vision_tower", "model.model.multi_modal_projector", "heads",
                   "model.model.language_model.embed_tokens")),
            Stage("chat", c.chat_steps, c.chat_batch, c.chat_lr, ("model.",)),
            Stage("polish", c.polish_steps, c.chat_batch, c.polish_lr, ("model.",)),
            Stage("position", c.position_steps, c.chat_batch, c.position_lr, ("model.",)),
            Stage("locate", c.locate_steps, c.chat_batch, c.locate_lr, ("model.",)),
            Stage("recall", c.recall_steps, c.chat_batch, c.recall_lr, ("model.",)),
        ]
        self.stages = [s for s in self.stages if s.steps > 0]
        self._streams: dict[str, ShapesStream] = {}

    def stream(self, stage: Stage) -> ShapesStream:
        """The stage's data stream (built once)."""
        if stage.name not in self._streams:
            k = [s.name for s in self.stages].index(stage.name)
            start = self.config.seed + k * _STAGE_SEED_STRIDE
            length = stage.steps * stage.batch_size
            if stage.name == "vision":
                self._streams[stage.name] = ShapesStream(
                    start, length, self.world, patch_size=self.config.sizes.patch_size,
                    curriculum=(0.5, length // 3))
            else:
                ramp = (self.config.curriculum_start, int(length * self.config.curriculum_fraction))
                mixture = {"position": self.config.position_mixture,
                           "locate": self.config.locate_mixture}.get(stage.name, self.config.mixture)
                self._streams[stage.name] = ShapesStream(
                    start, length, self.world, self.encoder, mixture,
                    patch_size=self.config.sizes.patch_size,
                    curriculum=ramp if stage.name == "chat" else (1.0, 0))
        return self._streams[stage.name]

    def batch(self, stage: Stage, step: int) -> dict:
        """Batch `step` of `stage`."""
        stream = self.stream(stage)
        first = step * stage.batch_size
        return collate([stream[i] for i in range(first, first + stage.batch_size)],
                       self.tokenizer.pad_token_id)

    def loss(self, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
        """The stage's loss and logged metrics."""
        pixels = pixel_values(batch["images"])
        if stage.name == "vision":
            return self._vision_loss(pixels, batch)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=pixels)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
        tokens = out.image_hidden_states.view(len(pixels), self.config.sizes.num_patches, -1)
        dense, metrics = self._dense_loss(tokens, batch)
        return loss + self.config.dense_weight * dense, {"lm_loss": round(loss.item(), 4), **metrics}

    def _dense_loss(self, tokens: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Category and colour (`dense_word_loss`) plus `side_weight` times `dense_side_loss`."""
        words = self.model.model.language_model.embed_tokens.weight
        dense, accuracy = dense_word_loss(tokens, words, self.category_ids, self.colour_ids, self.heads.background,
                                          self.heads.no_colour, batch["category"], batch["colour"])
        side, side_accuracy = dense_side_loss(tokens, words, self.side_ids, batch["horizontal"], batch["vertical"])
        return dense + self.config.side_weight * side, {"object_patch_acc": accuracy, "side_acc": side_accuracy}

    def _vision_loss(self, pixels: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        inner = self.model.model
        hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        tokens = inner.multi_modal_projector(hidden[:, 1:])
        dense, metrics = self._dense_loss(tokens, batch)
        loss_centre = F.binary_cross_entropy_with_logits(
            self.heads.centre(tokens).squeeze(-1), batch["centre"].flatten(1),
            pos_weight=torch.tensor(5.0, device=tokens.device))
        loss_present = F.binary_cross_entropy_with_logits(self.heads.present(hidden[:, 0]), batch["present"])
        return dense + 0.5 * loss_centre + 0.5 * loss_present, metrics

    def evaluate(self, stage: Stage, step: int) -> dict | None:
        """A small POPE and MME position check every `eval_every` steps of the language stages."""
        if stage.name == "vision" or not check_due(stage, step, self.config.eval_every):
            return None
        result = pope_eval(self.model, self.processor, self.config.eval_images,
                           splits=("random", "adversarial"))
        mme = mme_eval(self.model, self.processor, self.config.eval_images, subtasks=("position",))
        return {split: r["accuracy"] for split, r in result.items()} | {
            "yes_ratio": result["random"]["yes_ratio"], "mme_position": mme["position"]["score"]}

    def export(self, path: str | Path) -> None:
        """Write the model, processor and the recipe in `save_pretrained` layout."""
        export(self.model, self.processor, path, self.config.name, self.config.to_dict(), self.world)


def deep_llava_config() -> LlavaRecipeConfig:
    """`shapes-llava-deep`: shapes-llava's world, vision tower, projector and word embeddings under
    a 12-layer language model trained from scratch (the vision stage is not repeated; the later
    stages are shorter so that the run fits two hours of a 2-core CPU)."""
    return LlavaRecipeConfig(
        sizes=LlavaSizes(text_layers=12, residual_init_scale=(4 / 12) ** 0.5), vision_steps=0,
        polish_steps=1000, position_steps=400, locate_steps=400, recall_steps=400,
        name="shapes-llava-deep", init_from="shapes-llava")


def copy_vision_and_words(source: str, model) -> None:
    """Copy the vision tower, projector and word embeddings of a trained shapes model into `model`.

    Raises:
        ConfigError: the source's vision tower, projector or vocabulary has other shapes.
    """
    from vlmkit import zoo

    trained, _ = zoo.load(source)
    for part in ("vision_tower", "multi_modal_projector"):
        _copy_state(getattr(trained.model, part), getattr(model.model, part), f"{source}: {part}")
    _copy_state(trained.model.language_model.embed_tokens, model.model.language_model.embed_tokens,
                f"{source}: word embeddings")


def _copy_state(source: torch.nn.Module, target: torch.nn.Module, what: str) -> None:
    state, expected = source.state_dict(), target.state_dict()
    mismatched = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if mismatched:
        raise ConfigError(f"{what} does not fit this recipe's sizes (mismatched: {', '.join(mismatched[:4])}).")
    target.load_state_dict(state)
