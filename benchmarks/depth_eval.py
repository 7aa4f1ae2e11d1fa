"""Layer skipping on shapes-llava-deep: accuracy against the LLM FLOPs the engine counted.

Runs `eval/depth_budgets.yaml` (POPE's three splits, MME, CHAIR with 64-token captions; the dense
model, shortv, vtw and mod at three budgets each, FastV and random pruning at the FLOPs of the mod
budgets) with `vlmkit eval --suite`, then reads each run's `scores.json` and writes the table into
the README (between its `depth` markers) and the plot `docs/depth_flops.png`: POPE mean accuracy,
MME perception, CHAIR_s / CHAIR_i, the prefill's LLM FLOPs and KV bytes (mean per sample, relative to
dense, counted by the engine from what ran) and the measured prefill time per sample.

Usage:
    vlmkit data shapes --out data/shapes --n 100 --bench pope,mme    # once
    vlmkit data shapes --out data/shapes --n 500 --bench chair
    python -m benchmarks.depth_eval --data data/shapes --runs runs/depth
    python -m benchmarks.depth_eval --runs runs/depth --skip-run       # only rebuild the table and plot

Rerunning resumes finished runs (the eval runner's own resumption).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.decoding_eval import run_and_collect, save_plot, write_between

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "depth_budgets.yaml"
BEGIN, END = "<!-- depth:begin (benchmarks/depth_eval.py) -->", "<!-- depth:end -->"
FAMILIES = {"baseline": "dense", "shortv": "layer skipping", "vtw": "layer skipping", "mod": "layer skipping",
            "fastv": "pruning", "random": "pruning"}


def rows(found: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant: its POPE, MME and CHAIR results and its cost (POPE runs' mean)."""
    table = []
    for name, pope in found.get("pope", {}).items():
        mme, chair = found.get("mme", {}).get(name), found.get("chair", {}).get(name)
        cost = pope["summary"].get("cost") or {}
        timing = pope["summary"].get("timing") or {}
        table.append({
            "name": name,
            "pope": pope["scores"]["mean_accuracy"],
            "pope_splits": {split: s["accuracy"] for split, s in pope["scores"]["splits"].items()},
            "mme": None if mme is None else mme["metrics"]["perception"],
            "chair_s": None if chair is None else chair["metrics"]["CHAIRs"],
            "chair_i": None if chair is None else chair["metrics"]["CHAIRi"],
            "flops": cost.get("llm_flops"), "kv": cost.get("kv_bytes"),
            "prefill_s": timing.get("prefill_s_per_sample"), "threads": timing.get("threads"),
        })
    return table


def report(found: dict[str, dict[str, dict[str, Any]]], plot: Path) -> str:
    table = rows(found)
    dense = next(row for row in table if row["name"] == "baseline")
    config = found["pope"]["baseline"]["config"]
    lines = [
        f"Model `{config['model']['spec']}` (weights sha256 `{config['model']['weights_sha256'][:12]}`), greedy, "
        f"batch size {config['batch_size']}, {dense['threads']} CPU thread(s); POPE: 3 x "
        f"{found['pope']['baseline']['summary']['samples'] // 3} questions. FLOPs and KV bytes: the prefill's, "
        "counted by the engine from what ran (mean per POPE sample), relative to dense. Produced by "
        "`python -m benchmarks.depth_eval` from the runs of `eval/depth_budgets.yaml`.",
        "",
        "| method | LLM FLOPs | KV bytes | POPE mean acc (rand / pop / adv) | kept of dense POPE | MME perception | CHAIR_s / CHAIR_i | prefill s/sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(table, key=lambda r: (r["name"] != "baseline", -(r["flops"] or 0))):
        splits = " / ".join(f"{100 * row['pope_splits'][s]:.1f}" for s in ("random", "popular", "adversarial"))
        mme = "-" if row["mme"] is None else f"{row['mme']:.1f}"
        chair = "-" if row["chair_s"] is None else f"{100 * row['chair_s']:.1f} / {100 * row['chair_i']:.1f}"
        lines.append(
            f"| {row['name']} | {row['flops'] / dense['flops']:.0%} | {row['kv'] / dense['kv']:.0%} | "
            f"{100 * row['pope']:.1f} ({splits}) | {row['pope'] / dense['pope']:.1%} | {mme} | {chair} | "
            f"{row['prefill_s']:.3f} |"
        )
    draw(table, dense, plot)
    return "\n".join(lines) + f"\n\n![POPE accuracy against LLM FLOPs]({plot.relative_to(ROOT).as_posix()})\n"


def draw(table: list[dict[str, Any]], dense: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    methods = sorted({row["name"].split("_")[0] for row in table})
    for method in methods:
        points = sorted((row["flops"] / dense["flops"], 100 * row["pope"]) for row in table if row["name"].split("_")[0] == method)
        style = "o-" if FAMILIES.get(method) == "layer skipping" else ("s--" if method != "baseline" else "*")
        axis.plot(*zip(*points), style, label=method, markersize=9 if method == "baseline" else 5)
    axis.axhline(98 * dense["pope"], color="grey", linewidth=0.8, linestyle=":", label="98% of dense")
    axis.set_xlabel("LLM prefill FLOPs (share of dense)")
    axis.set_ylabel("POPE mean accuracy (%)")
    save_plot(figure, axis, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava-deep")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/depth"))
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "depth_flops.png")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table and plot from finished runs")
    args = parser.parse_args(argv)
    found = run_and_collect("depth_eval", args)
    if isinstance(found, int):
        return found
    text = report(found, args.plot)
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
