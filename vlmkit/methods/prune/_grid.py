"""Helpers for pre-LLM pruning methods that work per tower pass or per token grid.

A *tower row* is one pass of the vision tower: an image, a video frame, or an AnyRes crop (0 = the
base view). Its tokens, in sequence order, are what a reference written for batch size 1 and one
576-token image treats as "the image". Rows and columns come from `VisualTokens` (AnyRes tiles count
them in the grid of all tiles together, after the model's unpadding).
"""
from __future__ import annotations

import torch

from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import InputError


def tower_rows(visual: VisualTokens) -> list[torch.Tensor]:
    """Indices of the tokens of each tower row (image, frame, crop), each in sequence order; rows
    ordered by (image, frame, crop)."""
    if len(visual) == 0:
        return []
    key = torch.stack([visual.image, visual.frame, visual.crop], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    return [torch.nonzero(inverse == unit).flatten() for unit in range(int(inverse.max()) + 1)]


def probe_values(visual: VisualTokens, probes: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The probe entry `name` of every visual token of the sample, in sequence order, as float32:
    (n,) for a score ("importance", "importance@<layer>"), (n, d) for a vector ("keys", "features")."""
    values = None
    for image, probe in enumerate(probes):
        value = probe[name].float().to(visual.slots.device)
        if values is None:
            values = torch.zeros((len(visual), *value.shape[1:]), dtype=torch.float32, device=visual.slots.device)
        values[visual.image_index(image)] = value
    if values is None:
        return torch.zeros(len(visual), dtype=torch.float32, device=visual.slots.device)
    return values


def grid_box(visual: VisualTokens, members: torch.Tensor) -> tuple[int, int, int, int, torch.Tensor]:
    """The rectangle of grid cells the tokens `members` (one frame of one view) fill.

    Returns (first row, first column, rows, columns, local) where `local` (on the CPU) is each
    member's cell index `(row - first row) * columns + (column - first column)`, in the members' order.

    Raises:
        InputError: the members do not fill a rectangle one token per cell (e.g. LLaVA-OneVision
            resized the tiles after unpadding, its `anyres_max` cap).
    """
    rows_of, cols_of = visual.row[members].cpu(), visual.col[members].cpu()
    row0, col0 = int(rows_of.min()), int(cols_of.min())
    rows, cols = int(rows_of.max()) - row0 + 1, int(cols_of.max()) - col0 + 1
    local = (rows_of - row0) * cols + (cols_of - col0)
    if rows * cols != members.numel() or torch.unique(local).numel() != members.numel():
        raise InputError(
            f"{members.numel()} visual tokens do not fill their {rows}x{cols} grid one per cell; the model resized "
            "this view's token grid (LLaVA-OneVision's anyres_max cap), so grid methods cannot place its tokens"
        )
    return row0, col0, rows, cols, local


def bilinear_matrix(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """(size_out, size_in) float32 weights of 1-D linear interpolation, as
    `F.interpolate(mode="bilinear", align_corners=False, antialias=False)` computes them per axis.

    Output cell p samples the input at `s = max(0, (p + 0.5) * size_in / size_out - 0.5)`, between
    cells `floor(s)` and `min(floor(s) + 1, size_in - 1)` with weights `1 - frac(s)` and `frac(s)`.
    """
    scale = torch.tensor(size_in / size_out, dtype=torch.float32)  # as torch: float(input) / output
    source = (scale * (torch.arange(size_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    low = source.long()
    high = torch.where(low < size_in - 1, low + 1, low)
    upper = source - low.float()
    weights = torch.zeros(size_out, size_in, dtype=torch.float32)
    rows = torch.arange(size_out)
    weights.index_put_((rows, low), 1.0 - upper, accumulate=True)
    weights.index_put_((rows, high), upper, accumulate=True)
    return weights.to(device) if device is not None else weights


def bilinear_sources(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out,) the input cell nearest each output cell's sampling point (halves to the lower cell)."""
    scale = torch.tensor(size_in / size_out, dtype=torch.float32)
    source = (scale * (torch.arange(size_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    return torch.ceil(source - 0.5).long().clamp(0, size_in - 1)


def entry_order(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(keep, order) for kept tokens given per group (a tower row, a view) in the order they enter.

    Each group's tokens fill the places its own kept tokens occupy in the sequence, in the group's
    order (so AnyRes tiles, whose rows interleave in the sequence, stay in their rows); `order` is
    None when every group enters in sequence order.
    """
    keep = torch.sort(torch.cat(groups)).values
    order = torch.arange(keep.numel(), device=keep.device)
    for group in groups:
        order[torch.searchsorted(keep, torch.sort(group).values)] = torch.searchsorted(keep, group)
    identity = bool((order == torch.arange(keep.numel(), device=keep.device)).all())
    return keep, None if identity else order
