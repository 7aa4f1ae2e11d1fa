"""Calibration files of the layer-skipping methods: what they hold and how a method checks them.

`vlmkit calibrate shortv|vtw` (`vlmkit.analysis.depth`) writes one JSON file per model:
``{"method", "model_hash", "num_layers", ...}``, plus ``"ranking"`` and ``"contribution"`` for
ShortV and ``"layer"`` and ``"kl"`` for VTW. A method given such a file refuses a model whose
weights hash differs (the layers were measured on other weights).
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmkit.errors import ConfigError
from vlmkit.hashing import state_dict_hash


def read_calibration(method: str, path: str | None, field: str) -> dict | None:
    """The calibration file at `path` (None when no path), checked to be `method`'s and to hold `field`."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{method}: calibration file {file} does not exist; write one with `vlmkit calibrate {method}`")
    calibration = json.loads(file.read_text())
    if calibration.get("method") != method or field not in calibration:
        raise ConfigError(f"{method}: {file} is not a `vlmkit calibrate {method}` file (method {calibration.get('method')!r})")
    return calibration


def check_calibration(method: str, path: str, calibration: dict | None, adapter) -> None:
    """Raise a ConfigError unless `calibration` (if any) was measured on this model's weights."""
    if calibration is None:
        return
    expected = calibration.get("model_hash")
    layers = len(adapter.decoder_layers)
    if calibration.get("num_layers") != layers:
        raise ConfigError(
            f"{method}: {path} was calibrated on a model with {calibration.get('num_layers')} decoder layers; this one "
            f"has {layers}. Run `vlmkit calibrate {method}` on this model"
        )
    actual = state_dict_hash(adapter.model)
    if expected != actual:
        raise ConfigError(
            f"{method}: {path} was calibrated on another model (weights hash {str(expected)[:12]}, this model's is "
            f"{actual[:12]}). Run `vlmkit calibrate {method}` on this model"
        )
