"""The benchmarks ``vlmkit eval --bench NAME`` runs: one module each, registered by name.

Each module under ``vlmkit/eval/benchmarks/`` is one benchmark: its reference-exact scorer, its
loader for the official file layout, its default prompts, and one
:class:`~vlmkit.eval.benchmarks.base.Benchmark` object named ``BENCHMARK`` that holds them with
the answer-parser styles, the generation length and the primary metric. The module's file name is
the benchmark's name, so adding a benchmark is adding one file. Other packages add benchmarks
through the entry-point group ``vlmkit.benchmarks`` (``name = "package.module:BENCHMARK"``), and
:func:`register` adds one at run time. Listing names imports nothing; :func:`get` imports the one
module asked for.

Built in:

* :mod:`~vlmkit.eval.benchmarks.pope`: POPE (RUCAIBox/POPE question files or lmms-eval parquet),
  four answer parsers;
* :mod:`~vlmkit.eval.benchmarks.chair`: CHAIR captioning on COCO (OPERA's ``chair.py``);
* :mod:`~vlmkit.eval.benchmarks.mme`: MME (the official ``calculation.py``);
* :mod:`~vlmkit.eval.benchmarks.video`: MVBench, Video-MME and EgoSchema multiple choice;
* :mod:`~vlmkit.eval.benchmarks.multi`: the shapes world's multi-image needle test (accuracy
  against the number of images in one prompt).

Example:
    >>> from vlmkit.eval import benchmarks
    >>> benchmarks.names()[:4]
    ['chair', 'mme', 'multi', 'pope']
    >>> benchmarks.get("chair").primary
    'CHAIRs'
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from typing import TYPE_CHECKING

from vlmkit.errors import ConfigError, ConflictError, did_you_mean

if TYPE_CHECKING:
    from vlmkit.eval.benchmarks.base import Benchmark

ENTRY_POINT_GROUP = "vlmkit.benchmarks"
_NOT_BENCHMARKS = ("base",)
_registered: dict[str, Benchmark] = {}
_origins: dict[str, str] = {}


def _builtin() -> list[str]:
    return [
        module.name
        for module in pkgutil.iter_modules(__path__)
        if not module.name.startswith("_") and module.name not in _NOT_BENCHMARKS
    ]


def _plugins() -> dict[str, metadata.EntryPoint]:
    return {entry.name: entry for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Every benchmark name (built-in, plugin and registered), sorted; imports no benchmark."""
    return sorted(set(_builtin()) | set(_plugins()) | set(_registered))


def get(name: str) -> Benchmark:
    """The benchmark registered as ``name``, importing its module on first use.

    Raises:
        ConfigError: No benchmark has that name (the message lists them).
        ImportError: A plugin's benchmark failed to load (the message names the entry point).
    """
    if name in _registered:
        return _registered[name]
    if name in _builtin():
        register(importlib.import_module(f"{__name__}.{name}").BENCHMARK, origin="builtin")
        return _registered[name]
    entry = _plugins().get(name)
    if entry is None:
        known = names()
        raise ConfigError(
            f"--bench {name!r} is not a benchmark; choose one of {', '.join(known)}.{did_you_mean(str(name), known)}"
        )
    try:
        benchmark = entry.load()
    except Exception as error:  # a plugin that fails to load is an error naming it
        raise ImportError(f"benchmark {name!r} (entry point {entry.value!r}) failed to load: {error}") from error
    if getattr(benchmark, "name", None) != name:
        raise ConfigError(
            f"entry point {name!r} ({entry.value}) gives {benchmark!r}, not a benchmark named {name!r}; use one name."
        )
    return register(benchmark, origin=f"plugin {entry.dist.name if entry.dist else entry.value}")


def register(benchmark: Benchmark, *, origin: str = "registered") -> Benchmark:
    """Register ``benchmark`` under its name; another benchmark under a taken name is an error.

    Raises:
        TypeError: ``benchmark`` is not a :class:`~vlmkit.eval.benchmarks.base.Benchmark`.
        ConflictError: The name is taken by another benchmark.
    """
    from vlmkit.eval.benchmarks.base import Benchmark

    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"{benchmark!r} must be a vlmkit.eval.benchmarks.base.Benchmark to be registered.")
    existing = _registered.get(benchmark.name)
    if origin != "builtin" and existing is None and benchmark.name in _builtin():
        existing = get(benchmark.name)
    if existing is not None and existing is not benchmark:
        raise ConflictError(
            f"benchmark {benchmark.name!r} is already registered ({_origins[benchmark.name]}); choose another name."
        )
    _registered[benchmark.name] = benchmark
    _origins.setdefault(benchmark.name, origin)
    return benchmark


def origin(name: str) -> str:
    """Where a benchmark comes from: ``"builtin"``, ``"plugin <distribution>"`` or ``"registered"``."""
    get(name)
    return _origins[name]
