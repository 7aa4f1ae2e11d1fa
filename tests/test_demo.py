"""`vlmkit demo` (what `make demo` runs) produces its table; a rerun resumes the finished runs."""
from __future__ import annotations

from vlmkit.cli import main


def test_demo_prints_the_table_and_resumes(tmp_path, capsys):
    argv = ["demo", "--model", "tiny:llava", "--images", "3", "--limit", "4", "--method", "pool:keep=0.25",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    table = capsys.readouterr().out.split("model: tiny:llava")[-1]
    assert "| dense | 144 of 144 |" in table and "| pool:keep=0.25 | 36 of 144 |" in table
    assert main(argv) == 0  # finished runs are reused, not recomputed
    assert "| pool:keep=0.25 | 36 of 144 |" in capsys.readouterr().out
