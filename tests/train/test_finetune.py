"""`vlmkit train finetune`: a method applied during training, the control run on the same batches,
a plain exported model that records the method, and the errors."""
from __future__ import annotations

import json

import pytest
import torch

import vlmkit
from vlmkit import zoo
from vlmkit.errors import ConfigError
from vlmkit.train.finetune import FinetuneConfig, FinetuneRecipe
from vlmkit.train.trainer import train


def test_method_and_control_train_on_the_same_batches_and_export_plain_weights(tmp_path):
    tuned = FinetuneRecipe(FinetuneConfig(method="cca", steps=2, batch=2, eval_every=0))
    control = FinetuneRecipe(FinetuneConfig(method="none", steps=2, batch=2, eval_every=0))
    assert vlmkit.patch_of(tuned.model) is not None and vlmkit.patch_of(control.model) is None
    for step in range(2):
        first, second = tuned.batch(tuned.stages[0], step), control.batch(control.stages[0], step)
        assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["images"], second["images"])
    base, _ = zoo.load("shapes-llava")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in tuned.model.state_dict().items())
    final = train(tuned, tmp_path / "cca", progress=False)
    assert vlmkit.patch_of(tuned.model) is None  # removed before export
    training = json.loads((final / "training.json").read_text())
    assert training["recipe"] == "shapes-llava-cca" and training["config"]["finetune"]["method"] == "cca"
    assert training["config"]["sizes"] == json.loads((zoo.shipped.CHECKPOINTS / "shapes-llava" / "training.json").read_text())["config"]["sizes"]
    model, _ = zoo.load(final)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed  # it trained
    assert not any(p.suffix in (".bin", ".pt") for p in final.iterdir())


def test_finetune_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(ConfigError, match="video"):
        FinetuneRecipe(FinetuneConfig(base="shapes-video", method="none"))
    with pytest.raises(vlmkit.errors.UnknownMethodError, match="Valid methods"):
        FinetuneRecipe(FinetuneConfig(method="ccaa"))
    from vlmkit import cli

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.json").write_text(json.dumps({"method": "v2pe"}))
    assert cli.main(["train", "finetune", "--method", "cca", "--out", str(tmp_path / "run"), "--no-progress"]) != 0
    assert "holds a fine-tune with other settings" in capsys.readouterr().err
