"""Triton kernels of `attention_rows` and `attention_colsum` (see ``rows.py`` and ``colsum.py``).

Both take two passes over the keys, FlashAttention style, and never hold more than one
(rows x keys) tile of logits:

1. ``_lse_kernel``: an online softmax over the allowed keys gives each query row its
   log-sum-exp (base 2; +inf for rows that attend nothing or are masked out, so that their
   probabilities come out as exactly 0);
2. ``_rows_kernel`` writes ``p = exp2(s - lse)`` reduced over heads, tile by tile;
   ``_colsum_kernel`` sums ``p`` over the queries of one head for a tile of keys.

Logits are ``tl.dot`` products accumulated in float32 with IEEE precision (no TF32), in the
base-2 domain: ``s = (q . k) * scale * log2(e)``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlmkit.kernels import _triton_common as common

_LOG2E = 1.0 / math.log(2.0)
_REDUCE_CODES = {"none": 0, "sum": 1, "mean": 1, "max": 2}


@triton.autotune(
    configs=common.configs(
        triton.Config({"BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 128}, num_warps=8),
        triton.Config({"BLOCK_N": 32}, num_warps=4),
    ),
    key=["size_class", "BLOCK_M", "BLOCK_D", "HAS_MASK", "CAUSAL"],
)
@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, mask_ptr, qmask_ptr, lse_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smm, smn, sqmb, sqmm,
    n_heads, n_queries, n_keys, head_dim, num_kv_groups, qk_scale, size_class,
    HAS_MASK: tl.constexpr, HAS_QMASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lse[b, h, i] = log2 sum_{j allowed} exp2(s[b, h, i, j]); grid (query blocks, H, B)."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_queries
    q = tl.load(
        q_ptr + batch * sqb + head * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0,
    )
    k_base = k_ptr + batch * skb + (head // num_kv_groups) * skh
    key_end = n_keys
    if CAUSAL:  # right-aligned: query i sits at key position n_keys - n_queries + i
        key_end = tl.minimum(n_keys, n_keys - n_queries + (pid_m + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, key_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = tl.load(
            k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=(offs_n < n_keys)[None, :] & (offs_d < head_dim)[:, None], other=0.0,
        )
        s = common.dot(q, kt) * qk_scale
        ok = row_ok[:, None] & (offs_n < n_keys)[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= (n_keys - n_queries + offs_m)[:, None])
        if HAS_MASK:
            allowed = tl.load(mask_ptr + batch * smb + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=ok, other=0)
            ok = ok & (allowed != 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: avoid inf - inf
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    if HAS_QMASK:
        query_ok = tl.load(qmask_ptr + batch * sqmb + offs_m * sqmm, mask=row_ok, other=0)
        lse = tl.where(query_ok != 0, lse, float("inf"))
    tl.store(lse_ptr + (batch * n_heads + head) * n_queries + offs_m, lse, mask=row_ok)


@triton.autotune(
    configs=common.configs(
        triton.Config({"BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 128}, num_warps=8),
        triton.Config({"BLOCK_N": 32}, num_warps=2),
    ),
    key=["size_class", "BLOCK_R", "BLOCK_D", "HAS_MASK", "REDUCE"],
)
@triton.jit
def _rows_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, out_ptr,
    sqb, sqh, sqr, sqd, skb, skh, skn, skd, smb, smr, smn, sob, soh, sor,
    n_kv_heads, n_rows, n_keys, head_dim, num_kv_groups, qk_scale, head_weight, size_class,
    HAS_MASK: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = reduce_h exp2(s - lse) for one (rows x keys) tile; grid (key blocks, row blocks, B).

    REDUCE: 0 writes every head, 1 sums (times head_weight, 1/H for a mean), 2 takes the max.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    batch = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < n_rows
    key_ok = offs_n < n_keys
    ok = row_ok[:, None] & key_ok[None, :]
    if HAS_MASK:
        allowed = tl.load(mask_ptr + batch * smb + offs_r[:, None] * smr + offs_n[None, :] * smn, mask=ok, other=0)
        ok = ok & (allowed != 0)
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for kv_head in range(n_kv_heads):
        kt = tl.load(
            k_ptr + batch * skb + kv_head * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=key_ok[None, :] & (offs_d < head_dim)[:, None], other=0.0,
        )
        for group in range(num_kv_groups):
            head = kv_head * num_kv_groups + group
            q = tl.load(
                q_ptr + batch * sqb + head * sqh + offs_r[:, None] * sqr + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0,
            )
            s = common.dot(q, kt) * qk_scale
            lse = tl.load(lse_ptr + (batch * n_kv_heads * num_kv_groups + head) * n_rows + offs_r, mask=row_ok, other=float("inf"))
            p = tl.exp2(tl.where(ok, s, float("-inf")) - lse[:, None])
            if REDUCE == 0:
                tl.store(
                    out_ptr + batch * sob + head * soh + offs_r[:, None] * sor + offs_n[None, :], p,
                    mask=row_ok[:, None] & key_ok[None, :],
                )
            elif REDUCE == 1:
                acc += p
            else:
                acc = tl.maximum(acc, p)
    if REDUCE != 0:
        tl.store(
            out_ptr + batch * sob + offs_r[:, None] * sor + offs_n[None, :], acc * head_weight,
            mask=row_ok[:, None] & key_ok[None, :],
        )


@triton.autotune(
    configs=common.configs(
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8),
    ),
    key=["size_class", "BLOCK_D", "HAS_MASK", "CAUSAL"],
)
@triton.jit
def _colsum_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, out_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smn,
    n_heads, n_queries, n_keys, head_dim, num_kv_groups, qk_scale, key_start, key_stop, size_class,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, h, j - key_start] = sum_i exp2(s[b, h, i, j] - lse[b, h, i]); grid (key blocks, H, B)."""
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_n = key_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < key_stop
    kt = tl.load(
        k_ptr + batch * skb + (head // num_kv_groups) * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
        mask=col_ok[None, :] & (offs_d < head_dim)[:, None], other=0.0,
    )
    if HAS_MASK:
        col_ok = col_ok & (tl.load(mask_ptr + batch * smb + offs_n * smn, mask=col_ok, other=0) != 0)
    query_start = 0
    if CAUSAL:  # query i sees key j iff i >= j - (n_keys - n_queries): skip the query blocks before
        first_query = key_start + pid_n * BLOCK_N - (n_keys - n_queries)
        query_start = tl.maximum(first_query, 0) // BLOCK_M * BLOCK_M
    acc = tl.zeros([BLOCK_N], tl.float32)
    lse_base = lse_ptr + (batch * n_heads + head) * n_queries
    for start in range(query_start, n_queries, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_queries
        q = tl.load(
            q_ptr + batch * sqb + head * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0,
        )
        s = common.dot(q, kt) * qk_scale
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= (n_keys - n_queries + offs_m)[:, None])
        acc += tl.sum(tl.exp2(tl.where(ok, s, float("-inf")) - lse[:, None]), 0)
    key_count = key_stop - key_start
    tl.store(out_ptr + (batch * n_heads + head) * key_count + offs_n - key_start, acc, mask=offs_n < key_stop)


def _mask_strides(mask: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, row, key) strides of a (B, N) or (B, R, N) mask; a (B, N) mask repeats over rows."""
    if mask is None:
        return 0, 0, 0
    if mask.dim() == 2:
        return mask.stride(0), 0, mask.stride(1)
    return mask.stride()


def _log_sum_exp(q, k, *, qk_scale, kv_mask, q_mask, causal, num_kv_groups, block_m) -> torch.Tensor:
    batch, num_heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    lse = common.empty((batch, num_heads, num_queries), torch.float32, q.device)
    smb, smm, smn = _mask_strides(kv_mask)
    sqmb, sqmm = q_mask.stride() if q_mask is not None else (0, 0)
    grid = (triton.cdiv(num_queries, block_m), num_heads, batch)
    _lse_kernel[grid](
        q, k, common.mask_bytes(kv_mask, q), common.mask_bytes(q_mask, q), lse,
        *q.stride(), *k.stride(), smb, smm, smn, sqmb, sqmm,
        num_heads, num_queries, num_keys, head_dim, num_kv_groups, qk_scale, triton.next_power_of_2(num_keys),
        HAS_MASK=kv_mask is not None, HAS_QMASK=q_mask is not None, CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_D=common.block(head_dim),
    )
    return lse


def attention_rows(q, k, *, scale, kv_mask=None, num_kv_groups=1, reduce="mean") -> torch.Tensor:
    """Triton path of `vlmkit.kernels.attention_rows` (arguments already checked)."""
    batch, num_heads, num_rows, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    shape = (batch, num_heads, num_rows, num_keys) if reduce == "none" else (batch, num_rows, num_keys)
    if q.numel() == 0 or num_keys == 0:
        return torch.zeros(shape, dtype=torch.float32, device=q.device)
    qk_scale = scale * _LOG2E
    block_r = common.block(num_rows, high=64)
    with common.on_device(q):
        lse = _log_sum_exp(
            q, k, qk_scale=qk_scale, kv_mask=kv_mask, q_mask=None, causal=False,
            num_kv_groups=num_kv_groups, block_m=block_r,
        )
        out = common.empty(shape, torch.float32, q.device)
        sob, soh, sor = (out.stride(0), out.stride(1), out.stride(2)) if reduce == "none" else (out.stride(0), 0, out.stride(1))
        smb, smr, smn = _mask_strides(kv_mask)
        grid = lambda meta: (triton.cdiv(num_keys, meta["BLOCK_N"]), triton.cdiv(num_rows, block_r), batch)  # noqa: E731
        _rows_kernel[grid](
            q, k, common.mask_bytes(kv_mask, q), lse, out,
            *q.stride(), *k.stride(), smb, smr, smn, sob, soh, sor,
            num_kv_heads, num_rows, num_keys, head_dim, num_kv_groups, qk_scale,
            1.0 / num_heads if reduce == "mean" else 1.0, triton.next_power_of_2(num_keys),
            HAS_MASK=kv_mask is not None, REDUCE=_REDUCE_CODES[reduce],
            BLOCK_R=block_r, BLOCK_D=common.block(head_dim),
        )
    return out


def attention_colsum(
    q, k, *, scale, causal=True, key_range=None, q_mask=None, kv_mask=None, num_kv_groups=1
) -> torch.Tensor:
    """Triton path of `vlmkit.kernels.attention_colsum` (arguments already checked)."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    key_start, key_stop = key_range if key_range is not None else (0, num_keys)
    if q.numel() == 0 or num_keys == 0:
        return torch.zeros(batch, key_stop - key_start, dtype=torch.float32, device=q.device)
    qk_scale = scale * _LOG2E
    with common.on_device(q):
        lse = _log_sum_exp(
            q, k, qk_scale=qk_scale, kv_mask=kv_mask, q_mask=q_mask, causal=causal,
            num_kv_groups=num_kv_groups, block_m=common.block(num_queries, high=64),
        )
        per_head = common.empty((batch, num_heads, key_stop - key_start), torch.float32, q.device)
        smb, _, smn = _mask_strides(kv_mask)
        grid = lambda meta: (triton.cdiv(key_stop - key_start, meta["BLOCK_N"]), num_heads, batch)  # noqa: E731
        _colsum_kernel[grid](
            q, k, common.mask_bytes(kv_mask, q), lse, per_head,
            *q.stride(), *k.stride(), smb, smn,
            num_heads, num_queries, num_keys, head_dim, num_kv_groups, qk_scale, key_start, key_stop,
            triton.next_power_of_2(max(num_queries, num_keys)),
            HAS_MASK=kv_mask is not None, CAUSAL=causal, BLOCK_D=common.block(head_dim),
        )
    return per_head.sum(dim=1)
