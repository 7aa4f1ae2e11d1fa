"""Helpers shared by the ``_triton_*`` modules (imported only when Triton runs)."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vlmkit.kernels._dispatch import interpreting

INTERPRETED = tl.constexpr(interpreting())  # jit code reads only constexpr globals


def configs(*candidates: triton.Config) -> list[triton.Config]:
    """Autotuning candidates: all of them on a GPU, the first only under the interpreter.

    ``@triton.autotune`` benchmarks its configs, which needs a driver; with one config it does not.
    """
    return list(candidates[:1]) if interpreting() else list(candidates)


@triton.jit
def dot(a, b):
    """``a @ b`` accumulated in float32, IEEE precision for float32 operands (no TF32)."""
    if INTERPRETED:  # Triton's interpreter multiplies the raw bits of bfloat16 operands: upcast there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output every element of which the kernel writes (tests poison it here)."""
    return torch.empty(shape, dtype=dtype, device=device)


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current one for a launch (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def block(size: int, *, low: int = 16, high: int | None = None) -> int:
    """The power of two >= ``size``, clamped to [low, high] (``tl.dot`` needs dimensions >= 16)."""
    value = max(low, triton.next_power_of_2(max(size, 1)))
    return value if high is None else min(value, high)


def mask_bytes(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 for a kernel, or a 1-element dummy when absent (guarded by a constexpr)."""
    if mask is None:
        return torch.empty(1, dtype=torch.uint8, device=like.device)
    return mask.view(torch.uint8)
