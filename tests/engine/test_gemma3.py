"""Gemma 3 in the engine, checked by hand on the tiny twin.

The twin: 64-pixel images of 16 x 16 patches pooled 2 x 2 into 8 x 8 tokens; decoder layers 0, 1 and 3
slide a 16-token window, layer 2 is global; an image's placeholders attend to each other both ways.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model, prompt
from vlmkit.engine.cache import CompactSlidingLayer
from vlmkit.errors import UnsupportedModelError
from vlmkit.methods.prune.fastv import FastV
from vlmkit.methods.prune.random import RandomPrune

WINDOW = 16
SLIDING = (0, 1, 3)


class Recorder(RandomPrune):
    """Random pruning that keeps what the engine showed it."""

    name = "recorder"

    def select(self, context):
        self.visual = context.visual
        return super().select(context)


def test_a_pan_and_scan_image_is_the_whole_image_then_each_crop_one_item_each():
    tiny, processor = model("gemma3")
    image = Image.new("RGB", (128, 48), "red")  # aspect 2.7: 3 crops of 43 x 48 pixels
    batch = processor(images=image, text=prompt(processor, "What is shown?"), return_tensors="pt", do_pan_and_scan=True)
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    ids = batch["input_ids"][0].tolist()
    tag = processor.tokenizer.convert_tokens_to_ids
    boi, eoi, soft = tag("<start_of_image>"), tag("<end_of_image>"), tiny.config.image_token_id
    starts = [index + 1 for index, token in enumerate(ids) if token == boi]
    assert len(starts) == 4
    for start in starts:  # \n\n <start_of_image> 64 x <image_soft_token> <end_of_image> \n\n
        assert ids[start : start + 64] == [soft] * 64 and ids[start + 64] == eoi
    assert batch["token_type_ids"][0].nonzero().flatten().tolist() == [start + i for start in starts for i in range(64)]

    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (visual,) = recorder.visual
    assert visual.slots.tolist() == [start + i for start in starts for i in range(64)]
    # the whole image, then crops 1..3: one item each (text between the runs), an 8 x 8 grid each, row-major
    assert visual.grids == [(1, 8, 8)] * 4 and visual.modality == ["image"] * 4
    assert visual.spans == [(start, 64) for start in starts]
    coords = torch.stack([visual.image, visual.frame, visual.row, visual.col, visual.crop], dim=1).tolist()
    assert coords[0] == [0, 0, 0, 0, 0] and coords[9] == [0, 0, 1, 1, 0] and coords[63] == [0, 0, 7, 7, 0]
    assert coords[64 * 3 + 8 * 5 + 2] == [3, 0, 5, 2, 0]


def test_probes_and_features_follow_the_projectors_pooling():
    tiny, processor = model("gemma3")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch, output_hidden_states=False)
        (meta,) = [meta for _, meta in patch.state.encoded["image"][1]]
    tower = tiny.model.vision_tower
    with torch.no_grad():
        hidden = tower(batch["pixel_values"]).last_hidden_state  # (1, 256, 32)
        grid = hidden[0].view(8, 2, 8, 2, -1).mean(dim=(1, 3)).reshape(64, -1)  # token (r, c): patches (2r + i, 2c + j)
        torch.testing.assert_close(meta.probe["features"], grid, rtol=1e-5, atol=1e-6)
        projected = tiny.model.multi_modal_projector(hidden)[0]
        from vlmkit.adapters import adapter_for

        torch.testing.assert_close(adapter_for(tiny).project(meta.probe["features"]), projected, rtol=1e-5, atol=1e-6)
    assert meta.probe["importance"].shape == (64,)
    torch.testing.assert_close(meta.probe["importance"].sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)  # masses add up


def expected_mask(positions: list[int], blocks: dict[int, int], window: int | None) -> torch.Tensor:
    """(Q, K) bool: query at original position p sees key at q' when q' <= p or both are in one image block,
    and (sliding layers) p - q' < window."""
    size = len(positions)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i, p in enumerate(positions):
        for j, k in enumerate(positions):
            same_block = p in blocks and blocks.get(k) == blocks[p]
            seen = k <= p or same_block
            mask[i, j] = seen and (window is None or p - k < window)
    return mask


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_masks_are_sliding_window_and_causal_with_each_images_block_both_ways(keep):
    tiny, processor = model("gemma3", "eager")
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                 {"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(images=[images], text=[text], return_tensors="pt")
    types = batch["token_type_ids"][0].tolist()
    image_positions = [i for i, t in enumerate(types) if t == 1]
    blocks = {p: 0 if p < image_positions[64] else 1 for p in image_positions}
    seen = {}

    def capture(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs["attention_mask"][0, 0] == 0  # eager: 0 where visible, the dtype's min elsewhere
        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(tiny.model.language_model.layers)]
    recorder = Recorder(keep=keep, seed=1)
    try:
        with vlmkit.apply(tiny, recorder) as patch, torch.no_grad():
            tiny(**batch)
            kept = patch.selections["recorder"][0]
    finally:
        for handle in handles:
            handle.remove()
    kept_positions = {image_positions[i] for i in kept.tolist()}
    positions = [p for p in range(len(types)) if types[p] == 0 or p in kept_positions]
    assert len(positions) == len(types) - 128 + kept.numel()
    for index, mask in seen.items():
        window = WINDOW if index in SLIDING else None
        assert torch.equal(mask, expected_mask(positions, blocks, window)), index
    # the stock model's masks (no pruning) are the same
    if keep == 1.0:
        stock = {}
        handles = [layer.register_forward_pre_hook(
            lambda m, a, k, i=i: stock.__setitem__(i, k["attention_mask"][0, 0] == 0), with_kwargs=True)
            for i, layer in enumerate(tiny.model.language_model.layers)]
        try:
            with torch.no_grad():
                tiny(**batch)
        finally:
            for handle in handles:
                handle.remove()
        assert all(torch.equal(stock[i], seen[i]) for i in range(4))


def test_the_sliding_layers_cache_keeps_the_last_window_positions_after_pruning():
    tiny, processor = model("gemma3")
    batch = inputs(processor, photos()[:2], ["What is shown?", "Describe the image in detail please."])
    length = batch["input_ids"].shape[1]
    with vlmkit.apply(tiny, "random:keep=0.5,seed=2") as patch, torch.no_grad():
        cache = tiny(**batch, use_cache=True).past_key_values
        kept = patch.selections["random"]
    valid = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    for row in range(2):
        image = (ids[row] == tiny.config.image_token_id).nonzero().flatten()
        remaining = valid[row].clone()
        remaining[image] = False
        remaining[image[kept[row]]] = True
        everything = remaining.nonzero().flatten().tolist()
        recent = [p for p in everything if p > length - WINDOW]
        for index, layer in enumerate(cache.layers):
            slots = layer.layout.slot[row][layer.layout.valid[row]].tolist()
            assert isinstance(layer, CompactSlidingLayer) == (index in SLIDING)
            assert slots == (recent if index in SLIDING else everything), (row, index)
            assert layer.keys.shape[2] == layer.layout.valid.shape[1]


def test_engine_run_equals_the_stock_model_past_the_window():
    tiny, processor = model("gemma3")
    images = [[Image.new("RGB", (128, 48), "green")], [photos()[1].resize((128, 48))]]
    text = prompt(processor, "What is shown?")
    batch = processor(images=images, text=[text, text], return_tensors="pt", do_pan_and_scan=True)
    assert batch["input_ids"].shape[1] > 4 * 64  # the prompt crosses the window many times over
    with torch.no_grad():
        logits = tiny(**batch).logits
    plain = generate(tiny, batch, max_new_tokens=24)  # decoding crosses the window too
    beams = generate(tiny, batch, max_new_tokens=8, num_beams=2)
    with vlmkit.apply(tiny, "random:keep=1.0"), torch.no_grad():
        assert torch.equal(tiny(**batch).logits, logits)
        assert torch.equal(generate(tiny, batch, max_new_tokens=24), plain)
        assert torch.equal(generate(tiny, batch, max_new_tokens=8, num_beams=2), beams)


def test_a_padded_batch_past_the_window_equals_its_samples_run_alone():
    tiny, processor = model("gemma3")
    texts = [prompt(processor, q) for q in ("What is shown?", "Describe the image.")]
    images = [[Image.new("RGB", (128, 48), "green")], [photos()[0]]]  # 4 images' tokens, then 1 image's: 71 pads
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True, do_pan_and_scan=True)
    assert int((batch["attention_mask"] == 0).sum()) > WINDOW
    with vlmkit.apply(tiny, "random:keep=1.0"), torch.no_grad():
        logits = tiny(**batch).logits
        tokens = generate(tiny, batch, max_new_tokens=24)
        for row in range(2):
            one = processor(images=images[row : row + 1], text=texts[row : row + 1], return_tensors="pt", do_pan_and_scan=True)
            valid = batch["attention_mask"][row].bool()
            torch.testing.assert_close(tiny(**one).logits[0], logits[row][valid], rtol=1e-4, atol=1e-4)
            assert torch.equal(generate(tiny, one, max_new_tokens=24)[0], tokens[row])


class FastVRecorder(FastV):
    name = "fastv_recorder"

    def select(self, context):
        self.attention = context.last_row_attention
        return super().select(context)


def test_fastv_scores_in_a_sliding_layer_count_only_the_keys_in_the_window():
    tiny, processor = model("gemma3")
    batch = inputs(processor, photos()[:1], ["What?"])  # the image's last tokens are in the last token's window
    recorder = FastVRecorder(layer=2, keep=0.5)  # reads layer 1, a sliding-window layer
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (scores,) = recorder.attention
    with torch.no_grad():
        hidden = tiny(**batch, output_hidden_states=True).hidden_states[1]  # layer 1's input
        layer = tiny.model.language_model.layers[1]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        length = hidden.shape[1]
        split = lambda x: x.view(1, length, -1, 16).transpose(1, 2)  # noqa: E731
        query, key = attention.q_norm(split(attention.q_proj(normed))), attention.k_norm(split(attention.k_proj(normed)))
        positions = torch.arange(length)[None]
        cos, sin = tiny.model.language_model.rotary_emb(hidden, positions, "sliding_attention")
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key = key.repeat_interleave(2, dim=1)
        logits = (query[0, :, -1:] @ key[0].transpose(-1, -2))[:, 0] * attention.scaling  # (heads, length)
        logits[:, : length - WINDOW] = float("-inf")  # the last token's window: the last 16 positions
        weights = logits.softmax(dim=-1).mean(dim=0)
    image = (batch["input_ids"][0] == tiny.config.image_token_id).nonzero().flatten()
    torch.testing.assert_close(scores, weights[image], rtol=1e-5, atol=1e-6)
    outside = image < length - WINDOW
    assert outside.any() and (~outside).any()
    assert bool((scores[outside] == 0).all()) and bool((scores[~outside] > 0).all())


@pytest.mark.parametrize("method,reason", [
    ("tome", "average-pools k x k patches"), ("dymu:threshold=0.9", "average-pools k x k patches"),
    ("hope", "1-D rotary positions"), ("globalcom2", "pan-and-scan crops"), ("lookm", "sliding-window layers"),
])
def test_methods_that_cannot_apply_say_why(method, reason):
    tiny, _ = model("gemma3")
    name = method.split(":")[0]
    with pytest.raises(UnsupportedModelError, match=rf"{name} does not support gemma3: .*{reason}"):
        vlmkit.apply(tiny, method)
