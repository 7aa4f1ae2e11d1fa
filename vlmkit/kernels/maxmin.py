"""Greedy max-min (farthest-point, k-center) selection of diverse tokens.

DivPrune (CVPR 2025, arXiv:2503.02175) selects visual tokens by solving the
Max-Min Diversity Problem greedily; ToDRE uses the same selection. With the distance
``d(i, j) = 1 - cos(x_i, x_j)`` ("cosine") or ``||x_i - x_j||`` ("l2") over valid tokens:

1. the first pick is the token whose second-smallest distance to all tokens (the smallest
   being its distance to itself, 0) is largest: the most isolated token;
2. then repeatedly ``s <- argmax_{j not picked} min_{i picked} d(i, j)``.

Ties go to the lowest index. Cosine uses ``x / max(||x||, 1e-12)`` (a zero token is at
distance 1 from everything).
"""
from __future__ import annotations

import torch

from vlmkit.errors import ConfigError
from vlmkit.kernels import _checks
from vlmkit.kernels._dispatch import choose_backend, triton_module

METRICS = ("cosine", "l2")
NORM_EPS = 1e-12
_OP = "greedy_maxmin"


def greedy_maxmin(
    x: torch.Tensor, k: int, *, metric: str = "cosine", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of k mutually distant tokens, in pick order (DivPrune's greedy Max-Min).

    First pick: ``argmax_i`` of the second-smallest ``d(i, j)`` over valid j (the smallest is
    ``d(i, i) = 0``); then ``argmax_j min_{s picked} d(s, j)`` over valid, unpicked j, k - 1
    times. Ties go to the lowest index. The Triton path computes distances in tiles and keeps
    only O(N) state per sample; the PyTorch path builds the (N x N) distance matrix.

    Args:
        x: (B, N, C) token features.
        k: number of tokens to pick per sample, at most the number of valid tokens.
        metric: "cosine" (``1 - cos``, DivPrune) or "l2" (Euclidean).
        mask: optional (B, N) bool, True = valid token; invalid tokens are never picked
            and do not count as neighbours.

    Returns:
        (B, k) int64 token indices, in pick order.

    Raises:
        TypeError: wrong tensor types or dtypes.
        ConfigError: bad shapes or metric, or k larger than a sample's number of valid tokens.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
        >>> greedy_maxmin(x, 3)  # 3 is the most isolated, 0 is farthest from it, then 2
        tensor([[3, 0, 2]])
    """
    _check(x, k, metric, mask)
    if choose_backend(_OP, x, mask, differentiable=False) == "triton":
        run = triton_module("maxmin").greedy_maxmin
    else:
        run = greedy_maxmin_reference
    return run(x, k, metric=metric, mask=mask)


def greedy_maxmin_reference(
    x: torch.Tensor, k: int, *, metric: str = "cosine", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch path and specification of `greedy_maxmin` (same arguments, no checks).

    Builds the (B, N, N) float32 distance matrix.
    """
    batch, num_tokens, _ = x.shape
    features = x.float()
    if metric == "cosine":
        unit = features / features.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        distance = (1.0 - unit @ unit.transpose(1, 2)).clamp_min(0.0)
    else:
        distance = torch.cdist(features, features)
    distance.diagonal(dim1=1, dim2=2).zero_()  # d(i, i) = 0 exactly
    valid = torch.ones(batch, num_tokens, dtype=torch.bool, device=x.device) if mask is None else mask
    rows = torch.arange(batch, device=x.device)
    picks = torch.empty(batch, k, dtype=torch.long, device=x.device)
    if k == 0:
        return picks
    # First pick: the largest second-smallest distance to the valid tokens.
    to_valid = distance.masked_fill(~valid[:, None, :], float("inf"))
    second = to_valid.topk(min(2, num_tokens), dim=-1, largest=False).values[..., -1]
    picks[:, 0] = second.masked_fill(~valid, float("-inf")).argmax(dim=-1)  # argmax: first maximum
    unavailable = ~valid
    unavailable[rows, picks[:, 0]] = True
    nearest_pick = distance[rows, picks[:, 0]]  # (B, N): min distance to the picked set
    for step in range(1, k):
        picks[:, step] = nearest_pick.masked_fill(unavailable, float("-inf")).argmax(dim=-1)
        unavailable[rows, picks[:, step]] = True
        nearest_pick = torch.minimum(nearest_pick, distance[rows, picks[:, step]])
    return picks


def _check(x, k, metric, mask) -> None:
    _checks.tensor(_OP, "x", x, 3, kind="float")
    _checks.integer(_OP, "k", k, minimum=0)
    _checks.choice(_OP, "metric", metric, METRICS)
    batch, num_tokens, _ = x.shape
    if mask is not None:
        _checks.mask(_OP, "mask", mask, {"(B, N)": (batch, num_tokens)})
    _checks.same_device(_OP, x=x, mask=mask)
    available = num_tokens if mask is None or batch == 0 else int(mask.sum(dim=-1).min())
    if k > available:
        where = "" if mask is None else " (the fewest valid tokens of any sample in the batch)"
        raise ConfigError(
            f"{_OP}: k={k} is larger than the {available} valid tokens{where}; pick at most {available}."
        )
