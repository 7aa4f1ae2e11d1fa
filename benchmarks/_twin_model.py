"""The model and inputs shared by the prefill and decoding benchmarks.

A LLaVA-1.5 layout, 576 visual tokens per image from a small CLIP-shaped tower, in front of the real
Qwen2-0.5B language model geometry (`vlmkit.zoo.twin_config("llava-onevision-qwen2-0.5b")`), with
random weights in fp32, and a prompt of 64 random text tokens around one image.
"""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmkit.zoo import twin_config

VISUAL_TOKENS = 576
TEXT_TOKENS = 64
IMAGE_TOKEN = 4


def build_model() -> LlavaForConditionalGeneration:
    text = twin_config("llava-onevision-qwen2-0.5b").text_config
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=VISUAL_TOKENS)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


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
