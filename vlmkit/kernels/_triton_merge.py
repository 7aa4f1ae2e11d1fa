"""Triton kernels of `merge_tokens` (see ``merge.py``).

1. ``_scatter_kernel`` reads each token once and atomically adds ``w s x`` to its target's
   float32 numerator row and ``w s`` and ``s`` to the target's mass and size;
2. ``_finalize_kernel`` divides, casts to the input dtype and writes both outputs.

Float32 atomics make the summation order, hence the last bits, vary between runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkit.kernels import _triton_common as common



@triton.autotune(
    configs=common.configs(
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_C": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_C": 64}, num_warps=4),
    ),
    key=["n_tokens_class", "channels"],
    reset_to_zero=["numerator_ptr", "mass_ptr"],
)
@triton.jit
def _scatter_kernel(
    x_ptr, target_ptr, weight_ptr, size_ptr, numerator_ptr, mass_ptr,
    sxb, sxn, sxc, stb, stn, swb, swn, ssb, ssn,
    n_tokens, n_targets, channels, n_tokens_class,
    HAS_WEIGHT: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """numerator[b, t] += w s x, mass[b, t] += (w s, s) for the tokens of one block; grid (token blocks, channel blocks, B)."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = offs_n < n_tokens
    target = tl.load(target_ptr + batch * stb + offs_n * stn, mask=in_range, other=-1).to(tl.int64)
    kept = target >= 0
    size = tl.where(kept, 1.0, 0.0)
    if HAS_SIZE:
        size = tl.where(kept, tl.load(size_ptr + batch * ssb + offs_n * ssn, mask=kept, other=0.0).to(tl.float32), 0.0)
    mass = size
    if HAS_WEIGHT:
        mass = size * tl.load(weight_ptr + batch * swb + offs_n * swn, mask=kept, other=0.0).to(tl.float32)
    row = batch * n_targets + target
    x = tl.load(
        x_ptr + batch * sxb + offs_n[:, None] * sxn + offs_c[None, :] * sxc,
        mask=kept[:, None] & (offs_c < channels)[None, :], other=0.0,
    ).to(tl.float32)
    tl.atomic_add(
        numerator_ptr + row[:, None] * channels + offs_c[None, :], x * mass[:, None],
        mask=kept[:, None] & (offs_c < channels)[None, :],
    )
    if pid_c == 0:
        tl.atomic_add(mass_ptr + row * 2, mass, mask=kept)
        tl.atomic_add(mass_ptr + row * 2 + 1, size, mask=kept)


@triton.jit
def _finalize_kernel(
    numerator_ptr, mass_ptr, merged_ptr, new_size_ptr,
    smb, smt, smc, n_targets, channels,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """merged = numerator / mass (0 where the mass is 0), new_size = size; grid (target blocks, channel blocks, B)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    target_ok = offs_t < n_targets
    row = batch * n_targets + offs_t
    mass = tl.load(mass_ptr + row * 2, mask=target_ok, other=0.0)
    ok = target_ok[:, None] & (offs_c < channels)[None, :]
    numerator = tl.load(numerator_ptr + row[:, None] * channels + offs_c[None, :], mask=ok, other=0.0)
    merged = tl.where(mass[:, None] > 0, numerator / tl.where(mass > 0, mass, 1.0)[:, None], 0.0)
    tl.store(
        merged_ptr + batch * smb + offs_t[:, None] * smt + offs_c[None, :] * smc,
        merged.to(merged_ptr.dtype.element_ty), mask=ok,
    )
    if pid_c == 0:
        tl.store(new_size_ptr + row, tl.load(mass_ptr + row * 2 + 1, mask=target_ok, other=0.0), mask=target_ok)


def merge_tokens(x, target_index, weight=None, size=None, *, num_targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of `vlmkit.kernels.merge_tokens` (arguments already checked)."""
    batch, num_tokens, channels = x.shape
    merged = common.empty((batch, num_targets, channels), x.dtype, x.device)
    new_size = common.empty((batch, num_targets), torch.float32, x.device)
    if batch == 0:
        return merged, new_size
    with common.on_device(x):
        numerator = torch.zeros(batch, num_targets, channels, dtype=torch.float32, device=x.device)
        mass = torch.zeros(batch, num_targets, 2, dtype=torch.float32, device=x.device)  # (w s, s)
        if num_tokens > 0 and channels > 0:
            dummy = (0, 0)
            grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_N"]), triton.cdiv(channels, meta["BLOCK_C"]), batch)  # noqa: E731
            _scatter_kernel[grid](
                x, target_index, x if weight is None else weight, x if size is None else size, numerator, mass,
                *x.stride(), *target_index.stride(),
                *(dummy if weight is None else weight.stride()), *(dummy if size is None else size.stride()),
                num_tokens, num_targets, channels, triton.next_power_of_2(num_tokens),
                HAS_WEIGHT=weight is not None, HAS_SIZE=size is not None,
            )
        block_t, block_c = 16, common.block(channels, high=128)
        grid = (triton.cdiv(num_targets, block_t), max(1, triton.cdiv(channels, block_c)), batch)
        _finalize_kernel[grid](
            numerator, mass, merged, new_size, *merged.stride(), num_targets, channels,
            BLOCK_T=block_t, BLOCK_C=block_c,
        )
    return merged, new_size
