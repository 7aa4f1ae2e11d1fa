"""Triton kernels against their PyTorch references: compiled on CUDA, interpreted on the CPU.

Run through ``test_triton.py``, which starts this module in a fresh process (with
``TRITON_INTERPRET=1`` when there is no GPU; see ``conftest.py``).

Awkward sizes (non-powers of two, one row, more than one block), padding, GQA ratios 1/2/4,
float32 within 1e-5 and bfloat16 within 1e-2 relative error in norm. Outputs are poisoned
(NaN / a sentinel) before the kernels run, so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import POISON_INT, TOLERANCE, relative_error
from vlmkit.kernels import attention_colsum, attention_rows, greedy_maxmin, merge_tokens
from vlmkit.kernels.colsum import attention_colsum_reference
from vlmkit.kernels.maxmin import greedy_maxmin_reference
from vlmkit.kernels.merge import merge_tokens_reference
from vlmkit.kernels.rows import REDUCTIONS, attention_rows_reference

DTYPES = [torch.float32, torch.bfloat16]
dtype_ids = ["fp32", "bf16"]


def _padding(batch: int, length: int, valid: list[int], *, left: bool) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(valid):
        if left:
            mask[b, length - n:] = True
        else:
            mask[b, :n] = True
    return mask


def _check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "unwritten (poisoned) or non-finite elements"
    assert relative_error(actual, expected) <= TOLERANCE[dtype]


# ---------------------------------------------------------------- attention_rows
# (B, H, num_kv_groups, R, N, D, mask): mask "padding" = (B, N), "rows" = (B, R, N) with an empty row
ROWS_CASES = [
    (2, 4, 1, 1, 37, 24, None),
    (2, 4, 2, 3, 70, 20, "padding"),
    (1, 8, 4, 5, 33, 64, "rows"),
]


def _rows_inputs(case, dtype):
    batch, heads, groups, rows, keys, dim, mask_kind = case
    q = torch.randn(batch, heads, rows, dim).to(dtype)
    k = torch.randn(batch, heads // groups, keys, dim).to(dtype)
    mask = None
    if mask_kind == "padding":
        mask = _padding(batch, keys, [keys - 11, keys], left=False)
    elif mask_kind == "rows":
        mask = torch.rand(batch, rows, keys) > 0.4
        mask[0, 1] = False  # a row that may attend nothing scores 0
    return q, k, mask, groups


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: "B{}H{}G{}R{}N{}D{}-{}".format(*c))
def test_attention_rows_matches_reference(triton_backend, case, dtype):
    q, k, mask, groups = _rows_inputs(case, dtype)
    for reduce in REDUCTIONS:
        kwargs = dict(scale=q.shape[-1] ** -0.5, kv_mask=mask, num_kv_groups=groups, reduce=reduce)
        _check_close(attention_rows(q, k, **kwargs), attention_rows_reference(q, k, **kwargs), dtype)


def test_attention_rows_noncontiguous_inputs(triton_backend):
    """Rows gathered from a longer sequence and keys in (B, N, H, D) layout, as views."""
    hidden_q = torch.randn(2, 20, 4, 16)  # (B, L, H, D)
    q = hidden_q[:, [19, 7]].transpose(1, 2)  # (B, H, 2, D), strided
    k = torch.randn(2, 45, 2, 16).transpose(1, 2)  # (B, H_kv, N, D), strided
    kwargs = dict(scale=0.25, num_kv_groups=2, reduce="none")
    _check_close(attention_rows(q, k, **kwargs), attention_rows_reference(q, k, **kwargs), torch.float32)


# ---------------------------------------------------------------- attention_colsum
# (B, H, groups, M, N, D, causal, masks, key_range)
COLSUM_CASES = [
    (2, 4, 2, 29, 29, 16, True, "left-padding", None),
    (1, 4, 4, 7, 45, 32, True, None, (5, 40)),  # decode-like M < N: right-aligned
    (1, 2, 1, 12, 9, 16, True, None, None),  # M > N: the first queries attend nothing
    (2, 2, 1, 50, 40, 8, False, "right-padding", (0, 33)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("case", COLSUM_CASES, ids=lambda c: "B{}H{}G{}M{}N{}D{}-causal{}-{}-{}".format(*c))
def test_attention_colsum_matches_reference(triton_backend, case, dtype):
    batch, heads, groups, queries, keys, dim, causal, masks, key_range = case
    q = torch.randn(batch, heads, queries, dim).to(dtype)
    k = torch.randn(batch, heads // groups, keys, dim).to(dtype)
    q_mask = kv_mask = None
    if masks is not None:
        left = masks == "left-padding"
        kv_mask = _padding(batch, keys, [keys - 6, keys][:batch], left=left)
        q_mask = _padding(batch, queries, [queries - 6, queries][:batch], left=left)
    kwargs = dict(
        scale=dim ** -0.5, causal=causal, key_range=key_range, q_mask=q_mask, kv_mask=kv_mask, num_kv_groups=groups
    )
    _check_close(attention_colsum(q, k, **kwargs), attention_colsum_reference(q, k, **kwargs), dtype)


# ---------------------------------------------------------------- merge_tokens
# (B, N, C, T, weighted, sized)
MERGE_CASES = [
    (2, 37, 24, 5, False, False),
    (1, 1, 3, 2, True, True),  # one token; target 1 receives nothing
    (3, 150, 130, 17, True, False),  # more than one block of tokens and of channels
    (2, 64, 40, 9, False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: "B{}N{}C{}T{}-w{}-s{}".format(*c))
def test_merge_tokens_matches_reference(triton_backend, case, dtype):
    batch, tokens, channels, targets, weighted, sized = case
    x = torch.randn(batch, tokens, channels).to(dtype)
    target = torch.randint(-1, targets, (batch, tokens))
    if tokens == 1:
        target[:] = 0
    weight = torch.rand(batch, tokens).to(dtype) if weighted else None
    size = torch.randint(1, 5, (batch, tokens)).float() if sized else None
    merged, new_size = merge_tokens(x, target, weight, size, num_targets=targets)
    expected_merged, expected_size = merge_tokens_reference(x, target, weight, size, num_targets=targets)
    _check_close(merged, expected_merged, dtype)
    _check_close(new_size, expected_size, torch.float32)


# ---------------------------------------------------------------- greedy_maxmin
# (B, N, C, k, metric, masked)
MAXMIN_CASES = [
    (2, 37, 24, 5, "cosine", False),
    (2, 150, 20, 6, "l2", True),  # two step blocks, padding
    (1, 1, 3, 1, "cosine", False),
    (1, 9, 4, 9, "l2", False),  # every token
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("case", MAXMIN_CASES, ids=lambda c: "B{}N{}C{}k{}-{}-mask{}".format(*c))
def test_greedy_maxmin_matches_reference(triton_backend, case, dtype):
    batch, tokens, channels, k, metric, masked = case
    x = torch.randn(batch, tokens, channels).to(dtype)
    mask = _padding(batch, tokens, [tokens - 40, tokens], left=True) if masked else None
    picks = greedy_maxmin(x, k, metric=metric, mask=mask)
    assert (picks != POISON_INT).all()
    assert torch.equal(picks, greedy_maxmin_reference(x, k, metric=metric, mask=mask))


def test_greedy_maxmin_ties_go_to_the_lowest_index(triton_backend):
    """Four copies of two directions: every step is a tie."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]] * 4])
    expected = greedy_maxmin_reference(x, 8)
    assert expected.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert torch.equal(greedy_maxmin(x, 8), expected)


# ---------------------------------------------------------------- larger sweep
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_sweep_real_geometries(triton_backend, dtype):
    """Qwen2-0.5B heads (14 x 64, GQA 7:1) over 576 image tokens; merges and picks at LLaVA sizes."""
    q = torch.randn(2, 14, 3, 64).to(dtype)
    k = torch.randn(2, 2, 600, 64).to(dtype)
    mask = _padding(2, 600, [577, 600], left=True)
    kwargs = dict(scale=0.125, kv_mask=mask, num_kv_groups=7, reduce="mean")
    _check_close(attention_rows(q, k, **kwargs), attention_rows_reference(q, k, **kwargs), dtype)
    qc = torch.randn(1, 14, 200, 64).to(dtype)
    kwargs = dict(scale=0.125, causal=True, key_range=(10, 190), num_kv_groups=7)
    _check_close(attention_colsum(qc, k[:1, :, :230], **kwargs), attention_colsum_reference(qc, k[:1, :, :230], **kwargs), dtype)
    x = torch.randn(2, 576, 96).to(dtype)
    target = torch.randint(-1, 64, (2, 576))
    for actual, expected in zip(
        merge_tokens(x, target, num_targets=64), merge_tokens_reference(x, target, num_targets=64)
    ):
        _check_close(actual, expected, dtype if actual.dtype == dtype else torch.float32)
    assert torch.equal(greedy_maxmin(x[:, :300], 20), greedy_maxmin_reference(x[:, :300], 20))
