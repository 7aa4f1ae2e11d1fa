"""`vlmkit calibrate shortv|vtw|dymu` and `vlmkit analyze arank`: measure a model's layers on a seeded
sample of a benchmark, and write what the layer-skipping methods (and DyMU's thresholds) read.

Example:
    vlmkit data shapes --out data/shapes --n 50 --bench pope
    vlmkit calibrate shortv --model shapes-llava-deep --data data/shapes/pope --out runs/shortv.json
    vlmkit eval --model shapes-llava-deep --bench pope --data data/shapes/pope \\
        --method shortv:calibration=runs/shortv.json,fraction=0.5 --out runs/pope_shortv
    vlmkit analyze arank --model shapes-llava-deep --data data/shapes/pope --out runs/arank
    vlmkit calibrate dymu --model shapes-llava --data data/shapes/pope --r 8 --out runs/dymu.json
    vlmkit eval --model shapes-llava --bench pope --data data/shapes/pope --method dymu:calibration=runs/dymu.json \\
        --out runs/pope_dymu
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmkit.commands import threads


def _common(parser) -> None:
    parser.add_argument("--model", required=True, help="a shipped model name or a save_pretrained folder (safetensors)")
    parser.add_argument("--data", required=True, help="benchmark files in their official layout (e.g. from `vlmkit data shapes`)")
    parser.add_argument("--bench", default="pope", help="which image benchmark --data holds (default pope)")
    parser.add_argument("--n", type=int, default=32, help="samples drawn from the benchmark (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    threads.add_option(parser)


def register(subparsers) -> None:
    calibrate = subparsers.add_parser("calibrate", help="choose the layers of shortv or vtw for one model")
    inner = calibrate.add_subparsers(dest="calibrate_method", metavar="METHOD")
    shortv = inner.add_parser("shortv", help="ShortV's Layer Contribution per layer, and the layers ranked by it")
    _common(shortv)
    shortv.add_argument("--out", type=Path, required=True, help="the JSON file to write (shortv:calibration=FILE)")
    shortv.set_defaults(func=_calibrate)
    vtw = inner.add_parser("vtw", help="VTW's KL per withdrawal layer, and the first layer within eta")
    _common(vtw)
    vtw.add_argument("--eta", type=float, default=0.003, help="largest mean KL accepted (default 0.003, the paper's for LLaVA-1.5-7B)")
    vtw.add_argument("--min-layer", type=int, default=5, help="first layer tried (default 5, as the paper)")
    vtw.add_argument("--out", type=Path, required=True, help="the JSON file to write (vtw:calibration=FILE)")
    vtw.set_defaults(func=_calibrate)
    dymu = inner.add_parser("dymu", help="DyMU's similarity threshold per vision-tower block (variable tokens per image)")
    _common(dymu)
    dymu.add_argument("--r", type=int, default=8, help="tokens ToMe merges per image and block while measuring (default 8)")
    dymu.add_argument("--out", type=Path, required=True, help="the JSON file to write (dymu:calibration=FILE)")
    dymu.set_defaults(func=_calibrate_dymu)
    calibrate.set_defaults(func=lambda args: calibrate.print_help() or 2)

    analyze = subparsers.add_parser("analyze", help="describe a model's layers")
    inner = analyze.add_subparsers(dest="analysis", metavar="WHAT")
    arank = inner.add_parser("arank", help="gamma-MoD's ARank of every decoder layer: a table and a plot")
    _common(arank)
    arank.add_argument("--out", type=Path, required=True, help="folder for arank.json, arank.md and arank.png")
    arank.set_defaults(func=_arank)
    analyze.set_defaults(func=lambda args: analyze.print_help() or 2)


def _samples(args):
    from vlmkit.analysis.depth import choose
    from vlmkit.errors import ConfigError
    from vlmkit.eval import benchmarks
    from vlmkit.eval.benchmarks.base import DataOptions

    if args.n < 1 or args.batch_size < 1:
        raise ConfigError(f"--n {args.n} and --batch-size {args.batch_size} must be >= 1")
    benchmark = benchmarks.get(args.bench)
    if benchmark.media != "image":
        raise ConfigError(f"--bench {args.bench} is a video benchmark; calibrate on an image benchmark (e.g. pope)")
    return choose(list(benchmark.open(DataOptions(path=args.data)).samples), args.n, args.seed)


def _load(args):
    from vlmkit import zoo

    model, processor = zoo.load(args.model)
    return model.eval(), processor


def _calibrate(args) -> int:
    from vlmkit.analysis import depth

    samples = _samples(args)
    model, processor = _load(args)
    progress = not args.no_progress
    if args.calibrate_method == "shortv":
        result = depth.calibrate_shortv(model, processor, samples, args.batch_size, progress)
        summary = f"layers by rising contribution: {result['ranking']}"
    else:
        result = depth.calibrate_vtw(model, processor, samples, args.eta, args.min_layer, args.batch_size, progress)
        summary = f"withdrawal layer K = {result['layer']} (first with KL <= {args.eta} from layer {args.min_layer})"
    result.update(model=str(args.model), bench=args.bench, data=str(args.data), seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{summary}\nwrote {args.out}")
    return 0


def calibrate_dymu(model, processor, samples, r: int, batch_size: int) -> dict:
    """DyMU's thresholds for `model`'s vision tower (`vlmkit.towers.calibrate_thresholds`), measured
    on the images of `samples` in batches of `batch_size` samples; every tile of an AnyRes image is
    one tower input, and the blocks after the one the projector reads measure nothing."""
    import torch

    from vlmkit.adapters import adapter_for
    from vlmkit.towers import calibrate_thresholds

    adapter = adapter_for(model)
    tower = adapter.vision_tower
    parameter = next(tower.parameters())

    def batches():
        for start in range(0, len(samples), batch_size):
            tiles = []
            for sample in samples[start : start + batch_size]:
                for image in sample.load_media():
                    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
                    tiles.append(pixels.reshape(-1, *pixels.shape[-3:]))
            yield torch.cat(tiles).to(parameter.device, parameter.dtype)

    return calibrate_thresholds(tower, batches(), r=r, last_block=adapter.default_vision_layer())


def _calibrate_dymu(args) -> int:
    from vlmkit.towers import write_thresholds

    samples = _samples(args)
    model, processor = _load(args)
    result = calibrate_dymu(model, processor, samples, args.r, args.batch_size)
    result.update(model=str(args.model), bench=args.bench, data=str(args.data), seed=args.seed, n=args.n)
    write_thresholds(args.out, result)
    shown = ", ".join("-" if value is None else f"{value:.3f}" for value in result["thresholds"])
    print(f"thresholds per block: {shown}\nwrote {args.out}")
    return 0


def _arank(args) -> int:
    from vlmkit.analysis import depth

    samples = _samples(args)
    model, processor = _load(args)
    ranks = depth.attention_ranks(model, processor, samples, not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arank.json").write_text(json.dumps(
        {"model": str(args.model), "bench": args.bench, "data": str(args.data), "samples": len(samples),
         "seed": args.seed, "arank": ranks}, indent=1))
    table = ["| layer | ARank |", "|---|---|", *(f"| {layer} | {rank:.1f} |" for layer, rank in enumerate(ranks))]
    (args.out / "arank.md").write_text("\n".join(table) + "\n")
    _plot(ranks, args.out / "arank.png", str(args.model))
    print("\n".join(table))
    print(f"wrote {args.out / 'arank.json'}, arank.md, arank.png")
    return 0


def _plot(ranks: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot(range(len(ranks)), ranks, marker="o")
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("ARank (mean over heads)")
    axis.set_title(f"{title}: attention rank per layer")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
