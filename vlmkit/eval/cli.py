"""``vlmkit eval``, ``vlmkit score`` and ``vlmkit report``.

Examples:
    vlmkit data shapes --out data/shapes --n 100                          # benchmarks to run on, official layouts
    vlmkit eval --model shapes-llava --bench pope --data data/shapes/pope --method fastv:layer=2,keep=0.25 --out runs/fastv
    vlmkit eval --suite eval/pope_budgets.yaml --model shapes-llava --data data/shapes --out runs/pope-budgets
    vlmkit eval ... --rerun-errors                                        # after fixing files that failed to load
    accelerate launch --multi_gpu --num_processes 8 -m vlmkit eval ...    # one process per GPU
    torchrun --nproc_per_node 2 -m vlmkit eval ...                        # the same, on CPUs too
    vlmkit score runs/fastv --style opera
    vlmkit report runs/pope-budgets/pope/* --out runs/pope-budgets/report
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmkit.commands import threads
from vlmkit.errors import ConfigError
from vlmkit.eval import benchmarks


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval``, ``score`` and ``report`` commands."""
    parser = subparsers.add_parser(
        "eval",
        help="run a benchmark (or a YAML suite) on a model, resumably, and score it",
        description="Run a benchmark on a model with batched generation; rerunning the same command resumes.",
        epilog=__doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--model", required=True, help="tiny:<family>, a shipped checkpoint name, or a local save_pretrained folder"
    )
    run.add_argument("--bench", help=f"benchmark: {', '.join(benchmarks.names())} (not with --suite)")
    run.add_argument("--suite", type=Path, help="YAML suite: tasks x method x budget grid (see eval/*.yaml)")
    run.add_argument(
        "--data", required=True, help="benchmark files (with --suite: the folder the tasks' data paths are relative to)"
    )
    run.add_argument("--out", required=True, help="run directory (with --suite: the folder that gets <task>/<run>/)")
    run.add_argument(
        "--method",
        action="extend",
        nargs="+",
        metavar="SPEC",
        help="method spec(s), e.g. fastv:layer=2,keep=0.25 (applied together)",
    )
    run.add_argument("--batch-size", type=int, help="samples per generate() call, left-padded (default 1)")
    run.add_argument("--seed", type=int, help="global seed (default 0)")
    run.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="a quick look: the first N samples of each split (POPE split, MME subtask, MVBench task, Video-MME "
        "duration; CHAIR: the first N images)",
    )
    run.add_argument(
        "--rerun-errors",
        action="store_true",
        help="generate again for samples whose media failed to load (error rows), e.g. after fixing the files",
    )
    run.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="default auto: bfloat16 on CUDA, float32 on CPU",
    )
    run.add_argument(
        "--trust-remote-code", action="store_true", help="allow modelling code stored in a local model folder"
    )
    run.add_argument("--style", help="scoring style: POPE llava|opera|vcd|lmms_eval, MME official|lmms_eval")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    threads.add_option(run)
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--decoding", choices=("greedy", "sample"), help="default greedy")
    decoding.add_argument("--max-new-tokens", type=int, help="default per benchmark: 16 (CHAIR: 512)")
    decoding.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    decoding.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    decoding.add_argument("--top-k", type=int, help="top-k sampling (default 0, off)")
    data = parser.add_argument_group("data (defaults: found inside --data)")
    data.add_argument("--media", help="image or video folder")
    data.add_argument("--annotations", help="CHAIR: COCO annotation folder or ground-truth file")
    data.add_argument("--synonyms", help="CHAIR: synonym table (default <data>/synonyms.txt if present, else COCO's)")
    data.add_argument(
        "--split", action="extend", nargs="+", help="POPE splits, MME subtasks, MVBench tasks or Video-MME durations"
    )
    data.add_argument("--num-images", type=int, help="CHAIR: images drawn (default 500)")
    data.add_argument("--data-seed", type=int, help="CHAIR: seed of the image draw (default 42)")
    data.add_argument("--num-frames", type=int, help="video: frames per video (default 16 for MVBench, 32 otherwise)")
    data.add_argument(
        "--video-format", help="video: benchmark layout, mvbench|videomme|egoschema (default: from the files)"
    )
    parser.set_defaults(func=_eval)

    score = subparsers.add_parser("score", help="(re)score a finished eval run: writes scores.json, prints a table")
    score.add_argument("run_dir", help="run directory written by vlmkit eval")
    score.add_argument("--style", help="scoring style (as for vlmkit eval)")
    score.set_defaults(func=_score)

    report = subparsers.add_parser("report", help="compare scored runs: markdown table and accuracy-vs-cost plots")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="scored run directories")
    report.add_argument("--out", default="report", help="output folder (default ./report)")
    report.set_defaults(func=_report)


_DATA_FLAGS = ("media", "annotations", "synonyms", "split", "num_images", "data_seed", "num_frames", "video_format")
_RUN_FLAGS = ("batch_size", "seed", "limit", "dtype")
_DECODING_FLAGS = {
    "decoding": "strategy",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
}


def _eval(args: argparse.Namespace) -> int:
    from vlmkit.eval import runner

    if args.suite is not None:
        return _eval_suite(args)
    if args.bench is None:
        raise ConfigError("vlmkit eval needs --bench (one of " + ", ".join(benchmarks.names()) + ") or --suite FILE.")
    settings, decoding = _cli_settings(args)
    settings["decoding"] = decoding
    runner.run(_spec(args, args.bench, args.data, args.out, tuple(args.method or ()), settings, args.style))
    return 0


def _cli_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data and run options, and the decoding options, given on the command line."""
    settings = {key: getattr(args, key) for key in _DATA_FLAGS + _RUN_FLAGS if getattr(args, key) is not None}
    decoding = {field: getattr(args, flag) for flag, field in _DECODING_FLAGS.items() if getattr(args, flag) is not None}
    return settings, decoding


def _eval_suite(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    import vlmkit
    from vlmkit.eval import report, runner, suite

    if args.method or args.bench:
        raise ConfigError(
            f"--{'method' if args.method else 'bench'} does not combine with --suite: the suite file sets the tasks "
            "and methods. Edit the suite, or drop --suite to run one benchmark."
        )
    loaded = suite.load(args.suite)
    cli, cli_decoding = _cli_settings(args)
    out = Path(args.out)
    specs = []
    for item in suite.runs(loaded, args.suite):  # every run's settings and methods are checked before the first runs
        settings = {**item.settings, **cli}
        settings["decoding"] = {**(item.settings.get("decoding") or {}), **cli_decoding}
        data = Path(args.data) / str(item.settings.get("data", "."))
        record = {"task": item.task, "version": item.version, "run": item.name}
        style = args.style or settings.get("style")
        specs.append(
            _spec(args, settings["bench"], str(data), str(out / item.task / item.name), item.methods, settings, style, record)
        )
        for method in item.methods:
            vlmkit.parse_spec(method)
    for spec in specs:
        runner.run(spec)
    if PartialState().is_main_process:
        report.write([Path(spec.out) for spec in specs], out / "report")
    return 0


def _spec(args, bench, data, out, methods, settings: dict[str, Any], style, suite_record=None):
    from vlmkit.eval import runner

    splits = settings.get("split")
    options = runner.DataOptions(
        path=data,
        media=settings.get("media"),
        annotations=settings.get("annotations"),
        synonyms=settings.get("synonyms"),
        splits=tuple([splits] if isinstance(splits, str) else splits) if splits else None,
        num_images=settings.get("num_images", 500),
        data_seed=settings.get("data_seed", 42),
        num_frames=settings.get("num_frames"),
        video_format=settings.get("video_format"),
    )
    return runner.RunSpec(
        model=args.model,
        bench=bench,
        data=options,
        out=out,
        methods=methods,
        decoding=runner.Decoding(**settings.get("decoding", {})),
        batch_size=settings.get("batch_size", 1),
        seed=settings.get("seed", 0),
        limit=settings.get("limit"),
        dtype=settings.get("dtype", "auto"),
        trust_remote_code=args.trust_remote_code,
        style=style,
        suite=suite_record,
        progress=not args.no_progress,
        rerun_errors=args.rerun_errors,
    )


def _score(args: argparse.Namespace) -> int:
    from vlmkit.eval import records, runner

    run_dir = Path(args.run_dir).expanduser().resolve()
    records.read_json(run_dir / records.CONFIG, "run config")  # a folder that holds no run is an error, not locked
    with records.lock(run_dir):
        runner.score_run(run_dir, style=args.style)
    return 0


def _report(args: argparse.Namespace) -> int:
    from vlmkit.eval import report

    report.write(args.run_dirs, args.out)
    return 0
