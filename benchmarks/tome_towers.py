"""Throughput of ViT-B/16 vision towers with ToMe (`vlmkit.towers.install_tome`) against r.

Towers: timm ``vit_base_patch16_224`` (without its classifier) and the visual tower of open_clip
``ViT-B-16``, random weights, fp32, 224 x 224 images (197 tokens), batch 4 (``--batch``). r = 0 is
the unpatched tower; 4, 8, 16; and 13, ToMe's off-the-shelf ViT-B/16 setting (facebookresearch/ToMe
README table). r is the same in all 12 blocks; the last blocks merge fewer when tokens run out
(ToMe's clamp), and "tokens out" counts what leaves the tower.

Times: on the CPU, the process's CPU time (``time.process_time``) with one torch thread
(``--threads``), which stays meaningful on a machine shared with other jobs; on CUDA, wall time
between synchronizations. Every r is measured right after an r = 0 run of the same tower and
batch, and its speedup is the median over repeats of these paired ratios; images/s is the batch
over the median time.

With ``--llava``: end to end on the LLaVA-1.5 layout instead, `vlmkit.apply(model, "tome:r=R")` on a
LLaVA with CLIP ViT-L/14-336 geometry (24 blocks, 577 tokens; the projector reads block 23's output)
in front of the Qwen2-0.5B language model geometry (random weights, fp32, one image and 64 text
tokens): the vision tower's time, the language model's prefill time and the whole prefill (TTFT),
CPU time, medians of ratios paired with an unpatched run.

Usage:
    python -m benchmarks.tome_towers [--repeats 5] [--batch 4] [--threads 1] [--device cpu] [--out benchmarks/results]
    python -m benchmarks.tome_towers --llava [--repeats 3] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import open_clip
import timm
import torch

from vlmkit.towers import install_tome

R_VALUES = (0, 4, 8, 13, 16)
IMAGE_SIZE = 224
TOWERS = {
    "timm vit_base_patch16_224": lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0),
    "open_clip ViT-B-16": lambda: open_clip.create_model("ViT-B-16", pretrained=None).visual,
}


def forward_seconds(tower: torch.nn.Module, images: torch.Tensor, r: int) -> tuple[float, int]:
    """Time of one forward with ToMe at r (unpatched at 0), and the tokens that leave the tower."""
    cuda = images.device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clamp of the last blocks, reported as "tokens out"
        handle = install_tome(tower, r=r)
    try:
        tokens = handle.layout.token_count
        tokens_out = tokens - sum(handle.effective_schedule(tokens))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter() if cuda else time.process_time()
        with torch.no_grad():
            tower(images)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() if cuda else time.process_time()) - start, tokens_out
    finally:
        handle.remove()


def measure(tower: torch.nn.Module, images: torch.Tensor, repeats: int) -> dict[int, dict]:
    for r in R_VALUES:  # warm-up
        forward_seconds(tower, images, r)
    runs: dict[int, dict] = {r: {"seconds": [], "baseline_seconds": []} for r in R_VALUES}
    for _ in range(repeats):
        for r in R_VALUES:
            baseline, _ = forward_seconds(tower, images, 0)
            seconds, tokens_out = forward_seconds(tower, images, r)
            runs[r]["seconds"].append(seconds)
            runs[r]["baseline_seconds"].append(baseline)
            runs[r]["tokens_out"] = tokens_out
    batch = images.shape[0]
    for run in runs.values():
        run["images_per_second"] = batch / statistics.median(run["seconds"])
        run["speedup"] = statistics.median(b / s for b, s in zip(run["baseline_seconds"], run["seconds"]))
    return runs


LLAVA_R = (0, 4, 8, 16)


def llava_twin():
    """LLaVA-1.5's layout: CLIP ViT-L/14-336 geometry before the Qwen2-0.5B language model geometry."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from benchmarks._twin_model import IMAGE_TOKEN, VISUAL_TOKENS, twin_parts

    text, _ = twin_parts()
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=VISUAL_TOKENS)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def prefill_seconds(model, inputs: dict, r: int) -> dict:
    """CPU times of one prefill with `tome:r` applied (none at 0): tower, language model, whole; LLM visual tokens."""
    import vlmkit

    marks: dict[str, float] = {}
    hooks = []
    for name, module in (("tower", model.model.vision_tower), ("llm", model.model.language_model)):
        hooks.append(module.register_forward_pre_hook(lambda *a, _n=name: marks.__setitem__(f"{_n}_start", time.process_time())))
        hooks.append(module.register_forward_hook(lambda *a, _n=name: marks.__setitem__(f"{_n}_stop", time.process_time())))
    patch = vlmkit.apply(model, f"tome:r={r}") if r else None
    try:
        with torch.no_grad():
            start = time.process_time()
            model(**inputs, use_cache=True, logits_to_keep=1)
            whole = time.process_time() - start
        visual = len(patch.selections["tome"][0]) if patch else int((inputs["input_ids"] == model.config.image_token_id).sum())
    finally:
        for hook in hooks:
            hook.remove()
        if patch:
            patch.remove()
    return {"tower": marks["tower_stop"] - marks["tower_start"], "llm": marks["llm_stop"] - marks["llm_start"],
            "ttft": whole, "visual_tokens": visual}


def llava(args: argparse.Namespace) -> None:
    from benchmarks._twin_model import build_inputs

    torch.set_num_threads(args.threads)
    model, inputs = llava_twin(), build_inputs()
    for r in LLAVA_R:  # warm-up
        prefill_seconds(model, inputs, r)
    runs: dict[int, list[tuple[dict, dict]]] = {r: [] for r in LLAVA_R}
    for _ in range(args.repeats):
        for r in LLAVA_R:
            runs[r].append((prefill_seconds(model, inputs, 0), prefill_seconds(model, inputs, r)))
    lines = ["| r | LLM visual tokens | tower s | tower speedup | LLM prefill s | LLM speedup | TTFT s | TTFT speedup |",
             "|---|---|---|---|---|---|---|---|"]
    record = {}
    for r, pairs in runs.items():
        row = {"visual_tokens": pairs[0][1]["visual_tokens"]}
        for key in ("tower", "llm", "ttft"):
            row[f"{key}_s"] = statistics.median(run[key] for _, run in pairs)
            row[f"{key}_speedup"] = statistics.median(base[key] / run[key] for base, run in pairs)
        record[str(r)] = row
        lines.append(f"| {r} | {row['visual_tokens']} | {row['tower_s']:.3f} | {row['tower_speedup']:.2f}x | {row['llm_s']:.3f} | "
                     f"{row['llm_speedup']:.2f}x | {row['ttft_s']:.3f} | {row['ttft_speedup']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"model": "LLaVA-1.5 layout: CLIP ViT-L/14-336 geometry + Qwen2-0.5B LLM geometry (random weights, fp32)",
                "clock": f"CPU time, {args.threads} thread(s)", "repeats": args.repeats, "torch": torch.__version__}
        (args.out / "tome_llava.json").write_text(json.dumps({"meta": meta, "results": record}, indent=2) + "\n")
        (args.out / "tome_llava.md").write_text(table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for tome_towers.json and tome_towers.md")
    parser.add_argument("--llava", action="store_true", help="end to end on the LLaVA-1.5 layout instead (tome_llava.*)")
    args = parser.parse_args()
    if args.llava:
        return llava(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=args.device)
    clock = "wall time (CUDA synchronized)" if images.device.type == "cuda" else f"CPU time, {args.threads} thread(s)"
    results = {}
    for name, build in TOWERS.items():
        tower = build().eval().to(args.device)
        results[name] = measure(tower, images, args.repeats)
        del tower
    lines = [
        f"| tower | r | tokens out | images/s ({clock}) | speedup vs r=0 |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for r, run in runs.items():
            lines.append(f"| {name} | {r} | {run['tokens_out']} | {run['images_per_second']:.2f} | {run['speedup']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "towers": "ViT-B/16 geometry, random weights, fp32, 224 x 224 (197 tokens), constant r over 12 blocks",
            "batch": args.batch,
            "repeats": args.repeats,
            "device": str(images.device),
            "clock": clock,
            "machine": torch.cuda.get_device_name(images.device) if images.device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "results": {name: {str(r): run for r, run in runs.items()} for name, runs in results.items()},
        }
        (args.out / "tome_towers.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "tome_towers.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
