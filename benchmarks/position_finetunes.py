"""CCA and V2PE fine-tunes against their control: the README table and the long-context plot.

Reads the eval runs under --runs (one folder per fine-tune: `control`, `cca`, `v2pe`, ...; inside,
one run folder per benchmark: `pope`, `chair`, `multi`) and writes the table between the README's
`position-finetunes` markers and `docs/v2pe_multi.png` (multi-image needle accuracy against the
number of images in the prompt).

Usage (POPE 3 x 600 questions, CHAIR 500 images at 64 tokens, the multi-image needle test):
    vlmkit train finetune --from shapes-llava --method none --out runs/ft/control
    vlmkit train finetune --from shapes-llava --method cca --out runs/ft/cca
    vlmkit train finetune --from shapes-llava --method v2pe:train=True --out runs/ft/v2pe
    vlmkit data shapes --out data/shapes --n 100 --bench pope
    vlmkit data shapes --out data/shapes --n 500 --bench chair
    vlmkit data shapes --out data/shapes --n 50 --bench multi
    E="vlmkit eval --batch-size 8"; C="--num-images 500 --data-seed 42 --max-new-tokens 64"
    $E --model runs/ft/control/final --bench pope --data data/shapes/pope --out runs/ft_eval/control/pope
    $E --model runs/ft/control/final --bench chair --data data/shapes/chair $C --out runs/ft_eval/control/chair
    $E --model runs/ft/control/final --bench multi --data data/shapes/multi --out runs/ft_eval/control/multi
    $E --model runs/ft/control/final --method v2pe:delta=0.0625 --bench multi --data data/shapes/multi --out runs/ft_eval/control-v2pe16/multi
    $E --model runs/ft/cca/final --method cca --bench pope --data data/shapes/pope --out runs/ft_eval/cca/pope
    $E --model runs/ft/cca/final --method cca --bench chair --data data/shapes/chair $C --out runs/ft_eval/cca/chair
    $E --model runs/ft/v2pe/final --method v2pe --bench pope --data data/shapes/pope --out runs/ft_eval/v2pe/pope
    $E --model runs/ft/v2pe/final --method v2pe --bench multi --data data/shapes/multi --out runs/ft_eval/v2pe/multi
    $E --model runs/ft/v2pe/final --method v2pe:delta=0.0625 --bench multi --data data/shapes/multi --out runs/ft_eval/v2pe16/multi
    python -m benchmarks.position_finetunes --runs runs/ft_eval
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.decoding_eval import save_plot, write_between

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- position-finetunes:begin (benchmarks/position_finetunes.py) -->", "<!-- position-finetunes:end -->"


def scores(folder: Path) -> dict[str, dict[str, Any]]:
    """{benchmark: scores.json} of one fine-tune's finished runs."""
    return {run.parent.name: json.loads(run.read_text()) for run in sorted(folder.glob("*/scores.json"))}


def label(found: dict[str, Any]) -> tuple[str, str]:
    """(the method the model was fine-tuned with, the methods applied at test, changed parameters shown)."""
    import dataclasses

    from vlmkit.registry import REGISTRY

    config = next(iter(found.values()))["config"]
    training = json.loads((Path(config["model"]["path"]) / "training.json").read_text())
    tuned = training["config"]["finetune"]["method"]
    applied = []
    for method in config["methods"]:
        defaults = dataclasses.asdict(REGISTRY.get(method["name"]).Config())
        changed = ",".join(f"{k}={v}" for k, v in method["params"].items() if defaults.get(k) != v)
        applied.append(f"`{method['name']}{':' + changed if changed else ''}`")
    return ("control (none)" if tuned == "none" else f"`{tuned}`"), ", ".join(applied) or "none"


def table(runs: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| fine-tune (800 steps) | applied at test | POPE acc rand / pop / adv | CHAIR_s / CHAIR_i | multi-image accuracy at 1 / 2 / 4 / 8 / 16 images |",
        "|---|---|---|---|---|",
    ]
    for name, found in runs.items():
        pope = found.get("pope")
        splits = "-" if pope is None else " / ".join(
            f"{100 * pope['scores']['splits'][s]['accuracy']:.1f}" for s in ("random", "popular", "adversarial"))
        chair = found.get("chair")
        hallucination = "-" if chair is None else f"{100 * chair['metrics']['CHAIRs']:.1f} / {100 * chair['metrics']['CHAIRi']:.1f}"
        multi = found.get("multi")
        counts = "-" if multi is None else " / ".join(
            f"{100 * multi['metrics'][f'accuracy@{k}']:.0f}" for k in (1, 2, 4, 8, 16) if f"accuracy@{k}" in multi["metrics"])
        tuned, applied = label(found)
        lines.append(f"| {tuned} | {applied} | {splits} | {hallucination} | {counts} |")
    return "\n".join(lines) + "\n"


def draw(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for name, found in runs.items():
        multi = found.get("multi")
        if multi is None:
            continue
        counts = sorted(int(k.split("@")[1]) for k in multi["metrics"] if k.startswith("accuracy@"))
        tuned, applied = label(found)
        axis.plot(counts, [100 * multi["metrics"][f"accuracy@{k}"] for k in counts], "o-",
                  label=(f"{'control fine-tune' if tuned.startswith('control') else 'fine-tuned with ' + tuned}, "
                         f"{applied} at test").replace("`", ""))
    axis.axhline(50, color="grey", linewidth=0.8, linestyle=":", label="chance")
    axis.set_xscale("log", base=2)
    axis.set_xticks(counts, [str(k) for k in counts])
    axis.set_xlabel("images in the prompt (144 tokens each)")
    axis.set_ylabel("needle accuracy (%)")
    save_plot(figure, axis, path, legend_size=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/ft_eval"))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "v2pe_multi.png")
    args = parser.parse_args(argv)
    order = lambda folder: (folder.name != "control", folder.name)  # noqa: E731
    runs = {folder.name: scores(folder) for folder in sorted(args.runs.iterdir(), key=order) if folder.is_dir()}
    runs = {name: found for name, found in runs.items() if found}
    if "control" not in runs:
        print(f"position_finetunes: no finished control runs under {args.runs}", file=sys.stderr)
        return 2
    draw(runs, args.plot)
    text = table(runs) + f"\n![needle accuracy against images in the prompt]({args.plot.relative_to(ROOT).as_posix()})\n"
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
