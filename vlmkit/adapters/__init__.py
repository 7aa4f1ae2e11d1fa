"""Model-family adapters: `adapter_for(model)` finds the one that knows the model's class."""
from __future__ import annotations

from torch import nn

from vlmkit.adapters.base import Adapter
from vlmkit.adapters.fast_vlm import FastVlmAdapter
from vlmkit.adapters.gemma3 import Gemma3Adapter
from vlmkit.adapters.idefics3 import Idefics3Adapter, SmolVLMAdapter
from vlmkit.adapters.internvl import InternVLAdapter
from vlmkit.adapters.llava import LlavaAdapter
from vlmkit.adapters.llava_next import LlavaNextAdapter
from vlmkit.adapters.llava_next_video import LlavaNextVideoAdapter
from vlmkit.adapters.llava_onevision import LlavaOnevisionAdapter
from vlmkit.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from vlmkit.adapters.qwen3_vl import Qwen3VLAdapter
from vlmkit.errors import UnsupportedModelError

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, LlavaNextVideoAdapter,
    InternVLAdapter, Idefics3Adapter, SmolVLMAdapter, Qwen3VLAdapter, FastVlmAdapter, Gemma3Adapter,
)
SUPPORTED: tuple[str, ...] = tuple(name for adapter in ADAPTERS for name in adapter.model_classes)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`'s class.

    Raises:
        UnsupportedModelError: the class is not one of `SUPPORTED` (the message lists them).
    """
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise UnsupportedModelError(
        f"{name} is not supported by vlmkit; supported model classes: {', '.join(SUPPORTED)}. "
        "Load the model with its ...ForConditionalGeneration class."
    )


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "adapter_for"]
