"""The benchmark registry: one module per benchmark, found by name; a new benchmark is one object (here: one test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval import runner_data
from vlmkit.errors import ConfigError, ConflictError
from vlmkit.eval import benchmarks, runner
from vlmkit.eval.benchmarks.base import Benchmark, Loaded, Prompt, Sample, SampleSet
from vlmkit.eval.media import ImageFile

REPO = Path(__file__).resolve().parents[2]


def test_each_module_is_one_benchmark_named_by_its_file():
    assert benchmarks.names() == ["chair", "mme", "multi", "pope", "video"]
    for name in benchmarks.names():
        benchmark = benchmarks.get(name)
        assert benchmark.name == name and benchmarks.origin(name) == "builtin"
        assert type(benchmark).__module__ == "vlmkit.eval.benchmarks.base"
        assert sys.modules[f"vlmkit.eval.benchmarks.{name}"].BENCHMARK is benchmark
    # the settings the runner and report read, unchanged from the tables they replace
    table = {
        name: (b.primary, b.higher_is_better, b.max_new_tokens, b.styles, b.default_style, b.media)
        for name, b in ((name, benchmarks.get(name)) for name in benchmarks.names())
    }
    assert table == {
        "pope": ("f1", True, 16, ("llava", "opera", "vcd", "lmms_eval"), "llava", "image"),
        "chair": ("CHAIRs", False, 512, (), None, "image"),
        "mme": ("perception", True, 16, ("official", "lmms_eval"), "official", "image"),
        "video": ("accuracy", True, 16, (), None, "video"),
        "multi": ("accuracy", True, 16, (), None, "image"),
    }


def test_listing_imports_no_benchmark():
    code = (
        "import sys; from vlmkit.eval import benchmarks; print(benchmarks.names()); "
        "print(sorted(m for m in sys.modules if m.startswith('vlmkit.eval.benchmarks.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.splitlines() == ["['chair', 'mme', 'multi', 'pope', 'video']", "[]"]


def test_unknown_and_conflicting_names_are_errors():
    with pytest.raises(ConfigError, match=r"'popee' is not a benchmark; choose one of chair, mme, multi, pope, video\. "
                                          r"Did you mean 'pope'\?"):
        benchmarks.get("popee")
    with pytest.raises(ConfigError, match="not a pope scoring style; allowed: one of llava, opera, vcd, lmms_eval"):
        benchmarks.get("pope").check_style("official")
    with pytest.raises(ConfigError, match="--style 'mvbench' is not a video scoring style; allowed: none"):
        benchmarks.get("video").check_style("mvbench")
    copy = Benchmark(**{**vars(benchmarks.get("pope"))})
    with pytest.raises(ConflictError, match="benchmark 'pope' is already registered"):
        benchmarks.register(copy)
    with pytest.raises(TypeError, match="must be a vlmkit.eval.benchmarks.base.Benchmark"):
        benchmarks.register("pope")
    with pytest.raises(ConfigError, match="default_style='x' must be one of styles"):
        Benchmark(**{**vars(copy), "default_style": "x"})


def _count_load(root, media, splits, options):
    images = sorted((root / "images").iterdir())
    samples = [
        Sample(f"q/{k}", "How many shapes are there?", "1", (ImageFile(path),), {"answer": "1"})
        for k, path in enumerate(images)
    ]
    return Loaded(SampleSet("count", samples), {"media": str(root / "images")}, {})


def _count_score(rows, data, style, warnings):
    correct = sum(row["response"].strip() == row["metadata"]["answer"] for row in rows)
    return {"accuracy": correct / len(rows)}, {"correct": correct, "total": len(rows), "warnings": []}


COUNT = Benchmark(
    name="count",
    summary="count the shapes",
    load=_count_load,
    score=_count_score,
    prompts={"plain": Prompt("How many shapes are there?")},
    max_new_tokens=2,
    primary="accuracy",
)


def test_a_new_benchmark_is_one_object(tmp_path, monkeypatch):
    """What a new file under vlmkit/eval/benchmarks/ defines runs through the runner, scorer and report."""
    monkeypatch.setattr(benchmarks, "_registered", dict(benchmarks._registered))
    monkeypatch.setattr(benchmarks, "_origins", dict(benchmarks._origins))
    benchmarks.register(COUNT)
    assert "count" in benchmarks.names() and benchmarks.origin("count") == "registered"
    data = runner_data.write_pope(tmp_path / "data", images=3)
    scores = runner.run(runner.RunSpec("tiny:llava", "count", runner.DataOptions(str(data)), str(tmp_path / "run")))
    assert scores["config"]["bench"] == "count" and scores["config"]["decoding"]["max_new_tokens"] == 2
    assert set(scores["metrics"]) == {"accuracy"} and scores["scores"]["total"] == 3
    assert list(json.loads((tmp_path / "run" / "config.json").read_text())["data"]["files"]) == [
        f"images/COCO_val2014_{k:012d}.jpg" for k in range(3)
    ]


def test_multi_image_needle_test_runs_end_to_end_and_scores_per_image_count(tmp_path):
    from vlmkit.cli import main
    from vlmkit.data.shapes import WorldConfig
    from vlmkit.data.shapes_bench import write_multi

    questions = write_multi(tmp_path / "multi", n=2, counts=(1, 3), pool=6, config=WorldConfig(image_size=32))
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    truth = {json.loads(line)["image"]: {o["category"] for o in json.loads(line)["objects"]}
             for line in (tmp_path / "multi" / "ground_truth.jsonl").read_text().splitlines()}
    for row in rows:  # the needle is in exactly its image (yes) or in none (no)
        holding = [i for i, name in enumerate(row["images"]) if row["category"] in truth[name]]
        assert holding == ([row["needle"]] if row["label"] == "yes" else [])
    assert [(r["num_images"], r["label"]) for r in rows] == [(1, "yes"), (1, "no"), (3, "yes"), (3, "no")]
    out = tmp_path / "run"
    assert main(["eval", "--model", "tiny:llava", "--bench", "multi", "--data", str(tmp_path / "multi"),
                 "--out", str(out), "--max-new-tokens", "2", "--batch-size", "2"]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["visual_tokens"]["input"] for s in samples] == [144, 144, 432, 432]
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["metrics"]) == {"accuracy", "accuracy@1", "accuracy@3"}
    assert scores["metrics"]["accuracy"] == pytest.approx((scores["metrics"]["accuracy@1"] + scores["metrics"]["accuracy@3"]) / 2)
