"""`vlmkit data shapes`: write the shapes world's benchmarks (and a static training set).

Example:
    vlmkit data shapes --out data/shapes --n 100 --bench pope,mme
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmkit.data.shapes import EVAL_SEEDS, TRAIN_SEEDS, WorldConfig
from vlmkit.data.shapes_bench import BENCHES, write_chair, write_mme, write_multi, write_pope, write_train, write_video
from vlmkit.errors import ConfigError, did_you_mean

_DEFAULT_N = {"pope": 500, "chair": 500, "mme": 30, "video": 200, "multi": 50, "train": 1000}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its `shapes` sub-command."""
    data = subparsers.add_parser("data", help="datasets: the procedurally generated shapes world")
    inner = data.add_subparsers(dest="data_command", metavar="DATASET")
    shapes = inner.add_parser(
        "shapes", help="write shapes-world benchmarks in the official POPE/CHAIR/MME/MVBench formats",
        description=__doc__.splitlines()[0],
    )
    shapes.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per bench)")
    shapes.add_argument("--n", type=int, default=None,
                        help="images (clips) per bench; per subtask for mme; per image count for multi. Defaults: "
                        + ", ".join(f"{k} {v}" for k, v in _DEFAULT_N.items()))
    shapes.add_argument("--seed", type=int, default=None,
                        help=f"first scene seed; evaluation benches need [{EVAL_SEEDS.start}, "
                        f"{EVAL_SEEDS.stop}) (default {EVAL_SEEDS.start}), train needs "
                        f"[{TRAIN_SEEDS.start}, {TRAIN_SEEDS.stop}) (default {TRAIN_SEEDS.start})")
    shapes.add_argument("--bench", default="pope,chair,mme,video",
                        help=f"comma-separated subset of {','.join(BENCHES)}")
    shapes.add_argument("--image-size", type=int, default=96, help="image side in pixels (models: 96)")
    shapes.add_argument("--frames", type=int, default=8, help="frames per video clip")
    shapes.set_defaults(func=_run_shapes)
    data.set_defaults(func=lambda args: data.print_help() or 2)


def _run_shapes(args: argparse.Namespace) -> int:
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    for bench in benches:
        if bench not in BENCHES:
            raise ConfigError(f"--bench {bench!r} is unknown; use any of {','.join(BENCHES)}."
                              + did_you_mean(bench, BENCHES))
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n {args.n} must be >= 1.")
    written = {}
    for bench in benches:
        n = args.n or _DEFAULT_N[bench]
        seed = args.seed if args.seed is not None else (
            TRAIN_SEEDS.start if bench == "train" else EVAL_SEEDS.start)
        out = args.out / bench
        if bench == "video":
            config = WorldConfig(max_objects=3, image_size=args.image_size)
            written[bench] = write_video(out, n, seed, config, num_frames=args.frames)
        else:
            config = WorldConfig(image_size=args.image_size)
            writer = {"pope": write_pope, "chair": write_chair, "mme": write_mme, "multi": write_multi,
                      "train": write_train}[bench]
            written[bench] = writer(out, n, seed, config)
    print(json.dumps({k: str(v) if not isinstance(v, dict) else {s: str(p) for s, p in v.items()}
                      for k, v in written.items()}, indent=1))
    return 0
