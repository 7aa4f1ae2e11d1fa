"""Shared test set-up: offline, deterministic, CPU; real photos from scikit-image."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # vlmkit commands run in-process keep one thread


def photos() -> list[Image.Image]:
    """Four real photos (scikit-image's cat, coffee, astronaut, rocket)."""
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")]


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return photos()


def noise_video(frames: int = 4, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(frames)]
