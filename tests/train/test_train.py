"""Training code: tokenizer and chat format, data stream, and a resumable tiny run."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmkit.data.shapes import EVAL_SEEDS, sample_scene
from vlmkit.data.shapes_bench import pope_questions
from vlmkit.data.shapes_text import QA_KINDS, caption
from vlmkit.data.shapes_video import clip_question, mc_answer, mc_prompt, sample_clip
from vlmkit.errors import ConfigError
from vlmkit.train.data import IGNORE, ConversationEncoder, Mixture, ShapesStream
from vlmkit.train.evaluate import mc_parse, mme_parse, pope_parse
from vlmkit.train.models import LlavaSizes
from vlmkit.train.recipes import LlavaRecipe, LlavaRecipeConfig
from vlmkit.train.tokenizer import build_tokenizer
from vlmkit.train.trainer import train


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_chat_template_mimics_llava_15(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a star?"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "USER: <image>\nIs there a star? ASSISTANT:"
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(tokenizer("(B) heart. No.", add_special_tokens=False)["input_ids"]) == "(B) heart. No."


def test_every_template_word_is_in_the_vocabulary(tokenizer):
    rng = np.random.default_rng(0)
    texts = []
    for seed in range(EVAL_SEEDS.start, EVAL_SEEDS.start + 30):
        scene = sample_scene(seed)
        texts.append(caption(scene, rng=rng))
        texts += [qa.question + " " + qa.answer for make in QA_KINDS.values()
                  if (qa := make(scene, rng)) is not None]
        item = clip_question(sample_clip(seed), rng)
        # MVBench's system text and its "Options:" are not (the vocabulary predates the MVBench
        # prompt, and new words would shift the ids of shapes-llava): they read as <unk>
        prompt = mc_prompt(item["question"], item["candidates"]).split("Question:")[1].replace("Options:", "")
        texts.append(prompt + mc_answer(item["candidates"], item["answer"]))
    objects = [["umbrella", "arrow", "star"], ["ring", "moon", "key"]]
    texts += [r["text"] for r in pope_questions(objects, ["x", "y"], "random", 0)]
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_encoder_matches_the_chat_template_and_masks_prompts(tokenizer):
    image = tokenizer.convert_tokens_to_ids("<image>")
    encoder = ConversationEncoder(tokenizer, [image] * 3)
    scene = sample_scene(EVAL_SEEDS.start + 1)
    qas = [QA_KINDS["existence"](scene, np.random.default_rng(i)) for i in range(3)]
    ids, labels = encoder.encode(qas, focus="none")
    messages = []
    for k, qa in enumerate(qas):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": qa.question}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False).replace("<image>", "<image>" * 3)
    assert ids == tokenizer(text)["input_ids"]
    targets = [t for t, l in zip(ids, labels) if l != IGNORE]
    expected = [t for qa in qas for t in tokenizer(qa.answer, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]]
    assert targets == expected
    _, span = encoder.encode(qas, focus="span")
    _, word = encoder.encode(qas, focus="word")
    gist = {tokenizer.convert_tokens_to_ids(qa.focus_answer) for qa in qas}
    extra_word = [l for l, base in zip(word, labels) if l != base]
    extra_span = [l for l, base in zip(span, labels) if l != base]
    assert len(extra_word) == 3 and set(extra_word) <= gist and len(extra_span) > len(extra_word)
    with pytest.raises(ConfigError, match="focus"):
        Mixture(focus="all")


def test_stream_is_indexable_and_seeded(tokenizer):
    encoder = ConversationEncoder(tokenizer, [tokenizer.convert_tokens_to_ids("<image>")] * 4)
    from vlmkit.data.shapes import WorldConfig

    stream = ShapesStream(10, 5, WorldConfig(), encoder, curriculum=(0.3, 4))
    a, b = stream[3], stream[3]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image"], b["image"])
    assert stream.difficulty(0) == pytest.approx(0.3) and stream.difficulty(4) == 1.0
    with pytest.raises(ConfigError, match="must never overlap"):
        ShapesStream(EVAL_SEEDS.start, 5, WorldConfig(), encoder)


def test_parsers_follow_the_reference_rules():
    assert pope_parse("No, there is not.") == "no" and pope_parse("Yes.") == "yes"
    assert pope_parse("NO") == "yes"  # case-sensitive, as LLaVA's eval_pope.py
    assert mme_parse("Yes.") == "yes" and mme_parse("The answer is yes") == "other"
    options = ["a", "b", "ring", "d"]
    assert mc_parse("C) ring", options) == mc_parse("C ) ring", options) == mc_parse("c", options) == "ring"
    assert mc_parse("ring", options) == "ring"  # no letter: the option's text
    assert mc_parse("moon", options) is None


TINY = LlavaSizes(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                  text_width=32, text_layers=1, text_heads=2, text_mlp=64)


def _tiny_recipe() -> LlavaRecipe:
    return LlavaRecipe(LlavaRecipeConfig(
        sizes=TINY, vision_steps=2, vision_batch=4, chat_steps=3, chat_batch=2, polish_steps=2,
        position_steps=1, locate_steps=1, recall_steps=1, eval_every=0))


def test_training_resumes_exactly(tmp_path):
    straight = train(_tiny_recipe(), tmp_path / "a", checkpoint_every=100, progress=False)
    assert train(_tiny_recipe(), tmp_path / "b", checkpoint_every=100, progress=False, stop_after=3) is None
    assert (tmp_path / "b" / "checkpoints" / "step-3" / "optimizer.safetensors").is_file()
    assert train(_tiny_recipe(), tmp_path / "b", checkpoint_every=100, progress=False, stop_after=6) is None
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-5", "step-6"]
    resumed = train(_tiny_recipe(), tmp_path / "b", checkpoint_every=100, progress=False)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    prefetched = train(_tiny_recipe(), tmp_path / "c", checkpoint_every=100, progress=False, workers=2)
    c = load_file(prefetched / "model.safetensors")
    for key in a:  # batches built in worker processes are the same batches
        assert torch.equal(a[key], c[key]), key
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if "loss" in r} == {"vision", "chat", "polish", "position", "locate", "recall"}
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(resumed)
    processor = AutoProcessor.from_pretrained(resumed)
    assert model.config.image_seq_length == TINY.num_patches
    assert processor.tokenizer.chat_template


def test_video_recipe_grows_from_shapes_llava_trains_exports_and_generates(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from vlmkit.train.evaluate import generate
    from vlmkit.train.video import VideoRecipe, VideoRecipeConfig
    from vlmkit.zoo.shipped import CHECKPOINTS

    recipe = VideoRecipe(VideoRecipeConfig(pointing_steps=2, steps=4, letter_steps=4, batch=2, eval_every=0))
    llava = LlavaForConditionalGeneration.from_pretrained(CHECKPOINTS / "shapes-llava", attn_implementation="eager")
    grown = recipe.model.state_dict()
    for name, value in llava.state_dict().items():  # shapes-llava's weights, unchanged
        assert torch.equal(grown[name], value), name
    ids = recipe.tokenizer(["USER: Is there a star in the image? ASSISTANT:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the two added layers start as identities: the same logits as shapes-llava
        assert torch.equal(recipe.model(input_ids=ids).logits, llava(input_ids=ids).logits)
    assert len(recipe.model.model.language_model.layers) == 6 and recipe.gist_layer == 3

    video = recipe.stages[1]
    batches = {"pointing": recipe.batch(recipe.stages[0], 0), "clip": recipe.batch(video, 0),
               "image": recipe.batch(video, 2), "text": recipe.batch(video, 3)}
    for kind, batch in batches.items():  # MVBench's reply "Best option:( B) blue"; the gist at "(" is "blue"
        for labels, gist, input_ids in zip(batch["labels"], batch["gist"], batch["input_ids"]):
            reply = recipe.tokenizer.convert_ids_to_tokens(labels[labels != IGNORE])[-8:-1]
            assert reply[:4] == ["Best", "option", ":", "("] and reply[4] in "ABCD" and reply[5] == ")", kind
            (where,) = (gist != IGNORE).nonzero()[:, 0].tolist()
            assert input_ids[where] == recipe.paren_id and gist[where] == input_ids[where + 3], kind
    assert "pixel_values" not in batches["pointing"] and "pixel_values_videos" not in batches["text"]
    clip = batches["clip"]
    assert clip["pixel_values_videos"].shape == (2, 8, 3, 96, 96)
    assert (clip["input_ids"] == recipe.model.config.video_token_index).sum(1).tolist() == [8 * 36 + 1] * 2
    assert clip["category"].shape == (2, 8, 12, 12) and clip["event"].shape == (2, 2, 8, 6, 6)
    assert batches["image"]["pixel_values"].shape == (2, 2, 3, 96, 96)  # AnyRes: base view + one crop
    vision = {k: v.clone() for k, v in recipe.model.model.vision_tower.state_dict().items()}
    final = train(recipe, tmp_path, progress=False)
    for name, value in recipe.model.model.vision_tower.state_dict().items():  # the ViT stays frozen
        assert torch.equal(vision[name], value), name
    assert json.loads((final / "training.json").read_text())["world"] == dataclasses.asdict(recipe.world)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    frames = np.zeros((8, 96, 96, 3), np.uint8)
    answers = generate(model, processor, [frames], ["Which object appears during the video?"], video=True)
    answers += generate(model, processor, [frames[0]], ["Is there a star in the image?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_readout_loss_is_scaled_by_the_whole_stream_not_by_the_head():
    """The pointer head's letter is read as the final norm would read it inside the whole residual
    stream: writing louder (the same direction) changes the loss, scaling the stream with it does not."""
    from vlmkit.train.video import VideoRecipe, VideoRecipeConfig

    recipe = VideoRecipe(VideoRecipeConfig(pointing_steps=0, steps=1, letter_steps=0, batch=2, eval_every=0))
    torch.manual_seed(0)
    width = recipe.model.config.text_config.hidden_size
    heads, residual = torch.randn(2, 5, width), torch.randn(2, 5, width)
    query, labels = torch.tensor([1, 3]), torch.tensor([[0, 0, 7, 0, 0], [0, 0, 0, 0, 9]])
    with torch.no_grad():  # the grown layer's output projection starts at zero: give it weights
        recipe.model.model.language_model.layers[-1].self_attn.o_proj.weight.normal_()
        loss = recipe._readout_loss(heads, residual, query, labels)
        assert not torch.allclose(recipe._readout_loss(4 * heads, residual, query, labels), loss)
        torch.testing.assert_close(recipe._readout_loss(4 * heads, 4 * residual, query, labels), loss, rtol=1e-4, atol=0)


def test_event_cells_mark_where_each_event_shows():
    from vlmkit.train.video import event_cells

    grid = np.full((8, 12, 12), -1)
    grid[:, 0:2, 0:2] = 3  # the subject (category 3) in the top-left pooled cell of every frame
    grid[:, 10:12, 10:12] = 5  # a static object, never marked
    marks = {}
    for event in ("appear", "disappear", "color", "move"):
        clip = type("Clip", (), {"event": event, "event_frame": 4})()
        marks[event] = event_cells(clip, grid, subject=3)
        assert marks[event].shape == (2, 8, 6, 6) and not marks[event][..., 5, 5].any()
    assert [tuple(np.argwhere(marks["appear"][0])[:, 0])] == [(4,)] and not marks["appear"][1].any()
    assert not marks["disappear"][0].any() and marks["disappear"][1, 4, 0, 0] and marks["disappear"][1].sum() == 1
    assert marks["color"][0, 4, 0, 0] and marks["color"][1, 0, 0, 0] and marks["color"].sum() == 2
    assert marks["move"][0, 7, 0, 0] and marks["move"][1, 0, 0, 0] and marks["move"].sum() == 2


def test_frame_and_event_attention_losses_vanish_on_the_intended_pattern():
    from vlmkit.train.video import event_attention_loss, frame_attention_loss

    frames, cells, start, length = 3, 4, 2, 16
    previous_frame = torch.full((1, length, length), 1e-9)
    for row in range(start + cells, start + frames * cells):
        previous_frame[0, row, row - cells] = 1.0
    assert frame_attention_loss(previous_frame, torch.tensor([start]), frames, cells).item() < 1e-6
    uniform = torch.full((1, length, length), 1 / length)
    assert frame_attention_loss(uniform, torch.tensor([start]), frames, cells).item() == pytest.approx(np.log(length), rel=1e-5)
    event = torch.zeros(1, 2, frames, 2, 2, dtype=torch.bool)
    event[0, 0, 2, 1, 0] = True  # head 0: frame 2, cell 2 -> position start + 2 * 4 + 2 = 12; head 1: nothing
    heads = torch.full((1, 2, length, length), 1e-9)
    heads[0, 0, 15, 12] = 1.0
    assert event_attention_loss(heads, torch.tensor([15]), torch.tensor([start]), event).item() < 1e-6
    heads[0, 0, 15, 12], heads[0, 0, 15, 11] = 0.25, 0.75
    assert event_attention_loss(heads, torch.tensor([15]), torch.tensor([start]), event).item() == pytest.approx(np.log(4))


def test_pointing_question_asks_for_a_prompt_word():
    from vlmkit.train.video import pointing_question

    for seed in range(20):
        item = pointing_question(np.random.default_rng(seed))
        assert item["question"] == f"Which option is {item['answer']}?" and item["answer"] in item["candidates"]
        assert len(set(item["candidates"])) == 4


def test_dense_side_loss_scores_tokens_that_name_their_side():
    from vlmkit.train.losses import dense_side_loss

    words = torch.eye(8)  # left, right, top, bottom are the unit vectors 0..3
    side_ids = torch.tensor([[0, 1], [2, 3]])
    horizontal = torch.tensor([[0, 1, 2, 0]])  # 0 left / top, 1 right / bottom, 2 middle
    vertical = torch.tensor([[2, 0, 1, 1]])
    tokens = torch.full((1, 4, 8), 0.0)
    for i, (h, v) in enumerate(zip(horizontal[0].tolist(), vertical[0].tolist())):
        tokens[0, i, :4] = -10.0  # below the middle's logit 0 ...
        if h < 2:
            tokens[0, i, h] = 10.0  # ... unless this token's side word is named
        if v < 2:
            tokens[0, i, 2 + v] = 10.0
    loss, accuracy = dense_side_loss(tokens, words, side_ids, horizontal, vertical)
    assert accuracy == 1.0 and loss.item() < 1e-3
    swapped, accuracy = dense_side_loss(tokens, words, side_ids, torch.tensor([[1, 0, 2, 1]]), vertical)
    assert accuracy == round(5 / 8, 4) and swapped.item() > 10  # left and right read the wrong way round


@pytest.mark.parametrize("argv, message", [
    (["--set", "chat_step=5"], "use KEY=VALUE with KEY one of"),
    (["--set", "mixture=x"], "only numbers, strings and comma-separated lists"),
    (["--threads", "0"], "--threads 0 must be >= 1"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
])
def test_train_command_rejects_bad_settings_by_name(tmp_path, capsys, argv, message):
    from vlmkit.cli import main

    code = main(["train", "shapes", "--model", "llava", "--out", str(tmp_path), *argv])
    assert code != 0 and message in capsys.readouterr().err


def test_video_recipe_continues_shapes_video_cycling_frame_counts():
    """Continuing `shapes-video` loads it as it is (no layers added) and its clip batches cycle through
    `frame_counts`, each with its own number of video tokens; the losses read the batch's frame count."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlmkit.train.cli import _overrides
    from vlmkit.train.video import VideoRecipe, VideoRecipeConfig
    from vlmkit.zoo.shipped import CHECKPOINTS

    config = _overrides(VideoRecipeConfig(pointing_steps=0, steps=0, letter_steps=8, batch=2, eval_every=0),
                        ["init=shapes-video", "frame_counts=8,16"])
    assert config.frame_counts == (8, 16)
    recipe = VideoRecipe(config)
    shipped = LlavaOnevisionForConditionalGeneration.from_pretrained(CHECKPOINTS / "shapes-video")
    assert all(torch.equal(recipe.model.state_dict()[k], v) for k, v in shipped.state_dict().items())
    assert recipe.gist_layer == 3 and [s.name for s in recipe.stages] == ["letters"]
    letters = recipe.stages[0]
    frames = {step: recipe.batch(letters, step)["pixel_values_videos"].shape[1] for step in (0, 1, 4, 5)}
    assert frames == {0: 8, 1: 16, 4: 8, 5: 16}  # steps 2 and 3 are an image and a text batch
    long = recipe.batch(letters, 1)
    assert (long["input_ids"] == recipe.model.config.video_token_index).sum(1).tolist() == [16 * 36 + 1] * 2
    assert long["category"].shape == (2, 16, 12, 12) and long["event"].shape == (2, 2, 16, 6, 6)
    loss, metrics = recipe.loss(letters, long)
    assert torch.isfinite(loss) and "attention_loss" in metrics


def test_train_set_parses_lists_and_names_bad_values():
    from vlmkit.errors import ConfigError
    from vlmkit.train.cli import _overrides
    from vlmkit.train.video import VideoRecipeConfig

    assert _overrides(VideoRecipeConfig(), ["frame_counts=8,16,32"]).frame_counts == (8, 16, 32)
    with pytest.raises(ConfigError, match="frame_counts=8,x.*not a tuple"):
        _overrides(VideoRecipeConfig(), ["frame_counts=8,x"])
    with pytest.raises(ConfigError, match="only numbers, strings and comma-separated lists"):
        _overrides(VideoRecipeConfig(), ["mixture=3"])
    assert _overrides(VideoRecipeConfig(), ["rotation=clip,image"]).rotation == ("clip", "image")
    with pytest.raises(ConfigError, match=r"rotation \('clip', 'photo'\).*\('clip', 'image', 'text'\).*'photo'"):
        _overrides(VideoRecipeConfig(), ["rotation=clip,photo"])
    with pytest.raises(ConfigError, match="at least one clip"):
        _overrides(VideoRecipeConfig(), ["rotation=image,text"])
