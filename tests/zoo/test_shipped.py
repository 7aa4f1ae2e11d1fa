import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.zoo import available, load, shipped, tiny


def test_available_lists_only_checkpoint_folders():
    names = available()
    assert isinstance(names, tuple)
    assert all((shipped.CHECKPOINTS / name / "config.json").is_file() for name in names)


def test_round_trip_through_save_pretrained(tmp_path):
    model, processor = tiny("llava_onevision", seed=5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = loaded_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = loaded_processor(images=Image.new("RGB", (64, 64), "red"), text=prompt, return_tensors="pt")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    steps = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(loaded.generate(**inputs, **steps), model.generate(**inputs, **steps))


def test_unknown_name_lists_shipped_checkpoints():
    with pytest.raises(ConfigError, match="shipped checkpoints: "):
        load("no-such-model")


def test_folder_without_safetensors_is_refused(tmp_path):
    model, _ = tiny("llava")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="safetensors only"):
        load(tmp_path)


def test_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    calls = []

    def record(path, **kwargs):
        calls.append(kwargs)
        return torch.nn.Module()

    monkeypatch.setattr(shipped.AutoModelForImageTextToText, "from_pretrained", record)
    monkeypatch.setattr(shipped.AutoProcessor, "from_pretrained", record)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    load(tmp_path)
    load(tmp_path, trust_remote_code=True)
    assert [c["trust_remote_code"] for c in calls] == [False, False, True, True]
    assert all(c["local_files_only"] for c in calls)
    assert calls[0]["use_safetensors"]
