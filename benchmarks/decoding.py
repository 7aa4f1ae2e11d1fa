"""Cost of contrastive decoding branches: per-token decode time and prefill time vs plain decoding.

The model is a geometry twin: LLaVA-1.5's 576 visual tokens per image (a small CLIP-shaped tower)
in front of the real Qwen2-0.5B language model geometry (`vlmkit.zoo.twin_config(
"llava-onevision-qwen2-0.5b")`), random weights, fp32, 64 text tokens, greedy, batch 1 (and 4 for plain and VCD).

Each configuration runs one `generate()` of 1 + N tokens; a stopping criterion stamps every step,
so the first stamp is the prefill (time to first token, each branch's prefill included) and the
later gaps are the per-token decode cost. Times are the process's CPU time (`time.process_time`)
with one torch thread, which stays meaningful on a machine shared with other jobs (wall time is
reported too). Configurations are interleaved (plain, then each method, repeated); medians.

"sequential" is what the anchors pay for one extra branch: a second forward per step with its own
cache, i.e. twice plain decoding.

Usage:
    python -m benchmarks.decoding [--repeats 3] [--tokens 16] [--out benchmarks/results/decoding]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

import vlmkit
from vlmkit.zoo import twin_config

VISUAL_TOKENS = 576
TEXT_TOKENS = 64
IMAGE_TOKEN = 4
# (configuration name, method specs, batch size)
CONFIGS = [
    ("plain", (), 1),
    ("vcd (1 branch)", ("vcd",), 1),
    ("m3id (1 branch, no image)", ("m3id",), 1),
    ("ritual + vcd (2 branches)", ("ritual:alpha_neg=1",), 1),
    ("dola (0 branches, 6 early exits)", ("dola",), 1),
    ("plain + visionzip 64 tokens", ("visionzip:tokens=64",), 1),
    ("vcd + visionzip 64 tokens", ("visionzip:tokens=64", "vcd"), 1),
    ("plain, batch 4", (), 4),
    ("vcd (1 branch), batch 4", ("vcd",), 4),
]
BASELINES = {"plain + visionzip 64 tokens": "plain + visionzip 64 tokens", "vcd + visionzip 64 tokens": "plain + visionzip 64 tokens",
             "plain, batch 4": "plain, batch 4", "vcd (1 branch), batch 4": "plain, batch 4"}


def build_model() -> LlavaForConditionalGeneration:
    text = twin_config("llava-onevision-qwen2-0.5b").text_config
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=VISUAL_TOKENS)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def build_inputs(batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 700, (batch, TEXT_TOKENS), generator=generator)
    ids = torch.cat([text[:, :8], torch.full((batch, VISUAL_TOKENS), IMAGE_TOKEN), text[:, 8:]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=generator),
    }


class _Stamps(StoppingCriteria):
    """Records (CPU time, wall time) at every decoding step; never stops generation."""

    def __init__(self):
        self.stamps = [(time.process_time(), time.perf_counter())]

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.stamps.append((time.process_time(), time.perf_counter()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def measure(model, inputs, specs: tuple[str, ...], tokens: int) -> dict[str, float]:
    """Prefill and median per-token decode cost (CPU and wall seconds) of one configuration."""
    patch = vlmkit.apply(model, *specs) if specs else None
    stamps = _Stamps()
    try:
        with torch.no_grad():
            model.generate(
                **inputs, max_new_tokens=1 + tokens, min_new_tokens=1 + tokens, do_sample=False,
                stopping_criteria=StoppingCriteriaList([stamps]),
            )
    finally:
        if patch is not None:
            patch.remove()
    cpu, wall = zip(*stamps.stamps)
    return {
        "prefill_cpu": cpu[1] - cpu[0],
        "prefill_wall": wall[1] - wall[0],
        "decode_cpu": statistics.median(b - a for a, b in zip(cpu[1:], cpu[2:])),
        "decode_wall": statistics.median(b - a for a, b in zip(wall[1:], wall[2:])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decoding"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model()
    model.generation_config.pad_token_id = 0
    inputs = {batch: build_inputs(batch) for batch in {batch for _, _, batch in CONFIGS}}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in CONFIGS}
    measure(model, inputs[1], (), 2)  # warm-up
    for _ in range(args.repeats):
        for name, specs, batch in CONFIGS:
            runs[name].append(measure(model, inputs[batch], specs, args.tokens))
    median = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    lines = [
        "| configuration | vs | prefill CPU s | x | decode CPU ms/token | x | decode wall ms/token | x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = median["plain"]
    rows = [(name, median[name], BASELINES.get(name, "plain")) for name, _, _ in CONFIGS]
    rows.insert(1, ("sequential 2nd forward (anchors)", {key: 2 * value for key, value in plain.items()}, "plain"))
    for name, m, base in rows:
        b = median[base]
        lines.append(
            f"| {name} | {base} | {m['prefill_cpu']:.2f} | {m['prefill_cpu'] / b['prefill_cpu']:.2f} "
            f"| {m['decode_cpu'] * 1e3:.0f} | {m['decode_cpu'] / b['decode_cpu']:.2f} "
            f"| {m['decode_wall'] * 1e3:.0f} | {m['decode_wall'] / b['decode_wall']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": "LLaVA geometry: 576 visual tokens, small CLIP tower, Qwen2-0.5B LLM twin, fp32, random weights",
        "text_tokens": TEXT_TOKENS,
        "new_tokens": args.tokens,
        "repeats": args.repeats,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "median": median,
        "runs": runs,
    }
    (args.out / "decoding.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "decoding.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
