"""The video methods on shapes-video: accuracy against the visual tokens, LLM FLOPs and KV bytes they leave.

Runs `eval/video_methods.yaml` (MVBench layout, 8 frames, 4 temporal tasks; the dense model, VisionZip
and FastV, and the video methods evs, dycoke, fastvid and holitom at three budgets each) with
`vlmkit eval --suite`, then writes the table into the README (between its `video-methods` markers).
FLOPs and KV bytes are the prefill's, counted by the engine from what ran (mean per clip).

Usage:
    vlmkit data shapes --out data/shapes --bench video --frames 8 --n 300     # once
    python -m benchmarks.video_methods_eval --data data/shapes --runs runs/video_methods
    python -m benchmarks.video_methods_eval --skip-run                        # only rebuild the table
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.decoding_eval import run_and_collect, write_between

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "video_methods.yaml"
BEGIN, END = "<!-- video-methods:begin (benchmarks/video_methods_eval.py) -->", "<!-- video-methods:end -->"


def report(found: dict) -> str:
    runs = found["video8"]
    dense = runs["baseline"]
    config = dense["config"]
    lines = [
        f"Model `{config['model']['spec']}`, greedy, batch size {config['batch_size']}, "
        f"{dense['summary']['samples']} clips of 8 frames ({dense['summary']['visual_tokens']['input_mean']:.0f} visual "
        "tokens). Produced by `python -m benchmarks.video_methods_eval` from the runs of `eval/video_methods.yaml`.",
        "",
        "| method | budget | visual tokens in the LLM | LLM FLOPs | KV bytes | accuracy |",
        "|---|---|---|---|---|---|",
    ]

    def key(item):
        name, run = item
        return (name != "baseline", name.split("_")[0], -run["summary"]["cost"]["llm_flops"])

    for name, run in sorted(runs.items(), key=key):
        method, _, budget = name.partition("_")
        cost, tokens = run["summary"]["cost"], run["summary"]["visual_tokens"]["kept_final_mean"]
        lines.append(
            f"| {method} | {budget or '-'} | {tokens:.0f} | {cost['llm_flops'] / dense['summary']['cost']['llm_flops']:.0%} | "
            f"{cost['kv_bytes'] / dense['summary']['cost']['kv_bytes']:.0%} | {100 * run['scores']['accuracy']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-video")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/video_methods"))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--suite", type=Path, default=SUITE)
    args = parser.parse_args(argv)
    found = run_and_collect("video_methods_eval", args, task="video8")
    if isinstance(found, int):
        return found
    text = report(found)
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
