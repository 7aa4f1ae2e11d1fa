"""Speed of the vlmkit kernels at the sizes of real workloads, against measured ceilings.

For every op and workload it times, interleaved and repeated (medians reported):

- ``naive``: the PyTorch code the anchors use (eager attention with the full softmax(QK^T)
  materialised, as FastV's scoring does; a one-hot matmul merge, as VisionZip/FastVID do;
  for greedy_maxmin the reference itself, which builds the N x N matrix as DivPrune does);
- ``torch``: the PyTorch reference (``<op>_reference``), the path taken without a GPU;
- ``public``: the public function as dispatched (checks included);
- ``triton``: the Triton kernels (CUDA only; "pending" elsewhere: Triton's CPU interpreter
  is for correctness only).

Achieved rates use a fixed model of the op's minimal traffic and arithmetic (see ``cost`` in
the JSON): bandwidth against a measured copy (read + write), FLOP rate against a measured
matmul in the workload dtype (bfloat16 on CUDA, float32 on the CPU). Every path's output is
compared with the reference once.

    python benchmarks/kernels.py [--quick] [--repeats 5] [--threads 1] [--out results.json]

Runs unchanged on CUDA when a GPU is present.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.kernels import _dispatch, attention_colsum, attention_rows, greedy_maxmin, merge_tokens
from vlmkit.kernels.colsum import attention_colsum_reference
from vlmkit.kernels.maxmin import greedy_maxmin_reference
from vlmkit.kernels.merge import merge_tokens_reference
from vlmkit.kernels.rows import attention_rows_reference

PENDING = "pending (needs a GPU)"


@dataclass
class Case:
    op: str
    workload: str
    shape: str
    bytes: float  # minimal traffic model
    flops: float  # arithmetic model
    paths: dict[str, Callable[[], object]]
    baseline: str = "naive"
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason


# ---------------------------------------------------------------- naive baselines
def eager_fastv_scores(q_all: torch.Tensor, k: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """FastV's eager scoring: the full causal softmax(QK^T) (HF eager attention), last row, mean over heads."""
    keys = k.repeat_interleave(groups, dim=1)  # HF repeat_kv
    logits = q_all @ keys.transpose(-1, -2) * scale
    length = logits.shape[-1]
    causal = torch.full((length, length), float("-inf"), device=q_all.device, dtype=logits.dtype).triu(1)
    probs = torch.softmax((logits + causal).float(), dim=-1).to(q_all.dtype)  # (B, H, L, L) materialised
    return probs[:, :, -1:, :].float().mean(dim=1)


def eager_colsum(q: torch.Tensor, k: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """Attention received per key from the full causal (B, H, L, L) probability tensor."""
    keys = k.repeat_interleave(groups, dim=1)
    logits = (q @ keys.transpose(-1, -2)).float() * scale
    length = logits.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs.sum(dim=(1, 2))


def onehot_merge(x: torch.Tensor, target: torch.Tensor, num_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per target with a one-hot (B, N, T) matrix and a bmm (VisionZip, FastVID)."""
    onehot = F.one_hot(target.clamp(min=0), num_targets).to(x.dtype) * (target >= 0)[..., None].to(x.dtype)
    counts = onehot.sum(dim=1)
    return onehot.transpose(1, 2) @ x / counts.clamp(min=1)[..., None], counts.float()


# ---------------------------------------------------------------- workloads
def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rows_case(name, batch, heads, kv_heads, dim, keys, device, dtype) -> Case:
    groups, scale = heads // kv_heads, dim ** -0.5
    q_all = torch.randn(batch, heads, keys, dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, dim, device=device, dtype=dtype)
    q = q_all[:, :, -1:].contiguous()  # the last text token
    kwargs = dict(scale=scale, num_kv_groups=groups)
    size = _element(dtype)
    return Case(
        "attention_rows", name, f"B{batch} H{heads}/{kv_heads} D{dim} R1 N{keys}",
        bytes=size * (q.numel() + k.numel()) + 4 * batch * keys,
        flops=2.0 * batch * heads * keys * dim,
        paths={
            "naive": lambda: eager_fastv_scores(q_all, k, scale, groups),
            "torch": lambda: attention_rows_reference(q, k, **kwargs),
            "public": lambda: attention_rows(q, k, **kwargs),
            "triton": lambda: _dispatch.triton_module("attention").attention_rows(q, k, reduce="mean", **kwargs),
        },
    )


def colsum_case(name, batch, heads, kv_heads, dim, length, device, dtype) -> Case:
    groups, scale = heads // kv_heads, dim ** -0.5
    q = torch.randn(batch, heads, length, dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype)
    kwargs = dict(scale=scale, num_kv_groups=groups, causal=True)
    pairs = length * (length + 1) / 2  # causal (query, key) pairs
    return Case(
        "attention_colsum", name, f"B{batch} H{heads}/{kv_heads} D{dim} M=N={length} causal",
        bytes=_element(dtype) * (q.numel() + k.numel()) + 4 * batch * length,
        flops=2 * 2.0 * batch * heads * pairs * dim,  # two QK^T passes (log-sum-exp, then sums)
        paths={
            "naive": lambda: eager_colsum(q, k, scale, groups),
            "torch": lambda: attention_colsum_reference(q, k, **kwargs),
            "public": lambda: attention_colsum(q, k, **kwargs),
            "triton": lambda: _dispatch.triton_module("attention").attention_colsum(q, k, **kwargs),
        },
    )


def merge_case(name, batch, tokens, channels, targets, device, dtype) -> Case:
    x = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
    target = torch.randint(-1, targets, (batch, tokens), device=device)
    size = _element(dtype)
    return Case(
        "merge_tokens", name, f"B{batch} N{tokens} C{channels} -> T{targets}",
        bytes=size * batch * (tokens + targets) * channels + 8 * batch * tokens + 4 * batch * targets,
        flops=2.0 * batch * tokens * channels,
        paths={
            "naive": lambda: onehot_merge(x, target, targets),
            "torch": lambda: merge_tokens_reference(x, target, num_targets=targets),
            "public": lambda: merge_tokens(x, target, num_targets=targets),
            "triton": lambda: _dispatch.triton_module("merge").merge_tokens(x, target, num_targets=targets),
        },
    )


def maxmin_case(name, batch, tokens, channels, picks, device, dtype) -> Case:
    x = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
    return Case(
        "greedy_maxmin", name, f"B{batch} N{tokens} C{channels} k{picks}",
        bytes=_element(dtype) * batch * tokens * channels,  # reading the tokens once
        flops=2.0 * batch * tokens * channels * (tokens + picks),  # Gram matrix + one row per pick
        baseline="torch",
        paths={
            "torch": lambda: greedy_maxmin_reference(x, picks),
            "public": lambda: greedy_maxmin(x, picks),
            "triton": lambda: _dispatch.triton_module("maxmin").greedy_maxmin(x, picks, metric="cosine"),
        },
    )


QWEN2_05B = dict(heads=14, kv_heads=2, dim=64)  # GQA 7:1
LLAMA_7B = dict(heads=32, kv_heads=32, dim=128)
TEXT = 64


def workloads(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """The cases to time; on the CPU the 7B geometry is left to the GPU (memory, time)."""
    if quick:
        return [
            rows_case("quick", 1, 4, 2, 16, 48, device, dtype),
            colsum_case("quick", 1, 4, 2, 16, 40, device, dtype),
            merge_case("quick", 1, 50, 32, 8, device, dtype),
            maxmin_case("quick", 1, 40, 16, 5, device, dtype),
        ]
    gpu = device.type == "cuda"
    cases = [
        rows_case("FastV score, Qwen2-0.5B, 576 img + 64 text", 1, **QWEN2_05B, keys=576 + TEXT, device=device, dtype=dtype),
        rows_case("FastV score, Qwen2-0.5B, 2880 img + 64 text", 1, **QWEN2_05B, keys=2880 + TEXT, device=device, dtype=dtype),
        rows_case("FastV score, Qwen2-0.5B, video 16x196 + 64", 1, **QWEN2_05B, keys=3136 + TEXT, device=device, dtype=dtype),
        colsum_case("mean received, Qwen2-0.5B, 576 + 64", 1, **QWEN2_05B, length=576 + TEXT, device=device, dtype=dtype),
        colsum_case("mean received, Qwen2-0.5B, 2880 + 64", 1, **QWEN2_05B, length=2880 + TEXT, device=device, dtype=dtype),
        merge_case("VisionZip contextual, CLIP-L 576", 1, 576 - 54, 1024, 10, device, dtype),
        merge_case("ToMe layer, CLIP-L 577, r=16", 1, 577, 1024, 561, device, dtype),
        merge_case("video 16x196 -> 784, CLIP-L", 1, 3136, 1024, 784, device, dtype),
        maxmin_case("DivPrune 9.8%, LLaVA-1.5-7B 576", 1, 576, 4096, 56, device, dtype),
        maxmin_case("DivPrune 9.8%, LLaVA-NeXT-7B 2880", 1, 2880, 4096, 282, device, dtype),
        maxmin_case("DivPrune 9.8%, Qwen2-0.5B video 16x196", 1, 3136, 896, 307, device, dtype),
    ]
    if gpu:
        cases += [
            rows_case("FastV score, 7B, 576 img + 64 text", 1, **LLAMA_7B, keys=576 + TEXT, device=device, dtype=dtype),
            rows_case("FastV score, 7B, 2880 img + 64 text", 1, **LLAMA_7B, keys=2880 + TEXT, device=device, dtype=dtype),
            colsum_case("mean received, 7B, 2880 + 64", 1, **LLAMA_7B, length=2880 + TEXT, device=device, dtype=dtype),
        ]
    return cases


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


def time_interleaved(
    paths: dict[str, Callable[[], object]], device: torch.device, repeats: int, min_seconds: float
) -> dict[str, list[float]]:
    """Seconds per call of each path: one warm-up call each (compiles, autotunes), then
    ``repeats`` rounds that run every path in turn, starting one path later each round so that
    no path always follows the same one; short calls are looped to ``min_seconds``."""
    inner = {}
    for name, fn in paths.items():
        seconds = _time_once(fn, device, 1)
        inner[name] = max(1, int(min_seconds / max(_time_once(fn, device, 1), 1e-7))) if seconds < min_seconds else 1
    samples: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_time_once(paths[name], device, inner[name]))
    return samples


def ceilings(device: torch.device, dtype: torch.dtype, quick: bool, repeats: int) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul rate (GFLOP/s, in ``dtype``) measured here:
    the best of the repeats, since a ceiling is what the device can reach."""
    megabytes = 16 if quick else (512 if device.type == "cuda" else 128)
    source = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    n = 256 if quick else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    samples = time_interleaved(
        {"copy": lambda: target.copy_(source), "matmul": lambda: a @ b}, device, max(repeats, 5), 0.02
    )
    return {
        "copy_GBps": 2 * source.numel() / min(samples["copy"]) / 1e9,
        "matmul_GFLOPs": 2 * n ** 3 / min(samples["matmul"]) / 1e9,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_n": n,
        "copy_MiB": megabytes,
    }


def _max_relative_error(actual: object, expected: object) -> float:
    if isinstance(actual, tuple):
        actual, expected = actual[0], expected[0]
    if actual.dtype == torch.long:
        return 0.0 if torch.equal(actual, expected) else float("inf")
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    triton_runs = device.type == "cuda" and _dispatch.triton_available()
    torch.manual_seed(0)
    repeats = args.repeats or (2 if args.quick else 5)
    min_seconds = 0.0 if device.type == "cpu" else 0.01
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "repeats": repeats,
        "ceilings": ceilings(device, dtype, args.quick, repeats),
        "cases": [],
    }
    for case in workloads(device, dtype, args.quick):
        paths = dict(case.paths)
        if not triton_runs:
            paths.pop("triton")
            case.skipped["triton"] = PENDING
        with torch.no_grad():
            reference = case.paths["torch"]()
            errors = {name: _max_relative_error(fn(), reference) for name, fn in paths.items() if name != "torch"}
            samples = time_interleaved(paths, device, repeats, min_seconds)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        entry = {
            "op": case.op, "workload": case.workload, "shape": case.shape,
            "cost": {"bytes": case.bytes, "flops": case.flops}, "baseline": case.baseline, "paths": {},
        }
        for name in case.paths:
            if name in case.skipped:
                entry["paths"][name] = {"status": case.skipped[name]}
                continue
            seconds = medians[name]
            entry["paths"][name] = {
                "median_ms": seconds * 1e3,
                "samples_ms": [s * 1e3 for s in samples[name]],
                "GBps": case.bytes / seconds / 1e9,
                "GFLOPs": case.flops / seconds / 1e9,
                "speedup_vs_baseline": medians[case.baseline] / seconds,
                "relative_error_vs_torch": errors.get(name, 0.0),
            }
        result["cases"].append(entry)
        print(f"done: {case.op} / {case.workload}", file=sys.stderr, flush=True)
    return result


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def markdown(result: dict) -> str:
    ceiling = result["ceilings"]
    lines = [
        f"Device: {result['device']}; dtype {result['dtype']}; torch {result['torch']}, triton {result['triton']}; "
        f"median of {result['repeats']} interleaved repeats.",
        f"Ceilings measured here (best of the repeats): copy {ceiling['copy_GBps']:.1f} GB/s (read + write, {ceiling['copy_MiB']} MiB); "
        f"matmul {ceiling['matmul_GFLOPs']:.1f} GFLOP/s ({ceiling['matmul_dtype']}, n={ceiling['matmul_n']}).",
        "",
        "| op | workload | shape | path | median ms | GB/s (% copy) | GFLOP/s (% matmul) | speed-up vs baseline | rel. err. vs torch |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for case in result["cases"]:
        for name, path in case["paths"].items():
            label = f"{name} (baseline)" if name == case["baseline"] else name
            if "status" in path:
                lines.append(f"| {case['op']} | {case['workload']} | {case['shape']} | {label} | {path['status']} | | | | |")
                continue
            lines.append(
                f"| {case['op']} | {case['workload']} | {case['shape']} | {label} | {path['median_ms']:.3f} | "
                f"{path['GBps']:.1f} ({100 * path['GBps'] / ceiling['copy_GBps']:.0f}%) | "
                f"{path['GFLOPs']:.1f} ({100 * path['GFLOPs'] / ceiling['matmul_GFLOPs']:.0f}%) | "
                f"{path['speedup_vs_baseline']:.2f}x | {path['relative_error_vs_torch']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared host)")
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
