"""The examples in the eval modules' docstrings run and hold."""

from __future__ import annotations

import doctest

import pytest

from vlmkit.eval import benchmarks
from vlmkit.eval.benchmarks import base, chair, mme, pope, video


@pytest.mark.parametrize("module", [pope, mme, video, chair, base, benchmarks], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
