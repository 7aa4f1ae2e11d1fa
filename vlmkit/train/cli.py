"""`vlmkit train shapes`: train a shapes model on the procedural world (seeded, resumable);
`vlmkit train finetune`: continue one with a method applied, or the control run without it;
`vlmkit train mod`: fine-tune mixture-of-depths routers into one (and its control run).

Example:
    nohup vlmkit train shapes --model llava --out runs/shapes-llava > runs/shapes-llava.log 2>&1 &
    vlmkit train shapes --model llava --out runs/shapes-llava   # resumes where it stopped
    vlmkit train finetune --from shapes-llava --method cca --out runs/ft/cca
    vlmkit train finetune --from shapes-llava --method none --out runs/ft/control
    vlmkit train mod --from shapes-llava-deep --method pmod --out runs/mod/pmod
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from vlmkit.commands import threads
from vlmkit.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command and its `shapes`, `finetune`, `mod` and `evaluate` sub-commands."""
    parser = subparsers.add_parser("train", help="train the shipped shapes models")
    inner = parser.add_subparsers(dest="train_command", metavar="WHAT")
    shapes = inner.add_parser("shapes", help="train shapes-llava, shapes-llava-deep, shapes-video or shapes-qwen2-vl",
                              description=__doc__.splitlines()[0])
    shapes.add_argument("--model", choices=("llava", "llava-deep", "video", "qwen2-vl"), required=True,
                        help="shapes-llava, shapes-llava-deep (12 decoder layers on shapes-llava's vision "
                        "tower), shapes-video or shapes-qwen2-vl (M-RoPE, from shapes-video; "
                        "--set method=hope:train=True is the HoPE fine-tune of its control)")
    _run_options(shapes, "override a recipe field, e.g. --set chat_steps=2000 (repeatable)")
    shapes.add_argument("--workers", type=int, default=0,
                        help="processes that build batches ahead of the training step (default 0)")
    shapes.set_defaults(func=_run)
    tune = inner.add_parser("finetune", help="fine-tune a shapes model with a method applied (or the control run)",
                            description="Fine-tune a shapes model with a vlmkit method applied during training; "
                            "--method none is the control run (the same steps and batches without it).")
    tune.add_argument("--from", dest="base", default="shapes-llava",
                      help="a shipped shapes checkpoint or a save_pretrained folder (default shapes-llava)")
    tune.add_argument("--method", required=True, help="a method spec, e.g. cca or v2pe:train=True; none: the control")
    _run_options(tune, "override a fine-tune field (steps, batch, lr, seed, eval_every, eval_images, name)")
    tune.set_defaults(func=_finetune)
    mod = inner.add_parser("mod", help="fine-tune mixture-of-depths routers (pmod, gammamod) or the control run",
                           description="Fine-tune p-MoD or gamma-MoD routers into a shapes model with its language "
                           "model and projector (vision tower frozen); --method none is the control run.")
    mod.add_argument("--from", dest="base", default="shapes-llava-deep",
                     help="a shipped shapes checkpoint or a save_pretrained folder (default shapes-llava-deep)")
    mod.add_argument("--method", required=True, help="pmod, gammamod (with settings, e.g. gammamod:capacity=0.4) or none")
    _run_options(mod, "override a fine-tune field (steps, batch, lr, seed, eval_every, eval_images, name)")
    mod.set_defaults(func=_mod)
    check = inner.add_parser("evaluate", help="measure a shapes model on held-out seeds (POPE, CHAIR, MME, video MC)")
    check.add_argument(
        "--model", required=True, help="a shipped checkpoint name or a local save_pretrained folder (e.g. a run's final/)"
    )
    check.add_argument("--bench", default="pope,chair,mme,video",
                       help="comma-separated subset of pope,chair,mme,video")
    check.add_argument("--n", type=int, default=200, help="images (clips) per bench; 30 per MME subtask")
    check.add_argument("--seed", type=int, default=None, help="first held-out seed (default: the benchmarks' own)")
    check.add_argument("--num-frames", type=int, default=8, help="frames per clip of the video bench (default 8)")
    threads.add_option(check)
    check.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    check.set_defaults(func=_evaluate)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _run_options(parser: argparse.ArgumentParser, set_help: str) -> None:
    """The options of a resumable training run: its folder, restart, threads, overrides, checkpoints, device."""
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log.jsonl, final/)")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming")
    threads.add_option(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _overrides(config, pairs: list[str]):
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {pair!r}: use KEY=VALUE with KEY one of {sorted(fields)}.")
        current = getattr(config, key)
        if isinstance(current, (int, float, str)) and not isinstance(current, bool):
            parse = type(current)
        elif isinstance(current, tuple) and current and isinstance(current[0], (int, float, str)):
            kind = type(current[0])

            def parse(text: str) -> tuple:
                return tuple(kind(v) for v in text.split(","))
        else:
            raise ConfigError(f"--set {key}: only numbers, strings and comma-separated lists of them can be "
                              "set from the command line.")
        try:
            changes[key] = parse(value)
        except ValueError:
            raise ConfigError(f"--set {pair!r}: {value!r} is not a {type(current).__name__} like {current!r}.") from None
    return dataclasses.replace(config, **changes)


def _evaluate(args: argparse.Namespace) -> int:
    from vlmkit import zoo
    from vlmkit.data.shapes import EVAL_SEEDS, WorldConfig
    from vlmkit.train import evaluate
    from vlmkit.zoo.shipped import _resolve

    model, processor = zoo.load(args.model)  # local files and safetensors only
    record = _resolve(args.model) / "training.json"  # the world the model was trained on
    size = (json.loads(record.read_text())["world"]["image_size"] if record.is_file()
            else model.config.vision_config.image_size)
    seed = EVAL_SEEDS.start if args.seed is None else args.seed
    world = WorldConfig(image_size=size)
    results: dict = {"model": str(args.model), "seed": seed}
    for bench in [b.strip() for b in args.bench.split(",") if b.strip()]:
        if bench == "pope":
            results[bench] = evaluate.pope_eval(model, processor, args.n, seed, world)
        elif bench == "chair":
            results[bench] = evaluate.chair_eval(model, processor, args.n, seed, world)
        elif bench == "mme":
            results[bench] = evaluate.mme_eval(model, processor, 30, seed, world)
        elif bench == "video":
            results[bench] = evaluate.video_eval(model, processor, args.n, seed,
                                                 WorldConfig(image_size=size, max_objects=3), args.num_frames)
        else:
            raise ConfigError(f"--bench {bench!r} is unknown; use any of pope,chair,mme,video.")
        print(json.dumps({bench: results[bench]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from vlmkit.train.finetune import FinetuneConfig, FinetuneRecipe

    config = dataclasses.replace(FinetuneConfig(), base=args.base, method=args.method)
    return _tune(args, FinetuneRecipe, _overrides(config, args.set))


def _mod(args: argparse.Namespace) -> int:
    from vlmkit.train.mod import ModRecipe, mod_config

    return _tune(args, ModRecipe, _overrides(mod_config(args.base, args.method), args.set))


def _tune(args: argparse.Namespace, recipe_cls, config) -> int:
    """Run a fine-tune recipe in `args.out`, refusing a folder that holds one with other settings."""
    import torch

    from vlmkit.train.trainer import train

    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    recorded = args.out / "recipe.json"
    if recorded.is_file() and not args.restart and json.loads(recorded.read_text()) != config.to_dict():
        raise ConfigError(f"{args.out} holds a fine-tune with other settings ({recorded}); use another --out or --restart")
    recorded.write_text(json.dumps(config.to_dict(), indent=1))
    final = train(recipe_cls(config), args.out, resume=not args.restart, checkpoint_every=args.checkpoint_every,
                  progress=not args.no_progress, device=args.device)
    print(f"final model: {final}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.train.trainer import train

    if args.model == "llava":
        from vlmkit.train.recipes import LlavaRecipe as recipe_cls
        from vlmkit.train.recipes import LlavaRecipeConfig as config_cls
    elif args.model == "llava-deep":
        from vlmkit.train.recipes import LlavaRecipe as recipe_cls
        from vlmkit.train.recipes import deep_llava_config as config_cls
    elif args.model == "video":
        from vlmkit.train.video import VideoRecipe as recipe_cls
        from vlmkit.train.video import VideoRecipeConfig as config_cls
    else:
        from vlmkit.train.mrope import MRopeRecipe as recipe_cls
        from vlmkit.train.mrope import MRopeRecipeConfig as config_cls

    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers} must be >= 0.")
    torch.set_flush_denormal(True)
    config = _overrides(config_cls(), args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=1))
    final = train(recipe_cls(config), args.out, resume=not args.restart,
                  checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                  device=args.device, workers=args.workers)
    print(f"final model: {final}")
    return 0
