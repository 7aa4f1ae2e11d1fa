"""The engine's invariants, on real forward passes of the tiny models, for every pruning method.

- 100% budget: bit-identical logits and generations;
- `remove()` restores outputs, `state_dict` and leaves no hook behind;
- KV-cached `generate()` equals recomputing the full sequence each step with the same selection
  (greedy, sampling with a fixed seed, beam search);
- a left-padded batch of different images and prompts equals the samples run one by one;
- SDPA and eager attention give the same selections and outputs.

Registering a token method enrolls it here (the matrix is built from `list_methods()`).
"""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.adapters import ADAPTERS

FAMILIES = [adapter.family for adapter in ADAPTERS]
PRUNING = sorted(info.name for info in vlmkit.list_methods() if info.family == "prune")
# a pruning budget that really drops tokens, per method
PRUNED = {
    "fastv": "fastv:layer=2,keep=0.25",
    "visionzip": "visionzip:tokens=20",
    "random": "random:keep=0.3,seed=3",
    "pool": "pool:keep=0.25",
    "divprune": "divprune:keep=0.2",
}


def pruned_spec(name: str) -> str:
    return PRUNED.get(name, f"{name}:keep=0.3")


def single(family, index=0):
    tiny, processor = model(family)
    return tiny, inputs(processor, [photos()[index]], [QUESTIONS[index]])


def test_every_pruning_method_is_in_the_matrix():
    assert set(PRUNED) <= set(PRUNING)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PRUNING)
def test_full_budget_is_bit_identical(family, method):
    tiny, batch = single(family)
    with torch.no_grad():
        logits = tiny(**batch).logits
    tokens = generate(tiny, batch)
    with vlmkit.apply(tiny, f"{method}:keep=1.0") as patch:
        with torch.no_grad():
            patched = tiny(**batch).logits
        patched_tokens = generate(tiny, batch)
        assert len(patch.selections[method][0]) > 0
    assert torch.equal(patched, logits)
    assert torch.equal(patched_tokens, tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PRUNING)
def test_remove_restores_exactly(family, method):
    tiny, batch = single(family, 1)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        logits = tiny(**batch).logits
    hooks = hook_snapshot(tiny)
    patch = vlmkit.apply(tiny, pruned_spec(method))
    assert hook_snapshot(tiny) != hooks
    with torch.no_grad():
        pruned = tiny(**batch).logits
    assert not torch.equal(pruned, logits), "the pruned budget must change the output"
    patch.remove()
    patch.remove()  # idempotent
    with torch.no_grad():
        assert torch.equal(tiny(**batch).logits, logits)
    after = tiny.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert hook_snapshot(tiny) == hooks


def hook_snapshot(tiny):
    """Every hook and instance-level override on every module (Hugging Face's own hooks included)."""
    return [
        (name, list(m._forward_pre_hooks), list(m._forward_hooks), sorted(k for k in m.__dict__ if k == "forward" or k.startswith("get_")))
        for name, m in tiny.named_modules()
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PRUNING)
@pytest.mark.parametrize(
    "decoding",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=2, do_sample=False)],
    ids=["greedy", "sampling", "beam2"],
)
def test_cached_generation_equals_recompute(family, method, decoding):
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, pruned_spec(method)) as patch:
        torch.manual_seed(0)
        cached = generate(tiny, batch, **decoding)
        with patch.reuse_selections():
            torch.manual_seed(0)
            recomputed = generate(tiny, batch, use_cache=False, **decoding)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PRUNING)
def test_padded_batch_equals_single_runs(family, method):
    tiny, processor = model(family)
    questions = ["What is shown?", "Is there a cat in the image? Answer yes or no.", "Colour?", "Describe it in detail."]
    images = photos()
    with vlmkit.apply(tiny, pruned_spec(method)) as patch:
        batch = inputs(processor, images, questions)
        assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
        with torch.no_grad():
            batched_logits = tiny(**batch).logits[:, -1]
        batched_selection = list(patch.selections[method])
        batched_tokens = generate(tiny, batch)
        for row in range(4):
            one = inputs(processor, [images[row]], [questions[row]])
            with torch.no_grad():
                logits = tiny(**one).logits[:, -1]
            assert torch.equal(patch.selections[method][0], batched_selection[row])
            torch.testing.assert_close(logits[0], batched_logits[row], rtol=1e-4, atol=1e-4)
            tokens = generate(tiny, one)
            assert torch.equal(tokens[0], batched_tokens[row][: tokens.shape[1]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PRUNING)
def test_sdpa_equals_eager(family, method):
    results = {}
    for attn in ("sdpa", "eager"):
        tiny, processor = model(family, attn)
        batch = inputs(processor, photos()[:2], QUESTIONS[:2])
        with vlmkit.apply(tiny, pruned_spec(method)) as patch:
            with torch.no_grad():
                logits = tiny(**batch).logits[:, -1]
            results[attn] = (logits, [s.clone() for s in patch.selections[method]], generate(tiny, batch))
    (sdpa_logits, sdpa_sel, sdpa_tokens), (eager_logits, eager_sel, eager_tokens) = results["sdpa"], results["eager"]
    assert all(torch.equal(a, b) for a, b in zip(sdpa_sel, eager_sel))
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(sdpa_tokens, eager_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_methods_compose_and_stay_consistent(family):
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        logits = tiny(**batch).logits
    with vlmkit.apply(tiny, "visionzip:tokens=40", "fastv:layer=2,keep=0.5") as patch:
        cached = generate(tiny, batch)
        selected = patch.selections
        assert [len(s) for s in selected["visionzip"]] == [40, 40]
        assert [len(s) for s in selected["fastv"]] == [20, 20]
        # FastV chooses among what VisionZip kept, and reports indices among the original tokens
        for zip_kept, fastv_kept in zip(selected["visionzip"], selected["fastv"]):
            assert set(fastv_kept.tolist()) <= set(zip_kept.tolist())
        with patch.reuse_selections():
            recomputed = generate(tiny, batch, use_cache=False)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        assert torch.equal(tiny(**batch).logits, logits)


VIDEO_FAMILIES = [f for f in FAMILIES if "video" in vlmkit.adapters.adapter_for(model(f)[0]).placeholder_ids()]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("method", PRUNING)
def test_video_pruning_keeps_the_invariants(family, method):
    from tests.conftest import noise_video

    tiny, processor = model(family)
    batch = inputs(processor, [noise_video(4, seed=1), noise_video(4, seed=2)], QUESTIONS[:2], modality="video")
    with torch.no_grad():
        logits = tiny(**batch).logits
    with vlmkit.apply(tiny, f"{method}:keep=1.0"), torch.no_grad():
        assert torch.equal(tiny(**batch).logits, logits)
    with vlmkit.apply(tiny, pruned_spec(method)) as patch:
        with torch.no_grad():
            assert not torch.equal(tiny(**batch).logits, logits), "the pruned budget must change the output"
        assert all(0 < len(k) for k in patch.selections[method])
        cached = generate(tiny, batch)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, use_cache=False), cached)
        torch.manual_seed(0)
        beams = generate(tiny, batch, num_beams=2)
        with patch.reuse_selections():
            torch.manual_seed(0)
            assert torch.equal(generate(tiny, batch, num_beams=2, use_cache=False), beams)
