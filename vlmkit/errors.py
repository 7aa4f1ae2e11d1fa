"""One error hierarchy for vlmkit, mixed with builtins so callers can catch either.

Every message says what was given, what is allowed, and how to fix it.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlmkitError(Exception):
    """Root of every error vlmkit raises on purpose."""


class ConfigError(VlmkitError, ValueError):
    """A bad parameter value or combination."""


class UnknownMethodError(VlmkitError, KeyError):
    """A method (or parameter) name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(VlmkitError, TypeError):
    """A model class no adapter knows."""


class ConflictError(VlmkitError, RuntimeError):
    """Two methods claim one site incompatibly, or a method is applied twice."""


class InputError(VlmkitError, ValueError):
    """Inputs that cannot be processed: image/placeholder count mismatch, corrupt media."""


class DatasetError(VlmkitError, FileNotFoundError):
    """Benchmark files missing or malformed."""


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix (empty when nothing is close) for error messages."""
    close = difflib.get_close_matches(given, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def missing_extra(package: str, extra: str) -> ImportError:
    """The ImportError raised when an optional dependency is absent."""
    return ImportError(f"{package} is required for this feature: pip install 'vlmkit[{extra}]'")
