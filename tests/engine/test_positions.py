"""Positions after pruning: Qwen2-VL's 3-D M-RoPE ids and `rope_deltas` through decoding, and the
`keep` / `reindex` policies on 1-D RoPE."""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.errors import ConfigError


def rotary_positions(tiny, run):
    """Every `position_ids` the text model's rotary embedding receives during `run()`."""
    seen = []
    rotary = tiny.model.language_model.rotary_emb
    handle = rotary.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=0.25", "visionzip:tokens=20", "pool:keep=0.25"])
def test_qwen2_vl_positions_and_rope_deltas_survive_pruning(spec):
    tiny, processor = model("qwen2_vl")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    dense = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=4))
    dense_deltas = tiny.model.rope_deltas.clone()
    with vlmkit.apply(tiny, spec) as patch:
        pruned = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=4))
        kept = patch.selections[spec.split(":")[0]]
        orders = [sample.order for sample in patch.state.recorded[("select", 0 if "fastv" not in spec else 2)].samples]
        assert torch.equal(tiny.model.rope_deltas, dense_deltas)
    prompt = dense[0]
    assert prompt.shape[0] == 3 and prompt.shape[1] == 2  # (t, h, w) x batch
    # decoding steps: the same 3-D ids as without pruning, i.e. max prompt position + 1 + step
    dense_steps = [p for p in dense if p.shape[-1] == 1]
    pruned_steps = [p for p in pruned if p.shape[-1] == 1]
    assert len(pruned_steps) >= len(dense_steps) > 0
    for step, positions in enumerate(dense_steps):
        assert torch.equal(positions, pruned_steps[step])
        expected = prompt.amax(dim=(0, 2)) + 1 + step
        assert torch.equal(positions[0, :, 0], expected)
    # the pruned prompt holds exactly the kept tokens' original 3-D ids
    pruned_prompt = [p for p in pruned if p.shape[-1] > 1][-1]
    mask = batch["attention_mask"].bool()
    for sample in range(2):
        visual = torch.nonzero(batch["input_ids"][sample] == tiny.config.image_token_id).flatten()
        kept_ids = prompt[:, sample, visual[kept[sample]]]
        text = torch.nonzero(mask[sample] & (batch["input_ids"][sample] != tiny.config.image_token_id)).flatten()
        expected = torch.sort(torch.cat([visual[kept[sample]], text])).values
        if orders[sample] is not None:  # the kept visual tokens enter in the selection's order (VisionZip)
            expected[torch.isin(expected, visual)] = visual[kept[sample]][orders[sample]]
        width = pruned_prompt.shape[-1]
        tail = pruned_prompt[:, sample, width - expected.numel() :]
        assert torch.equal(tail, prompt[:, sample, expected])
        assert kept_ids.shape[1] == len(kept[sample])


def pooled_positions(policy: str):
    """Pool one LLaVA prompt to 25 % under `positions=policy` and generate 3 tokens.

    Returns the prompt length, the image tokens' positions, the kept image tokens (indices into those),
    the rotary positions of the pruned prompt and of each decoding step.
    """
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with vlmkit.apply(tiny, f"pool:keep=0.25,positions={policy}") as patch:
        seen = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3))
        kept = patch.selections["pool"][0]
    visual = torch.nonzero(batch["input_ids"][0] == tiny.config.image_token_id).flatten()
    prompt = [p for p in seen if p.shape[-1] > 1][-1].flatten()
    steps = [int(p.flatten()) for p in seen if p.shape[-1] == 1]
    return batch["input_ids"].shape[1], visual, kept, prompt, steps


def test_reindex_renumbers_the_kept_sequence_and_decodes_after_it():
    length, visual, kept, prompt, steps = pooled_positions("reindex")
    new_length = length - len(visual) + len(kept)
    assert torch.equal(prompt, torch.arange(new_length))
    assert steps == [new_length, new_length + 1]


def test_keep_leaves_original_positions():
    length, visual, kept, prompt, steps = pooled_positions("keep")
    dropped = set(visual.tolist()) - set(visual[kept].tolist())
    expected = torch.tensor([p for p in range(length) if p not in dropped])
    assert torch.equal(prompt, expected)
    assert steps == [length, length + 1]


def test_reindex_is_refused_under_mrope():
    tiny, _ = model("qwen2_vl")
    with pytest.raises(ConfigError, match="M-RoPE"):
        vlmkit.apply(tiny, "fastv:keep=0.5,positions=reindex")


def test_qwen2_5_vl_probe_order_matches_the_towers_own_reordering():
    """The tower runs on windows in a permuted order; the adapter's permutation is the one the model
    applies to its merged tokens (checked against the merger's output, computed from the last block)."""
    from vlmkit.adapters import adapter_for

    tiny, processor = model("qwen2_5_vl")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    visual = tiny.model.visual
    seen = {}
    hook = visual.merger.register_forward_pre_hook(lambda module, args: seen.update(window_major=args[0]))
    with torch.no_grad():
        output = tiny.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        merged = visual.merger(seen["window_major"])
    hook.remove()
    order = adapter_for(tiny).token_order(batch["image_grid_thw"])
    assert not torch.equal(order, torch.arange(order.numel())), "windows must actually permute tokens"
    assert torch.equal(merged[order], torch.cat(output.pooler_output))
