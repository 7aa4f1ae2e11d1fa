"""Smoke test: ``benchmarks/kernels.py --quick`` runs on the CPU and writes its JSON."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_benchmark_quick_runs(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up
    spec.loader.exec_module(benchmark)
    out = tmp_path / "kernels.json"
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--quick", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "| attention_rows | quick |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["ceilings"]["copy_GBps"] > 0 and data["ceilings"]["matmul_GFLOPs"] > 0
    assert [case["op"] for case in data["cases"]] == ["attention_rows", "attention_colsum", "merge_tokens", "greedy_maxmin"]
    for case in data["cases"]:
        assert case["paths"]["triton"] == {"status": "pending (needs a GPU)"}
        for name, path in case["paths"].items():
            if "median_ms" in path:
                assert path["median_ms"] > 0 and path["relative_error_vs_torch"] < 1e-5, (case["op"], name)
