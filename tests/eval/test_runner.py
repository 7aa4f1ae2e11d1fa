"""End-to-end `vlmkit eval`, `vlmkit score` and `vlmkit report` on tiny models and tiny benchmark folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.eval import runner_data
from vlmkit.cli import main
from vlmkit.errors import ConfigError
from vlmkit.eval import runner

FASTV = "fastv:layer=2,keep=0.25"
TOKENS_PER_IMAGE = 144  # tiny llava: 48x48 pixels in 4x4 patches
BENCH_ARGS = {
    "pope": [],
    "chair": ["--num-images", "3", "--data-seed", "1"],
    "mme": [],
    "video": ["--num-frames", "4"],
}
# video needs a model that reads videos: tiny qwen2_vl, 4 frames, 2 per temporal patch, 8x8 merged tokens each
MODELS = {"video": ("tiny:qwen2_vl", "Qwen2VLForConditionalGeneration", 128)}
LLAVA = ("tiny:llava", "LlavaForConditionalGeneration", TOKENS_PER_IMAGE)
METRICS = {
    "pope": {"f1", "accuracy", "precision", "recall", "yes_ratio"},
    "chair": {"CHAIRs", "CHAIRi", "Recall", "Len"},
    "mme": {"perception", "cognition", "total"},
    "video": {"accuracy"},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchmarks")
    return {
        "pope": runner_data.write_pope(root / "pope"),
        "chair": runner_data.write_chair(root / "chair"),
        "mme": runner_data.write_mme(root / "mme"),
        "video": runner_data.write_mvbench(root / "video"),
    }


def evaluate(bench: str, data: Path, out: Path, *extra: str) -> int:
    args = ["eval", "--model", MODELS.get(bench, LLAVA)[0], "--bench", bench, "--data", str(data), "--out", str(out)]
    return main(args + ["--batch-size", "4", "--max-new-tokens", "3", "--no-progress", *BENCH_ARGS[bench], *extra])


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", [None, FASTV], ids=["plain", "fastv"])
@pytest.mark.parametrize("bench", ["pope", "chair", "mme", "video"])
def test_eval_runs_and_scores_each_bench(bench, method, data, tmp_path):
    out = tmp_path / "run"
    assert evaluate(bench, data[bench], out, *(["--method", method] if method else [])) == 0

    scores = json.loads((out / "scores.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert scores["config"] == config
    rows = rows_of(out)
    assert [row["sample_id"] for row in rows] == config["data"]["sample_ids"]
    assert [row["index"] for row in rows] == list(range(len(rows)))
    model, model_class, per_sample = MODELS.get(bench, LLAVA)
    for row in rows:
        assert row["error"] is None and isinstance(row["response"], str)
        assert 1 <= row["new_tokens"] <= 3
        assert row["visual_tokens"]["input"] == per_sample
        assert row["visual_tokens"]["kept"] == ({"fastv": round(per_sample * 0.25)} if method else {})
        assert row["timing"]["prefill_s"] > 0 and row["timing"]["batch_size"] >= 1
        assert row["cost"]["llm_flops"] > 0 and row["cost"]["kv_bytes"] > 0
    assert set(scores["metrics"]) == METRICS[bench]
    assert scores["summary"]["cost"]["llm_flops"] == pytest.approx(sum(r["cost"]["llm_flops"] for r in rows) / len(rows))
    assert scores["summary"]["samples"] == len(rows) and scores["summary"]["errors"] == 0
    assert scores["summary"]["visual_tokens"]["kept_final_mean"] == (per_sample // 4 if method else per_sample)

    # the recorded config: model + hashes, methods with every parameter, decoding, seed, versions, data
    assert config["model"]["spec"] == model and len(config["model"]["weights_sha256"]) == 64
    assert config["model"]["class"] == model_class
    expected = [{"name": "fastv", "params": {"keep": 0.25, "tokens": None, "positions": "auto", "layer": 2}}]
    assert config["methods"] == (expected if method else [])
    assert config["decoding"] == {
        "strategy": "greedy",
        "max_new_tokens": 3,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    assert config["seed"] == 0 and config["batch_size"] == 4
    assert set(config["versions"]) == {"vlmkit", "torch", "transformers"}
    assert len(config["data"]["hash"]) == 64 and config["data"]["num_samples"] == len(rows)
    if bench == "chair":
        assert [str(i) for i in config["data"]["info"]["image_ids"]] == config["data"]["sample_ids"]
        assert config["data"]["options"] == {"splits": None, "num_images": 3, "data_seed": 1}


def test_corrupt_image_becomes_an_error_row(tmp_path):
    data = runner_data.write_pope(tmp_path / "pope", images=2, corrupt=True)
    assert evaluate("pope", data, tmp_path / "run") == 0
    rows = rows_of(tmp_path / "run")
    broken = [row for row in rows if row["error"] is not None]
    assert [row["sample_id"] for row in broken] == ["random/99"]
    assert "broken.jpg" in broken[0]["error"] and broken[0]["response"] is None
    assert all(isinstance(row["response"], str) for row in rows if row["error"] is None)
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["summary"]["errors"] == 1 and scores["summary"]["samples"] == 5
    assert any("1 of 5 samples failed" in warning for warning in scores["warnings"])


def test_score_command_rescores_with_another_parser(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluate("pope", data["pope"], out, "--limit", "4") == 0
    before = json.loads((out / "scores.json").read_text())
    capsys.readouterr()
    assert main(["score", str(out), "--style", "opera"]) == 0
    printed = capsys.readouterr().out
    after = json.loads((out / "scores.json").read_text())
    assert before["style"] == "llava" and after["style"] == "opera"
    threads = torch.get_num_threads()
    assert after["runtime"] == before["runtime"] == {"num_processes": 1, "device": "cpu", "threads": threads}
    assert after["summary"]["timing"]["threads"] == threads
    assert f"timing with             {runner.threads_label(after['summary'])}\n" in printed
    assert "f1" in printed and "prefill ms / sample" in printed

    assert main(["score", str(out), "--style", "official"]) == 2
    assert "'official' is not a pope scoring style" in capsys.readouterr().err
    assert main(["score", str(tmp_path)]) == 2
    assert "run `vlmkit eval` first" in capsys.readouterr().err


def test_report_writes_table_and_plots(data, tmp_path, capsys):
    runs = [tmp_path / "plain", tmp_path / "fastv"]
    assert evaluate("pope", data["pope"], runs[0], "--limit", "4") == 0
    assert evaluate("pope", data["pope"], runs[1], "--limit", "4", "--method", FASTV) == 0
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| plain | tiny:llava | none |" in text and "| fastv | tiny:llava | fastv(keep=0.25) |" in text
    assert "| 36.0 | 25.0 |" in text  # visual tokens kept, kept %
    for name in ("pope_accuracy_vs_tokens.png", "pope_accuracy_vs_latency.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert "| plain |" in capsys.readouterr().out


def test_local_model_folder_is_loaded_and_hashed(data, tmp_path):
    folder = runner_data.save_tiny_llava(tmp_path / "model")
    out = tmp_path / "run"
    args = ["eval", "--model", str(folder), "--bench", "pope", "--data", str(data["pope"]), "--out", str(out)]
    assert main([*args, "--limit", "2", "--max-new-tokens", "2", "--no-progress", "--trust-remote-code"]) == 0
    record = json.loads((out / "config.json").read_text())["model"]
    assert record["source"] == "path" and record["path"] == str(folder) and record["trust_remote_code"] is True
    assert (
        record["weights_sha256"]
        == hashlib.sha256(b"model.safetensors" + (folder / "model.safetensors").read_bytes()).hexdigest()
    )

    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        runner.load_model(str(folder), "auto", "cpu")


def test_sampling_is_reproducible_and_checked(data, tmp_path, capsys):
    sample = ["--limit", "4", "--decoding", "sample", "--temperature", "1.5", "--seed", "3"]
    assert evaluate("pope", data["pope"], tmp_path / "a", *sample) == 0
    assert evaluate("pope", data["pope"], tmp_path / "b", *sample) == 0
    assert [r["response"] for r in rows_of(tmp_path / "a")] == [r["response"] for r in rows_of(tmp_path / "b")]
    decoding = json.loads((tmp_path / "a" / "config.json").read_text())["decoding"]
    assert decoding == {"strategy": "sample", "max_new_tokens": 3, "temperature": 1.5, "top_p": 1.0, "top_k": 0}

    capsys.readouterr()
    assert evaluate("pope", data["pope"], tmp_path / "c", "--temperature", "0.7") == 2
    assert "temperature=0.7 only apply to sampling" in capsys.readouterr().err
    assert evaluate("pope", data["pope"], tmp_path / "d", "--method", "fastvv:keep=0.5") == 2
    assert "Did you mean 'fastv'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_contrastive_decoding_composes_with_pruning(data, tmp_path):
    out = tmp_path / "run"
    assert evaluate("pope", data["pope"], out, "--limit", "4", "--method", "fastv:layer=2,keep=0.5", "vcd:alpha=1") == 0
    config = json.loads((out / "config.json").read_text())
    assert [m["name"] for m in config["methods"]] == ["fastv", "vcd"]
    assert config["methods"][1]["params"]["alpha"] == 1 and "noise_step" in config["methods"][1]["params"]
    rows = rows_of(out)
    assert all(row["visual_tokens"]["kept"]["fastv"] == TOKENS_PER_IMAGE // 2 for row in rows)
    assert all(isinstance(row["response"], str) and row["timing"]["decode_steps"] >= 0 for row in rows)


def test_video_on_an_image_only_model_is_an_error_naming_video_models(data, tmp_path):
    # its frames would go in as separate images and score 0 without a word
    options = runner.DataOptions(str(data["video"]), num_frames=2)
    spec = runner.RunSpec("tiny:llava", "video", options, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"tiny:llava \(LlavaForConditionalGeneration\) reads images only.*Qwen2-VL"):
        runner.run(spec)
    assert not (tmp_path / "run" / "config.json").exists()


def test_video_task_set_from_a_data_list(tmp_path):
    data = runner_data.write_mvbench(tmp_path / "video", videos=2, task="object_appear")
    assert evaluate("video", data, tmp_path / "run", "--limit", "2") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["sample_ids"] == ["object_appear/0", "object_appear/1"]
    assert config["data"]["paths"]["data_list"] == str(data / "data_list.json")
    assert [row["metadata"]["task_type"] for row in rows_of(tmp_path / "run")] == ["object_appear"] * 2


def test_rows_record_the_prefill_cost_the_engine_counted(data, tmp_path):
    """Dense rows carry the dense prefill, pruned rows what the engine counted: the numbers
    `vlmkit.zoo.flops` gives for what ran (FastV before layer 2 keeping a quarter of 144 tokens)."""
    from vlmkit import zoo

    assert evaluate("pope", data["pope"], tmp_path / "dense") == 0
    assert evaluate("pope", data["pope"], tmp_path / "fastv", "--method", FASTV) == 0
    model, _ = zoo.tiny("llava")
    config = model.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token_and_layer = 2 * config.num_key_value_heads * head_dim * 4  # keys and values, float32
    for dense, pruned in zip(rows_of(tmp_path / "dense"), rows_of(tmp_path / "fastv")):
        length = dense["cost"]["kv_bytes"] / (per_token_and_layer * config.num_hidden_layers)
        assert length == int(length)
        text = int(length) - 144
        assert dense["cost"]["llm_flops"] == pytest.approx(zoo.flops(model, text, 144))
        assert pruned["cost"]["llm_flops"] == pytest.approx(zoo.flops(model, text, [144, 144, 36, 36]))
        assert pruned["cost"]["kv_bytes"] == pytest.approx((2 * length + 2 * (text + 36)) * per_token_and_layer)
