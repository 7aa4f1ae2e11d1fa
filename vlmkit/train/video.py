"""`shapes-video`: a `LlavaOnevisionForConditionalGeneration` grown from `shapes-llava`, trained on
clips and images.

Why LLaVA-OneVision (rather than Qwen2-VL): OneVision takes any vision and text configuration, so
`shapes-llava`'s CLIP-style ViT, projector and Llama load into it unchanged, and the video model
starts from an image model that already grounds categories, colours and sides; what is left to
learn is comparing frames. Each frame goes through the ViT alone (144 tokens), is pooled 2x2 to 36
tokens (OneVision's video pooling); an 8-frame clip plus the newline token is 289 tokens, an
image (AnyRes: the base view and one 96-pixel crop, with row newlines) 300.

Two Qwen2-VL recipes trained from scratch (7- and 14-pixel patches, 2-frame temporal patches,
`docs/shapes.md`) stayed at chance on every video task: one answer token per clip was too weak a
signal to learn grounding and temporal comparison at once within the CPU budget.

The ViT stays frozen (it is `shapes-llava`'s); the projector, the language model and OneVision's
newline vector train on MVBench-style multiple-choice questions about clips, with every
`image_every`-th batch of image questions (the `shapes-llava` mixture) so that image grounding is
kept. The dense per-patch category and colour loss of `shapes-llava` stays on the projector's
output for every frame (the exact ground truth of that frame) and every image. Two stages:

1. **video**: the answer is the option's text ("blue"): what the clip shows, learned without the
   detour through the option letter. Trained with lettered answers from the start, the same model
   still picked letters at chance after 350 steps.
2. **options**: the reply is MVBench's: "Best option:(" (which the MVBench protocol pre-fills),
   then "B) blue", the letter its parser reads first; what is left to learn is copying the letter
   of the option the model would name.

The prompt is MVBench's as the eval suite writes it (`vlmkit.eval.prompts.MVBENCH`); its system
text is mostly outside the shapes vocabulary and reads as `<unk>`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer, LlavaForConditionalGeneration, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
)

from vlmkit.data.shapes import CATEGORIES, COLOURS, WorldConfig, check_seeds, patch_labels, render_array, sample_scene
from vlmkit.data.shapes_text import QA
from vlmkit.data.shapes_video import clip_question, frame_objects, mc_answer, mc_prompt, render_clip, sample_clip
from vlmkit.train.data import ConversationEncoder, Mixture, collate, sample_qas
from vlmkit.train.evaluate import video_eval
from vlmkit.train.losses import dense_word_loss, export
from vlmkit.train.models import CLIP_MEAN, CLIP_STD
from vlmkit.train.trainer import Stage
from vlmkit.zoo.shipped import _resolve

_STAGE_SEED_STRIDE = 100_000_000


def build_onevision(init: str | Path, seed: int = 0):
    """`shapes-video` before training: a OneVision model holding `init`'s (a `shapes-llava`
    checkpoint) ViT, projector and Llama, its tokenizer, and the OneVision processor.

    Returns:
        `(model, processor)`; the newline vector (OneVision's only new parameter) is drawn with `seed`.
    """
    path = _resolve(init)
    llava = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    source = llava.config
    side = source.vision_config.image_size
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=source.vision_config.to_dict(), text_config=source.text_config.to_dict(),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_layer=source.vision_feature_layer,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        image_grid_pinpoints=[[side, side]], projector_hidden_act=source.projector_hidden_act,
        multimodal_projector_bias=source.multimodal_projector_bias, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    result = model.load_state_dict(llava.state_dict(), strict=False)
    assert result.missing_keys == ["model.image_newline"] and not result.unexpected_keys, result
    model.generation_config = llava.generation_config
    geometry = {"size": {"height": side, "width": side}, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**geometry, image_grid_pinpoints=[[side, side]]),
        video_processor=LlavaOnevisionVideoProcessor(**geometry),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        num_image_tokens=(side // source.vision_config.patch_size) ** 2 + 1,  # with [CLS]; "default" drops it
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    return model, processor


@dataclass(frozen=True)
class VideoRecipeConfig:
    """Everything that defines a `shapes-video` training run.

    Attributes:
        init: the `shapes-llava` checkpoint it grows from (a shipped name or a folder).
        seed: seed of the newline vector and first training scene seed.
        num_frames: frames per clip.
        steps: steps of the video stage (answers are option texts).
        batch: batch size.
        lr: peak learning rate of the video stage.
        option_steps: steps of the options stage (answers are "Best option:( B) text").
        option_lr: peak learning rate of the options stage.
        image_every: every `image_every`-th batch holds image questions instead of clips.
        dense_weight: weight of the dense per-patch category/colour loss.
        mixture: question mixture of the image batches.
        eval_every: steps between video checks (0: never).
        eval_clips: clips per check.
    """

    init: str = "shapes-llava"
    seed: int = 500_000_000
    num_frames: int = 8
    steps: int = 1200
    batch: int = 16
    lr: float = 1e-3
    option_steps: int = 300
    option_lr: float = 3e-4
    image_every: int = 4
    dense_weight: float = 0.5
    mixture: Mixture = field(default_factory=Mixture)
    eval_every: int = 100
    eval_clips: int = 48

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


class VideoRecipe:
    """The `shapes-video` recipe (see the module docstring)."""

    def __init__(self, config: VideoRecipeConfig):
        self.config = config
        self.model, self.processor = build_onevision(config.init, config.seed)
        self.model.set_attn_implementation("eager")  # SDPA backward with masks is slow on CPU
        self.tokenizer = self.processor.tokenizer
        text_width = self.model.config.text_config.hidden_size
        self.heads = torch.nn.ParameterDict({"background": torch.zeros(text_width), "no_colour": torch.zeros(text_width)})
        self.modules = torch.nn.ModuleDict({"model": self.model, "heads": self.heads})
        vision = self.model.config.vision_config
        self.side, self.patch_size = vision.image_size, vision.patch_size
        self.world = WorldConfig(image_size=self.side)
        self.clip_world = WorldConfig(image_size=self.side, max_objects=3)
        ids = self.tokenizer.convert_tokens_to_ids
        grid = self.side // self.patch_size
        pooled = (grid + 1) // 2
        probe = self.processor(text=["<image>"], images=[np.zeros((self.side, self.side, 3), np.uint8)])
        image_tokens = probe["input_ids"][0].count(ids("<image>"))  # the processor's AnyRes expansion
        self.image_encoder = ConversationEncoder(self.tokenizer, [ids("<image>")] * image_tokens)
        self.video_encoder = ConversationEncoder(
            self.tokenizer, [ids("<video>")] * (config.num_frames * pooled ** 2 + 1))
        self.category_ids = torch.tensor(ids(list(CATEGORIES)))
        self.colour_ids = torch.tensor(ids(list(COLOURS)))
        trainable = ("model.model.multi_modal_projector", "model.model.language_model",
                     "model.model.image_newline", "heads")
        self.stages = [s for s in (Stage("video", config.steps, config.batch, config.lr, trainable),
                                   Stage("options", config.option_steps, config.batch, config.option_lr, trainable))
                       if s.steps > 0]

    # ---------------------------------------------------------------- data

    def _seed(self, stage: Stage, index: int) -> int:
        k = [s.name for s in self.stages].index(stage.name)
        return check_seeds("train", self.config.seed + k * _STAGE_SEED_STRIDE, stage.steps * stage.batch_size)[index]

    def _image_sample(self, stage: Stage, index: int) -> dict:
        seed = self._seed(stage, index)
        scene = sample_scene(seed, self.world)
        qas = sample_qas(scene, np.random.default_rng([seed, 7]), self.config.mixture)
        ids, labels = self.image_encoder.encode(qas, self.config.mixture.focus)
        dense = patch_labels(scene, self.patch_size)
        return {"image": torch.from_numpy(render_array(scene)), "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels), "category": torch.from_numpy(dense["category"]),
                "colour": torch.from_numpy(dense["colour"])}

    def _clip_sample(self, stage: Stage, index: int) -> dict:
        seed = self._seed(stage, index)
        clip = sample_clip(seed, self.clip_world, self.config.num_frames)
        item = clip_question(clip, np.random.default_rng([seed, 4]))
        answer = mc_answer(item["candidates"], item["answer"]) if stage.name == "options" else item["answer"]
        qa = QA(mc_prompt(item["question"], item["candidates"]), answer,
                item["task"], item["answer"], _clip_focus(item), item["answer"])
        ids, labels = self.video_encoder.encode([qa], self.config.mixture.focus)
        frames = [patch_labels(dataclasses.replace(clip.scene, objects=frame_objects(clip, t)), self.patch_size)
                  for t in range(clip.num_frames)]
        return {"image": torch.from_numpy(render_clip(clip)), "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "category": torch.from_numpy(np.stack([f["category"] for f in frames])),
                "colour": torch.from_numpy(np.stack([f["colour"] for f in frames]))}

    def batch(self, stage: Stage, step: int) -> dict:
        """Batch `step`: image questions every `image_every`-th step, clip questions otherwise."""
        first = step * stage.batch_size
        images = step % self.config.image_every == self.config.image_every - 1
        make = self._image_sample if images else self._clip_sample
        out = collate([make(stage, i) for i in range(first, first + stage.batch_size)],
                      self.tokenizer.pad_token_id, dense=("category", "colour"))
        media = list(out.pop("images").numpy())
        if images:
            pixels = self.processor.image_processor(images=media, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        else:
            out["pixel_values_videos"] = self.processor.video_processor(videos=media, return_tensors="pt")[
                "pixel_values_videos"]
        return out

    # ---------------------------------------------------------------- losses

    @contextlib.contextmanager
    def _projected(self):
        """Capture the projector's output (per frame or view, before OneVision's pooling)."""
        captured = []
        handle = self.model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: captured.append(output))
        try:
            yield captured
        finally:
            handle.remove()

    def loss(self, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
        """Answer-token cross-entropy plus `dense_weight` times the per-patch word loss."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "category", "colour")}
        with self._projected() as captured:
            out = self.model(**inputs)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        tokens = captured[0]
        if "pixel_values" in batch:  # AnyRes: the base view first, then the crop
            tokens = tokens.view(len(batch["labels"]), -1, *tokens.shape[1:])[:, 0]
        dense, accuracy = dense_word_loss(
            tokens, self.model.model.language_model.embed_tokens.weight, self.category_ids, self.colour_ids,
            self.heads["background"], self.heads["no_colour"], batch["category"].flatten(0, -3),
            batch["colour"].flatten(0, -3))
        metrics = {"lm_loss": round(loss.item(), 4), "object_patch_acc": accuracy,
                   "batch": "image" if "pixel_values" in batch else "video"}
        return loss + self.config.dense_weight * dense, metrics

    def evaluate(self, stage: Stage, step: int) -> dict | None:
        """Video multiple-choice accuracy on held-out clips every `eval_every` steps."""
        every = self.config.eval_every
        if not every or (step % every and step != stage.steps):
            return None
        return video_eval(self.model, self.processor, self.config.eval_clips,
                          config=self.clip_world, num_frames=self.config.num_frames)

    def export(self, path: str | Path) -> None:
        """Write the model, processor and the recipe in `save_pretrained` layout."""
        export(self.model, self.processor, path, "shapes-video", self.config.to_dict(), self.world)


def _clip_focus(item: dict) -> str:
    """The question word whose span carries the answer's gist: the subject, or the verb."""
    words = item["question"].rstrip("?").split()
    return next((w for w in words if w in CATEGORIES), words[2])
