"""Video token reduction, one file per method: they act on the frames of videos and leave images as they are.

Shared here: the families a video-only method refuses (those without video input, read from the
adapters, so that a new image-only family is refused too) and each video's frames as a grid of tokens.
"""
from __future__ import annotations

import torch

from vlmkit.adapters import ADAPTERS
from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import InputError

#: `Method.unsupported` of a video-only method: every family without video input, with the reason
WITHOUT_VIDEO: dict[str, str] = {
    adapter.family: "the family has no video input, and the method reduces video tokens only"
    for adapter in ADAPTERS
    if "videos" not in adapter.media
}


def videos(visual: VisualTokens) -> list[int]:
    """The indices (into `visual.grids`) of the sample's videos."""
    return [index for index, modality in enumerate(visual.modality) if modality == "video"]


def frame_grid(visual: VisualTokens, video: int) -> torch.Tensor:
    """(T, N) sample indices of one video's tokens: row t is frame t, its N cells in row-major order
    (the (row, col) order of the frame's token grid, which is the sequence order in every family).

    Raises:
        InputError: the video's frames do not each fill one same grid, one token per cell (tokens
            were dropped before, e.g. by an earlier selection).
    """
    members = visual.image_index(video)
    frames, rows, cols = visual.grids[video]
    cell = visual.frame[members] * (rows * cols) + visual.row[members] * cols + visual.col[members]
    inside = bool(((visual.row[members] < rows) & (visual.col[members] < cols) & (visual.frame[members] < frames)).all())
    if not inside or members.numel() != frames * rows * cols or torch.unique(cell).numel() != members.numel():
        raise InputError(
            f"a video of {frames} frames of {rows}x{cols} tokens has {members.numel()} visual tokens; video methods "
            "compare each token with the token at the same place in another frame and need every frame whole "
            "(apply them before any other selection)"
        )
    grid = torch.empty(frames * rows * cols, dtype=torch.long, device=members.device)
    grid[cell] = members
    return grid.view(frames, rows * cols)
