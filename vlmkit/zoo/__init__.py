"""Offline models for tests and benchmarks.

- `tiny(family, seed=0)`: tiny random-init twins of each supported family with a working processor.
- `FAMILIES`: the family names `tiny` accepts.
"""
from vlmkit.zoo.tiny import FAMILIES, tiny

__all__ = ["FAMILIES", "tiny"]
