"""PyramidDrop and DART against their reference code's algorithm: hand-made inputs with known answers,
and hand computations on the tiny models (written independently of vlmkit)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from tests.engine.test_composition import hand_fastv_scores
from vlmkit.adapters import adapter_for
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.prune.dart import DART, key_norms
from vlmkit.methods.prune.fastv import FastV
from vlmkit.methods.prune.pyramiddrop import PyramidDrop, default_layers


def grid_tokens(rows: int, cols: int, first_slot: int = 5) -> VisualTokens:
    n = rows * cols
    index = torch.arange(n)
    zeros = torch.zeros(n, dtype=torch.long)
    return VisualTokens(
        slots=index + first_slot, origin=index, image=zeros, frame=zeros.clone(), row=index // cols, col=index % cols,
        crop=zeros.clone(), grids=[(1, rows, cols)], modality=["image"],
    )


def stage_context(visual, scores, layer, num_layers=4) -> SelectionContext:
    return SelectionContext(hidden=torch.zeros(1, 40, 4), visual=[visual], layer=layer, num_layers=num_layers,
                            last_row_attention=[scores])


# ---------------------------------------------------------------- PyramidDrop: hand-made inputs
def test_pyramiddrop_default_stage_layers_scale_8_16_24_of_32_with_pythons_round():
    assert default_layers(32) == (8, 16, 24)
    assert default_layers(4) == (1, 2, 3)
    assert default_layers(28) == (7, 14, 21)
    assert default_layers(24) == (6, 12, 18)
    assert default_layers(26) == (6, 13, 20)  # round(6.5) == 6, round(19.5) == 20 (halves to even)
    assert default_layers(2) == (1,)  # clipped to 1..num_layers-1, repeats removed
    assert PyramidDrop(layers=(3, 1)).selection_layers(32) == (1, 3)


def test_pyramiddrop_halves_the_remaining_tokens_at_each_stage_by_last_token_attention():
    """lambda = 0.5 on a 4x4 grid: 8, then 4, then 2 tokens remain (int(16 * 0.5^s))."""
    method = PyramidDrop()
    visual = grid_tokens(4, 4)
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.05, 0.5, 0.15, 0.45, 0.35, 0.25, 0.55, 0.65])
    first = method.select(stage_context(visual, scores, layer=1)).samples[0].keep
    # the eight highest: 0.9 (0), 0.8 (2), 0.7 (4), 0.65 (15), 0.6 (6), 0.55 (14), 0.5 (9), 0.45 (11)
    assert first.tolist() == [0, 2, 4, 6, 9, 11, 14, 15]
    # stage 2 scores only the survivors (new attention, from the compacted stream)
    visual = visual.subset(first)
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    second = method.select(stage_context(visual, scores, layer=2)).samples[0].keep
    assert second.tolist() == [4, 5, 6, 7]
    assert visual.origin[second].tolist() == [9, 11, 14, 15]
    visual = visual.subset(second)
    third = method.select(stage_context(visual, torch.tensor([0.3, 0.3, 0.1, 0.2]), layer=3)).samples[0].keep
    assert third.tolist() == [0, 1]  # tie at 0.3: both kept
    assert visual.origin[third].tolist() == [9, 11]


def test_pyramiddrop_counts_truncate_shares_of_the_original_count_as_the_reference():
    """int(n * lambda^s) of the count that entered the first stage, not of the previous stage's."""
    method = PyramidDrop(ratio=0.6)
    assert [method.stage_count(10, s, 3) for s in range(3)] == [6, 3, 2]  # int(6.0), int(3.6), int(2.16)
    # stage by stage, 3 * 0.6 would leave 1 at the last stage; the reference keeps int(10 * 0.216) = 2
    visual = grid_tokens(2, 5)
    scores = torch.arange(10.0)
    counts = []
    for layer in (1, 2, 3):
        keep = method.select(stage_context(visual, scores[: len(visual)], layer)).samples[0].keep
        counts.append(len(keep))
        visual = visual.subset(keep)
    assert counts == [6, 3, 2]
    assert PyramidDrop(ratio=0.5).stage_count(15, 2, 3) == 1  # int(1.875)


def test_pyramiddrop_keep_is_the_share_after_the_last_stage():
    method = PyramidDrop(keep=0.25)  # lambda = 0.25^(1/3) = 0.63
    assert [method.stage_count(16, s, 3) for s in range(3)] == [10, 6, 4]  # 10.08, 6.35, 4
    assert [PyramidDrop(keep=0.125).stage_count(576, s, 3) for s in range(3)] == [288, 144, 72]
    assert [PyramidDrop().stage_count(576, s, 3) for s in range(3)] == [288, 144, 72]  # lambda = 0.5
    assert [PyramidDrop(keep=0.0625).stage_count(576, s, 2) for s in range(2)] == [144, 36]
    assert [PyramidDrop(tokens=36).stage_count(144, s, 2) for s in range(2)] == [72, 36]
    assert [PyramidDrop(keep=1.0).stage_count(144, s, 3) for s in range(3)] == [144, 144, 144]


def test_pyramiddrop_rejects_bad_settings():
    with pytest.raises(ConfigError, match="ratio=0.5 .* or keep/tokens"):
        PyramidDrop(ratio=0.5, keep=0.25)
    with pytest.raises(ConfigError, match=r"ratio=1\.5 must be a number in \(0, 1\]"):
        PyramidDrop(ratio=1.5)
    with pytest.raises(ConfigError, match="integers >= 1"):
        PyramidDrop(layers=(0, 4))
    with pytest.raises(ConfigError, match="names a layer twice"):
        PyramidDrop(layers=(2, 2))


def test_pyramiddrop_reindexes_on_rotary_models_and_keeps_mrope_positions():
    assert PyramidDrop().position_policy(mrope=False) == "reindex"  # the reference re-numbers 0..len-1
    assert PyramidDrop().position_policy(mrope=True) == "keep"


# ---------------------------------------------------------------- DART: hand-made inputs
def _unit(degrees: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


E3 = torch.tensor([1.0, 1.0, 0.0])  # the final norm's weight: the third feature does not reach the output


def final_norm(hidden: torch.Tensor) -> torch.Tensor:
    """An RMSNorm with weight E3, standing in for the model's final norm."""
    return hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * E3


def dart_sequence(padding: int = 0):
    """Two prompt tokens, eight visual tokens (a 2x4 grid), four text tokens, after `padding` pads.

    Hidden states (3-D): the visual tokens point at 0, 30, 60, 90, 0, 150, 200, 270 degrees in the first
    two features; token 0 also has -2 in the third, which the final norm's weight erases; the text
    after them: 90 degrees with a third feature of 1 (the text pivot), then three others, the last with
    the largest hidden L1 norm. Keys (2 heads, one rotary plane each, the second feature 0): the visual
    pivot is token 4 (score 2 + 3 = 5, though token 0 has the larger hidden L1 norm), the text pivot
    the first text token (3). The
    prompt tokens before the image have the largest key norms but are no pivots (text pivots come
    from the text after the image).
    """
    def unit(degrees: float, third: float = 0.0) -> list[float]:
        return [*_unit(degrees), third]

    rows = [[0.0, 0.0, 0.0]] * padding + [[9.0, 9.0, 0.0], [-9.0, 9.0, 0.0]]
    rows += [unit(0, -2.0)] + [unit(a) for a in (30, 60, 90, 0, 150, 200, 270)]
    rows += [unit(90, 1.0), [0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [7.0, 0.0, 0.0]]
    keys = [[0.0, 0.0]] * padding + [[9.0, -9.0], [9.0, 9.0]]
    keys += [[0.5, -0.5]] * 4 + [[2.0, -3.0]] + [[0.5, 0.5]] * 3
    keys += [[0.0, 3.0], [0.1, 0.1], [0.2, 0.0], [0.0, 0.1]]
    hidden = torch.tensor(rows)[None]
    valid = torch.ones(1, len(rows), dtype=torch.bool)
    valid[0, :padding] = False
    keys = F.pad(torch.tensor(keys).T[None, :, :, None], (0, 1))  # (1, H_kv = 2, L, d = 2): planes (a, 0), (b, 0)
    return hidden, keys, valid, grid_tokens(2, 4, first_slot=padding + 2)


def dart_context(hidden, keys, valid, visual, norm=final_norm) -> SelectionContext:
    return SelectionContext(hidden=hidden, visual=[visual], layer=2, num_layers=4, valid=valid, keys=keys, final_norm=norm)


def test_dart_keeps_the_pivot_and_the_tokens_least_similar_to_each_pivot_in_set_order():
    """P_v = P_t = 1, keep = 0.5 of 8: T = int(8 * 0.5 / 2) = 2 picks per pivot, 1 + 2 * 2 = 5 kept.

    Pivots by key L1 norm: visual token 4 (sequence position 6) and the text token at position 10. The
    reference visits them as `list({6, 10})` = [10, 6] (a Python set of small ints iterates by value
    modulo its table size 8: 10 -> 2, 6 -> 6): the text pivot (90 degrees after the norm) first. Its
    cosines to the non-pivot visual tokens after the norm: 0 (0 deg), .5 (30), .87 (60), 1 (90), .5
    (150), -.34 (200), -1 (270): it takes 7 and 6. The visual pivot (0 degrees) then scores the rest
    1, .87, .5, 0, -.87: takes 5 and 3.
    """
    hidden, keys, valid, visual = dart_sequence()
    method = DART(keep=0.5, pivot_image_tokens=1, pivot_text_tokens=1)
    assert method.needs == {"keys"}
    assert method.select(dart_context(hidden, keys, valid, visual)).samples[0].keep.tolist() == [3, 4, 5, 6, 7]


def test_dart_similarity_is_taken_after_the_final_norm_and_pivots_come_from_the_keys():
    """Without the norm, token 0's third feature counts: the text pivot (0, 1, 1) scores token 0 at
    -2 / (sqrt 2 sqrt 5) = -.63 and takes 7 (-.71) and 0; the visual pivot then takes 6 (-.94) and 5
    (-.87). Pivots by hidden L1 norm instead of keys would pick token 0 and the last text token."""
    hidden, keys, valid, visual = dart_sequence()
    method = DART(keep=0.5, pivot_image_tokens=1, pivot_text_tokens=1)
    plain = method.select(dart_context(hidden, keys, valid, visual, norm=None)).samples[0].keep
    assert plain.tolist() == [0, 4, 5, 6, 7]
    by_hidden = F.pad(hidden.abs().sum(dim=-1)[:, None, :, None], (0, 1))  # keys scoring the hidden L1 norms
    assert method.select(dart_context(hidden, by_hidden, valid, visual)).samples[0].keep.tolist() != [3, 4, 5, 6, 7]


def rotate(keys: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of each plane (k[i], k[i + d/2]) of every key by `angles` (L, d/2)."""
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    first, second = keys.chunk(2, dim=-1)
    return keys * cos + torch.cat([-second, first], dim=-1) * sin


def test_dart_pivot_scores_are_plane_lengths_that_positions_do_not_move():
    """One head of d = 4: planes (k0, k2) and (k1, k3). Token 0: (3, 4) and (0, 0), score 5 (plain L1
    7); token 1: (1, 1) twice, score 2 sqrt 2 (plain L1 4). Rotating every plane by any angle (RoPE
    at another position) changes the plain L1 norms but not the scores nor the selection."""
    keys = torch.tensor([[[[3.0, 0.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]])
    torch.testing.assert_close(key_norms(keys), torch.tensor([[5.0, 2 * math.sqrt(2)]]))
    angles = torch.tensor([[0.3, 1.1], [2.0, -0.7]])
    turned = rotate(keys[0, 0], angles)[None, None]
    torch.testing.assert_close(key_norms(turned), key_norms(keys))
    assert not torch.allclose(turned.abs().sum(dim=-1), keys.abs().sum(dim=-1))
    hidden, keys, valid, visual = dart_sequence()
    angles = torch.rand(keys.shape[2], 1, generator=torch.Generator().manual_seed(0)) * 6.28
    turned = torch.stack([rotate(keys[0, h], angles) for h in range(2)])[None]
    method = DART(keep=0.5, pivot_image_tokens=1, pivot_text_tokens=1)
    assert method.select(dart_context(hidden, turned, valid, visual)).samples[0].keep.tolist() == [3, 4, 5, 6, 7]


def test_dart_counts_positions_without_padding():
    """Three pads move the slots to 9 and 13 but not the positions: same order, same selection. (Had
    the pads counted, list({9, 13}) = [9, 13] would visit the visual pivot first: it would take 6 and 5,
    the text pivot 7 and 0, giving [0, 4, 5, 6, 7].)"""
    hidden, keys, valid, visual = dart_sequence(padding=3)
    method = DART(keep=0.5, pivot_image_tokens=1, pivot_text_tokens=1)
    assert method.select(dart_context(hidden, keys, valid, visual)).samples[0].keep.tolist() == [3, 4, 5, 6, 7]
    assert list({9, 13}) == [9, 13] and list({6, 10}) == [10, 6]


def test_dart_budget_rules_as_the_reference_scripts():
    method = DART()  # 128 of 576: T = 128 // 8 = 16, 4 + 8 * 16 = 132 kept
    assert method.picks_per_pivot(576) == 16
    assert DART(keep=0.222).picks_per_pivot(576) == 15  # Qwen2-VL scripts: int(576 * 0.222 / 8) = int(15.98)
    assert DART(tokens=128).picks_per_pivot(576) == 16 and DART(tokens=135).picks_per_pivot(576) == 16
    assert DART(keep=1.0).picks_per_pivot(576) is None  # keeps all
    generator = torch.Generator().manual_seed(0)
    features, keys = torch.randn(1, 600, 8, generator=generator), torch.randn(1, 2, 600, 4, generator=generator)
    visual = grid_tokens(24, 24, first_slot=10)
    ctx = SelectionContext(hidden=features, visual=[visual], layer=2, num_layers=4, keys=keys)
    assert DART().select(ctx).samples[0].keep.numel() == 132
    assert DART(keep=0.0625).select(ctx).samples[0].keep.numel() == 4 + 8 * 4  # int(36 / 8) = 4
    assert DART(keep=1.0).select(ctx).samples[0].keep.numel() == 576


def test_dart_rejects_bad_settings():
    with pytest.raises(ConfigError, match="layer=0 must be an integer >= 1"):
        DART(layer=0)
    with pytest.raises(ConfigError, match="both 0"):
        DART(pivot_image_tokens=0, pivot_text_tokens=0)


# ---------------------------------------------------------------- hand computations on a tiny model
def _layer_inputs(tiny):
    """Pre-hooks recording (layer index, hidden, mask, rotary) for every decoder layer."""
    seen, handles = [], []
    for index, layer in enumerate(adapter_for(tiny).decoder_layers):
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: seen.append(
                (index, kwargs.get("hidden_states", args[0] if args else None), kwargs.get("attention_mask"),
                 kwargs["position_embeddings"])),
            with_kwargs=True,
        ))
    return seen, handles


def _layer_outputs(tiny):
    """Forward hooks recording (layer index, output hidden state) for every decoder layer."""
    seen, handles = [], []
    for index, layer in enumerate(adapter_for(tiny).decoder_layers):
        handles.append(layer.register_forward_hook(
            lambda module, args, output, index=index: seen.append((index, output[0] if isinstance(output, tuple) else output))
        ))
    return seen, handles


def test_pyramiddrop_matches_eager_last_token_attention_stage_by_stage():
    """keep=0.25 over stages 1, 2, 3 of the 4-layer LLaVA: 144 -> 90 -> 57 -> 36 visual tokens, each
    stage the top of the last token's attention in the stage layer itself, from its own q/k on what
    the layer before put out (as pdrop_rank_drop: layers[rank_layer] on the output of rank_layer - 1),
    over the compacted stream."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    seen, handles = _layer_inputs(tiny)
    outputs, output_handles = _layer_outputs(tiny)
    try:
        with vlmkit.apply(tiny, "pyramiddrop:keep=0.25") as patch, torch.no_grad():
            tiny(**batch)
            recorded = {layer: patch.state.recorded[("select", layer)] for layer in (1, 2, 3)}
    finally:
        for handle in handles + output_handles:
            handle.remove()
    by_layer = {index: (mask, rotary) for index, _, mask, rotary in seen[-4:]}
    output_of = dict(outputs[-4:])
    valid = batch["attention_mask"].bool()
    visual = batch["input_ids"] == tiny.config.image_token_id
    current = [torch.nonzero(visual[row]).flatten() for row in range(2)]  # original positions still present
    assert [len(c) for c in current] == [144, 144]
    for layer, count in zip((1, 2, 3), (90, 57, 36)):
        mask, rotary = by_layer[layer - 1]  # the stream before the stage: the layout layer - 1 ran on
        hidden = output_of[layer - 1]
        with torch.no_grad():
            attention = torch.stack(hand_fastv_scores(tiny, hidden, mask, rotary, layer))
        for row in range(2):
            survivors = valid[row] & ~visual[row]
            survivors[current[row]] = True
            rank = survivors.long().cumsum(0) - 1
            rows = rank[current[row]] + (hidden.shape[1] - int(survivors.sum()))  # left-padded stream rows
            scores = attention[row, rows]
            expected = torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values
            assert recorded[layer].samples[row].keep.tolist() == expected.tolist(), (layer, row)
            current[row] = current[row][expected]


def test_dart_matches_the_reference_procedure_on_keys_and_the_final_norm():
    """The reference's steps written over each unpadded sequence (Python sets and lists), from the
    unpatched model: pivots by layer 1's cached keys (repeated to every query head, as `repeat_kv`),
    scored by the summed lengths of their rotary planes, visited in set order, each taking the T
    tokens left least cosine-similar after the final norm of layer 1's output."""
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    captured = {}
    layer_one = adapter_for(tiny).decoder_layers[1]
    handle = layer_one.register_forward_hook(
        lambda module, args, output: captured.update(hidden=output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            cache = tiny(**batch, use_cache=True).past_key_values
            normed = tiny.model.language_model.norm(captured["hidden"])
    finally:
        handle.remove()
    with vlmkit.apply(tiny, "dart:layer=2,keep=0.3") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["dart"]
    groups = tiny.config.text_config.num_attention_heads // tiny.config.text_config.num_key_value_heads
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        states = normed[row][valid].float()
        keys = cache.layers[1].keys[row][:, valid].repeat_interleave(groups, dim=0).float()  # (H, L, d)
        half = keys.shape[-1] // 2
        planes = torch.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)  # (H, L, d/2)
        ids = batch["input_ids"][row][valid]
        image = torch.nonzero(ids == tiny.config.image_token_id).flatten().tolist()
        start, length = image[0], len(image)
        top_k = int(length * 0.3 / 8)
        norms = planes.sum(dim=(0, 2))
        image_pivots = [start + i for i in torch.argsort(norms[start:start + length], descending=True, stable=True)[:4].tolist()]
        text = start + length
        query_pivots = [text + i for i in torch.argsort(norms[text:], descending=True, stable=True)[:4].tolist()]
        kept = set(image_pivots + query_pivots)
        left = set(range(start, start + length)) - set(image_pivots)
        for pivot in list(kept):
            pool = sorted(left)
            cosine = torch.nn.functional.cosine_similarity(states[pivot][None], states[pool], dim=-1)
            picked = [pool[i] for i in torch.argsort(cosine, stable=True)[:top_k].tolist()]
            kept.update(picked)
            left.difference_update(picked)
        kept.difference_update(query_pivots)
        assert chosen[row].tolist() == sorted(p - start for p in kept), row
        assert len(kept) == 4 + 8 * top_k


class _LateFastV(FastV):
    """FastV under another name, to follow PyramidDrop's stages in one patch."""

    name = "fastv_late"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pyramiddrop_stages_then_a_later_fastv_compose(family):
    """Stages at layers 1 and 2 (keep=0.25: 72 then 36 of 144 on LLaVA), FastV at 3: every layer sees the
    text plus that stage's tokens; cached generation equals recompute; the batch equals single runs."""
    tiny, processor = model(family, "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    methods = [PyramidDrop(layers=(1, 2), keep=0.25), _LateFastV(layer=3, keep=0.5)]
    with vlmkit.apply(tiny, *methods) as patch:
        seen, handles = _layer_inputs(tiny)
        try:
            with torch.no_grad():
                tiny(**batch)
        finally:
            for handle in handles:
                handle.remove()
        recorded = {layer: patch.state.recorded[("select", layer)] for layer in (1, 2, 3)}
        available = [int(n) for n in (batch["input_ids"] == tiny.config.image_token_id).sum(dim=1)]
        text = batch["attention_mask"].sum(dim=1) - torch.tensor(available)
        counts = {0: available}
        for layer in (1, 2, 3):
            counts[layer] = [len(sample.keep) for sample in recorded[layer].samples]
        for row, n in enumerate(available):
            assert counts[1][row] == math.floor(n * 0.5 + 1e-9) and counts[2][row] == math.floor(n * 0.25 + 1e-9)
            assert counts[3][row] == round(counts[2][row] * 0.5)
        for index, hidden, mask, _ in seen:
            row_mask = mask[:, 0, -1]
            lengths = (row_mask if row_mask.dtype == torch.bool else row_mask == 0).sum(dim=1)
            assert lengths.tolist() == (text + torch.tensor(counts[index])).tolist(), index
        cached = generate(tiny, batch)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, use_cache=False), cached)
        for row in range(2):
            generate(tiny, inputs(processor, [photos()[row]], [QUESTIONS[row]]))
            for layer in (1, 2, 3):
                assert torch.equal(patch.state.recorded[("select", layer)].samples[0].keep, recorded[layer].samples[row].keep)
