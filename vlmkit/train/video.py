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

MVBench's reply names an option by its letter ("Best option:(" pre-filled, then "B) blue"), so the
model must first work out the answer's content and then point back to the letter written before
that content in the prompt. Earlier recipes (`docs/shapes.md`) learned content well above chance
but never the pointing. This one builds the two apart:

* The language model grows by `extra_layers` layers on top of `shapes-llava`'s four, added as
  identities (zero output projections), so the grown model starts as the image model.
* **Gist**: at the pre-filled "(" the output of the original top layer, read through the final
  norm and the tied head, must name the answer's content ("blue"), as `shapes-llava` would name
  it; the added layers only have to point from that word to its letter.
* **Text pointing** ("Which option is blue?", options of one kind): the pointing circuit is
  learned first on text alone, where the content is a prompt word, and stays in the mixture.
* **Frame attention**: one head of the first layer is trained to attend from every visual token
  to the same cell of the previous frame, so every token sees what changed there; two heads of
  the third layer are trained to attend from "(" to the subject's tokens where the event shows
  (where it appears, disappears or changes colour; for a move, its last and first frame).

The ViT stays frozen (it is `shapes-llava`'s). The dense per-patch category, colour and side
losses of `shapes-llava` stay on the projector's output for every frame and image. Three stages:

1. **pointing**: text pointing only (language model).
2. **video**: clips with MVBench's lettered reply, images (the `shapes-llava` question mixture
   followed by an image multiple-choice turn) and text pointing, in a fixed rotation.
3. **letters**: the same data plus the pointer attention and readout losses (the shipped weights
   ran it to step 1,500, resumed from a 1,000-step run; `docs/shapes.md`).

The prompt is MVBench's as the eval suite writes it (`vlmkit.eval.benchmarks.video.PROMPTS["mvbench"]`);
its system text is mostly outside the shapes vocabulary and reads as `<unk>`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
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
from vlmkit.data.shapes_video import (
    DIRECTIONS, clip_question, frame_objects, mc_answer, mc_prompt, render_clip, sample_clip,
)
from vlmkit.errors import ConfigError
from vlmkit.train.data import IGNORE, ConversationEncoder, Mixture, collate, sample_qas
from vlmkit.train.evaluate import video_eval
from vlmkit.train.losses import dense_side_loss, dense_word_loss, export
from vlmkit.train.models import CLIP_MEAN, CLIP_STD
from vlmkit.train.trainer import Stage, check_due
from vlmkit.zoo.shipped import _resolve

_STAGE_SEED_STRIDE = 100_000_000


def build_onevision(init: str | Path, seed: int = 0, extra_layers: int = 0):
    """`shapes-video` before training: a OneVision model holding `init`'s (a `shapes-llava`
    checkpoint) ViT, projector and Llama, its tokenizer, and the OneVision processor; or, when
    `init` is already a OneVision checkpoint (`shapes-video`, to continue it), that model as it is.

    Args:
        init: the `shapes-llava` checkpoint, or a OneVision one.
        seed: seed of the new parameters.
        extra_layers: decoder layers added on top of the Llama's, as identities (their attention
            output and MLP down projections are zero), so the grown model computes what `init` does
            (none are added to a OneVision `init`).

    Returns:
        `(model, processor)`; the newline vector and the added layers are drawn with `seed`.
    """
    path = _resolve(init)
    if json.loads((path / "config.json").read_text()).get("model_type") == "llava_onevision":
        from vlmkit import zoo

        return zoo.load(path)
    llava = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    source = llava.config
    side = source.vision_config.image_size
    ids = tokenizer.convert_tokens_to_ids
    text_config = source.text_config.to_dict()
    depth = text_config["num_hidden_layers"]
    text_config["num_hidden_layers"] = depth + extra_layers
    if text_config.get("layer_types"):
        text_config["layer_types"] = text_config["layer_types"][:1] * (depth + extra_layers)
    config = LlavaOnevisionConfig(
        vision_config=source.vision_config.to_dict(), text_config=text_config,
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_layer=source.vision_feature_layer,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        image_grid_pinpoints=[[side, side]], projector_hidden_act=source.projector_hidden_act,
        multimodal_projector_bias=source.multimodal_projector_bias, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    result = model.load_state_dict(llava.state_dict(), strict=False)
    added = [f"model.language_model.layers.{i}." for i in range(depth, depth + extra_layers)]
    assert not result.unexpected_keys and all(
        k == "model.image_newline" or k.startswith(tuple(added)) for k in result.missing_keys), result
    with torch.no_grad():
        for layer in model.model.language_model.layers[depth:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
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


_DENSE = ("category", "colour", "horizontal", "vertical")
BATCH_KINDS = ("clip", "image", "text")
"""What a batch of the video and letters stages can hold."""
_POINTING_WORDS = (list(CATEGORIES), list(COLOURS), list(DIRECTIONS))
"""The kinds of option of a text pointing question: categories, colours, directions."""


@dataclass(frozen=True)
class VideoRecipeConfig:
    """Everything that defines a `shapes-video` training run.

    Attributes:
        init: the `shapes-llava` checkpoint it grows from (a shipped name or a folder).
        seed: seed of the new parameters and first training scene seed.
        frame_counts: frames per clip; clip batches cycle through these counts (one count a batch).
        extra_layers: decoder layers on top of `shapes-llava`'s (`build_onevision` adds them when
            growing from `shapes-llava`; a OneVision `init` has them already).
        pointing_steps: steps of the text pointing stage.
        pointing_lr: its peak learning rate.
        steps: steps of the video stage.
        batch: batch size.
        lr: peak learning rate of the video stage.
        letter_steps: steps of the letters stage (the video stage's data plus the pointer losses).
        letter_lr: its peak learning rate.
        gist_weight: weight of the gist loss at the pre-filled "(".
        attention_weight: weight of the frame attention losses.
        pointer_weight: weight of the pointer attention and readout losses (letters stage).
        dense_weight: weight of the dense per-patch category/colour/side losses.
        mixture: question mixture of the image batches.
        rotation: what each batch of the video and letters stages holds, in turn (`BATCH_KINDS`).
        eval_every: steps between video checks (0: never).
        eval_clips: clips per check.
    """

    init: str = "shapes-llava"
    seed: int = 500_000_000
    frame_counts: tuple[int, ...] = (8,)
    extra_layers: int = 2
    pointing_steps: int = 600
    pointing_lr: float = 1e-3
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-3
    letter_steps: int = 1000
    letter_lr: float = 5e-4
    gist_weight: float = 1.0
    attention_weight: float = 0.5
    pointer_weight: float = 0.5
    dense_weight: float = 0.5
    mixture: Mixture = field(default_factory=Mixture)
    rotation: tuple[str, ...] = ("clip", "clip", "image", "text")
    eval_every: int = 200
    eval_clips: int = 48

    def __post_init__(self):
        unknown = sorted(set(self.rotation) - set(BATCH_KINDS))
        if unknown or "clip" not in self.rotation:
            raise ConfigError(f"rotation {self.rotation!r}: use {BATCH_KINDS} only, with at least one clip"
                              + (f" ({unknown} unknown)." if unknown else "."))

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


class VideoRecipe:
    """The `shapes-video` recipe (see the module docstring)."""

    name = "shapes-video"

    def __init__(self, config: VideoRecipeConfig):
        self.config = config
        self.model, self.processor = self._build()
        self.model.set_attn_implementation("eager")  # attention weights for the frame attention loss
        self.tokenizer = self.processor.tokenizer
        text_width = self.model.config.text_config.hidden_size
        self.heads = torch.nn.ParameterDict({"background": torch.zeros(text_width), "no_colour": torch.zeros(text_width)})
        self.modules = torch.nn.ModuleDict({"model": self.model, "heads": self.heads})
        self.side, self.patch_size = self._frame_geometry()
        self.world = WorldConfig(image_size=self.side)
        self.clip_world = WorldConfig(image_size=self.side, max_objects=3)
        ids = self.tokenizer.convert_tokens_to_ids
        self.grid = self.side // self.patch_size
        self.cells = ((self.grid + 1) // 2) ** 2  # tokens per frame after OneVision's 2x2 pooling
        self.image_encoder = ConversationEncoder(self.tokenizer, self._image_placeholder())
        self.video_encoders = {n: ConversationEncoder(self.tokenizer, self._video_placeholder(n))
                               for n in config.frame_counts}
        self.text_encoder = ConversationEncoder(self.tokenizer, [])
        self.paren_id = ids("(")
        self.category_ids = torch.tensor(ids(list(CATEGORIES)))
        self.colour_ids = torch.tensor(ids(list(COLOURS)))
        self.side_ids = torch.tensor([ids(pair) for pair in (["left", "right"], ["top", "bottom"])])
        self.gist_layer = self.model.config.text_config.num_hidden_layers - config.extra_layers - 1
        language = ("model.model.language_model",)
        media = self._media_trainable()
        self.letter_ids = ids([f"({letter})" for letter in "ABCD"])
        self.stages = [s for s in (
            Stage("pointing", config.pointing_steps, 2 * config.batch, config.pointing_lr, language),
            Stage("video", config.steps, config.batch, config.lr, media),
            Stage("letters", config.letter_steps, config.batch, config.letter_lr, media,
                  options={"pointer_weight": config.pointer_weight})) if s.steps > 0]

    # ---------------------------------------------------------------- the family

    def _build(self):
        """The model and processor before training (`build_onevision`)."""
        return build_onevision(self.config.init, self.config.seed, self.config.extra_layers)

    def _frame_geometry(self) -> tuple[int, int]:
        """A frame's side and the ViT's patch side, in pixels."""
        vision = self.model.config.vision_config
        return vision.image_size, vision.patch_size

    def _image_placeholder(self) -> list[int]:
        """The ids an image expands to in the prompt (OneVision's AnyRes views and newlines)."""
        token = self.tokenizer.convert_tokens_to_ids("<image>")
        probe = self.processor(text=["<image>"], images=[np.zeros((self.side, self.side, 3), np.uint8)])
        return [token] * probe["input_ids"][0].count(token)

    def _video_token(self) -> int:
        """The id of the prompt's video tokens."""
        return self.model.config.video_token_index

    def _video_placeholder(self, num_frames: int) -> list[int]:
        """The ids a clip of `num_frames` frames expands to (pooled frames, one newline)."""
        return [self._video_token()] * (num_frames * self.cells + 1)

    def _media_trainable(self) -> tuple[str, ...]:
        """What the video and letters stages train."""
        return ("model.model.multi_modal_projector", "model.model.language_model", "model.model.image_newline", "heads")

    def _media_inputs(self, kind: str, media: list) -> dict:
        """The model's pixel inputs for a batch of images or clips (uint8 arrays)."""
        if kind == "image":
            pixels = self.processor.image_processor(images=media, return_tensors="pt")
            return {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
        return {"pixel_values_videos": self.processor.video_processor(videos=media, return_tensors="pt")[
            "pixel_values_videos"]}

    def _visual_output(self) -> torch.nn.Module:
        """The module whose output is the visual tokens (per frame or view, before pooling)."""
        return self.model.model.multi_modal_projector

    def _dense_tokens(self, captured: dict, batch: dict) -> torch.Tensor:
        """The visual tokens the dense per-patch losses read: `[N, patches, width]`."""
        tokens = captured["projected"]
        if "pixel_values" in batch:  # AnyRes: the base view first, then the crop
            tokens = tokens.view(len(batch["labels"]), -1, *tokens.shape[1:])[:, 0]
        return tokens

    # ---------------------------------------------------------------- data

    def _seed(self, stage: Stage, index: int) -> int:
        k = [s.name for s in self.stages].index(stage.name)
        return check_seeds("train", self.config.seed + k * _STAGE_SEED_STRIDE, stage.steps * stage.batch_size)[index]

    def _encode(self, encoder: ConversationEncoder, qas: list[QA], item: dict) -> dict:
        """Ids, labels and the gist target of `qas` followed by the multiple-choice `item` in
        MVBench's prompt and reply; the gist is the answer's word at the reply's "("."""
        qa = QA(mc_prompt(item["question"], item["candidates"]), mc_answer(item["candidates"], item["answer"]),
                item["task"], item["answer"])
        ids, labels = encoder.encode([*qas, qa], self.config.mixture.focus)
        ids, labels = torch.tensor(ids), torch.tensor(labels)
        gist = torch.full_like(labels, IGNORE)
        where = ((ids == self.paren_id) & (labels != IGNORE)).nonzero()[-1, 0]
        gist[where] = self.tokenizer.convert_tokens_to_ids(item["answer"])
        options = torch.stack([(ids[:where] == letter).nonzero()[-1, 0] for letter in self.letter_ids])
        return {"input_ids": ids, "labels": labels, "gist": gist, "options": options,
                "answer": torch.tensor(item["candidates"].index(item["answer"]))}

    def _text_sample(self, stage: Stage, index: int) -> dict:
        item = pointing_question(np.random.default_rng(self._seed(stage, index)))
        return {"image": torch.zeros(0), **self._encode(self.text_encoder, [], item)}

    def _image_sample(self, stage: Stage, index: int) -> dict:
        seed = self._seed(stage, index)
        scene = sample_scene(seed, self.world)
        rng = np.random.default_rng([seed, 7])
        qas = sample_qas(scene, rng, self.config.mixture)
        dense = patch_labels(scene, self.patch_size)
        return {"image": torch.from_numpy(render_array(scene)), **self._encode(self.image_encoder, qas, image_choice(scene, rng)),
                **{k: torch.from_numpy(dense[k]) for k in _DENSE}}

    def _clip_sample(self, stage: Stage, index: int, num_frames: int) -> dict:
        seed = self._seed(stage, index)
        clip = sample_clip(seed, self.clip_world, num_frames)
        item = clip_question(clip, np.random.default_rng([seed, 4]))
        frames = [patch_labels(dataclasses.replace(clip.scene, objects=frame_objects(clip, t)), self.patch_size)
                  for t in range(clip.num_frames)]
        category = np.stack([f["category"] for f in frames])
        return {"image": torch.from_numpy(render_clip(clip)), **self._encode(self.video_encoders[num_frames], [], item),
                "event": torch.from_numpy(event_cells(clip, category, CATEGORIES.index(clip.subject.category))),
                **{k: torch.from_numpy(np.stack([f[k] for f in frames])) for k in _DENSE}}

    def batch(self, stage: Stage, step: int) -> dict:
        """Batch `step`: text pointing in the pointing stage; then `rotation`'s kinds in turn, the clip
        batches cycling through `frame_counts`."""
        rotation = self.config.rotation
        kind = "text" if stage.name == "pointing" else rotation[step % len(rotation)]
        clip_batch = step // len(rotation) * rotation.count("clip") + rotation[:step % len(rotation)].count("clip")
        num_frames = self.config.frame_counts[clip_batch % len(self.config.frame_counts)]
        make = {"text": self._text_sample, "image": self._image_sample,
                "clip": functools.partial(self._clip_sample, num_frames=num_frames)}[kind]
        first = step * stage.batch_size
        samples = [make(stage, i) for i in range(first, first + stage.batch_size)]
        out = collate(samples, self.tokenizer.pad_token_id, dense=_DENSE + ("event",) if kind == "clip" else
                      _DENSE if kind == "image" else ())
        out["gist"] = torch.nn.utils.rnn.pad_sequence([s["gist"] for s in samples], True, IGNORE)
        out["options"] = torch.stack([s["options"] for s in samples])
        out["answer"] = torch.stack([s["answer"] for s in samples])
        media = list(out.pop("images").numpy())
        if kind != "text":
            out.update(self._media_inputs(kind, media))
        return out

    # ---------------------------------------------------------------- losses

    @contextlib.contextmanager
    def _captured(self):
        """Capture the projector's output (per frame or view, before pooling), the gist layer's
        output and the attention weights of the first and third decoder layers."""
        captured = {}
        layers = self.model.model.language_model.layers

        def keep(name, index=None):
            return lambda module, args, output: captured.__setitem__(name, output if index is None else output[index])

        handles = [self._visual_output().register_forward_hook(keep("projected")),
                   layers[self.gist_layer].register_forward_hook(keep("gist")),
                   layers[0].self_attn.register_forward_hook(keep("frame_attention", 1)),
                   layers[2].self_attn.register_forward_hook(keep("event_attention", 1)),
                   layers[-2].self_attn.register_forward_hook(keep("letter_attention", 1)),
                   layers[-1].self_attn.register_forward_hook(keep("pointer_attention", 1)),
                   layers[-1].self_attn.o_proj.register_forward_pre_hook(
                       lambda module, args: captured.__setitem__("pointer_heads", args[0])),
                   self.model.model.language_model.norm.register_forward_pre_hook(
                       lambda module, args: captured.__setitem__("residual", args[0]))]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def loss(self, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
        """Answer-token cross-entropy, plus `gist_weight` times the gist cross-entropy, plus
        `attention_weight` times the frame attention losses, plus `dense_weight` times the per-patch
        word and side losses."""
        targets = ("labels", "gist", "event", "options", "answer") + _DENSE
        inputs = {k: v for k, v in batch.items() if k not in targets}
        with self._captured() as captured:
            out = self.model(**inputs)
        language = self.model.model.language_model
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        gist_logits = self.model.lm_head(language.norm(captured["gist"]))
        gist = F.cross_entropy(gist_logits.flatten(0, 1), batch["gist"].flatten(), ignore_index=IGNORE)
        at = batch["gist"] != IGNORE
        metrics = {"lm_loss": round(loss.item(), 4), "gist_acc": round(
            (gist_logits[at].argmax(-1) == batch["gist"][at]).float().mean().item(), 4)}
        total = loss + self.config.gist_weight * gist
        query = at.int().argmax(1)  # the reply's "("
        if stage.options.get("pointer_weight"):
            pointer = pointer_attention_loss(captured["letter_attention"][:, 0], captured["pointer_attention"][:, 0],
                                             query, batch["options"], batch["answer"])
            readout = self._readout_loss(captured["pointer_heads"], captured["residual"], query, batch["labels"])
            total = total + stage.options["pointer_weight"] * (pointer + readout)
            metrics["pointer_loss"] = round(pointer.item(), 4)
            metrics["readout_loss"] = round(readout.item(), 4)
        if "pixel_values_videos" in batch:
            start = (batch["input_ids"] == self._video_token()).int().argmax(1)
            frames = batch["event"].shape[2]
            attention = frame_attention_loss(captured["frame_attention"][:, 0], start, frames, self.cells)
            attention = attention + event_attention_loss(captured["event_attention"][:, :2], query,
                                                         start, batch["event"])
            total = total + self.config.attention_weight * attention
            metrics["attention_loss"] = round(attention.item(), 4)
        if "category" in batch and self.config.dense_weight:
            tokens = self._dense_tokens(captured, batch)
            words = language.embed_tokens.weight
            dense, accuracy = dense_word_loss(
                tokens, words, self.category_ids, self.colour_ids, self.heads["background"], self.heads["no_colour"],
                batch["category"].flatten(0, -3), batch["colour"].flatten(0, -3))
            side, _ = dense_side_loss(tokens, words, self.side_ids, batch["horizontal"].flatten(0, -3),
                                      batch["vertical"].flatten(0, -3))
            total = total + self.config.dense_weight * (dense + side)
            metrics["object_patch_acc"] = accuracy
        metrics["batch"] = batch_kind(batch)
        return total, metrics

    def _readout_loss(self, heads: torch.Tensor, residual: torch.Tensor, query: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the reply's letter read from the pointer head's output alone: its share
        of the last layer's output projection, scaled as the final RMS norm scales the whole
        residual stream (`residual`, detached), then the norm's gain and the tied head.

        Scaled by the whole stream's norm rather than its own, the head must write the letter
        loudly enough to outvote the other components' letter noise (normalised alone, it was
        right 94% of the time on held-out clips while the reply's letter was right 61.5%)."""
        language = self.model.model.language_model
        attention = language.layers[-1].self_attn
        width = attention.head_dim
        rows = torch.arange(len(query), device=query.device)
        head = heads[rows, query, :width] @ attention.o_proj.weight[:, :width].T
        stream = residual[rows, query].detach()
        scale = torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + language.norm.variance_epsilon)
        logits = self.model.lm_head(head * scale * language.norm.weight)
        return F.cross_entropy(logits, labels[rows, query + 1])

    def evaluate(self, stage: Stage, step: int) -> dict | None:
        """Video multiple-choice accuracy on held-out clips every `eval_every` steps of the video and
        letters stages, at each of `frame_counts` (keyed by the count when there are several)."""
        if stage.name == "pointing" or not check_due(stage, step, self.config.eval_every):
            return None
        results = {n: video_eval(self.model, self.processor, self.config.eval_clips, config=self.clip_world,
                                 num_frames=n) for n in self.config.frame_counts}
        return results.popitem()[1] if len(results) == 1 else {f"frames_{n}": r for n, r in results.items()}

    def export(self, path: str | Path) -> None:
        """Write the model, processor and the recipe in `save_pretrained` layout."""
        export(self.model, self.processor, path, self.name, self.config.to_dict(), self.world)


def batch_kind(batch: dict) -> str:
    """Which of `BATCH_KINDS` a collated batch holds, from its pixel inputs."""
    return "clip" if "pixel_values_videos" in batch else "image" if "pixel_values" in batch else "text"


def pointing_question(rng: np.random.Generator) -> dict:
    """Text pointing: "Which option is blue?" with four options of one kind (categories, colours
    or directions), in `clip_question`'s form; the answer is a word of the prompt."""
    words = _POINTING_WORDS[int(rng.integers(len(_POINTING_WORDS)))]
    candidates = [words[i] for i in rng.permutation(len(words))[:4]]
    answer = candidates[int(rng.integers(4))]
    return {"task": "pointing", "question": f"Which option is {answer}?", "candidates": candidates, "answer": answer}


def image_choice(scene, rng: np.random.Generator) -> dict:
    """A multiple-choice question about an image, in `clip_question`'s form: which object is in
    the image (one present, three absent), or the colour of an object that is the only one of its
    kind."""
    unique = [o for o in scene.objects if scene.count(o.category) == 1]
    if unique and rng.random() < 0.5:
        obj = unique[int(rng.integers(len(unique)))]
        question, answer = f"What color is the {obj.category}?", obj.colour
        others = [c for c in COLOURS if c != obj.colour]
    else:
        present = scene.categories()
        question, answer = "Which object is in the image?", present[int(rng.integers(len(present)))]
        others = [c for c in CATEGORIES if c not in present]
    candidates = [answer, *[others[i] for i in rng.permutation(len(others))[:3]]]
    return {"task": "image_choice", "question": question,
            "candidates": [candidates[i] for i in rng.permutation(4)], "answer": answer}


def event_cells(clip, category: np.ndarray, subject: int) -> np.ndarray:
    """Where the subject's event shows, on OneVision's pooled grid: bool `[2, T, g, g]`, map 0
    "after" and map 1 "before".

    Appear: the subject's cells in the frame it appears (0) ; disappear: its last cells in the
    frame it is gone (1); colour: its cells in the frame it changes (0) and in frame 0 (1); move:
    its cells in the last frame (0) and the first (1). `category` is the per-frame, per-patch
    category map `[T, G, G]` (`patch_labels`)."""
    t, g = category.shape[0], category.shape[1]
    pooled = (category == subject).reshape(t, g // 2, 2, g // 2, 2).any((2, 4))
    cells = np.zeros((2, *pooled.shape), bool)
    e = clip.event_frame
    if clip.event == "appear":
        cells[0, e] = pooled[e]
    elif clip.event == "disappear":
        cells[1, e] = pooled[e - 1]
    elif clip.event == "color":
        cells[0, e], cells[1, 0] = pooled[e], pooled[0]
    else:
        cells[0, -1], cells[1, 0] = pooled[-1], pooled[0]
    return cells


def frame_attention_loss(weights: torch.Tensor, start: torch.Tensor, num_frames: int, cells: int) -> torch.Tensor:
    """-mean log attention from each visual token of frames 1.. to the same cell of the previous
    frame. `weights`: one head's attention `[B, L, L]`; `start`: each row's first video token."""
    rows = start[:, None] + torch.arange(cells, num_frames * cells, device=start.device)
    batch = torch.arange(len(start), device=start.device)[:, None]
    return -weights[batch, rows, rows - cells].clamp_min(1e-6).log().mean()


def event_attention_loss(weights: torch.Tensor, query: torch.Tensor, start: torch.Tensor,
                         event: torch.Tensor) -> torch.Tensor:
    """-mean log of the attention mass that head k puts from `query` on the tokens of event map k.

    Args:
        weights: two heads' attention `[B, 2, L, L]`.
        query: each row's query position (the reply's "(").
        start: each row's first video token.
        event: `[B, 2, T, g, g]` (`event_cells`); an empty map adds nothing.
    """
    event = event.flatten(2)
    rows = weights[torch.arange(len(query)), :, query]  # [B, 2, L]
    positions = start[:, None] + torch.arange(event.shape[-1], device=start.device)
    mass = (rows.gather(2, positions[:, None].expand(-1, 2, -1)) * event).sum(-1)
    used = event.any(-1)
    return -(mass[used].clamp_min(1e-6).log()).sum() / used.sum().clamp_min(1)


def pointer_attention_loss(letter_weights: torch.Tensor, pointer_weights: torch.Tensor, query: torch.Tensor,
                           options: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """The pointer from the answer's content to its letter, in two heads' attention `[B, L, L]`.

    `letter_weights` (the next-to-last layer) should attend from each option's text token (one
    after its "(A)" token at `options[:, i]`) to that letter token; `pointer_weights` (the last
    layer) from `query` (the reply's "(") to the text token of option `answer`. Loss = -mean log of
    both attentions.
    """
    rows = torch.arange(len(query), device=query.device)
    letter = letter_weights[rows[:, None], options + 1, options]
    pointer = pointer_weights[rows, query, options[rows, answer] + 1]
    return -(letter.clamp_min(1e-6).log().mean() + pointer.clamp_min(1e-6).log().mean())
