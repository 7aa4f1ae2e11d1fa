"""FastVID against the reference's rules (LunarShen/FastVID, `modeling_qwen2.py`): DySeg's cuts for given
frame similarities, the anchor budgets of segments, the density-peak scores of hand-placed tokens, the
salient and density-peak tokens a frame keeps, the DTM weights of an anchor (one frame, and a segment
whose anchors gather every frame's rest); then kept counts on the tiny video families, images untouched,
and errors that name the valid range."""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.conftest import noise_video, photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError, UnsupportedModelError
from vlmkit.methods.video.fastvid import (
    FastVID,
    anchor_budgets,
    anchor_weights,
    density_scores,
    merge_rows,
    segment_sizes,
)


# ---------------------------------------------------------------- DySeg and the anchor budgets
def test_dyseg_cuts_at_the_c_minus_1_lowest_similarities_and_wherever_below_tau():
    similarity = torch.tensor([0.95, 0.5, 0.92, 0.97, 0.91, 0.99])  # 7 frames, gaps 0..5
    # c = 3: the 2 lowest are gaps 1 (0.5) and 4 (0.91); below 0.9 only gap 1 -> cuts after frames 1 and 4
    assert segment_sizes(similarity, 3, 0.9) == [2, 3, 2]
    # tau = 0.93 adds gap 2 (0.92)
    assert segment_sizes(similarity, 3, 0.93) == [2, 1, 2, 2]
    # c = 1: no top-k cut, tau alone; tau = -1 and c = 1: one segment
    assert segment_sizes(similarity, 1, 0.9) == [2, 5]
    assert segment_sizes(similarity, 1, -1.0) == [7]
    # c - 1 beyond the 6 gaps cuts everywhere; a tie between the lowest goes to the earlier gap
    assert segment_sizes(similarity, 20, -1.0) == [1] * 7
    assert segment_sizes(torch.tensor([0.8, 0.8, 0.95]), 2, 0.0) == [1, 3]


def test_anchor_budgets_put_a_segments_context_on_every_pth_frame_from_its_last():
    # C = 3, p = 4: one frame: 3; five frames: 15 // ceil(5 / 4) = 7 on frames 4 and 0 of the segment; two: 6 on the last
    assert anchor_budgets([1, 5, 2], 3, 4) == [3, 7, 0, 0, 0, 7, 0, 6]
    # p = 1: every frame its own C; p = 2 on four frames: 12 // 2 = 6 on frames 3 and 1
    assert anchor_budgets([5], 3, 1) == [3] * 5
    assert anchor_budgets([4], 3, 2) == [0, 6, 0, 6]


# ---------------------------------------------------------------- density peaks, by hand
def test_density_score_is_density_of_the_4_nearest_times_distance_to_a_denser_token():
    # 1-D tokens (D = 1, so dist = |x_i - x_j|) at 0, 0.1, 0.2, 1.0, 1.1; the 4 nearest include the token itself:
    # mean squared: 0: (0 + .01 + .04 + 1) / 4 = .2625; 0.1: (0 + .01 + .01 + .81) / 4 = .2075;
    # 0.2: (0 + .01 + .04 + .64) / 4 = .1725 (the densest); 1.0: (0 + .01 + .64 + .81) / 4 = .365; 1.1: .455
    # delta: 0.2 -> the largest distance 1.1; 0.1, 0 -> 0.1; 1.0 -> 0.8 (to 0.2); 1.1 -> 0.1 (to 1.0)
    x = torch.tensor([[0.0], [0.1], [0.2], [1.0], [1.1]])
    expected = torch.tensor([0.1 * math.exp(-0.2625), 0.1 * math.exp(-0.2075), 1.1 * math.exp(-0.1725),
                             0.8 * math.exp(-0.365), 0.1 * math.exp(-0.455)])
    assert torch.allclose(density_scores(x), expected, atol=1e-6)
    # the two peaks are the centres of the two clusters
    assert torch.topk(density_scores(x), 2).indices.sort().values.tolist() == [2, 3]
    # D = 4 scales distances by 1 / sqrt(4); fewer than 4 tokens: all of them are the nearest
    pair = torch.tensor([[0.0, 0, 0, 0], [2.0, 0, 0, 0]])  # distance 2 / 2 = 1, both densities exp(-(0 + 1) / 2)
    assert torch.allclose(density_scores(pair), torch.full((2,), math.exp(-0.5)))


# A frame of 8 tokens: salient scores pick 1, 4, 6; the other five lie on the line (x, 1), x = 0, 0.1, 0.2, 1, 1.1
LINE = {0: [0.0, 1.0], 2: [0.1, 1.0], 3: [0.2, 1.0], 5: [1.0, 1.0], 7: [1.1, 1.0]}
OTHERS = {1: [-1.0, 0.0], 4: [0.0, -1.0], 6: [2.0, -1.0]}
FRAME = torch.tensor([{**LINE, **OTHERS}[i] for i in range(8)])
SCORES = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8, 0.0, 0.7, 0.4])


def test_a_frame_keeps_its_most_salient_tokens_and_the_density_peaks_of_the_rest():
    # retention 0.625 of 8: R = 5, S = 5 - int(5 * 0.4) = 3 salient (1, 4, 6), C = 2 context: the rest's
    # density peaks are x = 0.2 (token 3) and x = 1.0 (token 5), as in the 1-D case (distances / sqrt(2))
    method = FastVID(retention=0.625)
    kept, anchors, rows = method.select_video(FRAME[None], SCORES[None])
    assert kept.tolist() == [1, 3, 4, 5, 6]
    assert anchors.tolist() == [3, 5]  # by decreasing density score
    # DTM: (0, 1) and (0.1, 1) join (0.2, 1) (cosine 0.98 vs 0.71), (1.1, 1) joins (1, 1) (0.999 vs 0.80);
    # |J| counts the anchor itself: 3 and 2, so w = max(1/4, 0.6) = max(1/3, 0.6) = 0.6
    third = 0.4 / 3
    assert torch.allclose(rows[0], torch.tensor([third, 0, third, 0.6 + third, 0, 0, 0, 0]))
    assert torch.allclose(rows[1], torch.tensor([0, 0, 0, 0, 0, 0.8, 0, 0.2]))


def test_dtm_weight_of_one_anchor_is_clamped_by_beta():
    assert torch.allclose(anchor_weights(torch.tensor([0, 1, 3]), 0.6), torch.tensor([1.0, 0.6, 0.6]))
    assert torch.allclose(anchor_weights(torch.tensor([0, 1, 3]), 0.2), torch.tensor([1.0, 0.5, 0.25]))
    # one anchor (token 0) and three joiners besides itself, beta = 0.2: w = max(1/5, 0.2) = 0.2, each of J 0.8 / 4
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [0.0, 1.0]])
    row = merge_rows(torch.tensor([0]), torch.tensor([0, 1, 2, 3]), features, 0.2, 5)
    assert torch.allclose(row, torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.0]]))
    # beta = 1: the anchor stays as it is
    assert torch.equal(merge_rows(torch.tensor([0]), torch.tensor([0, 1, 2, 3]), features, 1.0, 5), torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_a_segment_anchors_on_its_last_frame_and_merges_the_rest_of_every_frame():
    # two identical frames, one segment (c = 1, tau = -1), p = 4: frame 1 anchors C L = 4 tokens (frame 0 none):
    # by density x = 0.2, 1.0, 0.1, 0 -> tokens 3, 5, 2, 0 of frame 1 (flat 11, 13, 10, 8); the pool is the
    # rest of both frames: each anchor gets its twin in frame 0 and itself, (1, 1) also both x = 1.1 tokens
    method = FastVID(retention=0.625, segments=1, cut_similarity=-1.0, anchor_weight=0.0)
    kept, anchors, rows = method.select_video(torch.stack([FRAME, FRAME]), torch.stack([SCORES, SCORES]))
    assert kept.tolist() == [1, 4, 6, 8, 9, 10, 11, 12, 13, 14]
    assert anchors.tolist() == [11, 13, 10, 8]
    # anchor x = 1 (flat 13): |J| = 4, w = 1/5: itself 0.2 + 0.8 / 4, and 0.2 on tokens 5, 7, 15
    expected = torch.zeros(16)
    expected[[5, 7, 15]] = 0.2
    expected[13] = 0.4
    assert torch.allclose(rows[1], expected)
    # anchor x = 0.2 (flat 11): |J| = 2 (itself, token 3), w = 1/3
    expected = torch.zeros(16)
    expected[3], expected[11] = 1 / 3, 2 / 3
    assert torch.allclose(rows[0], expected)


def test_select_reduces_videos_and_leaves_images_untouched():
    # image 0 (3 tokens in a row), then a video of 2 frames of 2 x 4 tokens: FRAME twice
    frames, rows_, cols, image = 2, 2, 4, 3
    n = image + frames * rows_ * cols
    index = torch.arange(frames * rows_ * cols)
    visual = VisualTokens(
        slots=torch.arange(n) + 2, origin=torch.arange(n),
        image=torch.cat([torch.zeros(image, dtype=torch.long), torch.ones(16, dtype=torch.long)]),
        frame=torch.cat([torch.zeros(image, dtype=torch.long), index // 8]),
        row=torch.cat([torch.zeros(image, dtype=torch.long), index % 8 // cols]),
        col=torch.cat([torch.arange(image), index % cols]),
        crop=torch.zeros(n, dtype=torch.long), grids=[(1, 1, image), (frames, rows_, cols)], modality=["image", "video"],
    )
    hidden = torch.zeros(1, n + 4, 2)
    hidden[0, visual.slots] = torch.cat([torch.tensor([[3.0, 1.0], [2.0, 2.0], [0.0, 3.0]]), FRAME, FRAME])
    vision = [[{"importance": torch.tensor([0.1, 0.2, 0.3])}, {"importance": torch.cat([SCORES, SCORES])}]]
    context = SelectionContext(hidden=hidden, visual=[visual], layer=0, num_layers=4, vision=vision)
    sample = FastVID(retention=0.625).select(context).samples[0]
    # identical frames: cosine 1 > tau, but c - 1 = 7 cuts the one gap: each frame keeps [1, 3, 4, 5, 6]
    assert sample.keep.tolist() == [0, 1, 2] + [image + t * 8 + i for t in range(2) for i in (1, 3, 4, 5, 6)]
    assert sample.combine.shape == (13, n) and sample.combine_space == "llm" and sample.order is None
    assert torch.equal(sample.combine[:3, :3], torch.eye(3)) and not sample.combine[:3, 3:].any()
    assert sample.changed_rows().tolist() == [4, 6, 9, 11]  # the anchors 3 and 5 of each frame
    third = 0.4 / 3
    assert torch.allclose(sample.combine[4, image:image + 8], torch.tensor([third, 0, third, 0.6 + third, 0, 0, 0, 0]))


# ---------------------------------------------------------------- tiny video models
VIDEO_FAMILIES = ["llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl"]
FRAMES = {"llava_onevision": (4, 16), "llava_next_video": (4, 16), "qwen2_vl": (2, 64), "qwen2_5_vl": (2, 64)}


def budget(frames: int, cells: int, retention: float, one_segment: bool) -> tuple[int, bool]:
    """(kept tokens per video, whether the last frame's anchor budget exceeds its rest tokens)."""
    retained = max(1, int(cells * retention))
    salient = retained - int(retained * 0.4)
    context = retained - salient
    if not one_segment:  # c = 8 cuts every gap of these short clips: each frame its own segment
        return frames * retained, False
    # one segment with p = 4 >= T: its last frame anchors C T tokens, at most its N - S rest tokens
    return frames * salient + min(context * frames, cells - salient), context * frames > cells - salient


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_fastvid_on_tiny_video_models_keeps_the_counts_of_the_rule(family):
    tiny, processor = model(family)
    batch = inputs(processor, [noise_video(4, seed=seed + 1) for seed in range(2)], QUESTIONS[:2], modality="video")
    frames, cells = FRAMES[family]
    for spec, retention, one_segment in (("fastvid", 0.1, False), ("fastvid:retention=0.5", 0.5, False),
                                         ("fastvid:retention=0.5,segments=1,cut_similarity=-1", 0.5, True)):
        count, capped = budget(frames, cells, retention, one_segment)
        with vlmkit.apply(tiny, spec) as patch:
            if capped:
                with pytest.warns(UserWarning, match="anchors 12 context tokens but has 11 left"):
                    generate(tiny, batch, max_new_tokens=2)
            else:
                generate(tiny, batch, max_new_tokens=2)
            kept = patch.selections["fastvid"]
        assert [k.numel() for k in kept] == [count, count], spec
    # LLaVA-OneVision: 4 x 16 -> 4 (1 a frame), 32, 5 * 4 + 11 = 31; Qwen2-VL: 2 x 64 -> 12, 64, 20 * 2 + 24 = 64


def test_fastvid_leaves_image_prompts_unchanged():
    tiny, processor = model("llava_onevision")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        logits = tiny(**batch).logits
    with vlmkit.apply(tiny, "fastvid:retention=0.5"), torch.no_grad():
        assert torch.equal(tiny(**batch).logits, logits)


# ---------------------------------------------------------------- errors
def test_bad_parameters_name_the_valid_range():
    for value in (0.0, 1.5, "0.5", True):
        with pytest.raises(ConfigError, match=r"retention=.* is out of range: .* must be a number in \(0, 1\]"):
            FastVID(retention=value)
    for name in ("context_share", "anchor_weight"):
        with pytest.raises(ConfigError, match=rf"{name}=-0.1 is out of range: .* must be a number in \[0, 1\]"):
            FastVID(**{name: -0.1})
    with pytest.raises(ConfigError, match=r"cut_similarity=1.5 is out of range: .* must be a number in \[-1, 1\]"):
        FastVID(cut_similarity=1.5)
    for name in ("segments", "anchor_stride"):
        with pytest.raises(ConfigError, match=rf"{name}=0 is out of range: .* must be an integer >= 1"):
            FastVID(**{name: 0})
    with pytest.raises(ConfigError, match="positions='middle' is not one of auto, keep, reindex"):
        FastVID(positions="middle")


def test_families_without_video_are_refused_by_name():
    for family in ("llava", "llava_next"):
        with pytest.raises(UnsupportedModelError, match=rf"fastvid does not support {family}: the family has no video input"):
            vlmkit.apply(model(family)[0], "fastvid")
