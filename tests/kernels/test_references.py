"""The PyTorch references (the specification) against naive float64 loops, on small inputs."""
from __future__ import annotations

import math

import pytest
import torch

from vlmkit.kernels import attention_colsum, attention_rows, greedy_maxmin, merge_tokens

torch.manual_seed(0)


# ---------------------------------------------------------------- naive float64 versions
def naive_attention_rows(q, k, scale, kv_mask, groups, reduce):
    q, k = q.double(), k.double()
    batch, heads, rows, _ = q.shape
    keys = k.shape[2]
    probs = torch.zeros(batch, heads, rows, keys, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for r in range(rows):
                allowed = [
                    j for j in range(keys)
                    if kv_mask is None or bool(kv_mask[b, j] if kv_mask.dim() == 2 else kv_mask[b, r, j])
                ]
                logits = {j: scale * float(q[b, h, r] @ k[b, h // groups, j]) for j in allowed}
                if not logits:
                    continue
                top = max(logits.values())
                total = sum(math.exp(v - top) for v in logits.values())
                for j, v in logits.items():
                    probs[b, h, r, j] = math.exp(v - top) / total
    return {"mean": probs.mean(1), "sum": probs.sum(1), "max": probs.amax(1), "none": probs}[reduce]


def naive_attention_colsum(q, k, scale, causal, q_mask, kv_mask, groups):
    q, k = q.double(), k.double()
    batch, heads, queries, _ = q.shape
    keys = k.shape[2]
    out = torch.zeros(batch, keys, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            logits = scale * q[b, h] @ k[b, h // groups].T  # full (M, N) matrix
            for i in range(queries):
                if q_mask is not None and not q_mask[b, i]:
                    continue
                allowed = [
                    j for j in range(keys)
                    if (not causal or j <= keys - queries + i) and (kv_mask is None or kv_mask[b, j])
                ]
                if allowed:
                    out[b, allowed] += torch.softmax(logits[i, allowed], dim=0)
    return out


def naive_merge(x, target, weight, size, num_targets):
    batch, tokens, channels = x.shape
    numerator = torch.zeros(batch, num_targets, channels, dtype=torch.float64)
    mass = torch.zeros(batch, num_targets, dtype=torch.float64)
    new_size = torch.zeros(batch, num_targets, dtype=torch.float64)
    for b in range(batch):
        for i in range(tokens):
            t = int(target[b, i])
            if t < 0:
                continue
            s = 1.0 if size is None else float(size[b, i])
            w = 1.0 if weight is None else float(weight[b, i])
            numerator[b, t] += w * s * x[b, i].double()
            mass[b, t] += w * s
            new_size[b, t] += s
    merged = torch.where(mass[..., None] > 0, numerator / mass.clamp_min(1e-300)[..., None], 0.0)
    return merged, new_size


def naive_maxmin(x, k, metric, mask):
    """DivPrune's rule with explicit loops and sorting, float64."""
    picks = []
    for b in range(x.shape[0]):
        valid = [i for i in range(x.shape[1]) if mask is None or mask[b, i]]
        feats = x[b].double()

        def dist(i, j):
            if metric == "cosine":
                unit_i = feats[i] / max(float(feats[i].norm()), 1e-12)
                unit_j = feats[j] / max(float(feats[j].norm()), 1e-12)
                return 0.0 if i == j else max(1.0 - float(unit_i @ unit_j), 0.0)
            return float((feats[i] - feats[j]).norm())

        second = {i: sorted(dist(i, j) for j in valid)[1] if len(valid) > 1 else 0.0 for i in valid}
        chosen = [max(valid, key=lambda i: (second[i], -i))]  # largest, then lowest index
        while len(chosen) < k:
            rest = [j for j in valid if j not in chosen]
            chosen.append(max(rest, key=lambda j: (min(dist(s, j) for s in chosen), -j)))
        picks.append(chosen)
    return torch.tensor(picks, dtype=torch.long).reshape(x.shape[0], k)


def _close(actual, expected, tol=1e-6):
    assert actual.dtype == torch.float32 or actual.dtype == expected.dtype
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- attention_rows
@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "none"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_attention_rows_matches_naive(monkeypatch, reduce, groups):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4 // groups, 11, 8)
    mask = torch.rand(2, 3, 11) > 0.3
    mask[1, 2] = False  # attends nothing: zeros, not NaN
    for kv_mask in (None, mask, mask[:, 0]):
        out = attention_rows(q, k, scale=0.3, kv_mask=kv_mask, num_kv_groups=groups, reduce=reduce)
        assert out.dtype == torch.float32
        _close(out, naive_attention_rows(q, k, 0.3, kv_mask, groups, reduce))


def test_attention_rows_ragged_batch_equals_per_sample(monkeypatch):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    lengths = [9, 4, 13]
    q, k = torch.randn(3, 6, 2, 16, dtype=torch.bfloat16), torch.randn(3, 3, 13, 16, dtype=torch.bfloat16)
    mask = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]
    batched = attention_rows(q, k, scale=0.25, kv_mask=mask, num_kv_groups=2)
    for b, n in enumerate(lengths):
        alone = attention_rows(q[b:b + 1], k[b:b + 1, :, :n], scale=0.25, num_kv_groups=2)
        _close(batched[b:b + 1, :, :n], alone)
        assert (batched[b, :, n:] == 0).all()


# ---------------------------------------------------------------- attention_colsum
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("queries,keys", [(7, 7), (3, 10), (9, 6)])  # prefill, KV cache, more queries than keys
@pytest.mark.parametrize("causal", [True, False])
def test_attention_colsum_matches_naive(monkeypatch, groups, queries, keys, causal):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    q, k = torch.randn(2, 4, queries, 8), torch.randn(2, 4 // groups, keys, 8)
    q_mask, kv_mask = torch.rand(2, queries) > 0.3, torch.rand(2, keys) > 0.2
    for masks in ((None, None), (q_mask, kv_mask)):
        out = attention_colsum(q, k, scale=0.4, causal=causal, q_mask=masks[0], kv_mask=masks[1], num_kv_groups=groups)
        expected = naive_attention_colsum(q, k, 0.4, causal, masks[0], masks[1], groups)
        _close(out, expected)
        part = attention_colsum(
            q, k, scale=0.4, causal=causal, q_mask=masks[0], kv_mask=masks[1], num_kv_groups=groups, key_range=(1, keys - 1)
        )
        _close(part, expected[:, 1:keys - 1])


def test_attention_colsum_right_aligned_causal():
    """Two queries over four keys (KV cache): query 0 sits at key 2, query 1 at key 3."""
    q = k = torch.zeros(1, 1, 4, 2)
    out = attention_colsum(q[:, :, 2:], k, scale=1.0, causal=True)
    torch.testing.assert_close(out, torch.tensor([[1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 4]]))


@pytest.mark.parametrize("left", [True, False])
def test_attention_colsum_ragged_batch_equals_per_sample(monkeypatch, left):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    lengths, length = [6, 10], 10
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8)
    positions = torch.arange(length)[None, :]
    counts = torch.tensor(lengths)[:, None]
    mask = positions >= length - counts if left else positions < counts
    batched = attention_colsum(q, k, scale=0.35, q_mask=mask, kv_mask=mask, num_kv_groups=2)
    for b in range(2):
        keep = mask[b]
        alone = attention_colsum(q[b:b + 1][:, :, keep], k[b:b + 1][:, :, keep], scale=0.35, num_kv_groups=2)
        _close(batched[b:b + 1, keep], alone)
        assert (batched[b, ~keep] == 0).all()


# ---------------------------------------------------------------- merge_tokens
def test_merge_tokens_matches_naive(monkeypatch):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    x = torch.randn(3, 20, 5)
    target = torch.randint(-1, 6, (3, 20))
    target[:, :2] = 0
    weight, size = torch.rand(3, 20), torch.randint(1, 4, (3, 20)).float()
    target[1, target[1] == 5] = 4  # sample 1: target 5 receives nothing
    for w, s in ((None, None), (weight, None), (None, size), (weight, size)):
        merged, new_size = merge_tokens(x, target, w, s, num_targets=6)
        expected_merged, expected_size = naive_merge(x, target, w, s, 6)
        _close(merged, expected_merged)
        _close(new_size, expected_size)
        assert (merged[1, 5] == 0).all() and new_size[1, 5] == 0


def test_merge_tokens_keeps_dtype_and_tome_sizes(monkeypatch):
    """bf16 in, bf16 out; merging twice with sizes equals merging once (ToMe's size-weighted mean)."""
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    x = torch.randn(1, 4, 3)
    first, size = merge_tokens(x, torch.tensor([[0, 0, 1, 2]]), num_targets=3)
    second, size = merge_tokens(first, torch.tensor([[0, 1, 0]]), size=size, num_targets=2)
    once, once_size = merge_tokens(x, torch.tensor([[0, 0, 1, 0]]), num_targets=2)
    _close(second, once)
    _close(size, once_size)
    assert merge_tokens(x.bfloat16(), torch.tensor([[0, 0, 1, 2]]), num_targets=3)[0].dtype == torch.bfloat16


def test_merge_tokens_gradcheck(monkeypatch):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(2, 7, dtype=torch.float64) + 0.1).requires_grad_()
    size = (torch.rand(2, 7, dtype=torch.float64) + 0.5).requires_grad_()
    target = torch.tensor([[0, 0, 1, -1, 2, 2, 2], [3, 1, 1, 0, -1, 3, 0]])

    def merged_and_size(x, weight, size):
        return merge_tokens(x, target, weight, size, num_targets=4)

    assert torch.autograd.gradcheck(merged_and_size, (x, weight, size))


# ---------------------------------------------------------------- greedy_maxmin
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_greedy_maxmin_matches_naive(monkeypatch, metric):
    monkeypatch.setenv("VLMKIT_KERNELS", "torch")
    x = torch.randn(3, 17, 6)
    mask = torch.rand(3, 17) > 0.3
    mask[:, :6] = True
    for m in (None, mask):
        assert torch.equal(greedy_maxmin(x, 6, metric=metric, mask=m), naive_maxmin(x, 6, metric, m))


def test_greedy_maxmin_hand_made_example():
    """Four axis directions plus a copy of the first (cosine distances 0, 1 or 2, exact).

    Nearest other token: 0 for tokens 0 and 4 (copies), 1 for tokens 1, 2, 3: the first pick is
    token 1 (tie, lowest index); token 3 is opposite to it; then 0 and 2 are both at distance 1
    from the picks (tie: 0), then 2, then the copy 4 at distance 0.
    """
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]])
    assert greedy_maxmin(x, 5).tolist() == [[1, 3, 0, 2, 4]]
    assert naive_maxmin(x, 5, "cosine", None).tolist() == [[1, 3, 0, 2, 4]]


def test_greedy_maxmin_hand_made_l2_with_padding():
    """Same points scaled by 2, token 1 padded out: distances 0, 2*sqrt(2) or 4.

    Second-smallest distances: tokens 2 and 3 tie at 2*sqrt(2) (pick 2); tokens 0 and 4 are at 4
    from it (pick 0); token 3 is 2*sqrt(2) from the picks, the copy 4 is 0 from token 0.
    """
    x = 2 * torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False, True, True, True]])
    assert greedy_maxmin(x, 4, metric="l2", mask=mask).tolist() == [[2, 0, 3, 4]]
    assert naive_maxmin(x, 4, "l2", mask).tolist() == [[2, 0, 3, 4]]


def test_greedy_maxmin_uses_second_smallest_distance():
    """A tight pair far from the rest: the pair's *smallest* distance is tiny, so DivPrune's rule
    picks the most isolated single token instead of a member of the pair."""
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.05, 10.0], [-3.0, 0.0]]])
    # second-smallest distances: 0.1, 0.1, 0.05, 0.05, 3 -> token 4
    assert greedy_maxmin(x, 1, metric="l2").tolist() == [[4]]


def test_greedy_maxmin_ragged_batch_equals_per_sample():
    x = torch.randn(2, 12, 5)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, ::3] = False
    picks = greedy_maxmin(x, 5, mask=mask)
    for b in range(2):
        kept = mask[b].nonzero().squeeze(1)
        alone = greedy_maxmin(x[b:b + 1, kept], 5)
        assert torch.equal(picks[b], kept[alone[0]])
