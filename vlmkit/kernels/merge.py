"""Assign-and-average: merge tokens into targets by a (size- and weight-) weighted mean, in one pass.

Serves ToMe-style bipartite merging (size-weighted mean, ``merge_wavg``), VisionZip's
contextual tokens, and density/cluster merges (FastVID, PruMerge's attention-weighted
absorption). With ``w`` the per-token weight and ``s`` the token size::

    merged[b, t]   = sum_{i: target[b, i] = t} w_i s_i x_i / sum_{i: target[b, i] = t} w_i s_i
    new_size[b, t] = sum_{i: target[b, i] = t} s_i

Targets that receive nothing (or only zero weight) are 0; tokens with target -1 are dropped.
"""
from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.kernels import _checks
from vlmkit.kernels._dispatch import choose_backend, triton_module

_OP = "merge_tokens"


def merge_tokens(
    x: torch.Tensor,
    target_index: torch.Tensor,
    weight: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    *,
    num_targets: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of the tokens mapped to each target, and the targets' new sizes.

    ``merged[b, t] = sum_{i: target=t} w_i s_i x_i / sum_{i: target=t} w_i s_i`` (0 where
    nothing maps to t) and ``new_size[b, t] = sum_{i: target=t} s_i``. Accumulates in float32
    (float64 for float64 inputs).
    The PyTorch path is differentiable in ``x``, ``weight`` and ``size``; when an input requires
    grad, the default dispatch uses it even on CUDA.

    Args:
        x: (B, N, C) tokens.
        target_index: (B, N) integer target of each token in ``[0, num_targets)``, or -1 to drop it.
        weight: optional (B, N) non-negative weight per token (default 1), e.g. attention received.
        size: optional (B, N) number of original tokens each token stands for (default 1),
            ToMe's size for the size-weighted mean.
        num_targets: T, the number of output tokens.

    Returns:
        ``(merged, new_size)``: (B, T, C) in ``x.dtype``, and (B, T) float32 (float64 for float64 ``x``).

    Raises:
        TypeError: wrong tensor types or dtypes.
        ConfigError: inconsistent shapes or devices, an index outside ``[-1, num_targets)``,
            or a negative weight or size.

    Example:
        >>> x = torch.tensor([[[1.0], [3.0], [10.0], [7.0]]])
        >>> merged, new_size = merge_tokens(x, torch.tensor([[0, 0, 1, -1]]), num_targets=2)
        >>> merged[..., 0], new_size
        (tensor([[ 2., 10.]]), tensor([[2., 1.]]))
    """
    _check(x, target_index, weight, size, num_targets)
    if choose_backend(_OP, x, target_index, weight, size) == "triton":
        run = triton_module("merge").merge_tokens
    else:
        run = merge_tokens_reference
    return run(x, target_index, weight, size, num_targets=num_targets)


def merge_tokens_reference(
    x: torch.Tensor,
    target_index: torch.Tensor,
    weight: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    *,
    num_targets: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path and specification of `merge_tokens` (same arguments, no checks); differentiable."""
    batch, _, channels = x.shape
    accumulate = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    kept = target_index >= 0
    target = target_index.clamp(min=0).long()  # dropped tokens go to target 0 with zero mass
    token_size = torch.ones(target.shape, dtype=accumulate, device=x.device) if size is None else size.to(accumulate)
    token_size = torch.where(kept, token_size, 0.0)
    mass = token_size if weight is None else token_size * weight.to(accumulate)
    numerator = torch.zeros(batch, num_targets, channels, dtype=accumulate, device=x.device).scatter_add(
        1, target[:, :, None].expand(-1, -1, channels), x.to(accumulate) * mass[:, :, None]
    )
    denominator = mass.new_zeros(batch, num_targets).scatter_add(1, target, mass)
    new_size = token_size.new_zeros(batch, num_targets).scatter_add(1, target, token_size)
    filled = denominator > 0
    merged = torch.where(filled[:, :, None], numerator / torch.where(filled, denominator, 1.0)[:, :, None], 0.0)
    return merged.to(x.dtype), new_size


def _check(x, target_index, weight, size, num_targets) -> None:
    _checks.tensor(_OP, "x", x, 3, kind="float")
    _checks.tensor(_OP, "target_index", target_index, 2, kind="int")
    _checks.integer(_OP, "num_targets", num_targets, minimum=1)
    batch, num_tokens, _ = x.shape
    _checks.shape(_OP, "target_index", target_index, (batch, num_tokens), "(B, N)")
    for name, value in (("weight", weight), ("size", size)):
        if value is not None:
            _checks.tensor(_OP, name, value, 2, kind="float")
            _checks.shape(_OP, name, value, (batch, num_tokens), "(B, N)")
    _checks.same_device(_OP, x=x, target_index=target_index, weight=weight, size=size)
    if target_index.numel() == 0:
        return
    # One device sync for all value checks.
    optional = {name: value for name, value in (("weight", weight), ("size", size)) if value is not None}
    stats = [target_index.min(), target_index.max()] + [value.detach().min() for value in optional.values()]
    low, high, *least = torch.stack([v.double() for v in stats]).tolist()
    if low < -1 or high >= num_targets:
        raise ConfigError(
            f"{_OP}: target_index must lie in [-1, num_targets) = [-1, {num_targets}), got values in "
            f"[{int(low)}, {int(high)}]; -1 drops a token."
        )
    for name, smallest in zip(optional, least):
        if not smallest >= 0:
            raise ConfigError(f"{_OP}: {name} must be non-negative (and not NaN), got a minimum of {smallest}.")
