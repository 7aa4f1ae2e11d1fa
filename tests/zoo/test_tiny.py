import hashlib

import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.zoo import FAMILIES, tiny

# sha256 (first 16 hex digits) of the seed-0 state_dict, computed in another process: the same
# seed must give the same weights everywhere. A transformers or torch upgrade that changes the
# architecture's parameters or torch's normal sampler changes these; re-derive them then.
GOLDEN_DIGESTS = {
    "llava": "d8e0823a04056451",
    "llava_next": "a2b037ca78196198",
    "llava_onevision": "12105ba348922a13",
    "qwen2_vl": "2fe36fc230a237e8",
    "qwen2_5_vl": "6fc46e2e274f45f2",
    "llava_next_video": "a2b037ca78196198",  # LLaVA-NeXT's weights: its resampler has none
    "internvl": "a44a78abdabb574d",
    "idefics3": "680a0d3078556c22",
    "smolvlm": "1ed4fb2f4651e707",
    "qwen3_vl": "0acec8880a4e79ad",
    "fast_vlm": "c7fc073b29d379a8",
    "gemma3": "2b01ad7f581f5015",
}
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "llava_next_video", "qwen3_vl")


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _prompt(processor, kind="image", text="What is shown?"):
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _image(seed: int, size=(64, 64)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _video(seed: int, frames=4, size=(64, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()


def _token_count(model, input_ids, kind="image") -> int:
    config = model.config
    token_id = getattr(config, f"{kind}_token_index", None) or getattr(config, f"{kind}_token_id")
    return int((input_ids == token_id).sum())


def _generate(model, inputs, steps=8) -> list[list[int]]:
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, processor = tiny(request.param)
    return request.param, model, processor


def test_golden_weights_at_seed_0(family_model):
    family, model, _ = family_model
    assert _digest(model) == GOLDEN_DIGESTS[family]


def test_forward_generate_one_image_with_64_plus_visual_tokens(family_model):
    _, model, processor = family_model
    inputs = processor(images=_image(0), text=_prompt(processor), return_tensors="pt")
    assert _token_count(model, inputs.input_ids) >= 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    (generated,) = _generate(model, inputs)
    assert len(generated) == 8


def test_left_padded_batch_of_two_images_equals_one_by_one(family_model):
    _, model, processor = family_model
    images = [_image(1), _image(2, size=(80, 40))]
    prompts = [_prompt(processor), _prompt(processor, text="Describe the image in one word.")]
    one_by_one = [
        _generate(model, processor(images=image, text=prompt, return_tensors="pt"))[0]
        for image, prompt in zip(images, prompts)
    ]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask[:, 0].tolist().count(0) == 1  # the shorter prompt is padded on the left
    assert _generate(model, batch) == one_by_one
    assert one_by_one[0] != one_by_one[1]


def test_different_images_give_different_greedy_generations(family_model):
    _, model, processor = family_model
    prompt = _prompt(processor)
    generations = {
        tuple(_generate(model, processor(images=_image(seed), text=prompt, return_tensors="pt"))[0])
        for seed in range(3)
    }
    assert len(generations) == 3


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_input(family):
    model, processor = tiny(family)
    prompt = _prompt(processor, kind="video", text="What is moving?")
    processor.tokenizer.padding_side = "left"
    inputs = processor(videos=[_video(0), _video(1)], text=[prompt, prompt], return_tensors="pt", padding=True)
    assert _token_count(model, inputs.input_ids[:1], kind="video") >= 64
    first, second = _generate(model, inputs)
    assert first != second


def test_same_seed_same_model_other_seed_differs():
    model_a, processor = tiny("llava", seed=3)
    model_b, _ = tiny("llava", seed=3)
    model_c, _ = tiny("llava", seed=4)
    inputs = processor(images=_image(0), text=_prompt(processor), return_tensors="pt")
    with torch.no_grad():
        logits_a, logits_b, logits_c = (m(**inputs).logits for m in (model_a, model_b, model_c))
    assert _digest(model_a) == _digest(model_b) != _digest(model_c)
    assert torch.equal(logits_a, logits_b)
    assert not torch.allclose(logits_a, logits_c)


def test_global_rng_untouched():
    state = torch.random.get_rng_state()
    tiny("qwen2_vl", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_attention_over_visual_tokens_is_far_from_uniform():
    model, processor = tiny("llava", attn_implementation="eager")
    inputs = processor(images=_image(0), text=_prompt(processor), return_tensors="pt")
    visual = inputs.input_ids[0] == model.config.image_token_index
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    for layer in attentions:
        scores = layer[0, :, -1, visual].mean(0).sort().values  # last token's attention, head-averaged
        assert scores[-1] / scores[0] > 10
        assert (scores[1:] - scores[:-1]).min() > 0  # no exact ties


def test_overrides_nested_and_flat():
    model, processor = tiny(
        "llava", text_config={"num_hidden_layers": 6}, vision_config={"image_size": 32}, vision_feature_layer=-1
    )
    assert model.config.text_config.num_hidden_layers == 6
    assert model.config.vision_feature_layer == -1
    inputs = processor(images=_image(0), text=_prompt(processor), return_tensors="pt")
    assert _token_count(model, inputs.input_ids) == 64  # the processor follows the 32-pixel tower
    assert model(**inputs).logits.shape[1] == inputs.input_ids.shape[1]


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid families: llava, llava_next, llava_onevision, qwen2_vl"):
        tiny("lava")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision_feature_layr": -1}, "no field 'vision_feature_layr'.*Did you mean 'vision_feature_layer'"),
        ({"text_config": {"num_layers": 2}}, r"text_config \(llama\) has no field 'num_layers'"),
        ({"text_config": {"vocab_size": 10}}, "derived from the tiny tokenizer"),
        ({"image_token_index": 3}, "derived from the tiny tokenizer"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny("llava", **overrides)
