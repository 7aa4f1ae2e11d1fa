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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

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
    model_class: type[PreTrainedModel]
    defaults: dict[str, Any]
    derived: Callable[[dict[str, Any], Any], dict[str, Any]]  # (config kwargs, tokenizer) -> fixed keys
    processor: Callable[[PreTrainedConfig, Any], ProcessorMixin]


def _llava_derived(kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    vision = kwargs["vision_config"]
    return {
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "image_seq_length": (vision["image_size"] // vision["patch_size"]) ** 2,
    }


def _llava_processor(config: LlavaConfig, tokenizer) -> LlavaProcessor:
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's [CLS]
        chat_template=tokenizer.chat_template,
    )


_FAMILIES: dict[str, _Family] = {
    # LLaVA-1.5 layout: CLIP tower with [CLS], second-to-last layer, CLS dropped, 2-layer MLP.
    # 48x48 pixels in 4x4 patches: 144 visual tokens per image.
    "llava": _Family(
        config_class=LlavaConfig,
        model_class=LlavaForConditionalGeneration,
        defaults={
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 48,
                "patch_size": 4,
                "projection_dim": 32,
            },
            "text_config": {"model_type": "llama", **_TEXT},
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
        },
        derived=_llava_derived,
        processor=_llava_processor,
    ),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

# Set from the tokenizer (and, for Qwen2-VL, from the text width); overriding them is an error.
_TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


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


def _merge(family: _Family, overrides: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Family defaults updated by `overrides`; sub-config dicts are merged key by key."""
    kwargs = copy.deepcopy(family.defaults)
    _check_keys(overrides, family.config_class, family.config_class.__name__)
    for key, value in overrides.items():
        if key in ("text_config", "vision_config"):
            if not isinstance(value, dict):
                raise TypeError(f"{key} override must be a dict of config fields, got {type(value).__name__}")
            model_type = value.get("model_type", kwargs[key]["model_type"])
            _check_keys(value, type(CONFIG_MAPPING[model_type]()), f"{key} ({model_type})")
            forbidden = sorted(set(value) & set(_TOKENIZER_KEYS))
            if forbidden:
                raise ConfigError(f"{key} keys {forbidden} are set from the tiny tokenizer; remove them.")
            kwargs[key].update(value)
        else:
            kwargs[key] = value
    derived = family.derived(kwargs, tokenizer)
    fixed = sorted(set(overrides) & set(derived))
    if fixed:
        raise ConfigError(f"keys {fixed} are derived from the tokenizer and the vision config; remove them.")
    kwargs.update(derived)
    kwargs["text_config"].update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return kwargs


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Re-initialise every parameter of `model` from a private generator seeded with `seed`.

    Norm layers get weight 1 and bias 0, other biases 0, and every other tensor (linear,
    convolution and embedding weights, class embeddings, `image_newline`) a normal with mean 0
    and standard deviation `std`, drawn in `named_parameters()` order. The global torch RNG is
    not used.

    Args:
        model: the model to initialise in place (any device but meta).
        seed: generator seed; equal seeds give bit-identical weights.
        std: standard deviation of the normal draws.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
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
            sample = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            param.copy_(sample)


def tiny(
    family: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny, deterministic, randomly initialised model of `family` with its working processor.

    Args:
        family: one of `FAMILIES`: "llava", "llava_next", "llava_onevision", "qwen2_vl".
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
    with torch.random.fork_rng(devices=[]):
        model = spec.model_class(config)
    init_weights(model, seed, std=config.text_config.initializer_range)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    return model, spec.processor(config, tokenizer)
