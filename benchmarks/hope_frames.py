"""HoPE's fine-tune against its control on shapes-qwen2-vl: video accuracy against the number of frames.

Runs `eval/hope_frames.yaml` (MVBench layout, 4 temporal tasks, 200 clips at each of 8, 16 and 32
frames; the model unpatched and with `hope` applied) on the control run and on the HoPE fine-tune,
then writes the README table (between its `hope-frames` markers) and `docs/hope_frames.png`.

Usage (both fine-tunes: the same steps and batches of 8-frame clips, images and text; only the method differs):
    vlmkit train shapes --model qwen2-vl --out runs/mrope/control
    vlmkit train shapes --model qwen2-vl --set method=hope:train=True --out runs/mrope/hope
    for f in 8 16 32; do vlmkit data shapes --out /tmp/f$f --bench video --frames $f --n 200 && mv /tmp/f$f/video data/shapes/frames/video$f; done
    python -m benchmarks.hope_frames
    python -m benchmarks.hope_frames --skip-run        # only rebuild the table and plot
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.decoding_eval import collect, save_plot, write_between

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "hope_frames.yaml"
BEGIN, END = "<!-- hope-frames:begin (benchmarks/hope_frames.py) -->", "<!-- hope-frames:end -->"


def frames_of(run: dict) -> int:
    return run["config"]["data"]["options"]["num_frames"]


def curves(found: dict) -> dict[str, dict[int, float]]:
    """{run name: {frames: accuracy %}} of one model's finished runs."""
    out: dict[str, dict[int, float]] = {}
    for runs in found.values():
        for name, run in runs.items():
            out.setdefault(name, {})[frames_of(run)] = 100 * run["scores"]["accuracy"]
    return out


def fine_tune_label(model_path: str) -> str:
    """The method a run's model was fine-tuned with, from its `training.json`."""
    training = json.loads((Path(model_path) / "training.json").read_text())
    method = training["config"]["method"]
    return "control (none)" if method == "none" else f"`{method}`"


def report(results: dict[str, tuple[str, dict]]) -> str:
    first = next(iter(results.values()))[1]
    run = next(iter(next(iter(first.values())).values()))
    training = json.loads((Path(run["config"]["model"]["path"]) / "training.json").read_text())["config"]
    counts = sorted({frames_of(r) for runs in first.values() for r in runs.values()})
    lines = [
        f"{run['summary']['samples']} clips a frame count, greedy, MVBench's protocol. Both fine-tunes: "
        f"{training['letter_steps']} steps of {training['batch']} samples ({', '.join(map(str, training['frame_counts']))}-frame "
        "clips, images and text in turn) from the same distilled start; only the method differs. Produced by "
        "`python -m benchmarks.hope_frames` from the runs of `eval/hope_frames.yaml`.",
        "",
        "| fine-tune | applied at test | " + " | ".join(f"{n} frames" for n in counts) + " |",
        "|---|---|" + "---|" * len(counts),
    ]
    for label, found in results.values():
        for name, accuracy in sorted(curves(found).items(), key=lambda item: item[0] != "baseline"):
            applied = "none" if name == "baseline" else f"`{name}`"
            lines.append(f"| {label} | {applied} | " + " | ".join(f"{accuracy[n]:.1f}" for n in counts) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for label, found in results.values():
        for name, accuracy in curves(found).items():
            counts = sorted(accuracy)
            axis.plot(counts, [accuracy[n] for n in counts], marker="o",
                      label=f"{label.strip('`')}, tested {'unpatched' if name == 'baseline' else 'with ' + name}")
    axis.axhline(25, color="grey", linestyle=":", label="chance")
    axis.set(xscale="log", xlabel="frames per clip (trained on 8)", ylabel="accuracy (%)",
             title="shapes-qwen2-vl: HoPE fine-tune against its control")
    axis.set_xticks([8, 16, 32], labels=["8", "16", "32"])
    axis.set_xticks([], minor=True)
    save_plot(figure, axis, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", default="runs/mrope/control/final", help="the control fine-tune's weights")
    parser.add_argument("--hope", default="runs/mrope/hope/final", help="the HoPE fine-tune's weights")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/hope_frames"))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "hope_frames.png")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args(argv)
    results = {}
    for key, model in (("control", args.control), ("hope", args.hope)):
        if not args.skip_run:
            from vlmkit import cli

            status = cli.main(["eval", "--suite", str(SUITE), "--model", model, "--data", str(args.data),
                               "--out", str(args.runs / key)])
            if status:
                return status
        found = collect(args.runs / key)
        if not found:
            print(f"hope_frames: no finished runs under {args.runs / key}", file=sys.stderr)
            return 2
        results[key] = (fine_tune_label(model), found)
    text = report(results)
    plot(results, args.plot)
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
