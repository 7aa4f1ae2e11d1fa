"""Two selections in one patch, on real forward passes: the second selects among exactly what the
first kept, and the stream every decoder layer sees holds the text plus that stage's kept tokens.

Pairs are built from the registry: every pruning method before the LLM is paired with FastV, and
every method inside the LLM with a method before it and with a FastV at a later layer, so that a
newly registered method is checked in a pair too (a method that itself selects at several layers,
as PyramidDrop and ToDRE, is a composition of stages already: its own tests check its stages, and
the registry invariants its results). They run on every tiny family and on the shipped `shapes-llava`.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vlmkit
from tests.conftest import photos
from tests.engine.models import generate, inputs, model
from vlmkit import zoo
from vlmkit.adapters import ADAPTERS, adapter_for
from vlmkit.engine.runner import TextStackRunner
from vlmkit.methods.prune.fastv import FastV
from vlmkit.registry import REGISTRY

FAMILIES = [adapter.family for adapter in ADAPTERS] + ["shapes-llava"]
PRUNING = sorted(info.name for info in vlmkit.list_methods() if info.family == "prune")
QUESTIONS = ["What is shown?", "Is there a cat in the image? Answer yes or no."]
BUDGET = {"random": "keep=0.5,seed=3", "visionzip": "tokens=24", "fastv": "layer=1,keep=0.5"}


class LateFastV(FastV):
    """FastV under another name, so that two FastV stages can share one patch."""

    name = "fastv_late"


def layer_of(name: str) -> int:
    return min(REGISTRY.get(name)().selection_layers(4))


def single_stage(name: str) -> bool:
    return len(REGISTRY.get(name)().selection_layers(4)) == 1


def method(name: str):
    """A pruning budget that really drops tokens (in-LLM methods select before layer 1)."""
    return vlmkit.api.parse_spec(f"{name}:{BUDGET.get(name, 'keep=0.5')}")


def pairs() -> list[tuple[str, str]]:
    """(first, second) with the second selecting at a later layer than the first."""
    result = []
    for name in PRUNING:
        if not single_stage(name):
            continue
        if layer_of(name) == 0:
            result.append((name, "fastv"))
        else:
            result.append(("visionzip", name))
            result.append((name, "fastv_late"))
    return result


def runs_on(name: str, family: str) -> bool:
    """Whether the method runs on the family (`shapes-llava` is a LLaVA-1.5)."""
    family = "llava" if family == "shapes-llava" else family
    return name == "fastv_late" or family not in REGISTRY.get(name).unsupported


def pair_cases() -> list[tuple[str, str, str]]:
    """(family, first, second) for every pair on every family both methods run on."""
    return [(family, first, second) for first, second in pairs() for family in FAMILIES
            if runs_on(first, family) and runs_on(second, family)]


def build(first: str, second: str):
    methods = [method(first)]
    methods.append(LateFastV(layer=3, keep=0.5) if second == "fastv_late" else method(second))
    return methods


@functools.lru_cache(maxsize=None)
def shapes_llava():
    shipped, processor = zoo.load("shapes-llava")
    return shipped.eval(), processor


def family_model(family: str):
    return shapes_llava() if family == "shapes-llava" else model(family)


@contextlib.contextmanager
def layer_inputs(tiny):
    """Record what every decoder layer receives: (hidden states, attention mask, rotary cos/sin)."""
    seen: list[tuple[int, torch.Tensor, object, tuple]] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: seen.append(
                (index, kwargs.get("hidden_states", args[0] if args else None), kwargs.get("attention_mask"), kwargs["position_embeddings"])
            ),
            with_kwargs=True,
        )
        for index, layer in enumerate(adapter_for(tiny).decoder_layers)
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def valid_keys_of_last_query(hidden: torch.Tensor, mask) -> torch.Tensor:
    """Per sample, the keys the last query may attend to (no cache: the stream itself)."""
    batch, length = hidden.shape[:2]
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    row = mask[:, 0, -1]
    return row if row.dtype == torch.bool else row == 0


def visual_counts(tiny, batch) -> list[int]:
    with vlmkit.apply(tiny, "random:keep=1.0") as patch, torch.no_grad():
        tiny(**batch)
        return [len(kept) for kept in patch.selections["random"]]


def batch_of(family: str, count: int = 2):
    tiny, processor = family_model(family)
    return tiny, processor, inputs(processor, photos()[:count], QUESTIONS[:count])


@pytest.mark.parametrize("family,first,second", pair_cases())
def test_each_layer_sees_text_plus_that_stages_kept_tokens(family, first, second):
    tiny, _, batch = batch_of(family)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    methods = build(first, second)
    available = visual_counts(tiny, batch)
    with vlmkit.apply(tiny, *methods) as patch, layer_inputs(tiny) as seen, torch.no_grad():
        tiny(**batch)
        kept_first, kept_second = patch.selections[first], patch.selections[second]
    stages = [(0, available), (min(methods[0].selection_layers(99)), [len(k) for k in kept_first]),
              (min(methods[1].selection_layers(99)), [len(k) for k in kept_second])]
    text = batch["attention_mask"].sum(dim=1) - torch.tensor(available)
    adapter = adapter_for(tiny)
    for index, hidden, mask, _ in seen:
        visible = [count for start, count in stages if index >= start][-1]
        expected = text + torch.tensor(visible)
        lengths = valid_keys_of_last_query(hidden, mask).sum(dim=1)
        assert hidden.shape[1] == int(expected.max()), f"layer {index}: the stream is re-padded to its longest sample"
        window = adapter.layer_window(index)
        if window is None:
            assert lengths.tolist() == expected.tolist(), f"layer {index}"
        else:  # a sliding-window layer: the last query sees the stage's tokens inside its window only
            assert bool((lengths <= torch.clamp(expected, max=window)).all()) and bool((lengths > 0).all()), f"layer {index}"
    for before, after in zip(kept_first, kept_second):
        assert 0 < len(after) < len(before)
        assert set(after.tolist()) <= set(before.tolist())


def hand_fastv_scores(tiny, hidden: torch.Tensor, mask, rotary, layer_index: int) -> list[torch.Tensor]:
    """Per sample, the attention of the last token to every key at one decoder layer (mean over
    heads), computed here from the layer's input with eager arithmetic."""
    layer = adapter_for(tiny).decoder_layers[layer_index]
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    batch, length, _ = hidden.shape
    query = attention.q_proj(normed).view(batch, length, -1, attention.head_dim)
    key = attention.k_proj(normed).view(batch, length, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3-VL: an RMS norm over each head's query and key
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *rotary)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query[:, :, -1:] @ key.transpose(-1, -2))[:, :, 0] * attention.head_dim**-0.5
    logits = logits.masked_fill(~valid_keys_of_last_query(hidden, mask)[:, None], float("-inf"))
    return list(logits.softmax(dim=-1).mean(dim=1))


def visual_rows(tiny, batch, row: int, kept_before: torch.Tensor, length: int) -> torch.Tensor:
    """Rows of the compacted stream (left-padded to `length`) holding the first stage's kept tokens.

    The stream keeps sequence order: text and kept visual tokens in the order of the prompt. Image
    newline tokens (LLaVA-NeXT, OneVision) fill placeholders too but are never pruned: they are
    found by their value (the model's `image_newline` vector) in a dense run's embeddings.
    """
    placeholder = adapter_for(tiny).placeholder_ids()["image"]
    visual = batch["input_ids"][row] == placeholder
    newline = getattr(adapter_for(tiny).base_model, "image_newline", None)
    if newline is not None:
        with layer_inputs(tiny) as seen, torch.no_grad():
            tiny(**batch)
        embeds = seen[0][1][row]
        visual &= ~(embeds == newline.to(embeds.dtype)).all(dim=-1)
    visual_positions = torch.nonzero(visual).flatten()
    kept_positions = visual_positions[kept_before]
    survivors = batch["attention_mask"][row].bool() & ~visual
    survivors[kept_positions] = True
    rank = survivors.long().cumsum(0) - 1
    return rank[kept_positions] + (length - int(survivors.sum()))


@pytest.mark.parametrize("family,first", [
    (family, name) for name in [n for n in PRUNING if layer_of(n) == 0 and single_stage(n)] + ["fastv"]
    for family in FAMILIES if runs_on(name, family)
])
def test_second_fastv_scores_the_first_methods_output(family, first):
    """FastV after another selection scores the compacted stream: its scores equal the last row of
    attention computed here over that stream, and it keeps their top half."""
    tiny, _, batch = batch_of(family)
    second = "fastv_late" if first == "fastv" else "fastv"
    methods = build(first, second)
    scored: list[list[torch.Tensor]] = []
    original_select = methods[1].select
    methods[1].select = lambda context: scored.append([s.clone() for s in context.last_row_attention]) or original_select(context)
    score_layer = min(methods[1].selection_layers(99)) - 1
    with vlmkit.apply(tiny, *methods) as patch, layer_inputs(tiny) as seen, torch.no_grad():
        tiny(**batch)
        kept_first, kept_second = patch.selections[first], patch.selections[second]
    (_, hidden, mask, rotary), = [entry for entry in seen if entry[0] == score_layer]
    with torch.no_grad():
        expected = hand_fastv_scores(tiny, hidden, mask, rotary, score_layer)
    first_samples = patch.state.recorded[("select", min(methods[0].selection_layers(99)))].samples
    for row, (before, after) in enumerate(zip(kept_first, kept_second)):
        rows = visual_rows(tiny, batch, row, before, hidden.shape[1])
        torch.testing.assert_close(scored[0][row], expected[row][rows], rtol=1e-5, atol=1e-7)
        # a first method with an entry order (VisionZip: dominant, then contextual) fills the same rows
        order = first_samples[row].order
        in_stream = before if order is None else before[order.cpu()]
        count = max(1, round(len(before) * 0.5))  # FastV rounds halves to even, as its reference
        top = torch.argsort(expected[row][rows], descending=True, stable=True)[:count]
        assert torch.equal(after, torch.sort(in_stream[top]).values)


@pytest.mark.parametrize("family,first,second", pair_cases())
def test_pair_cached_generation_equals_recompute_and_batch_equals_singles(family, first, second):
    tiny, processor, batch = batch_of(family)
    with vlmkit.apply(tiny, *build(first, second)) as patch:
        cached = generate(tiny, batch)
        batched = {name: list(kept) for name, kept in patch.selections.items()}
        with torch.no_grad():
            batched_logits = tiny(**batch).logits[:, -1]
        with patch.reuse_selections():
            recomputed = generate(tiny, batch, use_cache=False)
        assert torch.equal(cached, recomputed)
        for row in range(2):
            one = inputs(processor, [photos()[row]], [QUESTIONS[row]])
            with torch.no_grad():
                logits = tiny(**one).logits[:, -1]
            for name in (first, second):
                assert torch.equal(patch.selections[name][0], batched[name][row])
            torch.testing.assert_close(logits[0], batched_logits[row], rtol=1e-4, atol=1e-4)
            tokens = generate(tiny, one)
            assert torch.equal(tokens[0], cached[row][: tokens.shape[1]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["keep", "reindex"])
@pytest.mark.parametrize("first,second", [("visionzip", "fastv"), ("fastv", "fastv_late")])
def test_every_compaction_points_slots_at_the_compacted_rows(family, positions, first, second, monkeypatch):
    """After each compaction, every remaining visual token's slot is its row in the new stream: the
    row holds the token that was there before (by caller position, and by value unless merged)."""
    tiny, _, batch = batch_of(family)
    if adapter_for(tiny).mrope and positions == "reindex":
        positions = "auto"  # M-RoPE keeps 3-D ids; 'auto' is its only other policy
    compactions = []
    apply = TextStackRunner._apply

    def recording(self, selector, selection, stream, full, run, layer):
        old_slots = [visual.slots.clone() for visual in stream.visual]
        old_slot, old_hidden = stream.slot.clone(), stream.hidden.clone()
        new_stream = apply(self, selector, selection, stream, full, run, layer)
        new = (new_stream.valid.clone(), new_stream.slot.clone(), new_stream.hidden.clone(), [v.slots.clone() for v in new_stream.visual])
        compactions.append((selection, old_slots, old_slot, old_hidden, new))
        return new_stream

    monkeypatch.setattr(TextStackRunner, "_apply", recording)
    methods = [vlmkit.api.parse_spec(f"{first}:{BUDGET[first]},positions={positions}")]
    late = dict(layer=3, keep=0.5, positions=positions)
    methods.append(LateFastV(**late) if second == "fastv_late" else FastV(**{**late, "layer": 2}))
    with vlmkit.apply(tiny, *methods), torch.no_grad():
        tiny(**batch)
    assert len(compactions) == 2
    for selection, old_slots, old_slot, old_hidden, (valid, slot, hidden, new_slots) in compactions:
        for row, (sample, slots, kept_slots) in enumerate(zip(selection.samples, old_slots, new_slots)):
            # the kept tokens fill the rows in the selection's entry order (sequence order unless given)
            order = torch.arange(len(sample.keep)) if sample.order is None else sample.order
            entering = sample.keep[order]
            assert valid[row, kept_slots].all()
            assert torch.equal(slot[row, kept_slots], old_slot[row, slots[entering]])
            unmerged = torch.ones(len(sample.keep), dtype=torch.bool)
            if sample.merge_target is not None:
                unmerged = torch.bincount(sample.merge_target[sample.merge_target >= 0], minlength=len(sample.keep)) == 1
            if sample.combine is not None:
                unmerged[sample.changed_rows()] = False
            unmerged = unmerged[order]
            assert torch.equal(hidden[row, kept_slots[unmerged]], old_hidden[row, slots[entering][unmerged]])
