"""Triton kernels of `greedy_maxmin` (see ``maxmin.py``): O(N) state per sample, no (N x N) matrix.

1. ``_nearest_other_kernel``: for every token, the distance to its nearest other valid token
   (the second-smallest entry of its distance row, the smallest being itself), from tiles of
   the Gram matrix; the first pick is its argmax.
2. ``_step_kernel``, launched once per pick: every block of tokens reads the previous step's
   per-block maxima, takes the winner (ties: lowest index) as the newest pick, lowers its
   tokens' distance-to-the-picked-set with the distances to that pick (one vector against
   a tile of tokens) and writes its own block maximum for the next step. Picked and invalid
   tokens hold -inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkit.kernels import _triton_common as common
from vlmkit.kernels.maxmin import NORM_EPS

_STEP_BLOCK_N = 128
_STEP_BLOCK_C = 64


@triton.jit
def _distance(gram, norm_a, norm_b, COSINE: tl.constexpr):
    """d from dot products: norms are inverse norms (cosine) or squared norms (l2)."""
    if COSINE:
        return tl.maximum(1.0 - gram * norm_a * norm_b, 0.0)
    return tl.sqrt(tl.maximum(norm_a + norm_b - 2.0 * gram, 0.0))


@triton.autotune(
    configs=common.configs(
        triton.Config({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_I": 128, "BLOCK_J": 64, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_I": 64, "BLOCK_J": 128, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_I": 32, "BLOCK_J": 64, "BLOCK_C": 64}, num_warps=4),
    ),
    key=["n_class", "channels", "COSINE"],
)
@triton.jit
def _nearest_other_kernel(
    x_ptr, norm_ptr, mask_ptr, out_ptr,
    sxb, sxn, sxc, smb, smn, n_tokens, channels, n_class,
    COSINE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, i] = min_{j valid, j != i} d(i, j); grid (token blocks, B)."""
    pid_i = tl.program_id(0)
    batch = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = offs_i < n_tokens
    x_base = x_ptr + batch * sxb
    norm_i = tl.load(norm_ptr + batch * n_tokens + offs_i, mask=row_ok, other=0.0)
    best = tl.full([BLOCK_I], float("inf"), tl.float32)
    for start_j in range(0, n_tokens, BLOCK_J):
        offs_j = start_j + tl.arange(0, BLOCK_J)
        col_ok = offs_j < n_tokens
        if HAS_MASK:
            col_ok = col_ok & (tl.load(mask_ptr + batch * smb + offs_j * smn, mask=col_ok, other=0) != 0)
        gram = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        for start_c in range(0, channels, BLOCK_C):
            offs_c = start_c + tl.arange(0, BLOCK_C)
            c_ok = offs_c < channels
            xi = tl.load(x_base + offs_i[:, None] * sxn + offs_c[None, :] * sxc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            xj = tl.load(x_base + offs_j[None, :] * sxn + offs_c[:, None] * sxc, mask=col_ok[None, :] & c_ok[:, None], other=0.0)
            gram += common.dot(xi, xj)
        norm_j = tl.load(norm_ptr + batch * n_tokens + offs_j, mask=col_ok, other=0.0)
        d = _distance(gram, norm_i[:, None], norm_j[None, :], COSINE)
        d = tl.where(col_ok[None, :] & (offs_j[None, :] != offs_i[:, None]), d, float("inf"))
        best = tl.minimum(best, tl.min(d, 1))
    tl.store(out_ptr + batch * n_tokens + offs_i, best, mask=row_ok)


@triton.jit(do_not_specialize=["step"])
def _step_kernel(
    x_ptr, norm_ptr, mask_ptr, gap_ptr, in_val_ptr, in_idx_ptr, out_val_ptr, out_idx_ptr, picks_ptr,
    sxb, sxn, sxc, smb, smn, n_tokens, channels, n_blocks, k, step,
    COSINE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Record pick ``step - 1`` and, if ``step < k``, fold it into ``gap`` and propose pick ``step``; grid (token blocks, B).

    gap[b, j] = min over picks s of d(s, j), -inf for picked and invalid tokens.
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    if step == 1:
        newest = tl.load(picks_ptr + batch * k)  # the first pick, from the nearest-other pass
    else:
        offs_p = tl.arange(0, BLOCK_P)
        block_max = tl.load(in_val_ptr + batch * n_blocks + offs_p, mask=offs_p < n_blocks, other=float("-inf"))
        winner = tl.argmax(block_max, 0, tie_break_left=True)  # blocks are in index order: ties go low
        newest = tl.load(in_idx_ptr + batch * n_blocks + winner)
        if pid == 0:
            tl.store(picks_ptr + batch * k + step - 1, newest)
    if step < k:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_tokens
        x_base = x_ptr + batch * sxb
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start_c in range(0, channels, BLOCK_C):
            offs_c = start_c + tl.arange(0, BLOCK_C)
            c_ok = offs_c < channels
            xs = tl.load(x_base + newest * sxn + offs_c * sxc, mask=c_ok, other=0.0).to(tl.float32)
            xj = tl.load(
                x_base + offs_n[:, None] * sxn + offs_c[None, :] * sxc, mask=in_range[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            if COSINE:
                acc += tl.sum(xj * xs[None, :], 1)
            else:
                diff = xj - xs[None, :]
                acc += tl.sum(diff * diff, 1)
        if COSINE:
            norm_s = tl.load(norm_ptr + batch * n_tokens + newest)
            norm_j = tl.load(norm_ptr + batch * n_tokens + offs_n, mask=in_range, other=0.0)
            d = tl.maximum(1.0 - acc * norm_s * norm_j, 0.0)
        else:
            d = tl.sqrt(acc)  # direct differences: no cancellation for near-duplicates
        if step == 1:
            valid = in_range
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + batch * smb + offs_n * smn, mask=in_range, other=0) != 0)
            gap = tl.where(valid, float("inf"), float("-inf"))
        else:
            gap = tl.load(gap_ptr + batch * n_tokens + offs_n, mask=in_range, other=float("-inf"))
        gap = tl.where(offs_n == newest, float("-inf"), tl.minimum(gap, d))
        tl.store(gap_ptr + batch * n_tokens + offs_n, gap, mask=in_range)
        best = tl.argmax(gap, 0, tie_break_left=True)
        tl.store(out_val_ptr + batch * n_blocks + pid, tl.max(gap, 0))
        tl.store(out_idx_ptr + batch * n_blocks + pid, pid * BLOCK_N + best)


def greedy_maxmin(x, k, *, metric="cosine", mask=None) -> torch.Tensor:
    """Triton path of `vlmkit.kernels.greedy_maxmin` (arguments already checked)."""
    batch, num_tokens, channels = x.shape
    picks = common.empty((batch, k), torch.long, x.device)
    if k == 0 or batch == 0:
        return picks
    cosine = metric == "cosine"
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    norm = norm.clamp_min(NORM_EPS).reciprocal() if cosine else norm.square()
    smb, smn = mask.stride() if mask is not None else (0, 0)
    mask_arg = common.mask_bytes(mask, x)
    with common.on_device(x):
        nearest = common.empty((batch, num_tokens), torch.float32, x.device)
        grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_I"]), batch)  # noqa: E731
        _nearest_other_kernel[grid](
            x, norm, mask_arg, nearest, *x.stride(), smb, smn, num_tokens, channels,
            triton.next_power_of_2(num_tokens), COSINE=cosine, HAS_MASK=mask is not None,
        )
        if mask is not None:
            nearest = nearest.masked_fill(~mask, float("-inf"))
        picks[:, 0] = nearest.argmax(dim=-1)  # first maximum: ties go to the lowest index
        n_blocks = triton.cdiv(num_tokens, _STEP_BLOCK_N)
        gap = common.empty((batch, num_tokens), torch.float32, x.device)
        block_val = [common.empty((batch, n_blocks), torch.float32, x.device) for _ in range(2)]
        block_idx = [common.empty((batch, n_blocks), torch.int64, x.device) for _ in range(2)]
        for step in range(1, k + 1):  # step t records pick t - 1 and proposes pick t
            source, target = (step + 1) % 2, step % 2
            _step_kernel[(n_blocks, batch)](
                x, norm, mask_arg, gap, block_val[source], block_idx[source], block_val[target], block_idx[target],
                picks, *x.stride(), smb, smn, num_tokens, channels, n_blocks, k, step,
                COSINE=cosine, HAS_MASK=mask is not None,
                BLOCK_N=_STEP_BLOCK_N, BLOCK_C=_STEP_BLOCK_C, BLOCK_P=common.block(n_blocks, low=2),
            )
    return picks
