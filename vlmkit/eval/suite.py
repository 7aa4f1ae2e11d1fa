"""YAML eval suites: tasks x (method x budget) grids, run by ``vlmkit eval --suite FILE``.

A suite file (read with ``yaml.safe_load`` only) has these top-level keys:

* ``include``: a file name or list of them, relative to this file; included files are merged first
  (key by key, mappings recursively) and this file's values win. Typically a base file with
  decoding defaults.
* ``version``: the suite's version (int).
* ``description``: free text.
* ``defaults``: run settings for every task: ``decoding`` (``strategy``, ``max_new_tokens``,
  ``temperature``, ``top_p``, ``top_k``), ``batch_size``, ``seed``, ``dtype``, ``limit``.
* ``tasks``: ``{name: task}``; each task has a ``version`` (required: bump it when the task changes,
  and old run directories refuse to resume), a ``bench``, ``data`` (relative to ``--data``; default
  ``.``), the data options of ``vlmkit eval`` (``media``, ``annotations``, ``synonyms``, ``split``,
  ``num_images``, ``data_seed``, ``num_frames``, ``video_format``), ``style``, and any of the defaults.
* A video task's ``num_frames`` may be a list: the task then runs once per frame count, as the task
  ``<name>_<count>f``, and a ``{num_frames}`` in its ``data`` takes the count (one data folder per
  clip length, e.g. ``data: video{num_frames}``).
* ``methods``: ``{variant: [spec, ...]}``; specs may hold ``{placeholders}`` filled from ``budgets``.
  An empty list is the unpatched model.
* ``budgets``: ``{placeholder: [values]}``. A variant runs once per combination of the placeholders
  it uses; its run is named ``<variant>`` or ``<variant>_<placeholder>=<value>...``.

Task and run names become folder names, so each must be one plain name: not empty, no ``/`` or
``\\``, not ``.`` or ``..``, no control characters (a suite cannot write outside ``--out``).

Settings resolve as: ``defaults`` < the task < options given on the command line. Each run writes to
``<out>/<task>/<run name>/``.

Example (``eval/pope_budgets.yaml``)::

    include: base.yaml
    version: 1
    tasks:
      pope: {version: 1, bench: pope, data: pope, split: [random, popular, adversarial]}
    methods:
      baseline: []
      fastv: ["fastv:layer=2,keep={keep}"]
    budgets:
      keep: [0.5, 0.25]
"""

from __future__ import annotations

import itertools
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmkit.errors import ConfigError, did_you_mean

TOP_KEYS = ("include", "version", "description", "defaults", "tasks", "methods", "budgets")
RUN_KEYS = ("decoding", "batch_size", "seed", "dtype", "limit")
DATA_KEYS = (
    "data",
    "media",
    "annotations",
    "synonyms",
    "split",
    "num_images",
    "data_seed",
    "num_frames",
    "video_format",
)
TASK_KEYS = ("version", "bench", "style", *DATA_KEYS, *RUN_KEYS)
DECODING_KEYS = ("strategy", "max_new_tokens", "temperature", "top_p", "top_k")
_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class SuiteRun:
    """One run of a suite.

    Attributes:
        task: Task name.
        name: Run name (variant plus budget values).
        version: The task's version.
        methods: Method specs with budgets filled in.
        settings: The task's merged settings (defaults, then the task): data options, run options and
            ``decoding`` as a mapping.
    """

    task: str
    name: str
    version: int
    methods: tuple[str, ...]
    settings: Mapping[str, Any]


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a suite file and its includes, merged, and check its keys.

    Args:
        path: The suite file.

    Returns:
        The merged suite (without ``include``).

    Raises:
        ConfigError: A file is missing, is not valid YAML, includes itself, or has unknown keys or
            values of the wrong kind; the message names the file.
    """
    suite = _read(Path(path).expanduser().resolve(), ())
    _check(suite, Path(path))
    return suite


def runs(suite: Mapping[str, Any], path: str | os.PathLike) -> list[SuiteRun]:
    """Expand a loaded suite into its runs: every task x every variant x every budget combination.

    Args:
        suite: From :func:`load`.
        path: The suite file, for messages.

    Returns:
        The runs, task by task, variants in file order, budgets in the order given.

    Raises:
        ConfigError: A placeholder without budget values.
    """
    defaults = suite.get("defaults") or {}
    methods = suite.get("methods") or {"baseline": []}
    budgets = suite.get("budgets") or {}
    expanded = []
    for task, spec, settings in _frame_tasks(suite["tasks"], defaults):
        for variant, templates in methods.items():
            names = sorted({field for t in templates for _, field, _, _ in string.Formatter().parse(t) if field})
            unknown = [name for name in names if name not in budgets]
            if unknown:
                raise ConfigError(
                    f"{path}: method variant {variant!r} uses {{{unknown[0]}}} but budgets has no {unknown[0]!r} "
                    f"(budgets: {', '.join(budgets) or 'none'}); add `budgets: {{{unknown[0]}: [...]}}` "
                    "or fix the spec."
                )
            for values in itertools.product(*(budgets[name] for name in names)):
                filled = dict(zip(names, values, strict=True))
                label = "_".join([str(variant)] + [f"{k}={v}" for k, v in filled.items()])
                specs = tuple(t.format(**filled) for t in templates)
                _check_name(label, f"run name {label!r} (method variant {variant!r} with budgets {filled})", path)
                expanded.append(SuiteRun(str(task), label, spec["version"], specs, settings))
    return expanded


def _frame_tasks(tasks: Mapping[str, Any], defaults: Mapping[str, Any]):
    """`(name, task, settings)` per task, a task with a list of frame counts once per count."""
    for task, spec in tasks.items():
        settings = _merge(defaults, {k: v for k, v in spec.items() if k != "version"})
        counts = settings.get("num_frames")
        if not isinstance(counts, list):
            yield str(task), spec, settings
            continue
        for count in counts:
            data = str(settings.get("data", ".")).replace("{num_frames}", str(count))
            yield f"{task}_{count}f", spec, {**settings, "num_frames": count, "data": data}


def _read(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        raise ConfigError(f"suite {chain[-1]} includes {path}, which includes it back; remove the cycle.")
    if not path.is_file():
        where = f" (included from {chain[-1]})" if chain else ""
        raise ConfigError(f"suite file {path}{where} does not exist; check the path.")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"suite file {path} is not valid YAML: {error}. Fix the file.") from None
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise ConfigError(
            f"suite file {path} must hold a mapping (keys: {', '.join(TOP_KEYS)}), not {type(content).__name__}."
        )
    includes = content.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for name in includes:
        merged = _merge(merged, _read((path.parent / str(name)).resolve(), (*chain, path)))
    return _merge(merged, content)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check(suite: Mapping[str, Any], path: Path) -> None:
    _keys(suite, TOP_KEYS, f"suite {path}")
    _keys(suite.get("defaults") or {}, RUN_KEYS, f"{path} defaults")
    _keys((suite.get("defaults") or {}).get("decoding") or {}, DECODING_KEYS, f"{path} defaults.decoding")
    tasks = suite.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError(f"suite {path} has no tasks; add `tasks: {{name: {{version: 1, bench: pope, data: ...}}}}`.")
    for name, task in tasks.items():
        _check_name(name, f"task name {name!r}", path)
        if not isinstance(task, Mapping):
            raise ConfigError(f"{path} task {name!r} must be a mapping of settings, not {type(task).__name__}.")
        _keys(task, TASK_KEYS, f"{path} task {name!r}")
        _keys(task.get("decoding") or {}, DECODING_KEYS, f"{path} task {name!r} decoding")
        for key in ("version", "bench"):
            if key not in task:
                raise ConfigError(f"{path} task {name!r} has no {key!r}; every task needs a version and a bench.")
        if not isinstance(task["version"], int):
            raise ConfigError(f"{path} task {name!r}: version {task['version']!r} must be an integer.")
        counts = task.get("num_frames")
        if isinstance(counts, list) and not (counts and all(isinstance(c, int) and c > 0 for c in counts)):
            raise ConfigError(f"{path} task {name!r}: num_frames {counts!r} must be a positive integer or a "
                              "non-empty list of them (e.g. [8, 16, 32]).")
    methods = suite.get("methods") or {}
    if not isinstance(methods, Mapping) or not all(
        isinstance(specs, list) and all(isinstance(s, str) for s in specs) for specs in methods.values()
    ):
        raise ConfigError(
            f"{path} methods must map variant names to lists of spec strings (e.g. fastv: ['fastv:keep={{keep}}'])."
        )
    budgets = suite.get("budgets") or {}
    if not isinstance(budgets, Mapping) or not all(isinstance(v, list) and v for v in budgets.values()):
        raise ConfigError(f"{path} budgets must map placeholder names to non-empty lists (e.g. keep: [0.5, 0.25]).")


def _check_name(name: Any, what: str, path: Path) -> None:
    """Task and run names are folder names under ``--out``: one plain name each."""
    text = str(name)
    if text in ("", ".", "..") or not _NAME.fullmatch(text):
        raise ConfigError(
            f"{path}: {what} cannot be a folder name under --out: names must be one plain name (no '/', '\\', "
            "'.' or '..', no control characters), so that every run stays inside --out. Rename it, e.g. "
            f"{_safe(text)!r}."
        )


def _safe(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^\w.=+,-]|\.{2,}", "_", text)).strip("._") or "task"


def _keys(mapping: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {type(mapping).__name__}.")
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), allowed)} Allowed: {', '.join(allowed)}."
            )
