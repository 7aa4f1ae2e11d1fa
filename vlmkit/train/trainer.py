"""A small staged trainer: seeded, resumable from its own checkpoints, with a loss log.

A *recipe* (`vlmkit.train.recipes`) supplies the model, the per-stage data streams and losses; this
module runs the stages in order. Each stage trains a subset of the parameters with AdamW, a linear
warm-up and a cosine decay. Batches are pure functions of `(stage, step)` (see `ShapesStream`), so
resuming from a checkpoint continues exactly as the uninterrupted run would have.

Checkpoints (`<out>/checkpoints/step-<N>/`) hold `model.safetensors` (model plus auxiliary heads),
`optimizer.safetensors` (AdamW moments, tensors only) and `state.json` (stage, step, optimizer
hyper-parameters). The loss log is `<out>/log.jsonl`, one JSON object per logged step.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm

from vlmkit.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: a unique name ("vision", "chat", ...).
        steps: optimizer steps.
        batch_size: samples per step.
        lr: peak learning rate.
        trainable: parameter-name prefixes (of the recipe's module dict) trained in this stage.
        warmup: warm-up steps (linear from 0).
        final_lr_ratio: learning rate at the last step, relative to `lr` (cosine decay).
        options: recipe-specific settings (e.g. the curriculum).
    """

    name: str
    steps: int
    batch_size: int
    lr: float
    trainable: tuple[str, ...]
    warmup: int = 50
    final_lr_ratio: float = 0.1
    options: dict = field(default_factory=dict)

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * cosine)


def check_due(stage: Stage, step: int, every: int) -> bool:
    """Whether a held-out check runs after `step` steps of `stage`: every `every` steps (0: never)
    and at the stage's last step."""
    return bool(every) and (step % every == 0 or step == stage.steps)


def _optimizer(modules: torch.nn.ModuleDict, stage: Stage) -> torch.optim.AdamW:
    params = []
    for name, param in modules.named_parameters():
        trainable = any(name.startswith(prefix) for prefix in stage.trainable)
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    if not params:
        raise ConfigError(f"stage {stage.name!r} trains nothing: no parameter starts with {stage.trainable}.")
    return torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)


def save_checkpoint(path: Path, modules: torch.nn.ModuleDict, optimizer: torch.optim.Optimizer,
                    state: dict) -> None:
    """Write a resumable checkpoint folder (safetensors + JSON), atomically via a temp folder."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(modules, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, entry in opt["state"].items()
               for key, value in entry.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: Path, modules: torch.nn.ModuleDict, optimizer: torch.optim.Optimizer) -> dict:
    """Restore modules and optimizer from `save_checkpoint`'s folder; returns its state dict."""
    load_model(modules, str(path / "model.safetensors"))
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


class _StageBatches(torch.utils.data.Dataset):
    """The batches of one stage, indexed by step (for a `DataLoader` that builds them in workers)."""

    def __init__(self, recipe, stage: Stage):
        self.recipe, self.stage = recipe, stage

    def __len__(self) -> int:
        return self.stage.steps

    def __getitem__(self, step: int) -> dict:
        return self.recipe.batch(self.stage, step)


def _batches(recipe, stage: Stage, first: int, workers: int, device: torch.device):
    """Batches `first ..` of `stage` on `device`, built in `workers` processes (0: in this one)."""
    if workers:
        batches = torch.utils.data.DataLoader(
            _StageBatches(recipe, stage), batch_size=None, sampler=range(first, stage.steps),
            num_workers=workers, prefetch_factor=4, multiprocessing_context="fork",
            pin_memory=device.type == "cuda")
    else:
        batches = (recipe.batch(stage, step) for step in range(first, stage.steps))
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under `out/checkpoints`, if any."""
    folders = sorted((out / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name[5:]))
    return folders[-1] if folders else None


def train(recipe, out: str | Path, resume: bool = True, checkpoint_every: int = 200,
          log_every: int = 10, keep_checkpoints: int = 2, progress: bool = True,
          stop_after: int | None = None, device: str = "cpu", workers: int = 0) -> Path | None:
    """Run every stage of `recipe`, resuming from the newest checkpoint in `out` when asked.

    Args:
        recipe: an object with `modules` (a `torch.nn.ModuleDict`), `stages` (list of `Stage`),
            `batch(stage, step) -> dict`, `loss(stage, batch) -> (loss, metrics)`,
            optional `evaluate(stage, step) -> dict | None` and `export(path)`.
        out: run folder (checkpoints, `log.jsonl`, `final/`).
        resume: continue from the newest checkpoint instead of starting over.
        checkpoint_every: steps between checkpoints (a checkpoint also ends every stage).
        log_every: steps between log lines.
        keep_checkpoints: how many checkpoints to keep.
        progress: show a tqdm bar.
        stop_after: stop (with a checkpoint) once this many steps of all stages are done; a
            later call with `resume=True` continues.
        device: where to train ("cpu", "cuda"); batches are the same on every device.
        workers: processes that build batches ahead of the training step (0: none).

    Returns:
        The `final/` folder written by `recipe.export`, or None when stopped early.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    modules = recipe.modules.to(device)
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}.")
    start_stage, start_step = 0, 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        info = json.loads((checkpoint / "state.json").read_text())
        start_stage, start_step = names.index(info["stage"]), info["step"]
    elif not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "log.jsonl").unlink(missing_ok=True)
    total = sum(s.steps for s in recipe.stages)
    done = sum(s.steps for s in recipe.stages[:start_stage])
    bar = tqdm(total=total, initial=done + start_step, desc="train", disable=not progress, dynamic_ncols=True)
    with (out / "log.jsonl").open("a") as log:
        for index, stage in enumerate(recipe.stages):
            if index < start_stage:
                continue
            optimizer = _optimizer(modules, stage)
            step = 0
            if index == start_stage and checkpoint is not None:
                step = load_checkpoint(checkpoint, modules, optimizer)["step"]
                checkpoint = None
            modules.train()
            clock, samples = time.time(), 0
            for batch in _batches(recipe, stage, step, workers, device):
                for group in optimizer.param_groups:
                    group["lr"] = stage.lr_at(step)
                loss, metrics = recipe.loss(stage, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], 1.0)
                optimizer.step()
                step += 1
                samples += stage.batch_size
                bar.update(1)
                bar.set_postfix(stage=stage.name, loss=f"{loss.item():.3f}")
                if step % log_every == 0 or step == stage.steps:
                    elapsed = time.time() - clock
                    row = {"stage": stage.name, "step": step, "loss": round(loss.item(), 4),
                           "lr": stage.lr_at(step - 1), "samples_per_s": round(samples / elapsed, 2),
                           "time": round(time.time(), 1), **metrics}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    clock, samples = time.time(), 0
                evaluation = getattr(recipe, "evaluate", None)
                if evaluation is not None:
                    result = evaluation(stage, step)
                    if result:
                        log.write(json.dumps({"stage": stage.name, "step": step, "eval": result,
                                              "time": round(time.time(), 1)}) + "\n")
                        log.flush()
                        modules.train()
                stopping = stop_after is not None and done + step >= stop_after
                if step % checkpoint_every == 0 or step == stage.steps or stopping:
                    state = {"stage": stage.name, "step": step, "stages": [asdict(s) for s in recipe.stages]}
                    save_checkpoint(out / "checkpoints" / f"step-{done + step}", modules, optimizer, state)
                    for old in sorted((out / "checkpoints").glob("step-*[0-9]"),
                                      key=lambda p: int(p.name[5:]))[:-keep_checkpoints]:
                        shutil.rmtree(old)
                if stopping:
                    bar.close()
                    return None
            done += stage.steps
    bar.close()
    final = out / "final"
    recipe.export(final)
    return final
