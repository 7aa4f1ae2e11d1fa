"""Tiny models and inputs for the engine tests (one cached model per family and attention kind)."""
from __future__ import annotations

import functools

import torch

from vlmkit import zoo

QUESTIONS = ["What is shown?", "Describe the image.", "Is there a cat in the image?", "What colour is it?"]


@functools.lru_cache(maxsize=None)
def model(family: str, attn: str = "sdpa"):
    tiny_model, processor = zoo.tiny(family, attn_implementation=attn)
    return tiny_model.eval(), processor


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
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]
