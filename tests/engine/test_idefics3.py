"""Idefics3's and SmolVLM's token layout, checked by hand on the tiny twins.

Idefics3: 64-pixel tiles of 16 x 16 4-pixel patches, pixel-shuffled 2 x 2 into 8 x 8 tokens.
SmolVLM: 48-pixel tiles of 24 x 24 2-pixel patches, pixel-shuffled 3 x 3 into 8 x 8 tokens.
An image is resized to a longest edge of two tiles, cut into tiles, then the global image follows.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import vlmkit
from tests.engine.models import inputs, model, prompt
from vlmkit import zoo
from vlmkit.adapters import adapter_for
from vlmkit.errors import UnsupportedModelError
from vlmkit.methods.prune.random import RandomPrune

SIDE = 8  # tokens per tile side in both twins
GEOMETRY = {"idefics3": (64, 16, 2), "smolvlm": (48, 24, 3)}  # tile pixels, patches per tile side, shuffle


class Recorder(RandomPrune):
    """Random pruning that keeps the visual tokens the engine showed it."""

    name = "recorder"

    def select(self, context):
        self.visual = context.visual
        return super().select(context)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_an_image_is_two_tiles_side_by_side_then_the_global_image_one_item_each(family):
    tiny, processor = model(family)
    pixels, _, _ = GEOMETRY[family]
    image = Image.new("RGB", (2 * pixels, pixels), "red")  # aspect 2: one row of two tiles, then the global image
    batch = processor(images=image, text=prompt(processor, "What is shown?"), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 3, pixels, pixels)
    ids = batch["input_ids"][0].tolist()
    tag = processor.tokenizer.convert_tokens_to_ids
    fake, image_id = tag("<fake_token_around_image>"), tiny.config.image_token_id
    # <fake><row_1_col_1> 64 x <image> <fake><row_1_col_2> 64 x <image> \n \n <fake><global-img> 64 x <image> <fake>
    starts = [ids.index(tag(name)) + 1 for name in ("<row_1_col_1>", "<row_1_col_2>", "<global-img>")]
    for start in starts:
        assert ids[start - 2] == fake and ids[start : start + 64] == [image_id] * 64
    assert starts[1] == starts[0] + 64 + 2 and starts[2] == starts[1] + 64 + 4
    assert ids[starts[2] + 64] == fake

    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (visual,) = recorder.visual
    assert visual.slots.tolist() == [start + i for start in starts for i in range(64)]
    # each tile is one item of its own (the tags between the runs are text): two tiles, then the global image
    assert visual.grids == [(1, SIDE, SIDE)] * 3
    assert visual.spans == [(start, 64) for start in starts]
    assert visual.modality == ["image"] * 3
    # placeholder i: item i // 64, token (row, col) = divmod(i % 64, 8), crop 0
    coords = torch.stack([visual.image, visual.frame, visual.row, visual.col, visual.crop], dim=1).tolist()
    assert coords[:2] + coords[7:9] + coords[63:65] == [
        [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 7, 0], [0, 0, 1, 0, 0], [0, 0, 7, 7, 0], [1, 0, 0, 0, 0],
    ]
    assert coords[128 + 8 * 3 + 5] == [2, 0, 3, 5, 0]

    # the three runs joined as one image: tiles are crops 1 and 2, the global image crop 0
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch)
        metas = [meta for _, meta in patch.state.encoded["image"][1]]
    joined = adapter_for(tiny).join_runs(metas)
    assert joined.grid == (1, SIDE, SIDE) and joined.num_tokens == 3 * 64
    assert joined.coords[:, 3].tolist() == [1] * 64 + [2] * 64 + [0] * 64
    assert joined.coords[64 + 8 * 2 + 7].tolist() == [0, 2, 7, 2]
    assert torch.equal(joined.probe["importance"], torch.cat([meta.probe["importance"] for meta in metas]))


def tower_probe(tiles: int, patches: int) -> list[dict[str, torch.Tensor]]:
    """A raw probe of `tiles` tower rows (no [CLS]): patch p = patches R + C of tile t has importance
    1000 t + p, logit p and key (R, C)."""
    index = torch.arange(patches * patches, dtype=torch.float32)
    importance = torch.stack([1000 * tile + index for tile in range(tiles)])
    keys = torch.stack([index // patches, index % patches], dim=1)
    return [{"importance": importance, "received_logits": index.expand(tiles, -1), "keys": keys.expand(tiles, -1, -1)}]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_probes_join_the_s_by_s_patches_of_each_token(family):
    tiny, _ = model(family)
    _, patches, s = GEOMETRY[family]
    output = SimpleNamespace(pooler_output=[torch.zeros(2 * SIDE * SIDE, 1), torch.zeros(SIDE * SIDE, 1)])
    metas = adapter_for(tiny).visual_metas("image", {}, output, tower_probe(3, patches))
    assert [feature.shape for feature in output.pooler_output] == [(SIDE * SIDE, 1)] * 3  # re-cut per tile
    assert [meta.grid for meta in metas] == [(1, SIDE, SIDE)] * 3
    # token (r, c) holds patches (s r + i, s c + j), i, j < s: p = patches (s r + i) + s c + j
    # importance adds up: s^2 (1000 t + patches s r + s c) + sum_ij (patches i + j); logits and keys average
    corner = s * patches * s * (s - 1) // 2 + s * s * (s - 1) // 2  # sum_ij (patches i + j): 34 for s = 2, 225 for s = 3
    importance = [meta.probe["importance"] for meta in metas]
    assert importance[0][:2].tolist() == [corner, s * s * s + corner]
    assert importance[0][SIDE].item() == s * s * patches * s + corner
    assert importance[1][0].item() == s * s * 1000 + corner
    assert importance[2][-1].item() == s * s * (2000 + patches * s * 7 + s * 7) + corner
    assert metas[0].probe["received_logits"][SIDE + 1].item() == patches * s + s + corner / (s * s)
    assert metas[1].probe["keys"][SIDE * 3 + 5].tolist() == [3 * s + (s - 1) / 2, 5 * s + (s - 1) / 2]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_features_are_the_tower_patches_side_by_side_and_project_to_the_image_features(family):
    tiny, processor = model(family)
    pixels, patches, s = GEOMETRY[family]
    batch = inputs(processor, [Image.new("RGB", (2 * pixels, pixels), "teal")], ["What is shown?"])
    adapter = adapter_for(tiny)
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch)
        encoded = patch.state.encoded["image"][1]
        hidden = tiny.model.vision_model(batch["pixel_values"][0]).last_hidden_state  # after the post-layernorm
    assert len(encoded) == 3
    grid = hidden.view(3, patches, patches, -1)
    row, col = 5, 2
    for tile, (image_features, meta) in enumerate(encoded):
        expected = torch.cat([grid[tile, s * row + i, s * col + j] for i in range(s) for j in range(s)])
        torch.testing.assert_close(meta.probe["features"][row * SIDE + col], expected)
        torch.testing.assert_close(adapter.project(meta.probe["features"]), image_features)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_importance_is_the_mean_attention_a_patch_receives_summed_over_its_block(family):
    tiny, processor = zoo.tiny(family, attn_implementation="eager")
    pixels, patches, s = GEOMETRY[family]
    batch = inputs(processor, [Image.new("RGB", (pixels, 2 * pixels), "navy")], ["What is shown?"])
    layer = adapter_for(tiny).default_vision_layer()
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch)
        metas = [meta for _, meta in patch.state.encoded["image"][1]]
        tower = tiny.model.vision_model(batch["pixel_values"][0], output_attentions=True)
    received = tower.attentions[layer].mean(dim=(1, 2))  # (tiles, patches): over heads and queries
    blocks = received.view(len(metas), SIDE, s, SIDE, s).sum(dim=(2, 4)).flatten(1)
    for tile, meta in enumerate(metas):
        torch.testing.assert_close(meta.probe["importance"], blocks[tile])


def test_padding_tiles_are_dropped_and_each_sample_keeps_its_own_tiles():
    tiny, processor = model("idefics3")
    wide, square = Image.new("RGB", (128, 64), "red"), Image.new("RGB", (64, 64), "blue")
    batch = inputs(processor, [wide, square], ["What is shown?", "And this?"])
    assert batch["pixel_values"].shape[:2] == (2, 5)  # 3 tiles (+ 2 all-zero padding tiles), then 5
    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder) as patch, torch.no_grad():
        tiny(**batch)
        encoded = patch.state.encoded["image"][1]
    with torch.no_grad():  # the model's own call: one tensor per sample
        expected = tiny.model.get_image_features(batch["pixel_values"]).pooler_output
    assert [len(visual.grids) for visual in recorder.visual] == [3, 5]
    assert [visual.slots.numel() for visual in recorder.visual] == [3 * 64, 5 * 64]
    features = [feature for feature, _ in encoded]
    torch.testing.assert_close(torch.cat(features[:3]), expected[0])
    torch.testing.assert_close(torch.cat(features[3:]), expected[1])


def test_two_images_of_one_prompt_give_their_tiles_in_order():
    tiny, processor = model("smolvlm")
    images = [Image.new("RGB", (96, 48), "red"), Image.new("RGB", (48, 96), "blue")]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True)
    batch = processor(images=images, text=text, return_tensors="pt")
    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (visual,) = recorder.visual
    ids = batch["input_ids"][0].tolist()
    tags = [ids[start - 1] for start, _ in visual.spans]
    names = ["<row_1_col_1>", "<row_1_col_2>", "<global-img>", "<row_1_col_1>", "<row_2_col_1>", "<global-img>"]
    assert tags == processor.tokenizer.convert_tokens_to_ids(names)
    assert visual.grids == [(1, SIDE, SIDE)] * 6


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize(("method", "reason"), [
    ("globalcom2", r"Idefics3's tiles reach the LLM as separate images"),
    ("tome", r"pixel shuffle joins s x s patches after the SigLIP blocks"),
    ("hope", r"this family has 1-D rotary positions"),
])
def test_methods_that_cannot_run_are_refused_with_the_reason(family, method, reason):
    tiny, _ = model(family)
    with pytest.raises(UnsupportedModelError, match=f"{method} does not support {family}: .*{reason}"):
        vlmkit.apply(tiny, method)
