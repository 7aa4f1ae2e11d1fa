"""Trained mixture-of-depths on shapes-llava-deep: p-MoD and gamma-MoD against their control fine-tune.

Runs three suites with `vlmkit eval --suite`, each on its own model: `eval/mod_control.yaml` on the
control fine-tune (the same steps, batches and trainable weights, no routers), `eval/mod_pmod.yaml`
on `shapes-llava-deep-pmod` and `eval/mod_gammamod.yaml` on `shapes-llava-deep-gammamod` (POPE's
three splits, MME, CHAIR with 64-token captions). It then writes the README table (between its
`mod` markers) and the plot `docs/mod_flops.png`, with the dense model and the training-free
layer-skipping rows of `benchmarks.depth_eval` (same tasks) beside them, and each fine-tune's
training time from its `log.jsonl`. FLOPs and KV bytes are the prefill's, counted by the engine.

Usage:
    vlmkit train mod --method none --out runs/mod/control          # and pmod, gammamod (about 30-50 min each)
    python -m benchmarks.mod_eval --control runs/mod/control/final --depth-runs runs/depth
    python -m benchmarks.mod_eval --skip-run ...                   # only rebuild the table and plot
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.decoding_eval import collect, save_plot, write_between
from benchmarks.depth_eval import rows

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- mod:begin (benchmarks/mod_eval.py) -->", "<!-- mod:end -->"
TRAINING_FREE = ("mod", "mod_light", "mod_heavy", "shortv_fraction=0.5", "shortv_fraction=0.75", "vtw_withdraw=6")


def run_suites(args: argparse.Namespace) -> int:
    from vlmkit import cli

    for suite, model in (("mod_control", str(args.control)), ("mod_pmod", args.pmod), ("mod_gammamod", args.gammamod)):
        status = cli.main(["eval", "--suite", str(ROOT / "eval" / f"{suite}.yaml"), "--model", model, "--data",
                           str(args.data), "--out", str(args.runs / suite)])
        if status:
            return status
    return 0


def training_minutes(log: Path) -> float | None:
    """Wall-clock minutes from the first to the last logged step of a training run (None without a log)."""
    if not log.is_file():
        return None
    times = [json.loads(line)["time"] for line in log.read_text().splitlines() if '"time"' in line]
    return (times[-1] - times[0]) / 60 if len(times) > 1 else None


def report(args: argparse.Namespace) -> str:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for suite in ("mod_control", "mod_pmod", "mod_gammamod"):
        for task, runs in collect(args.runs / suite).items():
            found.setdefault(task, {}).update(runs)
    depth = collect(args.depth_runs)
    for task, runs in depth.items():
        for name in ("baseline", *TRAINING_FREE):
            if name in runs:
                found.setdefault(task, {})[name] = runs[name]
    table = rows(found)
    by_name = {row["name"]: row for row in table}
    if "baseline" not in by_name or "control" not in by_name:
        raise SystemExit(f"mod_eval: need the dense runs under {args.depth_runs} and the control runs under {args.runs}")
    dense, control = by_name["baseline"], by_name["control"]
    config = found["pope"]["control"]["config"]
    minutes = {name: training_minutes(args.train_runs / name / "log.jsonl") for name in ("control", "pmod", "gammamod")}
    trained = ", ".join(f"{name} {m:.0f} min" for name, m in minutes.items() if m is not None)
    lines = [
        f"Greedy, batch size {config['batch_size']}, {control['threads']} CPU thread(s); POPE: 3 x "
        f"{found['pope']['control']['summary']['samples'] // 3} questions; MME: 4 subtasks; CHAIR: 500 images, "
        "64-token captions. FLOPs and KV bytes: the prefill's, counted by the engine from what ran (mean per POPE "
        "sample), relative to the dense model. Fine-tunes: 1,000 steps of 16 samples from `shapes-llava-deep` "
        f"(language model, projector and routers; vision tower frozen), wall-clock {trained} on 1 CPU thread "
        "each, three at once on 2 cores. Produced by `python -m benchmarks.mod_eval`.",
        "",
        "| model | method | LLM FLOPs | KV bytes | POPE mean acc (rand / pop / adv) | vs control (points) | MME perception | CHAIR_s / CHAIR_i |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def origin(name: str) -> tuple[str, str]:
        if name == "baseline":
            return "shapes-llava-deep", "dense"
        if name == "control":
            return "control fine-tune", "dense"
        if name.startswith(("pmod", "gammamod")):
            return f"shapes-llava-deep-{name.split('_')[0]}", name.replace("_", " ")
        return "shapes-llava-deep", f"{name.replace('_', ' ')} (training-free)"

    order = {"baseline": 0, "control": 1}
    for row in sorted(table, key=lambda r: (order.get(r["name"], 2 if r["name"].startswith(("pmod", "gammamod")) else 3), -(r["flops"] or 0))):
        model, method = origin(row["name"])
        splits = " / ".join(f"{100 * row['pope_splits'][s]:.1f}" for s in ("random", "popular", "adversarial"))
        mme = "-" if row["mme"] is None else f"{row['mme']:.1f}"
        chair = "-" if row["chair_s"] is None else f"{100 * row['chair_s']:.1f} / {100 * row['chair_i']:.1f}"
        lines.append(
            f"| {model} | {method} | {row['flops'] / dense['flops']:.0%} | {row['kv'] / dense['kv']:.0%} | "
            f"{100 * row['pope']:.1f} ({splits}) | {100 * (row['pope'] - control['pope']):+.1f} | {mme} | {chair} |"
        )
    draw(table, dense, control, args.plot)
    return "\n".join(lines) + f"\n\n![POPE accuracy against LLM FLOPs, trained and training-free]({args.plot.relative_to(ROOT).as_posix()})\n"


def draw(table: list[dict[str, Any]], dense: dict[str, Any], control: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    groups = {"pmod (trained)": "pmod", "gammamod (trained)": "gammamod", "mod (training-free)": "mod",
              "shortv (training-free)": "shortv", "vtw (training-free)": "vtw"}
    for label, prefix in groups.items():
        points = sorted((r["flops"] / dense["flops"], 100 * r["pope"]) for r in table if r["name"].split("_")[0] == prefix)
        if points:
            axis.plot(*zip(*points), "o-" if "trained)" in label else "s--", label=label, markersize=5)
    axis.plot([1.0], [100 * dense["pope"]], "*", markersize=11, label="dense")
    axis.plot([control["flops"] / dense["flops"]], [100 * control["pope"]], "P", markersize=9, label="control fine-tune")
    axis.axhline(100 * control["pope"] - 1, color="grey", linewidth=0.8, linestyle=":", label="control - 1 point")
    axis.axvline(0.6, color="grey", linewidth=0.8, linestyle="--", label="60% of dense FLOPs")
    axis.set_xlabel("LLM prefill FLOPs (share of dense)")
    axis.set_ylabel("POPE mean accuracy (%)")
    save_plot(figure, axis, path, legend_size=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", type=Path, default=Path("runs/mod/control/final"), help="the control fine-tune's final/ folder")
    parser.add_argument("--pmod", default="shapes-llava-deep-pmod")
    parser.add_argument("--gammamod", default="shapes-llava-deep-gammamod")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/mod-eval"))
    parser.add_argument("--depth-runs", type=Path, default=Path("runs/depth"), help="benchmarks.depth_eval's runs (dense, training-free)")
    parser.add_argument("--train-runs", type=Path, default=Path("runs/mod"), help="the fine-tunes' run folders (training time)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "mod_flops.png")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table and plot from finished runs")
    args = parser.parse_args(argv)
    if not args.skip_run:
        status = run_suites(args)
        if status:
            return status
    text = report(args)
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
