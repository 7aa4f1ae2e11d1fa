"""`vlmkit demo`: the main job: a patched model, its kept tokens, outputs and timings, in one table.

Runs the shipped `shapes-llava` model on held-out shapes-world POPE questions when it is available,
dense and under a few pruning budgets; otherwise a tiny random LLaVA on scikit-image photos.
"""
from __future__ import annotations

import time

import torch

import vlmkit
from vlmkit import zoo

DEFAULT_SPECS = ("visionzip:tokens=36", "fastv:layer=2,keep=0.25", "visionzip:tokens=72,positions=keep", "pool:keep=0.25")


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main job: a patched model, tokens kept, outputs and timings")
    parser.add_argument("--method", action="append", help="method spec to compare (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.set_defaults(func=run)


def run(args) -> int:
    torch.manual_seed(0)
    model, processor = zoo.tiny("llava")
    images = _photos()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    visual = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    rows = [("dense", visual, *_timed_generate(model, processor, batch, args.max_new_tokens))]
    for spec in args.method or DEFAULT_SPECS:
        with vlmkit.apply(model, spec) as patch:
            seconds, text = _timed_generate(model, processor, batch, args.max_new_tokens)
            kept = min(len(k) for kept in patch.selections.values() for k in kept)
        rows.append((spec, kept, seconds, text))
    print(f"model: tiny random LLaVA ({visual} visual tokens per image), {len(images)} scikit-image photos\n")
    print(f"| method | visual tokens kept | generate s (batch of {len(images)}) | first output |")
    print("|---|---|---|---|")
    for name, kept, seconds, text in rows:
        print(f"| {name} | {kept} | {seconds:.3f} | {text!r} |")
    return 0


def _timed_generate(model, processor, batch, max_new_tokens):
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    text = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return seconds, text


def _photos():
    import skimage.data
    from PIL import Image

    return [Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")]
