"""Shared fixtures for the eval tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_SHARED_NLTK_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "nltk_data"


@pytest.fixture(scope="session")
def nltk_data() -> None:
    """Make the NLTK data for CHAIR findable: ``$NLTK_DATA`` if set, else ``../shared/nltk_data``.

    Skips (with the reason) when neither is available, so a machine without the data says why.
    """
    folders = os.environ.get("NLTK_DATA")
    if not folders:
        if not _SHARED_NLTK_DATA.is_dir():
            pytest.skip(f"NLTK data for CHAIR not found: NLTK_DATA is unset and {_SHARED_NLTK_DATA} is missing")
        folders = str(_SHARED_NLTK_DATA)
        os.environ["NLTK_DATA"] = folders
    nltk = pytest.importorskip("nltk", reason="nltk is in the [eval] extra")
    for folder in reversed(folders.split(os.pathsep)):
        if folder not in nltk.data.path:  # nltk reads NLTK_DATA only when first imported
            nltk.data.path.insert(0, folder)
