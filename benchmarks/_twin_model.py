"""The model and inputs shared by the prefill and decoding benchmarks.

A LLaVA-1.5 layout, 576 visual tokens per image from a small CLIP-shaped tower, in front of the real
Qwen2-0.5B language model geometry (`vlmkit.zoo.twin_config("llava-onevision-qwen2-0.5b")`), with
random weights in fp32, and a prompt of 64 random text tokens around one image.
"""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

from vlmkit.zoo import twin_config

VISUAL_TOKENS = 576
TEXT_TOKENS = 64
IMAGE_TOKEN = 4


def twin_parts():
    """(text config of the Qwen2-0.5B geometry, the small CLIP-shaped tower's config)."""
    text = twin_config("llava-onevision-qwen2-0.5b").text_config
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2)
    return text, vision


def build_model() -> LlavaForConditionalGeneration:
    text, vision = twin_parts()
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=VISUAL_TOKENS)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def build_anyres_model() -> LlavaNextForConditionalGeneration:
    """The same parts in the LLaVA-NeXT layout: a 336 x 672 image as its base view plus two tiles."""
    text, vision = twin_parts()
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                             image_grid_pinpoints=[[336, 672]])
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval()


def build_anyres_inputs(model: LlavaNextForConditionalGeneration) -> tuple[dict[str, torch.Tensor], int]:
    """One 336 x 672 image (base view + 2 tiles) between 8 and 56 text tokens; and its visual token count."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 3, 336, 336, generator=generator)
    sizes = torch.tensor([[336, 672]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    visual = sum(int(f.shape[0]) for f in features)
    text = torch.randint(10, 700, (1, TEXT_TOKENS), generator=generator)
    ids = torch.cat([text[:, :8], torch.full((1, visual), IMAGE_TOKEN), text[:, 8:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}, visual


def build_inputs(batch: int = 1) -> dict[str, torch.Tensor]:
    """`batch` copies of the prompt layout (8 text tokens, the image, 56 text tokens), each with its own draws."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 700, (batch, TEXT_TOKENS), generator=generator)
    ids = torch.cat([text[:, :8], torch.full((batch, VISUAL_TOKENS), IMAGE_TOKEN), text[:, 8:]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=generator),
    }
