"""`vlmkit demo`: the main job: a patched model evaluated on the shipped model and data, as one table.

With the shipped `shapes-llava` checkpoint: held-out shapes-world POPE questions (all three splits,
written on first use), the dense model against pruning budgets through the eval runner (resumable:
rerunning reuses finished runs), printing accuracy, F1, yes-ratio, visual tokens kept and time. With
`--model tiny:<family>` (or when no checkpoint is shipped), the same table on a random tiny model: the
plumbing, not the accuracy.
"""
from __future__ import annotations

import os
from pathlib import Path

from vlmkit import zoo

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
    parser.add_argument("--limit", type=int, default=None, help="first N questions only, a quick look (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/demo", help="where data and runs go (reruns resume)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vlmkit.data.shapes_bench import write_pope
    from vlmkit.eval.benches import DataOptions
    from vlmkit.eval.runner import Decoding, RunSpec
    from vlmkit.eval.runner import run as run_eval

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = args.model or (DEFAULT_MODEL if DEFAULT_MODEL in zoo.available() else "tiny:llava")
    out = Path(args.out)
    data = out / "pope"
    if not (data / "shapes_pope_adversarial.json").exists():
        write_pope(data, n=args.images)
    rows = []
    for methods in [()] + [(spec,) for spec in (args.method or DEFAULT_METHODS)]:
        name = methods[0].replace(":", "_").replace(",", "_").replace("=", "") if methods else "dense"
        scores = run_eval(
            RunSpec(
                model=model,
                bench="pope",
                data=DataOptions(path=str(data)),
                out=str(out / model.replace(":", "_") / name),
                methods=methods,
                decoding=Decoding(max_new_tokens=4),
                batch_size=args.batch_size,
                limit=args.limit,
                progress=True,
            )
        )
        rows.append((methods[0] if methods else "dense", scores))
    print(_table(model, rows))
    return 0


def _table(model: str, rows) -> str:
    lines = [
        f"model: {model}; shapes-world POPE (held-out seeds), greedy\n",
        "| method | visual tokens kept | acc random | acc popular | acc adversarial | mean F1 | yes ratio | s / 100 questions | prefill s / batch |",
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
