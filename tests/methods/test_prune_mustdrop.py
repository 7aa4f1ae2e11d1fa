"""MustDrop against the reference's algorithm: window similarity, merges, entry order and key set on
hand-made grids; the dual-attention filter and its budget; the output-aware cache (stage 3) on a
hand-made cache; and, on the tiny LLaVA, the merge and the key set from an eager vision tower, the
prefill filter from eager decoder attention and the cache the first decoding step reads, computed
here independently of vlmkit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import photos
from tests.engine.models import generate, inputs, model
from vlmkit.engine.contexts import CacheContext
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.prune.mustdrop import (
    MustDrop,
    default_layers,
    spatial_windows,
    window_similarity,
)


def grid(rows: int, cols: int, crop: int = 0, col_offset: int = 0) -> VisualTokens:
    n = rows * cols
    index = torch.arange(n)
    zeros = torch.zeros(n, dtype=torch.long)
    return VisualTokens(
        slots=index + 3, origin=index, image=zeros, frame=zeros.clone(), row=index // cols,
        col=index % cols + col_offset, crop=torch.full((n,), crop), grids=[(1, rows, cols)], modality=["image"],
    )


def joined(*parts: VisualTokens) -> VisualTokens:
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])
    n = sum(len(p) for p in parts)
    return VisualTokens(slots=torch.arange(n) + 3, origin=torch.arange(n), image=cat("image"), frame=cat("frame"),
                        row=cat("row"), col=cat("col"), crop=cat("crop"), grids=[(1, 2, 6)], modality=["image"])


# 4 x 4 grid, 2 x 2 windows W0 = {0,1,4,5}, W1 = {2,3,6,7}, W2 = {8,9,12,13}, W3 = {10,11,14,15}
E1, E2, DIAG = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
KEYS = torch.tensor([E1, E1, E1, E2,  E1, E1, E1, E2,  E1, E1, E2, E1,  E1, DIAG, E2, E1])
#   W0: all E1 -> 1;  W1: E1, E2, E1, E2 -> 4 of 12 ordered pairs -> 1/3;  W3: E2, E1, E2, E1 -> 1/3
#   W2: three E1 and one (1, 1): (6 + 6 cos 45deg) / 12 = 0.5 + 0.5 / sqrt(2)
IMPORTANCE = torch.tensor([0.9, 0.9, 0.05, 0.5, 0.9, 0.1, 0.05, 0.05, 0.0, 0.0, 0.6, 0.05, 0.0, 0.8, 0.05, 0.05])
FEATURES = torch.arange(32.0).view(16, 2)


def probes():
    return [{"importance": IMPORTANCE, "keys": KEYS, "features": FEATURES}]


# ---------------------------------------------------------------- hand-made inputs
def test_window_similarity_is_the_mean_cosine_over_distinct_ordered_pairs():
    members, unit = spatial_windows(grid(4, 4), 2)
    assert members.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert unit.tolist() == [0, 0, 0, 0]
    expected = torch.tensor([1.0, 1 / 3, 0.5 + 0.5 / math.sqrt(2), 1 / 3])
    torch.testing.assert_close(window_similarity(KEYS[members]), expected)


def test_windows_are_complete_and_never_cross_crops():
    # crop 0: a 2 x 2 grid (tokens 0-3, one window); crops 1 and 2: 2 x 3 tiles side by side in one
    # tile grid (tokens 4-9 in columns 0-2, tokens 10-15 in columns 3-5): the window over columns 2-3
    # would take a column of each crop, so only columns 0-1 and 4-5 form windows
    visual = joined(grid(2, 2, crop=0), grid(2, 3, crop=1), grid(2, 3, crop=2, col_offset=3))
    members, unit = spatial_windows(visual, 2)
    assert members.tolist() == [[0, 1, 2, 3], [4, 5, 7, 8], [11, 12, 14, 15]]
    assert unit.tolist() == [0, 1, 2]


def test_merge_sample_merges_similar_windows_in_front_with_the_mean_of_members():
    sample, keys = MustDrop(window=2, key_share=0.2).merge_sample(grid(4, 4), probes())
    # W0 (1.0) and W2 (0.854) reach 0.8; their bottom-right members 5 and 13 hold them
    assert sample.keep.tolist() == [2, 3, 5, 6, 7, 10, 11, 13, 14, 15]
    assert sample.keep[sample.order].tolist() == [5, 13, 2, 3, 6, 7, 10, 11, 14, 15]  # merged by similarity first
    assert sample.combine_space == "vision"
    combined = sample.combine @ FEATURES
    position = {int(t): i for i, t in enumerate(sample.keep)}
    torch.testing.assert_close(combined[position[5]], FEATURES[[0, 1, 4, 5]].mean(dim=0))
    torch.testing.assert_close(combined[position[13]], FEATURES[[8, 9, 12, 13]].mean(dim=0))
    assert torch.equal(combined[position[10]], FEATURES[10])
    # key set: ceil(0.2 * 10) = 2 of the kept tokens by [CLS] attention; a merged token scores the
    # mean of its members: 5 -> (0.9 + 0.9 + 0.9 + 0.1) / 4 = 0.7, 13 -> 0.2 (its own 0.8 does not count)
    assert keys.tolist() == [5, 10]


def test_a_budget_caps_merging_and_keep_one_changes_nothing():
    # tokens=13 of 16: at most (16 - 13) // 3 = 1 window merges, the most similar (W0)
    sample, _ = MustDrop(window=2, tokens=13).merge_sample(grid(4, 4), probes())
    assert sample.keep.tolist() == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    sample, _ = MustDrop(window=2, keep=1.0).merge_sample(grid(4, 4), probes())
    assert sample.keep.tolist() == list(range(16)) and sample.combine is None and sample.order is None


def test_without_vision_features_the_merge_is_taken_on_the_llm_input():
    plain = [{"importance": IMPORTANCE, "keys": KEYS}]
    sample, _ = MustDrop(window=2).merge_sample(grid(4, 4), plain)
    assert sample.combine_space == "llm"


# three text queries (rows) over five visual tokens (columns); token 2 is in the key set
TEXT_ATTENTION = torch.tensor([
    [0.5, 0.0015, 0.0001, 0.1, 0.0009, 0.0001],
    [0.2, 0.0002, 0.0001, 0.1, 0.0009, 0.0001],
    [0.1, 0.0002, 0.0001, 0.1, 0.0009, 0.0001],
])
IS_KEY = torch.tensor([False, False, True, False, False, False])


def test_dual_attention_filter_sums_and_maximizes_over_every_text_query():
    """g (column sums) = .8, .0019, .0003, .3, .0027, .0003 (total 1.1052); i (column maxima) = .5,
    .0015, .0001, .1, .0009, .0001."""
    # 0.002 * 1.1052 = 0.00221: g is low for 1, 2, 5; i < 0.001 for 2, 4, 5. Low in both: 2 (a key) and
    # 5. Token 1 stays by its first query's .0015 (the last query alone, .0002, would drop it); token
    # 4 stays by its sum (each query alone is below both thresholds)
    method = MustDrop(global_thr=0.002, individual_thr=0.001)
    assert method.filter_sample(TEXT_ATTENTION, IS_KEY, None).tolist() == [0, 1, 2, 3, 4]
    # individual_thr 0.002: token 1's maximum is low too and it leaves
    method = MustDrop(global_thr=0.002, individual_thr=0.002)
    assert method.filter_sample(TEXT_ATTENTION, IS_KEY, None).tolist() == [0, 2, 3, 4]
    # the reference's defaults (0.001, 0.001): 0.0011 for g, so only 2 (a key) and 5 are low in both
    assert MustDrop().filter_sample(TEXT_ATTENTION, IS_KEY, None).tolist() == [0, 1, 2, 3, 4]
    # budget: the key set plus the best others by g: 0 (.8), 3 (.3), then 4 (g .0027) before 1 (.0019),
    # though 1 has the larger maximum
    assert MustDrop(keep=0.5).filter_sample(TEXT_ATTENTION, IS_KEY, 3).tolist() == [0, 2, 3]
    assert MustDrop(keep=0.5).filter_sample(TEXT_ATTENTION, IS_KEY, 4).tolist() == [0, 2, 3, 4]
    # no text query after the image: nothing is low, everything stays
    assert MustDrop().filter_sample(torch.zeros(0, 6), IS_KEY, None).tolist() == [0, 1, 2, 3, 4, 5]


def test_stage_counts_shrink_geometrically_to_the_budget():
    method = MustDrop(keep=0.25)
    assert [method.stage_count(100, 25, s, 4) for s in range(4)] == [70, 50, 35, 25]
    assert default_layers(32) == (3, 7, 11, 15)
    assert default_layers(28) == (3, 6, 10, 13)
    assert default_layers(4) == (1, 2)
    assert MustDrop().selection_layers(32) == (0, 3, 7, 11, 15)


def test_the_key_set_survives_the_prefill_stages():
    method = MustDrop(window=2, key_share=0.2, layers=(2,))
    visual = grid(4, 4)
    hidden = torch.zeros(1, 30, 4)
    first = method.select(SelectionContext(hidden=hidden, visual=[visual], layer=0, num_layers=4, vision=[probes()]))
    sample = first.samples[0]
    entered = visual.subset(sample.keep[sample.order])  # as the engine passes the kept tokens on
    # one text query: g = i = its row. The keys (origins 5 and 10) get the lowest scores and stay; the
    # rest are filtered by threshold
    scores = torch.tensor([0.0, 0.3, 0.2, 0.0005, 0.3, 0.0, 0.0001, 0.1, 0.05, 0.05])  # origins 5, 13, 2, 3, 6, 7, ...
    second = method.select(SelectionContext(hidden=hidden, visual=[entered], layer=2, num_layers=4, text_attention=[scores[None]]))
    assert entered.origin[second.samples[0].keep].tolist() == [5, 13, 2, 6, 10, 11, 14, 15]
    # a budget of 3: the two keys and the best other (origin 13)
    method = MustDrop(window=2, key_share=0.2, layers=(2,), tokens=3)
    first = method.select(SelectionContext(hidden=hidden, visual=[visual], layer=0, num_layers=4, vision=[probes()]))
    second = method.select(SelectionContext(hidden=hidden, visual=[entered], layer=2, num_layers=4, text_attention=[scores[None]]))
    assert sorted(entered.origin[second.samples[0].keep].tolist()) == [5, 10, 13]


def cache_layout(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, valid) of one cache layer whose rows hold the given caller-layout slots, left-padded."""
    width = max(len(row) for row in rows)
    slots = torch.tensor([[-1] * (width - len(row)) + row for row in rows])
    return slots, slots >= 0


def visual_at(*slots: int) -> VisualTokens:
    n = len(slots)
    zeros = torch.zeros(n, dtype=torch.long)
    return VisualTokens(slots=torch.tensor(slots), origin=torch.arange(n), image=zeros, frame=zeros.clone(),
                        row=zeros.clone(), col=torch.arange(n), crop=zeros.clone(), grids=[(1, 1, n)], modality=["image"])


def cache_context(layers: list[tuple[list[int], list[int]]], visual: list[VisualTokens], prefill: bool = True) -> CacheContext:
    built = [cache_layout(*rows) for rows in layers]
    return CacheContext(
        keys=[torch.zeros(2, 1, slots.shape[1], 2) for slots, _ in built], valid=[valid for _, valid in built],
        slots=[slots for slots, _ in built], visual=visual, prefill=prefill, logical_length=10,
    )


# two prompts: row 0 text 0-2, visual 3-8, text 9; row 1 (one pad) text 1-3, visual 4-7, text 8-9. Six
# decoder layers, stages before 2 and 4: layers 0-1 hold everything, 2-3 what the first stage kept
# (row 0: visual 3, 5, 6, 8; row 1: 4, 6, 7), 4-5 the final set (row 0: 5, 8; row 1: 6)
FULL = ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9])
STAGE1 = ([0, 1, 2, 3, 5, 6, 8, 9], [1, 2, 3, 4, 6, 7, 8, 9])
FINAL = ([0, 1, 2, 5, 8, 9], [1, 2, 3, 6, 8, 9])
CACHE_VISUAL = [visual_at(3, 4, 5, 6, 7, 8), visual_at(4, 5, 6, 7)]


def test_output_aware_cache_clears_the_finally_dropped_tokens_from_the_layers_before_the_last_stage():
    method = MustDrop(layers=(2, 4))
    assert method.cache_layers(6) == (1, 2, 3)  # K_1 - 1 .. K_S - 1
    context = cache_context([FULL, FULL, STAGE1, STAGE1, FINAL, FINAL], CACHE_VISUAL)
    edits = method.edit_cache(context)
    assert sorted(edits) == [1, 2, 3]  # layer 0 keeps its whole cache; 4 and 5 never held the dropped tokens
    T, F_ = True, False
    # layer 1 (slots 0-9 / pad, 1-9): row 0 drops visual 3, 4, 6, 7; row 1 drops 4, 5, 7; text stays
    assert edits[1].tolist() == [[T, T, T, F_, F_, T, F_, F_, T, T], [F_, T, T, T, F_, F_, T, F_, T, T]]
    # layers 2 and 3 (slots 0 1 2 3 5 6 8 9 / 1 2 3 4 6 7 8 9): row 0 drops 3 and 6, row 1 drops 4 and 7
    assert edits[2].tolist() == edits[3].tolist() == [[T, T, T, F_, T, F_, T, T], [T, T, T, F_, T, F_, T, T]]
    # once, after the prefill: a decoding step's cache is left alone
    assert method.edit_cache(cache_context([FULL, FULL, STAGE1, STAGE1, FINAL, FINAL], CACHE_VISUAL, prefill=False)) is None
    # a single stage before layer 3: only layer 2 is cleared
    one = MustDrop(layers=(3,)).edit_cache(cache_context([FULL, FULL, FULL, FINAL, FINAL, FINAL], CACHE_VISUAL))
    assert sorted(one) == [2] and one[2].tolist() == edits[1].tolist()
    # the reference's layers 2 .. 14 of 32; the tiny four-layer models (stages 1, 2): layers 0 and 1
    assert MustDrop().cache_layers(32) == tuple(range(2, 15))
    assert MustDrop().cache_layers(4) == (0, 1)


def test_output_aware_cache_is_neutral_without_drops_and_can_be_turned_off():
    # every stage kept everything (keep=1.0): nothing to remove, no edit
    assert MustDrop(layers=(2, 4)).edit_cache(cache_context([FULL] * 6, CACHE_VISUAL)) is None
    off = MustDrop(layers=(2, 4), output_aware=False)
    assert off.cache_layers(6) == () and off.edit_cache(cache_context([FULL, FULL, STAGE1, STAGE1, FINAL, FINAL], CACHE_VISUAL)) is None
    assert "cache" not in off.sites and "cache" not in MustDrop(layers=()).sites
    assert MustDrop().sites == ("vision", "embeds", "layer", "cache")
    with pytest.raises(ConfigError, match="output_aware=1 must be True or False"):
        MustDrop(output_aware=1)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="window=1 must be an integer >= 2"):
        MustDrop(window=1)
    with pytest.raises(ConfigError, match="key_share=1.5"):
        MustDrop(key_share=1.5)
    with pytest.raises(ConfigError, match=r"layers=\(0, 2\) must be integers >= 1"):
        MustDrop(layers=(0, 2))
    assert MustDrop().needs == {"vision_attention", "vision_features", "text_attention"}
    assert "text_attention" not in MustDrop(layers=()).needs  # stage 1 only


# ---------------------------------------------------------------- hand computations on the tiny LLaVA
def tower_probes(tiny, pixel_values):
    """Head-mean keys at the input of vision layer 1, the [CLS] attention row of the last vision
    layer, and the features the projector reads, computed here from the eager tower."""
    tower = tiny.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True)
        block = tower.encoder.layers[1]
        normed = block.layer_norm1(out.hidden_states[1])
        heads = block.self_attn.num_heads
        keys = block.self_attn.k_proj(normed).view(*normed.shape[:2], heads, -1).mean(dim=2)[:, 1:]
        last = tower.encoder.layers[-1]
        normed = last.layer_norm1(out.hidden_states[-2])
        q = last.self_attn.q_proj(normed[:, :1]).view(normed.shape[0], 1, heads, -1).transpose(1, 2)
        k = last.self_attn.k_proj(normed).view(*normed.shape[:2], heads, -1).transpose(1, 2)
        cls_row = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    return keys, cls_row, out.hidden_states[-2][:, 1:]


def midpoint(values: torch.Tensor) -> float:
    """A threshold about the median, half-way between two sorted values with a clear gap (so that
    float rounding cannot move a value across it)."""
    ordered = torch.sort(values).values
    middle = ordered.numel() // 2
    step = next(k for k in sorted(range(1, ordered.numel() - 1), key=lambda k: abs(k - middle))
                if float(ordered[k + 1] - ordered[k]) > 1e-5)
    return float(ordered[step] + ordered[step + 1]) / 2


def hand_windows(keys: torch.Tensor, side: int, window: int = 3):
    """(members, similarity) of the window x window windows of a side x side grid, row-major."""
    members, sims = [], []
    for wr in range(side // window):
        for wc in range(side // window):
            idx = [(wr * window + r) * side + wc * window + c for r in range(window) for c in range(window)]
            unit = F.normalize(keys[idx], dim=-1)
            cos = unit @ unit.T
            sims.append(float((cos.sum() - cos.diagonal().sum()) / (len(idx) * (len(idx) - 1))))
            members.append(idx)
    return members, torch.tensor(sims)


def test_merge_and_key_set_match_the_eager_tower():
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:1], ["What is shown?"])
    keys, cls_row, features = tower_probes(tiny, batch["pixel_values"])
    side = 12
    members, sims = hand_windows(keys[0], side)
    threshold = midpoint(sims)
    merged = [i for i in range(len(members)) if sims[i] >= threshold]
    assert 0 < len(merged) < len(members)
    entered = {}
    hook = tiny.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: entered.update(hidden=kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    with vlmkit.apply(tiny, MustDrop(spatial_threshold=threshold, layers=())) as patch, torch.no_grad():
        tiny(**batch)
        kept = patch.stage_selections["mustdrop"][0][0]
    hook.remove()
    absorbed = {t for i in merged for t in members[i][:-1]}
    assert kept.tolist() == [t for t in range(side * side) if t not in absorbed]
    # the image enters as its merged tokens by decreasing similarity, then the rest in patch order
    by_similarity = sorted(merged, key=lambda i: (-float(sims[i]), i))
    holders = [members[i][-1] for i in by_similarity]
    rest = [t for t in kept.tolist() if t not in holders]
    entering = torch.stack([features[0, members[i]].mean(dim=0) for i in by_similarity] + [features[0, t] for t in rest])
    with torch.no_grad():
        expected = tiny.model.multi_modal_projector(entering[None])[0]
    start = int((batch["input_ids"][0] == tiny.config.image_token_id).long().argmax())
    torch.testing.assert_close(entered["hidden"][0, start : start + len(kept)], expected, rtol=1e-5, atol=1e-5)

    # the key set: tokens=4 caps it at the 4 best [CLS]-attended tokens, which are all a budget of 4
    # keeps after the prefill stage (no window reaches 0.8 here)
    assert float(sims.max()) < 0.8
    with vlmkit.apply(tiny, MustDrop(tokens=4, layers=(1,))) as patch, torch.no_grad():
        tiny(**batch)
        final = patch.stage_selections["mustdrop"][1][0]
    top = torch.argsort(cls_row[0], descending=True, stable=True)[:4]
    assert final.tolist() == sorted(top.tolist())


def eager_filter(tiny, batch):
    """The filter before layer 2 computed from the unpatched eager model: layer 1's attention of every
    text query after the image (mean over heads), g its sum over the queries, i its maximum,
    thresholds about their medians; the key set from the tower. Returns (method settings, image
    slots, low_global, low_individual, key set)."""
    _, cls_row, _ = tower_probes(tiny, batch["pixel_values"])
    with torch.no_grad():
        attention = tiny(**batch, output_attentions=True).attentions[1][0].mean(dim=0)  # (L, L), head mean
    visual = torch.nonzero(batch["input_ids"][0] == tiny.config.image_token_id).flatten()
    assert visual.numel() == 144
    text = torch.arange(int(visual.max()) + 1, batch["input_ids"].shape[1])
    rows = attention[text][:, visual]  # (T, 144)
    assert rows.shape[0] > 1
    total, largest = rows.sum(dim=0), rows.amax(dim=0)
    global_thr, individual_thr = midpoint(total) / float(total.sum()), midpoint(largest)
    keys = set(torch.argsort(cls_row[0], descending=True, stable=True)[: math.ceil(0.08 * 144)].tolist())
    settings = {"layers": (2,), "spatial_threshold": 2.0,  # stage 1 keeps every token: the rows stay in place
                "global_thr": global_thr, "individual_thr": individual_thr}
    return settings, visual, total < global_thr * total.sum(), largest < individual_thr, keys


def test_prefill_filter_matches_eager_text_attention_and_keeps_the_key_set():
    """Stage 1 merging nothing, the filter before layer 2 reads layer 1's attention as the unpatched
    eager model gives it: every text query after the image, mean over heads; g its sum over the
    queries, i its maximum. Thresholds about the medians of g and i."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[1:2], ["Is there a cat in the image?"])
    settings, _, low_global, low_individual, keys = eager_filter(tiny, batch)
    with vlmkit.apply(tiny, MustDrop(**settings)) as patch, torch.no_grad():
        tiny(**batch)
        assert patch.stage_selections["mustdrop"][0][0].numel() == 144
        kept = patch.stage_selections["mustdrop"][2][0]
    low = low_global & low_individual
    assert kept.tolist() == [t for t in range(144) if not bool(low[t]) or t in keys]
    assert any(bool(low[t]) for t in keys)  # some key-set tokens survive only as keys
    assert bool((low_global & ~low_individual).any()) and bool((~low_global & low_individual).any())  # each term acts


def test_output_aware_cache_the_first_decoding_step_reads_matches_the_eager_filter():
    """One stage before layer 2: after the prefill, layer 1 forgets the image tokens the filter
    (computed here from the eager attention maps) dropped, layer 0 keeps all; the first decoding
    step's cache holds exactly that. Only the decoding steps change, and a recomputation with the
    recorded removals gives the same tokens."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[1:2], ["Is there a cat in the image?"])
    settings, visual, low_global, low_individual, keys = eager_filter(tiny, batch)
    dropped = [t for t in range(144) if bool(low_global[t] & low_individual[t]) and t not in keys]
    assert dropped
    length = batch["input_ids"].shape[1]
    kept_slots = [s for s in range(length) if s not in set(visual[dropped].tolist())]
    scores = {}
    for output_aware in (True, False):
        with vlmkit.apply(tiny, MustDrop(**settings, output_aware=output_aware)) as patch, torch.no_grad():
            out = tiny.generate(**batch, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
            scores[output_aware] = torch.stack(out.scores)
            if not output_aware:
                assert patch.state.evictions == {}
                continue
            cache = out.past_key_values  # after the first decoding step: the prompt and the first new token
            slots = [cache.layers[i].layout.slot[0][cache.layers[i].layout.valid[0]].tolist() for i in range(4)]
            assert slots[0] == list(range(length + 1))
            assert slots[1] == slots[2] == slots[3] == kept_slots + [length]
            assert list(patch.state.evictions) == [1]
            (rows, removed, at), = patch.state.evictions[1]
            assert rows.tolist() == [0] * len(dropped) and removed.tolist() == visual[dropped].tolist() and at == length
            cached = generate(tiny, batch, max_new_tokens=4)
            with patch.reuse_selections():
                assert torch.equal(generate(tiny, batch, max_new_tokens=4, use_cache=False), cached)
    assert torch.equal(scores[True][0], scores[False][0])  # the prefill is stage 2's alone
    assert not torch.equal(scores[True][1], scores[False][1])  # the first decoding step reads the cleared cache
