"""Decoding with a compressed KV cache: decode tokens/s, KV-cache bytes and peak memory for dense
decoding, DyCoke and LOOK-M on a long video prompt.

The model is the LLaVA-OneVision video twin of `benchmarks._twin_model`: the real Qwen2-0.5B language
model geometry (random weights, fp32) behind a small CLIP-shaped tower whose frames pool to 196 tokens,
as LLaVA-OneVision-Qwen2-0.5B's do; one clip of 16 frames (3,137 visual tokens) between 64 text tokens.
Each configuration is one greedy `generate()` of 1 + N tokens (N = 64 by default) with the same
`min_new_tokens`, so every configuration decodes the same number of steps.

Measured per configuration: the prefill time (first stamp), decode tokens/s over the N steps after
it (wall clock), the KV-cache bytes right after the prefill (the engine's count) and at the end
(counted from the returned cache: the slots each layer holds, times 2 x KV heads x head size x
bytes), and the peak memory: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the process's
peak resident set (`VmHWM`, reset before each configuration), which includes the weights.

Targets: the KV bytes of a method within 5% of its budget (LOOK-M at 20%: heavy hitters 10% and
recent window 10% of the prompt), and its decode tokens/s at least dense decoding's.

Writes `benchmarks/results/decode_kv.{json,md}` and the README's `decode-kv` block.

Usage:
    python -m benchmarks.decode_kv [--frames 16] [--tokens 64] [--device cpu] [--out benchmarks/results/decode_kv]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

import vlmkit
from benchmarks._twin_model import StepStamps, build_video_inputs, build_video_model
from benchmarks.decoding_eval import write_between
from benchmarks.prefill import peak_memory_mb, reset_peak_memory

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- decode-kv:begin (benchmarks/decode_kv.py) -->", "<!-- decode-kv:end -->"

# (configuration, method specs, share of the prompt's KV the method is meant to keep; None: no budget)
CONFIGS = [
    ("dense", (), None),
    ("dycoke (ttm_drop=0.95, kv_drop=0.8)", ("dycoke:ttm_drop=0.95,kv_drop=0.8",), None),
    ("lookm 20% (heavy 0.1, recent 0.1)", ("lookm:heavy=0.1,recent=0.1",), 0.2),
    ("lookm 20%, decode=True", ("lookm:heavy=0.1,recent=0.1,decode=True",), 0.2),
]


def cache_bytes(cache) -> float:
    """Bytes of the key and value slots the cache holds (the valid ones of a compacted layer)."""
    total = 0.0
    for layer in cache.layers:
        per_slot = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        layout = getattr(layer, "layout", None)
        slots = layout.valid.sum().item() if layout is not None else layer.keys.shape[0] * layer.keys.shape[2]
        total += slots * per_slot
    return total


def measure(model, inputs, specs: tuple[str, ...], tokens: int) -> dict:
    """One configuration: times, KV bytes after the prefill and at the end, peak memory."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_memory()
    patch = vlmkit.apply(model, *specs) if specs else None
    stamps = StepStamps()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1 + tokens, min_new_tokens=1 + tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([stamps]), return_dict_in_generate=True)
        if cuda:
            torch.cuda.synchronize()
        prefill_kv = patch.cost["kv_bytes"][0] if patch is not None and patch.cost.get("kv_bytes") else None
    finally:
        if patch is not None:
            patch.remove()
    wall = [w for _, w in stamps.stamps]
    final_kv = cache_bytes(out.past_key_values)
    if prefill_kv is None:  # dense: the whole prompt in every layer
        prefill_kv = final_kv * inputs["input_ids"].shape[1] / (inputs["input_ids"].shape[1] + tokens)
    return {
        "prefill_s": wall[1] - wall[0],
        "decode_tokens_per_s": tokens / (wall[-1] - wall[1]),
        "kv_bytes_prefill": prefill_kv,
        "kv_bytes_final": final_kv,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_memory_mb(),
        "tokens": out.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
    }


def table(results: dict, dense_kv: float) -> str:
    lines = ["| configuration | KV after prefill (MB, % of dense) | KV after the last token (MB) | budget met (within 5%) "
             "| prefill s | decode tokens/s (x dense) | peak memory MB |", "|---|---|---|---|---|---|---|"]
    dense_rate = results["dense"]["decode_tokens_per_s"]
    for name, row in results.items():
        budget = row["budget"]
        share = row["kv_bytes_prefill"] / dense_kv
        met = "-" if budget is None else ("yes" if abs(share - budget) <= 0.05 * budget else f"no ({share:.1%} for {budget:.0%})")
        lines.append(
            f"| {name} | {row['kv_bytes_prefill'] / 2**20:.1f} ({share:.1%}) | {row['kv_bytes_final'] / 2**20:.1f} | {met} "
            f"| {row['prefill_s']:.2f} | {row['decode_tokens_per_s']:.2f} ({row['decode_tokens_per_s'] / dense_rate:.2f}) "
            f"| {row['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="decoding steps measured after the first token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_kv"))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose decode-kv block gets the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_video_model().to(args.device)
    inputs, visual = build_video_inputs(args.frames)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    results = {}
    for name, specs, budget in CONFIGS:
        results[name] = {"specs": list(specs), "budget": budget, **measure(model, inputs, specs, args.tokens)}
        print(name, {k: v for k, v in results[name].items() if k != "tokens"}, flush=True)
    dense_kv = results["dense"]["kv_bytes_prefill"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    header = (f"LLaVA-OneVision video twin (Qwen2-0.5B geometry, random weights, fp32), {args.frames} frames x 196 "
              f"= {visual} visual tokens + {inputs['input_ids'].shape[1] - visual} text tokens, greedy, 1 + {args.tokens} "
              f"tokens; {device}, {torch.get_num_threads()} threads.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": header, "results": results}, indent=1))
    text = header + "\n\n" + table(results, dense_kv) + "\n"
    args.out.with_suffix(".md").write_text(text)
    write_between(args.readme, BEGIN, END, text)
    print(text)


if __name__ == "__main__":
    main()
