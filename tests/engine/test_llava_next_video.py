"""LLaVA-NeXT-Video's token layout, checked by hand on the tiny twin (32-pixel CLIP tower, 4-pixel
patches: 8 x 8 patches per crop or frame; pinpoints 32x64, 64x32, 64x64; videos pooled 2 x 2)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmkit
from tests.conftest import noise_video
from tests.engine.models import inputs, model, prompt
from vlmkit import zoo
from vlmkit.adapters import adapter_for

FAMILY = "llava_next_video"
SIDE = 8  # patches per crop / frame side


def tower_probe(rows: int) -> list[dict[str, torch.Tensor]]:
    """A raw probe of `rows` tower rows ([CLS] first): patch p of row t scores 1000 t + p; [CLS] -1."""
    patches = torch.arange(SIDE * SIDE, dtype=torch.float32)
    importance = torch.stack([torch.cat([torch.tensor([-1.0]), 1000 * row + patches]) for row in range(rows)])
    return [{"importance": importance}]


def test_image_tokens_are_base_view_then_unpadded_tile_rows_with_newlines():
    tiny, processor = model(FAMILY)
    # 32 x 48 (h x w) picks the 32x64 pinpoint: base view + 2 tiles side by side, a 8 x 16 tile grid
    # whose 2 columns at each side are padding (48 / 32 * 8 = 12 columns of image).
    image_sizes = torch.tensor([[32, 48]])
    (meta,) = adapter_for(tiny).visual_metas("image", {"image_sizes": image_sizes}, None, tower_probe(3))
    assert meta.grid == (1, 8, 8)
    assert meta.num_tokens == 64 + 8 * (12 + 1)
    coords, importance = meta.coords.tolist(), meta.probe["importance"].tolist()
    assert coords[:2] + coords[63:64] == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 7, 7, 0]]  # base view, row-major
    assert importance[:2] + importance[63:64] == [0, 1, 63]
    first_row = coords[64:77]
    assert first_row[0] == [0, 0, 2, 1] and importance[64] == 1002  # tile 1, local column 2
    assert first_row[5] == [0, 0, 7, 1] and importance[69] == 1007
    assert first_row[6] == [0, 0, 8, 2] and importance[70] == 2000  # tile 2, local column 0
    assert first_row[11] == [0, 0, 13, 2] and importance[75] == 2005
    assert first_row[12] == [0, 0, 0, -1]  # the row's newline
    assert coords[77] == [0, 1, 2, 1] and importance[77] == 1010
    assert coords[-2:] == [[0, 7, 13, 2], [0, 0, 0, -1]] and importance[-2] == 2061
    text = prompt(processor, "What is shown?")
    ids = processor(images=Image.new("RGB", (48, 32)), text=text, return_tensors="pt").input_ids
    assert int((ids == tiny.config.image_token_id).sum()) == meta.num_tokens


def test_video_tokens_are_pooled_frames_without_newlines():
    tiny, _ = model(FAMILY)
    call = {"pixel_values_videos": torch.zeros(1, 2, 3, 32, 32)}
    (meta,) = adapter_for(tiny).visual_metas("video", call, None, tower_probe(2))
    assert meta.grid == (2, 4, 4)
    assert meta.num_tokens == 2 * 16
    coords, importance = meta.coords.tolist(), meta.probe["importance"].tolist()
    assert coords[:5] == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 3, 0], [0, 1, 0, 0]]
    assert coords[16] == [1, 0, 0, 0] and coords[-1] == [1, 3, 3, 0]
    # token (frame, R, C) averages patches (2R + i, 2C + j): 1000 frame + 16 R + 2 C + (0 + 1 + 8 + 9) / 4
    assert importance[0] == 4.5
    assert importance[5] == 16 + 2 + 4.5
    assert importance[-1] == 1000 + 48 + 6 + 4.5


@pytest.mark.parametrize(("mode", "expected"), [("average", 22.5), ("max", 27.0), ("conv", 22.5)])
def test_probes_pool_over_the_resamplers_windows(mode, expected):
    tiny, _ = zoo.tiny(FAMILY, spatial_pool_mode=mode)
    call = {"pixel_values_videos": torch.zeros(1, 1, 3, 32, 32)}
    (meta,) = adapter_for(tiny).visual_metas("video", call, None, tower_probe(1))
    # token (0, 1, 1) covers patches 18, 19, 26, 27; a learned convolution's windows are averaged
    assert meta.probe["importance"][5].item() == expected


def test_video_features_are_the_pooled_projector_inputs():
    tiny, processor = model(FAMILY)
    batch = inputs(processor, [noise_video(2, seed=1)], ["What is shown?"], modality="video")
    adapter = adapter_for(tiny)
    with vlmkit.apply(tiny, "visionzip") as patch, torch.no_grad():
        tiny(**batch)
        ((features, meta),) = patch.state.encoded["video"][1]
        assert int((batch["input_ids"] == tiny.config.video_token_id).sum()) == meta.num_tokens == 32
        torch.testing.assert_close(adapter.project(meta.probe["features"]), features)
