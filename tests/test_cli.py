"""The `vlmkit` command itself: it starts without torch, lists methods with their parameters, applies
`--threads` before any work, and loads models for `vlmkit train evaluate` from local safetensors only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval import runner_data
from vlmkit.cli import main
from vlmkit.commands import methods, threads

REPO = Path(__file__).resolve().parents[1]

IMPORTS = """
import sys
from vlmkit.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("heavy:", sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["methods", "fastv"], ["eval", "--help"], ["demo", "--help"]])
def test_help_and_methods_import_no_torch(argv):
    done = subprocess.run([sys.executable, "-c", IMPORTS, *argv], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.splitlines()[-1] == "heavy: []", (
        f"{done.stdout[-300:]}\n(a method missing from vlmkit/commands/methods_manifest.py is imported to be listed: "
        "run `make readme`)"
    )


def test_methods_lists_every_method_with_its_parameters(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    fastv = listing.split("fastv ", 1)[1].split("\nicd ", 1)[0]
    assert "  keep=None (float | None)\n" in fastv and "  layer=2 (int)" in fastv
    assert main(["methods", "fastv"]) == 0
    assert "  layer=2 (int): K: the decoder layer" in capsys.readouterr().out


def test_the_shipped_method_manifest_is_current():
    assert methods.MANIFEST.read_text() == methods.manifest_source(), "run `make readme`"


def test_threads_default_is_this_process_share(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default() == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun sets OMP_NUM_THREADS=1 for every process; the share wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.default() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert threads.default() == 1


def test_threads_apply_before_the_first_op_and_are_recorded(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=1)
    out = tmp_path / "run"
    args = ["eval", "--model", "tiny:llava", "--bench", "pope", "--data", str(data), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "vlmkit", *args, "--max-new-tokens", "2", "--no-progress", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    scores = json.loads((out / "scores.json").read_text())
    assert scores["runtime"]["threads"] == 1 and scores["summary"]["timing"]["threads"] == 1
    assert all(json.loads(line)["timing"]["threads"] == 1 for line in (out / "samples.jsonl").read_text().splitlines())
    assert "timing with             1 thread\n" in done.stdout


def test_demo_applies_threads_and_says_so(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        argv = ["demo", "--model", "tiny:llava", "--images", "3", "--limit", "1", "--method", "pool:keep=0.5"]
        assert main([*argv, "--out", str(tmp_path), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "| s / 100 questions (1 thread) |" in capsys.readouterr().out
    assert main(["demo", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads 0 must be >= 1" in capsys.readouterr().err


def test_train_evaluate_loads_local_safetensors_only(tmp_path, capsys):
    folder = runner_data.save_tiny_llava(tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert main(["train", "evaluate", "--model", str(folder), "--bench", "pope", "--n", "1"]) == 2
    assert "has no .safetensors weights; vlmkit loads safetensors only" in capsys.readouterr().err
    assert main(["train", "evaluate", "--model", "llava-hf/llava-1.5-7b-hf", "--bench", "pope", "--n", "1"]) == 2
    assert "is neither a shipped checkpoint nor a folder with a config.json" in capsys.readouterr().err
