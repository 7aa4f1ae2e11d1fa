"""Fixtures for the kernel tests: the forced Triton path, with outputs poisoned before kernels write them.

On a machine without CUDA, Triton runs kernels only in its interpreter, and it reads
``TRITON_INTERPRET`` when ``triton`` is first imported (its own library functions are
``@triton.jit`` too). Other test modules import triton through torch long before this file
is read, so the Triton cases (``triton_cases.py``) run in a fresh process started by
``test_triton.py`` with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import pytest
import torch

from vlmkit.kernels import _dispatch

POISON_INT = -123456789
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _poisoned_empty(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, POISON_INT, dtype=dtype, device=device)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton path (compiled on CUDA, interpreted on CPU) with poisoned outputs."""
    pytest.importorskip("triton", reason="Triton is not installed: pip install 'vlmkit[triton]'")
    if DEVICE == "cpu" and not _dispatch.interpreting():
        pytest.fail("Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported: run tests/kernels/test_triton.py")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    from vlmkit.kernels import _triton_common

    monkeypatch.setattr(_triton_common, "empty", _poisoned_empty)
    torch.manual_seed(0)
    torch.set_default_device(DEVICE)  # the cases build their tensors on the default device
    yield
    torch.set_default_device("cpu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are 0; NaN anywhere gives NaN)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)
