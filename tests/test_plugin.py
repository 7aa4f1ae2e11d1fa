"""A separately installed package registers a method through the `vlmkit.methods` entry point.

The plugin is pip-installed into a private target directory on the subprocess's path (not into the
shared venv), so the other tests running in parallel never see a half-installed plugin.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "vlmkit-example-method"

SCRIPT = """
import torch, vlmkit
from vlmkit import zoo
from vlmkit.registry import REGISTRY
assert "center" in [m.name for m in vlmkit.list_methods()]
assert REGISTRY.origin("center") == "plugin vlmkit-example-method", REGISTRY.origin("center")
model, processor = zoo.tiny("llava")
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True)
from PIL import Image
batch = processor(images=[Image.new("RGB", (48, 48), "red")], text=[prompt], return_tensors="pt")
with vlmkit.apply(model, "center:keep=0.25") as patch, torch.no_grad():
    model(**batch)
    kept = patch.selections["center"][0].tolist()
# 144 tokens = 12 x 12 grid: the 36 cells nearest the centre (5.5, 5.5), ties by index
cells = sorted(range(144), key=lambda i: ((i // 12 - 5.5) ** 2 + (i % 12 - 5.5) ** 2, i))
assert kept == sorted(cells[:36]), kept
print("ok")
"""


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True)


def test_example_plugin_installs_registers_and_applies(tmp_path):
    target = tmp_path / "site"
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), str(PLUGIN))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    without = subprocess.run([sys.executable, "-c", "import vlmkit; print([m.name for m in vlmkit.list_methods()])"],
                             capture_output=True, text=True, timeout=300)
    assert "'center'" not in without.stdout
