"""YAML suites: includes, method x budget grids, errors that name the file, and a suite run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import vlmkit
from tests.eval import runner_data
from vlmkit.cli import main
from vlmkit.errors import ConfigError
from vlmkit.eval import benchmarks, suite

REPO = Path(__file__).resolve().parents[2]
BASE = "version: 1\ndefaults:\n  decoding: {strategy: greedy, max_new_tokens: 8}\n  batch_size: 4\n  seed: 0\n"
GRID = """
include: base.yaml
version: 2
tasks:
  pope: {version: 3, bench: pope, data: pope, limit: 2, decoding: {max_new_tokens: 2}}
methods:
  baseline: []
  fastv: ["fastv:layer=2,keep={keep}"]
budgets:
  keep: [0.5, 0.25]
"""


def write(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


def test_includes_merge_and_grids_expand(tmp_path):
    folder = write(tmp_path, base=BASE, grid=GRID)
    loaded = suite.load(folder / "grid.yaml")
    assert loaded["version"] == 2 and "include" not in loaded
    runs = suite.runs(loaded, folder / "grid.yaml")
    assert [(r.task, r.name, r.version, r.methods) for r in runs] == [
        ("pope", "baseline", 3, ()),
        ("pope", "fastv_keep=0.5", 3, ("fastv:layer=2,keep=0.5",)),
        ("pope", "fastv_keep=0.25", 3, ("fastv:layer=2,keep=0.25",)),
    ]
    # defaults < task: the task's max_new_tokens wins, the base's strategy stays
    assert runs[0].settings["decoding"] == {"strategy": "greedy", "max_new_tokens": 2}
    assert runs[0].settings["batch_size"] == 4 and runs[0].settings["limit"] == 2


def test_a_list_of_frame_counts_is_a_sweep_axis(tmp_path):
    folder = write(tmp_path, base=BASE, frames="""
include: base.yaml
version: 1
tasks:
  clips: {version: 2, bench: video, data: "video{num_frames}", num_frames: [16, 32]}
methods:
  baseline: []
  evs: ["evs:pruning_rate={drop}"]
budgets:
  drop: [0.5]
""")
    runs = suite.runs(suite.load(folder / "frames.yaml"), folder / "frames.yaml")
    assert [(r.task, r.name, r.settings["num_frames"], r.settings["data"]) for r in runs] == [
        ("clips_16f", "baseline", 16, "video16"), ("clips_16f", "evs_drop=0.5", 16, "video16"),
        ("clips_32f", "baseline", 32, "video32"), ("clips_32f", "evs_drop=0.5", 32, "video32"),
    ]
    write(tmp_path, bad="tasks: {clips: {version: 1, bench: video, num_frames: [16, 0]}}")
    with pytest.raises(ConfigError, match=r"num_frames \[16, 0\] must be a positive integer or a non-empty list"):
        suite.load(tmp_path / "bad.yaml")


def test_shipped_suites_are_valid():
    files = sorted((REPO / "eval").glob("*.yaml"))
    assert "base.yaml" in [f.name for f in files] and len(files) >= 3
    for path in files:
        if "tasks" not in (yaml.safe_load(path.read_text()) or {}):
            continue  # an include-only file such as base.yaml
        runs = suite.runs(suite.load(path), path)
        assert runs[0].name == "baseline" and len(runs) > 1
        for run in runs:
            assert run.settings["bench"] in benchmarks.names() and isinstance(run.version, int)
            assert run.settings["decoding"]["strategy"] in ("greedy", "sample")
            for spec in run.methods:
                vlmkit.parse_spec(spec)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks: [unclosed", r"bad\.yaml is not valid YAML"),
        ("- a list", r"bad\.yaml must hold a mapping"),
        ("taks: {}", r"unknown key 'taks'\. Did you mean 'tasks'\?"),
        ("tasks: {pope: {bench: pope}}", r"task 'pope' has no 'version'"),
        ("tasks: {pope: {version: 1, bench: pope, batch: 2}}", r"task 'pope': unknown key 'batch'"),
        ("include: missing.yaml", r"missing\.yaml \(included from .*bad\.yaml\) does not exist"),
        ("include: bad.yaml", r"includes .*bad\.yaml, which includes it back"),
        # task names become folders under --out: nothing that leaves it
        ("tasks: {'../../x': {version: 1, bench: pope}}", r"task name '\.\./\.\./x' cannot be a folder name under"),
        ("tasks: {/tmp/x: {version: 1, bench: pope}}", r"task name '/tmp/x' cannot be a folder name"),
        ("tasks: {'..': {version: 1, bench: pope}}", r"task name '\.\.' cannot be a folder name"),
        ("tasks: {'': {version: 1, bench: pope}}", r"task name '' cannot be a folder name"),
    ],
)
def test_bad_suites_are_errors_naming_the_file(tmp_path, text, message):
    write(tmp_path, bad=text)
    with pytest.raises(ConfigError, match=message):
        suite.load(tmp_path / "bad.yaml")


def test_run_names_cannot_leave_the_output_folder(tmp_path):
    text = "tasks: {pope: {version: 1, bench: pope}}\nmethods: {'../up': []}\n"
    budget = GRID.replace("[0.5, 0.25]", "['0.5/../../../x']").replace("include: base.yaml", "")
    write(tmp_path, variant=text, budget=budget)
    with pytest.raises(ConfigError, match=r"run name '\.\./up' \(method variant '\.\./up'"):
        suite.runs(suite.load(tmp_path / "variant.yaml"), tmp_path / "variant.yaml")
    with pytest.raises(ConfigError, match=r"run name 'fastv_keep=0.5/\.\./\.\./\.\./x'.*e\.g\. 'fastv_keep=0.5_x'"):
        suite.runs(suite.load(tmp_path / "budget.yaml"), tmp_path / "budget.yaml")


def test_placeholder_without_budget_is_an_error(tmp_path):
    write(tmp_path, grid="tasks: {pope: {version: 1, bench: pope}}\nmethods: {fastv: ['fastv:keep={ratio}']}\n")
    loaded = suite.load(tmp_path / "grid.yaml")
    with pytest.raises(ConfigError, match=r"uses \{ratio\} but budgets has no 'ratio'"):
        suite.runs(loaded, tmp_path / "grid.yaml")


def test_suite_runs_every_variant_and_reports(tmp_path, capsys):
    runner_data.write_pope(tmp_path / "data" / "pope", images=2)
    write(tmp_path / "suites", base=BASE, grid=GRID.replace("[0.5, 0.25]", "[0.5]"))
    out = tmp_path / "out"
    args = ["eval", "--suite", str(tmp_path / "suites" / "grid.yaml"), "--model", "tiny:llava"]
    args += ["--data", str(tmp_path / "data"), "--out", str(out), "--seed", "5", "--no-progress"]
    assert main(args) == 0
    for name, methods in (("baseline", []), ("fastv_keep=0.5", ["fastv"])):
        config = json.loads((out / "pope" / name / "config.json").read_text())
        assert config["suite"] == {"task": "pope", "version": 3, "run": name}
        assert [m["name"] for m in config["methods"]] == methods
        assert config["seed"] == 5 and config["limit"] == 2 and config["batch_size"] == 4  # command line > task > base
        assert config["decoding"]["max_new_tokens"] == 2
    report = (out / "report" / "report.md").read_text()
    assert (
        "| baseline | tiny:llava | none |" in report and "| fastv_keep=0.5 | tiny:llava | fastv(keep=0.5) |" in report
    )

    capsys.readouterr()
    assert main([*args, "--method", "fastv:keep=0.5"]) == 2
    assert "--method does not combine with --suite" in capsys.readouterr().err

    # a bad spec in the last variant stops the suite before its first run
    write(tmp_path / "suites", late=GRID.replace("[0.5, 0.25]", "[0.5, 2]"))
    late = ["eval", "--suite", str(tmp_path / "suites" / "late.yaml"), "--model", "tiny:llava"]
    assert main([*late, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "late"), "--no-progress"]) == 2
    assert "keep=2" in capsys.readouterr().err and not (tmp_path / "late").exists()
