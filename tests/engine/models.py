"""Tiny models and inputs for the engine tests (one cached model per family and attention kind)."""
from __future__ import annotations

import functools
import weakref

import torch

from vlmkit import zoo

QUESTIONS = ["What is shown?", "Describe the image.", "Is there a cat in the image?", "What colour is it?"]


def model(family: str, attn: str = "sdpa"):
    """The cached tiny model of `family` with attention `attn`, and its processor."""
    return _model(family, attn)


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str):
    tiny_model, processor = zoo.tiny(family, attn_implementation=attn)
    TOKENIZERS[tiny_model] = processor.tokenizer
    return tiny_model.eval(), processor


TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prompt(processor, question: str, modality: str = "image") -> str:
    conversation = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def inputs(processor, images, questions, modality: str = "image"):
    """Processor inputs for one image per prompt, left-padded."""
    texts = [prompt(processor, q, modality) for q in questions]
    processor.tokenizer.padding_side = "left"
    media = {"images": images} if modality == "image" else {"videos": images}
    return processor(text=texts, padding=True, return_tensors="pt", **media)


def generate(model, batch, **kwargs):
    """Greedy continuation tokens (6 by default); the model's tokenizer goes along (decoding methods
    that encode text read it)."""
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("tokenizer", TOKENIZERS.get(model))
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]
