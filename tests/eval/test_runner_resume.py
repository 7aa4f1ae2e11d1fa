"""Resuming: a run killed with SIGKILL loses nothing and repeats nothing; a different config is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.eval import runner_data
from vlmkit.cli import main
from vlmkit.errors import ConfigError, DatasetError
from vlmkit.eval import records, runner

REPO = Path(__file__).resolve().parents[2]


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "tiny:llava", "--bench", "pope", "--data", str(data), "--out", str(out), *extra]


def test_killed_run_resumes_without_loss_or_repeats(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=8)  # 16 questions
    args = command(data, tmp_path / "run", "--batch-size", "1", "--max-new-tokens", "8", "--no-progress")
    shard = records.shard_path(tmp_path / "run", 0, 1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vlmkit", *args], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, stderr
    finished = shard.read_text().count("\n")
    assert 2 <= finished < 16 and not (tmp_path / "run" / "samples.jsonl").exists()
    with open(shard, "a") as file:  # what a kill in the middle of a write leaves
        file.write('{"sample_id": "random/7", "resp')

    assert main(args) == 0
    lines = [json.loads(line) for line in shard.read_text().splitlines()]
    ids = [row["sample_id"] for row in lines]
    assert len(ids) == len(set(ids)) == 16  # nothing twice, nothing lost
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(16))

    assert main(command(data, tmp_path / "reference", "--batch-size", "1", "--max-new-tokens", "8")) == 0
    reference = [json.loads(line) for line in (tmp_path / "reference" / "samples.jsonl").read_text().splitlines()]
    assert [(r["sample_id"], r["response"]) for r in rows] == [(r["sample_id"], r["response"]) for r in reference]

    assert main(args) == 0  # a finished run: nothing reruns
    assert shard.read_text().count("\n") == 16


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    data = runner_data.write_pope(tmp_path / "pope", images=1)
    out = tmp_path / "run"
    assert main(command(data, out, "--limit", "1", "--max-new-tokens", "2", "--no-progress")) == 0
    recorded = (out / "config.json").read_text()
    capsys.readouterr()

    assert main(command(data, out, "--limit", "1", "--max-new-tokens", "3", "--method", "fastv:keep=0.5")) == 2
    message = capsys.readouterr().err
    assert f"cannot resume into {out}" in message
    assert "decoding.max_new_tokens: 2 (recorded) vs 3 (now)" in message
    assert "methods: [] (recorded) vs [" in message
    assert "pass a new --out directory" in message
    assert (out / "config.json").read_text() == recorded

    spec = runner.RunSpec(
        "tiny:llava",
        "pope",
        runner.DataOptions(str(data)),
        str(out),
        decoding=runner.Decoding(max_new_tokens=2),
        seed=1,
    )
    with pytest.raises(ConfigError, match=r"seed: 0 \(recorded\) vs 1 \(now\)"):
        runner.run(spec)


def test_config_differences_ignore_locations_only():
    recorded = {
        "model": {"path": "/a", "weights_sha256": "x"},
        "data": {"paths": {"data": "/a"}, "hash": "h"},
        "seed": 0,
    }
    moved = {"model": {"path": "/b", "weights_sha256": "x"}, "data": {"paths": {"data": "/b"}, "hash": "h"}, "seed": 0}
    assert records.config_differences(recorded, moved) == []
    changed = {**moved, "model": {"path": "/b", "weights_sha256": "y"}, "limit": 3}
    assert records.config_differences(recorded, changed) == [
        "limit: (absent) (recorded) vs 3 (now)",
        "model.weights_sha256: 'x' (recorded) vs 'y' (now)",
    ]


def test_shard_files_survive_torn_writes(tmp_path):
    path = tmp_path / "shards" / "shard-00000-of-00001.jsonl"
    writer = records.ShardWriter(path)
    writer.write([{"sample_id": "a"}, {"sample_id": "b"}])
    writer.close()
    with open(path, "a") as file:
        file.write('{"sample_id": "c", "x')
    assert [row["sample_id"] for row in records.read_rows(path)] == ["a", "b"]
    writer = records.ShardWriter(path)  # cuts the torn line before appending
    writer.write([{"sample_id": "c"}])
    writer.close()
    assert path.read_text() == '{"sample_id": "a"}\n{"sample_id": "b"}\n{"sample_id": "c"}\n'
    assert records.finished_ids(tmp_path) == {"a", "b", "c"}

    with pytest.raises(DatasetError, match="no result yet for 1 of 4 samples"):
        records.merge_shards(tmp_path, ["a", "b", "c", "d"])
    assert [row["sample_id"] for row in records.merge_shards(tmp_path, ["c", "a", "b"])] == ["c", "a", "b"]

    path.write_text('{"sample_id": "a"}\nnot json\n{"sample_id": "b"}\n')
    with pytest.raises(DatasetError, match=r"shard-00000-of-00001.jsonl:2 is not a JSON line"):
        list(records.read_rows(path))
