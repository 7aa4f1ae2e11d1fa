"""POPE and CHAIR for every decoding method, greedy and T=1 sampling: run the suite, write the table.

Runs `eval/decoding.yaml` (POPE's three splits, CHAIR with 64-token captions; baseline and every
decoding method; greedy and sampling; one seed) with `vlmkit eval --suite`, then reads each run's
`scores.json` and writes the tables into `docs/decoding_results.md` (between its `quality` markers;
the rest of the page is kept): accuracy / F1 / yes-ratio per POPE split, CHAIR_s / CHAIR_i /
recall, decode tokens/s, and the change against the baseline of the same decoding strategy, so a
method that does not help shows as such.

Usage:
    vlmkit data shapes --out data/shapes --bench pope,chair          # once
    python -m benchmarks.decoding_eval --model shapes-llava --data data/shapes --runs runs/decoding
    python -m benchmarks.decoding_eval --runs runs/decoding --skip-run   # only rebuild the table

Rerunning resumes finished runs (the eval runner's own resumption).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SUITE = Path(__file__).resolve().parents[1] / "eval" / "decoding.yaml"
SPLITS = ("random", "popular", "adversarial")
BEGIN, END = "<!-- quality:begin (benchmarks/decoding_eval.py) -->", "<!-- quality:end -->"
STRATEGIES = {"greedy": "greedy decoding", "sample": "sampling, T = 1"}


def run_suite(args: argparse.Namespace) -> int:
    from vlmkit import cli, zoo

    if args.model not in zoo.available() and not Path(args.model, "config.json").is_file() and not args.model.startswith("tiny:"):
        print(
            f"decoding_eval: model {args.model!r} is not available yet (shipped: {', '.join(zoo.available()) or 'none'}); "
            "train it or pass --model PATH",
            file=sys.stderr,
        )
        return 2
    if not Path(args.data).is_dir():
        print(f"decoding_eval: no benchmark data in {args.data}; run `vlmkit data shapes --out {args.data} --bench pope,chair`", file=sys.stderr)
        return 2
    argv = ["eval", "--suite", str(args.suite), "--model", args.model, "--data", str(args.data), "--out", str(args.runs)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    return cli.main(argv)


def run_and_collect(script: str, args: argparse.Namespace, task: str = "pope") -> dict[str, dict[str, dict[str, Any]]] | int:
    """Run `args.suite` on `args.model` into `args.runs` (unless `args.skip_run`), then the finished runs
    (`collect`); an exit status instead when the suite failed or `task` has no finished dense run."""
    if not args.skip_run:
        from vlmkit import cli

        status = cli.main(["eval", "--suite", str(args.suite), "--model", args.model, "--data", str(args.data),
                           "--out", str(args.runs)])
        if status:
            return status
    found = collect(args.runs)
    if "baseline" not in found.get(task, {}):
        print(f"{script}: no finished dense {task} run under {args.runs}", file=sys.stderr)
        return 2
    return found


def collect(runs: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {run name: scores.json}} for every finished run under `runs`."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for scores in sorted(runs.glob("*/*/scores.json"), key=lambda path: (path.parent.parent.name, path.parent.name != "baseline", path.parent.name)):
        found.setdefault(scores.parent.parent.name, {})[scores.parent.name] = json.loads(scores.read_text())
    return found


def save_plot(figure, axis, path: Path, legend_size: int = 8) -> None:
    """Grid, legend and a tight layout, then write `figure` to `path` (a PNG in docs/) and close it."""
    import matplotlib.pyplot as plt

    axis.grid(alpha=0.3)
    axis.legend(fontsize=legend_size)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_between(path: Path, begin: str, end: str, text: str, new_page: str | None = None) -> None:
    """Put `text` between the markers `begin` and `end` of `path` (a README or docs page generated
    blocks live in); `new_page` is the page to start from when `path` does not exist."""
    page = path.read_text() if path.is_file() or new_page is None else new_page
    if begin not in page or end not in page:
        raise SystemExit(f"{path} lacks the markers {begin} ... {end}")
    head, _, rest = page.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{text}{end}{tail}")


def _tokens_per_s(result: dict[str, Any]) -> str:
    rate = (result.get("summary", {}).get("timing") or {}).get("decode_tokens_per_s")
    return "n/a" if rate is None else f"{rate:.1f}"


def _delta(value: float, base: float | None, scale: float = 100.0) -> str:
    if base is None:
        return ""
    return f" ({(value - base) * scale:+.1f})"


def pope_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    head = "| method | " + " | ".join(f"{split} acc / F1 / yes" for split in SPLITS) + " | mean acc | mean F1 | decode tok/s |"
    lines = [head, "|" + "---|" * (len(SPLITS) + 4)]
    base = runs.get("baseline")
    for name, result in runs.items():
        splits = result["scores"]["splits"]
        cells = []
        for split in SPLITS:
            s = splits.get(split)
            cells.append("-" if s is None else f"{100 * s['accuracy']:.1f} / {100 * s['f1']:.1f} / {100 * s['yes_ratio']:.1f}")
        accuracy, f1 = result["scores"]["mean_accuracy"], result["scores"]["mean_f1"]
        base_acc = None if base is None or name == "baseline" else base["scores"]["mean_accuracy"]
        base_f1 = None if base is None or name == "baseline" else base["scores"]["mean_f1"]
        lines.append(
            f"| {name} | " + " | ".join(cells)
            + f" | {100 * accuracy:.1f}{_delta(accuracy, base_acc)} | {100 * f1:.1f}{_delta(f1, base_f1)} | {_tokens_per_s(result)} |"
        )
    return lines


def chair_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| method | CHAIR_s (lower is better) | CHAIR_i | recall | words per caption | decode tok/s |", "|---|---|---|---|---|---|"]
    base = runs.get("baseline")
    for name, result in runs.items():
        m = result["metrics"]
        b = None if base is None or name == "baseline" else base["metrics"]
        lines.append(
            f"| {name} | {100 * m['CHAIRs']:.1f}{_delta(m['CHAIRs'], b and b['CHAIRs'])} "
            f"| {100 * m['CHAIRi']:.1f}{_delta(m['CHAIRi'], b and b['CHAIRi'])} "
            f"| {100 * m['Recall']:.1f}{_delta(m['Recall'], b and b['Recall'])} | {100 * m['Len']:.0f} | {_tokens_per_s(result)} |"
        )
    return lines


def report(found: dict[str, dict[str, dict[str, Any]]]) -> str:
    any_run = next(iter(next(iter(found.values())).values()))
    config = any_run["config"]
    lines = [
        f"Model `{config['model']['spec']}` (weights sha256 `{config['model']['weights_sha256'][:12]}`), "
        f"{config['model']['dtype']}, seed {config['seed']}, batch size {config['batch_size']}; "
        f"vlmkit {config['versions']['vlmkit']}, torch {config['versions']['torch']}, "
        f"transformers {config['versions']['transformers']}. Produced by `python -m benchmarks.decoding_eval` "
        "from the runs of `eval/decoding.yaml`; every method at its paper defaults (see `vlmkit methods`).",
        "",
        "Numbers in parentheses: change against the baseline of the same decoding strategy "
        "(percentage points). Decode tokens/s include the extra branches.",
    ]
    for task in sorted(found):
        bench, _, strategy = task.partition("_")
        runs = found[task]
        sample = next(iter(runs.values()))
        lines += ["", f"### {bench.upper()}, {STRATEGIES.get(strategy, strategy)} ({sample['summary']['samples']} samples)", ""]
        lines += pope_table(runs) if bench == "pope" else chair_table(runs)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--runs", type=Path, default=Path("runs/decoding"))
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--limit", type=int, help="samples per run (smoke tests)")
    parser.add_argument("--skip-run", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--out", type=Path, default=Path("docs/decoding_results.md"))
    args = parser.parse_args(argv)
    if not args.skip_run:
        status = run_suite(args)
        if status:
            return status
    found = collect(args.runs)
    if not found:
        print(f"decoding_eval: no finished runs under {args.runs}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_between(args.out, BEGIN, END, report(found), new_page=f"# Hallucination-mitigating decoding\n\n{BEGIN}\n{END}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
