"""Tiny randomly initialised twins of the supported VLM families, built offline from config.

Each family keeps the real architecture (same Hugging Face classes, same feature-selection layout,
AnyRes tiling, M-RoPE, video pooling) at a size that runs a forward and a short `generate()` in a
fraction of a second on a CPU: text hidden 64, 4 decoder layers, 4 query heads over 2 KV heads
(grouped-query attention), vision width 32 with 2-3 layers, and at least 64 visual tokens per image.

Weights come from `init_weights` with a private generator: the same seed gives bit-identical
weights in any process, and the global torch RNG is left untouched. The standard deviation
(`text_config.initializer_range`, 0.2 by default) is large enough that attention is far from
uniform, so attention-based token rankings have no near-ties.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    CONFIG_MAPPING,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    FastVlmConfig,
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GotOcr2ImageProcessor,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SmolVLMConfig,
    SmolVLMImageProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.initialization import no_init_weights

from vlmkit.errors import ConfigError, did_you_mean
from vlmkit.zoo.tokenizer import tiny_tokenizer

INIT_STD = 0.2

# Text decoder geometry shared by every family (Llama or Qwen2 layout).
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "initializer_range": INIT_STD,
}


@dataclasses.dataclass(frozen=True)
class _Family:
    """How to build one tiny family: config defaults, classes, and the processor for a config."""

    config_class: type[PreTrainedConfig]
    defaults: dict[str, Any]
    # (merged config kwargs, tokenizer) -> {"key" or "sub_config.key": value} set from them
    derived: Callable[[dict[str, Any], Any], dict[str, Any]]
    processor: Callable[[PreTrainedConfig, Any], ProcessorMixin]
    # never generate an image or video placeholder: its random weights would, now and then, and a
    # placeholder fed back without an image to fill it breaks a forward over the whole sequence
    suppress_placeholders: bool = False


def _tokenizer_keys(tokenizer) -> dict[str, Any]:
    return {
        "text_config.vocab_size": len(tokenizer),
        "text_config.pad_token_id": tokenizer.pad_token_id,
        "text_config.bos_token_id": tokenizer.bos_token_id,
        "text_config.eos_token_id": tokenizer.eos_token_id,
    }


def _llava_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    vision = kwargs["vision_config"]
    return {
        **_tokenizer_keys(tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
    }


def _llava_next_video_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    return {**_llava_derived(kwargs, tokenizer), "video_token_index": tokenizer.convert_tokens_to_ids("<video>")}


def _onevision_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    return {
        **_tokenizer_keys(tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "video_token_index": tokenizer.convert_tokens_to_ids("<video>"),
    }


def _qwen2_vl_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        **_tokenizer_keys(tokenizer),
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "vision_config.hidden_size": kwargs["text_config"]["hidden_size"],  # the merger's output width
    }


def _qwen2_5_vl_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    derived = _qwen2_vl_derived(kwargs, tokenizer)
    derived["vision_config.out_hidden_size"] = derived.pop("vision_config.hidden_size")  # the merger's output width
    return derived


def _internvl_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    vision = kwargs["vision_config"]
    side = vision["image_size"] // vision["patch_size"]  # patches per tile side, before the pixel shuffle
    return {
        **_tokenizer_keys(tokenizer),
        "image_token_id": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        "image_seq_length": int(side * kwargs["downsample_ratio"]) ** 2,
    }


def _idefics3_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    return {**_tokenizer_keys(tokenizer), "image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


def _fast_vlm_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    model_args = kwargs["vision_config"]["model_args"]
    return {
        **_tokenizer_keys(tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        # FastViT's final conv widens the last stage by its cls_ratio (2): the features the projector reads
        "vision_config.hidden_size": int(model_args["embed_dims"][-1] * model_args.get("cls_ratio", 2.0)),
    }


def _gemma3_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        **_tokenizer_keys(tokenizer),
        "image_token_index": ids("<image_soft_token>"),
        "boi_token_index": ids("<start_of_image>"),
        "eoi_token_index": ids("<end_of_image>"),
    }


def _square(side: int) -> dict[str, int]:
    return {"height": side, "width": side}


def _llava_processor(
    config: LlavaConfig | LlavaNextConfig | LlavaNextVideoConfig, tokenizer
) -> LlavaProcessor | LlavaNextProcessor | LlavaNextVideoProcessor:
    """LLaVA-1.5 processor; LLaVA-NeXT's (AnyRes over the config's pinpoints) for a `LlavaNextConfig`;
    LLaVA-NeXT-Video's (LLaVA-NeXT's images, frames resized like the base view) for a `LlavaNextVideoConfig`."""
    side = config.vision_config.image_size
    resize = {"size": {"shortest_edge": side}, "crop_size": _square(side)}
    media = {}
    if isinstance(config, LlavaConfig):
        processor_class = LlavaProcessor
        media["image_processor"] = CLIPImageProcessor(**resize)
    else:
        processor_class = LlavaNextProcessor
        media["image_processor"] = LlavaNextImageProcessor(**resize, image_grid_pinpoints=config.image_grid_pinpoints)
    if isinstance(config, LlavaNextVideoConfig):
        processor_class = LlavaNextVideoProcessor
        media["video_processor"] = LlavaNextVideoVideoProcessor(**resize)
    return processor_class(
        **media,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's [CLS]
        chat_template=tokenizer.chat_template,
    )


def _onevision_processor(config: LlavaOnevisionConfig, tokenizer) -> LlavaOnevisionProcessor:
    side = config.vision_config.image_size
    siglip_norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=_square(side), image_grid_pinpoints=config.image_grid_pinpoints, **siglip_norm
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=_square(side), **siglip_norm),
        tokenizer=tokenizer,
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=tokenizer.chat_template,
    )


def _qwen2_vl_processor(config: Qwen2VLConfig, tokenizer, pixels: tuple[int, int] | None = None) -> Qwen2VLProcessor:
    """Qwen2-VL processor for `config`; `pixels` is the (min, max) pixel count of a resized image."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size  # pixels per side of one visual token
    low, high = pixels or ((8 * unit) ** 2, (16 * unit) ** 2)  # tiny default: 8x8 to 16x16 tokens
    geometry = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "size": {"shortest_edge": low, "longest_edge": high},
    }
    processor_class = Qwen2_5_VLProcessor if isinstance(config, Qwen2_5_VLConfig) else Qwen2VLProcessor
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**geometry),
        video_processor=Qwen2VLVideoProcessor(**geometry, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _qwen3_vl_processor(config: Qwen3VLConfig, tokenizer) -> Qwen3VLProcessor:
    """Qwen3-VL's processor: Qwen2-VL's image geometry (8x8 to 16x16 tokens per image); a video's frames
    as Qwen3-VL's video processor samples them, each temporal patch after its timestamp."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    geometry = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "size": {"shortest_edge": (8 * unit) ** 2, "longest_edge": (16 * unit) ** 2},
    }
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry),
        video_processor=Qwen3VLVideoProcessor(**geometry, do_sample_frames=False, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _internvl_processor(config: InternVLConfig, tokenizer) -> InternVLProcessor:
    """InternVL's processor: each image cut into up to 6 tiles of the tower's size (the grid closest to its
    aspect ratio) plus a thumbnail, ImageNet normalisation; `image_seq_length` placeholders per tile."""
    side, _ = config.vision_config.image_size
    imagenet_norm = {"image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=_square(side), crop_to_patches=True, max_patches=6, **imagenet_norm),
        video_processor=InternVLVideoProcessor(size=_square(side), **imagenet_norm),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=tokenizer.chat_template,
    )


def _idefics3_processor(config: Idefics3Config | SmolVLMConfig, tokenizer) -> Idefics3Processor:
    """Idefics3's processor (SmolVLM's image processor for a `SmolVLMConfig`): each image resized to a
    longest edge of two tiles, cut into the tiles of the tower's size (up to 2 x 2, row-major) plus the
    whole image at one tile's size (the global image); (tower side / patch / scale_factor)^2
    placeholders per tile. SmolVLM's own processor writes the same image prompt but needs `num2words`
    (for its video timestamps), so both families use Idefics3's."""
    side = config.vision_config.image_size
    image_processor_class = SmolVLMImageProcessor if isinstance(config, SmolVLMConfig) else Idefics3ImageProcessor
    return Idefics3Processor(
        image_processor=image_processor_class(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side}),
        tokenizer=tokenizer,
        image_seq_len=(side // config.vision_config.patch_size // config.scale_factor) ** 2,
        chat_template=tokenizer.chat_template,
    )


#: FastViTHD's output stride: a 4x stem and four 2x downsampling stages (one token per 64x64 pixels)
FAST_VLM_STRIDE = 64


def _fast_vlm_processor(config: FastVlmConfig, tokenizer) -> LlavaProcessor:
    """FastVLM's processor (LLaVA's, as the converted checkpoints ship it): each image resized to a
    shortest edge of sqrt(`image_seq_length`) * 64 pixels and centre-cropped square, pixel values in
    [0, 1] (no mean or std), one placeholder per 64 x 64 pixels."""
    side = math.isqrt(config.image_seq_length) * FAST_VLM_STRIDE
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size=_square(side), image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]
        ),
        tokenizer=tokenizer,
        patch_size=FAST_VLM_STRIDE,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=0,
        chat_template=tokenizer.chat_template,
    )


class _Gemma3Processor(Gemma3Processor):
    """Gemma 3's processor that also takes a batch's images as one flat list, in prompt order (as the other
    families' processors do); Gemma 3's own wants one list of images per prompt."""

    def __call__(self, images=None, text=None, **kwargs):
        flat = isinstance(images, (list, tuple)) and images and not isinstance(images[0], (list, tuple))
        if flat and isinstance(text, (list, tuple)) and len(text) > 1:
            counts = [prompt.count(self.boi_token) for prompt in text]
            if sum(counts) == len(images):
                starts = [sum(counts[:row]) for row in range(len(counts))]
                images = [list(images[start : start + count]) for start, count in zip(starts, counts)]
        return super().__call__(images=images, text=text, **kwargs)


def _gemma3_processor(config: Gemma3Config, tokenizer) -> Gemma3Processor:
    """Gemma 3's processor: each image resized to the tower's square, SigLIP's [-1, 1] pixels,
    `mm_tokens_per_image` placeholders; pan-and-scan off by default, as in the released processor, and
    when asked for (`do_pan_and_scan=True`) an image of aspect ratio 1.2 or more also gets 2 to 4 crops of
    at least half the tower's side, each resized to the tower's square and written after the whole image."""
    side = config.vision_config.image_size
    pan_and_scan = {
        "do_pan_and_scan": False, "pan_and_scan_min_crop_size": side // 2, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }
    processor = _Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size=_square(side), image_mean=[0.5] * 3, image_std=[0.5] * 3, **pan_and_scan),
        tokenizer=tokenizer,
        image_seq_length=config.mm_tokens_per_image,
        chat_template=tokenizer.chat_template,
    )
    # the processor's own image defaults (a 256-pixel minimum crop) take precedence over its image processor's
    processor.images_kwargs = {**Gemma3Processor.images_kwargs, **pan_and_scan}
    return processor


_CLIP_TOWER = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 4,
    "projection_dim": 32,
}
# AnyRes grids (pixels) for a 32-pixel tower: every image is tiled into 2 or 4 crops.
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
_LLAVA_NEXT = {
    "vision_config": {**_CLIP_TOWER, "image_size": 32},
    "text_config": {"model_type": "llama", **_TEXT},
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "image_grid_pinpoints": _PINPOINTS,
}

_FAMILIES: dict[str, _Family] = {
    # LLaVA-1.5 layout: CLIP tower with [CLS], second-to-last layer, CLS dropped, 2-layer MLP.
    # 48x48 pixels in 4x4 patches: 144 visual tokens per image.
    "llava": _Family(
        config_class=LlavaConfig,
        defaults={
            "vision_config": {**_CLIP_TOWER, "image_size": 48},
            "text_config": {"model_type": "llama", **_TEXT},
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
        },
        derived=_llava_derived,
        processor=_llava_processor,
    ),
    # LLaVA-NeXT: the same tower at 32x32 (64 tokens per crop), AnyRes tiling over
    # `_PINPOINTS` plus the base image, unpadding and one image_newline per row of patches.
    "llava_next": _Family(
        config_class=LlavaNextConfig,
        defaults=_LLAVA_NEXT,
        derived=_llava_derived,
        processor=_llava_processor,
    ),
    # LLaVA-OneVision: SigLIP tower (no [CLS], last layer, "full"), Qwen2 decoder, AnyRes with
    # anyres_max_9; videos are frames of 64 tokens pooled 2x2 to 16, plus one newline per video.
    "llava_onevision": _Family(
        config_class=LlavaOnevisionConfig,
        defaults={
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 4,
                "vision_use_head": False,
            },
            "text_config": {"model_type": "qwen2", **_TEXT},
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "projector_hidden_act": "gelu",
            "image_grid_pinpoints": _PINPOINTS,
        },
        derived=_onevision_derived,
        processor=_onevision_processor,
    ),
    # Qwen2-VL: native-resolution ViT (4-pixel patches, 2x2 merge, 2-frame temporal patches)
    # and M-RoPE over (t, h, w) in the decoder; 64 to 256 visual tokens per image or frame pair.
    "qwen2_vl": _Family(
        config_class=Qwen2VLConfig,
        defaults={
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": 2,
                "embed_dim": 32,
                "num_heads": 4,
                "mlp_ratio": 2,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "text_config": {
                "model_type": "qwen2_vl_text",
                **_TEXT,
                # head_dim 16: 8 rotary frequencies split over (t, h, w) like Qwen2-VL's [16, 24, 24]
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            },
        },
        derived=_qwen2_vl_derived,
        processor=_qwen2_vl_processor,
    ),
    # Qwen2.5-VL: the same geometry, with windowed attention in the tower (windows of 2x2 merged
    # tokens, 16 pixels) except in its last block, and SwiGLU tower MLPs.
    "qwen2_5_vl": _Family(
        config_class=Qwen2_5_VLConfig,
        defaults={
            "vision_config": {
                "model_type": "qwen2_5_vl",
                "depth": 3,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 16,
                "fullatt_block_indexes": [2],
            },
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                **_TEXT,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            },
        },
        derived=_qwen2_5_vl_derived,
        processor=_qwen2_vl_processor,
    ),
    # Qwen3-VL: Qwen2-VL's geometry with a learned position grid (10x10, interpolated to each image) in the
    # tower, DeepStack (the merged outputs of tower blocks 0 and 1 added to the hidden states of the
    # visual tokens after decoder layers 0 and 1), q/k norms and interleaved M-RoPE sections in the decoder.
    "qwen3_vl": _Family(
        config_class=Qwen3VLConfig,
        defaults={
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "depth": 3,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 100,
                "deepstack_visual_indexes": [0, 1],
            },
            "text_config": {
                "model_type": "qwen3_vl_text",
                **_TEXT,
                "head_dim": 16,
                "rope_parameters": {
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                },
            },
        },
        derived=_qwen2_5_vl_derived,
        processor=_qwen3_vl_processor,
        suppress_placeholders=True,
    ),
    # LLaVA-NeXT-Video: LLaVA-NeXT's images (the same tower, AnyRes and newlines), Llama with the
    # vicuna template; video frames of 64 tokens average-pooled 2x2 to 16 before the projector, no
    # newline.
    "llava_next_video": _Family(
        config_class=LlavaNextVideoConfig,
        defaults={**_LLAVA_NEXT, "spatial_pool_mode": "average", "spatial_pool_stride": 2},
        derived=_llava_next_video_derived,
        processor=_llava_processor,
        suppress_placeholders=True,
    ),
    # InternVL: InternViT tower ([CLS] first, dropped by "default"; layer scale), last layer; the pixel
    # shuffle joins 2x2 patches (16x16 -> 64 tokens per 64-pixel tile) before the MLP projector; up to 6
    # tiles plus a thumbnail per image; Qwen2 with InternVL's chatml template.
    "internvl": _Family(
        config_class=InternVLConfig,
        defaults={
            "vision_config": {
                "model_type": "internvl_vision",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 4,
            },
            "text_config": {"model_type": "qwen2", **_TEXT},
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "downsample_ratio": 0.5,
            "projector_hidden_act": "gelu",
        },
        derived=_internvl_derived,
        processor=_internvl_processor,
        suppress_placeholders=True,
    ),
    # Idefics3: SigLIP-style tower (no [CLS]; NaViT position buckets), last layer after its
    # post-layernorm; the connector's pixel shuffle joins 2x2 patches (16x16 -> 64 tokens per 64-pixel
    # tile) before one linear map; up to 2 x 2 tiles plus the global image; Llama.
    "idefics3": _Family(
        config_class=Idefics3Config,
        defaults={
            "vision_config": {
                "model_type": "idefics3_vision",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 4,
            },
            "text_config": {"model_type": "llama", **_TEXT},
            "scale_factor": 2,
        },
        derived=_idefics3_derived,
        processor=_idefics3_processor,
        suppress_placeholders=True,
    ),
    # SmolVLM: Idefics3's architecture with SmolVLM-Instruct's wider shuffle: 3x3 patches per token
    # (24x24 2-pixel patches -> 64 tokens per 48-pixel tile; the released model: 27x27 -> 81).
    "smolvlm": _Family(
        config_class=SmolVLMConfig,
        defaults={
            "vision_config": {
                "model_type": "smolvlm_vision",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 48,
                "patch_size": 2,
            },
            "text_config": {"model_type": "llama", **_TEXT},
            "scale_factor": 3,
        },
        derived=_idefics3_derived,
        processor=_idefics3_processor,
        suppress_placeholders=True,
    ),
    # FastVLM: a FastViTHD tower (timm's fastvit_mci3 through TimmWrapper, created offline, reparameterised
    # as the released model): a conv stem and three RepMixer stages, then two stages of self-attention
    # blocks; one token per 64 x 64 pixels (512-pixel images: an 8 x 8 grid), the final conv's features
    # through a 2-layer MLP; Qwen2 with FastVLM's chatml template.
    "fast_vlm": _Family(
        config_class=FastVlmConfig,
        defaults={
            "vision_config": {
                "model_type": "timm_wrapper",
                "architecture": "fastvit_mci3",
                "do_pooling": False,  # the model reads the feature grid, never the pooled vector
                "model_args": {
                    "inference_mode": True,
                    "layers": [1, 1, 1, 1, 2],
                    "embed_dims": [8, 16, 32, 32, 64],  # attention stages: multiples of the 32-wide heads
                    "mlp_ratios": [2, 2, 2, 2, 2],
                },
            },
            "text_config": {"model_type": "qwen2", **_TEXT},
            "image_seq_length": 64,
            "projector_hidden_act": "gelu",
        },
        derived=_fast_vlm_derived,
        processor=_fast_vlm_processor,
        suppress_placeholders=True,
    ),
    # Gemma 3: a SigLIP tower (no [CLS], no pooling head) on 64-pixel images (16 x 16 patches), its last layer
    # average-pooled 2 x 2 to 64 tokens, RMS-normed and projected by one matrix; a Gemma 3 decoder whose
    # sliding-window layers (a 16-token window, local rotary base 10^4) surround one global layer (base
    # 10^6), q/k norms, the image's tokens attending to each other both ways; pan-and-scan crops on request.
    "gemma3": _Family(
        config_class=Gemma3Config,
        defaults={
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 4,
                "vision_use_head": False,
            },
            "text_config": {
                "model_type": "gemma3_text",
                **_TEXT,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                },
            },
            "mm_tokens_per_image": 64,
        },
        derived=_gemma3_derived,
        processor=_gemma3_processor,
        suppress_placeholders=True,
    ),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(name: str) -> _Family:
    if name not in _FAMILIES:
        raise ConfigError(
            f"unknown tiny model family {name!r}; valid families: {', '.join(FAMILIES)}."
            + did_you_mean(name, FAMILIES)
        )
    return _FAMILIES[name]


def _check_keys(given: dict[str, Any], config_class: type, where: str) -> None:
    valid = {field.name for field in dataclasses.fields(config_class)}
    for key in given:
        if key not in valid:
            raise ConfigError(
                f"{where} has no field {key!r}; fix the override (valid fields: {', '.join(sorted(valid))})."
                + did_you_mean(key, valid)
            )


def _set_fields(kwargs: dict[str, Any], values: dict[str, Any]) -> None:
    """Write `{"key" or "sub_config.key": value}` into config kwargs in place."""
    for path, value in values.items():
        *parent, field = path.split(".")
        (kwargs[parent[0]] if parent else kwargs)[field] = value


def _merge(family: _Family, overrides: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Family defaults updated by `overrides` (sub-config dicts merged key by key), then derived keys."""
    kwargs = copy.deepcopy(family.defaults)
    _check_keys(overrides, family.config_class, family.config_class.__name__)
    given = set()
    for key, value in overrides.items():
        if key in ("text_config", "vision_config"):
            if not isinstance(value, dict):
                raise TypeError(f"{key} override must be a dict of config fields, got {type(value).__name__}")
            model_type = value.get("model_type", kwargs[key]["model_type"])
            _check_keys(value, CONFIG_MAPPING[model_type], f"{key} ({model_type})")
            kwargs[key].update(value)
            given.update(f"{key}.{field}" for field in value)
        else:
            kwargs[key] = value
            given.add(key)
    derived = family.derived(kwargs, tokenizer)
    fixed = sorted(given & set(derived))
    if fixed:
        raise ConfigError(
            f"{fixed} are derived from the tiny tokenizer and the other config values; remove them from the overrides."
        )
    _set_fields(kwargs, derived)
    return kwargs


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Re-initialise every parameter of `model` from a private generator seeded with `seed`.

    Norm layers get weight 1 and bias 0, other biases 0, and every other tensor (linear,
    convolution and embedding weights, class embeddings, `image_newline`) a normal with mean 0
    and standard deviation `std`, drawn in `named_parameters()` order (tied tensors once) on the
    parameters' device. The global torch RNG is not used.

    Args:
        model: the model to initialise in place, on one device other than meta.
        seed: generator seed; equal seeds give bit-identical weights on a given device type.
        std: standard deviation of the normal draws.
    """
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    norms = {
        id(param)
        for module in model.modules()
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for param in module.parameters(recurse=False)
    }
    for name, param in model.named_parameters():
        if id(param) in norms:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)


def build_model(
    config: PreTrainedConfig,
    seed: int,
    std: float,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Instantiate `config`'s image-text-to-text model on `device`, tie it, and `init_weights` it.

    The library's own initialisation is skipped (it would draw from the global RNG and be
    overwritten anyway); what timm towers draw regardless comes from a fork of the global RNG, which
    is left as it was. On the meta device nothing is drawn at all.
    """
    with torch.random.fork_rng(devices=[]), torch.device(device), no_init_weights():
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.tie_weights()
    if torch.device(device).type != "meta":
        init_weights(model, seed, std)
    return model.eval()


def tiny(
    family: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny, deterministic, randomly initialised model of `family` with its working processor.

    Args:
        family: one of `FAMILIES`: "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
            "llava_next_video", "internvl", "idefics3", "smolvlm", "qwen3_vl", "fast_vlm", "gemma3".
        seed: weight seed; the same seed gives bit-identical weights in any process.
        attn_implementation: "sdpa", "eager", or any registered `AttentionInterface` name.
        **overrides: fields of the family's top-level config (e.g. `vision_feature_layer=-1`,
            `image_grid_pinpoints=[[32, 64]]`); `text_config={...}` and `vision_config={...}`
            are merged key by key into the tiny defaults (e.g.
            `text_config={"num_hidden_layers": 6}`). Vocabulary size, special-token ids and
            the vision-to-text widths are derived and cannot be overridden. The processor
            follows the final config (image size, patch size, pinpoints).

    Returns:
        `(model, processor)`: the model in eval mode, fp32, on the CPU, with its generation
        config's pad/eos ids set; the processor takes `images=`, `text=` (and `videos=` where
        the family supports them) and has the family's chat template.

    Raises:
        ConfigError: unknown family, unknown config field, or an override of a derived key.

    Example:
        >>> model, processor = tiny("llava")
        >>> prompt = processor.apply_chat_template(
        ...     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
        ...     add_generation_prompt=True,
        ... )
        >>> from PIL import Image
        >>> inputs = processor(images=Image.new("RGB", (48, 48), "red"), text=prompt, return_tensors="pt")
        >>> model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[-1] - inputs.input_ids.shape[-1]
        4
    """
    spec = _family(family)
    tokenizer = tiny_tokenizer(family)
    config = spec.config_class(**_merge(spec, overrides, tokenizer))
    model = build_model(
        config, seed, config.text_config.initializer_range, attn_implementation=attn_implementation
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if spec.suppress_placeholders:
        placeholders = (getattr(config, name, None) for name in ("image_token_id", "video_token_id"))
        model.generation_config.suppress_tokens = [token for token in placeholders if token is not None]
    return model, spec.processor(config, tokenizer)
