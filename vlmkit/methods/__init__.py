"""Methods, one file per paper, grouped by family (`prune`, `depth`, `position`, `decode`).

Method classes are importable from here (``vlmkit.methods.FastV``); they load on first access.
"""
from __future__ import annotations

from vlmkit.methods.base import Method, MethodConfig, TokenBudgetConfig, TokenSelector


def __getattr__(name: str):
    from vlmkit.registry import REGISTRY

    for method_name in REGISTRY.names():
        cls = REGISTRY.get(method_name)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'vlmkit.methods' has no attribute {name!r}")


__all__ = ["Method", "MethodConfig", "TokenBudgetConfig", "TokenSelector"]
