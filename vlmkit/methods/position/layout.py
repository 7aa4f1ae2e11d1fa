"""The walk all position methods share: text advances the position by one, each image or video
placeholder run is laid out by the method."""
from __future__ import annotations

from collections.abc import Callable

import torch

from vlmkit.engine.contexts import PositionContext

#: place(row, item, start, count, first) -> (positions of the run's `count` tokens, last position used);
#: `first` is the position right after the preceding token (1-D: (count,); M-RoPE: (3, count))
Placer = Callable[[int, int, int, int, float], tuple[torch.Tensor, float]]


def sequential_positions(context: PositionContext, place: Placer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Positions of a prefill's tokens in the caller's layout, (B, L) or (3, B, L): each sample starts
    where the model's own positions start, text tokens advance by one (all axes together), the
    method places each visual item's run (`VisualTokens.spans`), padding keeps the model's own."""
    default = context.positions.expand(*context.positions.shape[:-2], *context.valid.shape)
    result = default.to(dtype).clone()
    for row, visual in enumerate(context.visual):
        valid = context.valid[row]
        position = result[..., row, :]
        last = float(default[..., row, int(valid.long().argmax())].flatten()[0]) - 1
        cursor = 0
        for item, (start, count) in enumerate(visual.spans):
            last = _text(position, valid, cursor, start, last)
            span, last = place(row, item, start, count, last + 1)
            position[..., start : start + count] = span.to(dtype)
            cursor = start + count
        _text(position, valid, cursor, valid.numel(), last)
        result[..., row, :] = torch.where(valid, position, default[..., row, :].to(dtype))
    return result


def _text(position: torch.Tensor, valid: torch.Tensor, start: int, end: int, last: float) -> float:
    """Text tokens `start:end` advance by one from `last`; returns the last position written."""
    steps = valid[start:end].long().cumsum(0)
    position[..., start:end] = (last + steps).to(position.dtype)
    return last + float(steps[-1]) if steps.numel() else last


class ItemDraws:
    """The value each visual item gets: the configured one, or in training a seeded uniform draw
    from `choices` per item (V2PE's stride, HoPE's temporal scale)."""

    def __init__(self, value: float, choices: tuple[float, ...], train: bool, seed: int):
        self.value, self.choices, self.train = float(value), choices, train
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> float:
        if not self.train:
            return self.value
        return self.choices[int(torch.randint(len(self.choices), (1,), generator=self._generator))]
