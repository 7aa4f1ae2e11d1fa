"""The lmms-eval plugin (plugins/lmms-eval-vlmkit): a real lmms-eval run equals `vlmkit eval`, question by question.

lmms-eval and the plugin are installed in the venv by `make venv` (extra ``lmms`` and
``-e plugins/lmms-eval-vlmkit``). The evaluation runs offline on a shapes POPE set: the task folder
is written by `lmms_eval_vlmkit.pope.write_task` and read through ``--include_path``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_eval.api.instance import Instance
from lmms_eval_vlmkit.model import Vlmkit, parse_methods
from lmms_eval_vlmkit.pope import write_task

import vlmkit
from vlmkit.data import shapes_bench
from vlmkit.errors import ConfigError, UnknownMethodError
from vlmkit.eval.runner import DataOptions, RunSpec, run

# both methods change answers on this set: against the plain model, visionzip alone and vcd alone
METHODS = ("visionzip:tokens=64", "vcd:alpha=1")
SPLITS = ("popular", "random")


@pytest.fixture(scope="module")
def pope(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("pope")
    shapes_bench.write_pope(data, n=2)  # 12 questions per split
    return data


def lmms_eval(tmp_path: Path, pope: Path, model_args: str, tasks: str) -> tuple[dict, dict[str, list[dict]]]:
    """Run ``python -m lmms_eval`` offline; return its results and its logged samples per task."""
    write_task(pope, tmp_path / "tasks", splits=SPLITS)
    out = tmp_path / "lmms"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # the datasets cache of the local JSON files
        "OMP_NUM_THREADS": "1",  # as torch.set_num_threads(1) in conftest: same float reductions
        "WANDB_MODE": "disabled",
    }
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "vlmkit", "--model_args", model_args, "--tasks", tasks,
        "--include_path", str(tmp_path / "tasks"), "--batch_size", "4", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    samples = {
        split: [json.loads(line) for line in next(out.rglob(f"*_samples_vlmkit_pope_{split}.jsonl")).open()]
        for split in SPLITS
    }
    return json.loads(results_file.read_text())["results"], samples


def test_lmms_eval_run_equals_vlmkit_eval(tmp_path, pope):
    model_args = f'pretrained=shapes-llava,methods="{";".join(METHODS)}"'
    results, samples = lmms_eval(tmp_path, pope, model_args, "vlmkit_pope")
    scores = run(
        RunSpec(
            model="shapes-llava", bench="pope", data=DataOptions(path=str(pope), splits=SPLITS),
            out=str(tmp_path / "vlmkit"), methods=METHODS, batch_size=4, progress=False,
        )
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "vlmkit" / "samples.jsonl").open()]
    assert scores["config"]["methods"][0]["name"] == "visionzip" and len(rows) == 24
    for split in SPLITS:
        ours = {r["metadata"]["question_id"]: r["response"] for r in rows if r["metadata"]["split"] == split}
        theirs = {s["pope_accuracy"]["question_id"]: s["filtered_resps"] for s in samples[split]}
        assert theirs == ours, split
        assert results[f"vlmkit_pope_{split}"]["pope_accuracy,none"] == scores["scores"]["splits"][split]["accuracy"]
        assert results[f"vlmkit_pope_{split}"]["pope_f1,none"] == scores["scores"]["splits"][split]["f1"]
    assert results["vlmkit_pope"]["pope_accuracy,none"] == pytest.approx(scores["scores"]["mean_accuracy"], abs=1e-12)
    assert results["vlmkit_pope"]["pope_f1,none"] == pytest.approx(scores["metrics"]["f1"], abs=1e-12)


# ------------------------------------------------------------------ the model class, driven directly
def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [
        Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, args in enumerate(arguments)
    ]


@pytest.fixture(scope="module")
def docs(pope) -> list[dict]:
    rows = [json.loads(line) for line in (pope / "shapes_pope_random.json").open()][:5]
    return [{"question": r["text"], "image": str(pope / "images" / r["image"])} for r in rows]


def visual(doc):
    from PIL import Image

    return [Image.open(doc["image"])]


GREEDY = {"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": []}


def test_model_batches_multi_round_loglikelihood_and_removes_the_patch(docs):
    lm = Vlmkit(pretrained="shapes-llava", methods="visionzip:tokens=64", batch_size="3")
    lm.task_dict = {"t": {"test": docs}}
    asks = [(doc["question"], dict(GREEDY), visual, i, "t", "test") for i, doc in enumerate(docs)]
    replies = lm.generate_until(requests("generate_until", asks))
    lm._batch_size = 1
    assert lm.generate_until(requests("generate_until", asks)) == replies  # batches of 3 (ragged) = one by one
    assert {reply.strip() for reply in replies} <= {"Yes.", "No."}

    def follow_up(doc, previous_output, round_idx, previous_round_info):
        if round_idx == 2:
            return None, None, True, previous_output, None
        return visual(doc), "Is there a lock in the image?", False, previous_output, {"asked": round_idx}

    lm._batch_size = 2
    multi = [(q, dict(GREEDY), visual, follow_up, i, "t", "test") for q, _, _, i, _, _ in asks]
    rounds = lm.generate_until_multi_round(requests("generate_until_multi_round", multi))
    follow = [("Is there a lock in the image?", dict(GREEDY), visual, i, "t", "test") for i in range(5)]
    locks = lm.generate_until(requests("generate_until", follow))
    assert rounds == [[reply.strip(), lock.strip()] for reply, lock in zip(replies, locks)]

    lm._batch_size = 3
    other = {"Yes.": "No.", "No.": "Yes."}
    pairs = [(q, reply.strip(), visual, i, "t", "test") for (q, _, _, i, _, _), reply in zip(asks, replies)]
    pairs += [(q, other[reply.strip()], visual, i, "t", "test") for (q, _, _, i, _, _), reply in zip(asks, replies)]
    scored = lm.loglikelihood(requests("loglikelihood", pairs))
    assert [greedy for _, greedy in scored] == [True] * 5 + [False] * 5  # the generated reply is the greedy one
    assert all(scored[i][0] > scored[i + 5][0] for i in range(5))
    lm._batch_size = 1
    singles = lm.loglikelihood(requests("loglikelihood", pairs))
    assert [s[0] for s in singles] == pytest.approx([s[0] for s in scored], abs=1e-4)

    model, patch = lm.model, lm.patch
    assert patch.hooks
    lm.clean()  # what lmms-eval's evaluator calls after the last request
    assert lm.patch is None and not hasattr(lm, "_model")
    vlmkit.apply(model, "fastv:keep=0.5").remove()  # applying again works: the first patch is gone


def test_model_args_errors():
    specs = ["visionzip:tokens=64", "fastv:layer=2,keep=0.5"]
    assert parse_methods('"visionzip:tokens=64;fastv:layer=2,keep=0.5"') == specs
    assert parse_methods("") == [] and parse_methods(None) == []
    unknown = r"'method' is not known.*valid keys: pretrained, methods.*Did you mean 'methods'"
    with pytest.raises(ConfigError, match=unknown):
        Vlmkit(pretrained="shapes-llava", method="fastv:keep=0.5")
    with pytest.raises(UnknownMethodError, match="fastvv"):
        Vlmkit(pretrained="shapes-llava", methods="fastvv:keep=0.5")
    with pytest.raises(ConfigError, match="keep"):
        Vlmkit(pretrained="shapes-llava", methods="fastv:keep=2")
    with pytest.raises(ConfigError, match="'auto' is not supported"):
        Vlmkit(pretrained="shapes-llava", batch_size="auto")
    with pytest.raises(ConfigError, match="shapes-llava"):
        Vlmkit(pretrained="no-such-model")
    with pytest.raises(ConfigError, match=r"needs pretrained=.*shapes-llava"):
        Vlmkit(methods="fastv:keep=0.5")
