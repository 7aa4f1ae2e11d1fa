"""Backend choice shared by the kernels: Triton on CUDA tensors, PyTorch otherwise.

The environment variable ``VLMKIT_KERNELS`` is read at every call:

- unset, empty or ``auto``: Triton when every tensor is on CUDA, Triton imports, no input is
  float64 and no gradient is needed; the PyTorch reference otherwise;
- ``torch``: always the PyTorch reference;
- ``triton``: always Triton. On CPU tensors this works only under Triton's interpreter
  (``TRITON_INTERPRET=1``), which is slow and meant for tests.

The Triton implementations live in ``_triton_<module>.py`` modules imported on first use.
Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, including on its own library
functions when ``triton`` is imported: set it before the process imports triton.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from vlmkit.errors import ConfigError, did_you_mean, missing_extra

ENV_VAR = "VLMKIT_KERNELS"
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before ``import triton``)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def forced_backend() -> str:
    """The value of ``VLMKIT_KERNELS`` ("auto" when unset), validated."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a kernel backend; allowed: "
            f"{', '.join(BACKENDS)}.{did_you_mean(value, BACKENDS)} Unset it to choose by device."
        )
    return value


def choose_backend(op: str, *tensors: torch.Tensor | None, differentiable: bool = True) -> str:
    """Return "torch" or "triton" for one call of ``op`` on ``tensors`` (None entries ignored).

    Raises:
        ImportError: ``VLMKIT_KERNELS=triton`` and Triton is not installed.
        ConfigError: ``VLMKIT_KERNELS=triton`` with CPU tensors outside the interpreter, with
            float64 inputs, or with inputs that need gradients (the Triton paths have no backward).
    """
    given = [t for t in tensors if t is not None]
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    needs_grad = differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in given)
    on_cuda = all(t.is_cuda for t in given)
    float64 = any(t.dtype == torch.float64 for t in given)
    if forced == "auto":
        return "triton" if on_cuda and not needs_grad and not float64 and triton_available() else "torch"
    if not triton_available():
        raise missing_extra("triton", "triton")
    if needs_grad:
        raise ConfigError(
            f"{op}: {ENV_VAR}=triton was set but an input requires grad and the Triton path has no "
            f"backward; run under torch.no_grad(), or set {ENV_VAR}=torch (or auto) for gradients."
        )
    if float64:
        raise ConfigError(
            f"{op}: {ENV_VAR}=triton was set but an input is float64, which the Triton kernels do not "
            f"take; pass float32/bfloat16/float16, or set {ENV_VAR}=torch (or auto)."
        )
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in given})
        raise ConfigError(
            f"{op}: {ENV_VAR}=triton was set but the inputs are on {', '.join(devices)}; Triton runs "
            f"on CUDA tensors, or on CPU tensors only under its interpreter (TRITON_INTERPRET=1 set before "
            f"triton is imported; slow, for tests). Move the inputs to a GPU, start the process with "
            f"TRITON_INTERPRET=1, or unset {ENV_VAR}."
        )
    return "triton"


def triton_module(name: str) -> ModuleType:
    """Import ``vlmkit.kernels._triton_<name>`` (on first use only, so that Triton stays optional)."""
    return importlib.import_module(f"vlmkit.kernels._triton_{name}")
