"""`vlmkit train mod`: routers trained with the language model and projector (vision tower frozen),
the control run on the same batches, a bit-identical resume, and routers exported beside the
fine-tuned weights that apply to them and to nothing else."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit import zoo
from vlmkit.errors import ConfigError
from vlmkit.train.mod import ModRecipe, mod_config
from vlmkit.train.trainer import train

SMALL = dict(base="shapes-llava", steps=2, batch=2, eval_every=0)


def weights(recipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in recipe.modules.state_dict().items()}


@pytest.mark.parametrize("method", ["pmod", "gammamod:layers=(1, 2)"])
def test_routers_and_language_model_train_the_vision_tower_stays(tmp_path, method):
    recipe = ModRecipe(mod_config(method=method, **SMALL))
    before = weights(recipe)
    assert any(k.startswith("routers.") for k in before)
    final = train(recipe, tmp_path / "run", progress=False)
    after = weights(recipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("routers.") for k in changed)  # gradients reach the routers
    assert any(k.startswith("model.model.language_model.") for k in changed)
    assert not any(k.startswith("model.model.vision_tower.") for k in changed)  # frozen
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert ("router_loss" in log[-1]) == method.startswith("gammamod")
    # the export: plain weights plus routers tied to them
    model, processor = zoo.load(final)
    assert vlmkit.patch_of(recipe.model) is None
    saved = load_file(str(final / "routers.safetensors"))
    trained = {k.removeprefix("routers."): v for k, v in after.items() if k.startswith("routers.")}
    assert len(saved) == len(trained)
    name = method.split(":")[0]
    spec = f"{method},routers={final}" if ":" in method else f"{method}:routers={final}"
    with vlmkit.apply(model, spec) as patch:
        loaded = dict(patch.methods[0].trainable().state_dict())
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    base, _ = zoo.load("shapes-llava")
    with pytest.raises(ConfigError, match=f"{name}: .* trained for another model"):
        vlmkit.apply(base, spec)


def test_control_run_takes_the_same_batches_and_trains_no_routers(tmp_path):
    tuned, control = ModRecipe(mod_config(method="pmod", **SMALL)), ModRecipe(mod_config(method="none", **SMALL))
    assert "routers" not in control.modules and vlmkit.patch_of(control.model) is None
    assert tuned.stages[0].trainable[:-1] == control.stages[0].trainable[:-1]
    for step in range(2):
        first, second = tuned.batch(tuned.stages[0], step), control.batch(control.stages[0], step)
        assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["images"], second["images"])
    final = train(control, tmp_path / "control", progress=False)
    assert not (final / "routers.safetensors").exists()
    assert json.loads((final / "training.json").read_text())["recipe"] == "shapes-llava-control"


def test_training_resumes_bit_identically(tmp_path):
    straight = ModRecipe(mod_config(method="pmod", **SMALL))
    train(straight, tmp_path / "straight", progress=False)
    stopped = ModRecipe(mod_config(method="pmod", **SMALL))
    assert train(stopped, tmp_path / "resumed", progress=False, stop_after=1) is None
    resumed = ModRecipe(mod_config(method="pmod", **SMALL))
    train(resumed, tmp_path / "resumed", progress=False)
    expected, actual = weights(straight), weights(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_mod_errors_name_the_choices(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'cca' is not one of pmod, gammamod, none"):
        mod_config(method="cca")
    from vlmkit import cli

    assert cli.main(["train", "mod", "--method", "fastv", "--out", str(tmp_path / "run"), "--no-progress"]) != 0
    assert "is not one of pmod, gammamod, none" in capsys.readouterr().err


SHIPPED = {"shapes-llava-deep-pmod": "pmod", "shapes-llava-deep-gammamod": "gammamod"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_routers_apply_to_their_model_and_answer_at_the_bar(name):
    from tests.train.test_checkpoints import MAX_BYTES, SUBSET_SEED
    from vlmkit.data.shapes import WorldConfig
    from vlmkit.train.evaluate import pope_eval

    folder = zoo.shipped.CHECKPOINTS / name
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "routers.safetensors", "training.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_BYTES
    training = json.loads((folder / "training.json").read_text())
    assert training["config"]["finetune"]["method"] == SHIPPED[name] and training["config"]["finetune"]["base"] == "shapes-llava-deep"
    model, processor = zoo.load(name)
    with vlmkit.apply(model, f"{SHIPPED[name]}:routers={name}"):
        result = pope_eval(model, processor, n_images=100, seed=SUBSET_SEED, config=WorldConfig(image_size=96),
                           splits=("random",))
    assert result["random"]["accuracy"] >= 0.88, result
    base, _ = zoo.load("shapes-llava-deep")
    with pytest.raises(ConfigError, match="trained for another model"):
        vlmkit.apply(base, f"{SHIPPED[name]}:routers={name}")
