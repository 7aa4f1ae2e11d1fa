"""Column sums of softmax attention: how much attention each key receives, over all queries and heads.

"Mean attention received" scores: FastV's mean-over-queries variant, H2O-style heavy hitters,
and VisionZip on towers without a [CLS] token (``causal=False``). Same quantity as
``flash_colsum`` (z-lab/flash-colsum). With ``g = num_kv_groups``::

    p[b, h, i, j] = softmax_j(scale * q[b, h, i] . k[b, h // g, j]) over allowed j
    scores[b, j]  = sum_h sum_{i valid} p[b, h, i, j]

Key j is allowed for query i when ``kv_mask[b, j]`` and, if causal, ``j <= N - M + i``
(right-aligned: the M queries are the last M positions of the N keys, as with a KV cache).
Queries with ``q_mask[b, i] = False`` and queries without any allowed key add nothing.
"""
from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.kernels import _checks
from vlmkit.kernels._dispatch import choose_backend, triton_module

_OP = "attention_colsum"


def attention_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    key_range: tuple[int, int] | None = None,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    num_kv_groups: int = 1,
) -> torch.Tensor:
    """Attention received by each key, summed over queries and heads.

    ``scores[b, j] = sum_h sum_i p[b, h, i, j]`` with
    ``p[b, h, i, j] = softmax_j(scale * q[b, h, i] . k[b, h // num_kv_groups, j])`` over allowed
    keys. Divide by ``H * (number of valid queries)`` for a mean. Float32 accumulation; the
    Triton path uses an online softmax and never builds the (M x N) matrix.

    Args:
        q: (B, H, M, D) queries (after RoPE).
        k: (B, H_kv, N, D) keys (after RoPE), H = H_kv * num_kv_groups.
        scale: softmax scale, usually ``D ** -0.5``.
        causal: mask keys after each query, right-aligned: query i sits at key position
            ``N - M + i``. Queries with ``N - M + i < 0`` attend nothing.
        key_range: ``(start, stop)`` to return only those columns; the softmax is still over
            all keys. Default: all N.
        q_mask: (B, M) bool, False = padded query, excluded from the sum.
        kv_mask: (B, N) bool, False = padded key, excluded from the softmax.
        num_kv_groups: query heads per kv head (GQA), as Hugging Face ``repeat_kv``.

    Returns:
        float32 (B, N), or (B, stop - start) with ``key_range``.

    Raises:
        TypeError: wrong tensor types or dtypes.
        ConfigError: inconsistent shapes, devices, head counts or ``key_range``.

    Example:
        >>> q = k = torch.zeros(1, 1, 3, 4)  # uniform attention over the allowed keys
        >>> attention_colsum(q, k, scale=0.5)  # [1 + 1/2 + 1/3, 1/2 + 1/3, 1/3]
        tensor([[1.8333, 0.8333, 0.3333]])
    """
    start, stop = _check(q, k, scale, causal, key_range, q_mask, kv_mask, num_kv_groups)
    if choose_backend(_OP, q, k, q_mask, kv_mask) == "triton":
        run = triton_module("attention").attention_colsum
    else:
        run = attention_colsum_reference
    return run(
        q, k, scale=float(scale), causal=causal, key_range=(start, stop), q_mask=q_mask, kv_mask=kv_mask,
        num_kv_groups=num_kv_groups,
    )


def attention_colsum_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    key_range: tuple[int, int] | None = None,
    q_mask: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    num_kv_groups: int = 1,
) -> torch.Tensor:
    """PyTorch path and specification of `attention_colsum` (same arguments, no checks).

    Builds one (B, M, N) probability matrix per head at a time.
    """
    batch, num_heads, num_queries, _ = q.shape
    num_keys = k.shape[2]
    allowed = torch.ones(batch, num_queries, num_keys, dtype=torch.bool, device=q.device)
    if causal:
        query_position = torch.arange(num_queries, device=q.device) + (num_keys - num_queries)
        allowed &= torch.arange(num_keys, device=q.device)[None, :] <= query_position[:, None]
    if kv_mask is not None:
        allowed &= kv_mask[:, None, :]
    query_weight = torch.ones(batch, num_queries, device=q.device) if q_mask is None else q_mask.float()
    scores = torch.zeros(batch, num_keys, device=q.device)
    for head in range(num_heads):
        logits = q[:, head].float() @ k[:, head // num_kv_groups].float().transpose(-1, -2) * scale
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        probs = torch.where(allowed, probs, 0.0)  # queries without any allowed key: NaN -> 0
        scores = scores + (probs * query_weight[:, :, None]).sum(dim=1)
    start, stop = key_range if key_range is not None else (0, num_keys)
    return scores[:, start:stop]


def _check(q, k, scale, causal, key_range, q_mask, kv_mask, num_kv_groups) -> tuple[int, int]:
    _checks.query_key(_OP, q, k, scale, num_kv_groups)
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}.")
    batch, _, num_queries, _ = q.shape
    num_keys = k.shape[2]
    if q_mask is not None:
        _checks.mask(_OP, "q_mask", q_mask, {"(B, M)": (batch, num_queries)})
    if kv_mask is not None:
        _checks.mask(_OP, "kv_mask", kv_mask, {"(B, N)": (batch, num_keys)})
    _checks.same_device(_OP, q=q, k=k, q_mask=q_mask, kv_mask=kv_mask)
    if key_range is None:
        return 0, num_keys
    if (
        not isinstance(key_range, (tuple, list))
        or len(key_range) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in key_range)
    ):
        raise TypeError(f"{_OP}: key_range must be a (start, stop) pair of ints, got {key_range!r}.")
    start, stop = key_range
    if not 0 <= start < stop <= num_keys:
        raise ConfigError(
            f"{_OP}: key_range={tuple(key_range)} must satisfy 0 <= start < stop <= N = {num_keys}."
        )
    return start, stop
