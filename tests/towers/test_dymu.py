"""DyMU's thresholds inside vision towers: calibration and threshold merging by hand on a tiny token
set, block 0 of a real tower recomputed by hand, a batch of images with different merge counts
against the images run alone (four tower layouts), thresholds >= 1 bit-identical to the tower,
exact removal, and thresholds files checked against their tower."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.towers.test_tome import DEPTH, TOWERS, build, pixels, run
from vlmkit.errors import ConfigError, ConflictError
from vlmkit.towers import calibrate_thresholds, install_dymu, install_tome, read_thresholds, tower_fingerprint, write_thresholds
from vlmkit.towers.dymu import DyMUState, batch_merges, edges, merges_over_threshold, padded_targets

# ---------------------------------------------------------------- a tiny token set by hand
# two images of 7 tokens ([CLS] + 6), 2-d keys; A = positions 0, 2, 4, 6 and B = 1, 3, 5
FIRST = [[1.0, 0.0],    # 0 [CLS]
         [1.0, 0.0],    # 1 B
         [1.0, 0.1],    # 2 A: to 1: 1/sqrt(1.01) = 0.9950
         [0.0, 1.0],    # 3 B
         [0.2, 1.0],    # 4 A: to 3: 1/sqrt(1.04) = 0.9806
         [-1.0, 0.0],   # 5 B
         [-1.0, 0.5]]   # 6 A: to 5: 1/sqrt(1.25) = 0.8944
SECOND = [[1.0, 0.0],
          [1.0, 0.0],
          [0.0, 1.0],   # 2 A: to 3: 1.0
          [0.0, 1.0],
          [1.0, 0.8],   # 4 A: to 1: 1/sqrt(1.64) = 0.7809
          [-1.0, 0.0],
          [-1.0, -1.0]]  # 6 A: to 5: 1/sqrt(2) = 0.7071
METRIC = torch.tensor([FIRST, SECOND])
EDGES = [[0.9950, 0.9806, 0.8944], [1.0, 0.7809, 0.7071]]  # A tokens 2, 4, 6 of each image


def test_edges_by_hand_exclude_cls_and_padding():
    edge, partner = edges(METRIC, protected=1)
    assert edge[:, 0].tolist() == [-torch.inf, -torch.inf]
    torch.testing.assert_close(edge[:, 1:], torch.tensor(EDGES), atol=1e-4, rtol=0)
    assert partner[:, 1:].tolist() == [[0, 1, 2], [1, 0, 2]]  # B index: token 1 = 0, 3 = 1, 5 = 2
    alive = torch.ones(2, 7, dtype=torch.bool)
    alive[0, 5:] = False  # image 0 ends after token 4: token 6 (A) and 5 (B) are padding
    edge, partner = edges(METRIC, protected=1, alive=alive)
    assert edge[0, 3] == -torch.inf
    assert partner[0, 1:3].tolist() == [0, 1]


def test_calibration_merges_the_top_r_times_batch_edges_of_the_flattened_batch():
    edge, _ = edges(METRIC, protected=1)
    # flattened, descending: 1.0 (1, tok 2), 0.9950 (0, 2), 0.9806 (0, 4), 0.8944 (0, 6), 0.7809 (1, 4), 0.7071 (1, 6)
    merged, threshold = batch_merges(edge, r=1)  # rb = 2
    assert merged.tolist() == [[False, True, False, False], [False, True, False, False]]
    assert threshold == pytest.approx(0.9806, abs=1e-4)  # the edge at sorted index rb = 2
    merged, threshold = batch_merges(edge, r=2)  # rb = 4: the first image merges 3 tokens, the second 1
    assert merged.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert threshold == pytest.approx(0.7809, abs=1e-4)
    # at most 2 per image: the others become -inf before the batch is ranked (as the reference), so 0.7809
    # joins and the edge at index 4 is -inf, clamped to 0
    merged, threshold = batch_merges(edge, r=2, max_merges=2)
    assert merged.tolist() == [[False, True, True, False], [False, True, True, False]]
    assert threshold == 0.0
    merged, threshold = batch_merges(edge, r=1, max_merges=2)
    assert threshold == pytest.approx(0.9806, abs=1e-4)
    merged, threshold = batch_merges(edge, r=4)  # rb = 8 > 6 finite edges: -inf never merges; the last edge, clamped to 0
    assert merged.sum().item() == 6 and threshold == 0.0
    assert batch_merges(edge, r=0)[1] is None


def test_threshold_merges_exactly_the_edges_above_it_and_pads_the_shorter_image():
    edge, partner = edges(METRIC, protected=1)
    merged_a = merges_over_threshold(edge, 0.9)  # first image: 0.9950, 0.9806; second: 1.0
    assert merged_a.tolist() == [[False, True, True, False], [False, True, False, False]]
    assert merges_over_threshold(edge, float(edge[0, 2])).tolist()[0] == [False, True, False, False]  # strictly above
    assert merges_over_threshold(edge, 0.9, max_merges=1).tolist() == [[False, True, False, False], [False, True, False, False]]
    alive = torch.ones(2, 7, dtype=torch.bool)
    target, tokens = padded_targets(edge, partner, merged_a, alive, protected=1)
    # first image: 2 -> 1, 4 -> 3; order [CLS, 6, 1, 3, 5], then one padding row
    # second image: 2 -> 3; order [CLS, 4, 6, 1, 3, 5]
    assert tokens == 6
    assert target.tolist() == [[0, 2, 2, 3, 3, 4, 1], [0, 3, 4, 4, 1, 5, 2]]

    state = DyMUState(protected=1)
    x = torch.arange(14.0).view(2, 7, 1)
    state.reset(x)
    merged = state.merge_selected(x, target, tokens)
    assert merged[0, :, 0].tolist() == [0.0, 6.0, 1.5, 3.5, 5.0, 0.0]  # (1 + 2) / 2, (3 + 4) / 2; padding 0
    assert merged[1, :, 0].tolist() == [7.0, 11.0, 13.0, 8.0, 9.5, 12.0]
    assert state.size.tolist() == [[1, 1, 2, 2, 1, 0], [1, 1, 1, 1, 2, 1]]
    assert state.padding.tolist() == [[False] * 5 + [True], [False] * 6]
    bias = state.bias(torch.float32, proportional=False)
    assert bias.flatten().tolist() == [0.0] * 5 + [-torch.inf] + [0.0] * 6  # padding masked without proportional
    assert state.bias(torch.float32, proportional=True)[0, 0, 0, -1] == -torch.inf

    # the next block: the first image's padding row (position 5, a B token) is no partner and goes nowhere
    alive = ~state.padding
    keys = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    keys[0, 5] = keys[0, 2]  # the padding row would be the perfect partner of A token 2
    edge, partner = edges(keys, 1, alive)
    assert partner[0, 1:].tolist() != [2, 2] and (partner[0, 1:] != 2).all() and edge[0, 1] < 0.9999
    target, tokens = padded_targets(edge, partner, torch.zeros_like(edge, dtype=torch.bool), alive, 1)
    assert tokens == 6 and target[0, 5] == -1 and target[0, :5].tolist() == [0, 3, 1, 4, 2]


# ---------------------------------------------------------------- a real tower's first block by hand
def block0_edges(vit, images: torch.Tensor) -> torch.Tensor:
    """(B, A) the first block's edges of a timm ViT, recomputed from its weights."""
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        block = vit.blocks[0]
        qkv = block.attn.qkv(block.norm1(x)).unflatten(-1, (3, block.attn.num_heads, -1))
        keys = F.normalize(qkv[:, :, 1].mean(2), dim=-1)
        scores = keys[:, ::2] @ keys[:, 1::2].transpose(1, 2)
        scores[:, 0] = -torch.inf  # [CLS]
        return scores.max(-1).values


def test_calibration_of_a_tower_is_the_running_mean_of_the_rb_th_edges():
    vit = build("timm")
    first, second = pixels(3, seed=3), pixels(2, seed=4)
    calibration = calibrate_thresholds(vit, [first, second], r=[5, 0, 0])
    hand = []
    for images in (first, second):
        ranked = block0_edges(vit, images).flatten().sort(descending=True).values
        hand.append(max(ranked[5 * images.shape[0]].item(), 0.0))
    assert calibration["r"] == [5, 0, 0]
    assert calibration["thresholds"][1:] == [None, None]  # r = 0: nothing measured
    assert calibration["thresholds"][0] == pytest.approx((hand[0] + hand[1]) / 2, abs=1e-6)
    assert calibration["batches"] == 2 and calibration["images"] == 5
    assert calibration["tower"] == tower_fingerprint(vit)
    assert "forward" not in vit.blocks[0].__dict__  # calibration leaves the tower as it was

    # inference: each image merges exactly its own edges above the threshold in block 0; with 7 edges of
    # the 3 images above it, the images merge different counts
    threshold = block0_edges(vit, first).flatten().sort(descending=True).values[7].item()
    with install_dymu(vit, [threshold, None, None]) as handle:
        run("timm", vit, first)
    expected = 37 - (block0_edges(vit, first) > threshold).sum(1)
    assert handle.state.lengths[0].tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1  # the images merge different counts


def test_calibration_during_merges_top_rb_over_the_batch_so_counts_differ():
    vit = build("timm")
    with install_tome(vit, r=0):  # ToMe and DyMU cannot share a tower
        with pytest.raises(ConflictError, match="already have a replaced forward"):
            calibrate_thresholds(vit, [pixels(2)], r=2)
    seen = []
    calibrate_thresholds(vit, [pixels(4)], r=[4, 0, 0], call=lambda images: seen.append(vit.forward_features(images)))
    assert seen[0].shape[1] < 37  # calibration merges as it measures: 4 * 4 edges of the batch in block 0


# ---------------------------------------------------------------- towers
def calibrated(name: str):
    tower = build(name)
    return tower, calibrate_thresholds(tower, [pixels(4, seed=seed) for seed in (5, 6)], r=4)


@pytest.mark.parametrize("name", TOWERS)
def test_a_batch_with_different_merge_counts_equals_the_images_alone(name):
    tower, calibration = calibrated(name)
    images = pixels(4)
    with install_dymu(tower, calibration) as handle:
        batched = run(name, tower, images)
        lengths = handle.state.lengths[-1].tolist()
        padding = handle.state.padding.clone()
        patch_token = handle.state.patch_token.clone()
        assert len(set(lengths)) > 1, lengths
        assert batched.shape[1] == max(lengths) - (1 if name == "open_clip" else 0)  # open_clip drops [CLS]
        assert (~padding).sum(1).tolist() == lengths
        for row in range(4):
            single = run(name, tower, images[row : row + 1])
            assert handle.state.lengths[-1].tolist() == [lengths[row]]
            assert torch.equal(handle.state.patch_token[0], patch_token[row])
            torch.testing.assert_close(single[0], batched[row, : single.shape[1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TOWERS)
def test_thresholds_of_one_are_bit_identical_and_remove_restores_exactly(name):
    tower, calibration = calibrated(name)
    images = pixels(2)
    before = run(name, tower, images)
    weights = {key: value.clone() for key, value in tower.state_dict().items()}
    hooks = {key: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for key, m in tower.named_modules()}
    for neutral in (1.0, [1.5] * DEPTH, [None] * DEPTH):
        with install_dymu(tower, neutral) as handle:
            assert torch.equal(run(name, tower, images), before)
            assert handle.state.lengths[-1].tolist() == [before.shape[1] + (1 if name == "open_clip" else 0)] * 2
    handle = install_dymu(tower, calibration)
    assert run(name, tower, images).shape[1] < before.shape[1]
    handle.remove()
    handle.remove()
    assert torch.equal(run(name, tower, images), before)
    assert all(torch.equal(value, weights[key]) for key, value in tower.state_dict().items())
    assert {key: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for key, m in tower.named_modules()} == hooks
    assert not [key for key, module in tower.named_modules() if "forward" in module.__dict__]


def test_a_thresholds_file_records_its_tower_and_refuses_another(tmp_path):
    tower, calibration = calibrated("clip")
    path = write_thresholds(tmp_path / "clip.json", calibration)
    stored = json.loads(path.read_text())
    assert stored["method"] == "dymu" and stored["r"] == [4, 4, 4] and len(stored["thresholds"]) == DEPTH
    assert stored["tower"]["name"] == "CLIPVisionModel" and len(stored["tower"]["hash"]) == 64
    assert read_thresholds(path, tower)["thresholds"] == calibration["thresholds"]
    with install_dymu(tower, path) as handle:
        run("clip", tower, pixels(2))
        assert handle.thresholds == calibration["thresholds"]

    other = build("clip", seed=1)  # same shape, other weights
    with pytest.raises(ConfigError, match=r"clip.json holds thresholds for CLIPVisionModel \(transformers CLIP/SigLIP, 3 blocks, hash [0-9a-f]{12}\); this tower is CLIPVisionModel .*hash [0-9a-f]{12}\)\. Calibrate this tower"):
        install_dymu(other, path)
    with pytest.raises(ConfigError, match=r"holds thresholds for CLIPVisionModel .* this tower is SiglipVisionModel"):
        install_dymu(build("siglip"), path)
    with pytest.raises(ConfigError, match=r"calibrated on CLIPVisionModel, not on this CLIPVisionModel"):
        install_dymu(other, calibration)
    assert "forward" not in other.encoder.layers[0].__dict__


def test_errors(tmp_path):
    tower = build("timm")
    with pytest.raises(ConfigError, match=r"does not exist; write one with `vlmkit calibrate dymu`"):
        install_dymu(tower, tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"method": "shortv", "ranking": []}))
    with pytest.raises(ConfigError, match=r"is not a DyMU thresholds file"):
        install_dymu(tower, tmp_path / "other.json")
    with pytest.raises(ConfigError, match=r"one threshold per block \(3\)"):
        install_dymu(tower, [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"max_merges=0 must be an int >= 1"):
        install_dymu(tower, 0.5, max_merges=0)
    with pytest.raises(ConfigError, match=r"calibration got no batches"):
        calibrate_thresholds(tower, [], r=2)
    assert "forward" not in tower.blocks[0].__dict__
