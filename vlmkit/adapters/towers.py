"""Where the norm, attention, MLP and residuals sit in the vision-tower blocks that ToMe patches.

One algorithm (`vlmkit.towers.tome`), three libraries. A layout only knows, for its library's
pre-norm block ``x + attn(norm1(x)); x + mlp(norm2(x))``:

- how to run the attention half with an additive float bias on the logits, returning the new
  residual stream and the block's keys averaged over heads (ToMe's metric);
- how to run the MLP half;
- the tower's blocks, its prefix tokens ([CLS], registers) and its configured token count.

Supported (exact block classes, so a subclass with another forward is refused):

- transformers ``CLIPVisionModel`` (``CLIPEncoderLayer``) and ``SiglipVisionModel``
  (``SiglipEncoderLayer``), alone or as the ``vision_model`` of a larger model: keys from
  ``self_attn.k_proj``, the bias as the layer's ``attention_mask`` (eager and SDPA add it;
  flash attention takes no float bias);
- timm ``VisionTransformer`` with ``Block`` and ``Attention``: keys from ``attn.k_norm`` (the keys
  attention uses), the bias as ``attn_mask``;
- open_clip ``VisionTransformer`` with ``ResidualAttentionBlock``: ``nn.MultiheadAttention`` takes
  no per-sample bias and hides its keys, so q, k, v are computed from ``in_proj_weight`` and
  attention runs through ``F.scaled_dot_product_attention`` (equal to the module up to rounding).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError, UnsupportedModelError

SUPPORTED = (
    "transformers CLIPVisionModel and SiglipVisionModel (or a model whose vision_model is one), "
    "timm VisionTransformer (Block, Attention), open_clip VisionTransformer (ResidualAttentionBlock)"
)
BIAS_IMPLEMENTATIONS = ("eager", "sdpa")


@contextlib.contextmanager
def _output_of(module: nn.Module):
    """Collect `module`'s outputs while the block runs (the hook is removed on exit)."""
    outputs: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        hook.remove()


def _refuse_mask(layout: str, given: dict[str, object]) -> None:
    passed = [name for name, value in given.items() if value is not None and value is not False]
    if passed:
        raise ConfigError(
            f"tome: a {layout} block that merges or takes proportional attention got {', '.join(passed)}; "
            "ToMe merges the tokens a mask would index. Call the tower without an attention mask."
        )


class TowerLayout:
    """The block structure of one tower.

    Attributes:
        name: the library and layout, for messages.
        blocks: the transformer blocks, in order.
        prefix_tokens: leading tokens that are not patches ([CLS], registers).
        token_count: tokens entering the first block at the configured image size.
    """

    name = ""

    def __init__(self, blocks: list[nn.Module], prefix_tokens: int, token_count: int):
        self.blocks = blocks
        self.prefix_tokens = prefix_tokens
        self.token_count = token_count

    def check_bias(self) -> None:
        """Raise if the attention implementation cannot add a float bias to the logits."""

    def attend(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, args: tuple, kwargs: dict):
        """``(x + attention(norm1(x)) with bias on the logits, head-mean keys (B, N, d_head))``.

        ``args``/``kwargs``: the block's call arguments after the hidden states.
        """
        raise NotImplementedError

    def feed_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(norm2(x))`` with the block's layer scale and drop path."""
        raise NotImplementedError


class HFLayout(TowerLayout):
    name = "transformers CLIP/SigLIP"

    def __init__(self, vision: nn.Module):
        embeddings = vision.embeddings
        super().__init__(
            list(vision.encoder.layers),
            prefix_tokens=1 if hasattr(embeddings, "class_embedding") else 0,
            token_count=embeddings.num_positions,
        )

    def check_bias(self) -> None:
        implementation = self.blocks[0].self_attn.config._attn_implementation
        if implementation not in BIAS_IMPLEMENTATIONS:
            raise ConfigError(
                f"tome: proportional attention adds log(size) to the attention logits, which the {implementation!r} "
                f"attention implementation cannot take; use one of {BIAS_IMPLEMENTATIONS} "
                "(tower.set_attn_implementation('sdpa')) or proportional=False."
            )

    def attend(self, block, x, bias, args, kwargs):
        attention_mask = args[0] if args else kwargs.pop("attention_mask", None)
        _refuse_mask(self.name, {"attention_mask": attention_mask})
        attention = block.self_attn
        with _output_of(attention.k_proj) as keys:
            update, _ = attention(hidden_states=block.layer_norm1(x), attention_mask=bias, **kwargs)
        metric = keys[0].unflatten(-1, (attention.num_heads, attention.head_dim)).mean(2)
        return x + update, metric

    def feed_forward(self, block, x):
        return x + block.mlp(block.layer_norm2(x))


class TimmLayout(TowerLayout):
    name = "timm VisionTransformer"

    def __init__(self, tower: nn.Module):
        super().__init__(
            list(tower.blocks),
            prefix_tokens=tower.num_prefix_tokens,
            token_count=tower.patch_embed.num_patches + tower.num_prefix_tokens,
        )

    def attend(self, block, x, bias, args, kwargs):
        names = ("attn_mask", "is_causal")
        _refuse_mask(self.name, {**dict(zip(names, args)), **kwargs})
        with _output_of(block.attn.k_norm) as keys:
            update = block.attn(block.norm1(x), attn_mask=bias)
        return x + block.drop_path1(block.ls1(update)), keys[0].mean(1)

    def feed_forward(self, block, x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class OpenClipLayout(TowerLayout):
    name = "open_clip VisionTransformer"

    def __init__(self, tower: nn.Module):
        grid_height, grid_width = tower.grid_size
        super().__init__(list(tower.transformer.resblocks), prefix_tokens=1, token_count=grid_height * grid_width + 1)

    def attend(self, block, x, bias, args, kwargs):
        names = ("k_x", "v_x", "attn_mask")
        _refuse_mask(self.name, {**dict(zip(names, args)), **kwargs})
        attention = block.attn
        batch, tokens, width = x.shape
        heads = attention.num_heads
        qkv = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)
        query, key, value = qkv.unflatten(-1, (3, heads, width // heads)).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = attention.dropout if attention.training else 0.0
        mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout)
        update = attention.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))
        return x + block.ls_1(update), key.mean(1)

    def feed_forward(self, block, x):
        return x + block.ls_2(block.mlp(block.ln_2(x)))


def find_layout(tower: nn.Module) -> TowerLayout:
    """The layout of `tower`.

    Raises:
        UnsupportedModelError: a module that is none of the supported towers, or whose blocks
            are not the library's standard ones.
    """
    if not isinstance(tower, nn.Module):
        raise TypeError(f"tome: the tower must be a torch.nn.Module, got {type(tower).__name__}. Supported: {SUPPORTED}.")
    for detect in (_hf_layout, _timm_layout, _open_clip_layout):
        layout = detect(tower)
        if layout is not None:
            return layout
    raise UnsupportedModelError(
        f"tome: {type(tower).__name__} is not a supported vision tower. Supported: {SUPPORTED}. "
        "Pass the vision tower itself (e.g. model.vision_tower, model.visual)."
    )


def _unsupported_blocks(layout: str, blocks: list[nn.Module], expected: str) -> UnsupportedModelError:
    found = sorted({type(block).__name__ for block in blocks})
    return UnsupportedModelError(
        f"tome: this {layout} has blocks of type {found}; only {expected} is supported. Supported: {SUPPORTED}."
    )


def _hf_layout(tower: nn.Module) -> HFLayout | None:
    from transformers.models.clip.modeling_clip import (
        CLIPAttention,
        CLIPEncoderLayer,
        CLIPVisionModel,
    )
    from transformers.models.siglip.modeling_siglip import (
        SiglipAttention,
        SiglipEncoderLayer,
        SiglipVisionModel,
    )

    vision = getattr(tower, "vision_model", tower)
    if type(vision) not in (CLIPVisionModel, SiglipVisionModel):
        return None
    layers = list(vision.encoder.layers)
    standard = {(CLIPEncoderLayer, CLIPAttention), (SiglipEncoderLayer, SiglipAttention)}
    if not layers or any((type(layer), type(getattr(layer, "self_attn", None))) not in standard for layer in layers):
        raise _unsupported_blocks(HFLayout.name, layers, "CLIPEncoderLayer/SiglipEncoderLayer with their attention")
    return HFLayout(vision)


def _timm_layout(tower: nn.Module) -> TimmLayout | None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(tower, VisionTransformer):
        return None
    blocks = list(tower.blocks)
    if not blocks or any(type(block) is not Block or type(block.attn) is not Attention for block in blocks):
        raise _unsupported_blocks(TimmLayout.name, blocks, "timm.models.vision_transformer.Block with timm.layers.Attention")
    return TimmLayout(tower)


def _open_clip_layout(tower: nn.Module) -> OpenClipLayout | None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(tower, VisionTransformer):
        return None
    blocks = list(tower.transformer.resblocks)
    expected = "ResidualAttentionBlock with a batch-first, self-attention nn.MultiheadAttention"
    if not blocks or any(type(block) is not ResidualAttentionBlock or not _plain_attention(block) for block in blocks):
        raise _unsupported_blocks(OpenClipLayout.name, blocks, expected)
    return OpenClipLayout(tower)


def _plain_attention(block: nn.Module) -> bool:
    attention = block.attn
    return (
        attention.batch_first
        and attention._qkv_same_embed_dim
        and attention.bias_k is None
        and not attention.add_zero_attn
        and not hasattr(block, "ln_1_kv")
    )
