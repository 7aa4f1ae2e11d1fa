"""The notebooks run top to bottom in a fresh kernel and show what they say they show.

Each notebook is executed once (nbclient, the `python3` kernel), with `SMOKE_TEST=1`: the notebooks
then run on fewer samples (the convention of BoTorch's and Pyro's tutorials). Then its outputs are
checked: no error, an image from every cell that draws a figure, nothing written next to the
notebooks, and per notebook the content of its tables (read back from the HTML that pandas displays,
found by cell tag) and printed lines. Timings in the notebooks are shown, never asserted.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PRUNING = ["fastv", "visionzip", "pool", "random", "divprune"]
DECODING = ["vcd", "icd", "m3id", "ritual", "dola", "lol", "debias"]


def _execute(path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    return notebook


def _outputs(cell) -> list[dict]:
    return cell.get("outputs", [])


def _has_image(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in _outputs(cell))


def _stdout(notebook) -> str:
    return "".join(
        output["text"]
        for cell in notebook.cells
        for output in _outputs(cell)
        if output.get("output_type") == "stream" and output.get("name") == "stdout"
    )


def _cell(notebook, tag: str):
    cells = [cell for cell in notebook.cells if tag in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _table(notebook, tag: str) -> tuple[list[str], list[dict[str, str]]]:
    """The DataFrame a tagged cell displays: (columns, rows), each row {column: text}; the index is column ""."""
    cell = _cell(notebook, tag)
    tables = [output["data"]["text/html"] for output in _outputs(cell) if "text/html" in output.get("data", {})]
    assert tables, f"the cell tagged {tag!r} displays no table"
    head, body = re.search(r"<thead>(.*?)</thead>\s*<tbody>(.*?)</tbody>", tables[-1], re.DOTALL).groups()

    def cells(row: str) -> list[str]:
        texts = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.DOTALL)
        return [html.unescape(re.sub(r"<.*?>", "", text)).strip() for text in texts]

    columns = cells(re.search(r"<tr[^>]*>(.*?)</tr>", head, re.DOTALL).group(1))
    columns[0] = ""
    rows = [dict(zip(columns, cells(row))) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.DOTALL)]
    assert all(len(row) == len(columns) for row in rows)
    return columns, rows


def _numbers(rows: list[dict[str, str]], columns: list[str]) -> list[float]:
    return [float(row[column]) for row in rows for column in columns]


def _check_quickstart(notebook) -> None:
    out = _stdout(notebook)
    assert re.search(r"kept \d+ of \d+ visual tokens", out)
    assert "restored exactly" in out


def _check_budgets(notebook) -> None:
    columns, rows = _table(notebook, "accuracy-table")
    keeps = [c for c in columns if c.startswith("keep ")]
    assert len(keeps) == 3 and [row[""] for row in rows] == PRUNING  # one row per method
    assert all(0 <= value <= 1 for value in _numbers(rows, keeps))
    dense = float(re.search(r"dense: accuracy ([\d.]+) with all 144 visual tokens", _stdout(notebook)).group(1))
    assert 0.75 <= dense <= 1  # the model answers (always "yes" would be 0.5)
    columns, rows = _table(notebook, "latency-table")
    assert [row[""] for row in rows] == PRUNING and [c for c in columns if c] == keeps
    assert all(math.isfinite(value) and value > 0 for value in _numbers(rows, keeps))  # a measurement, not a bar


def _check_hallucination(notebook) -> None:
    _, rows = _table(notebook, "example-captions")
    assert {(row["method"], row["decoding"]) for row in rows} == {
        (method, decoding) for method in ["none", *DECODING] for decoding in ("greedy", "sampling")
    }
    assert all(row["caption"] for row in rows)
    assert any(row["hallucinated"] != "-" for row in rows if row["method"] == "none" and row["decoding"] == "greedy")
    _, rows = _table(notebook, "contrast-table")
    assert [row["method"] for row in rows] == DECODING
    token = r"'[^']+'\*? \d+\.\d\d"  # 'moon'* 0.52: the token, marked when absent, and the probability removed
    assert all(re.fullmatch(rf"{token}(, {token})*", row["pushed down most (p - q over the caption)"]) for row in rows)
    columns, rows = _table(notebook, "moved-table")
    assert [row["method"] for row in rows] == DECODING
    assert all(math.isfinite(value) for value in _numbers(rows, ["absent objects", "present objects"]))
    columns, rows = _table(notebook, "chair-table")
    assert [row[""] for row in rows] == ["none", *DECODING]
    metrics = [c for c in columns if c]
    assert len(metrics) == 6 and all(0 <= value <= 1 for value in _numbers(rows, metrics))


def _check_video(notebook) -> None:
    assert "8 frames x 6 x 6 tokens + 1 newline = 289 video tokens" in _stdout(notebook)
    columns, rows = _table(notebook, "frames-table")
    assert [row[""] for row in rows] == ["dense", *PRUNING]
    assert [c for c in columns if c] == ["2 frames", "4 frames", "8 frames", "16 frames"]
    assert all(0 <= value <= 1 for value in _numbers(rows, columns[1:]))
    columns, rows = _table(notebook, "per-frame-table")
    assert [row[""] for row in rows] == PRUNING and len(columns) == 1 + 8
    for row in rows:  # a quarter of 8 frames x 36 tokens, spread over the frames
        counts = [float(row[c]) for c in columns[1:]]
        assert all(0 <= count <= 36 for count in counts) and abs(sum(counts) - 72) <= 0.5


CHECKS = {
    "quickstart": _check_quickstart,
    "budgets": _check_budgets,
    "hallucination": _check_hallucination,
    "video": _check_video,
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_its_results(path, monkeypatch):
    monkeypatch.setenv("SMOKE_TEST", "1")  # the kernel inherits it
    assert path.stem in CHECKS, f"add a check of {path.name}'s outputs to CHECKS"
    before = sorted(NOTEBOOK_DIR.iterdir())
    notebook = _execute(path)
    errors = [o for cell in notebook.cells for o in _outputs(cell) if o.get("output_type") == "error"]
    assert not errors
    draws = re.compile(r"plt\.(subplots|figure)\(")
    figures = [cell for cell in notebook.cells if cell.cell_type == "code" and draws.search(cell.source)]
    assert figures and all(_has_image(cell) for cell in figures)
    assert sorted(NOTEBOOK_DIR.iterdir()) == before  # the notebooks write under a temporary folder only
    CHECKS[path.stem](notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    assert all(f"notebooks/{path.name}" in readme for path in NOTEBOOKS)
