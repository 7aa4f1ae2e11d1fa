"""FastVLM's token layout, checked by hand on the tiny twin.

The tiny FastViTHD tower shrinks a 512-pixel image 64x (a 4x stem, then four 2x stages) to an 8 x 8
grid; its last stage holds two self-attention blocks over that grid, and the final conv keeps its size.
The model flattens the grid row-major: placeholder i of an image is cell (i // 8, i % 8).
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmkit
from tests.engine.models import inputs, model, prompt
from vlmkit.adapters import adapter_for
from vlmkit.errors import UnsupportedModelError
from vlmkit.methods.prune.random import RandomPrune

SIDE = 8  # grid cells per side of a 512-pixel image


class Recorder(RandomPrune):
    """Random pruning that keeps the visual tokens the engine showed it."""

    name = "recorder"

    def select(self, context):
        self.visual = context.visual
        return super().select(context)


def tower_grid(tiny, pixel_values) -> torch.Tensor:
    """(images, C, 8, 8): the final conv's feature grid, as the model's tower returns it."""
    with torch.no_grad():
        return tiny.model.vision_tower(pixel_values).last_hidden_state


def test_an_image_is_one_8_by_8_grid_in_row_major_order():
    tiny, processor = model("fast_vlm")
    batch = processor(images=Image.new("RGB", (80, 40), "red"), text=prompt(processor, "What is shown?"), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 512, 512)  # shortest edge to 512, centre crop 512 x 512
    ids = batch["input_ids"][0].tolist()
    image_id = tiny.config.image_token_id
    # <|im_start|>system ... <|im_end|>\n<|im_start|>user\n 64 x <image> \nWhat is shown?<|im_end|>\n...
    start = ids.index(image_id)
    assert ids.count(image_id) == 64 and ids[start : start + 64] == [image_id] * 64
    assert processor.tokenizer.decode(ids[start - 2 : start]) == "user\n"

    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (visual,) = recorder.visual
    assert visual.slots.tolist() == list(range(start, start + 64))
    assert visual.grids == [(1, SIDE, SIDE)] and visual.spans == [(start, 64)] and visual.modality == ["image"]
    coords = torch.stack([visual.image, visual.frame, visual.row, visual.col, visual.crop], dim=1).tolist()
    assert coords[0] == [0, 0, 0, 0, 0] and coords[1] == [0, 0, 0, 1, 0] and coords[7] == [0, 0, 0, 7, 0]
    assert coords[8] == [0, 0, 1, 0, 0] and coords[29] == [0, 0, 3, 5, 0] and coords[63] == [0, 0, 7, 7, 0]

    # placeholder 29 holds cell (3, 5) of the tower's grid, projected alone
    grid = tower_grid(tiny, batch["pixel_values"])
    assert grid.shape[-2:] == (SIDE, SIDE)
    with torch.no_grad():
        features = tiny.model.get_image_features(batch["pixel_values"]).pooler_output[0]
        cell = tiny.model.multi_modal_projector(grid[0, :, 3, 5])
    torch.testing.assert_close(features[29], cell)


def test_each_image_of_a_padded_batch_is_its_own_grid():
    tiny, processor = model("fast_vlm")
    batch = inputs(processor, [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (30, 90), "blue")],
                   ["What is shown?", "Is there a cat in the image?"])
    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    ids = batch["input_ids"]
    for row, visual in enumerate(recorder.visual):
        start = ids[row].tolist().index(tiny.config.image_token_id)
        assert visual.grids == [(1, SIDE, SIDE)] and visual.spans == [(start, 64)]
        assert visual.row.tolist() == [i // SIDE for i in range(64)] and visual.col.tolist() == [i % SIDE for i in range(64)]


def test_probed_layers_are_the_attention_blocks_of_the_last_stage():
    tiny, _ = model("fast_vlm")
    adapter = adapter_for(tiny)
    last_stage = tiny.model.vision_tower.timm_model.stages[-1]
    assert list(adapter.vision_layers) == list(last_stage.blocks) and len(adapter.vision_layers) == 2
    assert adapter.default_vision_layer() == 1
    assert adapter.vision_attention(-1) is last_stage.blocks[1].token_mixer


def test_importance_is_the_mean_attention_a_cell_receives_and_features_are_the_grid():
    tiny, processor = model("fast_vlm")
    batch = inputs(processor, [Image.new("RGB", (512, 512), "navy"), Image.new("RGB", (300, 200), "teal")],
                   ["What is shown?", "Colour?"])
    adapter = adapter_for(tiny)
    attention = adapter.vision_attention(-1)
    seen = []
    handle = attention.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
            tiny(**batch)
            metas = [meta for _, meta in patch.state.encoded["image"][1]]
    finally:
        handle.remove()
    # the attention's input grid (B, C, 8, 8), attended over its 64 cells in row-major order
    normed = seen[0]
    images, width = normed.shape[:2]
    tokens = normed.flatten(2).transpose(1, 2)
    q, k, _ = (tokens @ attention.qkv.weight.T).view(images, 64, 3, -1, attention.head_dim).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) * attention.head_dim ** -0.5).softmax(dim=-1)  # (B, heads, query, key)
    received = weights.mean(dim=(1, 2))
    grid = tower_grid(tiny, batch["pixel_values"])
    for image, meta in enumerate(metas):
        torch.testing.assert_close(meta.probe["importance"], received[image])
        # features: the projector's input, cell (r, c) at r * 8 + c
        torch.testing.assert_close(meta.probe["features"][3 * SIDE + 5], grid[image, :, 3, 5])
        torch.testing.assert_close(meta.probe["features"], grid[image].flatten(1).T)
    assert width == attention.qkv.in_features


@pytest.mark.parametrize(("method", "reason"), [
    ("tome", r"FastViTHD tower is convolutional stages .* not a stack of ViT blocks"),
    ("dymu:threshold=0.8", r"FastViTHD tower is convolutional stages .* not a stack of ViT blocks"),
    ("globalcom2", r"AnyRes tiles .* FastVLM encodes one view per image"),
    ("hope", r"this family has 1-D rotary positions"),
    ("dycoke", r"the family has no video input"),
])
def test_methods_that_cannot_run_are_refused_with_the_reason(method, reason):
    tiny, _ = model("fast_vlm")
    name = method.split(":")[0]
    with pytest.raises(UnsupportedModelError, match=f"{name} does not support fast_vlm: .*{reason}"):
        vlmkit.apply(tiny, method)
