"""InternVL's token layout, checked by hand on the tiny twin (64-pixel tiles, 4-pixel patches: 16 x 16
patches per tile, pixel-shuffled 2 x 2 into 8 x 8 tokens; up to 6 tiles plus a thumbnail)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from PIL import Image

import vlmkit
from tests.engine.models import inputs, model, prompt
from vlmkit import zoo
from vlmkit.adapters import adapter_for
from vlmkit.adapters.base import cls_row_probe
from vlmkit.methods.prune.random import RandomPrune

FAMILY = "internvl"
PATCHES = 16  # patches per tile side
SIDE = 8  # tokens per tile side


class Recorder(RandomPrune):
    """Random pruning that keeps the visual tokens the engine showed it."""

    name = "recorder"

    def select(self, context):
        self.visual = context.visual
        return super().select(context)


def tower_probe(tiles: int) -> list[dict[str, torch.Tensor]]:
    """A raw probe of `tiles` tower rows ([CLS] first): patch p = 16 R + C of tile t has importance
    1000 t + p, logit p and key (R, C); [CLS] has -1 and (-1, -1)."""
    patches = torch.arange(PATCHES * PATCHES, dtype=torch.float32)
    cls = torch.tensor([-1.0])
    importance = torch.stack([torch.cat([cls, 1000 * tile + patches]) for tile in range(tiles)])
    logits = torch.cat([cls, patches]).expand(tiles, -1)
    keys = torch.cat([torch.tensor([[-1.0, -1.0]]), torch.stack([patches // PATCHES, patches % PATCHES], dim=1)])
    return [{"importance": importance, "cls_logits": logits, "keys": keys.expand(tiles, -1, -1)}]


def test_an_image_is_its_tiles_then_the_thumbnail_joined_as_crops():
    tiny, processor = model(FAMILY)
    image = Image.new("RGB", (128, 64), "red")  # aspect 2: a 2 x 1 tile grid, then the thumbnail
    batch = processor(images=image, text=prompt(processor, "What is shown?"), return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    ids = batch["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    start = ids.index(tokenizer.convert_tokens_to_ids("<img>")) + 1
    assert ids[start : start + 3 * 64] == [tiny.config.image_token_id] * (3 * 64)
    assert ids[start + 3 * 64] == tokenizer.convert_tokens_to_ids("</img>")

    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (visual,) = recorder.visual
    assert visual.slots.tolist() == list(range(start, start + 3 * 64))
    # one image: the three adjacent runs joined; the grid is the thumbnail's (the base view)
    assert visual.grids == [(1, SIDE, SIDE)]
    assert visual.spans == [(start, 3 * 64)]
    assert visual.modality == ["image"]
    # placeholder i: tile i // 64, token (row, col) = divmod(i % 64, 8); tiles are crops 1 and 2, the
    # thumbnail (the third run) crop 0
    coords = torch.stack([visual.image, visual.frame, visual.row, visual.col, visual.crop], dim=1).tolist()
    assert coords[:2] + coords[7:9] + coords[63:65] == [
        [0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 7, 1], [0, 0, 1, 0, 1], [0, 0, 7, 7, 1], [0, 0, 0, 0, 2],
    ]
    assert coords[128 + 8 * 3 + 5] == [0, 0, 3, 5, 0]


def test_two_images_stay_apart_and_probes_follow_the_joined_tiles():
    tiny, processor = model(FAMILY)
    images = [Image.new("RGB", (128, 64), "red"), Image.new("RGB", (64, 128), "blue")]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True)
    batch = processor(images=images, text=text, return_tensors="pt")
    recorder = Recorder(keep=0.5)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (visual,) = recorder.visual
    assert visual.grids == [(1, SIDE, SIDE)] * 2 and len(visual.spans) == 2
    assert [int((visual.image == image).sum()) for image in (0, 1)] == [3 * 64, 3 * 64]
    assert sorted(set(visual.crop[visual.image == 1].tolist())) == [0, 1, 2]


def test_probes_join_the_two_by_two_patches_of_each_token():
    tiny, _ = model(FAMILY)
    output = SimpleNamespace(pooler_output=torch.zeros(3, SIDE * SIDE, 1))
    metas = adapter_for(tiny).visual_metas("image", {}, output, tower_probe(3))
    assert [meta.grid for meta in metas] == [(1, SIDE, SIDE)] * 3
    assert metas[2].coords[SIDE * 3 + 5].tolist() == [0, 3, 5, 0]
    # token (r, c) holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1): p = 16 (2r + i) + 2c + j
    # importance adds up: 4 (1000 t + 32 r + 2 c) + (0 + 1 + 16 + 17); logits and keys average
    importance = [meta.probe["importance"] for meta in metas]
    assert importance[0][:2].tolist() == [34, 42]
    assert importance[0][SIDE].item() == 128 + 34
    assert importance[1][0].item() == 4000 + 34
    assert importance[2][-1].item() == 8000 + 4 * (32 * 7 + 2 * 7) + 34
    assert metas[0].probe["cls_logits"][SIDE + 1].item() == 32 + 2 + 8.5
    assert metas[1].probe["keys"][SIDE * 3 + 5].tolist() == [6.5, 10.5]


def test_features_are_the_tower_patches_side_by_side_and_project_to_the_image_features():
    tiny, processor = model(FAMILY)
    batch = inputs(processor, [Image.new("RGB", (128, 64), "teal")], ["What is shown?"])
    adapter = adapter_for(tiny)
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch)
        encoded = patch.state.encoded["image"][1]
        hidden = tiny.model.vision_tower(batch["pixel_values"]).last_hidden_state[:, 1:]  # [CLS] dropped
    assert len(encoded) == 3
    grid = hidden.view(3, PATCHES, PATCHES, -1)
    for tile, (image_features, meta) in enumerate(encoded):
        row, col = 5, 2  # token (5, 2): patches (10, 4), (10, 5), (11, 4), (11, 5)
        expected = torch.cat([grid[tile, 10, 4], grid[tile, 10, 5], grid[tile, 11, 4], grid[tile, 11, 5]])
        torch.testing.assert_close(meta.probe["features"][row * SIDE + col], expected)
        torch.testing.assert_close(adapter.project(meta.probe["features"]), image_features)


def test_probe_attends_with_the_towers_normed_queries_and_keys():
    tiny, processor = zoo.tiny(FAMILY, attn_implementation="eager", vision_config={"use_qk_norm": True})
    batch = inputs(processor, [Image.new("RGB", (64, 64), "navy")], ["What is shown?"])
    layer = adapter_for(tiny).default_vision_layer()
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch)
        ((_, meta),) = patch.state.encoded["image"][1]
        tower = tiny.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    cls_row = tower.attentions[layer][0, :, 0, 1:].mean(dim=0).view(SIDE, 2, SIDE, 2)
    torch.testing.assert_close(meta.probe["importance"], cls_row.sum(dim=(1, 3)).flatten())
    attention = tiny.model.vision_tower.encoder.layer[layer]
    unnormed = cls_row_probe(attention.attention, attention.layernorm_before(tower.hidden_states[layer]))
    assert not torch.allclose(unnormed["importance"][0, 1:].view(SIDE, 2, SIDE, 2).sum(dim=(1, 3)).flatten(),
                              meta.probe["importance"])
