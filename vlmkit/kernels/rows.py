"""Softmax attention of a few selected query rows over a key span, reduced over heads.

The scoring step of FastV and PyramidDrop (the last instruction token), of [CLS]-attention
pruning (VisionZip's dominant tokens, FasterVLM, PruMerge) and of text "raters": only R
query rows are needed, so the (N x N) attention map of eager attention is never built
(the pattern of PyramidDrop's released code, `pdrop_rank_drop`). With ``g = num_kv_groups``::

    p[b, h, r, j] = exp(scale * q[b, h, r] . k[b, h // g, j]) / sum_{j' allowed} exp(scale * q[b, h, r] . k[b, h // g, j'])

for allowed keys j (``kv_mask``), 0 for the others and for rows without any allowed key;
then ``scores = reduce_h p`` (mean, sum or max over heads) or ``p`` itself ("none").
"""
from __future__ import annotations

import torch

from vlmkit.kernels import _checks
from vlmkit.kernels._dispatch import choose_backend, triton_module

REDUCTIONS = ("mean", "sum", "max", "none")
_OP = "attention_rows"


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    kv_mask: torch.Tensor | None = None,
    num_kv_groups: int = 1,
    reduce: str = "mean",
) -> torch.Tensor:
    """Attention probabilities of R selected query rows over N keys, reduced over heads.

    ``p[b, h, r, j] = softmax_j(scale * q[b, h, r] . k[b, h // num_kv_groups, j])`` over the keys
    allowed by ``kv_mask``; ``scores = mean_h p`` (or sum, max, or p itself). Accumulates in
    float32 whatever the input dtype and never materialises more than (B, H, R, N) values.
    Triton on CUDA tensors, PyTorch otherwise (see `vlmkit.kernels`).

    Args:
        q: (B, H, R, D) the selected query rows (after RoPE), e.g. the last text token.
        k: (B, H_kv, N, D) the keys (after RoPE), H = H_kv * num_kv_groups.
        scale: softmax scale, usually ``D ** -0.5``.
        kv_mask: None, (B, N) or (B, R, N) bool; True = the key may be attended (padding,
            causal restriction). A row with no allowed key scores 0 everywhere.
        num_kv_groups: query heads per kv head (GQA); query head h uses kv head
            ``h // num_kv_groups`` as Hugging Face ``repeat_kv`` does.
        reduce: "mean", "sum" or "max" over heads, or "none" to keep them.

    Returns:
        float32 (B, R, N) scores, or (B, H, R, N) for ``reduce="none"``.

    Raises:
        TypeError: a non-tensor, non-float q/k, or a non-bool mask.
        ConfigError: inconsistent shapes, devices, head counts, or an unknown ``reduce``.

    Example:
        >>> q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
        >>> attention_rows(q, k, scale=8 ** -0.5, num_kv_groups=2).sum(-1)
        tensor([[1.0000]])
    """
    _check(q, k, scale, kv_mask, num_kv_groups, reduce)
    if choose_backend(_OP, q, k, kv_mask) == "triton":
        run = triton_module("attention").attention_rows
    else:
        run = attention_rows_reference
    return run(q, k, scale=float(scale), kv_mask=kv_mask, num_kv_groups=num_kv_groups, reduce=reduce)


def attention_rows_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    kv_mask: torch.Tensor | None = None,
    num_kv_groups: int = 1,
    reduce: str = "mean",
) -> torch.Tensor:
    """PyTorch path and specification of `attention_rows` (same arguments, no checks)."""
    batch, num_heads, rows, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    # The num_kv_groups query heads of one kv head are consecutive (HF repeat_kv), so they
    # share one matmul against that kv head instead of a repeated copy of k.
    grouped = q.float().reshape(batch, num_kv_heads, num_kv_groups * rows, head_dim)
    logits = (grouped @ k.float().transpose(-1, -2)).view(batch, num_heads, rows, num_keys) * scale
    if kv_mask is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        allowed = kv_mask[:, None, None, :] if kv_mask.dim() == 2 else kv_mask[:, None]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        probs = torch.where(allowed, probs, 0.0)  # rows without any allowed key: NaN -> 0
    if reduce == "mean":
        return probs.mean(dim=1)
    if reduce == "sum":
        return probs.sum(dim=1)
    if reduce == "max":
        return probs.amax(dim=1)
    return probs


def _check(q, k, scale, kv_mask, num_kv_groups, reduce) -> None:
    _checks.query_key(_OP, q, k, scale, num_kv_groups)
    _checks.choice(_OP, "reduce", reduce, REDUCTIONS)
    batch, _, rows, _ = q.shape
    num_keys = k.shape[2]
    if kv_mask is not None:
        _checks.mask(_OP, "kv_mask", kv_mask, {"(B, N)": (batch, num_keys), "(B, R, N)": (batch, rows, num_keys)})
    _checks.same_device(_OP, q=q, k=k, kv_mask=kv_mask)
