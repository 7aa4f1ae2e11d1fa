"""Prefill time, decode speed and peak memory: dense vs pruning (FastV, VisionZip, pool at 50 / 25 / 11 %,
every other pruning method at 11 %) vs layer skipping (ShortV, VTW, MoD-style routing at three budgets each).

The model is a geometry twin: LLaVA-1.5's 576 visual tokens per image (a small CLIP-shaped tower, since
the tower's cost is the same for every method) in front of the real Qwen2-0.5B language model geometry
(`vlmkit.zoo.twin_config("llava-onevision-qwen2-0.5b")`), random weights, fp32, 64 text tokens.

Measured per configuration, interleaved (dense, then each method, repeated), medians over repeats:
- LLM prefill: time of the language model's forward within the prefill (vision tower excluded);
- full prefill: the whole forward (tower + projector + LLM), i.e. time to first token;
- decode: tokens/s of the next 16 tokens with the KV cache;
- peak memory: the process's peak resident set during the prefill (Linux VmHWM, reset per run);
- FLOPs-ideal speedup of the LLM prefill: dense FLOPs (`vlmkit.zoo.flops`) over the FLOPs the engine
  counted for what the method ran (`patch.cost`), and measured / ideal;
- scoring: the time spent choosing tokens (vision-tower probes, the attention rows the
  engine computes for a selection, each method's `select`, merged values), as a share of the dense
  prefill;
- length-matched: the unpatched language model run on a prompt as long as the pruned one (64 text +
  kept visual tokens). It is the speedup the hardware gives for that many tokens (weights are read
  once per forward whatever the length, so short prompts fall short of the FLOPs ratio on any
  engine); measured / length-matched is what vlmkit's bookkeeping costs.

Times are CPU time of the (single) compute thread by default (`--clock cpu`): on a shared host other
processes inflate wall time but not the work this process does; with one thread and an idle machine
the two agree. `--clock wall` measures wall time instead.

Methods for AnyRes models (GlobalCom²'s thumbnail-guided crop budgets) run on the same parts in the
LLaVA-NeXT layout (`--anyres`: a 336 x 672 image, base view plus two tiles, 1,752 visual tokens), each
against its own dense run.

Usage:
    python -m benchmarks.prefill [--repeats 3] [--threads 1] [--clock cpu|wall] [--only NAME ...] [--out benchmarks/results/prefill]
    python -m benchmarks.prefill --anyres [--repeats 2] [--out benchmarks/results/prefill_anyres]

(run as a module: as a script, `benchmarks/` would shadow top-level packages such as `kernels`)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import vlmkit
from vlmkit.engine.runner import TextStackRunner
from vlmkit.methods.base import TokenSelector
from vlmkit.zoo import flops

from benchmarks._twin_model import TEXT_TOKENS, VISUAL_TOKENS, build_anyres_inputs, build_anyres_model, build_inputs, build_model

BUDGETS = (0.5, 0.25, 0.11)
LAYERS = 24  # Qwen2-0.5B
# the pruning methods measured at every budget; the others at the last one
SWEPT = ("fastv", "visionzip", "pool")


def configurations() -> list[tuple[str, tuple[str, ...]]]:
    configs = [("dense", ())]
    for keep in BUDGETS:
        configs += [
            (f"fastv {keep:.0%}", (f"fastv:layer=2,keep={keep}",)),
            (f"visionzip {keep:.0%}", (f"visionzip:tokens={round(VISUAL_TOKENS * keep)}",)),
            (f"pool {keep:.0%}", (f"pool:keep={keep}",)),
        ]
    for info in vlmkit.list_methods():
        if info.family == "prune" and info.name not in SWEPT + ANYRES_METHODS and info.name != "random":
            configs.append((f"{info.name} {BUDGETS[-1]:.0%}", (f"{info.name}:keep={BUDGETS[-1]}",)))
    for frozen in (8, 12, 16):  # the last layers, where ShortV's rankings put the least contribution
        configs.append((f"shortv {frozen}/{LAYERS} layers", (f"shortv:layers={tuple(range(LAYERS - frozen, LAYERS))}",)))
    for layer in (16, 12, 8):
        configs.append((f"vtw K={layer}", (f"vtw:layer={layer}",)))
    for name, spec in (("prd", "mod"), ("prd update", "mod:score='update'"), ("prd floor 0.05", "mod:floor=0.05"),
                       ("prd start 1.0", "mod:start=1.0,floor=0.05")):
        configs.append((f"mod {name}", (spec,)))
    # trained routers change which tokens run, not how many: untrained ones time the same
    configs += [("pmod prd", ("pmod",)), ("pmod floor 0.05", ("pmod:floor=0.05",)),
                ("gammamod p > 0.5", ("gammamod:threshold=0.5",))]
    return configs


def before_llm_only(spec: str) -> bool:
    """Whether the method of `spec` selects only before the language model (one shorter prompt)."""
    method = vlmkit.parse_spec(spec)
    return isinstance(method, TokenSelector) and tuple(method.selection_layers(LAYERS)) == (0,)


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = time.thread_time


@contextlib.contextmanager
def scoring_timer(patch):
    """Accumulates the time spent choosing tokens during the block (see the module docstring)."""
    spent = {"s": 0.0}

    def timed(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            begin = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent["s"] += clock() - begin
        return run

    originals = {name: getattr(TextStackRunner, name) for name in ("_select", "_attention_scores", "_combined")}
    for name, function in originals.items():
        setattr(TextStackRunner, name, timed(function))
    if patch is not None:
        patch.adapter.vision_probe = timed(patch.adapter.vision_probe)
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(TextStackRunner, name, function)
        if patch is not None:
            del patch.adapter.vision_probe


def measure(model, inputs, specs, visual: int = VISUAL_TOKENS) -> dict[str, float]:
    llm = {}
    language_model = model.model.language_model
    start = language_model.register_forward_pre_hook(lambda *a: llm.__setitem__("start", clock()))
    stop = language_model.register_forward_hook(lambda *a: llm.__setitem__("stop", clock()))
    patch = vlmkit.apply(model, *specs) if specs else None
    try:
        with torch.no_grad():
            reset_peak_memory()
            with scoring_timer(patch) as scoring:
                begin = clock()
                model(**inputs, use_cache=True, logits_to_keep=1)
                full = clock() - begin
            peak = peak_memory_mb()
            prefill_llm = llm["stop"] - llm["start"]
            selections = patch.selections.values() if patch else ()
            kept = min((len(k) for kept in selections for k in kept), default=visual)
            counted = patch.cost["llm_flops"][0] if patch else flops(model.config, TEXT_TOKENS, visual)
            begin = clock()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            one = clock() - begin
            begin = clock()
            model.generate(**inputs, max_new_tokens=17, min_new_tokens=17, do_sample=False)
            seventeen = clock() - begin
    finally:
        start.remove()
        stop.remove()
        if patch:
            patch.remove()
    return {"llm_prefill_s": prefill_llm, "prefill_s": full, "decode_tok_s": 16 / max(seventeen - one, 1e-9),
            "peak_mb": peak, "visual_tokens": kept, "llm_flops": counted, "scoring_s": scoring["s"]}


def measure_length(model, tokens: int) -> float:
    """LLM prefill time of the unpatched language model on `tokens` random embeddings."""
    language_model = model.model.language_model
    embeds = torch.randn(1, tokens, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        begin = clock()
        language_model(inputs_embeds=embeds, use_cache=True)
        return clock() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: thread CPU time (needs --threads 1)")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME",
                        help="run dense and the configurations whose name starts with one of these (e.g. shortv vtw mod)")
    parser.add_argument("--out", default="benchmarks/results/prefill")
    parser.add_argument("--anyres", action="store_true", help="the AnyRes methods (globalcom2) on the LLaVA-NeXT-layout twin")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --threads 1, or --clock wall")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    if args.anyres:
        return anyres(args)
    model, inputs = build_model(), build_inputs()
    configs = [c for c in configurations() if c[0] == "dense" or args.only is None or c[0].startswith(tuple(args.only))]
    measure(model, inputs, ())  # warm-up
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    lengths = sorted({TEXT_TOKENS + VISUAL_TOKENS} | {TEXT_TOKENS + round(VISUAL_TOKENS * keep) for keep in BUDGETS}
                     if any(specs and before_llm_only(specs[0]) for _, specs in configs) else {TEXT_TOKENS + VISUAL_TOKENS})
    matched: dict[int, list[float]] = {length: [] for length in lengths}
    for _ in range(args.repeats):
        for name, specs in configs:
            runs[name].append(measure(model, inputs, specs))
        for length in lengths:
            matched[length].append(measure_length(model, length))
    matched_s = {length: statistics.median(times) for length, times in matched.items()}
    dense_flops = flops(model.config, TEXT_TOKENS, VISUAL_TOKENS)
    median = lambda name, key: statistics.median(run[key] for run in runs[name])  # noqa: E731
    rows = []
    for name, specs in configs:
        kept = int(median(name, "visual_tokens"))
        ideal = dense_flops / median(name, "llm_flops")
        speedup = median("dense", "llm_prefill_s") / median(name, "llm_prefill_s")
        length = min(matched_s, key=lambda n: abs(n - (TEXT_TOKENS + kept)))
        before_the_llm = bool(specs) and before_llm_only(specs[0])  # one shorter prompt: a length-matched run exists
        length_matched = matched_s[TEXT_TOKENS + VISUAL_TOKENS] / matched_s[length] if before_the_llm or name == "dense" else None
        rows.append({
            "config": name, "specs": list(specs), "visual_tokens": kept, "llm_flops": median(name, "llm_flops"),
            "llm_prefill_s": median(name, "llm_prefill_s"), "prefill_s": median(name, "prefill_s"),
            "llm_prefill_speedup": speedup,
            "ttft_speedup": median("dense", "prefill_s") / median(name, "prefill_s"),
            "flops_ideal_speedup": ideal, "measured_over_ideal": speedup / ideal,
            "scoring_share": median(name, "scoring_s") / median("dense", "prefill_s"),
            "length_matched_speedup": length_matched,
            "measured_over_length_matched": None if length_matched is None else speedup / length_matched,
            "decode_tok_s": median(name, "decode_tok_s"), "peak_mb": median(name, "peak_mb"),
        })
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "clock": args.clock, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
            "model": "LLaVA layout, 576 visual tokens, Qwen2-0.5B LLM geometry (random weights, fp32)", "text_tokens": TEXT_TOKENS}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| config | visual tokens | LLM prefill s | speedup | FLOPs-ideal | measured/ideal | scoring | length-matched | measured/matched | TTFT s | decode tok/s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['visual_tokens']} | {r['llm_prefill_s']:.3f} | {r['llm_prefill_speedup']:.2f}x | "
            f"{r['flops_ideal_speedup']:.2f}x | {r['measured_over_ideal']:.0%} | {r['scoring_share']:.1%} | "
            + ("- | - | " if r["length_matched_speedup"] is None else
               f"{r['length_matched_speedup']:.2f}x | {r['measured_over_length_matched']:.0%} | ")
            + f"{r['prefill_s']:.3f} | "
            f"{r['decode_tok_s']:.1f} | {r['peak_mb']:.0f} |"
        )
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


ANYRES_METHODS = ("globalcom2",)


def anyres(args: argparse.Namespace) -> None:
    """Dense and each AnyRes method at the last budget on the LLaVA-NeXT-layout twin; a table of their
    LLM prefill times, FLOPs-ideal speedups and scoring shares."""
    model = build_anyres_model()
    inputs, visual = build_anyres_inputs(model)
    configs = [("dense", ())] + [(f"{name} {BUDGETS[-1]:.0%}", (f"{name}:keep={BUDGETS[-1]}",)) for name in ANYRES_METHODS]
    measure(model, inputs, (), visual)  # warm-up
    runs = {name: [measure(model, inputs, specs, visual) for _ in range(args.repeats)] for name, specs in configs}
    median = lambda name, key: statistics.median(run[key] for run in runs[name])  # noqa: E731
    dense_flops = flops(model.config, TEXT_TOKENS, visual)
    lines = ["| config | visual tokens | LLM prefill s | speedup | FLOPs-ideal | measured/ideal | scoring | TTFT s |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, specs in configs:
        speedup = median("dense", "llm_prefill_s") / median(name, "llm_prefill_s")
        ideal = dense_flops / median(name, "llm_flops")
        row = {"config": name, "specs": list(specs), "visual_tokens": int(median(name, "visual_tokens")),
               "llm_prefill_s": median(name, "llm_prefill_s"), "llm_prefill_speedup": speedup, "flops_ideal_speedup": ideal,
               "measured_over_ideal": speedup / ideal, "scoring_share": median(name, "scoring_s") / median("dense", "prefill_s"),
               "prefill_s": median(name, "prefill_s")}
        rows.append(row)
        lines.append(f"| {name} | {row['visual_tokens']} | {row['llm_prefill_s']:.3f} | {speedup:.2f}x | {ideal:.2f}x | "
                     f"{row['measured_over_ideal']:.0%} | {row['scoring_share']:.1%} | {row['prefill_s']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "clock": args.clock, "repeats": args.repeats,
            "model": "LLaVA-NeXT layout, 336x672 image (base + 2 tiles), Qwen2-0.5B LLM geometry (random weights, fp32)"}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
