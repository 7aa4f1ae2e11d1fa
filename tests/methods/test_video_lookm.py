"""LOOK-M (`lookm`): the text-prior choice and the merges against hand computations, the engine's
per-head cache edit, and a decoding step after the edit against the same step computed by hand
from the kept and merged entries at their original positions. The registry invariants (neutral
setting, remove(), cached = recomputed, padded batch = singles, SDPA = eager) run in
tests/engine/test_invariants.py."""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.engine.cache import CompactLayer, SlotLayout
from vlmkit.engine.contexts import CacheContext, HeadEdit
from vlmkit.engine.heads import apply_head_edit
from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import ConfigError, ConflictError, InputError
from vlmkit.methods.video.lookm import LookM, merge_weights, text_prior_keep


@pytest.mark.parametrize("params,message", [
    (dict(heavy=1.5), r"heavy=1.5 is out of range"),
    (dict(recent=-0.1), r"recent=-0.1 is out of range"),
    (dict(merge="mean"), r"merge='mean' is not one of pivot, average, weighted, none"),
    (dict(decode="yes"), r"decode='yes' must be True or False"),
])
def test_config_errors_name_the_valid_choices(params, message):
    with pytest.raises(ConfigError, match=message):
        LookM(**params)


def test_text_prior_keeps_text_then_the_most_attended_and_the_recent_window():
    # 8 entries, the last 2 recent; entries 1, 2, 5 visual. Head 0: 5 older text-first ranks
    # 0 (.9), 3 (.1), 4 (.2) then visual 2 (.8), 1 (.5), 5 (.3); head 1 ties at .5 go to the earlier.
    scores = torch.tensor([[0.9, 0.5, 0.8, 0.1, 0.2, 0.3, 0.0, 0.0],
                           [0.1, 0.5, 0.5, 0.7, 0.0, 0.5, 0.0, 0.0]])
    visual = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool).expand(2, 8)
    keep = text_prior_keep(scores, visual, count=4, recent=2)
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 3, 4, 6, 7]
    assert keep[1].nonzero().flatten().tolist() == [0, 1, 3, 4, 6, 7]
    # fewer than the text entries: the text of the highest score (the reference keeps every text
    # token through its >= 0 mask; the method asks for max(T, hh), so this only happens at decoding)
    assert text_prior_keep(scores, visual, count=2, recent=2)[0].nonzero().flatten().tolist() == [0, 4, 6, 7]


def reference_merge(keys, values, keep, mode):
    """The reference's merge for one row, written as its classes compute it: per head, cosine of
    each evicted key with every kept key, max, then `scatter_reduce(mean, include_self=True)`."""
    heads, length, width = keys.shape
    kept_k, kept_v = keys[keep].view(heads, -1, width), values[keep].view(heads, -1, width)
    gone_k, gone_v = keys[~keep].view(heads, -1, width), values[~keep].view(heads, -1, width)
    cosine = (gone_k / gone_k.norm(dim=-1, keepdim=True)) @ (kept_k / kept_k.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    best, pivot = cosine.max(dim=-1)
    if mode == "pivot":
        index = pivot[..., None].expand(-1, -1, width)
        merged_k = (gone_k + kept_k.gather(1, index)) / 2
        merged_v = (gone_v + kept_v.gather(1, index)) / 2
        return (kept_k.scatter_reduce(1, index, merged_k, reduce="mean", include_self=True),
                kept_v.scatter_reduce(1, index, merged_v, reduce="mean", include_self=True))
    chosen = best.mean(0) >= best.mean()
    index = pivot[:, chosen][..., None].expand(-1, -1, width)
    scale = best[:, chosen][..., None] if mode == "weighted" else torch.ones(1)
    return (kept_k.scatter_reduce(1, index, scale * gone_k[:, chosen], reduce="mean", include_self=True),
            kept_v.scatter_reduce(1, index, scale * gone_v[:, chosen], reduce="mean", include_self=True))


def one_layer(keys, values, slots):
    layer = CompactLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    valid = slots >= 0
    layer.layout = SlotLayout(valid, slots, torch.zeros(keys.shape[0], dtype=torch.long))
    layer.logical_length = keys.shape[2]
    return layer


@pytest.mark.parametrize("mode", ["pivot", "average", "weighted"])
def test_merged_keys_and_values_equal_the_reference_formula(mode):
    torch.manual_seed(0)
    keys, values = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    keep = torch.tensor([[1, 0, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    target, weight = merge_weights(keys, keep, mode)
    layer = one_layer(keys[None], values[None], torch.arange(7)[None])
    record = apply_head_edit(layer, HeadEdit(keep[None], target[None], weight[None]), "lookm", 7)
    expected_k, expected_v = reference_merge(keys, values, keep, mode)
    torch.testing.assert_close(layer.keys[0], expected_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.values[0], expected_v, rtol=1e-6, atol=1e-6)
    assert layer.layout.valid.tolist() == [[True] * 4]
    assert layer.layout.head_slot[0].tolist() == [[0, 2, 5, 6], [0, 1, 4, 6]]
    assert layer.layout.slot.tolist() == [[0, 2, 5, 6]]  # head 0's
    assert sorted(zip(record.evicted[1].tolist(), record.evicted[2].tolist())) == [(0, 1), (0, 3), (0, 4), (1, 2), (1, 3), (1, 5)]


def test_pivot_merge_by_hand():
    # one head, keys on the unit circle: 1 -> pivot 0, 3 -> pivot 2 (cos .6 vs .8): kept 0 becomes
    # (x0 + (x1 + x0) / 2) / 2, kept 2 becomes (x2 + (x3 + x2) / 2) / 2
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]]])
    keep = torch.tensor([[True, False, True, False]])
    target, weight = merge_weights(keys, keep, "pivot")
    assert target.tolist() == [[0, 0, 2, 2]]
    torch.testing.assert_close(weight, torch.tensor([[0.75, 0.25, 0.75, 0.25]]))
    _, weight = merge_weights(keys, keep, "average")  # s = (.994, .8): only 1 passes s >= mean
    torch.testing.assert_close(weight, torch.tensor([[0.5, 0.5, 1.0, 0.0]]))


def test_head_edit_errors():
    layer = one_layer(torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 2), torch.arange(3)[None])
    unequal = torch.tensor([[[True, True, False], [True, False, False]]])
    with pytest.raises(InputError, match="same number of slots in every head"):
        apply_head_edit(layer, HeadEdit(unequal), "lookm", 3)
    keep = torch.tensor([[[True, True, False], [True, False, True]]])
    into_evicted = torch.tensor([[[0, 1, 1], [0, 0, 1]]])
    with pytest.raises(InputError, match="name slots the same head keeps"):
        apply_head_edit(layer, HeadEdit(keep, into_evicted, torch.ones(1, 2, 3)), "lookm", 3)


def visual_tokens(slots):
    slots = torch.tensor(slots)
    zeros = torch.zeros_like(slots)
    return VisualTokens(slots, torch.arange(len(slots)), zeros, zeros, zeros, slots, zeros)


def test_prefill_edit_of_a_padded_batch_by_hand():
    # row 0: 10 valid slots (2..11 of 12, left padding), visual at caller slots 4..8; row 1: 12 slots,
    # visual 3..10; hh = r = int(0.2 n)
    torch.manual_seed(1)
    slots = torch.tensor([[-1, -1] + list(range(2, 12)), list(range(12))])
    scores = torch.rand(2, 2, 12)
    keys = torch.randn(2, 2, 12, 4)
    context = CacheContext(
        keys=[keys], valid=[slots >= 0], slots=[slots], visual=[visual_tokens(range(4, 9)), visual_tokens(range(3, 11))],
        prefill=True, logical_length=12, head_slots=[slots[:, None, :].expand(2, 2, 12)], head_attention=[scores],
    )
    edit = LookM(heavy=0.2, recent=0.2, merge="none").edit_cache(context)[0]
    assert edit.target is None
    # row 0: n = 10, hh = r = 2; older text = slots 2, 3, 9 -> max(3, 2) = 3 kept + slots 10, 11
    for head in range(2):
        assert edit.keep[0, head].nonzero().flatten().tolist() == [2, 3, 9, 10, 11]
    # row 1: n = 12, hh = r = 2; older (0..9) text = 0, 1, 2 -> 3 kept (all text, no visual), + 10, 11
    for head in range(2):
        assert edit.keep[1, head].nonzero().flatten().tolist() == [0, 1, 2, 10, 11]
    # with a larger hh, the most attended visual entries join, per head
    edit = LookM(heavy=0.5, recent=0.2, merge="none").edit_cache(context)[0]
    for head in range(2):
        older = scores[1, head, 3:10]  # row 1's older visual entries, slots 3..9
        best = (torch.argsort(older, descending=True, stable=True)[:3] + 3).sort().values.tolist()
        assert edit.keep[1, head].nonzero().flatten().tolist() == sorted([0, 1, 2] + best + [10, 11])


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_a_decoding_step_after_the_edit_equals_the_step_by_hand():
    """LLaVA (Llama, GQA 4/2 heads): the edit computed here as the reference does (its -65516 offset,
    topk, >= 0 mask, pivot merge through scatter_reduce) from the eager attention maps of the dense
    prefill; the next token then attends by hand to the edited entries at their original positions."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    ids = batch["input_ids"][0]
    length = ids.shape[0]
    with torch.no_grad():
        dense = tiny(**batch, use_cache=True, output_attentions=True)
    text_model = tiny.model.language_model
    groups = text_model.config.num_attention_heads // text_model.config.num_key_value_heads
    heavy = recent = int(length * 0.1)
    image = ids == tiny.config.image_token_id
    edited = []
    for index, attentions in enumerate(dense.attentions):
        score = attentions[0].float().sum(dim=1)  # (H, L): summed over query rows
        score = score.view(-1, groups, length).sum(dim=1)  # per KV head
        offset = torch.where(image, -65516.0, 0.0).expand_as(score).clone()
        offset[:, -recent:] = -65516.0
        score = score + offset
        top = torch.topk(score[:, :-recent], heavy, dim=-1).indices
        score = score.scatter(1, top, 0.0)
        score[:, -recent:] = 0.0
        keep = score >= 0
        keys, values = dense.past_key_values.layers[index].keys[0], dense.past_key_values.layers[index].values[0]
        edited.append(reference_merge(keys, values, keep, "pivot"))
    token = dense.logits[0, -1].argmax()

    with torch.no_grad():  # the step by hand, at position `length`
        hidden = tiny.get_input_embeddings()(token.view(1, 1))
        cos, sin = text_model.rotary_emb(hidden, torch.tensor([[length]]))
        for layer, (keys, values) in zip(text_model.layers, edited):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = rotate(attention.q_proj(normed).view(1, 1, -1, attention.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
            k = rotate(attention.k_proj(normed).view(1, 1, -1, attention.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
            v = attention.v_proj(normed).view(1, 1, -1, attention.head_dim).transpose(1, 2)
            all_k = torch.cat([keys[None], k], dim=2).repeat_interleave(groups, dim=1)
            all_v = torch.cat([values[None], v], dim=2).repeat_interleave(groups, dim=1)
            weights = torch.softmax(q @ all_k.transpose(-1, -2) * attention.scaling, dim=-1)
            out = (weights @ all_v).transpose(1, 2).reshape(1, 1, -1)
            hidden = hidden + attention.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        by_hand = tiny.lm_head(text_model.norm(hidden))[0, -1]

    with vlmkit.apply(tiny, "lookm"), torch.no_grad():
        prefill = tiny(**batch, use_cache=True)
        torch.testing.assert_close(prefill.logits, dense.logits)  # the prefill itself is dense
        cache = prefill.past_key_values
        for index, (keys, values) in enumerate(edited):
            layer = cache.layers[index]
            assert layer.physical_length == keys.shape[1] < length
            torch.testing.assert_close(layer.keys[0], keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[0], values, rtol=1e-5, atol=1e-5)
        step = tiny(input_ids=token.view(1, 1), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                    past_key_values=cache, use_cache=True)
    torch.testing.assert_close(step.logits[0, -1], by_hand, rtol=1e-4, atol=1e-4)


def test_decode_keeps_each_layer_at_the_prefill_budget():
    tiny, processor = model("qwen2_vl")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "lookm:decode=True"), torch.no_grad():
        prefill = tiny(**batch, use_cache=True)
        budget = [layer.layout.valid.sum(dim=1) for layer in prefill.past_key_values.layers]
        out = tiny.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        after = [layer.layout.valid.sum(dim=1) for layer in out.past_key_values.layers]
        heads = out.past_key_values.layers[0].layout.head_slot
    assert all(torch.equal(a, b) for a, b in zip(after, budget))
    assert heads is not None and not bool((heads == heads[:, :1]).all())  # the heads now differ
    with vlmkit.apply(tiny, "lookm"), torch.no_grad():  # the reference: prefill only, the cache grows
        out = tiny.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert all(torch.equal(layer.layout.valid.sum(dim=1), b + 3) for layer, b in zip(out.past_key_values.layers, budget))
    # and it asks the engine for nothing while decoding: the scores stop at the prefill's slots
    assert all(layer.scores.shape[2] == layer.keys.shape[2] - 3 for layer in out.past_key_values.layers)


@pytest.mark.parametrize("merge", ["average", "weighted", "none"])
def test_variants_keep_cached_generation_equal_to_recompute(merge):
    tiny, processor = model("llava_onevision")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, f"lookm:merge={merge},decode=True") as patch:
        cached = generate(tiny, batch, num_beams=2)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, num_beams=2, use_cache=False), cached)


def test_an_attention_method_is_refused_next_to_per_head_edits():
    tiny, _ = model("llava")
    with pytest.raises(ConflictError, match="'lookm' edits the KV cache per head.*'cca' masks keys by slot"):
        vlmkit.apply(tiny, "lookm", "cca")
