"""vlmkit: faster, less hallucinating vision-language models without retraining.

    patch = vlmkit.apply(model, "visionzip:tokens=64", "fastv:layer=2,keep=0.5")
    model.generate(**inputs)
    patch.remove()

The names below and the subpackages (``vlmkit.zoo``, ``vlmkit.eval``, ...) load on first use, so
importing vlmkit (and starting the ``vlmkit`` command) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmkit.api import Patch, apply, parse_spec, patch_of
    from vlmkit.registry import list_methods, register_method
    from vlmkit.zoo import load as load_model

__version__ = "0.1.0"

_LAZY = {
    "Patch": ("vlmkit.api", "Patch"),
    "apply": ("vlmkit.api", "apply"),
    "parse_spec": ("vlmkit.api", "parse_spec"),
    "patch_of": ("vlmkit.api", "patch_of"),
    "list_methods": ("vlmkit.registry", "list_methods"),
    "register_method": ("vlmkit.registry", "register_method"),
    "load_model": ("vlmkit.zoo", "load"),
}

__all__ = ["Patch", "__version__", "apply", "list_methods", "load_model", "parse_spec", "patch_of", "register_method"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
