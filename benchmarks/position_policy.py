"""Positions after pruning: `keep` (original ids) against `reindex` (contiguous), per pruning method.

Reads the runs of `eval/position_policy.yaml` (one folder per model under --runs) and writes a table
per model into the README between its `position-policy` markers: POPE mean accuracy and MME
position and count scores (out of 200) at 25% and 12.5% of the visual tokens, each as keep / reindex.

Usage:
    vlmkit eval --suite eval/position_policy.yaml --model shapes-llava --data data/shapes --out runs/policy/shapes-llava
    vlmkit eval --suite eval/position_policy.yaml --model shapes-llava-deep --data data/shapes --out runs/policy/shapes-llava-deep
    python -m benchmarks.position_policy --runs runs/policy
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.decoding_eval import collect, write_between

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- position-policy:begin (benchmarks/position_policy.py) -->", "<!-- position-policy:end -->"
RUN = re.compile(r"^(?P<method>[a-z0-9]+)_keep=(?P<keep>[0-9.]+)_policy=(?P<policy>keep|reindex)$")


def measures(found: dict[str, dict[str, dict[str, Any]]], name: str) -> tuple[float, float, float] | None:
    """POPE mean accuracy (%), MME position and count scores of one run, or None if unfinished."""
    pope, mme = found.get("pope", {}).get(name), found.get("mme", {}).get(name)
    if pope is None or mme is None:
        return None
    subtasks = mme["scores"]["subtasks"]
    return 100 * pope["scores"]["mean_accuracy"], subtasks["position"]["score"], subtasks["count"]["score"]


def table(model: str, found: dict[str, dict[str, dict[str, Any]]]) -> str:
    dense = measures(found, "baseline")
    cells: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    for name in found.get("pope", {}):
        match = RUN.match(name)
        result = measures(found, name)
        if match and result is not None:
            cells.setdefault((match["method"], match["keep"]), {})[match["policy"]] = result
    lines = [
        f"`{model}`" + ("" if dense is None else f" (dense: POPE {dense[0]:.1f}, MME position {dense[1]:.1f}, count {dense[2]:.1f})") + ":",
        "",
        "| method | kept | POPE mean acc, keep / reindex | MME position, keep / reindex | MME count, keep / reindex |",
        "|---|---|---|---|---|",
    ]
    for (method, keep), by_policy in sorted(cells.items(), key=lambda item: (item[0][0], -float(item[0][1]))):
        if set(by_policy) != {"keep", "reindex"}:
            continue
        kept, renumbered = by_policy["keep"], by_policy["reindex"]
        lines.append(
            f"| {method} | {float(keep):.1%} | {kept[0]:.1f} / {renumbered[0]:.1f} | {kept[1]:.1f} / {renumbered[1]:.1f} | "
            f"{kept[2]:.1f} / {renumbered[2]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/policy"), help="one folder per model, as written by the suite")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    models = sorted(folder for folder in args.runs.iterdir() if folder.is_dir()) if args.runs.is_dir() else []
    if not models:
        print(f"position_policy: no model folders under {args.runs}", file=sys.stderr)
        return 2
    text = "\n".join(table(folder.name, collect(folder)) for folder in models)
    write_between(args.readme, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
