"""HoliTom against the reference's rules (cokeshao/HoliTom `holitom/llava_arch.py`): the static-window
partition its dynamic program picks for hand-given similarities; which places of a hand-made clip are
static and the merged static token; a DPC-kNN clustering of six points (densities, distances to a denser
point, centres, assignments, merged values); on the tiny video families, the kept tokens the rule gives
on the model's own embeddings; errors that name the valid range."""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.engine.models import generate
from tests.methods.test_video_reduction import FRAMES, VIDEO_FAMILIES, clip, selection_context, unit, video_batch, video_embeddings
from vlmkit.errors import ConfigError, UnsupportedModelError
from vlmkit.methods.video.holitom import (
    HoliTom,
    cluster_weights,
    dpc_knn,
    inner_merge_weights,
    rescaled_ratio,
    static_counts,
    static_windows,
)

# ---------------------------------------------------------------- the static windows
# 4 frames, 3 places: cosine of each place with the next frame (rows t -> t + 1)
SIMILARITY = torch.tensor([
    [0.9, 0.9, 0.1],
    [0.9, 0.1, 0.1],
    [0.9, 0.9, 0.9],
])


def test_static_counts_are_window_length_minus_one_times_the_places_that_stay_above_tau():
    counts = static_counts(SIMILARITY, 0.8)
    # C(0,1) = 1 x 2, C(0,2) = 2 x 1 (place 0 only), C(0,3) = 3 x 1, C(1,2) = 1 x 1, C(1,3) = 2 x 1, C(2,3) = 1 x 3
    assert counts.tolist() == [[0, 2, 2, 3], [0, 0, 1, 2], [0, 0, 0, 3], [0, 0, 0, 0]]


def test_static_windows_take_the_partition_of_the_largest_total_and_respect_the_longest_window():
    # dp(0) = 0; dp(1) = C(0,1) = 2; dp(2) = max(2, dp(0) + C(1,2) = 1, C(0,2) = 2) = 2 (frame 2 alone: the
    # first candidate to reach the maximum); dp(3) = max(2, dp(1) + C(2,3) = 5, dp(0) + C(1,3) = 2, C(0,3) = 3) = 5
    assert static_windows(SIMILARITY, 0.8, 1024) == ([(0, 1), (2, 3)], 5.0)
    assert static_windows(SIMILARITY, 0.8, 1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0.0)
    # tau 0.95: nothing stays static, every frame is its own window
    assert static_windows(SIMILARITY, 0.95, 1024) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0.0)
    # tau 0: every place stays, one window of all four frames: 3 x 3
    assert static_windows(SIMILARITY, 0.0, 1024) == ([(0, 3)], 9.0)
    # at most 3 frames: dp(2) = C(0,2) = 6; dp(3) = dp(2) = 6, tied by dp(1) + C(2,3) = 6 and C(1,3) = 6: the
    # lone frame, examined first, stays
    assert static_windows(SIMILARITY, 0.0, 3) == ([(0, 2), (3, 3)], 6.0)
    assert rescaled_ratio(0.1, 12, 6.0) == pytest.approx(0.2) and rescaled_ratio(0.6, 12, 6.0) == 1


# ---------------------------------------------------------------- static and dynamic tokens of a clip
E1, E2 = [1.0, 0.0], [0.0, 1.0]
# 2 frames of 1 x 4 places: places 1 and 2 repeat (cosine 1), place 0 turns 90 degrees (cosine 0),
# place 3 turns 60 degrees (cosine 0.5)
CLIP = torch.tensor([
    [E1, E1, E2, E1],
    [E2, E1, E2, unit(60)],
])
IMPORTANCE = torch.tensor([[0.5, 0.0, 0.0, 0.2], [0.1, 0.0, 0.0, 0.7]])


def test_static_places_merge_across_the_window_and_the_dynamic_ones_keep_the_most_attended_per_frame():
    method = HoliTom(retain_ratio=0.3)
    groups = method.reduce_video(CLIP, IMPORTANCE)
    # one window (0, 1), static places 1 and 2 (reduced: 1 x 2 of 8 tokens) -> r' = 0.3 / (6 / 8) = 0.4;
    # static: round(2 x 0.4) = 1 centre of the means m1 = E1, m2 = E2 (equal densities: the earlier is the
    # denser, so place 1 is the centre and place 2 joins it); dynamic: ceil(2 x 0.4) = 1 of places 0, 3
    # per frame, by attention: frame 0 place 0 (0.5), frame 1 place 3 (0.7)
    assert [[token.place for token in group] for group in groups] == [[1, 0, 7]]
    static = groups[0][0]
    value = (static.weights[:, None] * CLIP.flatten(0, 1)[static.sources]).sum(dim=0)
    order = torch.argsort(static.sources)
    assert static.sources[order].tolist() == [1, 2, 5, 6]  # places 1 and 2 of frames 0 and 1
    assert static.weights[order].tolist() == pytest.approx([0.3, 0.2, 0.3, 0.2])  # 0.6 / 2 and 0.4 / 2
    assert value.tolist() == pytest.approx([0.6, 0.4])  # 0.6 mean(E1, E1) + 0.4 mean(E2, E2)


def test_selection_keeps_images_whole_and_enters_static_tokens_first():
    visual = clip(2, 1, 4, image_tokens=2)
    context = selection_context(visual, torch.cat([torch.tensor([E1, E2]), CLIP.flatten(0, 1)]), 16)
    context.vision = [[{"importance": torch.zeros(2)}, {"importance": IMPORTANCE.flatten()}]]
    sample = HoliTom(retain_ratio=0.3).select(context).samples[0]
    assert sample.keep.tolist() == [0, 1, 2, 3, 9]  # the image, then video places 0, 1 (frame 0) and 7 (frame 1)
    assert sample.keep[sample.order].tolist() == [0, 1, 3, 2, 9]  # the window's static token before frame 0's
    merged = sample.combine @ context.hidden[0, visual.slots]
    torch.testing.assert_close(merged, torch.tensor([E1, E2, E1, [0.6, 0.4], unit(60)]))
    assert sample.changed_rows().tolist() == [3]


def test_neutral_parameters_keep_every_token_unchanged():
    visual = clip(2, 1, 4)
    context = selection_context(visual, CLIP.flatten(0, 1), 12)
    context.vision = [[{"importance": IMPORTANCE.flatten()}]]
    sample = HoliTom(retain_ratio=1.0, max_window_size=1).select(context).samples[0]
    assert sample.keep.tolist() == list(range(8)) and sample.combine is None and sample.order is None


# ---------------------------------------------------------------- DPC-kNN
POINTS = torch.tensor([0.0, 1.0, 3.0, 10.0, 11.0, 15.0])[:, None]


def test_dpc_knn_densities_distances_centres_and_assignments_by_hand():
    result = dpc_knn(POINTS, clusters=3, neighbours=7)  # k = min(7, 3) = 3 nearest, the point itself included
    # mean squared distance to the 3 nearest: 0 -> (0 + 1 + 9) / 3, 1 -> (0 + 1 + 4) / 3, 3 -> (0 + 4 + 9) / 3,
    # 10 -> (0 + 1 + 25) / 3, 11 -> (0 + 1 + 16) / 3, 15 -> (0 + 16 + 25) / 3
    expected_density = [math.exp(-v / 3) for v in (10, 5, 13, 26, 17, 41)]
    assert result.density.tolist() == pytest.approx(expected_density)
    # densest first: 1, 0, 3, 11, 10, 15; delta: the densest gets the largest distance (15), then the
    # distance to the nearest denser point
    assert result.delta.tolist() == pytest.approx([1, 15, 2, 1, 8, 4])
    # rho delta: 0.0357, 2.83, 0.0262, 0.00017, 0.0277, 4.6e-6 -> centres 1, 0, 11 (indices 0, 1, 4)
    assert result.centres.tolist() == [0, 1, 4]
    assert result.assignment.tolist() == [0, 1, 1, 2, 2, 2]  # 3 -> 1, 10 and 15 -> 11
    weights = cluster_weights(result, 0.6)
    torch.testing.assert_close(weights, torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0.6, 0.4, 0, 0, 0], [0, 0, 0, 0.2, 0.6, 0.2]]))
    assert (weights @ POINTS).flatten().tolist() == pytest.approx([0.0, 1.8, 11.6])
    # distances are scaled by sqrt(dim): the same points repeated along 4 dimensions cluster alike
    wide = dpc_knn(POINTS.repeat(1, 4), clusters=3, neighbours=7)
    assert wide.density.tolist() == pytest.approx(expected_density) and wide.centres.tolist() == [0, 1, 4]


def test_contextual_share_clusters_the_dynamic_tokens_not_kept_by_attention():
    # one frame of 6 tokens: ceil(6 x 0.5) = 3 kept, round(3 x (1 - 0.5)) = 2 dominant (tokens 0 and 5 by
    # attention), 1 DPC-kNN centre of the other four (k = 1: equal densities, the earlier wins: token 1)
    method = HoliTom(retain_ratio=0.5, contextual_share=0.5, beta=0.6)
    features = torch.cat([POINTS, torch.zeros(6, 1)], dim=1)
    dominant, contextual = method.reduce_frame(features, torch.tensor([0.9, 0, 0, 0, 0, 0.8]), 0.5)
    assert dominant.tolist() == [0, 5]
    (centre, sources, weights), = contextual
    assert centre == 1 and sources.tolist() == [1, 2, 3, 4] and weights.tolist() == pytest.approx([0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3])


# ---------------------------------------------------------------- the inner merge
def test_inner_merge_weights_follow_the_references_in_place_halving():
    # x_c <- (x_c + x_1) / 2, then <- (x_c + x_4) / 2: x_c / 4 + x_1 / 4 + x_4 / 2
    assert inner_merge_weights(0, [1, 4], 5).tolist() == [0.25, 0.25, 0.0, 0.0, 0.5]
    assert inner_merge_weights(2, [3], 5).tolist() == [0.0, 0.0, 0.5, 0.5, 0.0]


def test_inner_merge_keeps_the_most_attended_video_tokens_and_folds_the_rest_into_the_most_similar():
    visual = clip(1, 1, 5, image_tokens=1)  # an image token, then a video of 5 tokens (sample indices 1-5)
    hidden = torch.tensor([E2, E1, unit(10), E2, unit(80), unit(20)])
    context = selection_context(visual, hidden, 12)
    context.layer = 2
    context.last_row_attention = [torch.tensor([0.9, 0.5, 0.1, 0.4, 0.05, 0.2])]
    sample = HoliTom(merge_layer=2, merge_share=0.6).merge_inside(context).samples[0]
    # round(5 x 0.4) = 2 video tokens stay: the most attended, 1 (0.5) and 3 (0.4); 2 (10 degrees) and
    # 5 (20 degrees) join 1 (E1) in that order, 4 (80 degrees) joins 3 (E2); the image stays
    assert sample.keep.tolist() == [0, 1, 3]
    torch.testing.assert_close(sample.combine, torch.tensor([
        [1.0, 0, 0, 0, 0, 0], [0, 0.25, 0.25, 0, 0, 0.5], [0, 0, 0, 0.5, 0.5, 0],
    ]))
    assert HoliTom(merge_layer=2).natural_positions_at(2) == "keep" and HoliTom().natural_positions_at(0) == "reindex"
    assert HoliTom().sites == ("vision", "embeds") and HoliTom(merge_layer=2).sites == ("vision", "embeds", "layer")


# ---------------------------------------------------------------- tiny video models
def expected_keep_count(features: torch.Tensor, retain_ratio: float, tau: float) -> int:
    """The kept count written out again from the reference's rule, from one video's (T, N, D) embeddings."""
    features = features.float()
    frames, cells = features.shape[:2]
    similarity = torch.nn.functional.cosine_similarity(features[:-1], features[1:], dim=-1)
    windows, reduced = static_windows(similarity, tau, 1024)
    ratio = min(retain_ratio / ((frames * cells - reduced) / (frames * cells)), 1)
    count = 0
    for start, end in windows:
        static = int((similarity[start:end] > tau).all(dim=0).sum()) if end > start else 0
        count += round(static * ratio) + (end - start + 1) * math.ceil((cells - static) * ratio)
    return count


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_holitom_on_tiny_video_models_keeps_the_counts_the_rule_gives(family):
    tiny, batch = video_batch(family)
    frames, cells = FRAMES[family]
    embeddings = video_embeddings(family, tiny, batch)
    for params, tau in (("retain_ratio=0.3", 0.8), ("retain_ratio=0.1,tau=-1.0", -1.0)):
        with vlmkit.apply(tiny, f"holitom:{params}") as patch:
            generate(tiny, batch, max_new_tokens=2)
            kept = patch.selections["holitom"]
        ratio = 0.3 if tau == 0.8 else 0.1
        assert [k.numel() for k in kept] == [expected_keep_count(e, ratio, tau) for e in embeddings]
        if tau == -1.0:  # every place static: one window of all frames, r' = min(T r, 1) -> round(N r') tokens
            assert [k.numel() for k in kept] == [round(cells * min(frames * 0.1, 1))] * len(kept)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_holitom_inner_merge_on_tiny_video_models_keeps_half_of_what_enters_layer_k(family):
    tiny, batch = video_batch(family)
    with vlmkit.apply(tiny, "holitom:retain_ratio=0.3,merge_layer=2,merge_share=0.5") as patch:
        generate(tiny, batch, max_new_tokens=2)
        stages = patch.stage_selections["holitom"]
    assert sorted(stages) == [0, 2]
    assert [k.numel() for k in stages[2]] == [round(k.numel() * 0.5) for k in stages[0]]
    assert all(bool(torch.isin(inner, outer).all()) for inner, outer in zip(stages[2], stages[0]))


# ---------------------------------------------------------------- errors
def test_bad_parameters_name_the_valid_range():
    for name, value, allowed in (("retain_ratio", 0.0, r"\(0, 1\]"), ("retain_ratio", 1.5, r"\(0, 1\]"),
                                 ("tau", 1.2, r"\[-1, 1\]"), ("beta", -0.1, r"\[0, 1\]"),
                                 ("contextual_share", "0.5", r"\[0, 1\]")):
        with pytest.raises(ConfigError, match=rf"holitom: {name}={value!r} is out of range: it must be a number in {allowed}"):
            HoliTom(**{name: value})
    for name in ("neighbours", "max_window_size"):
        for value in (0, 2.0, True):
            with pytest.raises(ConfigError, match=rf"holitom: {name}={value!r} is out of range: it must be an integer >= 1"):
                HoliTom(**{name: value})
    with pytest.raises(ConfigError, match="positions='middle' is not one of auto, keep, reindex"):
        HoliTom(positions="middle")
    with pytest.raises(ConfigError, match=r"holitom: merge_share=1.0 is out of range: it must be a number in \[0, 1\)"):
        HoliTom(merge_share=1.0)
    with pytest.raises(ConfigError, match=r"holitom: merge_layer=0 is out of range: it must be an integer >= 1"):
        HoliTom(merge_layer=0)
    from tests.engine.models import model

    with pytest.raises(ConfigError, match=r"merge_layer=4 is out of range for a language model with 4 decoder layers \(valid: 1..3\)"):
        vlmkit.apply(model("llava_onevision")[0], "holitom:merge_layer=4")


def test_families_without_video_are_refused_by_name():
    from tests.engine.models import model

    for family in ("llava", "llava_next"):
        with pytest.raises(UnsupportedModelError, match=rf"holitom does not support {family}: the family has no video input"):
            vlmkit.apply(model(family)[0], "holitom")
