"""Trained checkpoints shipped in `vlmkit/zoo/checkpoints/<name>/`, or any local folder, loaded offline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vlmkit.errors import ConfigError, did_you_mean

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def available() -> tuple[str, ...]:
    """Names of the checkpoints shipped with vlmkit (folders of `vlmkit/zoo/checkpoints/`), sorted."""
    return tuple(sorted(entry.name for entry in CHECKPOINTS.iterdir() if (entry / "config.json").is_file()))


def _resolve(name_or_path: str | Path) -> Path:
    if str(name_or_path) in available():
        return CHECKPOINTS / str(name_or_path)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    names = available()
    raise ConfigError(
        f"{str(name_or_path)!r} is neither a shipped checkpoint nor a folder with a config.json; "
        f"shipped checkpoints: {', '.join(names) or '(none yet)'}." + did_you_mean(str(name_or_path), names)
    )


def load(
    name_or_path: str | Path, *, trust_remote_code: bool = False, **kwargs: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a shipped checkpoint by name, or a local `save_pretrained` folder, with its processor.

    Nothing is downloaded (`local_files_only=True`), only safetensors weights are read, and no
    code from the folder runs unless `trust_remote_code=True` is passed.

    Args:
        name_or_path: a name from `available()` or a path to a folder holding `config.json`,
            `*.safetensors` and the processor files.
        trust_remote_code: allow custom modelling code stored in the folder.
        **kwargs: passed to `AutoModelForImageTextToText.from_pretrained` (e.g. `dtype=`,
            `attn_implementation=`, `device_map=`).

    Returns:
        `(model, processor)`, the model in eval mode.

    Raises:
        ConfigError: unknown name (the message lists the shipped ones), or a folder without
            safetensors weights.

    Example:
        >>> model, processor = load("shapes-llava")  # doctest: +SKIP
    """
    path = _resolve(name_or_path)
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"{path} has no .safetensors weights; vlmkit loads safetensors only. Re-save the model with "
            "model.save_pretrained(path), which writes safetensors."
        )
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
    )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model.eval(), processor
