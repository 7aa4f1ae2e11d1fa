"""Cost of contrastive decoding branches: per-token decode time and prefill time vs plain decoding.

The model is a geometry twin: LLaVA-1.5's 576 visual tokens per image (a small CLIP-shaped tower)
in front of the real Qwen2-0.5B language model geometry (`vlmkit.zoo.twin_config(
"llava-onevision-qwen2-0.5b")`, 152k vocabulary), random weights, fp32, 64 text tokens, greedy.

Random weights give nearly flat next-token distributions: VCD's plausible set (p >= 0.1 max p) then
holds ~28% of the vocabulary and the branch rows need the whole LM head. A trained model is far more
peaked; the "peaked head" rows scale the LM head by 10 (plausible set of a few tokens, top
probability ~0.45), which is the case where the branch's LM head shrinks to those tokens.

Each measurement is one `generate()` of 1 + N tokens; a stopping criterion stamps every step, so the
first stamp is the prefill (time to first token, each branch's prefill included) and the later gaps
are the per-token decode cost. Times are the process's CPU time (`time.process_time`) with one torch
thread, which stays meaningful on a machine shared with other jobs. Every configuration is measured
right after its baseline (plain decoding, same batch and head), and the reported ratio is the median
over repeats of these paired ratios, so slow phases of a shared machine hit both sides of a pair.

"sequential" is what the anchors pay for one extra branch: a second forward per step with its own
cache, i.e. twice plain decoding.

Usage:
    python -m benchmarks.decoding [--repeats 3] [--tokens 8] [--out benchmarks/results/decoding]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

import vlmkit

from benchmarks._twin_model import TEXT_TOKENS, StepStamps, build_inputs, build_model

# (configuration, method specs, baseline specs, batch size)
CONFIGS = [
    ("vcd (1 branch)", ("vcd",), (), 1),
    ("m3id (1 branch, no image)", ("m3id",), (), 1),
    ("ritual + vcd (2 branches)", ("ritual:alpha_neg=1",), (), 1),
    ("dola (0 branches, 6 early exits)", ("dola",), (), 1),
    ("vcd + visionzip 64 tokens", ("visionzip:tokens=64", "vcd"), ("visionzip:tokens=64",), 1),
    ("vcd (1 branch), batch 4", ("vcd",), (), 4),
]
PEAKED = [config for config in CONFIGS if config[0] in ("vcd (1 branch)", "vcd (1 branch), batch 4")]
HEAD_SCALE = 10.0


def measure(model, inputs, specs: tuple[str, ...], tokens: int) -> dict[str, float]:
    """Prefill and median per-token decode cost (CPU and wall seconds) of one configuration."""
    patch = vlmkit.apply(model, *specs) if specs else None
    stamps = StepStamps()
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
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decoding"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model()
    model.generation_config.pad_token_id = 0
    inputs = {batch: build_inputs(batch) for batch in {config[3] for config in CONFIGS}}
    measure(model, inputs[1], (), 2)  # warm-up
    pairs: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}
    for head, configs in (("random head", CONFIGS), ("peaked head", PEAKED)):
        if head == "peaked head":
            with torch.no_grad():
                model.lm_head.weight.mul_(HEAD_SCALE)
        for _ in range(args.repeats):
            for name, specs, baseline, batch in configs:
                base = measure(model, inputs[batch], baseline, args.tokens)
                pairs.setdefault(f"{name}, {head}", []).append((base, measure(model, inputs[batch], specs, args.tokens)))
    lines = [
        "| configuration | baseline prefill CPU s | prefill x | baseline decode CPU ms/token | decode ms/token | decode x |",
        "|---|---|---|---|---|---|",
        "| sequential 2nd forward (anchors) | | 2.00 | | | 2.00 |",
    ]
    summary = {}
    for name, runs in pairs.items():
        median = lambda values: statistics.median(values)  # noqa: E731
        row = {
            "baseline_prefill_cpu": median(b["prefill_cpu"] for b, _ in runs),
            "prefill_ratio": median(m["prefill_cpu"] / b["prefill_cpu"] for b, m in runs),
            "baseline_decode_cpu": median(b["decode_cpu"] for b, _ in runs),
            "decode_cpu": median(m["decode_cpu"] for _, m in runs),
            "decode_ratio": median(m["decode_cpu"] / b["decode_cpu"] for b, m in runs),
        }
        summary[name] = row
        lines.append(
            f"| {name} | {row['baseline_prefill_cpu']:.2f} | {row['prefill_ratio']:.2f} | {row['baseline_decode_cpu'] * 1e3:.0f} "
            f"| {row['decode_cpu'] * 1e3:.0f} | {row['decode_ratio']:.2f} |"
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
        "peaked_head_scale": HEAD_SCALE,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "summary": summary,
        "pairs": {name: [{"baseline": b, "method": m} for b, m in runs] for name, runs in pairs.items()},
    }
    (args.out / "decoding.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "decoding.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
