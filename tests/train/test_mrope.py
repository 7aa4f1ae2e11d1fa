"""The `shapes-qwen2-vl` recipe: the transplanted decoder, the prompt layouts, distillation and the
HoPE fine-tune beside its control."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vlmkit import zoo
from vlmkit.train.mrope import MRopeRecipe, MRopeRecipeConfig, distill_loss
from vlmkit.train.trainer import train
from vlmkit.train.video import batch_kind

TINY = MRopeRecipeConfig(distill_steps=2, distill_batch=4, letter_steps=4, batch=2, eval_every=0)


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
    evaluation time: 144 tokens an image (192 pixels, 2x2 merged), 36 a frame, between the vision
    start and end tokens."""
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


def test_distillation_targets_are_the_teachers_visual_tokens(recipe):
    stage = recipe.stages[0]
    assert stage.name == "distill" and stage.trainable == ("model.model.visual",)
    batch = recipe.batch(stage, 0)
    assert batch["student_image_grid_thw"].tolist() == [[1, 24, 24]] * 4
    assert batch["student_video_grid_thw"].tolist() == [[8, 12, 12]]
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
    stage = control.stages[1]
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

    stage = recipe.stages[1]
    assert stage.name == "letters" and stage.trainable == ("model.model.language_model", "model.model.visual.merger")
    kinds = [batch_kind(recipe.batch(stage, step)) for step in range(stage.steps)]  # 4 steps
    assert kinds == ["clip", "clip", "image", "text"]
    config = _overrides(TINY, ["rotation=clip,image", "adapt_vision=all"])
    assert config.rotation == ("clip", "image") and config.adapt_vision == "all"
    with pytest.raises(ConfigError, match=r"adapt_vision 'vit'.*\['all', 'merger'\]"):
        _overrides(TINY, ["adapt_vision=vit"])
