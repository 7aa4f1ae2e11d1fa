import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.zoo import FAMILIES, tiny


def _prompt(processor, kind="image", text="What is shown?"):
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _image(seed: int, size=(64, 64)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, processor = tiny(request.param)
    return request.param, model, processor


def test_forward_and_generate_one_image(family_model):
    _, model, processor = family_model
    inputs = processor(images=_image(0), text=_prompt(processor), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[-1] == inputs.input_ids.shape[-1] + 8


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid families: llava"):
        tiny("lava")
