"""The eval runner: batched generation over a benchmark, resumable, sharded over processes, then scored.

:func:`run` loads the model and the benchmark, resolves the run config (see :func:`build_config`),
checks it against ``RUN_DIR/config.json`` when resuming, and generates for the samples that have no
row yet. Samples are cut into fixed batches of ``batch_size`` in benchmark order; batch ``b`` goes to
process ``b % num_processes`` (``accelerate.PartialState``), so every process count forms the same
batches and gets the same greedy outputs. Each process appends its rows to its own shard file; at the
end process 0 merges them in sample order into ``samples.jsonl`` and scores (:func:`score_run`).

What can fail without generating fails first, in this order: method specs, the benchmark's files,
the scorer's prerequisites (CHAIR's NLTK data and synonym table), the run directory's lock (process
0 holds ``RUN_DIR/.lock`` for the whole run), the model and whether it reads the benchmark's media
(video needs a video processor), the recorded config.

**Sample rows** (``samples.jsonl``, one JSON object per line)::

    {"sample_id", "index", "batch", "prompt", "target", "metadata",
     "response",                      # decoded new tokens, stripped; null on error
     "error",                         # null, or the InputError message of media that failed to load
     "new_tokens",                    # tokens generated for this sample (up to and including its end token)
     "visual_tokens": {"input": n,    # visual placeholder tokens of the prompt
                       "kept": {method: k}},  # kept per method, from patch.selections (empty without methods)
     "cost": {"llm_flops", "kv_bytes"},  # the prefill's decoder FLOPs and the KV-cache bytes it left:
                                      # counted by the engine from what ran (patch.cost), or, without
                                      # methods, vlmkit.zoo.flops and the cache of the whole prompt
     "timing": {"batch_size", "prefill_s", "decode_s", "decode_steps", "batch_wall_s",
                "threads"}}           # torch CPU threads the batch ran with

**Timing, and what it measures.** A logits processor appended to ``generate()`` takes a timestamp
each time logits are ready (after ``torch.cuda.synchronize()`` on CUDA). ``prefill_s`` is the time
from calling ``generate()`` to the first logits: generate's set-up, the vision encoder, the
projector and the LLM prefill of the whole batch, i.e. time to first token without image decoding
and the processor. ``decode_s`` is the time from the first to the last logits: ``decode_steps``
forward passes, each producing one token per unfinished sample. Decode tokens/s in summaries count
only real tokens (each sample's ``new_tokens - 1``; padding after a sample's end token is not
counted) over ``decode_s``, so early-finishing samples in a batch lower it honestly.
``batch_wall_s`` covers the whole batch: media loading, chat template and processor, generation and
decoding. All three are per batch: a sample's share is divided by ``batch_size``. Times depend on
``threads`` (``--threads``, see :mod:`vlmkit.commands.threads`); summaries and reports say how many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlmkit.errors import ConfigError, InputError, did_you_mean
from vlmkit.hashing import state_dict_hash
from vlmkit.eval import benchmarks, records
from vlmkit.eval.benchmarks.base import DataOptions, Sample, fingerprint, media_name
from vlmkit.eval.media import FrameFolder, VideoFile

FORMAT = "vlmkit-eval-run"
FORMAT_VERSION = 1
DECODING_STRATEGIES = ("greedy", "sample")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_BARRIER_HOURS = 6


@dataclass(frozen=True)
class Decoding:
    """Decoding settings.

    Attributes:
        strategy: ``"greedy"`` or ``"sample"``.
        max_new_tokens: Tokens to generate at most; None for the benchmark's default
            (its ``max_new_tokens``: 16 for short answers, 512 for CHAIR captions).
        temperature: Sampling temperature (sample only; default 1.0).
        top_p: Nucleus mass (sample only; default 1.0, off).
        top_k: Top-k cut (sample only; default 0, off).
    """

    strategy: str = "greedy"
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in DECODING_STRATEGIES:
            raise ConfigError(
                f"--decoding {self.strategy!r} is not supported; choose one of {', '.join(DECODING_STRATEGIES)}."
                + did_you_mean(self.strategy, DECODING_STRATEGIES)
            )
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens!r} must be an integer >= 1.")
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        if self.strategy == "greedy" and any(v is not None for v in sampling.values()):
            given = ", ".join(f"{k}={v}" for k, v in sampling.items() if v is not None)
            raise ConfigError(
                f"{given} only apply to sampling; pass --decoding sample, or drop them for greedy decoding."
            )
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature} must be > 0 (use --decoding greedy for argmax).")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1].")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ConfigError(f"--top-k {self.top_k!r} must be an integer >= 0 (0 turns it off).")

    def resolved(self, bench: str) -> Decoding:
        """These settings with every default filled in (what the run records and uses)."""
        tokens = self.max_new_tokens or benchmarks.get(bench).max_new_tokens
        if self.strategy == "greedy":
            return dataclasses.replace(self, max_new_tokens=tokens)
        return Decoding(
            "sample",
            tokens,
            1.0 if self.temperature is None else float(self.temperature),
            1.0 if self.top_p is None else float(self.top_p),
            0 if self.top_k is None else self.top_k,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (call on :meth:`resolved` settings)."""
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "num_beams": 1,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass(frozen=True)
class RunSpec:
    """Everything one ``vlmkit eval`` run needs.

    Attributes:
        model: ``tiny:<family>``, a shipped checkpoint name (:func:`vlmkit.zoo.available`) or a local
            ``save_pretrained`` folder (safetensors only).
        bench: A benchmark name (:func:`vlmkit.eval.benchmarks.names`).
        data: Where the benchmark files are.
        out: The run directory.
        methods: Method specs applied together (``"fastv:layer=2,keep=0.25"``); empty for the plain model.
        decoding: Decoding settings.
        batch_size: Samples per ``generate()`` call (left-padded).
        seed: Global seed; each batch's sampling seed is derived from it and the batch index.
        limit: Run only the first ``limit`` samples of each split (POPE split, MME subtask, MVBench
            task, Video-MME duration; of all samples when the benchmark has no splits): a quick look.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on the CPU) or a torch dtype name.
        trust_remote_code: Allow modelling code stored in a local model folder.
        style: Scoring style (POPE or MME parser); None for the default.
        suite: For suite runs: ``{"task", "version", "variant"}``, recorded in the config.
        progress: Show a progress bar (on process 0).
        rerun_errors: Generate again for samples whose row is an error (media that failed to load),
            and accept changed media files when only such samples read them (a fixed corrupt image).
    """

    model: str
    bench: str
    data: DataOptions
    out: str
    methods: tuple[str, ...] = ()
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int = 1
    seed: int = 0
    limit: int | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    style: str | None = None
    suite: Mapping[str, Any] | None = None
    progress: bool = True
    rerun_errors: bool = False

    def __post_init__(self) -> None:
        benchmarks.get(self.bench).check_style(self.style)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size!r} must be an integer >= 1.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"--limit {self.limit!r} must be an integer >= 1 (leave it out for all samples).")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")


def run(spec: RunSpec) -> dict[str, Any] | None:
    """Run (or resume) one evaluation and score it.

    Args:
        spec: The run.

    Returns:
        On process 0 the scores (as written to ``scores.json``); None on the other processes.

    Raises:
        ConfigError: Bad settings, a model that cannot read the benchmark's media, or ``spec.out``
            holds a run with a different config.
        ConflictError: Another process is writing ``spec.out``.
        DatasetError: Benchmark files or scorer data missing or malformed.
        UnknownMethodError: A method or parameter name is not known.
        OSError: ``spec.out`` cannot be written (the message names the file).
    """
    from accelerate import PartialState

    import vlmkit

    benchmark = benchmarks.get(spec.bench)
    methods = [vlmkit.parse_spec(method) for method in spec.methods]  # validate before loading anything
    loaded = benchmark.open(spec.data)
    samples = loaded.samples.first(spec.limit)
    benchmark.check_ready({**loaded.paths, **loaded.choices})
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true") or not torch.cuda.is_available()
    # a long barrier timeout: process 0 may wait at the final barrier while others finish their batches
    state = PartialState(cpu=cpu, timeout=timedelta(hours=_BARRIER_HOURS))
    run_dir = Path(spec.out).expanduser().resolve()
    decoding = spec.decoding.resolved(spec.bench)
    with records.lock(run_dir) if state.is_main_process else contextlib.nullcontext():
        model, processor, model_record = load_model(spec.model, spec.dtype, state.device, spec.trust_remote_code)
        benchmark.check_model(processor, model_record)
        config = build_config(
            spec, model_record, methods, decoding, samples, loaded.paths, loaded.choices, loaded.samples.info
        )
        root = loaded.paths["data"]
        media = {sample.sample_id: [media_name(ref, root) for ref in sample.media] for sample in samples}
        if state.is_main_process:
            records.check_or_write_config(run_dir, config, media, spec.rerun_errors)
        state.wait_for_everyone()
        if not state.is_main_process:
            records.check_or_write_config(run_dir, config, media, spec.rerun_errors)
        _generate(spec, state, run_dir, model, processor, methods, decoding, samples)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        runtime = {"num_processes": state.num_processes, "device": str(state.device)}
        return score_run(run_dir, style=spec.style, runtime={**runtime, "threads": torch.get_num_threads()})


def _generate(spec, state, run_dir, model, processor, methods, decoding, samples) -> None:
    """This process's batches of the samples without a row yet, appended to its shard file."""
    import vlmkit

    done = records.finished_ids(run_dir, spec.rerun_errors)
    batches = [samples[start : start + spec.batch_size] for start in range(0, len(samples), spec.batch_size)]
    mine = [
        (index, [s for s in batch if s.sample_id not in done])
        for index, batch in enumerate(batches)
        if index % state.num_processes == state.process_index
    ]
    mine = [(index, batch) for index, batch in mine if batch]
    positions = {sample.sample_id: position for position, sample in enumerate(samples)}
    writer = records.ShardWriter(records.shard_path(run_dir, state.process_index, state.num_processes))
    patch = vlmkit.apply(model, *methods) if methods else None
    bar = tqdm(
        total=sum(len(batch) for _, batch in mine),
        desc=f"{spec.bench} {run_dir.name}",
        unit="sample",
        disable=not (spec.progress and state.is_main_process),
        file=sys.stderr,
    )
    try:
        for index, batch in mine:
            rows = generate_batch(model, processor, batch, decoding, batch_seed(spec.seed, index), patch)
            for row in rows:
                row.update(index=positions[row["sample_id"]], batch=index)
            writer.write(rows)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
        if patch is not None:
            patch.remove()


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of batch ``batch_index``: independent of the process that runs it, or of resuming."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def build_config(
    spec: RunSpec,
    model_record: Mapping[str, Any],
    methods: Sequence[Any],
    decoding: Decoding,
    samples: Sequence[Sample],
    paths: Mapping[str, Any],
    options: Mapping[str, Any],
    info: Mapping[str, Any],
) -> dict[str, Any]:
    """The fully resolved run config written to ``config.json`` (and copied into ``scores.json``).

    Everything but :data:`vlmkit.eval.records.LOCATION_FIELDS` must match to resume a run.
    ``data.files`` holds a short hash per media file (names relative to ``--data``), so a changed
    ``data.hash`` can name the files behind it.
    """
    import transformers

    import vlmkit

    data_hash, files = fingerprint(samples, paths["data"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bench": spec.bench,
        "suite": dict(spec.suite) if spec.suite else None,
        "model": dict(model_record),
        "methods": [{"name": method.name, "params": _jsonable(method.params())} for method in methods],
        "decoding": dataclasses.asdict(decoding),
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "limit": spec.limit,
        "versions": {
            "vlmkit": vlmkit.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "data": {
            "hash": data_hash,
            "num_samples": len(samples),
            "sample_ids": [sample.sample_id for sample in samples],
            "options": _jsonable(dict(options)),
            "paths": _jsonable(dict(paths)),
            "info": _jsonable(dict(info)),
            "files": files,
        },
    }


def load_model(spec: str, dtype: str, device: torch.device, trust_remote_code: bool = False):
    """Load ``tiny:<family>``, a shipped checkpoint, or a local ``save_pretrained`` folder.

    Args:
        spec: The ``--model`` value.
        dtype: One of :data:`DTYPES`.
        device: Where to put the model.
        trust_remote_code: Allow modelling code stored in a local folder.

    Returns:
        ``(model, processor, record)``; the processor pads on the left; ``record`` names the model and
        hashes its config and weights (the safetensors files; for tiny models the state dict).

    Raises:
        ConfigError: Unknown family or checkpoint, a folder without safetensors, or a processor
            without a chat template.
    """
    from vlmkit import zoo
    from vlmkit.zoo.shipped import CHECKPOINTS

    torch_dtype = _torch_dtype(dtype, device)
    if spec.startswith("tiny:"):
        model, processor = zoo.tiny(spec.split(":", 1)[1])
        model = model.to(dtype=torch_dtype)
        record = {"spec": spec, "source": "tiny", "path": None, "weights_sha256": state_dict_hash(model)}
    else:
        shipped = spec in zoo.available()
        model, processor = zoo.load(spec, trust_remote_code=trust_remote_code, dtype=torch_dtype)
        folder = CHECKPOINTS / spec if shipped else Path(spec).expanduser().resolve()
        record = {
            "spec": spec if shipped else str(folder),
            "source": "shipped" if shipped else "path",
            "path": str(folder),
            "weights_sha256": _files_hash(sorted(folder.glob("*.safetensors"))),
        }
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(
            f"the processor of {spec} has no chat template; vlmkit eval prompts through it. Save the model with a "
            "processor that has one (processor.chat_template = ...; processor.save_pretrained(path))."
        )
    processor.tokenizer.padding_side = "left"
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    record.update(
        {
            "class": type(model).__name__,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "trust_remote_code": trust_remote_code,
        }
    )
    return model.to(device).eval(), processor, record


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _files_hash(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


class _Clock:
    """A logits processor that timestamps every decoding step (see the module docstring)."""

    def __init__(self, device: torch.device):
        self._cuda = torch.device(device).type == "cuda"
        self.start = 0.0
        self.stamps: list[float] = []

    def begin(self) -> None:
        self._sync()
        self.start = time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._sync()
        self.stamps.append(time.perf_counter())
        return scores

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


def generate_batch(
    model, processor, batch: Sequence[Sample], decoding: Decoding, seed: int, patch=None
) -> list[dict[str, Any]]:
    """Generate for one batch; samples whose media fail to load become error rows.

    Args:
        model: The (possibly patched) model.
        processor: Its processor, padding on the left.
        batch: The samples.
        decoding: Resolved decoding settings.
        seed: Torch seed set before ``generate()``.
        patch: The `vlmkit.Patch` on ``model``, to read the kept visual tokens from.

    Returns:
        One row per sample, in batch order (without ``index`` and ``batch``, which the caller adds).
    """
    from transformers import LogitsProcessorList

    started = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    ready: list[tuple[Sample, list]] = []
    for sample in batch:
        base = {
            "sample_id": sample.sample_id,
            "prompt": sample.prompt,
            "target": sample.target,
            "metadata": dict(sample.metadata),
        }
        try:
            ready.append((sample, sample.load_media()))
            rows[sample.sample_id] = base
        except InputError as error:
            rows[sample.sample_id] = {
                **base,
                "response": None,
                "error": str(error),
                "new_tokens": 0,
                "visual_tokens": None,
                "timing": None,
            }
    if ready:
        video = hasattr(processor, "video_processor")
        texts, images, videos = [], [], []
        for sample, frames in ready:
            as_video = video and isinstance(sample.media[0], (VideoFile, FrameFolder))
            content = [{"type": "video"}] if as_video else [{"type": "image"} for _ in frames]
            content.append({"type": "text", "text": sample.prompt})
            chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            texts.append(chat + sample.answer_prefix)
            (videos.append(frames) if as_video else images.extend(frames))
        inputs = processor(
            text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt"
        ).to(model.device, dtype=model.dtype)
        visual_ids = [
            i
            for i in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
            if i is not None
        ]
        visual = (
            torch.isin(inputs["input_ids"], torch.tensor(visual_ids, device=inputs["input_ids"].device))
            .sum(-1)
            .tolist()
        )
        clock = _Clock(model.device)
        generation = model.generation_config
        pad = generation.pad_token_id if generation.pad_token_id is not None else processor.tokenizer.pad_token_id
        torch.manual_seed(seed)
        with torch.inference_mode():
            clock.begin()
            output = model.generate(
                **inputs, **decoding.generate_kwargs(), logits_processor=LogitsProcessorList([clock]), pad_token_id=pad
            )
        new = output[:, inputs["input_ids"].shape[1] :].cpu()
        replies = processor.batch_decode(new, skip_special_tokens=True)
        kept = {name: [len(keep) for keep in keeps] for name, keeps in (patch.selections if patch else {}).items()}
        cost = _prefill_cost(model, patch, inputs["attention_mask"].sum(-1).tolist(), visual)
        counts = _new_token_counts(new, generation.eos_token_id, pad)
        prefill = clock.stamps[0] - clock.start
        decode = clock.stamps[-1] - clock.stamps[0]
        wall = time.perf_counter() - started
        for row_index, (sample, _) in enumerate(ready):
            rows[sample.sample_id].update(
                response=replies[row_index].strip(),
                error=None,
                new_tokens=counts[row_index],
                visual_tokens={"input": visual[row_index], "kept": {name: k[row_index] for name, k in kept.items()}},
                cost={name: values[row_index] for name, values in cost.items()},
                timing={
                    "batch_size": len(ready),
                    "prefill_s": prefill,
                    "decode_s": decode,
                    "decode_steps": len(clock.stamps) - 1,
                    "batch_wall_s": wall,
                    "threads": torch.get_num_threads(),
                },
            )
    return [rows[sample.sample_id] for sample in batch]


def _prefill_cost(model, patch, lengths: Sequence[int], visual: Sequence[int]) -> dict[str, list[float]]:
    """Per sample, the prefill's LLM FLOPs and KV bytes: the engine's count when a stack method ran
    it, else the dense prefill of the whole prompt (`vlmkit.zoo.flops`, every layer caching every token)."""
    if patch is not None and patch.cost.get("llm_flops") and len(patch.cost["llm_flops"]) == len(lengths):
        return dict(patch.cost)
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * heads * head_dim * model.dtype.itemsize * config.num_hidden_layers
    from vlmkit.zoo.flops import flops

    return {
        "llm_flops": [flops(model, length - count, count) for length, count in zip(lengths, visual)],
        "kv_bytes": [float(length * per_token) for length in lengths],
    }


def _new_token_counts(new: torch.Tensor, eos: int | Sequence[int] | None, pad: int | None) -> list[int]:
    """Per row: tokens up to and including the first end token (all of them when none ends it)."""
    ends = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    counts = []
    for row in new.tolist():
        stop = next((i for i, token in enumerate(row) if token in ends), None)
        counts.append(len(row) if stop is None else stop + 1)
    return counts


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Visual-token and timing summaries of a run's rows (errors left out).

    Returns:
        ``{"samples", "errors", "visual_tokens": {"input_mean", "kept_mean": {method: mean},
        "kept_final_mean", "kept_ratio"}, "timing": {"prefill_s_per_sample", "prefill_s_per_batch",
        "decode_tokens_per_s", "wall_s_per_sample", "new_tokens_mean", "batches", "threads"}}``.
        ``kept_final`` is what reaches the end of the prefill (the smallest per-method count; the
        input without methods). ``threads`` is the torch CPU thread count the times were taken with:
        an int, a ``"low-high"`` range when a resumed run changed it, None for rows that predate it.
    """
    good = [row for row in rows if row.get("error") is None]
    summary: dict[str, Any] = {"samples": len(rows), "errors": len(rows) - len(good)}
    if not good:
        return summary
    n = len(good)
    inputs = [row["visual_tokens"]["input"] for row in good]
    methods = sorted({name for row in good for name in row["visual_tokens"]["kept"]})
    final = [min(row["visual_tokens"]["kept"].values(), default=row["visual_tokens"]["input"]) for row in good]
    input_mean = sum(inputs) / n
    summary["visual_tokens"] = {
        "input_mean": input_mean,
        "kept_mean": {name: sum(row["visual_tokens"]["kept"].get(name, 0) for row in good) / n for name in methods},
        "kept_final_mean": sum(final) / n,
        "kept_ratio": (sum(final) / n) / input_mean if input_mean else None,
    }
    # each row carries its batch's times: a 1/batch_size share of each sums them once per batch
    batches = prefill = decode = wall = 0.0
    for row in good:
        timing = row["timing"]
        batches += 1 / timing["batch_size"]
        prefill += timing["prefill_s"] / timing["batch_size"]
        decode += timing["decode_s"] / timing["batch_size"]
        wall += timing["batch_wall_s"] / timing["batch_size"]
    costs = [row["cost"] for row in good if row.get("cost")]
    if costs:
        summary["cost"] = {name: sum(cost[name] for cost in costs) / len(costs) for name in ("llm_flops", "kv_bytes")}
    decode_tokens = sum(max(row["new_tokens"] - 1, 0) for row in good)
    summary["timing"] = {
        "prefill_s_per_sample": prefill / n,
        "prefill_s_per_batch": prefill / batches,
        "decode_tokens_per_s": decode_tokens / decode if decode > 0 else None,
        "wall_s_per_sample": wall / n,
        "new_tokens_mean": sum(row["new_tokens"] for row in good) / n,
        "batches": round(batches),
        "threads": _threads([row["timing"].get("threads") for row in good]),
    }
    return summary


def _threads(counts: Sequence[int | None]) -> int | str | None:
    known = sorted({count for count in counts if count is not None})
    if not known:
        return None
    return known[0] if len(known) == 1 else f"{known[0]}-{known[-1]}"


def threads_label(summary: Mapping[str, Any]) -> str:
    """``"2 threads"`` (or ``"1-2 threads"``) for a run summary's timing; ``"threads unknown"`` when not recorded."""
    threads = (summary.get("timing") or {}).get("threads")
    return "threads unknown" if threads is None else f"{threads} thread{'' if threads == 1 else 's'}"


def score_run(
    run_dir: str | os.PathLike, style: str | None = None, runtime: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merge a finished run's shards, score it, write ``scores.json`` and print a table.

    Args:
        run_dir: The run directory.
        style: Scoring style; None for the benchmark's default.
        runtime: How the run was executed (process count, device); None keeps what ``scores.json`` has.

    Returns:
        The content of ``scores.json``: ``{"format", "format_version", "config", "runtime", "summary",
        "metrics", "scores", "style", "warnings"}``.

    Raises:
        DatasetError: Not a run directory, or samples without a row (unfinished run).
        ConfigError: A style the benchmark does not have.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    config = records.read_json(run_dir / records.CONFIG, "run config")
    if (run_dir / records.SHARDS).is_dir():
        rows = records.merge_shards(run_dir, config["data"]["sample_ids"])
    else:
        rows = list(records.read_rows(run_dir / records.SAMPLES))
    if runtime is None and (run_dir / records.SCORES).is_file():  # rescoring keeps how the run was executed
        runtime = records.read_json(run_dir / records.SCORES, "scores file").get("runtime")
    data = {**config["data"]["paths"], **config["data"]["options"]}
    scored = benchmarks.get(config["bench"]).score_rows(rows, data, style)
    result = {
        "format": "vlmkit-eval-scores",
        "format_version": FORMAT_VERSION,
        "config": config,
        "runtime": dict(runtime or {}),
        "summary": summarize(rows),
        "metrics": scored["metrics"],
        "style": scored["style"],
        "scores": scored["details"],
        "warnings": scored["warnings"],
    }
    records.write_json_atomic(run_dir / records.SCORES, _jsonable(result))
    print(format_scores(result, run_dir))
    return result


def format_scores(result: Mapping[str, Any], run_dir: Path) -> str:
    """A short plain-text table of a run's metrics, visual tokens and timing."""
    config, summary = result["config"], result["summary"]
    methods = ", ".join(m["name"] for m in config["methods"]) or "none"
    lines = [f"{run_dir}: {config['bench']} on {config['model']['spec']} (methods: {methods})"]
    lines.append(f"  samples {summary['samples']}, errors {summary['errors']}")
    for name, value in result["metrics"].items():
        lines.append(f"  {name:<24}{value:.4f}")
    tokens, timing = summary.get("visual_tokens"), summary.get("timing")
    if tokens:
        lines.append(f"  {'visual tokens kept':<24}{tokens['kept_final_mean']:.1f} of {tokens['input_mean']:.1f}")
    if timing:
        lines.append(f"  {'timing with':<24}{threads_label(summary)}")
        lines.append(f"  {'prefill ms / sample':<24}{1000 * timing['prefill_s_per_sample']:.2f}")
        rate = timing["decode_tokens_per_s"]
        lines.append(f"  {'decode tokens / s':<24}{'n/a' if rate is None else f'{rate:.1f}'}")
    lines.extend(f"  warning: {message}" for message in result["warnings"])
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
