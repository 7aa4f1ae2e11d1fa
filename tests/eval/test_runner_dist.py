"""Scale-out: two CPU processes (torch.distributed launch, as `accelerate launch` does) give one process's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.eval import runner_data
from vlmkit.cli import main

REPO = Path(__file__).resolve().parents[2]


def without_timing(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "timing"} for row in rows]


def test_two_processes_match_one(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=5)  # 10 questions: 5 batches of 2, 3 + 2 per process
    args = ["eval", "--model", "tiny:llava", "--bench", "pope", "--data", str(data), "--batch-size", "2"]
    args += ["--max-new-tokens", "4", "--method", "fastv:layer=2,keep=0.5", "--no-progress"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlmkit"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == [
        "shard-00000-of-00002.jsonl",
        "shard-00001-of-00002.jsonl",
    ]
    assert without_timing(tmp_path / "two") == without_timing(tmp_path / "one")
    two, one = (json.loads((tmp_path / name / "scores.json").read_text()) for name in ("two", "one"))
    assert two["metrics"] == one["metrics"] and two["config"]["data"] == one["config"]["data"]
    assert two["runtime"]["num_processes"] == 2 and one["runtime"]["num_processes"] == 1
    assert done.stdout.decode().count("pope on tiny:llava") == 1  # only process 0 scores and prints
