"""`shapes-video`: a `Qwen2VLForConditionalGeneration` trained on shapes clips and images.

Why Qwen2-VL (rather than LLaVA-OneVision): it is the project's other model family, with what
pruning must handle and LLaVA does not have (3-D M-RoPE positions and `rope_deltas`, temporal
patches of two frames, 2x2 token merging), and its native video path is cheap: with 7-pixel
patches a 112-pixel, 8-frame clip is 256 visual tokens (4 frame pairs x 8 x 8 merged tokens), a
112-pixel image 64. (14-pixel patches, 16 tokens a frame pair, left each token covering several
objects: the vision stage reached only 44% per-token category accuracy and the chat stage stayed
at chance on every video task.)

Training mirrors `LlavaRecipe`: a vision stage (dense per-merged-token category and colour
targets against the tied word embeddings, on still images), then a chat stage on MVBench-style
multiple-choice questions about clips, with every third batch of image questions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from vlmkit.data.shapes import CATEGORIES, COLOURS, WorldConfig, check_seeds, patch_labels, render_array, sample_scene
from vlmkit.data.shapes_text import QA
from vlmkit.data.shapes_video import clip_question, mc_answer, mc_prompt, render_clip, sample_clip
from vlmkit.errors import ConfigError
from vlmkit.train.data import ConversationEncoder, Mixture, sample_qas
from vlmkit.train.evaluate import video_eval
from vlmkit.train.losses import dense_word_loss, export
from vlmkit.train.models import CLIP_MEAN, CLIP_STD, BackboneSizes, tie_query_keys
from vlmkit.train.tokenizer import build_tokenizer
from vlmkit.train.trainer import Stage

_STAGE_SEED_STRIDE = 100_000_000


@dataclass(frozen=True)
class VideoSizes(BackboneSizes):
    """Sizes of `shapes-video` (a Qwen2-VL ViT and decoder; see `BackboneSizes` for the rest).

    Attributes:
        image_size: frame side in pixels (a multiple of `patch_size * 2`).
        num_frames: frames per clip (even: two frames make one temporal patch).
        patch_size: ViT patch side.
    """

    image_size: int = 112
    num_frames: int = 8
    patch_size: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % (2 * self.patch_size) or self.num_frames % 2:
            raise ConfigError(
                f"image_size={self.image_size} must be a multiple of {2 * self.patch_size} and "
                f"num_frames={self.num_frames} even (2x2 merging, 2-frame temporal patches).")

    @property
    def grid(self) -> int:
        """Merged visual tokens per side."""
        return self.image_size // (2 * self.patch_size)


def build_qwen2vl(sizes: VideoSizes, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A freshly initialised `shapes-video` (fp32)."""
    ids = tokenizer.convert_tokens_to_ids
    head_dim = sizes.text_width // sizes.text_heads
    third = head_dim // 2 // 8
    config = Qwen2VLConfig(
        vision_config={
            "depth": sizes.vision_layers, "embed_dim": sizes.vision_width,
            "hidden_size": sizes.text_width, "num_heads": sizes.vision_heads, "mlp_ratio": 4,
            "patch_size": sizes.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": sizes.text_width,
            "intermediate_size": sizes.text_mlp, "num_hidden_layers": sizes.text_layers,
            "num_attention_heads": sizes.text_heads, "num_key_value_heads": sizes.text_heads,
            "max_position_embeddings": 1024, "initializer_range": sizes.init_std,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True,
            # M-RoPE over (t, h, w): the head's rotary pairs split 2:3:3 like Qwen2-VL's 16:24:24
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                "mrope_section": [2 * third, 3 * third, 3 * third]},
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    tie_query_keys([layer.self_attn for layer in model.model.language_model.layers],
                   sizes.tied_qk_heads, head_dim)
    return model


def build_qwen2vl_processor(sizes: VideoSizes, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
    """The processor: every image or frame is resized to `image_size` squared pixels."""
    pixels = sizes.image_size ** 2
    geometry = {"patch_size": sizes.patch_size, "temporal_patch_size": 2, "merge_size": 2,
                "size": {"shortest_edge": pixels, "longest_edge": pixels},
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry),
        video_processor=Qwen2VLVideoProcessor(**geometry, cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )


@dataclass(frozen=True)
class VideoRecipeConfig:
    """Everything that defines a `shapes-video` training run.

    Attributes:
        sizes: the architecture.
        seed: initialisation seed and first training scene seed.
        vision_steps: steps of the vision stage (still images).
        vision_batch: batch size of the vision stage.
        vision_lr: learning rate of the vision stage.
        chat_steps: steps of the chat stage.
        chat_batch: batch size of the chat stage.
        chat_lr: learning rate of the chat stage.
        image_every: every `image_every`-th chat batch holds image questions instead of clips.
        dense_weight: weight of the dense per-token loss on image batches of the chat stage.
        curriculum_start: scene difficulty at the start of the chat stage.
        curriculum_fraction: share of the chat stage spent ramping difficulty to 1.
        mixture: question mixture of the image batches.
        eval_every: steps between video checks in the chat stage (0: never).
        eval_clips: clips per check.
    """

    sizes: VideoSizes = field(default_factory=VideoSizes)
    seed: int = 500_000_000
    vision_steps: int = 1200
    vision_batch: int = 32
    vision_lr: float = 2e-3
    chat_steps: int = 1200
    chat_batch: int = 16
    chat_lr: float = 1e-3
    image_every: int = 3
    dense_weight: float = 0.5
    curriculum_start: float = 0.3
    curriculum_fraction: float = 0.3
    mixture: Mixture = field(default_factory=lambda: Mixture(caption=0.2, max_turns=4))
    eval_every: int = 250
    eval_clips: int = 48

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


class VideoRecipe:
    """The `shapes-video` recipe (see the module docstring)."""

    def __init__(self, config: VideoRecipeConfig):
        self.config = config
        sizes = config.sizes
        self.tokenizer = build_tokenizer("qwen2_vl")
        self.model = build_qwen2vl(sizes, self.tokenizer, seed=config.seed)
        self.model.set_attn_implementation("eager")
        self.processor = build_qwen2vl_processor(sizes, self.tokenizer)
        self.modules = torch.nn.ModuleDict({"model": self.model})
        self.world = WorldConfig(image_size=sizes.image_size)
        self.clip_world = WorldConfig(image_size=sizes.image_size, max_objects=3)
        ids = self.tokenizer.convert_tokens_to_ids
        start, end = ids("<|vision_start|>"), ids("<|vision_end|>")
        image_tokens = sizes.grid ** 2
        video_tokens = image_tokens * sizes.num_frames // 2
        self.image_encoder = ConversationEncoder(self.tokenizer, [start] + [ids("<|image_pad|>")] * image_tokens + [end])
        self.video_encoder = ConversationEncoder(self.tokenizer, [start] + [ids("<|video_pad|>")] * video_tokens + [end])
        self.category_ids = torch.tensor(ids(list(CATEGORIES)))
        self.colour_ids = torch.tensor(ids(list(COLOURS)))
        self.background = torch.nn.Parameter(torch.zeros(sizes.text_width))
        self.no_colour = torch.nn.Parameter(torch.zeros(sizes.text_width))
        self.modules["heads"] = torch.nn.ParameterDict({"background": self.background, "no_colour": self.no_colour})
        c = config
        self.stages = [s for s in (
            Stage("vision", c.vision_steps, c.vision_batch, c.vision_lr,
                  ("model.model.visual", "heads", "model.model.language_model.embed_tokens")),
            Stage("chat", c.chat_steps, c.chat_batch, c.chat_lr, ("model.", "heads")),
        ) if s.steps > 0]

    # ---------------------------------------------------------------- data

    def _seed(self, stage: Stage, index: int) -> int:
        k = [s.name for s in self.stages].index(stage.name)
        start = self.config.seed + k * _STAGE_SEED_STRIDE
        return check_seeds("train", start, stage.steps * stage.batch_size)[index]

    def _difficulty(self, stage: Stage, index: int) -> float:
        if stage.name == "vision":
            return min(1.0, 0.5 + 0.5 * index / max(stage.steps * stage.batch_size // 3, 1))
        ramp = stage.steps * stage.batch_size * self.config.curriculum_fraction
        start = self.config.curriculum_start
        return min(1.0, start + (1.0 - start) * index / max(ramp, 1))

    def _image_sample(self, stage: Stage, index: int) -> dict:
        seed = self._seed(stage, index)
        scene = sample_scene(seed, self.world, self._difficulty(stage, index))
        sample = {"frames": render_array(scene)[None],
                  **{k: torch.from_numpy(v) for k, v in patch_labels(scene, 2 * self.config.sizes.patch_size).items()}}
        if stage.name != "vision":
            qas = sample_qas(scene, np.random.default_rng([seed, 7]), self.config.mixture)
            sample["ids"], sample["labels"] = self.image_encoder.encode(qas, self.config.mixture.focus)
        return sample

    def _clip_sample(self, stage: Stage, index: int) -> dict:
        seed = self._seed(stage, index)
        clip = sample_clip(seed, self.clip_world, self.config.sizes.num_frames, self._difficulty(stage, index))
        item = clip_question(clip, np.random.default_rng([seed, 4]))
        qa = QA(mc_prompt(item["question"], item["candidates"]), mc_answer(item["candidates"], item["answer"]),
                item["task"], item["answer"], _clip_focus(item), item["answer"])
        ids, labels = self.video_encoder.encode([qa], self.config.mixture.focus)
        return {"frames": render_clip(clip), "ids": ids, "labels": labels}

    def batch(self, stage: Stage, step: int) -> dict:
        """Batch `step` of `stage`: still images (vision stage, every `image_every`-th chat
        batch) or clips."""
        first = step * stage.batch_size
        images = stage.name == "vision" or step % self.config.image_every == self.config.image_every - 1
        make = self._image_sample if images else self._clip_sample
        samples = [make(stage, i) for i in range(first, first + stage.batch_size)]
        if images:
            pixels = self.processor.image_processor(images=[s["frames"][0] for s in samples], return_tensors="pt")
            out = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            for key in ("category", "colour"):
                out[key] = torch.stack([s[key] for s in samples])
        else:
            pixels = self.processor.video_processor(videos=[s["frames"] for s in samples], return_tensors="pt")
            out = {"pixel_values_videos": pixels["pixel_values_videos"],
                   "video_grid_thw": pixels["video_grid_thw"]}
        if "ids" in samples[0]:
            length = max(len(s["ids"]) for s in samples)
            pad = self.tokenizer.pad_token_id
            out["input_ids"] = torch.tensor([s["ids"] + [pad] * (length - len(s["ids"])) for s in samples])
            out["labels"] = torch.tensor([s["labels"] + [-100] * (length - len(s["labels"])) for s in samples])
            out["attention_mask"] = (torch.arange(length)[None] < torch.tensor([len(s["ids"]) for s in samples])[:, None]).long()
            ids = self.tokenizer.convert_tokens_to_ids
            out["mm_token_type_ids"] = ((out["input_ids"] == ids("<|image_pad|>")).long()
                                        + 2 * (out["input_ids"] == ids("<|video_pad|>")).long())
        return out

    # ---------------------------------------------------------------- losses

    def _dense_loss(self, tokens: torch.Tensor, batch: dict) -> tuple[torch.Tensor, float]:
        return dense_word_loss(tokens, self.model.model.language_model.embed_tokens.weight,
                               self.category_ids, self.colour_ids, self.background, self.no_colour,
                               batch["category"], batch["colour"])

    def loss(self, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
        """The stage's loss and logged metrics."""
        if stage.name == "vision":
            tokens = self.model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            dense, accuracy = self._dense_loss(tokens, batch)
            return dense, {"object_token_acc": accuracy}
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "category", "colour")}
        out = self.model(**inputs)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        metrics = {"lm_loss": round(loss.item(), 4), "batch": "image" if "pixel_values" in batch else "video"}
        if "pixel_values" in batch:
            tokens = self.model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            dense, accuracy = self._dense_loss(tokens, batch)
            loss = loss + self.config.dense_weight * dense
            metrics["object_token_acc"] = accuracy
        return loss, metrics

    def evaluate(self, stage: Stage, step: int) -> dict | None:
        """Video multiple-choice accuracy on held-out clips every `eval_every` chat steps."""
        every = self.config.eval_every
        if stage.name == "vision" or not every or (step % every and step != stage.steps):
            return None
        return video_eval(self.model, self.processor, self.config.eval_clips,
                          config=self.clip_world, num_frames=self.config.sizes.num_frames)

    def export(self, path: str | Path) -> None:
        """Write the model, processor and the recipe in `save_pretrained` layout."""
        export(self.model, self.processor, path, "shapes-video", self.config.to_dict())


def _clip_focus(item: dict) -> str:
    """The question word whose span carries the answer's gist: the subject, or the verb."""
    words = item["question"].rstrip("?").split()
    return next((w for w in words if w in CATEGORIES), words[2])
