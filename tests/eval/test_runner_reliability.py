"""What a user hits: failures before the first forward pass, a locked run directory, OS errors as one line,
changed data named by file and redone with --rerun-errors, and --limit per split."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval import runner_data
from vlmkit.cli import main
from vlmkit.errors import ConfigError, ConflictError, DatasetError
from vlmkit.eval import records, runner
from vlmkit.eval.benchmarks import chair

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def command(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["eval", "--model", "tiny:llava", "--bench", "pope", "--data", str(data), "--out", str(out)]
    return [*args, "--max-new-tokens", "2", "--batch-size", "2", "--no-progress", *extra]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the check that should have failed")


# ---------------------------------------------------------------- before the first forward pass


def test_chair_without_nltk_data_fails_before_any_caption(tmp_path, monkeypatch):
    import nltk

    data = runner_data.write_chair(tmp_path / "chair")
    monkeypatch.setattr(chair, "_nltk_checked", False)
    monkeypatch.setattr(chair, "PACKAGED_NLTK_DATA", tmp_path / "not-installed")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(runner, "load_model", no_model)
    spec = runner.RunSpec("tiny:llava", "chair", runner.DataOptions(str(data), num_images=2), str(tmp_path / "run"))
    with pytest.raises(DatasetError, match=r"CHAIR needs NLTK data that was not found: punkt_tab"):
        runner.run(spec)
    assert not (tmp_path / "run").exists()


def test_chair_with_an_unreadable_synonym_table_fails_before_any_caption(tmp_path, monkeypatch):
    data = runner_data.write_chair(tmp_path / "chair")
    monkeypatch.setattr(runner, "load_model", no_model)
    options = runner.DataOptions(str(data), num_images=2, synonyms=str(tmp_path / "missing.txt"))
    with pytest.raises(DatasetError, match=r"CHAIR synonyms file .*missing\.txt cannot be read"):
        runner.run(runner.RunSpec("tiny:llava", "chair", options, str(tmp_path / "run")))


def test_demo_rejects_a_bad_method_before_the_dense_run(tmp_path, capsys):
    argv = ["demo", "--model", "tiny:llava", "--images", "1", "--method", "pool:keep=0.5", "--method", "fastv:keep=2"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "keep=2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither questions written nor any run started


# ---------------------------------------------------------------- the run directory


HOLD = """
import sys
from pathlib import Path
from vlmkit.eval import records
with records.lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_process_on_one_run_directory_stops_at_once(tmp_path, capsys):
    data = runner_data.write_pope(tmp_path / "pope", images=1)
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(command(data, out)) == 2
        assert f"{out} is in use by another vlmkit process (pid {holder.pid})" in capsys.readouterr().err
        assert not (out / "config.json").exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert main(command(data, out)) == 0  # released when the holder ends
    with records.lock(out):
        with pytest.raises(ConflictError, match=f"pid {os.getpid()}"):
            with records.lock(out):
                pass
        assert main(["score", str(out)]) == 2
        assert "is in use by another vlmkit process" in capsys.readouterr().err


def _drop_permission_override() -> list[str]:
    """A prefix that runs a command without root's power to write into read-only folders (none when not root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root writes into read-only folders")
    drop = "-dac_override,-fowner"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]


def test_a_read_only_folder_is_one_line_naming_it(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=1)
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        done = subprocess.run(
            [*_drop_permission_override(), sys.executable, "-m", "vlmkit", *command(data, folder / "run")],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith(f"vlmkit eval: error: Permission denied: {folder / 'run'}")
    assert "rerun the same command" in lines[0]


def test_a_full_disk_is_one_line_and_the_rerun_loses_nothing(tmp_path, monkeypatch, capsys):
    data = runner_data.write_pope(tmp_path / "pope", images=4)  # 8 questions, 4 batches of 2
    out = tmp_path / "run"
    shard = records.shard_path(out, 0, 1)
    fsync, calls = os.fsync, []

    def full_disk(handle):  # the third batch's fsync finds the disk full
        if os.readlink(f"/proc/self/fd/{handle}") == str(shard):
            calls.append(handle)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        fsync(handle)

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(command(data, out)) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"vlmkit eval: error: No space left on device: {shard}. ") and "\n" not in message

    monkeypatch.setattr(os, "fsync", fsync)  # space freed
    assert main(command(data, out)) == 0
    ids = [json.loads(line)["sample_id"] for line in shard.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 8  # what was written stays; the rest ran once


# ---------------------------------------------------------------- changed data and error rows


def test_fixed_image_is_named_and_rerun_errors_redoes_only_its_rows(tmp_path, capsys):
    data = runner_data.write_pope(tmp_path / "pope", images=2, corrupt=True)
    out = tmp_path / "run"
    assert main(command(data, out)) == 0
    assert [row["sample_id"] for row in rows_of(out) if row["error"]] == ["random/99"]
    shard = records.shard_path(out, 0, 1)
    written = shard.read_text()
    before = json.loads((out / "config.json").read_text())["data"]["files"]["images/broken.jpg"]

    runner_data.image(7).save(data / "images" / "broken.jpg", format="JPEG")  # the fix
    assert main(command(data, out)) == 2
    message = capsys.readouterr().err
    assert "data.hash:" in message and "Files whose content changed since the run started: images/broken.jpg" in message
    assert "rerun with --rerun-errors" in message

    assert main(command(data, out, "--rerun-errors")) == 0
    rows = rows_of(out)
    assert all(row["error"] is None for row in rows) and len(rows) == 5
    assert shard.read_text().startswith(written) and shard.read_text().count("\n") == written.count("\n") + 1
    assert json.loads((out / "config.json").read_text())["data"]["files"]["images/broken.jpg"] != before
    assert main(command(data, out)) == 0  # the new hashes are recorded: a plain rerun resumes

    runner_data.image(9).save(data / "images" / "COCO_val2014_000000000000.jpg")  # read by samples that succeeded
    assert main(command(data, out, "--rerun-errors")) == 2
    message = capsys.readouterr().err
    assert "images/COCO_val2014_000000000000.jpg changed since the run started" in message
    assert "2 sample(s) read them without an error (adversarial/1, random/1)" in message


def test_an_old_run_without_file_hashes_says_so(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=1)
    out = tmp_path / "run"
    assert main(command(data, out)) == 0
    config = json.loads((out / "config.json").read_text())
    del config["data"]["files"]  # as a run written before per-file hashes
    (out / "config.json").write_text(json.dumps(config))
    assert main(command(data, out)) == 0  # resumes: the file hashes are not part of the check
    runner_data.image(5).save(data / "images" / "COCO_val2014_000000000000.jpg")
    spec = runner.RunSpec(
        "tiny:llava", "pope", runner.DataOptions(str(data)), str(out), decoding=runner.Decoding(max_new_tokens=2)
    )
    with pytest.raises(ConfigError, match=r"predates per-file hashes, so the changed files cannot be named"):
        runner.run(spec)


# ---------------------------------------------------------------- --limit


def test_limit_takes_the_first_samples_of_each_split(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=3)
    assert main(command(data, tmp_path / "run", "--limit", "2")) == 0
    assert [row["sample_id"] for row in rows_of(tmp_path / "run")] == [
        "adversarial/1",
        "adversarial/2",
        "random/1",
        "random/2",
    ]
