"""Every pruning method on a shapes model: accuracy against visual tokens kept and against prefill time.

Runs `eval/pruning.yaml` (POPE's three splits and MME for the dense model and every pruning method at
50, 25, 12.5 and 6.25 % of the visual tokens) with `vlmkit eval --suite`, then reads each run's
`scores.json` and writes the table into the README (between its `pruning` markers) and two plots:
POPE mean accuracy against the share of visual tokens kept (`docs/<block>_tokens.png`) and against the
measured prefill time per sample (`docs/<block>_time.png`); `--block` names the README block (one per model).

Prefill time is measured in a separate pass (`--timing-samples`, default 64 POPE questions, batch 8,
one thread): the compute thread's CPU time of each batch's prefill (`model(**inputs)`), median over
batches, per sample. CPU time is not inflated by other processes on a shared host, unlike the eval
runs' wall-clock timings.

Usage:
    vlmkit data shapes --out data/shapes --n 100 --bench pope,mme    # once
    python -m benchmarks.pruning_eval --model shapes-llava --runs runs/pruning
    python -m benchmarks.pruning_eval --runs runs/pruning --skip-run   # only rebuild the table and plots
    python -m benchmarks.pruning_eval --model shapes-llava-deep --runs runs/pruning-deep --block pruning-deep

Rerunning resumes finished runs (the eval runner's own resumption).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.decoding_eval import run_and_collect, save_plot, write_between

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "pruning.yaml"
SPLITS = ("random", "popular", "adversarial")


def prefill_times(model_name: str, data: Path, specs: dict[str, list[str]], samples: int) -> dict[str, float]:
    """Per run name, the median CPU seconds per sample of a batch-8 prefill over `samples` POPE questions."""
    import statistics
    import time

    import torch
    from PIL import Image

    import vlmkit
    from vlmkit import zoo

    torch.set_num_threads(1)
    model, processor = zoo.load(model_name)
    model.eval()
    questions = [json.loads(line) for line in (data / "pope" / "shapes_pope_random.json").read_text().splitlines()][:samples]
    batches = []
    for start in range(0, len(questions), 8):
        chunk = questions[start : start + 8]
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": q["text"] + "\nAnswer the question using a single word or phrase."}]}],
            add_generation_prompt=True) for q in chunk]
        images = [Image.open(data / "pope" / "images" / q["image"]).convert("RGB") for q in chunk]
        batches.append(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    times = {}
    for name, methods in specs.items():
        patch = vlmkit.apply(model, *methods) if methods else None
        try:
            with torch.no_grad():
                model(**batches[0])  # warm-up
                spent = []
                for inputs in batches:
                    begin = time.thread_time()
                    model(**inputs)
                    spent.append((time.thread_time() - begin) / inputs["input_ids"].shape[0])
        finally:
            if patch is not None:
                patch.remove()
        times[name] = statistics.median(spent)
    return times


def spec_of(method: dict[str, Any]) -> str:
    """A method spec string from a run config's {"name", "params"} entry."""
    params = ",".join(f"{key}={value!r}" for key, value in method["params"].items() if value is not None)
    return f"{method['name']}:{params}" if params else method["name"]


def rows(found: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run: method, budget, POPE and MME results, kept tokens, cost and time (POPE runs)."""
    table = []
    for name, pope in found.get("pope", {}).items():
        method, _, budget = name.partition("_keep=")
        mme = found.get("mme", {}).get(name)
        summary = pope["summary"]
        table.append({
            "method": "dense" if name == "baseline" else method,
            "keep": 1.0 if name == "baseline" else float(budget),
            "pope": pope["scores"]["mean_accuracy"],
            "splits": [pope["scores"]["splits"][split]["accuracy"] for split in SPLITS],
            "yes": sum(pope["scores"]["splits"][split]["yes_ratio"] for split in SPLITS) / len(SPLITS),
            "mme": None if mme is None else mme["metrics"]["perception"],
            "tokens": (summary.get("visual_tokens") or {}).get("kept_final_mean"),
            "flops": (summary.get("cost") or {}).get("llm_flops"),
            "prefill_s": (summary.get("timing") or {}).get("prefill_s_per_sample"),
        })
    return table


def report(found: dict[str, dict[str, dict[str, Any]]], plots: tuple[Path, Path], times: dict[str, float] | None = None) -> str:
    table = rows(found)
    if times:
        for row in table:
            name = "baseline" if row["method"] == "dense" else f"{row['method']}_keep={row['keep']:g}"
            row["prefill_s"] = times.get(name, row["prefill_s"])
    dense = next(row for row in table if row["method"] == "dense")
    config = found["pope"]["baseline"]["config"]
    lines = [
        f"Model `{config['model']['spec']}` (weights sha256 `{config['model']['weights_sha256'][:12]}`), greedy, batch "
        f"size {config['batch_size']}; POPE: 3 x {found['pope']['baseline']['summary']['samples'] // 3} questions; MME: "
        "perception score of the shapes MME (official parser). LLM FLOPs: the prefill's, counted by the engine "
        "from what ran, relative to dense; prefill: "
        + ("CPU time per sample of a batch-8 prefill, one thread, median over 8 batches of POPE questions "
           "(vision tower included)" if times else "the eval runs' wall-clock prefill time per sample")
        + ". Produced by "
        "`python -m benchmarks.pruning_eval` from the runs of `eval/pruning.yaml`.",
        "",
        "| method | kept | visual tokens | POPE mean acc (rand / pop / adv) | of dense | yes ratio | MME perception | LLM FLOPs | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(table, key=lambda r: (r["method"] != "dense", -r["keep"], -r["pope"])):
        splits = " / ".join(f"{100 * value:.1f}" for value in row["splits"])
        mme = "-" if row["mme"] is None else f"{row['mme']:.1f}"
        tokens = "-" if row["tokens"] is None else f"{row['tokens']:.0f}"
        flops = "-" if not row["flops"] else f"{row['flops'] / dense['flops']:.0%}"
        prefill = "-" if row["prefill_s"] is None else f"{1000 * row['prefill_s']:.1f}"
        lines.append(
            f"| {row['method']} | {row['keep']:.2%} | {tokens} | {100 * row['pope']:.1f} ({splits}) | "
            f"{row['pope'] / dense['pope']:.1%} | {row['yes']:.1%} | {mme} | {flops} | {prefill} |"
        )
    draw(table, dense, plots)
    images = "\n".join(f"![{alt}]({path.relative_to(ROOT).as_posix()})" for alt, path in
                       zip(("POPE accuracy against visual tokens kept", "POPE accuracy against prefill time"), plots))
    return "\n".join(lines) + f"\n\n{images}\n"


def object_kinds(data: Path) -> dict[tuple[str, str], tuple[str, bool]]:
    """(image, category) -> (size word, faint) for every object the POPE ground truth lists."""
    kinds = {}
    for line in (data / "pope" / "ground_truth.jsonl").read_text().splitlines():
        scene = json.loads(line)
        for item in scene["objects"]:
            kinds[(scene["image"], item["category"])] = (item["size_word"], bool(item["weak"]))
    return kinds


def recall_by_kind(samples: Path, kinds: dict[tuple[str, str], tuple[str, bool]]) -> dict[str, float]:
    """Share of "yes" answers to questions about present objects, by object size and for faint ones,
    and to questions about absent objects ("absent": hallucinated objects)."""
    said, asked = {}, {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        yes = row["response"].strip().lower().startswith("yes")
        if row["metadata"]["label"] != "yes":
            asked["absent"] = asked.get("absent", 0) + 1
            said["absent"] = said.get("absent", 0) + yes
            continue
        category = re.match(r"Is there an? (.+) in the image\?", row["prompt"]).group(1)
        size, faint = kinds[(row["metadata"]["image"], category)]
        for kind in (size, "faint" if faint else "solid"):
            asked[kind] = asked.get(kind, 0) + 1
            said[kind] = said.get(kind, 0) + yes
    return {kind: said[kind] / asked[kind] for kind in asked}


KINDS = ("small", "medium", "large", "solid", "faint", "absent")


def lost_objects(runs: Path, data: Path, keep: float) -> str:
    """Recall on present objects by kind, dense and every method at `keep` (which objects are lost)."""
    kinds = object_kinds(data)
    lines = [
        f"Which objects are lost at {keep:.1%} of the visual tokens: the share of present objects each method "
        "still answers \"yes\" to, by object size and for faint (semi-transparent) against solid objects, "
        "and (last column) the share of absent objects it says \"yes\" to (POPE, 3 splits; objects from the "
        "shapes ground truth).",
        "",
        "| method | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    names = ["baseline"] + sorted(path.parent.name for path in runs.glob(f"pope/*_keep={keep}/samples.jsonl"))
    for name in names:
        samples = runs / "pope" / name / "samples.jsonl"
        if samples.is_file():
            recall = recall_by_kind(samples, kinds)
            label = "dense" if name == "baseline" else name.partition("_keep=")[0]
            lines.append(f"| {label} | " + " | ".join(f"{100 * recall.get(kind, float('nan')):.1f}" for kind in KINDS) + " |")
    return "\n".join(lines) + "\n"


def draw(table: list[dict[str, Any]], dense: dict[str, Any], plots: tuple[Path, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({row["method"] for row in table} - {"dense"})
    markers = "os^vD<>ph*XP"
    for path, key, label in zip(plots, ("keep", "prefill_s"), ("visual tokens kept (share)", "prefill time per sample (ms)")):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        scale = 1000 if key == "prefill_s" else 1
        for index, method in enumerate(methods):
            points = sorted((scale * row[key], 100 * row["pope"]) for row in table if row["method"] == method and row[key] is not None)
            axis.plot(*zip(*points), marker=markers[index % len(markers)], linestyle="-" if index < 10 else "--",
                      label=method, markersize=4)
        axis.plot([scale * dense[key]], [100 * dense["pope"]], "k*", markersize=10, label="dense")
        axis.axhline(97 * dense["pope"], color="grey", linewidth=0.8, linestyle=":", label="97% of dense")
        if key == "keep":
            axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel("POPE mean accuracy (%)")
        save_plot(figure, axis, path, legend_size=6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/pruning"))
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--block", default="pruning", help="README block and plot names: pruning (shapes-llava), pruning-deep")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table and plots from finished runs")
    parser.add_argument("--timing-samples", type=int, default=64, help="POPE questions of the prefill timing pass (0: use the eval runs' timings)")
    args = parser.parse_args(argv)
    found = run_and_collect("pruning_eval", args)
    if isinstance(found, int):
        return found
    plots = (ROOT / "docs" / f"{args.block}_tokens.png", ROOT / "docs" / f"{args.block}_time.png")
    times = None
    if args.timing_samples:
        specs = {name: [spec_of(method) for method in run["config"].get("methods") or []] for name, run in found["pope"].items()}
        times = prefill_times(args.model, args.data, specs, args.timing_samples)
    text = report(found, plots, times)
    if (args.data / "pope" / "ground_truth.jsonl").is_file():
        text += "\n" + lost_objects(args.runs, args.data, 0.125)
    write_between(args.readme, f"<!-- {args.block}:begin (benchmarks/pruning_eval.py) -->", f"<!-- {args.block}:end -->", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
