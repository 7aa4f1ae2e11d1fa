"""`vlmkit.apply`, specs, the registry and every error a user can meet, with its message."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vlmkit
import vlmkit.engine.install
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from vlmkit.errors import ConfigError, ConflictError, InputError, UnknownMethodError, UnsupportedModelError
from vlmkit.methods import FastV, VisionZip


def tiny_llava():
    return model("llava")[0]


def test_spec_strings_and_objects_are_equivalent():
    assert vlmkit.parse_spec("fastv:layer=3,keep=0.25").config == FastV(layer=3, keep=0.25).config
    assert vlmkit.parse_spec("visionzip:dominant=54,contextual=10").config.dominant == 54
    assert vlmkit.parse_spec("fastv").config == FastV().config
    assert repr(vlmkit.parse_spec("fastv:keep=0.5")) == "FastV(keep=0.5)"


def test_list_methods_describes_every_method():
    infos = {info.name: info for info in vlmkit.list_methods()}
    assert {"fastv", "visionzip", "random", "pool"} <= set(infos)
    fastv = infos["fastv"]
    assert (fastv.family, fastv.site) == ("prune", "layer")
    params = {p.name: p for p in fastv.params}
    assert params["layer"].default == 2 and "decoder layer" in params["layer"].help
    assert infos["visionzip"].paper.startswith("https://arxiv.org/")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("fastvv:keep=0.5", UnknownMethodError, r"unknown method 'fastvv'\. Did you mean 'fastv'\?.*Valid methods: .*fastv"),
        ("fastv:kep=0.5", UnknownMethodError, r"unknown parameter 'kep'.*Did you mean 'keep'\?.*Valid parameters: keep, tokens, positions, layer"),
        ("fastv:keep=1.5", ConfigError, r"keep=1\.5 is out of range.*\(0, 1\]"),
        ("fastv:keep=0", ConfigError, r"keep=0 is out of range"),
        ("fastv:tokens=0", ConfigError, r"tokens=0 is out of range"),
        ("fastv:keep=0.5,tokens=3", ConfigError, "not both"),
        ("fastv:layer=0", ConfigError, r"layer=0 must be an integer >= 1"),
        ("fastv:layer=9", ConfigError, r"layer=9 is out of range .* 4 decoder layers \(valid: 0\.\.3\)"),
        ("fastv:positions=shuffle", ConfigError, r"positions='shuffle' is not one of auto, keep, reindex"),
        ("visionzip:vision_layer=7", ConfigError, r"vision_layer=7 is out of range for a vision tower with 3 layers"),
        ("visionzip:dominant=4,tokens=9", ConfigError, "not both"),
        ("fastv:keep", ConfigError, "is not key=value"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, error, message):
    tiny = tiny_llava()
    with pytest.raises(error, match=message):
        vlmkit.apply(tiny, spec)
    assert "forward" not in tiny.model.language_model.__dict__  # nothing was installed


def test_unsupported_model_names_the_supported_ones():
    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration.*Qwen2VLForConditionalGeneration"):
        vlmkit.apply(text_only, "fastv")


def test_applying_twice_and_conflicting_sites_are_refused():
    tiny = tiny_llava()
    with vlmkit.apply(tiny, "fastv"):
        with pytest.raises(ConflictError, match="already has a vlmkit patch"):
            vlmkit.apply(tiny, "pool")
    with pytest.raises(ConflictError, match="applied twice"):
        vlmkit.apply(tiny, "fastv:keep=0.5", FastV(keep=0.3))
    with pytest.raises(ConflictError, match="both select tokens before decoder layer 0"):
        vlmkit.apply(tiny, "visionzip", "pool")
    with pytest.raises(ConflictError, match="before decoder layer 2"):
        vlmkit.apply(tiny, "fastv:layer=2", "random:layer=2")
    with vlmkit.apply(tiny, "visionzip", "random:layer=1", "fastv:layer=3") as patch:
        assert "visionzip,random,fastv:stack" in patch.hooks
    assert "Patch(LlavaForConditionalGeneration: removed)" == repr(patch)


def test_placeholder_mismatch_is_an_input_error():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    ids = batch["input_ids"].clone()
    ids[0, torch.nonzero(ids[0] == tiny.config.image_token_id)[0]] = 0  # one placeholder fewer
    with vlmkit.apply(tiny, "fastv"), pytest.raises(InputError, match="image/placeholder count mismatch"):
        tiny(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])


def test_text_only_calls_go_through_the_original_forward():
    tiny, processor = model("llava")
    text = processor.tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        expected = tiny(**text).logits
    with vlmkit.apply(tiny, "fastv:keep=0.25"), torch.no_grad():
        assert torch.equal(tiny(**text).logits, expected)


def test_patches_are_per_instance():
    first, _ = model("llava")
    second, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with torch.no_grad():
        expected = second(**batch).logits
    with vlmkit.apply(first, "fastv:keep=0.25"), torch.no_grad():
        assert torch.equal(second(**batch).logits, expected)


def test_remove_in_reverse_after_an_error_mid_install(monkeypatch):
    tiny = tiny_llava()
    snapshot = dict(tiny.model.__dict__)

    def broken(patch, plan):
        raise RuntimeError("boom")

    monkeypatch.setattr(vlmkit.engine.install, "_install_visual_tracking", broken)
    with pytest.raises(RuntimeError, match="boom"):
        vlmkit.apply(tiny, "visionzip")
    assert tiny.model.__dict__.keys() == snapshot.keys()
    monkeypatch.undo()
    with vlmkit.apply(tiny, "visionzip"):
        pass


def test_method_objects_validate_their_types():
    with pytest.raises(TypeError, match="expects a VisionZipConfig"):
        VisionZip(FastV().config)
    with pytest.raises(ConfigError, match="at least one method spec"):
        vlmkit.apply(tiny_llava())


def test_a_deep_copy_of_a_patched_model_computes_with_its_own_weights():
    from vlmkit import zoo

    original, processor = zoo.tiny("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    patch = vlmkit.apply(original, "fastv:layer=2,keep=0.5")
    with torch.no_grad():
        before = original(**batch).logits
    clone = copy.deepcopy(original)
    clone_patch = vlmkit.patch_of(clone)
    assert clone_patch is not None and clone_patch is not patch and clone_patch.model is clone
    with torch.no_grad():
        assert torch.equal(clone(**batch).logits, before)
        for parameter in clone.model.language_model.layers.parameters():
            parameter.zero_()
        assert not torch.equal(clone(**batch).logits, before)  # the copy reads its own (zeroed) layers
        assert torch.equal(original(**batch).logits, before)  # and the original is untouched
        assert [len(k) for k in clone_patch.selections["fastv"]] == [72]
    patch.remove()
    assert vlmkit.patch_of(original) is None and vlmkit.patch_of(clone) is clone_patch
    with vlmkit.apply(original, "pool:keep=0.5"):  # the original can be patched again
        pass
    clone_patch.remove()
    assert "forward" not in clone.model.language_model.__dict__ and "__deepcopy__" not in clone.__dict__


def test_booleans_are_not_budgets():
    for spec in ("fastv:keep=True", "pool:tokens=True", "visionzip:keep=False"):
        with pytest.raises(ConfigError, match="must be a number in|must be an integer|out of range"):
            vlmkit.api.parse_spec(spec)


def test_embeddings_without_ids_are_refused_where_visual_tokens_must_be_found():
    """With a method on the decoder stack, vlmkit finds each image's tokens from input_ids: a prefill
    given only inputs_embeds would silently skip the method, so it is an error naming the fix."""
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with torch.no_grad():
        embeds = tiny.get_input_embeddings()(batch["input_ids"])
    with vlmkit.apply(tiny, "fastv:keep=0.5"), pytest.raises(ConfigError, match="pass input_ids .* instead of inputs_embeds"):
        tiny(inputs_embeds=embeds, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
