"""Small helpers shared by the scorers: style checks and division that flags zero denominators."""

from __future__ import annotations

from collections.abc import Sequence

from vlmkit.errors import ConfigError, did_you_mean


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
