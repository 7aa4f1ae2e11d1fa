"""Each pruning method against its paper's algorithm: hand-made inputs with known answers, and
hand computations from eager attention maps of the tiny models (written independently of vlmkit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.methods.prune.divprune import DivPrune
from vlmkit.methods.prune.fastv import FastV
from vlmkit.methods.prune.pool import Pool
from vlmkit.methods.prune.random import RandomPrune
from vlmkit.methods.prune.visionzip import VisionZip


def grid_tokens(rows: int, cols: int) -> VisualTokens:
    n = rows * cols
    index = torch.arange(n)
    return VisualTokens(
        slots=index + 5, origin=index, image=torch.zeros(n, dtype=torch.long), frame=torch.zeros(n, dtype=torch.long),
        row=index // cols, col=index % cols, crop=torch.zeros(n, dtype=torch.long), grids=[(1, rows, cols)], modality=["image"],
    )


def context(visual, **extra) -> SelectionContext:
    return SelectionContext(hidden=torch.zeros(1, 30, 4), visual=visual, layer=2, num_layers=4, **extra)


# ---------------------------------------------------------------- hand-made inputs
def test_fastv_keeps_the_most_attended_tokens():
    visual = [grid_tokens(2, 3)]
    scores = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.40, 0.20])  # tie at 0.40: both kept
    selection = FastV(keep=0.5).select(context(visual, last_row_attention=[scores]))
    assert selection.samples[0].keep.tolist() == [1, 3, 4]
    selection = FastV(tokens=2).select(context(visual, last_row_attention=[scores]))
    assert selection.samples[0].keep.tolist() == [1, 4]  # ties resolve to the lower index first


@pytest.mark.parametrize("method", [FastV, DivPrune])
def test_a_share_rounds_as_the_reference_code_does_halves_to_even(method):
    config = method.Config(keep=0.03125)
    assert config.kept_count(144, 0.5, rounding="half_even") == 4  # round(4.5) == 4 in Python
    assert config.kept_count(144, 0.5) == 5  # the default rule rounds halves up
    visual = [grid_tokens(12, 12)]
    scores = torch.rand(144, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 160, 4, generator=torch.Generator().manual_seed(1))
    ctx = SelectionContext(hidden=hidden, visual=visual, layer=2, num_layers=4, last_row_attention=[scores])
    assert method(keep=0.03125).select(ctx).samples[0].keep.numel() == 4
    assert method(keep=0.0625 * 0.5 + 1 / 288).select(ctx).samples[0].keep.numel() == 5  # 5.0 exactly


def test_visionzip_dominant_then_evenly_strided_contextual_targets():
    importance = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.3, 0.1, 0.1, 0.1])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 1.0], [0.1, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    dominant, targets, joined = VisionZip(dominant=2, contextual=2).select_image(importance, keys)
    # dominant: tokens 0 and 3; rest = [1, 2, 4, 5, 6, 7], step 3 -> targets 1 and 5
    assert dominant.tolist() == [0, 3] and targets.tolist() == [1, 5]
    # token 2 ~ (1, 0.1) is closest to target 5 (1, 0); 4 and 6 point up like target 1; 7 (-1, 0) is
    # most similar (least opposite) to target 1 (0, 1)
    assert joined.tolist() == [-1, -1, 1, -1, 0, -1, 0, 0]


def test_visionzip_enters_dominant_then_contextual_with_target_plus_mean_of_joiners():
    """The reference's formula c_t = x_t + mean(joiners) and entry order, by hand on one 2x4 image."""
    importance = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.3, 0.1, 0.1, 0.1])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 1.0], [0.1, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    visual = grid_tokens(2, 4)
    features = torch.arange(16.0).view(8, 2)
    sample = VisionZip(dominant=2, contextual=2).select_sample(visual, [{"importance": importance, "keys": keys, "features": features}])
    assert sample.keep.tolist() == [0, 1, 3, 5]
    assert sample.keep[sample.order].tolist() == [0, 3, 1, 5]  # dominant (patch order), then contextual
    assert sample.combine_space == "vision"
    combined = sample.combine @ features
    assert torch.equal(combined[0], features[0]) and torch.equal(combined[2], features[3])  # dominant: as they are
    assert torch.allclose(combined[1], features[1] + (features[4] + features[6] + features[7]) / 3)
    assert torch.allclose(combined[3], features[5] + features[2])
    without_features = VisionZip(dominant=2, contextual=2).select_sample(visual, [{"importance": importance, "keys": keys}])
    assert without_features.combine_space == "llm"  # e.g. Qwen2-VL's merger: the sum on the LLM's input


def test_visionzip_keeping_every_token_changes_nothing():
    visual = grid_tokens(2, 4)
    probe = {"importance": torch.rand(8), "keys": torch.randn(8, 2), "features": torch.randn(8, 2)}
    sample = VisionZip(keep=1.0).select_sample(visual, [probe])
    assert sample.keep.tolist() == list(range(8)) and sample.order.tolist() == list(range(8)) and sample.combine is None


def test_visionzip_budget_splits_54_to_10():
    assert VisionZip(tokens=64).counts(576) == (54, 10)
    assert VisionZip().counts(576) == (54, 10)  # default: 64 of 576
    assert VisionZip(dominant=5, contextual=0).counts(3) == (3, 0)


def test_divprune_picks_the_most_diverse_tokens():
    # four directions in the plane, the first three nearly equal: Max-Min keeps one of the cluster
    angles = torch.tensor([0.0, 0.05, 0.1, 1.5, 3.1, -1.6])
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    hidden = torch.zeros(1, 30, 2)
    visual = grid_tokens(2, 3)
    hidden[0, visual.slots] = features
    selection = DivPrune(tokens=4).select(SelectionContext(hidden=hidden, visual=[visual], layer=0, num_layers=4))
    # d = 1 - cos. First pick: the largest distance to the nearest other token: tokens 4 and 5 tie
    # (their mutual 1.012) -> 4. Then argmax of the distance to the set: 0 (1.999), 5 (1.012 vs
    # 1.029), 3 (0.929); the near-duplicates 1 and 2 are never picked.
    assert selection.samples[0].keep.tolist() == [0, 3, 4, 5]


def test_pool_2x2_windows_keep_top_left_and_average_members():
    selection = Pool(keep=0.25).select(context([grid_tokens(4, 4)])).samples[0]
    assert selection.keep.tolist() == [0, 2, 8, 10]
    assert selection.merge_target.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_pool_half_budget_uses_one_by_two_windows():
    selection = Pool(keep=0.5).select(context([grid_tokens(2, 4)])).samples[0]
    assert selection.keep.tolist() == [0, 2, 4, 6]


def test_random_is_seeded_and_independent_of_the_batch_position():
    visual = [grid_tokens(4, 4), grid_tokens(4, 4)]
    first = RandomPrune(keep=0.25, seed=1).select(context(visual))
    again = RandomPrune(keep=0.25, seed=1).select(context(visual[:1]))
    other = RandomPrune(keep=0.25, seed=2).select(context(visual[:1]))
    assert torch.equal(first.samples[0].keep, first.samples[1].keep)
    assert torch.equal(first.samples[0].keep, again.samples[0].keep)
    assert not torch.equal(first.samples[0].keep, other.samples[0].keep)
    assert first.samples[0].keep.numel() == 4


# ---------------------------------------------------------------- hand computations on real models
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_fastv_matches_eager_attention_maps(family):
    tiny, processor = model(family, "eager")
    batch = inputs(processor, photos()[:3], QUESTIONS[:3])
    layer, keep = 2, 0.3
    seen = {}
    hook = tiny.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        attentions = tiny(**batch, output_attentions=True).attentions
    hook.remove()
    row = attentions[layer - 1][:, :, -1, :].mean(dim=1)  # last token's attention at layer K-1, mean over heads
    visual = batch["input_ids"] == tiny.config.image_token_id
    newline = getattr(tiny.model, "image_newline", None)
    if newline is not None:  # image-newline tokens are structural: never scored, never pruned
        visual &= ~(seen["embeds"] == newline).all(dim=-1)
    with vlmkit.apply(tiny, f"fastv:layer={layer},keep={keep}") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["fastv"]
    for sample in range(3):
        scores = row[sample][visual[sample]]
        count = int(keep * scores.numel() + 0.5)
        expected = torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values
        assert chosen[sample].tolist() == expected.tolist()


def test_visionzip_matches_eager_cls_attention_and_key_similarity():
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 2  # hidden_states[-2] is this layer's output
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
        attention = out.attentions[layer]  # (images, heads, 1 + N, 1 + N)
        block = tower.encoder.layers[layer]
        normed = block.layer_norm1(out.hidden_states[layer])
        keys = block.self_attn.k_proj(normed).view(*normed.shape[:2], attention.shape[1], -1).mean(dim=2)
    dominant, contextual = 12, 4
    entered = {}
    hook = tiny.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: entered.update(hidden=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    with vlmkit.apply(tiny, f"visionzip:dominant={dominant},contextual={contextual}") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["visionzip"]
    hook.remove()
    features = out.hidden_states[layer + 1][:, 1:]  # what the projector reads ([CLS] dropped)
    placeholders = batch["input_ids"] == tiny.config.image_token_id
    for image in range(2):
        cls_row = attention[image, :, 0, 1:].mean(dim=0)
        top = torch.argsort(cls_row, descending=True, stable=True)[:dominant]
        rest = torch.tensor(sorted(set(range(cls_row.numel())) - set(top.tolist())))
        targets = rest[:: rest.numel() // contextual][:contextual]
        assert chosen[image].tolist() == sorted(top.tolist() + targets.tolist())
        # every other token joins the target with the most similar head-mean key; a target becomes
        # its own feature plus the mean of its joiners' features, then is projected
        patch_keys = F.normalize(keys[image, 1:], dim=-1)
        joiners = torch.tensor([t for t in rest.tolist() if t not in targets.tolist()])
        best = (patch_keys[joiners] @ patch_keys[targets].T).argmax(dim=1)
        contextual_features = torch.stack([
            features[image, t] + features[image, joiners[best == i]].mean(dim=0) if (best == i).any() else features[image, t]
            for i, t in enumerate(targets.tolist())
        ])
        entering = torch.cat([features[image, torch.sort(top).values], contextual_features])
        with torch.no_grad():
            expected = tiny.model.multi_modal_projector(entering[None])[0]
        # the image's tokens enter where its placeholders began, after the left padding of the new stream
        hidden = entered["hidden"][image]
        kept_length = int(batch["attention_mask"][image].sum()) - int(placeholders[image].sum()) + expected.shape[0]
        start = hidden.shape[0] - kept_length + int(placeholders[image].long().argmax()) - int((batch["attention_mask"][image] == 0).sum())
        assert torch.allclose(hidden[start : start + expected.shape[0]], expected, atol=1e-5)


def test_visionzip_on_onevision_video_with_a_clip_tower_scores_by_pooled_cls_attention():
    """A OneVision model with a CLIP tower (strategy "default", as shapes-video): the [CLS] row is
    the score, [CLS] itself is no token of the LLM, and frames are scored after the 2x2 pooling."""
    import numpy as np

    from vlmkit.train.video import build_onevision

    tiny, processor = build_onevision("shapes-llava")
    tiny.set_attn_implementation("eager")
    frames = np.stack([np.asarray(p.resize((96, 96))) for p in photos()[:4]])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    batch = processor(text=[text], videos=[frames], return_tensors="pt")
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 1  # vision_feature_layer -1: the layer the LLM reads
    with torch.no_grad():
        out = tower(batch["pixel_values_videos"][0], output_attentions=True)
    cls_row = out.attentions[layer][:, :, 0, 1:].mean(dim=1).view(4, 1, 12, 12)  # frames, [CLS] -> patches
    pooled = F.interpolate(cls_row, size=(6, 6), mode="bilinear").flatten()  # OneVision's video pooling
    dominant = 20
    with vlmkit.apply(tiny, f"visionzip:dominant={dominant},contextual=0") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["visionzip"][0]
    top = torch.argsort(pooled, descending=True, stable=True)[:dominant]
    assert chosen.tolist() == sorted(top.tolist())


def test_a_selection_with_a_bad_order_or_combine_is_refused_by_name():
    from vlmkit.engine.selection import SampleSelection
    from vlmkit.errors import InputError

    keep = torch.tensor([0, 2, 3])
    with pytest.raises(InputError, match="permutation of 0..2"):
        SampleSelection(keep, order=torch.tensor([0, 0, 1])).validate(5, "mine")
    with pytest.raises(InputError, match=r"combine must be a float \(kept, visual\) = \(3, 5\)"):
        SampleSelection(keep, combine=torch.ones(3, 4)).validate(5, "mine")
    with pytest.raises(InputError, match="merge_target or combine, not both"):
        SampleSelection(keep, merge_target=torch.zeros(5, dtype=torch.long), combine=torch.ones(3, 5)).validate(5, "mine")
    with pytest.raises(InputError, match="combine_space='pixels' is not one of llm, vision"):
        SampleSelection(keep, combine=torch.ones(3, 5), combine_space="pixels").validate(5, "mine")
    combine = torch.zeros(3, 5)
    combine[[0, 1, 2], keep] = 1.0
    combine[1, 4] = 0.5  # only the second kept token changes
    assert SampleSelection(keep, combine=combine).changed_rows().tolist() == [1]
