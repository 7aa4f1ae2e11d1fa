"""Random-weight geometry twins of real checkpoints, built offline from their published config values.

A twin has the real checkpoint's shapes (and so its parameter count, memory and FLOPs) but random
weights: it is for speed and memory benchmarks, never for accuracy. By default it lives on the
meta device (a 7B model does not fit a small machine in fp32); `device="cpu"` materialises it
with the library's random init, which is practical for the 0.5B one.

Token ids (image/video placeholders, pad/bos/eos) are the only config values not taken from the
real checkpoint: they are those of the offline tokenizer, so that `twin_processor(name)` produces
inputs the twin accepts. They choose embedding rows and change no shape.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    LlavaConfig,
    LlavaOnevisionConfig,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
)

from vlmkit.errors import ConfigError, did_you_mean
from vlmkit.zoo import families as _families
from vlmkit.zoo.tokenizer import tiny_tokenizer


@dataclasses.dataclass(frozen=True)
class _Twin:
    hub_id: str
    family: str  # the tiny family with the same layout: its tokenizer, chat template and processor
    config_class: type[PreTrainedConfig]
    config: dict[str, Any]
    parameters: int  # parameter count of the released weights
    processor: Callable[[PreTrainedConfig, Any], ProcessorMixin]


_TWINS: dict[str, _Twin] = {
    # llava-hf/llava-1.5-7b-hf config.json, as vendored in GitHub tung2kg1/AI-Stock-Chart-Analysis
    # (llava-1.5-7b-hf/config.json): CLIP ViT-L/14-336 tower (hidden 1024, 24 layers, 16 heads,
    # MLP 4096, patch 14, image 336, projection 768), vision_feature_layer -2, strategy "default",
    # gelu projector, text vocab 32064 and max_position_embeddings 4096, rms_norm_eps 1e-5, untied
    # lm_head. Its text_config (lmsys/vicuna-7b-v1.5) leaves the rest to LlamaConfig's defaults,
    # which are the Llama-2-7B values spelled out below. Parameter count: the same copy's
    # model.safetensors.index.json total_size 14126854144 bytes of fp16 = 7,063,427,072.
    "llava-1.5-7b": _Twin(
        hub_id="llava-hf/llava-1.5-7b-hf",
        family="llava",
        config_class=LlavaConfig,
        config={
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
            "text_config": {
                "model_type": "llama",
                "vocab_size": 32064,
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": False,
        },
        parameters=7_063_427_072,
        processor=_families._llava_processor,
    ),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf, from transformers'
    # models/llava_onevision/convert_llava_onevision_weights_to_hf.py (huggingface/transformers):
    # SigLIP so400m-patch14-384 tower with hidden 1152, MLP 4304, 16 heads, 26 layers (the last
    # one dropped), patch 14, image 384, no head; "full" features; 729 tokens per crop; text model
    # Qwen/Qwen2-0.5B-Instruct with the vocabulary grown by <image>, <video> and padded to a
    # multiple of 64 (151936 + 2 -> 152000). Qwen2-0.5B geometry (hidden 896, MLP 4864, 24
    # layers, 14 heads, 2 KV heads, rope_theta 1e6, rms_norm_eps 1e-6, tied embeddings) from its
    # config.json as copied into GitHub rwth-i6/i6_experiments
    # (users/juanola/experiments/e25_11_13_ctc/configurations/qwen2/qwen2_configs.py);
    # max_position_embeddings 32768 is the Instruct model's context (no shape depends on it).
    # Layer -1, anyres_max_9 and the 36 pinpoints from 384 to 2304 are LlavaOnevisionConfig's
    # defaults, which the conversion keeps. The count, 893,675,552, is computed from this
    # geometry (not cross-checked against a safetensors index of this checkpoint).
    "llava-onevision-qwen2-0.5b": _Twin(
        hub_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        family="llava_onevision",
        config_class=LlavaOnevisionConfig,
        config={
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 26,
                "num_attention_heads": 16,
                "image_size": 384,
                "patch_size": 14,
                "vision_use_head": False,
            },
            "text_config": {
                "model_type": "qwen2",
                "vocab_size": 152000,
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "tie_word_embeddings": True,
            },
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": True,
        },
        parameters=893_675_552,
        processor=_families._onevision_processor,
    ),
    # Qwen/Qwen2-VL-2B-Instruct config.json, as copied into GitHub PaddlePaddle/PaddleMIX
    # (tests/models/test_qwen2vl.py): text hidden 1536, MLP 8960, 28 layers, 12 heads, 2 KV
    # heads, vocab 151936, tied embeddings, rope_theta 1e6 with mrope_section [16, 24, 24],
    # rms_norm_eps 1e-6, max_position_embeddings 32768; vision depth 32, embed_dim 1280, 16 heads,
    # mlp_ratio 4, patch 14, spatial merge 2, temporal patch 2, output 1536. Processor range
    # min_pixels 3136 / max_pixels 12845056 from its preprocessor_config.json (the values public
    # code commonly uses as the Qwen2-VL defaults). Parameter count: Qwen2-VL-2B's
    # model.safetensors.index.json (GitHub whalefal1/ASR-LLM-TTS-Pipeline-with-live2d,
    # models/qwen_vl/qwen/Qwen2-VL-2B/) total_size 4417971200 bytes of bf16 = 2,208,985,600.
    "qwen2-vl-2b": _Twin(
        hub_id="Qwen/Qwen2-VL-2B-Instruct",
        family="qwen2_vl",
        config_class=Qwen2VLConfig,
        config={
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": 32,
                "embed_dim": 1280,
                "hidden_size": 1536,
                "num_heads": 16,
                "mlp_ratio": 4,
                "in_channels": 3,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "text_config": {
                "model_type": "qwen2_vl_text",
                "vocab_size": 151936,
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": 28,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "max_window_layers": 28,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                "tie_word_embeddings": True,
            },
            "tie_word_embeddings": True,
        },
        parameters=2_208_985_600,
        processor=lambda config, tokenizer: _families._qwen2_vl_processor(config, tokenizer, pixels=(3136, 12845056)),
    ),
}

TWINS: tuple[str, ...] = tuple(_TWINS)


def _spec(name: str) -> _Twin:
    if name not in _TWINS:
        raise ConfigError(
            f"unknown twin {name!r}; available twins: {', '.join(TWINS)}." + did_you_mean(name, TWINS)
        )
    return _TWINS[name]


def published_parameters(name: str) -> int:
    """Parameter count of the checkpoint `name` twins: from its safetensors index where one is cited,
    else computed from its config (the sources are cited in this module)."""
    return _spec(name).parameters


def twin_config(name: str) -> PreTrainedConfig:
    """The config of twin `name`: the real checkpoint's values, token ids from the offline tokenizer.

    Args:
        name: one of `TWINS`.

    Returns:
        A fresh config object (safe to modify).

    Raises:
        ConfigError: unknown name; the message lists the available twins.
    """
    spec = _spec(name)
    kwargs = copy.deepcopy(spec.config)
    tokenizer = tiny_tokenizer(spec.family)
    derived = _families._FAMILIES[spec.family].derived(kwargs, tokenizer).items()
    # the real vocabulary size stays; token ids and the other derived values are the tokenizer's
    _families._set_fields(kwargs, {path: value for path, value in derived if path.split(".")[-1] != "vocab_size"})
    return spec.config_class(**kwargs)


def twin(
    name: str,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A random-weight model with the exact geometry of a real checkpoint.

    Args:
        name: one of `TWINS`: "llava-1.5-7b", "llava-onevision-qwen2-0.5b", "qwen2-vl-2b".
        device: "meta" (default: shapes only, no memory) or a real device, where the weights are
            drawn there by `init_weights` (normal with std = the config's `initializer_range`,
            0.02; norms 1, biases 0) from a generator seeded with `seed`.
        dtype: parameter dtype.
        seed: weight seed for a materialised twin.
        attn_implementation: "sdpa", "eager", or a registered `AttentionInterface` name.

    Returns:
        The model in eval mode; pair it with `twin_processor(name)` for inputs.

    Raises:
        ConfigError: unknown name; the message lists the available twins.

    Example:
        >>> model = twin("llava-1.5-7b")
        >>> sum(p.numel() for p in model.parameters())
        7063427072
    """
    config = twin_config(name)
    std = config.get_text_config().initializer_range
    return _families.build_model(
        config, seed, std, device=device, dtype=dtype, attn_implementation=attn_implementation
    )


def twin_processor(name: str) -> ProcessorMixin:
    """The processor of twin `name`: the real image/video geometry with the offline tokenizer.

    For example the LLaVA-1.5 twin's processor resizes to 336x336 and expands `<image>` into 576
    placeholders, exactly as the real one; only the text token ids differ from the real tokenizer's.

    Raises:
        ConfigError: unknown name; the message lists the available twins.
    """
    spec = _spec(name)
    return spec.processor(twin_config(name), tiny_tokenizer(spec.family))
