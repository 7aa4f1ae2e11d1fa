"""Architectures of the shapes models, built from configs (no download), and their processors.

`shapes-llava` is a `LlavaForConditionalGeneration`: a CLIP ViT (96 px, patch 8: 144 patch tokens
plus [CLS]) and a Llama decoder with tied word embeddings. It uses the word-level
tokenizer of `vlmkit.train.tokenizer`. (`shapes-video`, a LLaVA-OneVision grown from it, is built in
`vlmkit.train.video`.)

Initialisation follows what made grounding learnable on a CPU budget (measured, see
`docs/shapes.md`): language-model weights at std 0.1 rather than 0.02, and in each attention layer
half of the heads start with `k_proj == q_proj`, so a question word initially attends to the
visual tokens that look like it (the vision stage aligns visual tokens with word embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
    LlavaProcessor, PreTrainedTokenizerFast,
)

from vlmkit.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSizes:
    """The ViT and decoder sizes of a shapes model.

    Attributes:
        vision_width: ViT hidden size.
        vision_layers: ViT layers.
        vision_heads: ViT attention heads.
        text_width: decoder hidden size.
        text_layers: decoder layers.
        text_heads: decoder attention heads.
        text_mlp: decoder MLP size.
        init_std: std of the decoder's initial weights.
        tied_qk_heads: decoder heads per layer whose key projection starts equal to the query's.
        residual_init_scale: factor on the initial weights of the projections that write into the
            residual stream (attention output, MLP down); `sqrt(4 / layers)` keeps a deeper
            decoder's initial residual variance at the 4-layer model's.
    """

    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 384
    init_std: float = 0.1
    tied_qk_heads: int = 2
    residual_init_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.text_width % self.text_heads or self.vision_width % self.vision_heads:
            raise ConfigError("widths must be divisible by their number of heads.")
        if not 0 <= self.tied_qk_heads <= self.text_heads:
            raise ConfigError(f"tied_qk_heads={self.tied_qk_heads} must lie in [0, {self.text_heads}].")


@dataclass(frozen=True)
class LlavaSizes(BackboneSizes):
    """Sizes of `shapes-llava` (a CLIP-style ViT and a Llama; see `BackboneSizes` for the rest).

    Attributes:
        image_size: input side in pixels.
        patch_size: ViT patch side; `(image_size / patch_size)**2` visual tokens.
    """

    image_size: int = 96
    patch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} must divide image_size={self.image_size}.")

    @property
    def num_patches(self) -> int:
        """Visual tokens per image (the [CLS] token is dropped by the projector's input)."""
        return (self.image_size // self.patch_size) ** 2


def tie_query_keys(attention_layers, heads: int, head_dim: int) -> None:
    """Copy the first `heads` heads of each layer's `q_proj` into its `k_proj` (in place)."""
    with torch.no_grad():
        for attention in attention_layers:
            rows = heads * head_dim
            attention.k_proj.weight[:rows] = attention.q_proj.weight[:rows]


def build_llava(sizes: LlavaSizes, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised `shapes-llava`.

    Args:
        sizes: the architecture.
        tokenizer: the shapes tokenizer (vocabulary size and special token ids).
        seed: torch seed of the initialisation.

    Returns:
        The model in fp32, train mode.
    """
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_width, intermediate_size=4 * sizes.vision_width,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size, patch_size=sizes.patch_size, projection_dim=sizes.vision_width,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_width, intermediate_size=sizes.text_mlp,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads, max_position_embeddings=1024,
        initializer_range=sizes.init_std, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=sizes.num_patches, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    tie_query_keys([layer.self_attn for layer in model.model.language_model.layers],
                   sizes.tied_qk_heads, sizes.text_width // sizes.text_heads)
    if sizes.residual_init_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.o_proj.weight.mul_(sizes.residual_init_scale)
                layer.mlp.down_proj.weight.mul_(sizes.residual_init_scale)
    return model


def build_llava_processor(sizes: LlavaSizes, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The `LlavaProcessor` of `shapes-llava`: CLIP preprocessing at `sizes.image_size`."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` images -> CLIP-normalised float `[B, 3, H, W]` (what the processor gives)."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (x - mean) / std
