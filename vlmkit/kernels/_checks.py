"""Argument checks shared by the kernel entry points; messages say what was given and what is allowed."""
from __future__ import annotations

import math

import torch

from vlmkit.errors import ConfigError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, value: object, ndim: int, *, kind: str) -> torch.Tensor:
    """Check that ``value`` is a tensor with ``ndim`` dimensions of ``kind`` "float", "bool" or "int"."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}.")
    if kind == "float" and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), got {value.dtype}.")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor (True = valid), got {value.dtype}; use `{name}.bool()`.")
    if kind == "int" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{op}: {name} must be an integer tensor, got {value.dtype}.")
    if value.dim() != ndim:
        raise ConfigError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(value.shape)}.")
    return value


def shape(op: str, name: str, value: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """Check ``value.shape == expected``; ``meaning`` names the dimensions, e.g. "(B, N)"."""
    if tuple(value.shape) != tuple(expected):
        raise ConfigError(f"{op}: {name} must have shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}.")


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Check that all given tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ConfigError(f"{op}: all tensors must be on one device, got {listed}.")


def integer(op: str, name: str, value: object, *, minimum: int) -> int:
    """Check that ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ConfigError(f"{op}: {name} must be >= {minimum}, got {value}.")
    return value


def finite_scale(op: str, scale: object) -> float:
    """Check the softmax scale: a finite positive number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float (usually head_dim ** -0.5), got {type(scale).__name__}.")
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"{op}: scale must be finite and > 0 (usually head_dim ** -0.5), got {scale}.")
    return float(scale)


def choice(op: str, name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Check that ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{op}: {name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}.")
    return value  # type: ignore[return-value]


def heads(op: str, q: torch.Tensor, k: torch.Tensor, num_kv_groups: object) -> int:
    """Check the GQA geometry of q (B, H, *, D) and k (B, H_kv, N, D): H = H_kv * num_kv_groups."""
    groups = integer(op, "num_kv_groups", num_kv_groups, minimum=1)
    if q.shape[0] != k.shape[0]:
        raise ConfigError(f"{op}: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}.")
    if q.dtype != k.dtype:
        raise TypeError(f"{op}: q and k must have the same dtype, got {q.dtype} and {k.dtype}.")
    if q.shape[-1] != k.shape[-1]:
        raise ConfigError(f"{op}: q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}.")
    if q.shape[1] != k.shape[1] * groups:
        raise ConfigError(
            f"{op}: q has {q.shape[1]} heads but k has {k.shape[1]} kv heads x num_kv_groups={groups} = "
            f"{k.shape[1] * groups}; set num_kv_groups = num_attention_heads // num_key_value_heads."
        )
    return groups


def query_key(op: str, q: object, k: object, scale: object, num_kv_groups: object) -> None:
    """Check attention inputs: 4-d float q (B, H, *, D) and k (B, H_kv, N, D) in GQA geometry, a finite scale."""
    tensor(op, "q", q, 4, kind="float")
    tensor(op, "k", k, 4, kind="float")
    heads(op, q, k, num_kv_groups)
    finite_scale(op, scale)


def mask(op: str, name: str, value: object, shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """Check a bool mask against the allowed shapes, given as {"(B, N)": (2, 7), ...}."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a bool tensor, got {type(value).__name__}.")
    if tuple(value.shape) not in shapes.values():
        allowed = " or ".join(f"{meaning} = {expected}" for meaning, expected in shapes.items())
        raise ConfigError(f"{op}: {name} must have shape {allowed}, got {tuple(value.shape)}.")
    return tensor(op, name, value, value.dim(), kind="bool")
