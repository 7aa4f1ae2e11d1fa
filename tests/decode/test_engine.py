"""Decoding branches through stock generate(), on real forward passes of the tiny models: what the
registry-driven invariants (`tests/engine/test_invariants.py`: neutral settings, cached = recompute,
padded batch = singles, SDPA = eager, `remove()`, for every decoding method on every family) leave
out: `num_return_sequences`, the hooks a decoding method installs, returned caches and outputs,
bad uses, the tokenizer of a saved checkpoint, AnyRes and video inputs.
"""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.errors import ConfigError, ConflictError
from vlmkit.registry import REGISTRY

DECODING = sorted(info.name for info in vlmkit.list_methods() if info.family == "decode")


def batch(family, count=2):
    tiny, processor = model(family)
    return tiny, processor, inputs(processor, photos()[:count], ["What is shown?", "Is there a cat in the image? Answer.", "Colour?"][:count])


def run(tiny, processor, data, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 4)
    return generate(tiny, data, tokenizer=processor.tokenizer, **kwargs)


def test_num_return_sequences_and_beams_with_a_batch():
    tiny, processor, data = batch("llava")
    with vlmkit.apply(tiny, "vcd") as patch:
        sampled = run(tiny, processor, data, do_sample=True, num_return_sequences=3)
        assert sampled.shape[0] == 6
        beams = run(tiny, processor, data, num_beams=3, num_return_sequences=2)
        with patch.reuse_selections():
            assert torch.equal(run(tiny, processor, data, do_sample=True, num_return_sequences=3, use_cache=False), sampled)
            assert torch.equal(run(tiny, processor, data, num_beams=3, num_return_sequences=2, use_cache=False), beams)


def hook_snapshot(tiny):
    return [
        (name, list(m._forward_pre_hooks), list(m._forward_hooks), sorted(k for k in m.__dict__ if not k.startswith("_") or k.startswith("_reorder") or k.startswith("_get")))
        for name, m in tiny.named_modules()
    ]


def test_remove_restores_exactly():
    tiny, processor, data = batch("llava")
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    plain = run(tiny, processor, data)
    with torch.no_grad():  # transformers installs its own output-capturing hooks once, on first use
        tiny(**data, output_hidden_states=True)
    hooks = hook_snapshot(tiny)
    for method in DECODING:
        patch = vlmkit.apply(tiny, f"{method}:{REGISTRY.get(method).example}" if REGISTRY.get(method).example else method)
        assert {"generate", "_get_logits_processor", "_reorder_cache"} <= set(tiny.__dict__)
        assert [hook.split(":", 1)[1] for hook in patch.hooks] == [
            "logits:generate", "logits:processors", "logits:reorder", "logits:rows", "logits:split", "logits:lm_head", "copy"]
        run(tiny, processor, data, num_beams=2, max_new_tokens=2)
        patch.remove()
        patch.remove()  # idempotent
        assert hook_snapshot(tiny) == hooks, method
        assert not {"generate", "_get_logits_processor", "_reorder_cache"} & set(tiny.__dict__)
        assert torch.equal(run(tiny, processor, data), plain), method
    after = tiny.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_returned_cache_and_outputs_hold_the_main_rows_only():
    tiny, processor, data = batch("llava")
    with vlmkit.apply(tiny, "icd"), torch.no_grad():  # ICD's branch is longer: the main rows get left padding
        out = tiny.generate(
            **data, max_new_tokens=3, do_sample=False, tokenizer=processor.tokenizer,
            return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
        )
    length = data["input_ids"].shape[1] + 3 - 1
    assert [layer.keys.shape[0] for layer in out.past_key_values.layers] == [2] * 4
    assert out.past_key_values.get_seq_length() == length
    assert all(h.shape[0] == 2 for step in out.hidden_states for h in step)
    assert out.scores[0].shape[0] == out.logits[0].shape[0] == 2


def test_bad_uses_are_clear_errors():
    tiny, processor, data = batch("llava")
    with pytest.raises(ConflictError, match="both claim the logits site"):
        vlmkit.apply(tiny, "vcd", "m3id")
    with vlmkit.apply(tiny, "icd"):
        with pytest.raises(ConfigError, match="tokenizer=processor.tokenizer"):
            generate(tiny, data, tokenizer=None)
        with pytest.raises(ConfigError, match="prefill_chunk_size"):
            run(tiny, processor, data, prefill_chunk_size=8)
    text_only = processor.tokenizer(["Hello there"], return_tensors="pt")
    with vlmkit.apply(tiny, "vcd"), pytest.raises(ConfigError, match="no pixel inputs"):
        generate(tiny, text_only)
    plain = generate(tiny, text_only)
    with vlmkit.apply(tiny, "m3id:decay=0.5"):  # without an image the branch is the prompt itself: no change
        assert torch.equal(generate(tiny, text_only), plain)


def test_tokenizer_comes_from_a_saved_checkpoint(tmp_path):
    tiny, processor, data = batch("llava")
    tiny.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = vlmkit.zoo.load(tmp_path)
    with vlmkit.apply(tiny, "icd"):
        expected = run(tiny, processor, data)
    with vlmkit.apply(loaded, "icd"):  # no tokenizer= : the one saved next to the weights
        assert torch.equal(generate(loaded, data, max_new_tokens=4), expected)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_families_and_video(family):
    """AnyRes crops (pixel layout (N, crops, 3, H, W)) and, for OneVision, videos."""
    from tests.conftest import noise_video

    tiny, processor, data = batch(family)
    with vlmkit.apply(tiny, "ritual:alpha_neg=1") as patch:
        cached = run(tiny, processor, data, num_beams=2)
        with patch.reuse_selections():
            assert torch.equal(run(tiny, processor, data, num_beams=2, use_cache=False), cached)
    if family == "llava_onevision":
        video = inputs(processor, [noise_video(4, seed=1), noise_video(4, seed=2)], QUESTIONS[:2], modality="video")
        with vlmkit.apply(tiny, "vcd"):
            assert torch.equal(run(tiny, processor, video), run(tiny, processor, video, use_cache=False))


def test_branch_scope_restores_the_main_call_state():
    from vlmkit.engine.state import EngineState

    state = EngineState({"image": 5})
    main_encoded, main_selections = {"image": "main"}, {"fastv": ["kept"]}
    state.encoded, state.selections, state.input_ids, state.sources = main_encoded, main_selections, "ids", {"image": None}
    branch_encoded: dict = {}
    with state.branch_scope(branch_encoded, prune=False):
        assert state.bypass and not state.reuse and state.encoded is branch_encoded
        assert state.take_visual_tokens(1, 3, torch.device("cpu")) is None  # opted out: every token kept
        state.encoded["image"] = "branch"
        state.selections = {}
    with state.branch_scope(branch_encoded, prune=True):
        assert state.reuse and not state.bypass and state.encoded["image"] == "branch"
    assert state.encoded is main_encoded and state.selections is main_selections
    assert (state.input_ids, state.sources, state.reuse, state.bypass) == ("ids", {"image": None}, False, False)
