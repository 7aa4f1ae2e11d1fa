"""Qwen3-VL in the engine: the visual layout (a video's frames are separate placeholder runs), the
engine-run decoder equal to the stock one, and DeepStack following every selection: after pruning
before or inside the LLM, each kept visual token receives exactly its own DeepStack features, after
the decoder layers that take them, at its new place; merged tokens get the merged features.
"""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import noise_video, photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.adapters import adapter_for
from vlmkit.engine.runner import TextStackRunner
from vlmkit.engine.selection import SampleSelection


def _stock_deepstack(tiny, batch, modality="image"):
    """(levels, N, D) the stock encoder's DeepStack features of the batch's images or videos, in order."""
    with torch.no_grad():
        if modality == "image":
            output = tiny.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        else:
            output = tiny.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    return torch.stack([torch.cat(level) for level in output.deepstack_features])


def _videos(frames=(4, 4)):
    return [noise_video(count, seed=index + 1) for index, count in enumerate(frames)]


def test_tiny_qwen3_vl_has_deepstack_and_interleaved_sections():
    tiny, _ = model("qwen3_vl")
    adapter = adapter_for(tiny)
    assert adapter.family == "qwen3_vl" and adapter.mrope
    assert list(tiny.config.vision_config.deepstack_visual_indexes) == [0, 1]
    assert tiny.config.text_config.rope_parameters["mrope_interleaved"]
    assert adapter.vision_layers is tiny.model.visual.blocks


def test_video_frames_are_runs_after_their_timestamps():
    """Each temporal patch is its own placeholder run; the engine's visual tokens sit exactly on the
    video placeholders, frame f on run f."""
    tiny, processor = model("qwen3_vl")
    batch = inputs(processor, _videos((4, 6)), QUESTIONS[:2], modality="video")
    seen = {}
    original = TextStackRunner._attach_deepstack

    def spy(deepstack, visual, length):
        seen["visual"] = visual
        return original(deepstack, visual, length)

    TextStackRunner._attach_deepstack = staticmethod(spy)
    try:
        with vlmkit.apply(tiny, "fastv:keep=1.0"), torch.no_grad():
            tiny(**batch)
    finally:
        TextStackRunner._attach_deepstack = staticmethod(original)
    video = tiny.config.video_token_id
    for row, visual in enumerate(seen["visual"]):
        positions = torch.nonzero(batch["input_ids"][row] == video).flatten()
        assert torch.equal(visual.slots, positions)
        frames, rows, cols = batch["video_grid_thw"][row].tolist()
        per_frame = rows * cols // 4
        assert visual.grids == [(frames, rows // 2, cols // 2)]
        assert torch.equal(visual.frame, torch.arange(frames).repeat_interleave(per_frame))
        runs = positions.view(frames, per_frame)
        assert bool((runs[:, -1] - runs[:, 0] == per_frame - 1).all())  # contiguous within a frame
        assert bool((runs[1:, 0] > runs[:-1, -1] + 1).all())  # text (a timestamp) between frames


@pytest.mark.parametrize("modality", ["image", "video"])
def test_engine_run_decoder_equals_the_stock_model(modality):
    """A stack method at its neutral setting runs the decoder loop (DeepStack included) bit-identically."""
    tiny, processor = model("qwen3_vl")
    media = photos()[:2] if modality == "image" else _videos()
    batch = inputs(processor, media, QUESTIONS[:2], modality=modality)
    with torch.no_grad():
        logits = tiny(**batch).logits
    tokens = generate(tiny, batch)
    for method in ("fastv:keep=1.0", "random:keep=1.0", "random:keep=1.0,layer=1"):
        with vlmkit.apply(tiny, method), torch.no_grad():
            valid = batch["attention_mask"].bool()  # padding rows' logits are not the model's output
            assert torch.equal(tiny(**batch).logits[valid], logits[valid]), method
            assert torch.equal(generate(tiny, batch), tokens), method


def test_padded_video_batch_equals_the_stock_model_on_every_real_token():
    tiny, processor = model("qwen3_vl")
    batch = inputs(processor, _videos((4, 6)), QUESTIONS[:2], modality="video")
    valid = batch["attention_mask"].bool()
    assert not bool(valid.all())
    with torch.no_grad():
        logits = tiny(**batch).logits
    with vlmkit.apply(tiny, "fastv:keep=1.0"), torch.no_grad():
        assert torch.equal(tiny(**batch).logits[valid], logits[valid])


def test_deepstack_matters_in_the_tiny_model():
    """Without its DeepStack features the stock model's output changes (so the tests above see them)."""
    tiny, processor = model("qwen3_vl")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    text_model = tiny.model.language_model
    with torch.no_grad():
        logits = tiny(**batch).logits
        handle = text_model.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "deepstack_visual_embeds": None}), with_kwargs=True
        )
        try:
            without = tiny(**batch).logits
        finally:
            handle.remove()
    assert (logits - without).abs().max() > 1e-2


def _layer_io(tiny, batch, method):
    """Under `method`: each decoder layer's input (pre-hook) and output (hook), and the patch's selection."""
    layers = tiny.model.language_model.layers
    inputs_, outputs, handles = {}, {}, []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=index: inputs_.__setitem__(i, a[0]), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=index: outputs.__setitem__(i, o)))
    try:
        with vlmkit.apply(tiny, method) as patch, torch.no_grad():
            logits = tiny(**batch).logits
            kept = patch.selections[method.split(":")[0]]
    finally:
        for handle in handles:
            handle.remove()
    return inputs_, outputs, kept, logits


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("modality", ["image", "video"])
def test_kept_tokens_receive_exactly_their_own_deepstack_features(modality, layer):
    """Prune before the LLM (layer 0) or between the two DeepStack layers (layer 1): between decoder
    layer i's output and layer i + 1's input (i = 0, 1) the stream changes by exactly the stock
    encoder's level-i features of each kept token, at that token's row, and nowhere else."""
    tiny, processor = model("qwen3_vl")
    media = photos()[:1] if modality == "image" else _videos((4,))
    batch = inputs(processor, media, QUESTIONS[:1], modality=modality)
    features = _stock_deepstack(tiny, batch, modality)
    method = f"random:keep=0.3,seed=5,layer={layer}"
    layer_in, layer_out, kept, _ = _layer_io(tiny, batch, method)
    kept = kept[0]
    placeholder = tiny.config.image_token_id if modality == "image" else tiny.config.video_token_id
    positions = torch.nonzero(batch["input_ids"][0] == placeholder).flatten()
    assert 0 < kept.numel() < positions.numel()
    length = batch["input_ids"].shape[1]
    keep = torch.ones(length, dtype=torch.bool)
    keep[positions] = False
    keep[positions[kept]] = True
    kept_rows = torch.searchsorted(torch.nonzero(keep).flatten(), positions[kept])  # rows in the pruned stream
    for level in (0, 1):
        after, before = layer_in[level + 1][0], layer_out[level][0]
        expected = before.clone()
        if before.shape[0] == length:  # the whole stream: every visual token gets its features
            expected[positions] = before[positions] + features[level]
            if after.shape[0] != length:  # then the selection before layer 1 drops the others
                expected = expected[keep]
        else:
            expected[kept_rows] = before[kept_rows] + features[level, kept]
        assert after.shape[0] == (length if level + 1 < layer else int(keep.sum())), level
        assert torch.equal(after, expected), level
    # after the last DeepStack layer nothing is added
    assert torch.equal(layer_in[3][0], layer_out[2][0])


def test_pruned_logits_equal_the_stock_text_model_on_the_pruned_sequence():
    """End to end, with the expectation built from the stock model's pieces only: its embeddings, 3-D
    positions and DeepStack features, kept rows gathered, then its own text model and head."""
    tiny, processor = model("qwen3_vl")
    batch = inputs(processor, photos()[1:2], QUESTIONS[1:2])
    _, _, kept, logits = _layer_io(tiny, batch, "random:keep=0.4,seed=2")
    kept = kept[0]
    base = tiny.model
    ids = batch["input_ids"]
    with torch.no_grad():
        output = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        embeds = base.get_input_embeddings()(ids)
        mask = ids == tiny.config.image_token_id
        embeds = embeds.masked_scatter(mask[..., None], torch.cat(output.pooler_output))
        positions, _ = base.get_rope_index(ids, image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
                                           mm_token_type_ids=batch["mm_token_type_ids"])
        visual = torch.nonzero(mask[0]).flatten()
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[visual] = False
        keep[visual[kept]] = True
        pruned_mask = mask[:, keep]
        hidden = base.language_model(
            inputs_embeds=embeds[:, keep], position_ids=positions[:, :, keep],
            visual_pos_masks=pruned_mask,
            deepstack_visual_embeds=[torch.cat(level)[kept] for level in output.deepstack_features],
        ).last_hidden_state
        expected = tiny.lm_head(hidden[:, -1])
    torch.testing.assert_close(logits[:, -1], expected, rtol=1e-5, atol=1e-5)


def test_merged_tokens_get_the_same_combination_of_deepstack_features():
    """`merge_target` (weighted mean into a kept token) and `combine` (rows of weights), with an entry
    order: each kept token's features are the combination of the features of the tokens it stands for."""
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3)
    merge = SampleSelection(torch.tensor([1, 3]), merge_target=torch.tensor([0, 0, 1, 1, -1]),
                            merge_weight=torch.tensor([1.0, 3.0, 2.0, 2.0, 1.0]), order=torch.tensor([1, 0]))
    merged = TextStackRunner._merged_deepstack(merge, features)
    first = (features[:, 0] * 1 + features[:, 1] * 3) / 4
    second = (features[:, 2] + features[:, 3]) / 2
    torch.testing.assert_close(merged, torch.stack([second, first], dim=1))
    combine = torch.zeros(2, 5)
    combine[0, 1] = 1.0  # kept token 1 unchanged
    combine[1, [2, 3, 4]] = torch.tensor([0.5, 0.25, 0.25])
    mixed = TextStackRunner._merged_deepstack(SampleSelection(torch.tensor([1, 3]), combine=combine), features)
    assert torch.equal(mixed[:, 0], features[:, 1])
    torch.testing.assert_close(mixed[:, 1], 0.5 * features[:, 2] + 0.25 * features[:, 3] + 0.25 * features[:, 4])


def test_visionzip_contextual_tokens_get_the_merged_deepstack_features():
    """VisionZip's contextual tokens are combinations of the tokens they stand for (`combine`, entering
    after the dominant ones): after each DeepStack layer their rows change by the same combination of
    the stock encoder's features, the dominant tokens' rows by their own."""
    tiny, processor = model("qwen3_vl")
    batch = inputs(processor, photos()[2:3], QUESTIONS[:1])
    features = _stock_deepstack(tiny, batch)
    layers = tiny.model.language_model.layers
    layer_in, layer_out = {}, {}
    handles = [layers[i].register_forward_pre_hook(lambda m, a, i=i: layer_in.__setitem__(i, a[0])) for i in (1, 2)]
    handles += [layers[i].register_forward_hook(lambda m, a, o, i=i: layer_out.__setitem__(i, o)) for i in (0, 1)]
    try:
        with vlmkit.apply(tiny, "visionzip:tokens=20") as patch, torch.no_grad():
            tiny(**batch)
            sample = patch.state.recorded[("select", 0)].samples[0]
    finally:
        for handle in handles:
            handle.remove()
    assert sample.combine is not None and sample.order is not None
    changed = (sample.combine != 0).sum(dim=1) > 1
    assert bool(changed.any()) and not bool(changed.all())
    positions = torch.nonzero(batch["input_ids"][0] == tiny.config.image_token_id).flatten()
    keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    keep[positions] = False
    keep[positions[sample.keep]] = True
    rows = torch.searchsorted(torch.nonzero(keep).flatten(), positions[sample.keep])  # the kept places, in order
    for level in (0, 1):
        entries = (sample.combine.float() @ features[level])[sample.order]  # the tokens in the order they enter
        own = features[level][sample.keep][sample.order]
        before, after = layer_out[level][0], layer_in[level + 1][0]
        torch.testing.assert_close(after[rows] - before[rows], entries, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after[rows] - before[rows], own, rtol=1e-3, atol=1e-3)
        others = torch.ones(after.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(after[others], before[others])
