"""lmms-eval model ``vlmkit``: any model vlmkit loads, patched with vlmkit methods.

Installing this package registers the model through lmms-eval's ``lmms_eval.models`` entry point::

    python -m lmms_eval --model vlmkit \\
        --model_args 'pretrained=shapes-llava,methods="visionzip:tokens=64;vcd:alpha=1"' \\
        --tasks vlmkit_pope --include_path TASKS --batch_size 8

The model class is `lmms_eval_vlmkit.model.Vlmkit`; `lmms_eval_vlmkit.pope` writes POPE question
files in the official format as an lmms-eval task folder that reads local files only.
"""
from __future__ import annotations

MODEL_ID = "vlmkit"
CLASS_PATH = "lmms_eval_vlmkit.model.Vlmkit"


def manifest():
    """The entry point's payload: lmms-eval's model registry calls it while ``lmms_eval.models`` loads.

    A function rather than a module-level manifest, so that importing this package never imports
    ``lmms_eval.models`` (whose import is what reads the entry point).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


__all__ = ["CLASS_PATH", "MODEL_ID", "manifest"]
