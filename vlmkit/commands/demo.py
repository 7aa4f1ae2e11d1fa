"""`vlmkit demo`: the main job: a patched model evaluated on the shipped model and data, as one table.

With the shipped `shapes-llava` checkpoint: held-out shapes-world POPE questions (all three splits,
written on first use into `<out>/pope`), the dense model against pruning budgets through the eval
runner (one run folder per method under `<out>/<model>/`, resumable: rerunning reuses finished
runs), printing accuracy, F1, yes-ratio, visual tokens kept and time. With `--model tiny:<family>`
(or when no checkpoint is shipped), the same table on a random tiny model: the plumbing, not the
accuracy. Every method spec is checked before the first run.
"""
from __future__ import annotations

from pathlib import Path

from vlmkit.commands import threads

DEFAULT_MODEL = "shapes-llava"
DEFAULT_METHODS = (
    "visionzip:tokens=36",
    "fastv:layer=2,keep=0.25",
    "pool:keep=0.25",
    "random:keep=0.25",
    "visionzip:tokens=16",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main job: shapes-llava on shapes POPE, dense vs pruning budgets")
    parser.add_argument("--model", default=None, help=f"model (default {DEFAULT_MODEL!r} when shipped, else tiny:llava)")
    parser.add_argument("--method", action="append", help="method spec to compare with the dense model (repeatable)")
    parser.add_argument("--images", type=int, default=50, help="held-out images (6 POPE questions each per split)")
    parser.add_argument(
        "--limit", type=int, default=None, help="first N questions of each split only, a quick look (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/demo", help="where the questions and runs go (reruns resume)")
    threads.add_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import vlmkit
    from vlmkit import zoo
    from vlmkit.data.shapes_bench import write_pope
    from vlmkit.eval.runner import DataOptions, Decoding, RunSpec
    from vlmkit.eval.runner import run as run_eval

    model = args.model or (DEFAULT_MODEL if DEFAULT_MODEL in zoo.available() else "tiny:llava")
    out = Path(args.out)
    data = out / "pope"
    variants = [()] + [(spec,) for spec in (args.method or DEFAULT_METHODS)]
    specs = [
        RunSpec(
            model=model,
            bench="pope",
            data=DataOptions(path=str(data)),
            out=str(out / model.replace(":", "_") / _folder(methods)),
            methods=methods,
            decoding=Decoding(max_new_tokens=4),
            batch_size=args.batch_size,
            limit=args.limit,
            progress=True,
        )
        for methods in variants
    ]
    for methods in variants:
        for method in methods:
            vlmkit.parse_spec(method)
    if not (data / "shapes_pope_adversarial.json").exists():
        write_pope(data, n=args.images)
    rows = [(spec.methods[0] if spec.methods else "dense", run_eval(spec)) for spec in specs]
    print(_table(model, rows))
    return 0


def _folder(methods: tuple[str, ...]) -> str:
    return methods[0].replace(":", "_").replace(",", "_").replace("=", "") if methods else "dense"


def _table(model: str, rows) -> str:
    from vlmkit.eval.runner import threads_label

    label = " / ".join(sorted({threads_label(scores["summary"]) for _, scores in rows}))
    lines = [
        f"model: {model}; shapes-world POPE (held-out seeds), greedy\n",
        "| method | visual tokens kept | acc random | acc popular | acc adversarial | mean F1 | yes ratio "
        f"| s / 100 questions ({label}) | prefill s / batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scores in rows:
        splits = scores["scores"]["splits"]
        tokens, timing = scores["summary"]["visual_tokens"], scores["summary"]["timing"]
        yes = sum(split["yes_ratio"] for split in splits.values()) / len(splits)
        lines.append(
            f"| {name} | {tokens['kept_final_mean']:.0f} of {tokens['input_mean']:.0f} | "
            + " | ".join(f"{splits[s]['accuracy']:.1%}" if s in splits else "-" for s in ("random", "popular", "adversarial"))
            + f" | {scores['scores']['mean_f1']:.1%} | {yes:.2f} | {100 * timing['wall_s_per_sample']:.1f} | "
            f"{timing['prefill_s_per_batch']:.3f} |"
        )
    return "\n".join(lines)
