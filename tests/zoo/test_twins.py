import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.zoo import TWINS, flops, published_parameters, tiny, twin, twin_config, twin_processor


@pytest.mark.parametrize("name", TWINS)
def test_meta_twin_has_the_published_parameter_count(name):
    model = twin(name)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == published_parameters(name)


def test_llava_7b_twin_geometry():
    model = twin("llava-1.5-7b", dtype=torch.bfloat16)
    assert 7.06e9 < sum(p.numel() for p in model.parameters()) < 7.07e9
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (4096, 32, 32064)
    assert model.config.vision_config.image_size == 336
    assert next(model.parameters()).dtype == torch.bfloat16


def test_twin_processor_expands_to_the_real_visual_token_count():
    processor = twin_processor("llava-1.5-7b")
    config = twin_config("llava-1.5-7b")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert inputs.pixel_values.shape[-2:] == (336, 336)
    assert int((inputs.input_ids == config.image_token_index).sum()) == 576


def test_unknown_twin_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available twins: llava-1.5-7b, llava-onevision-qwen2-0.5b, qwen2-vl-2b"):
        twin("llava-7b")


def test_flops_by_hand_on_the_tiny_llava():
    model, _ = tiny("llava")  # d=64, 4 heads of 16 over 2 KV heads, MLP 128, 4 layers
    n = 10 + 144
    projections = 2 * n * 64 * 16 * (2 * 4 + 2 * 2)
    attention = 4 * 4 * 16 * n * n
    mlp = 6 * n * 64 * 128
    assert flops(model, 10, 144) == 4 * (projections + attention + mlp)
    causal_attention = 4 * 4 * 16 * n * (n + 1) / 2
    assert flops(model.config, 10, 144, causal=True) == 4 * (projections + causal_attention + mlp)
    assert flops(model, 10, 144, include_lm_head=True) - flops(model, 10, 144) == 2 * 64 * 762


def test_flops_per_layer_schedule_and_errors():
    config = twin_config("llava-1.5-7b")
    full = flops(config, 64, 576)
    assert 8.4e12 < full < 8.6e12  # ~2 x 6.5e9 layer parameters x 640 tokens, plus attention
    fastv = flops(config, 64, [576] * 2 + [144] * 30)
    assert flops(config, 64, 144) < fastv < full
    with pytest.raises(ConfigError, match="one per decoder layer \\(32\\)"):
        flops(config, 64, [576, 144])


@pytest.mark.slow
def test_materialised_onevision_twin_runs():
    model = twin("llava-onevision-qwen2-0.5b", device="cpu")
    processor = twin_processor("llava-onevision-qwen2-0.5b")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray(np.zeros((384, 384, 3), dtype=np.uint8))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    assert torch.isfinite(logits).all()
