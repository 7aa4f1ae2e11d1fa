"""`dymu` through `vlmkit.apply`: the LLM of a VLM receives a different number of visual tokens per
image (checked against the tower merged by hand, and a batch against its samples alone), a bare
tower with a thresholds file, and the errors."""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from tests.methods.test_tome import clip_tower, llm_input, timm_tower
from vlmkit.adapters import adapter_for
from vlmkit.errors import ConfigError
from vlmkit.towers import calibrate_thresholds, install_dymu, representatives, write_thresholds


def test_the_llm_receives_a_different_count_per_image():
    tiny, processor = model("llava")
    adapter = adapter_for(tiny)
    read = adapter.default_vision_layer()
    blocks = len(adapter.vision_layers)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "dymu:threshold=0.8") as patch:
        received = llm_input(tiny, batch)
        kept = patch.selections["dymu"]
        assert patch.methods[0].handle.thresholds == [0.8 if block <= read else None for block in range(blocks)]
        singles = []
        for row in range(2):
            one = inputs(processor, photos()[row : row + 1], QUESTIONS[row : row + 1])
            singles.append((llm_input(tiny, one), patch.selections["dymu"][0], one))
    counts = [len(k) for k in kept]
    assert counts[0] != counts[1], counts
    # by hand: the tower under the same thresholds; the representatives of each image at the read block,
    # without [CLS] (LLaVA's "default" feature strategy)
    tower = adapter.vision_tower
    with install_dymu(tower, [0.8 if block <= read else None for block in range(blocks)]) as handle, torch.no_grad():
        tower(batch["pixel_values"], output_hidden_states=True)
        stands_for = representatives(handle.state.history[read])[:, 1:]
    for row in range(2):
        assert torch.equal(kept[row], torch.nonzero(stands_for[row]).flatten())
        received_alone, kept_alone, one = singles[row]
        assert torch.equal(kept_alone, kept[row])
        # the placeholders of the merged-away patches are gone; the batch row holds the same stream after its padding
        slots = torch.nonzero(one["input_ids"][0] == tiny.config.image_token_id).flatten()
        length = received_alone.shape[1]
        assert length == one["input_ids"].shape[1] - len(slots) + counts[row]
        torch.testing.assert_close(received[row, -length:], received_alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [timm_tower, clip_tower], ids=["timm", "transformers"])
def test_apply_on_a_bare_tower_with_a_thresholds_file(build, tmp_path):
    tower = build()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    run = (lambda m: m(pixel_values=images).last_hidden_state) if build is clip_tower else (lambda m: m(images))
    calibration = calibrate_thresholds(tower, [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))], r=1)
    path = write_thresholds(tmp_path / "thresholds.json", calibration)
    with torch.no_grad():
        plain = run(tower)
        with install_dymu(tower, path) as handle:
            merged = run(tower)
            padding = handle.state.padding.clone()
        with vlmkit.apply(tower, f"dymu:calibration='{path}'") as patch:
            assert torch.equal(run(tower), merged)
            assert torch.equal(patch.methods[0].state.padding, padding)
        assert torch.equal(run(tower), plain)
    assert "forward" not in tower.__dict__ and vlmkit.patch_of(tower) is None


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"give the thresholds as calibration=FILE.json .* exactly one of them"):
        vlmkit.apply(timm_tower(), "dymu")
    with pytest.raises(ConfigError, match=r"exactly one of them"):
        vlmkit.apply(timm_tower(), "dymu:threshold=0.9,calibration='x.json'")
    with pytest.raises(ConfigError, match=r"threshold=\('a',\) must be a number"):
        vlmkit.apply(timm_tower(), "dymu:threshold=('a',)")
    with pytest.raises(ConfigError, match=r"threshold has 2 entries for a tower of 12 blocks"):
        vlmkit.apply(timm_tower(), "dymu:threshold=(0.9, 0.9)")
    tower = timm_tower()
    path = write_thresholds(tmp_path / "t.json", calibrate_thresholds(tower, [torch.rand(2, 3, 64, 64)], r=1))
    tiny, _ = model("llava")
    with pytest.raises(ConfigError, match=r"t.json holds thresholds for VisionTransformer \(timm VisionTransformer, 12 blocks.*this tower is CLIPVisionModel"):
        vlmkit.apply(tiny, f"dymu:calibration='{path}'")
    assert vlmkit.patch_of(tiny) is None


class Sample:
    """The part of a benchmark sample calibration reads."""

    def __init__(self, image):
        self.image = image

    def load_media(self):
        return [self.image]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_calibrating_a_vlm_tower_from_its_processor(family, tmp_path):
    from vlmkit.commands.calibrate import calibrate_dymu

    tiny, processor = model(family)
    adapter = adapter_for(tiny)
    read = adapter.default_vision_layer()
    samples = [Sample(image) for image in photos()]
    calibration = calibrate_dymu(tiny, processor, samples, r=4, batch_size=2)
    assert calibration["batches"] == 2 and calibration["r"] == [4 if block <= read else 0 for block in range(len(adapter.vision_layers))]
    assert all((value is None) == (block > read) for block, value in enumerate(calibration["thresholds"]))
    path = write_thresholds(tmp_path / "dymu.json", calibration)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, f"dymu:calibration='{path}'") as patch, torch.no_grad():
        tiny(**batch)
        assert all(0 < len(kept) for kept in patch.selections["dymu"])
