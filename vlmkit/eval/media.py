"""Lazy media references for benchmark samples: images from files or bytes, frames from videos or frame folders.

A reference does no I/O until :meth:`load` is called, so a loader can list thousands of samples
cheaply and a runner can catch :class:`~vlmkit.errors.InputError` for one corrupt file, record an
error row, and go on. Every ``load`` returns a list of RGB ``PIL.Image`` objects.

Frame sampling:

* ``"uniform"``: ``count`` indices spread evenly from the first to the last frame, truncated to int
  (``np.linspace(0, n - 1, count).astype(int)``, as lmms-eval's decord loader does for Video-MME and
  EgoSchema).
* ``"mvbench"``: the official MVBench rule (OpenGVLab/Ask-Anything ``video_chat2/mvbench.ipynb``
  ``get_index``): the middle of ``count`` equal segments, within the ``(start, end)`` bound in seconds
  when the task has one.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmkit.errors import ConfigError, InputError, missing_extra

SAMPLINGS = ("uniform", "mvbench")


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (first and last included)."""
    return np.linspace(0, total - 1, count).astype(int).tolist()


def mvbench_indices(
    count: int, fps: float, max_frame: int, bound: tuple[float, float] | None = None, first: int = 0
) -> list[int]:
    """MVBench's segment-middle indices.

    Args:
        count: Number of frames.
        fps: Frames per second, to turn the bound into frame numbers.
        max_frame: The last valid frame index (videos) or the frame count (frame folders).
        bound: ``(start, end)`` in seconds, or None for the whole video.
        first: The first valid index (1 for frame folders, whose files start at ``00001.jpg``).

    Returns:
        The indices, as the official notebook computes them.
    """
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    segment = float(end_idx - start_idx) / count
    return [int(start_idx + segment / 2 + np.round(segment * i)) for i in range(count)]


@dataclass(frozen=True)
class ImageFile:
    """An image on disk."""

    path: Path

    def load(self) -> list[Image.Image]:
        """Read the image.

        Raises:
            InputError: Missing or undecodable file, naming it.
        """
        try:
            with Image.open(self.path) as image:
                return [image.convert("RGB")]
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise InputError(
                f"cannot read image {self.path}: {error}. Replace the file or leave the sample out."
            ) from None


@dataclass(frozen=True)
class ImageBytes:
    """An image embedded in a data file (parquet); ``name`` says where it came from."""

    data: bytes
    name: str

    def load(self) -> list[Image.Image]:
        """Decode the image.

        Raises:
            InputError: Undecodable bytes, naming where they came from.
        """
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                return [image.convert("RGB")]
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise InputError(f"cannot decode image {self.name}: {error}. Re-download the data file.") from None


@dataclass(frozen=True)
class VideoFile:
    """``num_frames`` frames of a video file, read with decord.

    Attributes:
        path: The video.
        num_frames: How many frames to return.
        sampling: ``"uniform"`` or ``"mvbench"`` (see the module docstring).
        bound: ``(start, end)`` seconds for ``"mvbench"`` sampling; None for the whole video.
    """

    path: Path
    num_frames: int
    sampling: str = "uniform"
    bound: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"frame sampling {self.sampling!r} is not one of {SAMPLINGS}; pick one of them.")
        _check_frame_count(self.num_frames)

    def load(self) -> list[Image.Image]:
        """Decode the sampled frames.

        Raises:
            ImportError: decord is not installed (``pip install 'vlmkit[video]'``).
            InputError: Missing, empty or undecodable video, naming it.
        """
        try:
            import decord
        except ImportError:
            raise missing_extra("decord", "video") from None
        if not os.path.isfile(self.path):
            raise InputError(f"video {self.path} does not exist; check the video folder.")
        try:
            reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
            total = len(reader)
            if total == 0:
                raise ValueError("it has no frames")
            if self.sampling == "mvbench":
                indices = mvbench_indices(self.num_frames, float(reader.get_avg_fps()), total - 1, self.bound)
            else:
                indices = uniform_indices(total, self.num_frames)
            frames = reader.get_batch(indices).asnumpy()
        except Exception as error:  # decord raises its own DECORDError and RuntimeErrors for bad files
            raise InputError(
                f"cannot decode video {self.path}: {error}. Replace the file or leave the sample out."
            ) from None
        return [Image.fromarray(frame).convert("RGB") for frame in frames]


@dataclass(frozen=True)
class FrameFolder:
    """``num_frames`` frames from a folder of ``00001.jpg``, ``00002.jpg``, ... (MVBench's TVQA frames).

    Attributes:
        path: The folder.
        num_frames: How many frames to return.
        bound: ``(start, end)`` seconds, or None.
        fps: Frame rate the frames were extracted at (3 for MVBench).
    """

    path: Path
    num_frames: int
    bound: tuple[float, float] | None = None
    fps: float = 3.0

    def __post_init__(self) -> None:
        _check_frame_count(self.num_frames)

    def load(self) -> list[Image.Image]:
        """Read the sampled frames.

        Raises:
            InputError: Missing folder or frame, or an undecodable frame, naming it.
        """
        if not os.path.isdir(self.path):
            raise InputError(f"frame folder {self.path} does not exist; check the video folder.")
        count = len(os.listdir(self.path))
        indices = mvbench_indices(self.num_frames, self.fps, count, self.bound, first=1)
        return [ImageFile(Path(self.path) / f"{index:05d}.jpg").load()[0] for index in indices]


def _check_frame_count(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ConfigError(f"num_frames must be a positive int, got {num_frames!r}; pass e.g. num_frames=16.")
