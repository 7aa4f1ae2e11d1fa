"""Small helpers shared by the scorers and loaders: style checks, division that flags zero denominators, JSON files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DatasetError, did_you_mean


def check_style(style: str, styles: Sequence[str], benchmark: str) -> str:
    """Return ``style`` if it is one of ``styles``, else raise a ConfigError naming the valid ones."""
    if style not in styles:
        raise ConfigError(
            f"{benchmark} style {style!r} is not supported; valid styles: {', '.join(styles)}."
            f"{did_you_mean(str(style), styles)} Pass one of them as style=..."
        )
    return style


def divide(numerator: float, denominator: float, name: str, warnings: list[str]) -> float:
    """``numerator / denominator``, or 0.0 with a message appended to ``warnings`` when it is zero.

    Args:
        numerator: The dividend.
        denominator: The divisor.
        name: The metric being computed, used in the warning.
        warnings: List that collects the warning.

    Returns:
        The quotient as a float (0.0 where the reference scripts would raise ZeroDivisionError).
    """
    if denominator == 0:
        warnings.append(f"{name}: denominator is 0, reported as 0.0 (the reference script would divide by zero)")
        return 0.0
    return numerator / denominator


def read_json(file: Path, benchmark: str, fix: str = "re-download it") -> Any:
    """The parsed JSON ``file``; a DatasetError naming ``benchmark`` and ``fix`` when it is missing or unreadable."""
    if not file.is_file():
        raise DatasetError(f"{benchmark}: {file} does not exist; check the path.")
    try:
        with open(file, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{benchmark}: {file} is not readable JSON ({error}); {fix}.") from None
