"""AnyRes bookkeeping shared by LLaVA-NeXT and LLaVA-OneVision.

Which placeholder token came from which crop and grid cell is decided by the model's own
`pack_image_features` (tile layout, unpadding, image newlines, OneVision's size cap). Rather than
re-deriving that geometry, the adapter runs the model's function on a small tensor whose channels
are each patch's (crop, row, col) plus its probe values, and reads the coordinates back. What
comes out is, by construction, exactly the order in which the model scatters the image's features.
"""
from __future__ import annotations

import math

import torch

from vlmkit.adapters.base import grid_coords
from vlmkit.engine.state import VisualMeta

STRUCTURAL = -1.0  # channel value marking image-newline tokens


def tile_channels(crops: int, side: int, columns: int) -> torch.Tensor:
    """(crops, side*side, 3) float channels (crop, row, col); tiles use the big grid's coordinates.

    Crop 0 is the base view (rows/cols in its own grid); crops 1.. are the high-resolution tiles,
    laid out row-major `columns` per row, whose rows/cols count in the grid of all tiles together.
    """
    local = grid_coords(1, side, side)[:, 1:3]
    channels = []
    for crop in range(crops):
        if crop == 0:
            offset = torch.zeros(2, dtype=torch.long)
        else:
            tile_row, tile_col = divmod(crop - 1, columns)
            offset = torch.tensor([tile_row * side, tile_col * side])
        coords = local + offset
        channels.append(torch.cat([torch.full((side * side, 1), crop), coords], dim=1))
    return torch.stack(channels).float()


def probe_channels(probe: dict[str, torch.Tensor], rows: slice) -> tuple[torch.Tensor, list[tuple[str, int | None]]]:
    """The probe entries of tower rows `rows` as float channels (rows, tokens, c), and their layout
    [(name, width)]: a scalar per token ("importance") takes one channel (width None), a vector its width."""
    channels, layout = [], []
    for name, value in probe.items():
        value = value[rows].float().cpu()
        scalar = value.ndim == 2
        channels.append(value[..., None] if scalar else value)
        layout.append((name, None if scalar else value.shape[-1]))
    return torch.cat(channels, dim=-1), layout


def split_channels(channels: torch.Tensor, layout: list[tuple[str, int | None]]) -> dict[str, torch.Tensor]:
    """The inverse of `probe_channels` for (tokens, c) channels: {name: (tokens,) or (tokens, width)}."""
    result, start = {}, 0
    for name, width in layout:
        result[name] = channels[:, start] if width is None else channels[:, start : start + width]
        start += 1 if width is None else width
    return result


def packed_metas(
    pack,
    image_sizes,
    crops_per_image: list[int],
    side: int,
    columns_per_image: list[int],
    probe: dict[str, torch.Tensor] | None,
    **pack_kwargs,
) -> list[VisualMeta]:
    """One `VisualMeta` per image, from the model's own packing function `pack`.

    Args:
        pack: the base model's `pack_image_features`.
        image_sizes: as passed to the encoder.
        crops_per_image: number of tower rows (base view + tiles) per image.
        side: patches per crop side.
        columns_per_image: tiles per row of each image's tile grid.
        probe: per tower row, "importance" (rows, side*side) and per-token vectors ("keys", "features":
            (rows, side*side, d)), or None.
    """
    features, start, layout = [], 0, []
    for crops, columns in zip(crops_per_image, columns_per_image):
        channels = tile_channels(crops, side, columns)
        if probe is not None:
            values, layout = probe_channels(probe, slice(start, start + crops))
            channels = torch.cat([channels, values], dim=-1)
        features.append(channels)
        start += crops
    newline = torch.full((features[0].shape[-1],), STRUCTURAL)
    packed, _ = pack(features, image_sizes, image_newline=newline, **pack_kwargs)
    metas = []
    for image in packed:
        structural = image[:, 0] < 0
        coords = image[:, :3].round().long()
        coords = torch.cat([torch.zeros_like(coords[:, :1]), coords[:, 1:], coords[:, :1]], dim=1)  # frame,row,col,crop
        coords[structural] = torch.tensor([0, 0, 0, -1])
        meta_probe = split_channels(image[:, 3:], layout) if probe is not None else None
        metas.append(VisualMeta("image", (1, side, side), coords, meta_probe))
    return metas


def pooled_video_metas(
    pool,
    frames_per_video: list[int],
    side: int,
    probe: dict[str, torch.Tensor] | None,
    newline: bool,
    pooled_before_projector: bool = False,
) -> list[VisualMeta]:
    """One `VisualMeta` per video whose frames go through the model's pooling function `pool`.

    The pooled grid is what `pool` makes of one frame's `side` x `side` patches. Where the model pools
    after projecting (LLaVA-OneVision), a pooled token has no vision feature of its own: the video's
    probe carries no "features". With `pooled_before_projector` (LLaVA-NeXT-Video), the probe's
    "features" (the projector's input) already hold one row per pooled token and are kept as they are.
    """
    metas, start = [], 0
    pooled_side = math.isqrt(pool(torch.zeros(1, side * side, 1)).shape[1])
    features = None
    if probe is not None:
        features = probe.get("features") if pooled_before_projector else None
        probe = {name: value for name, value in probe.items() if name != "features"}
    for frames in frames_per_video:
        coords = grid_coords(frames, pooled_side, pooled_side)
        meta_probe = None
        if probe is not None:
            channels, layout = probe_channels(probe, slice(start, start + frames))
            pooled = pool(channels).reshape(frames * pooled_side * pooled_side, -1)
            meta_probe = split_channels(pooled, layout)
            if features is not None:
                meta_probe["features"] = features[start : start + frames].flatten(0, 1)
        if newline:
            coords = torch.cat([coords, torch.tensor([[0, 0, 0, -1]])])
            if meta_probe is not None:
                meta_probe = {k: torch.cat([v, torch.zeros_like(v[:1])]) for k, v in meta_probe.items()}
        metas.append(VisualMeta("video", (frames, pooled_side, pooled_side), coords, meta_probe))
        start += frames
    return metas
