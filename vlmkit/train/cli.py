"""`vlmkit train shapes`: train a shapes model on the procedural world (seeded, resumable).

Example:
    nohup vlmkit train shapes --model llava --out runs/shapes-llava > runs/shapes-llava.log 2>&1 &
    vlmkit train shapes --model llava --out runs/shapes-llava   # resumes where it stopped
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from vlmkit.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command and its `shapes` sub-command."""
    parser = subparsers.add_parser("train", help="train the shipped shapes models")
    inner = parser.add_subparsers(dest="train_command", metavar="WHAT")
    shapes = inner.add_parser("shapes", help="train shapes-llava or shapes-video",
                              description=__doc__.splitlines()[0])
    shapes.add_argument("--model", choices=("llava", "video"), required=True)
    shapes.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.jsonl, final/)")
    shapes.add_argument("--restart", action="store_true", help="start over instead of resuming")
    shapes.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    shapes.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set chat_steps=2000 (repeatable)")
    shapes.add_argument("--checkpoint-every", type=int, default=100)
    shapes.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    shapes.set_defaults(func=_run)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _overrides(config, pairs: list[str]):
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {pair!r}: use KEY=VALUE with KEY one of {sorted(fields)}.")
        current = getattr(config, key)
        if isinstance(current, (int, float, str)) and not isinstance(current, bool):
            changes[key] = type(current)(value)
        else:
            raise ConfigError(f"--set {key}: only numbers and strings can be set from the command line.")
    return dataclasses.replace(config, **changes)


def _run(args: argparse.Namespace) -> int:
    from vlmkit.train.trainer import train

    if args.model == "llava":
        from vlmkit.train.recipes import LlavaRecipe as recipe_cls
        from vlmkit.train.recipes import LlavaRecipeConfig as config_cls
    else:
        from vlmkit.train.video import VideoRecipe as recipe_cls
        from vlmkit.train.video import VideoRecipeConfig as config_cls

    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be >= 1.")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    config = _overrides(config_cls(), args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=1))
    final = train(recipe_cls(config), args.out, resume=not args.restart,
                  checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    print(f"final model: {final}")
    return 0
