"""Analytic prefill FLOPs of the language model, for FLOPs-ideal speedups of token reduction.

One multiply-add counts as 2 FLOPs. Per decoder layer that processes `n` tokens (hidden `d`,
`h` query heads and `g` key/value heads of width `k`, MLP width `f`):

- projections: `2 n d k (2 h + 2 g)` (q and o: `h k` wide; k and v: `g k` wide);
- attention: `4 h k n m`, scores `Q K^T` plus the weighted sum of `V`, where `m` is the number
  of keys each query sees: `n` for the full square (the count token-pruning papers use, e.g.
  FastV), or on average `(n + 1) / 2` with `causal=True`;
- gated MLP (Llama / Qwen2 SwiGLU: gate, up, down): `6 n d f`.

Norms, rotary embeddings, softmax and residual additions are left out (they are linear in `n`
and small); the vision tower and projector too (they do not depend on the pruned LLM sequence).
"""
from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedConfig, PreTrainedModel

from vlmkit.errors import ConfigError


def _layer_flops(tokens: int, d: int, h: int, g: int, k: int, f: int, causal: bool) -> float:
    keys = (tokens + 1) / 2 if causal else tokens
    projections = 2 * tokens * d * k * (2 * h + 2 * g)
    attention = 4 * h * k * tokens * keys
    mlp = 6 * tokens * d * f
    return projections + attention + mlp


def flops(
    model_or_config: PreTrainedModel | PreTrainedConfig,
    num_text_tokens: int,
    num_visual_tokens: int | Sequence[int],
    *,
    causal: bool = False,
    include_lm_head: bool = False,
) -> float:
    """Prefill FLOPs of the language model for one sequence.

    Args:
        model_or_config: a model or its config (composite VLM configs use their text config).
        num_text_tokens: non-visual tokens in the prompt (kept in every layer).
        num_visual_tokens: visual tokens entering the LLM; a sequence with one entry per decoder
            layer models pruning inside the LLM (e.g. FastV: all tokens up to layer K, fewer
            after), or mixture-of-depths routing.
        causal: count only the causal half of the attention matrix instead of the full square.
        include_lm_head: add the output projection for the last position (what `generate`
            computes during prefill).

    Returns:
        FLOPs as a float; multiply by the batch size for a batch.

    Raises:
        ConfigError: a per-layer sequence whose length is not the number of decoder layers, or a
            negative token count.

    Example:
        >>> from vlmkit.zoo import twin_config
        >>> config = twin_config("llava-1.5-7b")
        >>> full = flops(config, 64, 576)
        >>> fastv = flops(config, 64, [576] * 2 + [144] * 30)  # keep 25% from layer 2
        >>> round(full / fastv, 2)
        2.76
    """
    config = getattr(model_or_config, "config", model_or_config).get_text_config()
    layers = config.num_hidden_layers
    per_layer = [num_visual_tokens] * layers if isinstance(num_visual_tokens, int) else list(num_visual_tokens)
    if len(per_layer) != layers:
        raise ConfigError(
            f"num_visual_tokens has {len(per_layer)} entries; give one int or one per decoder layer ({layers})."
        )
    if num_text_tokens < 0 or min(per_layer) < 0:
        raise ConfigError(f"token counts must be >= 0, got text {num_text_tokens} and visual {per_layer}.")
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    total = sum(
        _layer_flops(num_text_tokens + visual, config.hidden_size, heads, kv_heads, head_dim,
                     config.intermediate_size, causal)
        for visual in per_layer
    )
    if include_lm_head:
        total += 2 * config.hidden_size * config.vocab_size
    return float(total)
