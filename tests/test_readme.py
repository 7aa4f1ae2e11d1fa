"""The README's generated blocks match the code (run `make readme` after adding a method)."""
from __future__ import annotations

from pathlib import Path

from vlmkit.commands.methods import families_table, fill_block, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_methods_table_is_current():
    text = README.read_text()
    assert fill_block(text, "methods-table", markdown_table()) == text, "run `make readme`"


def test_families_table_is_current():
    text = README.read_text()
    assert fill_block(text, "families-table", families_table()) == text, "run `make readme`"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
