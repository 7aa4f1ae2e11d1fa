"""`shapes-qwen2-vl`: a `Qwen2VLForConditionalGeneration` (M-RoPE) that answers the shapes world's
images and clips, built from `shapes-video`; and the HoPE fine-tune with its control.

Two Qwen2-VL recipes trained from scratch stayed at chance on video (`docs/shapes.md`). This one
starts from what already works:

* **Transplant.** `shapes-video`'s language model (a Llama) becomes the Qwen2 decoder of a
  Qwen2-VL model unchanged: the same weights, zero query/key/value biases, `mrope_section`
  [4, 6, 6] (Qwen2-VL's 16:24:24 on a 32-wide head). On text, M-RoPE with equal (t, h, w) indices
  is the Llama's rotary embedding, so text-only prompts give the Llama's logits exactly. Qwen2-VL's
  ViT gets the teacher's patches (8 pixels, `spatial_merge_size` 1: one token a patch) and starts
  from its CLIP tower and projector (`transplant_vision`).
* **Distil** (stage 1). The ViT learns to reproduce `shapes-video`'s visual tokens: for an image
  (96 pixels, 12 x 12 patches) the 144 projected CLIP tokens of the base view; for a video frame
  (resized to 48 pixels, 6 x 6 patches; one frame per temporal patch) the frame's 36 pooled tokens.
  Relative squared error plus cosine distance. A ViT with four patches to a target token (images at
  192 pixels, 2x2 merger), trained from scratch, matched the tokens' background but not their
  objects: the decoder read POPE at chance from it (`docs/shapes.md`).
* **Read** (stage 2, optional: `read_steps`, 0 by default). The frozen decoder reads an image
  conversation once with the teacher's 144 tokens and once with the student's (1-D positions, as
  it was trained), and the student learns to match its answers, KL(p_teacher || p_student) over the
  answer tokens, beside the distillation loss on images and frames. Matching features alone left
  the decoder answering "no" to every object question (`pope_reading`); 300 read steps lift its
  random split to 64% but not the adversarial one (`docs/shapes.md`).
* **Adapt** (stage 3, `letters`). The language model learns M-RoPE's positions (a clip's tokens
  now span (t, h, w) indices instead of one long run) on `shapes-video`'s data and losses, with
  the merger (`adapt_vision`; the ViT's blocks stay frozen). `method` installs a vlmkit method for this stage (e.g.
  `hope:train=True`): the run with `method="none"` is the shipped `shapes-qwen2-vl` and, with the
  same steps and batches, the control of the HoPE fine-tune.

`extra_layers` keeps `shapes-video`'s meaning (the layers above `shapes-llava`'s four), so the
gist loss reads the same layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from vlmkit.data.shapes import WorldConfig, render_array, sample_scene
from vlmkit.data.shapes_bench import pope_questions
from vlmkit.data.shapes_video import render_clip, sample_clip
from vlmkit.errors import ConfigError
from vlmkit.train.data import IGNORE, collate
from vlmkit.train.evaluate import MONITOR_SEED, pope_eval, pope_scenes
from vlmkit.train.models import CLIP_MEAN, CLIP_STD, pixel_values
from vlmkit.train.tokenizer import build_tokenizer
from vlmkit.train.trainer import Stage, check_due
from vlmkit.train.video import VideoRecipe, VideoRecipeConfig

MROPE_SECTION = [4, 6, 6]
"""(t, h, w) rotary pairs of a 32-wide head: Qwen2-VL's [16, 24, 24] scaled to 16 pairs."""
_ADAPT_VISION = {"merger": "model.model.visual.merger", "all": "model.model.visual"}
"""What of the vision tower trains in the adapt stage."""


def build_qwen2vl(teacher, image_side: int, seed: int = 0):
    """A Qwen2-VL model holding `teacher`'s (a `shapes-video` OneVision model) language model, a ViT
    with the teacher's patches (`spatial_merge_size` 1: one token a patch) initialised from its
    vision tower and projector (`transplant_vision`), and its processor.

    Args:
        teacher: the OneVision model whose decoder, word embeddings, vision tower, projector and
            generation settings are copied.
        image_side: the side images are resized to; frames are resized to half the teacher's image
            side, so a frame's patches are the 6 x 6 grid of its pooled tokens.
        seed: seeds what is not copied (the query/key/value biases are zeroed).

    Returns:
        `(model, processor)`.
    """
    text = teacher.config.text_config
    vision = teacher.config.vision_config
    tokenizer = build_tokenizer("qwen2_vl")
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config={
            "depth": vision.num_hidden_layers, "embed_dim": vision.hidden_size, "hidden_size": text.hidden_size,
            "num_heads": vision.num_attention_heads, "mlp_ratio": vision.intermediate_size // vision.hidden_size,
            "patch_size": vision.patch_size, "spatial_merge_size": 1, "temporal_patch_size": 1,
            "hidden_act": vision.hidden_act,
        },
        text_config={
            "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
            "initializer_range": text.initializer_range, "tie_word_embeddings": True,
            "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"],
                                "mrope_section": MROPE_SECTION},
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    source = teacher.model.language_model.state_dict()
    result = model.model.language_model.load_state_dict(source, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_proj.bias") for k in result.missing_keys), result
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
    transplant_vision(model.model.visual, teacher)
    model.tie_weights()
    model.generation_config = teacher.generation_config
    return model, qwen2vl_processor(tokenizer, vision.patch_size, image_side, vision.image_size // 2)


@torch.no_grad()
def transplant_vision(visual, teacher) -> None:
    """Copy `teacher`'s CLIP tower into Qwen2-VL's ViT `visual` wherever the two compute the same
    thing: the patch embedding, every block's norms, attention projections (q, k, v fused) and MLP,
    and the projector into the merger's MLP. What CLIP has and the ViT lacks (the class token, the
    absolute position embeddings, the norm before the first block) and what the ViT adds (2-D rotary
    attention, the merger's norm) is left for the distillation to absorb."""
    clip = teacher.model.vision_tower
    visual.patch_embed.proj.weight.copy_(clip.embeddings.patch_embedding.weight.unsqueeze(2))
    for block, layer in zip(visual.blocks, clip.encoder.layers, strict=True):
        attention = layer.self_attn
        block.norm1.load_state_dict(layer.layer_norm1.state_dict())
        block.norm2.load_state_dict(layer.layer_norm2.state_dict())
        block.attn.qkv.weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
        block.attn.qkv.bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        block.attn.proj.load_state_dict(attention.out_proj.state_dict())
        block.mlp.fc1.load_state_dict(layer.mlp.fc1.state_dict())
        block.mlp.fc2.load_state_dict(layer.mlp.fc2.state_dict())
    projector = teacher.model.multi_modal_projector
    visual.merger.mlp[0].load_state_dict(projector.linear_1.state_dict())
    visual.merger.mlp[2].load_state_dict(projector.linear_2.state_dict())


def qwen2vl_processor(tokenizer, patch_size: int, image_side: int, frame_side: int) -> Qwen2VLProcessor:
    """Qwen2-VL's processor with every image resized to `image_side` and every frame to `frame_side`
    squared pixels, CLIP normalisation, one frame per temporal patch, one token per patch."""
    def geometry(side: int) -> dict:
        return {"patch_size": patch_size, "temporal_patch_size": 1, "merge_size": 1,
                "size": {"shortest_edge": side * side, "longest_edge": side * side},
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry(image_side)),
        video_processor=Qwen2VLVideoProcessor(**geometry(frame_side), do_sample_frames=False, cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)


@dataclass(frozen=True)
class MRopeRecipeConfig(VideoRecipeConfig):
    """A `shapes-qwen2-vl` run (the fields of `VideoRecipeConfig`, with these defaults and additions).

    Attributes:
        init: the `shapes-video` checkpoint whose language model, vision tower and visual tokens are copied.
        image_side: the side images are resized to (96: 144 tokens, one per CLIP patch).
        distill_steps: steps of the distillation stage.
        distill_batch: images per distillation step (and a quarter as many clips).
        distill_lr: its peak learning rate.
        read_steps: steps of the read stage (the decoder-read distillation).
        read_batch: images per read step (and a quarter as many clips).
        read_lr: its peak learning rate.
        method: a vlmkit method installed for the adapt stage, or "none".
        adapt_vision: what of the vision tower trains in the adapt stage: "merger" or "all".
        eval_images: held-out images of the POPE check beside each video check.
    """

    init: str = "shapes-video"
    seed: int = 700_000_000
    pointing_steps: int = 0
    steps: int = 0
    letter_steps: int = 1600
    letter_lr: float = 3e-4
    dense_weight: float = 0.0
    eval_every: int = 100
    image_side: int = 96
    distill_steps: int = 400
    distill_batch: int = 32
    distill_lr: float = 2e-3
    read_steps: int = 0
    read_batch: int = 16
    read_lr: float = 5e-4
    method: str = "none"
    adapt_vision: str = "merger"
    eval_images: int = 24

    def __post_init__(self):
        super().__post_init__()
        if self.adapt_vision not in _ADAPT_VISION:
            raise ConfigError(f"adapt_vision {self.adapt_vision!r}: use one of {sorted(_ADAPT_VISION)}.")


class MRopeRecipe(VideoRecipe):
    """The `shapes-qwen2-vl` recipe (see the module docstring)."""

    name = "shapes-qwen2-vl"

    def __init__(self, config: MRopeRecipeConfig):
        import vlmkit
        from vlmkit import zoo

        self.teacher, _ = zoo.load(config.init)
        self.teacher.requires_grad_(False).eval()
        super().__init__(config)
        self.stages[:0] = [Stage("distill", config.distill_steps, config.distill_batch, config.distill_lr,
                                 ("model.model.visual",)),
                           Stage("read", config.read_steps, config.read_batch, config.read_lr, ("model.model.visual",))]
        self.stages = [s for s in self.stages if s.steps > 0]
        self.patch = None if config.method == "none" else vlmkit.apply(self.model, config.method)

    # ------------------------------------------------------------ the family

    def _build(self):
        return build_qwen2vl(self.teacher, self.config.image_side, self.config.seed)

    def _frame_geometry(self) -> tuple[int, int]:
        vision = self.teacher.config.vision_config
        return vision.image_size, vision.patch_size

    def _image_placeholder(self) -> list[int]:
        ids = self.tokenizer.convert_tokens_to_ids
        tokens = (self.config.image_side // self.patch_size) ** 2  # spatial_merge_size 1
        return [ids("<|vision_start|>"), *[ids("<|image_pad|>")] * tokens, ids("<|vision_end|>")]

    def _video_token(self) -> int:
        return self.model.config.video_token_id

    def _video_placeholder(self, num_frames: int) -> list[int]:
        ids = self.tokenizer.convert_tokens_to_ids
        return [ids("<|vision_start|>"), *[self._video_token()] * (num_frames * self.cells), ids("<|vision_end|>")]

    def _media_trainable(self) -> tuple[str, ...]:
        return ("model.model.language_model", _ADAPT_VISION[self.config.adapt_vision])

    def _media_inputs(self, kind: str, media: list) -> dict:
        if kind == "image":
            pixels = self.processor.image_processor(images=media, return_tensors="pt")
            return {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        pixels = self.processor.video_processor(videos=media, return_tensors="pt")
        return {"pixel_values_videos": pixels["pixel_values_videos"], "video_grid_thw": pixels["video_grid_thw"]}

    def _visual_output(self) -> torch.nn.Module:
        return self.model.model.visual.merger

    # ------------------------------------------------------------ distillation

    def batch(self, stage: Stage, step: int) -> dict:
        """Distillation: `batch_size` images and a quarter as many 8-frame clips; the read stage
        adds each image's conversation (as `VideoRecipe`'s image batches hold); later stages as
        `VideoRecipe.batch`."""
        if stage.name not in ("distill", "read"):
            out = super().batch(stage, step)
            ids = out["input_ids"]
            out["mm_token_type_ids"] = ((ids == self.model.config.image_token_id).int()
                                        + 2 * (ids == self.model.config.video_token_id).int())  # Qwen2-VL's
            return out
        first = step * stage.batch_size
        if stage.name == "read":
            out = collate([self._image_sample(stage, i) for i in range(first, first + stage.batch_size)],
                          self.tokenizer.pad_token_id, dense=())
            images = out.pop("images").numpy()
        else:
            out = {}
            images = np.stack([render_array(sample_scene(self._seed(stage, i), self.world))
                               for i in range(first, first + stage.batch_size)])
        clips = np.stack([render_clip(sample_clip(self._seed(stage, i), self.clip_world, 8))
                          for i in range(first, first + stage.batch_size // 4)])
        return {**out, "images": torch.from_numpy(images), "clips": torch.from_numpy(clips),
                **{f"student_{k}": v for k, v in self._media_inputs("image", list(images)).items()},
                **{f"student_{k}": v for k, v in self._media_inputs("clip", list(clips)).items()}}

    def loss(self, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
        """Distillation: `distill_loss` on image and frame tokens; the read stage adds the decoder's
        answer KL (`read_loss`); later stages as `VideoRecipe.loss`."""
        if stage.name not in ("distill", "read"):
            return super().loss(stage, batch)
        visual = self.model.model.visual
        student_images = visual(batch["student_pixel_values"], grid_thw=batch["student_image_grid_thw"]).pooler_output
        student_frames = visual(batch["student_pixel_values_videos"],
                                grid_thw=batch["student_video_grid_thw"]).pooler_output
        with torch.no_grad():
            target_images = self._teacher_tokens(batch["images"])
            target_frames = self.teacher.model.apply_pooling(self._teacher_tokens(batch["clips"].flatten(0, 1)))
        image_loss = distill_loss(student_images, target_images.flatten(0, 1))
        frame_loss = distill_loss(student_frames, target_frames.flatten(0, 1))
        metrics = {"image_loss": round(image_loss.item(), 4), "frame_loss": round(frame_loss.item(), 4)}
        total = image_loss + frame_loss
        if stage.name == "read":
            read = read_loss(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                             student_images, target_images.flatten(0, 1))
            total = total + read
            metrics["read_loss"] = round(read.item(), 4)
        return total, metrics

    def _teacher_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """`shapes-video`'s projected patch tokens of uint8 images `[N, H, W, 3]`: `[N, patches, width]`."""
        inner = self.teacher.model
        hidden = inner.vision_tower(pixel_values(images), output_hidden_states=True).hidden_states[-1]
        return inner.multi_modal_projector(hidden[:, 1:])

    def _student_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's merged tokens of uint8 images `[N, H, W, 3]`: `[N, tokens, width]`."""
        inputs = self._media_inputs("image", list(images.numpy()))
        tokens = self.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        return tokens.view(len(images), -1, tokens.shape[-1])

    def evaluate(self, stage: Stage, step: int) -> dict | None:
        """Every `eval_every` steps: in the read stage, `pope_reading` of the ViT's tokens on
        `eval_images` held-out images; in the adapt stage, the video check of `VideoRecipe.evaluate`
        and, beside it, POPE random and adversarial accuracy on `eval_images` held-out images."""
        if stage.name == "read":
            if not check_due(stage, step, self.config.eval_every):
                return None
            return {f"read_{split}": r["accuracy"] for split, r in pope_reading(
                self.model, self.processor, self._student_tokens, self.config.eval_images, config=self.world).items()}
        video = None if stage.name == "distill" else super().evaluate(stage, step)
        if video is None:
            return None
        pope = pope_eval(self.model, self.processor, self.config.eval_images, splits=("random", "adversarial"),
                         config=self.world)
        return video | {f"pope_{split}": r["accuracy"] for split, r in pope.items()}

    def export(self, path: str | Path) -> None:
        """The plain weights (the method's patch removed first); `training.json` names the method."""
        if self.patch is not None:
            self.patch.remove()
        super().export(path)


def read_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `model`'s decoder reading right-padded `input_ids` whose image placeholders hold
    `image_tokens` (`[placeholders, width]`), with 1-D positions (every token its index; M-RoPE with
    equal (t, h, w) indices is the transplanted decoder's own rotary embedding)."""
    embeds = model.get_input_embeddings()(input_ids)
    where = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(where, image_tokens.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    return model.lm_head(hidden)


def read_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) of the decoder's next-token distributions at the tokens before each
    answer token (`labels`), reading the teacher's image tokens and the student's (`read_logits`)."""
    at = labels[:, 1:] != IGNORE
    with torch.no_grad():
        target = read_logits(model, input_ids, attention_mask, teacher)[:, :-1][at].log_softmax(-1)
    logits = read_logits(model, input_ids, attention_mask, student)[:, :-1][at].log_softmax(-1)
    return F.kl_div(logits, target, log_target=True, reduction="batchmean")


@torch.no_grad()
def pope_reading(model, processor, tokens_of, n_images: int, seed: int = MONITOR_SEED,
                 config: WorldConfig | None = None, splits: tuple[str, ...] = ("random", "adversarial")) -> dict:
    """POPE read by the first answer token: "Yes" or "No", whichever `read_logits` scores higher, with
    the image placeholders holding `tokens_of(images)` (uint8 `[N, H, W, 3]` -> `[N, tokens, width]`).

    Separates what the visual tokens carry from what the decoder does with M-RoPE positions.

    Returns:
        `{split: {"accuracy", "yes_ratio", "questions"}}`.
    """
    config = config or WorldConfig()
    scenes = pope_scenes(n_images, seed, config)
    names = [str(s.seed) for s in scenes]
    tokens = dict(zip(names, tokens_of(torch.from_numpy(np.stack([render_array(s) for s in scenes])))))
    yes, no = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    result = {}
    for split in splits:
        rows = pope_questions([s.categories() for s in scenes], names, split, seed)
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["text"]}]}],
            add_generation_prompt=True) for r in rows]
        placeholder = processor.image_token * tokens[names[0]].shape[0]
        encoded = processor.tokenizer([t.replace(processor.image_token, placeholder) for t in texts],
                                      padding=True, padding_side="right", return_tensors="pt")
        mask = encoded["attention_mask"]
        image_tokens = torch.cat([tokens[r["image"]] for r in rows])
        logits = read_logits(model, encoded["input_ids"], mask, image_tokens)
        last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
        pred = ["yes" if y > n else "no" for y, n in zip(last[:, yes].tolist(), last[:, no].tolist())]
        gold = [r["label"] for r in rows]
        result[split] = {"accuracy": round(sum(p == g for p, g in zip(pred, gold)) / len(rows), 4),
                         "yes_ratio": round(pred.count("yes") / len(rows), 4), "questions": len(rows)}
    return result


def distill_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the target's mean squared norm, plus the mean cosine distance."""
    relative = (student - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
    return relative + (1 - F.cosine_similarity(student, target, dim=-1)).mean()
