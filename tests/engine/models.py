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


def tower_projections(tower, pixel_values, layer: int):
    """Eager queries and keys of one CLIP-tower layer, projected from its input as its attention does:
    (images, heads, tokens, d) each, [CLS] at token 0, and the layer's softmax scale."""
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        block = tower.encoder.layers[layer]
        normed = block.layer_norm1(hidden)
        images, length, _ = normed.shape
        split = lambda x: x.view(images, length, block.self_attn.num_heads, -1).transpose(1, 2)  # noqa: E731
        return split(block.self_attn.q_proj(normed)), split(block.self_attn.k_proj(normed)), block.self_attn.scale
