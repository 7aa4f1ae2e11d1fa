"""Trained routers on disk: a small safetensors file tied to the base model's weights.

The metadata records the method, the weights hash of the model the routers were trained with
(`vlmkit.hashing.state_dict_hash`), its decoder depth and width, the routed layers and the method's
schedule settings; a file for another model, another method or another schedule is refused by name.
`routers=` takes the file, a folder holding `routers.safetensors`, or a shipped checkpoint name
(`shapes-llava-deep-pmod`), whose folder holds it beside the fine-tuned weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.errors import ConfigError
from vlmkit.hashing import state_dict_hash

FILE_NAME = "routers.safetensors"


def routers_path(method: str, name: str) -> Path:
    """The routers file `name` points at: a file, a folder with `routers.safetensors`, or a shipped checkpoint."""
    from vlmkit.zoo.shipped import CHECKPOINTS, available

    path = Path(name).expanduser()
    if path.is_dir():
        path = path / FILE_NAME
    elif not path.exists() and name in available():
        path = CHECKPOINTS / name / FILE_NAME
    if not path.is_file():
        raise ConfigError(
            f"{method}: routers {name!r} is neither a .safetensors file, a folder holding {FILE_NAME}, nor a shipped "
            "checkpoint with routers; train some with `vlmkit train mod`"
        )
    if path.suffix != ".safetensors":
        raise ConfigError(f"{method}: routers file {path} must be a .safetensors file")
    return path


def read_routers(method: str, name: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, metadata, path) of a routers file written by `write_routers` for `method`."""
    from safetensors import safe_open

    path = routers_path(method, name)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if meta.get("method") != method or "model_hash" not in meta:
        raise ConfigError(f"{method}: {path} is not a {method} routers file (it holds {meta.get('method', 'no method')!r})")
    parsed = {
        "model_hash": meta["model_hash"], "num_layers": int(meta["num_layers"]), "hidden_size": int(meta["hidden_size"]),
        "layers": tuple(json.loads(meta["layers"])), "config": json.loads(meta["config"]),
    }
    return tensors, parsed, str(path)


def check_routers(method: str, file, adapter, layers: tuple[int, ...]) -> None:
    """Refuse routers trained for another model or another set of routed layers."""
    _, meta, path = file
    depth, hidden = len(adapter.decoder_layers), adapter.text_config.hidden_size
    if meta["num_layers"] != depth or meta["hidden_size"] != hidden:
        raise ConfigError(
            f"{method}: {path} holds routers for a model with {meta['num_layers']} decoder layers of width "
            f"{meta['hidden_size']}; this one has {depth} of width {hidden}"
        )
    actual = state_dict_hash(adapter.model)
    if meta["model_hash"] != actual:
        raise ConfigError(
            f"{method}: {path} holds routers trained for another model (weights hash {meta['model_hash'][:12]}, "
            f"this model's is {actual[:12]})"
        )
    if meta["layers"] != layers:
        raise ConfigError(
            f"{method}: {path} holds routers for layers {meta['layers']} (settings {meta['config']}); these settings "
            f"route layers {layers}: give the file's settings"
        )


def write_routers(method: str, path, tensors: dict[str, torch.Tensor], adapter, layers: tuple[int, ...], config: dict) -> None:
    """Write `tensors` with the metadata `read_routers` checks (`adapter`: of the model they were trained with)."""
    from safetensors.torch import save_file

    if not str(path).endswith(".safetensors"):
        raise ConfigError(f"{method}: routers are saved as safetensors only; name the file *.safetensors, not {path}")
    meta = {
        "method": method, "model_hash": state_dict_hash(adapter.model), "num_layers": str(len(adapter.decoder_layers)),
        "hidden_size": str(adapter.text_config.hidden_size), "layers": json.dumps(list(layers)), "config": json.dumps(config),
    }
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
