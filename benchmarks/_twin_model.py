"""The models and inputs shared by the prefill and decoding benchmarks.

A LLaVA-1.5 layout, 576 visual tokens per image from a small CLIP-shaped tower, in front of the real
Qwen2-0.5B language model geometry (`vlmkit.zoo.twin_config("llava-onevision-qwen2-0.5b")`), with
random weights in fp32, and a prompt of 64 random text tokens around one image; the same parts in
the LLaVA-NeXT layout (AnyRes) and in the LLaVA-OneVision video layout (196 tokens a frame).
"""
from __future__ import annotations

import time

import torch
from transformers import (
    CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, StoppingCriteria,
)

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


VIDEO_TOKEN = 5


def build_video_model() -> LlavaOnevisionForConditionalGeneration:
    """The same parts in the LLaVA-OneVision layout: a 384-pixel, 14-pixel-patch tower (27 x 27
    patches, [CLS] dropped), each video frame pooled 2 x 2 to 14 x 14 = 196 tokens, as
    LLaVA-OneVision-Qwen2-0.5B's SigLIP does."""
    text, _ = twin_parts()
    vision = CLIPVisionConfig(image_size=384, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                  video_token_index=VIDEO_TOKEN, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def build_video_inputs(frames: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """One `frames`-frame clip between 8 and 56 random text tokens; and its visual token count
    (196 a frame plus the newline token)."""
    generator = torch.Generator().manual_seed(0)
    visual = frames * 196 + 1
    text = torch.randint(10, 700, (1, TEXT_TOKENS), generator=generator)
    ids = torch.cat([text[:, :8], torch.full((1, visual), VIDEO_TOKEN), text[:, 8:]], dim=1)
    pixels = torch.randn(1, frames, 3, 384, 384, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}, visual


class StepStamps(StoppingCriteria):
    """Records (CPU time, wall time) at every decoding step; never stops generation."""

    def __init__(self):
        self.stamps = [(time.process_time(), time.perf_counter())]

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.stamps.append((time.process_time(), time.perf_counter()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
