"""Backend choice and argument errors of the public kernel functions."""
from __future__ import annotations

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.kernels import _dispatch, attention_colsum, attention_rows, greedy_maxmin, merge_tokens


@pytest.fixture
def no_triton_path(monkeypatch):
    """Fail loudly if a call reaches the Triton modules."""

    def refuse(name):
        raise AssertionError(f"the Triton path ({name}) was chosen")

    monkeypatch.setattr(_dispatch, "triton_module", refuse)
    for module in ("rows", "colsum", "merge", "maxmin"):
        monkeypatch.setattr(f"vlmkit.kernels.{module}.triton_module", refuse)


def _calls():
    q, k, x = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 5, 3)
    return [
        lambda: attention_rows(q, k, scale=0.5),
        lambda: attention_colsum(q, k, scale=0.5),
        lambda: merge_tokens(x, torch.zeros(1, 5, dtype=torch.long), num_targets=1),
        lambda: greedy_maxmin(x, 2),
    ]


@pytest.mark.parametrize("value", [None, "", "auto", "torch", "TORCH"])
def test_cpu_tensors_take_the_torch_path(monkeypatch, no_triton_path, value):
    if value is None:
        monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_dispatch.ENV_VAR, value)
    for call in _calls():
        call()


def test_env_var_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.choose_backend("op", torch.zeros(1)) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "tritn")
    with pytest.raises(ConfigError, match="'tritn' is not a kernel backend.*Did you mean 'triton'"):
        attention_rows(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 3, 2), scale=1.0)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    for call in _calls():
        with pytest.raises(ConfigError, match="inputs are on cpu.*TRITON_INTERPRET=1"):
            call()


def test_forced_triton_without_triton_names_the_extra(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'vlmkit\[triton\]'"):
        _calls()[0]()


def test_forced_triton_refuses_gradients_and_float64(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    x = torch.randn(1, 4, 3, requires_grad=True)
    with pytest.raises(ConfigError, match="requires grad"):
        merge_tokens(x, torch.zeros(1, 4, dtype=torch.long), num_targets=1)
    with pytest.raises(ConfigError, match="float64"):
        greedy_maxmin(x.detach().double(), 1)


def test_auto_prefers_torch_for_gradients_and_float64(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    cuda_like = torch.zeros(1)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert _dispatch.choose_backend("op", cuda_like) == "triton"
    assert _dispatch.choose_backend("op", cuda_like.double()) == "torch"
    assert _dispatch.choose_backend("op", cuda_like.requires_grad_()) == "torch"
    assert _dispatch.choose_backend("op", cuda_like, differentiable=False) == "triton"
    with torch.no_grad():
        assert _dispatch.choose_backend("op", cuda_like) == "triton"


# ---------------------------------------------------------------- argument errors
Q, K = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(q=Q, k=K), ConfigError, r"4 heads but k has 2 kv heads x num_kv_groups=1"),
        (dict(q=Q, k=K[:, :, :, :4], num_kv_groups=2), ConfigError, "same head dim"),
        (dict(q=Q, k=K[:1], num_kv_groups=2), ConfigError, "same batch size"),
        (dict(q=Q[0], k=K, num_kv_groups=2), ConfigError, "q must have 4 dimensions"),
        (dict(q=Q.long(), k=K, num_kv_groups=2), TypeError, "q must be a floating tensor"),
        (dict(q=Q.bfloat16(), k=K, num_kv_groups=2), TypeError, "same dtype, got torch.bfloat16 and torch.float32"),
        (dict(q=Q.numpy(), k=K, num_kv_groups=2), TypeError, "q must be a torch.Tensor"),
        (dict(q=Q, k=K, num_kv_groups=2, reduce="median"), ConfigError, "reduce='median'.*'mean', 'sum'"),
        (dict(q=Q, k=K, num_kv_groups=2, scale=float("nan")), ConfigError, "scale must be finite"),
        (dict(q=Q, k=K, num_kv_groups=2.0), TypeError, "num_kv_groups must be an int"),
        (dict(q=Q, k=K, num_kv_groups=2, kv_mask=torch.ones(2, 9, dtype=torch.bool)), ConfigError, r"\(B, N\) = \(2, 10\)"),
        (dict(q=Q, k=K, num_kv_groups=2, kv_mask=torch.ones(2, 10)), TypeError, "kv_mask must be a bool tensor"),
    ],
)
def test_attention_rows_argument_errors(kwargs, error, message):
    kwargs = {"scale": 0.5, **kwargs}
    with pytest.raises(error, match=message):
        attention_rows(kwargs.pop("q"), kwargs.pop("k"), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(key_range=(4, 4)), ConfigError, r"key_range=\(4, 4\) must satisfy 0 <= start < stop <= N = 10"),
        (dict(key_range=(0, 11)), ConfigError, "N = 10"),
        (dict(key_range=(0.0, 3)), TypeError, "pair of ints"),
        (dict(q_mask=torch.ones(2, 10, dtype=torch.bool)), ConfigError, r"q_mask must have shape \(B, M\) = \(2, 3\)"),
        (dict(causal=1), TypeError, "causal must be a bool"),
    ],
)
def test_attention_colsum_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        attention_colsum(Q, K, scale=0.5, num_kv_groups=2, **kwargs)


@pytest.mark.parametrize(
    "target,extra,error,message",
    [
        ([[0, 3, -1]], {}, ConfigError, r"\[-1, num_targets\) = \[-1, 3\), got values in \[-1, 3\]"),
        ([[0, -2, 1]], {}, ConfigError, r"got values in \[-2, 1\]"),
        ([[0, 1, 1]], {"weight": torch.tensor([[1.0, -0.5, 1.0]])}, ConfigError, "weight must be non-negative"),
        ([[0, 1, 1]], {"size": torch.tensor([[1.0, float("nan"), 1.0]])}, ConfigError, "size must be non-negative"),
        ([[0.0, 1.0, 1.0]], {}, TypeError, "target_index must be an integer tensor"),
        ([[0, 1]], {}, ConfigError, r"target_index must have shape \(B, N\) = \(1, 3\)"),
    ],
)
def test_merge_tokens_argument_errors(target, extra, error, message):
    with pytest.raises(error, match=message):
        merge_tokens(torch.randn(1, 3, 2), torch.tensor(target), num_targets=3, **extra)


def test_greedy_maxmin_argument_errors():
    x = torch.randn(2, 6, 3)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    with pytest.raises(ConfigError, match=r"k=4 is larger than the 3 valid tokens"):
        greedy_maxmin(x, 4, mask=mask)
    with pytest.raises(ConfigError, match=r"k=7 is larger than the 6 valid tokens"):
        greedy_maxmin(x, 7)
    with pytest.raises(ConfigError, match="metric='dot'"):
        greedy_maxmin(x, 2, metric="dot")
    with pytest.raises(ConfigError, match="k must be >= 0"):
        greedy_maxmin(x, -1)
    assert greedy_maxmin(x, 0).shape == (2, 0)
