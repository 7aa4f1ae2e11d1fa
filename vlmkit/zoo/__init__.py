"""Offline models for tests and benchmarks.

- `tiny(family, seed=0)`: tiny random-init twins of each supported family with a working processor;
  `FAMILIES` lists the families.
- `twin(name)`, `twin_config(name)`, `twin_processor(name)`: random-weight geometry twins of real
  checkpoints (`TWINS`), on the meta device unless asked otherwise.
- `flops(model_or_config, num_text_tokens, num_visual_tokens)`: analytic LLM prefill FLOPs.
- `load(name_or_path)`, `available()`: trained checkpoints shipped in `zoo/checkpoints/` or local folders.
"""
from vlmkit.zoo.families import FAMILIES, tiny
from vlmkit.zoo.flops import flops
from vlmkit.zoo.shipped import available, load
from vlmkit.zoo.twins import TWINS, published_parameters, twin, twin_config, twin_processor

__all__ = [
    "FAMILIES",
    "TWINS",
    "available",
    "flops",
    "load",
    "published_parameters",
    "tiny",
    "twin",
    "twin_config",
    "twin_processor",
]
