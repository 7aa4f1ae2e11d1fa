"""The shipped shapes checkpoints load with plain `from_pretrained` and answer held-out questions at
the quality bars (a fast subset of the README's eval: other held-out seeds, fewer images)."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

import vlmkit
from vlmkit import zoo
from vlmkit.data.shapes import EVAL_SEEDS, WorldConfig
from vlmkit.train.evaluate import chair_eval, mme_eval, pope_eval, video_eval

CHECKPOINTS = Path(zoo.__file__).parent / "checkpoints"
MAX_BYTES = 25 * 1024 * 1024
SUBSET_SEED = EVAL_SEEDS.start + 500_000  # held out, and apart from the README's eval images
IMAGES = WorldConfig(image_size=96)  # the world every shipped model was trained on
CLIPS = WorldConfig(image_size=96, max_objects=3)
SHIPPED = {  # name: the transformers class it loads with
    "shapes-llava": LlavaForConditionalGeneration,
    "shapes-llava-deep": LlavaForConditionalGeneration,
    "shapes-video": LlavaOnevisionForConditionalGeneration,
    "shapes-qwen2-vl": Qwen2VLForConditionalGeneration,
    "shapes-qwen2-vl-hope": Qwen2VLForConditionalGeneration,
}
IMAGE_MODELS = ["shapes-llava", "shapes-llava-deep", "shapes-qwen2-vl"]  # held to shapes-llava's bars


@functools.cache
def shipped(name: str):
    """`(model, processor)` of a shipped checkpoint, by plain `from_pretrained` of the model's own class."""
    folder = CHECKPOINTS / name
    return SHIPPED[name].from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def training(name: str) -> dict:
    """The recipe record a shipped checkpoint carries (`training.json`)."""
    return json.loads((CHECKPOINTS / name / "training.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_checkpoint_layout_and_size(name):
    folder = CHECKPOINTS / name
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "training.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_BYTES
    assert name in zoo.available()


@pytest.mark.parametrize("name", SHIPPED)
def test_checkpoint_was_trained_on_the_current_world(name):
    """A change to the generator's world needs a retrain: the shipped weights record theirs."""
    assert training(name)["world"] == dataclasses.asdict(IMAGES)


@pytest.mark.parametrize("name", SHIPPED)
def test_zoo_load_equals_from_pretrained(name):
    model, _ = zoo.load(name)
    assert type(model) is SHIPPED[name]
    reference = shipped(name)[0].state_dict()
    assert model.state_dict().keys() == reference.keys()
    assert all(value.equal(reference[key]) for key, value in model.state_dict().items())


def _visual_tokens_per_image(model, processor) -> int:
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    ids = processor(images=[image], text=[text], return_tensors="pt")["input_ids"]
    return int((ids == model.config.image_token_id).sum())


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_shapes_image_model_pope_subset(name):
    model = shipped(name)
    assert _visual_tokens_per_image(*model) == 144
    # 1,800 questions a split: the gap's standard error is under one point (at 180 it is about 2.5)
    result = pope_eval(*model, n_images=300, seed=SUBSET_SEED, config=IMAGES)
    assert result["random"]["accuracy"] >= 0.88, result
    # a real, prior-driven hallucination gap: co-occurring negatives fool it more often
    assert result["adversarial"]["accuracy"] <= result["random"]["accuracy"] - 0.03, result


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_shapes_image_model_mme_and_chair_subset(name):
    model = shipped(name)
    mme = mme_eval(*model, 40, SUBSET_SEED, IMAGES)  # 80 questions a subtask
    for subtask in ("existence", "count", "color", "position"):
        assert mme[subtask]["accuracy"] >= 0.75, mme
    chair = chair_eval(*model, 40, SUBSET_SEED, IMAGES)
    assert 0.03 <= chair["chair_i"] <= 0.30, chair


def test_shapes_video_mvbench_subset_at_16_frames():
    # MVBench's protocol and parser on 200 held-out clips of 16 frames, MVBench's default and twice the
    # length the model was first trained at (chance 0.25; the standard error is 3 points)
    result = video_eval(*shipped("shapes-video"), 200, SUBSET_SEED, CLIPS, num_frames=16)
    assert result["accuracy"] >= 0.70, result


def test_shapes_qwen2_vl_video_subset():
    # 8-frame clips, the length it was trained on (chance 0.25; 100 clips: a standard error of 4 points)
    result = video_eval(*shipped("shapes-qwen2-vl"), 100, SUBSET_SEED, CLIPS, num_frames=8)
    assert result["accuracy"] >= 0.75, result


def test_shapes_qwen2_vl_hope_matches_its_control_on_long_clips():
    """HoPE's claim at the shipped weights: on clips four times the trained length, the HoPE fine-tune
    with `hope` applied does at least as well as the control fine-tune (same steps, no method)."""
    control = video_eval(*shipped("shapes-qwen2-vl"), 100, SUBSET_SEED, CLIPS, num_frames=32)
    hope_model = shipped("shapes-qwen2-vl-hope")
    with vlmkit.apply(hope_model[0], "hope"):
        hope = video_eval(*hope_model, 100, SUBSET_SEED, CLIPS, num_frames=32)
    assert hope["accuracy"] >= max(control["accuracy"], 0.6), (hope, control)


def test_shapes_qwen2_vl_hope_and_its_control_differ_only_in_the_method():
    control, hope = (training(name)["config"] for name in ("shapes-qwen2-vl", "shapes-qwen2-vl-hope"))
    assert control.pop("method") == "none" and hope.pop("method") == "hope:train=True"
    assert control == hope
