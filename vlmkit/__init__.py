"""vlmkit: faster, less hallucinating vision-language models without retraining.

    patch = vlmkit.apply(model, "visionzip:tokens=64", "fastv:layer=2,keep=0.5")
    model.generate(**inputs)
    patch.remove()
"""
from vlmkit.api import Patch, apply, parse_spec
from vlmkit.registry import list_methods, register_method
from vlmkit.zoo import load as load_model

__version__ = "0.1.0"

__all__ = ["Patch", "__version__", "apply", "list_methods", "load_model", "parse_spec", "register_method"]
