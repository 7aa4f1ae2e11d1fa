"""The `shapes-qwen2-vl` recipe: the transplanted decoder, the prompt layouts, distillation, the
decoder-read distillation and the HoPE fine-tune beside its control."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vlmkit import zoo
from vlmkit.data.shapes import render_array
from vlmkit.train.evaluate import MONITOR_SEED
from vlmkit.data.shapes_bench import _qualifying, pope_questions
from vlmkit.train.data import IGNORE
from vlmkit.train.mrope import MRopeRecipe, MRopeRecipeConfig, distill_loss, pope_reading, read_logits, read_loss
from vlmkit.train.trainer import train
from vlmkit.train.video import batch_kind

TINY = MRopeRecipeConfig(distill_steps=2, distill_batch=4, read_steps=2, read_batch=4, letter_steps=4, batch=2,
                         eval_every=0)


def _stage(recipe, name: str):
    return next(s for s in recipe.stages if s.name == name)


@pytest.fixture(scope="module")
def recipe():
    return MRopeRecipe(TINY)


def test_the_transplanted_decoder_gives_the_teachers_text_logits(recipe):
    """On text, M-RoPE with equal (t, h, w) indices is the Llama's rotary embedding, and the zero
    biases add nothing: the Qwen2-VL model computes what shapes-video computes."""
    recipe.teacher.set_attn_implementation("eager")
    ids = recipe.tokenizer(["USER: Which option is blue? ASSISTANT: Best option:("], return_tensors="pt")
    with torch.no_grad():
        ours = recipe.model(**ids).logits
        theirs = recipe.teacher(**ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert type(recipe.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert recipe.model.config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]


def _placeholder_run(ids: list[int], start: int, end: int) -> list[int]:
    first, last = ids.index(start), ids.index(end)
    return ids[first:last + 1]


def test_training_layouts_are_what_the_processor_writes(recipe):
    """The training samples' image and clip placeholders equal the processor's expansion at
    evaluation time: 144 tokens an image (96 pixels, one token a patch), 36 a frame (48 pixels),
    between the vision start and end tokens."""
    processor, ids = recipe.processor, recipe.tokenizer.convert_tokens_to_ids
    start, end = ids("<|vision_start|>"), ids("<|vision_end|>")
    for kind, media, expected in (("image", np.zeros((96, 96, 3), np.uint8), recipe._image_placeholder()),
                                  ("video", np.zeros((8, 96, 96, 3), np.uint8), recipe._video_placeholder(8))):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Is there a star?"}]}],
            add_generation_prompt=True)
        out = processor(text=[text], **{f"{kind}s": [media]})
        assert _placeholder_run(out["input_ids"][0], start, end) == expected
    assert len(recipe._image_placeholder()) == 144 + 2 and len(recipe._video_placeholder(8)) == 8 * 36 + 2


def test_the_vit_starts_from_the_teachers_clip_tower(recipe):
    """Qwen2-VL's processor and patch embedding give exactly CLIP's patch embeddings of an image (same
    pixels, normalisation and patch order), and the blocks and the merger's MLP hold the CLIP layers'
    and the projector's weights."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlmkit.train.models import pixel_values

    clip = recipe.teacher.model.vision_tower
    fresh, _ = recipe._build()
    images = torch.from_numpy(np.stack([render_array(s) for s in
                                        _qualifying(MONITOR_SEED, 2, lambda s: True, recipe.world)]))
    inputs = recipe._media_inputs("image", list(images.numpy()))
    with torch.no_grad():
        ours = fresh.model.visual.patch_embed(inputs["pixel_values"])
        theirs = clip.embeddings.patch_embedding(pixel_values(images)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, theirs.flatten(0, 1), rtol=0, atol=1e-5)
    layer, block = clip.encoder.layers[2], fresh.model.visual.blocks[2]
    assert torch.equal(block.attn.qkv.weight[128:256], layer.self_attn.k_proj.weight)
    assert torch.equal(block.mlp.fc2.bias, layer.mlp.fc2.bias)
    assert torch.equal(fresh.model.visual.merger.mlp[2].weight, recipe.teacher.model.multi_modal_projector.linear_2.weight)
    assert isinstance(fresh, Qwen2VLForConditionalGeneration) and fresh.config.vision_config.spatial_merge_size == 1


def test_distillation_targets_are_the_teachers_visual_tokens(recipe):
    assert [s.name for s in recipe.stages] == ["distill", "read", "letters"]
    stage = recipe.stages[0]
    assert stage.name == "distill" and stage.trainable == ("model.model.visual",)
    batch = recipe.batch(stage, 0)
    assert batch["student_image_grid_thw"].tolist() == [[1, 12, 12]] * 4  # one token a patch
    assert batch["student_video_grid_thw"].tolist() == [[8, 6, 6]]  # frames at 48 pixels
    tokens = recipe._teacher_tokens(batch["images"])
    assert tokens.shape == (4, 144, 128)
    pooled = recipe.teacher.model.apply_pooling(recipe._teacher_tokens(batch["clips"].flatten(0, 1)))
    assert pooled.shape == (8, 36, 128)
    loss, metrics = recipe.loss(stage, batch)
    assert torch.isfinite(loss) and set(metrics) == {"image_loss", "frame_loss"}
    # the loss: relative squared error plus cosine distance, 0 exactly at the target
    target = torch.randn(5, 128)
    assert distill_loss(target, target).abs().item() < 1e-6
    assert distill_loss(2 * target, target).item() == pytest.approx(1.0, abs=1e-5)


def test_hope_fine_tune_and_its_control_share_batches_and_export_plain_weights(tmp_path):
    control = MRopeRecipe(TINY)
    hope = MRopeRecipe(dataclasses.replace(TINY, method="hope:train=True"))
    stage = _stage(control, "letters")
    batch = control.batch(stage, 0)  # a clip batch: same ids, labels and pixels in both runs
    other = hope.batch(stage, 0)
    assert batch.keys() == other.keys() and all(torch.equal(batch[k], other[k]) for k in batch)
    assert batch["mm_token_type_ids"].eq(2).sum(1).tolist() == [8 * 36] * 2
    with torch.no_grad():
        hope.model.load_state_dict(control.model.state_dict())
        assert control.loss(stage, batch)[0].item() != hope.loss(stage, batch)[0].item()  # the method acts
    final = train(hope, tmp_path / "hope", progress=False)
    training = json.loads((final / "training.json").read_text())
    assert training["recipe"] == "shapes-qwen2-vl" and training["config"]["method"] == "hope:train=True"
    model, processor = zoo.load(final)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.state_dict().keys() == hope.model.state_dict().keys()  # the patch was removed before saving


def test_adapt_stage_rotation_and_trainable_vision_are_settable(recipe):
    """By default the adapt stage trains the merger (not the ViT's blocks) on clips, clips, images and
    text in turn; `rotation` and `adapt_vision` change both, and a bad choice is named."""
    from vlmkit.errors import ConfigError
    from vlmkit.train.cli import _overrides

    stage = _stage(recipe, "letters")
    assert stage.trainable == ("model.model.language_model", "model.model.visual.merger")
    kinds = [batch_kind(recipe.batch(stage, step)) for step in range(stage.steps)]  # 4 steps
    assert kinds == ["clip", "clip", "image", "text"]
    config = _overrides(TINY, ["rotation=clip,image", "adapt_vision=all"])
    assert config.rotation == ("clip", "image") and config.adapt_vision == "all"
    with pytest.raises(ConfigError, match=r"adapt_vision 'vit'.*\['all', 'merger'\]"):
        _overrides(TINY, ["adapt_vision=vit"])


def test_read_logits_are_the_teachers_decoder_reading_the_teachers_tokens(recipe):
    """With the teacher's image tokens in the placeholders and 1-D positions, the transplanted decoder
    computes what shapes-video's own decoder computes on the same embeddings (right padding ignored)."""
    stage = _stage(recipe, "read")
    assert stage.trainable == ("model.model.visual",)
    batch = recipe.batch(stage, 0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.min() == 0 and (ids == recipe.model.config.image_token_id).sum(1).tolist() == [144] * 4
    teacher_tokens = recipe._teacher_tokens(batch["images"])
    recipe.teacher.set_attn_implementation("eager")
    with torch.no_grad():
        ours = read_logits(recipe.model, ids, mask, teacher_tokens.flatten(0, 1))
        embeds = recipe.teacher.get_input_embeddings()(ids)
        embeds[ids == recipe.model.config.image_token_id] = teacher_tokens.flatten(0, 1)
        hidden = recipe.teacher.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        theirs = recipe.teacher.lm_head(hidden)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_read_loss_is_the_answer_tokens_kl_to_the_teachers_reading(recipe):
    stage = _stage(recipe, "read")
    batch = recipe.batch(stage, 0)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    teacher = recipe._teacher_tokens(batch["images"]).flatten(0, 1).detach()
    student = (teacher + 0.5 * torch.randn_like(teacher)).requires_grad_(True)
    with torch.no_grad():
        assert read_loss(recipe.model, ids, mask, labels, teacher, teacher).abs().item() < 1e-5
        p = read_logits(recipe.model, ids, mask, teacher).log_softmax(-1)
        q = read_logits(recipe.model, ids, mask, student).log_softmax(-1)
    by_hand = [(p[b, t].exp() * (p[b, t] - q[b, t])).sum()
               for b in range(len(ids)) for t in range(ids.shape[1] - 1) if labels[b, t + 1] != IGNORE]
    loss = read_loss(recipe.model, ids, mask, labels, student, teacher)
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-4)
    loss.backward()
    assert student.grad.abs().sum() > 0
    _, metrics = recipe.loss(stage, batch)
    assert set(metrics) == {"image_loss", "frame_loss", "read_loss"}


def test_pope_reading_scores_each_question_by_its_first_answer_token(recipe):
    """Padded and batched, `pope_reading` answers each question as the decoder does reading it alone:
    "yes" when the "Yes" logit of the reply's first token beats "No"."""
    processor, world = recipe.processor, recipe.world
    result = pope_reading(recipe.model, processor, recipe._teacher_tokens, 6, config=world)
    scenes = list(_qualifying(MONITOR_SEED, 6, lambda s: len(s.categories()) >= 3, world))
    tokens = recipe._teacher_tokens(torch.from_numpy(np.stack([render_array(s) for s in scenes])))
    yes, no = recipe.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    for split in ("random", "adversarial"):
        rows = pope_questions([s.categories() for s in scenes], [str(s.seed) for s in scenes], split, MONITOR_SEED)
        right = said_yes = 0
        for row in rows:
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["text"]}]}],
                add_generation_prompt=True)
            ids = processor(text=[text], images=[np.zeros((96, 96, 3), np.uint8)], return_tensors="pt")["input_ids"]
            index = [str(s.seed) for s in scenes].index(row["image"])
            with torch.no_grad():
                last = read_logits(recipe.model, ids, torch.ones_like(ids), tokens[index])[0, -1]
            answer = "yes" if last[yes] > last[no] else "no"
            right += answer == row["label"]
            said_yes += answer == "yes"
        assert len(rows) == 36 and result[split] == {
            "accuracy": round(right / len(rows), 4), "yes_ratio": round(said_yes / len(rows), 4), "questions": 36}
