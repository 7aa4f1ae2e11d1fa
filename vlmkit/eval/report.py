"""``vlmkit report``: compare scored runs in a markdown table and accuracy-vs-cost plots.

Reads each run's ``scores.json`` (written by ``vlmkit eval`` or ``vlmkit score``) and writes into
the output folder:

* ``report.md``: one table per benchmark, a row per run: its headline metrics, the visual tokens
  that reach the end of the prefill (mean per sample, and as a share of the input), prefill
  milliseconds per sample, decode tokens per second, the CPU threads those times were taken with,
  samples and errors; then the plots.
* ``<bench>_accuracy_vs_tokens.png``: the benchmark's primary metric
  (its ``primary``, :mod:`vlmkit.eval.benchmarks`) against visual tokens kept, one line per method set.
* ``<bench>_accuracy_vs_latency.png``: the same metric against prefill milliseconds per sample.

Plots use matplotlib's object API (no pyplot, no global backend change).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DatasetError, missing_extra
from vlmkit.eval import benchmarks, records


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, scores)`` per run directory; labels are paths relative to the runs' common parent.

    Raises:
        ConfigError: No run given.
        DatasetError: A directory is no run, or has no ``scores.json`` yet (the message says how to get one).
    """
    if not run_dirs:
        raise ConfigError("vlmkit report needs at least one RUN_DIR (a folder written by `vlmkit eval`).")
    paths = [Path(run_dir).expanduser().resolve() for run_dir in run_dirs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    runs = []
    for path in paths:
        if (path / records.CONFIG).is_file() and not (path / records.SCORES).is_file():
            raise DatasetError(
                f"{path} has no scores.json yet; finish the run (rerun `vlmkit eval`) or `vlmkit score {path}`."
            )
        scores = records.read_json(path / records.SCORES, "scores file")
        runs.append((str(path.relative_to(common)) if path != common else path.name, scores))
    return runs


def method_label(methods: Sequence[Mapping[str, Any]]) -> str:
    """``"fastv(keep=0.25) + visionzip(tokens=64)"``: each method with its non-default parameters."""
    import vlmkit

    defaults = {info.name: {p.name: p.default for p in info.params} for info in vlmkit.list_methods()}
    parts = []
    for method in methods:
        known = defaults.get(method["name"], {})
        changed = [
            f"{key}={value}"
            for key, value in method["params"].items()
            if (known[key] != value if key in known else value is not None)
        ]
        parts.append(f"{method['name']}({', '.join(changed)})" if changed else method["name"])
    return " + ".join(parts) or "none"


def table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Markdown tables, one per benchmark, comparing the runs (see the module docstring)."""
    sections = []
    for bench in _benches(runs):
        rows = [(label, scores) for label, scores in runs if scores["config"]["bench"] == bench]
        metrics = list(dict.fromkeys(name for _, scores in rows for name in scores["metrics"]))
        header = [
            "run",
            "model",
            "methods",
            *metrics,
            "visual tokens kept",
            "kept %",
            "prefill ms/sample",
            "decode tok/s",
            "threads",
            "samples (errors)",
        ]
        lines = [f"### {bench}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, scores in rows:
            summary = scores["summary"]
            tokens, timing = summary.get("visual_tokens") or {}, summary.get("timing") or {}
            cells = [
                label,
                scores["config"]["model"]["spec"],
                method_label(scores["config"]["methods"]),
                *(_number(scores["metrics"].get(name), 4) for name in metrics),
                _number(tokens.get("kept_final_mean"), 1),
                _number(100 * tokens["kept_ratio"] if tokens.get("kept_ratio") is not None else None, 1),
                _number(1000 * timing["prefill_s_per_sample"] if "prefill_s_per_sample" in timing else None, 2),
                _number(timing.get("decode_tokens_per_s"), 1),
                "–" if timing.get("threads") is None else str(timing["threads"]),
                f"{summary['samples']} ({summary['errors']})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def plots(runs: Sequence[tuple[str, Mapping[str, Any]]], out: Path) -> list[Path]:
    """Write the two plots per benchmark into ``out``; returns their paths.

    Raises:
        ImportError: matplotlib is missing (``pip install 'vlmkit[eval]'``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise missing_extra("matplotlib", "eval") from None
    written = []
    for bench in _benches(runs):
        benchmark = benchmarks.get(bench)
        metric = benchmark.primary
        points: dict[str, list[tuple[float, float, float]]] = {}
        for _, scores in runs:
            summary = scores["summary"]
            if scores["config"]["bench"] != bench or metric not in scores["metrics"] or "timing" not in summary:
                continue
            series = " + ".join(m["name"] for m in scores["config"]["methods"]) or "none"
            points.setdefault(series, []).append(
                (
                    summary["visual_tokens"]["kept_final_mean"],
                    1000 * summary["timing"]["prefill_s_per_sample"],
                    scores["metrics"][metric],
                )
            )
        ylabel = benchmark.metric_title.format(metric) + ("" if benchmark.higher_is_better else " (lower is better)")
        for axis, xlabel, name in (
            (0, "visual tokens kept (mean per sample)", "tokens"),
            (1, "prefill ms per sample", "latency"),
        ):
            figure = Figure(figsize=(5.5, 4), layout="constrained")
            ax = figure.subplots()
            for series, values in sorted(points.items()):
                values = sorted(values, key=lambda v: v[axis])
                ax.plot([v[axis] for v in values], [v[2] for v in values], marker="o", label=series)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{bench}: {metric} vs {name}")
            ax.grid(alpha=0.3)
            if points:
                ax.legend(title="methods", fontsize="small")
            path = out / f"{bench}_accuracy_vs_{name}.png"
            figure.savefig(path, dpi=120)
            written.append(path)
    return written


def write(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write ``report.md`` and the plots for ``run_dirs`` into ``out``; print the tables.

    Args:
        run_dirs: Scored run directories.
        out: Output folder (created).

    Returns:
        The path of ``report.md``.
    """
    runs = load_runs(run_dirs)
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    images = plots(runs, folder)
    body = ["# vlmkit eval report", "", text, ""] + [f"![{image.stem}]({image.name})" for image in images]
    records.write_text_atomic(folder / "report.md", "\n".join(body) + "\n")
    print(text)
    return folder / "report.md"


def _benches(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    return list(dict.fromkeys(scores["config"]["bench"] for _, scores in runs))


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
