"""The video methods against their references' rules: EVS (vLLM's `compute_retention_mask`) on a
hand-made 3-frame 2 x 2 clip; DyCoke's temporal token merging (both passes) on a hand-made 4-frame clip;
DyCoke's decoding selection and its re-selection threshold on hand-made attention rows and caches; then,
on the tiny video families, the kept tokens computed here from the model's own LLM-input embeddings and
eager attention; images untouched; errors that name the valid range."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import noise_video, photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.adapters import adapter_for
from vlmkit.engine.contexts import AttentionContext, CacheContext
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError, UnsupportedModelError
from vlmkit.methods.video.dycoke import DyCoke, cache_keep, reselects, ttm
from vlmkit.methods.video.evs import EVS, retained_count, retention_mask

VIDEO_FAMILIES = ["llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl"]
FRAMES = {"llava_onevision": (4, 16), "llava_next_video": (4, 16), "qwen2_vl": (2, 64), "qwen2_5_vl": (2, 64)}  # LLM frames x tokens


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def clip(frames: int, rows: int, cols: int, image_tokens: int = 0, first_slot: int = 3) -> VisualTokens:
    """A sample with an optional image (image 0, one row of `image_tokens`) and then a video of
    `frames` frames of rows x cols tokens, frame by frame in row-major order."""
    per_frame = rows * cols
    n = image_tokens + frames * per_frame
    index = torch.arange(frames * per_frame)
    has_image = image_tokens > 0
    return VisualTokens(
        slots=torch.arange(n) + first_slot, origin=torch.arange(n),
        image=torch.cat([torch.zeros(image_tokens, dtype=torch.long), torch.full((frames * per_frame,), int(has_image))]),
        frame=torch.cat([torch.zeros(image_tokens, dtype=torch.long), index // per_frame]),
        row=torch.cat([torch.zeros(image_tokens, dtype=torch.long), index % per_frame // cols]),
        col=torch.cat([torch.arange(image_tokens), index % cols]),
        crop=torch.zeros(n, dtype=torch.long),
        grids=([(1, 1, image_tokens)] if has_image else []) + [(frames, rows, cols)],
        modality=(["image"] if has_image else []) + ["video"],
    )


def selection_context(visual: VisualTokens, features: torch.Tensor, length: int) -> SelectionContext:
    hidden = torch.zeros(1, length, features.shape[-1])
    hidden[0, visual.slots] = features
    return SelectionContext(hidden=hidden, visual=[visual], layer=0, num_layers=4)


# ---------------------------------------------------------------- EVS on a hand-made clip
# 3 frames of 2 x 2 tokens (flat index 4 t + cell), 2-D embeddings.
E1, E2, DIAG, BACK, DOWN = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]
EVS_CLIP = torch.tensor([
    [E1, E1, E1, E1],           # frame 0: kept whole (score 255)
    [E1, E2, DIAG, BACK],       # vs frame 0: 1 - cos = 0, 1, 1 - 1/sqrt(2), 2
    [DIAG, E2, DIAG, DOWN],     # vs frame 1: 1 - 1/sqrt(2), 0, 0, 1
])


def test_evs_keeps_the_first_frame_and_the_most_changed_tokens_by_a_stable_descending_sort():
    # scores by flat index: 0-3: 255; 4: 0, 5: 1, 6: 0.293, 7: 2; 8: 0.293, 9: 0, 10: 0, 11: 1
    # q = 0.3: max(4, int(12 * 0.7) = int(8.4) = 8) = 8 -> the first frame, 7 (2), 5 and 11 (1: a tie,
    # both kept), then 6 before 8 (the same pair of vectors, a tie to the earlier index)
    assert retained_count(4, 3, 0.3) == 8
    assert torch.nonzero(retention_mask(EVS_CLIP, 0.3).flatten()).flatten().tolist() == [0, 1, 2, 3, 5, 6, 7, 11]
    # q = 0.5: 6 tokens -> 7, then the tie 5 / 11 goes to 5
    assert torch.nonzero(retention_mask(EVS_CLIP, 0.5).flatten()).flatten().tolist() == [0, 1, 2, 3, 5, 7]
    # q = 0.9: int(1.2) = 1 < N -> the first frame alone; q = 0 keeps everything
    assert torch.nonzero(retention_mask(EVS_CLIP, 0.9).flatten()).flatten().tolist() == [0, 1, 2, 3]
    assert bool(retention_mask(EVS_CLIP, 0.0).all())


def test_evs_prunes_each_video_and_leaves_images_untouched():
    visual = clip(3, 2, 2, image_tokens=3)
    features = torch.cat([torch.tensor([[5.0, 1.0], [2.0, 2.0], [0.0, 3.0]]), EVS_CLIP.view(12, 2)])
    selection = EVS(pruning_rate=0.3).select(selection_context(visual, features, 20))
    sample = selection.samples[0]
    assert sample.keep.tolist() == [0, 1, 2] + [3 + i for i in (0, 1, 2, 3, 5, 6, 7, 11)]
    assert sample.order is None and sample.combine is None  # kept tokens enter in sequence order


# ---------------------------------------------------------------- DyCoke TTM on a hand-made clip
# 4 frames of 2 x 2 tokens, unit vectors at the given angles; K = 0.5 keeps int(0.5 * 4) = 2 per reduced frame.
ANGLES = [
    [0, 0, 0, 0],
    [10, 80, 40, 170],   # pass 1 vs frame 0: cos 0.98, 0.17, 0.77, -0.98 -> lowest: cell 3, cell 1
    [60, 20, 120, 90],   # pass 2 vs frame 0: cos 0.5, 0.94, -0.5, 0 -> lowest: cell 2, cell 3
    [65, 120, 150, 180],  # pass 1 vs frame 2: cos 0.996, -0.17, 0.87, 0 -> lowest: cell 1, cell 3
]
TTM_CLIP = torch.tensor([[unit(a) for a in frame] for frame in ANGLES])


def test_dycoke_ttm_keeps_pair_leaders_whole_and_the_least_similar_share_of_the_others_in_both_passes():
    kept = ttm(TTM_CLIP, 0.5)
    # frame 0 whole; frames 1 and 3 from pass 1 (pairs (0, 1), (2, 3)); frame 2 from pass 2 ((0, 2), on the
    # original embeddings: the reference's range(0, T - 4, 4) would skip a 4-frame clip's only group)
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3], [3, 1], [2, 3], [1, 3]]
    # K = 0.7: int(0.3 * 4) = int(1.2) = 1 token per reduced frame; K = 0: every frame whole
    assert [k.tolist() for k in ttm(TTM_CLIP, 0.7)] == [[0, 1, 2, 3], [3], [2], [1]]
    assert all(k.tolist() == [0, 1, 2, 3] for k in ttm(TTM_CLIP, 0.0))
    # three frames: (0, 1) in pass 1, (0, 2) in pass 2; one frame: whole
    assert [k.tolist() for k in ttm(TTM_CLIP[:3], 0.5)] == [[0, 1, 2, 3], [3, 1], [2, 3]]
    assert [k.tolist() for k in ttm(TTM_CLIP[:1], 0.5)] == [[0, 1, 2, 3]]


def test_dycoke_ttm_selection_enters_reduced_frames_by_increasing_similarity():
    visual = clip(4, 2, 2, image_tokens=2)
    features = torch.cat([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), TTM_CLIP.view(16, 2)])
    sample = DyCoke(ttm_drop=0.5).select(selection_context(visual, features, 24)).samples[0]
    video = lambda *cells: [2 + c for c in cells]  # the image holds the first two tokens
    assert sample.keep.tolist() == [0, 1] + video(0, 1, 2, 3, 5, 7, 10, 11, 13, 15)
    # frame 1 enters as cell 3 then cell 1 (the reference's topk order); the rest in sequence order
    assert sample.keep[sample.order].tolist() == [0, 1] + video(0, 1, 2, 3, 7, 5, 10, 11, 13, 15)


# ---------------------------------------------------------------- DyCoke decoding, hand-made
A = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])
NEAR = torch.tensor([0.10, 0.35, 0.05, 0.35, 0.15])   # cos with A = 0.28 / sqrt(0.285 * 0.28) = 0.991
FAR = torch.tensor([0.40, 0.05, 0.30, 0.10, 0.15])    # cos with A = 0.1275 / 0.285 = 0.447


def test_dycoke_cache_selection_keeps_the_most_attended_share_and_reselects_below_the_threshold():
    assert cache_keep(A, 0.5).tolist() == [1, 3]          # int(5 * 0.5) = 2: 0.40 and 0.30
    assert cache_keep(A, 0.7).tolist() == [1]             # int(5 * 0.3) = int(1.5) = 1
    assert cache_keep(A, 0.0).tolist() == [0, 1, 2, 3, 4]
    assert cache_keep(torch.tensor([0.2, 0.3, 0.3, 0.2]), 0.5).tolist() == [1, 2]  # ties: the earlier
    assert reselects(A, None, 0.9)                        # the first step always selects
    assert not reselects(NEAR, A, 0.9) and reselects(NEAR, A, 0.995)
    assert reselects(FAR, A, 0.9) and not reselects(FAR, A, 0.4)


# one prompt: text at slots 0-2, a 5-token video at 3-7, text at 8 (9 tokens); 4 decoder layers
PROMPT = 9


def video_visual() -> VisualTokens:
    index = torch.arange(5)
    zeros = torch.zeros(5, dtype=torch.long)
    return VisualTokens(slots=index + 3, origin=index, image=zeros, frame=zeros.clone(), row=zeros.clone(), col=index,
                        crop=zeros.clone(), grids=[(1, 1, 5)], modality=["video"])


def decode_context(visual: list[VisualTokens], rows: list[torch.Tensor], length: int) -> CacheContext:
    """A cache of `length` slots (prompt plus generated) in every layer; `rows`: each row's attention of
    the call's last token to the video slots 3-7 (the rest gets what is left)."""
    attention = torch.zeros(len(rows), length)
    for row, video in enumerate(rows):
        attention[row] = (1 - video.sum()) / (length - 5)
        attention[row, 3:8] = video
    slots = torch.arange(length).expand(len(rows), length)
    valid = torch.ones(len(rows), length, dtype=torch.bool)
    return CacheContext(keys=[torch.zeros(len(rows), 1, length, 2)] * 4, valid=[valid] * 4, slots=[slots] * 4,
                        visual=visual, prefill=length == PROMPT, logical_length=length, attention=[attention] * 4)


def hidden_keys(method: DyCoke, visual: list[VisualTokens], query_slots: list[int], layer: int = 2) -> list[list[list[int]]]:
    """Per row, for each query slot, the key slots the mask hides at `layer`."""
    rows = len(visual)
    keys = torch.arange(max(query_slots) + 1).expand(rows, -1)
    mask = method.mask_function(AttentionContext(layer, keys, torch.tensor([query_slots] * rows), visual))
    if mask is None:
        return [[[] for _ in query_slots] for _ in range(rows)]
    b, q, kv = torch.meshgrid(torch.arange(rows), torch.arange(len(query_slots)), keys[0], indexing="ij")
    allowed = mask(b, None, q, kv)
    return [[torch.nonzero(~allowed[row, i]).flatten().tolist() for i in range(len(query_slots))] for row in range(rows)]


def test_dycoke_decoding_hides_the_unselected_video_tokens_from_later_layers_until_attention_moves():
    method = DyCoke(kv_drop=0.5, kv_layer=2)
    method.select(SelectionContext(hidden=torch.zeros(1, PROMPT, 2), visual=[video_visual()], layer=0, num_layers=4))
    visual = [video_visual()]
    # prefill: the last prompt token's attention at layer 1 -> keep video slots 4 and 6 (A's 0.40, 0.30)
    assert method.edit_cache(decode_context(visual, [A], PROMPT)) is None  # nothing leaves the cache
    assert hidden_keys(method, visual, [PROMPT]) == [[[3, 5, 7]]]
    assert hidden_keys(method, visual, [PROMPT], layer=1) == [[[]]]   # layers < kv_layer see everything
    # step 1: cos(NEAR, A) = 0.991 >= 0.9 -> the selection stays (NEAR alone would keep 4 and 6 too)
    method.edit_cache(decode_context(visual, [NEAR], PROMPT + 1))
    # step 2: cos(FAR, NEAR) < 0.9 -> re-selected from FAR: slots 3 (0.40) and 5 (0.30); 4 and 6 come back
    method.edit_cache(decode_context(visual, [FAR], PROMPT + 2))
    assert [(start, kept.tolist()) for start, kept in method.kv_selections()[0]] == [(9, [4, 6]), (11, [3, 5])]
    assert hidden_keys(method, visual, [PROMPT + 2]) == [[[4, 6, 7]]]
    # a recomputation (new visual objects, as under reuse_selections()): each query under the selection
    # in force at its slot; prompt queries see everything
    assert hidden_keys(method, [video_visual()], [2, 8, 9, 10, 11]) == [[[], [], [3, 5, 7], [3, 5, 7], [4, 6, 7]]]
    # a new prefill forgets it all
    method.select(SelectionContext(hidden=torch.zeros(1, PROMPT, 2), visual=visual, layer=0, num_layers=4))
    assert method.mask_function(AttentionContext(2, torch.arange(10)[None], torch.tensor([[9]]), visual)) is None


def test_dycoke_decoding_beams_of_a_sample_share_one_selection_from_their_mean_attention():
    method = DyCoke(kv_drop=0.6, kv_layer=2)
    method.select(SelectionContext(hidden=torch.zeros(2, PROMPT, 2), visual=[video_visual()] * 2, layer=0, num_layers=4))
    beams = [video_visual()] * 2  # both rows continue the same prefill row
    method.edit_cache(decode_context(beams, [A, FAR], PROMPT))
    # mean = (0.25, 0.225, 0.175, 0.2, 0.15) -> int(5 * 0.4) = 2 kept: slots 3 and 4
    assert [kept.tolist() for _, kept in method.kv_selections()[0]] == [[3, 4]]
    assert hidden_keys(method, beams, [PROMPT]) == [[[5, 6, 7]], [[5, 6, 7]]]


# ---------------------------------------------------------------- tiny video models
def video_batch(family: str, count: int = 2):
    tiny, processor = model(family)
    batch = inputs(processor, [noise_video(4, seed=seed + 1) for seed in range(count)], QUESTIONS[:count], modality="video")
    return tiny, batch


def video_embeddings(family: str, tiny, batch) -> list[torch.Tensor]:
    """Per sample, the (T, N, D) LLM-input embeddings of its video, as the unpatched model feeds its LLM."""
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    handle = adapter_for(tiny).text_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny(**batch)
    finally:
        handle.remove()
    frames, cells = FRAMES[family]
    embeds = seen["embeds"]
    placeholders = batch["input_ids"] == tiny.config.video_token_id
    # the first T * N placeholders are the frames (LLaVA-OneVision adds one newline after them)
    return [embeds[row, torch.nonzero(placeholders[row]).flatten()[: frames * cells]].view(frames, cells, -1)
            for row in range(len(embeds))]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_evs_on_tiny_video_models_keeps_what_the_rule_gives_on_the_models_own_embeddings(family):
    tiny, batch = video_batch(family)
    frames, cells = FRAMES[family]
    expected = []
    for features in video_embeddings(family, tiny, batch):  # EVS written out again, here
        features = features.float()
        score = torch.cat([torch.full((1, cells), 255.0), 1 - F.cosine_similarity(features[1:], features[:-1], dim=-1)])
        count = max(cells, int(frames * cells * 0.5))
        expected.append(torch.sort(torch.argsort(score.flatten(), descending=True, stable=True)[:count]).values)
    with vlmkit.apply(tiny, "evs:pruning_rate=0.5") as patch:
        generate(tiny, batch, max_new_tokens=2)
        kept = patch.selections["evs"]
    assert [k.tolist() for k in kept] == [e.tolist() for e in expected]
    assert all(k.numel() == max(cells, frames * cells // 2) and k[:cells].tolist() == list(range(cells)) for k in kept)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_dycoke_ttm_on_tiny_video_models_keeps_what_the_rule_gives_on_the_models_own_embeddings(family):
    tiny, batch = video_batch(family)
    frames, cells = FRAMES[family]
    count = int(0.3 * cells)
    expected = []
    for features in video_embeddings(family, tiny, batch):
        features = features.float()
        similarity = lambda a, b: F.cosine_similarity(features[a], features[b], dim=-1)  # noqa: B023
        kept = [torch.arange(cells)] * frames
        for first in range(0, frames - 1, 2):  # pairs (0, 1), (2, 3), ...
            kept[first + 1] = torch.argsort(similarity(first, first + 1), stable=True)[:count]
        for first in range(0, frames - 2, 4):  # then (0, 2), (4, 6), ...
            kept[first + 2] = torch.argsort(similarity(first, first + 2), stable=True)[:count]
        expected.append(sorted(t * cells + c for t, cells_kept in enumerate(kept) for c in cells_kept.tolist()))
    with vlmkit.apply(tiny, "dycoke:kv_drop=0") as patch:
        generate(tiny, batch, max_new_tokens=2)
        kept = patch.selections["dycoke"]
    assert [k.tolist() for k in kept] == expected
    assert all(k.numel() == cells + (frames - 1) * count for k in kept)  # 28 of 64; Qwen2-VL: 83 of 128


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_dycoke_first_decoding_selection_is_the_top_share_of_the_eager_attention_at_layer_l_minus_1(family):
    tiny, processor = model(family, "eager")
    batch = inputs(processor, [noise_video(4, seed=1), noise_video(4, seed=2)], QUESTIONS[:2], modality="video")
    with torch.no_grad():
        attentions = tiny(**batch, output_attentions=True).attentions
    method = DyCoke(ttm_drop=0.0, kv_drop=0.7, kv_layer=2)  # no TTM: the prefill is the model's own
    with vlmkit.apply(tiny, method):
        generate(tiny, batch, max_new_tokens=4)
    frames, cells = FRAMES[family]
    for row in range(2):
        video = torch.nonzero(batch["input_ids"][row] == tiny.config.video_token_id).flatten()[: frames * cells]
        row_attention = attentions[1][row, :, -1].mean(dim=0)[video]
        count = int(video.numel() * 0.3)
        expected = torch.sort(video[torch.argsort(row_attention, descending=True, stable=True)[:count]]).values
        start, kept = method.kv_selections()[row][0]
        assert start == batch["input_ids"].shape[1] and kept.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["evs:pruning_rate=0.5", "dycoke:kv_layer=1,kv_drop=0.9"])
def test_video_methods_leave_image_prompts_unchanged(name):
    tiny, processor = model("llava_onevision")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        logits = tiny(**batch).logits
    tokens = generate(tiny, batch)
    with vlmkit.apply(tiny, name), torch.no_grad():
        assert torch.equal(tiny(**batch).logits, logits)
        assert torch.equal(generate(tiny, batch), tokens)


def test_dycoke_decoding_changes_later_steps_only_and_kv_drop_zero_frees_the_decoding_sites():
    tiny, batch = video_batch("llava_onevision")
    scores = {}
    for drop in (0.0, 0.9):
        with vlmkit.apply(tiny, f"dycoke:kv_layer=1,kv_drop={drop}"), torch.no_grad():
            out = tiny.generate(**batch, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
            scores[drop] = out.scores
    assert torch.equal(scores[0.0][0], scores[0.9][0])      # the prefill's token: TTM only
    assert not torch.equal(scores[0.0][1], scores[0.9][1])  # the first decoding step attends to the kept 10 %
    assert DyCoke(kv_drop=0.0).sites == ("embeds",) and DyCoke().sites == ("embeds", "attention", "cache")


# ---------------------------------------------------------------- errors
def test_bad_parameters_name_the_valid_range():
    for value in (1.0, -0.1, "0.5", True):
        with pytest.raises(ConfigError, match=r"pruning_rate=.* must be in \[0, 1\)"):
            EVS(pruning_rate=value)
    for name in ("ttm_drop", "kv_drop", "kv_threshold"):
        with pytest.raises(ConfigError, match=rf"{name}=1.5 is out of range: .* must be a number in \[0, 1\]"):
            DyCoke(**{name: 1.5})
    with pytest.raises(ConfigError, match=r"kv_layer=0 must be an integer >= 1"):
        DyCoke(kv_layer=0)
    with pytest.raises(ConfigError, match="positions='middle' is not one of auto, keep, reindex"):
        EVS(positions="middle")
    tiny, _ = model("llava_onevision")
    with pytest.raises(ConfigError, match=r"kv_layer=4 is out of range for a language model with 4 decoder layers \(valid: 1..3\)"):
        vlmkit.apply(tiny, "dycoke:kv_layer=4")
    vlmkit.apply(tiny, "dycoke:kv_layer=4,kv_drop=0").remove()  # no decoding stage: the layer is not used
    with pytest.raises(ConfigError, match="positions='reindex' is defined for 1-D rotary positions only"):
        vlmkit.apply(model("qwen2_vl")[0], "evs:positions=reindex")


@pytest.mark.parametrize("name", ["evs", "dycoke"])
def test_families_without_video_are_refused_by_name(name):
    for family in ("llava", "llava_next"):
        with pytest.raises(UnsupportedModelError, match=rf"{name} does not support {family}: the family has no video input"):
            vlmkit.apply(model(family)[0], name)
