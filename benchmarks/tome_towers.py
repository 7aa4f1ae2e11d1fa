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

Usage:
    python -m benchmarks.tome_towers [--repeats 5] [--batch 4] [--threads 1] [--device cpu] [--out benchmarks/results]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for tome_towers.json and tome_towers.md")
    args = parser.parse_args()
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
