"""The engine's invariants, on real forward passes of the tiny models, for every registered method
(pruning, layer skipping, decoding and any later family) on every family it supports:

- its neutral setting (`Method.neutral`) gives bit-identical logits and generations;
- `remove()` restores outputs, `state_dict` and leaves no hook behind;
- KV-cached `generate()` equals recomputing the full sequence each step with the same selection
  (greedy on every pair; sampling with a fixed seed and beam search on a rotating third of each
  method's families, so that every method and every family still meets both);
- a left-padded batch of different images and prompts equals the samples run one by one;
- SDPA and eager attention give the same selections, routes and outputs.

Registering a method enrolls it here: the matrix is built from `list_methods()`, each method's
`example` (a setting that acts) and `neutral` settings, and its `unsupported` families. A method that
acts on videos only (`Method.modalities`) leaves image prompts unchanged: it runs every check on
video prompts instead, on the families that take videos.
"""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import noise_video, photos
from tests.engine.models import QUESTIONS, TOKENIZERS, generate, inputs, model
from vlmkit.adapters import ADAPTERS, adapter_for
from vlmkit.errors import UnsupportedModelError
from vlmkit.registry import REGISTRY

FAMILIES = [adapter.family for adapter in ADAPTERS]
METHODS = sorted(info.name for info in vlmkit.list_methods())
DECODINGS = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=20), "beam2": dict(num_beams=2, do_sample=False)}


def spec(name: str, setting: str = "example") -> str:
    params = getattr(REGISTRY.get(name), setting)
    return f"{name}:{params}" if params else name


def cases(methods=METHODS, families=FAMILIES):
    return [(family, name) for name in methods for family in families if family not in REGISTRY.get(name).unsupported]


def rotating_cases(offset: int) -> list[tuple[str, str]]:
    """A third of `cases()`: for the i-th method, its supported families j with j = i + offset
    (mod 3, or mod their count when it has fewer), so every method keeps at least one family and
    the families take turns."""
    out = []
    for i, name in enumerate(METHODS):
        families = [family for family, method in cases([name])]
        period = min(3, len(families))
        out += [(family, name) for j, family in enumerate(families) if j % period == (i + offset) % period]
    return out


GENERATION_CASES = [(family, method, "greedy") for family, method in cases()] + [
    (family, method, decoding) for offset, decoding in enumerate(("sampling", "beam2"), start=1)
    for family, method in rotating_cases(offset)]


WITH_NEUTRAL = [name for name in METHODS if REGISTRY.get(name).neutral is not None]
STACK = [name for name in METHODS if {"embeds", "layer", "route"} & set(REGISTRY.get(name).sites)]


def decisions(patch) -> dict:
    """What the last prefill decided, per method: kept tokens and routed tokens, per sample."""
    return {"selections": {k: list(v) for k, v in patch.selections.items()},
            "routes": {k: {layer: list(v) for layer, v in d.items()} for k, d in patch.routes.items()}}


def same_decisions(a: dict, b: dict, row_a=None, row_b=None) -> bool:
    def rows(tensors, row):
        return tensors if row is None else [tensors[row]]

    for kind in ("selections", "routes"):
        if a[kind].keys() != b[kind].keys():
            return False
    for name in a["selections"]:
        if not all(torch.equal(x, y) for x, y in zip(rows(a["selections"][name], row_a), rows(b["selections"][name], row_b))):
            return False
    for name in a["routes"]:
        for layer in a["routes"][name]:
            if not all(torch.equal(x, y) for x, y in zip(rows(a["routes"][name][layer], row_a), rows(b["routes"][name][layer], row_b))):
                return False
    return True


def observe(tiny, batch, **decoding):
    """The plain forward's logits and the scores of a short generation (what any method may change)."""
    with torch.no_grad():
        logits = tiny(**batch).logits
        torch.manual_seed(0)
        out = tiny.generate(**batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True,
                            do_sample=False, tokenizer=TOKENIZERS[tiny], **decoding)
    return logits, torch.stack(out.scores), out.sequences


def prompts(processor, method: str, questions: list[str], start: int = 0):
    """One medium per question, of a kind the method acts on: the photos from `start`, or 4-frame
    noise videos for a method that acts on videos only."""
    if "image" in REGISTRY.get(method).modalities:
        return inputs(processor, photos()[start : start + len(questions)], questions)
    videos = [noise_video(4, seed=start + offset + 1) for offset in range(len(questions))]
    return inputs(processor, videos, questions, modality="video")


def single(family, method, index=0):
    tiny, processor = model(family)
    return tiny, prompts(processor, method, [QUESTIONS[index]], index)


def test_every_method_declares_settings_for_the_matrix():
    for name in METHODS:
        cls = REGISTRY.get(name)
        assert cls.sites, name
        vlmkit.api.parse_spec(spec(name))  # the example is a valid spec
        if cls.neutral is not None:
            vlmkit.api.parse_spec(spec(name, "neutral"))


@pytest.mark.parametrize("family,method", cases(WITH_NEUTRAL))
def test_neutral_setting_is_bit_identical(family, method):
    tiny, batch = single(family, method)
    plain = {name: generate(tiny, batch, **decoding) for name, decoding in DECODINGS.items() if name != "sampling"}
    torch.manual_seed(0)
    plain["sampling"] = generate(tiny, batch, **DECODINGS["sampling"])
    with torch.no_grad():
        logits = tiny(**batch).logits
    with vlmkit.apply(tiny, spec(method, "neutral")):
        with torch.no_grad():
            assert torch.equal(tiny(**batch).logits, logits)
        for name, decoding in DECODINGS.items():
            torch.manual_seed(0)
            assert torch.equal(generate(tiny, batch, **decoding), plain[name]), name


@pytest.mark.parametrize("family,method", cases())
def test_remove_restores_exactly(family, method):
    tiny, batch = single(family, method, 1)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    before = observe(tiny, batch)
    with torch.no_grad():  # transformers installs its own output-capturing hooks once, on first use
        tiny(**batch, output_hidden_states=True)
    hooks = hook_snapshot(tiny)
    patch = vlmkit.apply(tiny, spec(method))
    assert hook_snapshot(tiny) != hooks
    during = observe(tiny, batch)
    assert not all(torch.equal(a, b) for a, b in zip(before[:2], during[:2])), "the example setting must change the output"
    patch.remove()
    patch.remove()  # idempotent
    after = observe(tiny, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    state_after = tiny.state_dict()
    assert state_after.keys() == state.keys()
    assert all(torch.equal(state_after[k], state[k]) for k in state)
    assert hook_snapshot(tiny) == hooks


def hook_snapshot(tiny):
    """Every hook and instance-level override on every module (Hugging Face's own hooks included)."""
    return [
        (name, list(m._forward_pre_hooks), list(m._forward_hooks),
         sorted(k for k in m.__dict__ if k in ("forward", "generate", "__deepcopy__") or k.startswith(("get_", "_get", "_reorder"))))
        for name, m in tiny.named_modules()
    ]


def test_every_decoding_meets_every_method_and_family():
    for decoding in DECODINGS:
        pairs = {(family, method) for family, method, d in GENERATION_CASES if d == decoding}
        assert {method for _, method in pairs} == set(METHODS), decoding
        assert {family for family, _ in pairs} == set(FAMILIES), decoding


@pytest.mark.parametrize("family,method,decoding", GENERATION_CASES)
def test_cached_generation_equals_recompute(family, method, decoding):
    tiny, processor = model(family)
    batch = prompts(processor, method, QUESTIONS[:2])
    with vlmkit.apply(tiny, spec(method)) as patch:
        torch.manual_seed(0)
        cached = generate(tiny, batch, **DECODINGS[decoding])
        with patch.reuse_selections():
            torch.manual_seed(0)
            recomputed = generate(tiny, batch, use_cache=False, **DECODINGS[decoding])
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("family,method", cases())
def test_padded_batch_equals_single_runs(family, method):
    tiny, processor = model(family)
    questions = ["What is shown?", "Is there a cat in the image? Answer yes or no.", "Colour?", "Describe it in detail."]
    with vlmkit.apply(tiny, spec(method)) as patch:
        batch = prompts(processor, method, questions)
        assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
        with torch.no_grad():
            batched_logits = tiny(**batch).logits[:, -1]
        batched = decisions(patch)
        batched_tokens = generate(tiny, batch)
        for row in range(4):
            one = prompts(processor, method, [questions[row]], row)
            with torch.no_grad():
                logits = tiny(**one).logits[:, -1]
            assert same_decisions(decisions(patch), batched, 0, row), row
            torch.testing.assert_close(logits[0], batched_logits[row], rtol=1e-4, atol=1e-4)
            tokens = generate(tiny, one)
            assert torch.equal(tokens[0], batched_tokens[row][: tokens.shape[1]]), row


@pytest.mark.parametrize("family,method", cases())
def test_sdpa_equals_eager(family, method):
    results = {}
    for attn in ("sdpa", "eager"):
        tiny, processor = model(family, attn)
        batch = prompts(processor, method, QUESTIONS[:2])
        with vlmkit.apply(tiny, spec(method)) as patch:
            with torch.no_grad():
                logits = tiny(**batch).logits[:, -1]
            results[attn] = (logits, decisions(patch), generate(tiny, batch))
    (sdpa_logits, sdpa_decisions, sdpa_tokens), (eager_logits, eager_decisions, eager_tokens) = results["sdpa"], results["eager"]
    assert same_decisions(sdpa_decisions, eager_decisions)
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(sdpa_tokens, eager_tokens)


def test_a_family_a_method_cannot_run_on_is_refused_by_name():
    from vlmkit.methods.prune.random import RandomPrune

    class NoQwen(RandomPrune):
        name = "no_qwen"
        unsupported = {"qwen2_vl": "it needs a [CLS] token"}

    tiny, _ = model("qwen2_vl")
    with pytest.raises(UnsupportedModelError, match=r"no_qwen does not support qwen2_vl: it needs a \[CLS\] token\. It runs on: llava, "):
        vlmkit.apply(tiny, NoQwen(keep=0.5))
    with vlmkit.apply(model("llava")[0], NoQwen(keep=0.5)):
        pass


VIDEO_FAMILIES = [f for f in FAMILIES if "video" in adapter_for(model(f)[0]).placeholder_ids()]


@pytest.mark.parametrize("family,method", cases(STACK, VIDEO_FAMILIES))
def test_video_keeps_the_invariants(family, method):
    tiny, processor = model(family)
    batch = inputs(processor, [noise_video(4, seed=1), noise_video(4, seed=2)], QUESTIONS[:2], modality="video")
    with torch.no_grad():
        logits = tiny(**batch).logits
    if REGISTRY.get(method).neutral is not None:
        with vlmkit.apply(tiny, spec(method, "neutral")), torch.no_grad():
            assert torch.equal(tiny(**batch).logits, logits)
    with vlmkit.apply(tiny, spec(method)) as patch:
        with torch.no_grad():
            assert not torch.equal(tiny(**batch).logits, logits), "the example setting must change the output"
        cached = generate(tiny, batch)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, use_cache=False), cached)
        torch.manual_seed(0)
        beams = generate(tiny, batch, num_beams=2)
        with patch.reuse_selections():
            torch.manual_seed(0)
            assert torch.equal(generate(tiny, batch, num_beams=2, use_cache=False), beams)
