"""What a fresh clone needs is in the repository: nothing reads a folder beside it, and CHAIR scores
with `NLTK_DATA` unset (vlmkit's own NLTK subset; `tests/eval/test_chair.py` checks its output)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a path that leaves the repository for a sibling folder, however it is spelt
SIBLING = "shared"
OUTSIDE = re.compile(rf"\.\.[/\\]{SIBLING}|/\s*[\"']{SIBLING}[\"']|/work/{SIBLING}|parents\[\d\]\s*\.parent\s*/")


def test_no_file_of_the_repository_names_a_folder_beside_it():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix in {".safetensors", ".zip", ".png", ".jpg", ".mp4"} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}" for m in OUTSIDE.finditer(text)]
    assert offenders == []


def test_the_test_environment_does_not_set_nltk_data():
    """CI's checkout may sit beside other folders; the suite must not point NLTK at them."""
    for name in ("Makefile", ".ci/run", "tests/conftest.py"):
        assert "NLTK_DATA" not in (ROOT / name).read_text(), name
