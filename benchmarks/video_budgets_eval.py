"""The video methods on shapes-video at 16 and 32 frames: accuracy against the KV cache they keep.

Runs `eval/video_budgets.yaml` (MVBench layout, 4 temporal tasks, 100 clips a frame count; the dense
model, FastV, VisionZip and the video methods at three budgets each) with `vlmkit eval --suite`. From
each run: accuracy, the visual tokens the LLM kept, the measured prefill time per clip and decode
tokens/s (batch size 4), and the KV-cache bytes the prefill left (counted by the engine). Then, per run,
a second pass generates exactly 64 tokens for each of `--kv-clips` held-out clips (batch size 1) and
counts the KV bytes the cache holds at the end, so the methods that edit the cache while decoding
(DyCoke, LOOK-M with `decode=True`) are counted as they run. Writes the README table (between its
`video-budgets` markers) and `docs/video_kv.png` (accuracy against KV bytes after 64 tokens).

Usage:
    vlmkit data shapes --out /tmp/v16 --bench video --frames 16 --n 100 && mv /tmp/v16/video data/shapes/video16
    vlmkit data shapes --out /tmp/v32 --bench video --frames 32 --n 100 && mv /tmp/v32/video data/shapes/video32
    python -m benchmarks.video_budgets_eval --data data/shapes --runs runs/video_budgets
    python -m benchmarks.video_budgets_eval --skip-run        # only rebuild the table and plot
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.decode_kv import cache_bytes
from benchmarks.decoding_eval import run_and_collect, save_plot, write_between

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "video_budgets.yaml"
BEGIN, END = "<!-- video-budgets:begin (benchmarks/video_budgets_eval.py) -->", "<!-- video-budgets:end -->"
KV_SEED = 1_000_900_000
"""First held-out clip seed of the 64-token KV pass (apart from the written benchmark clips)."""
KV_TOKENS = 64


def frames_of(run: dict) -> int:
    return run["config"]["data"]["options"]["num_frames"]


def kv_after_tokens(model_name: str, methods: list[dict], num_frames: int, clips: int) -> float:
    """Mean KV bytes per clip after generating exactly `KV_TOKENS` tokens, with `methods` (a run's
    recorded methods: name and parameters) applied."""
    import vlmkit
    from vlmkit import zoo
    from vlmkit.registry import REGISTRY
    from vlmkit.data.shapes import WorldConfig
    from vlmkit.data.shapes_video import clip_question, mc_prompt, render_clip, sample_clip
    from vlmkit.train.evaluate import MC_ANSWER_PREFIX

    model, processor = zoo.load(model_name)
    world = WorldConfig(image_size=model.config.vision_config.image_size, max_objects=3)
    patch = vlmkit.apply(model, *[REGISTRY.get(m["name"])(**m["params"]) for m in methods]) if methods else None
    total = 0.0
    for seed in range(KV_SEED, KV_SEED + clips):
        clip = sample_clip(seed, world, num_frames)
        item = clip_question(clip, np.random.default_rng([seed, 4]))
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": mc_prompt(item["question"], item["candidates"])}]}],
            add_generation_prompt=True) + MC_ANSWER_PREFIX
        inputs = processor(text=[text], videos=[render_clip(clip)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=KV_TOKENS, min_new_tokens=KV_TOKENS, do_sample=False,
                                 return_dict_in_generate=True)
        total += cache_bytes(out.past_key_values)
    if patch is not None:
        patch.remove()
    return total / clips


def measure_kv(found: dict, runs_dir: Path, model: str, clips: int) -> dict:
    """{task: {run: KV bytes after 64 tokens}}, cached in `runs_dir/kv_after_64.json`."""
    path = runs_dir / "kv_after_64.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    for task, runs in found.items():
        for name, run in runs.items():
            if name in cached.get(task, {}):
                continue
            frames = frames_of(run)
            cached.setdefault(task, {})[name] = kv_after_tokens(model, run["config"]["methods"], frames, clips)
            path.write_text(json.dumps(cached, indent=1))  # written as it goes: a rerun resumes
            print(f"{task} {name}: {cached[task][name] / 2**10:.0f} KiB after {KV_TOKENS} tokens", flush=True)
    return cached


def report(found: dict, kv: dict) -> str:
    tasks = sorted(found, key=lambda t: frames_of(found[t]["baseline"]))
    dense = found[tasks[0]]["baseline"]
    lines = [
        f"Model `{dense['config']['model']['spec']}`, greedy, batch size {dense['config']['batch_size']}, "
        f"{dense['summary']['samples']} clips a frame count. KV after the prefill: the engine's count; after "
        f"{KV_TOKENS} tokens: counted from the cache of {KV_TOKENS} generated tokens on held-out clips (batch size 1). "
        "Times on this machine's CPU (2 cores). Produced by `python -m benchmarks.video_budgets_eval` from the runs of "
        "`eval/video_budgets.yaml`.",
        "",
        "| frames | method | budget | visual tokens | prefill ms / clip | decode tokens/s | KV after prefill | "
        f"KV after {KV_TOKENS} tokens | accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        runs = found[task]
        base = runs["baseline"]["summary"]

        def key(item):
            name, run = item
            return (name != "baseline", name.split("_")[0], -run["summary"]["visual_tokens"]["kept_final_mean"])

        frames = frames_of(runs["baseline"])
        for name, run in sorted(runs.items(), key=key):
            method, _, budget = name.partition("_")
            summary, timing = run["summary"], run["summary"]["timing"]
            rate = timing.get("decode_tokens_per_s")
            lines.append(
                f"| {frames} | {method} | {budget or '-'} | {summary['visual_tokens']['kept_final_mean']:.0f} | "
                f"{1000 * timing['prefill_s_per_sample']:.0f} | {'-' if rate is None else f'{rate:.0f}'} | "
                f"{summary['cost']['kv_bytes'] / base['cost']['kv_bytes']:.0%} | "
                f"{kv[task][name] / kv[task]['baseline']:.0%} ({kv[task][name] / 2**10:.0f} KiB) | "
                f"{100 * run['scores']['accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(found: dict, kv: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.5), squeeze=False)
    for axis, task in zip(axes[0], sorted(found, key=lambda t: frames_of(found[t]["baseline"]))):
        runs = found[task]
        methods = sorted({name.split("_")[0] for name in runs if name != "baseline"})
        for method in methods:
            points = sorted((kv[task][name] / 2**20, 100 * run["scores"]["accuracy"])
                            for name, run in runs.items() if name.split("_")[0] == method)
            axis.plot(*zip(*points), marker="o", label=method)
        axis.scatter([kv[task]["baseline"] / 2**20], [100 * runs["baseline"]["scores"]["accuracy"]], marker="*", s=150,
                     color="black", label="dense", zorder=5)
        frames = frames_of(runs["baseline"])
        axis.set(xlabel=f"KV cache after {KV_TOKENS} generated tokens (MiB per clip)", ylabel="accuracy (%)",
                 title=f"shapes-video, {frames} frames")
    for axis in axes[0][:-1]:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_plot(figure, axes[0][-1], path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-video")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/video_budgets"))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "video_kv.png")
    parser.add_argument("--kv-clips", type=int, default=4, help="held-out clips of the 64-token KV pass (per run)")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--suite", type=Path, default=SUITE)
    args = parser.parse_args(argv)
    found = run_and_collect("video_budgets_eval", args, task="video_16f")
    if isinstance(found, int):
        return found
    found = {task: runs for task, runs in found.items() if task.startswith("video_")}
    kv = measure_kv(found, args.runs, args.model, args.kv_clips)
    text = report(found, kv)
    plot(found, kv, args.plot)
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
