"""A KV-cache layer that remembers which of its slots are real tokens, after pruning or routing.

After pruning, routing or eviction, the cached prefix of a layer is shorter than the prompt and,
in a padded batch, each row has its own kept tokens (re-padded on the left). `CompactLayer` keeps
the KV tensors as `DynamicLayer` does plus a `SlotLayout`: per row, the validity of each physical
slot, the caller-layout position of the token in it, and the position shift of later tokens. It
reports the *logical* length (the prompt as the user sent it plus the generated tokens) through
`get_seq_length()`, so `generate()` keeps slicing inputs and building positions in the original
layout, and its physical length through `physical_length`. Layers that hold the same slots share
one layout object, so the engine builds one mask for them. Beam search reorders, repeats and
selects rows of the layout together with the keys and values.

A per-head cache edit (`vlmkit.engine.contexts.HeadEdit`, LOOK-M) leaves each KV head of a layer
holding its own tokens, some of them rewritten as merges; every head of a row keeps the same count,
so one `valid` per row still describes the slots, and `SlotLayout.head_slot` says which token each
head holds in each slot. Such a layer also keeps, per head and slot, the attention its entries
have received (`CompactLayer.scores`) when a cache method asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer


@dataclass(eq=False)
class SlotLayout:
    """The slots of one cache layer (shared by every layer that holds the same tokens).

    Attributes:
        valid: (B, S) bool, True where the slot holds a token.
        slot: (B, S) long, the caller-layout position of that token (-1 where none).
        shift: (B,) per row, what the layer subtracts from the caller's positions of later tokens
            (the `reindex` policy, position methods).
        visual: per row, the visual tokens of the prefill that filled the cache, their `slots` in the
            caller's layout (what attention and cache methods read at decoding steps), or None.
        head_slot: (B, H_kv, S) long, per KV head, the caller-layout position of the token each slot
            holds (a merged entry: the kept token it was merged into), after a per-head edit made the
            heads differ; None while every head holds the tokens `slot` names. Then `slot` is head
            0's row of it: right for the slots every head agrees on (the prompt's text, the recent
            window, every later token) and for masks over this call's queries, but not a name for
            another head's entry; the engine refuses attention methods (which mask by key slot) next to
            a per-head cache method, and cache methods read `CacheContext.head_slots`.
    """

    valid: torch.Tensor
    slot: torch.Tensor
    shift: torch.Tensor
    visual: list | None = None
    head_slot: torch.Tensor | None = None

    def extended(self, valid: torch.Tensor, slot: torch.Tensor) -> "SlotLayout":
        """The layout after appending slots (a decoding step's tokens)."""
        head_slot = None
        if self.head_slot is not None:
            added = slot[:, None, :].expand(-1, self.head_slot.shape[1], -1)
            head_slot = torch.cat([self.head_slot, added], dim=2)
        return SlotLayout(torch.cat([self.valid, valid], dim=1), torch.cat([self.slot, slot], dim=1), self.shift, self.visual,
                          head_slot)

    def rows(self, index: torch.Tensor) -> "SlotLayout":
        """The layout of the rows `index` (reordered, repeated or selected)."""
        index = index.to(self.valid.device)
        visual = None if self.visual is None else [self.visual[row] for row in index.tolist()]
        head_slot = None if self.head_slot is None else self.head_slot[index]
        return SlotLayout(self.valid[index], self.slot[index], self.shift[index], visual, head_slot)

    def cropped(self, physical: int) -> "SlotLayout":
        head_slot = None if self.head_slot is None else self.head_slot[:, :, :physical]
        return SlotLayout(self.valid[:, :physical], self.slot[:, :physical], self.shift, self.visual, head_slot)

    def slots_per_head(self, heads: int) -> torch.Tensor:
        """(B, heads, S) the caller-layout position of each head's token in each slot (-1: none)."""
        if self.head_slot is not None:
            return self.head_slot
        return self.slot.masked_fill(~self.valid, -1)[:, None, :].expand(-1, heads, -1)


class CompactLayer(DynamicLayer):
    """`DynamicLayer` plus a `SlotLayout` and the logical length."""

    def __init__(self) -> None:
        super().__init__()
        self.layout: SlotLayout | None = None
        self.logical_length = 0
        # (B, H_kv, S) float32, per KV head, the attention each slot has received (summed over the
        # query heads of that KV head and over every query since the prefill), when a cache method
        # needs it; None otherwise
        self.scores: torch.Tensor | None = None
        # every change of the rows, in order: (logical length, index), the new row r being the old
        # row index[r] (beam search), so that a recomputation finds each row's past
        self.row_maps: list[tuple[int, torch.Tensor]] = []

    @classmethod
    def from_layer(cls, layer: DynamicLayer, attention_mask: torch.Tensor | None) -> "CompactLayer":
        """Wrap an already filled uncompacted layer (a continued conversation)."""
        compact = cls()
        length = layer.get_seq_length()
        if length:
            compact.lazy_initialization(layer.keys, layer.values)
            compact.keys, compact.values = layer.keys, layer.values
            batch, device = layer.keys.shape[0], layer.keys.device
            if attention_mask is not None:
                valid = attention_mask[:, :length].to(torch.bool)
            else:
                valid = torch.ones(batch, length, dtype=torch.bool, device=device)
            slot = torch.arange(length, device=device).expand(batch, length).masked_fill(~valid, -1)
            compact.layout = SlotLayout(valid, slot, torch.zeros(batch, dtype=torch.long, device=device))
            compact.logical_length = length
        return compact

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self.layout is None else self.layout.valid

    @property
    def position_shift(self) -> torch.Tensor | None:
        return None if self.layout is None else self.layout.shift

    @property
    def physical_length(self) -> int:
        return super().get_seq_length()

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length + query_length, 0

    def record(self, layout: SlotLayout, logical_added: int) -> None:
        """Book the slots the layer's `update` just appended (called by the engine after each layer)."""
        self.layout = layout
        self.logical_length += logical_added

    def keep_slots(self, keep: torch.Tensor, layout: SlotLayout) -> None:
        """Remove the slots where `keep` (B, S) is False; the rows are re-packed on the left.

        `layout` is the layout after the removal (the engine builds it once for the layers that
        shared one).
        """
        gather = pack(keep)[0]
        index = gather[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)
        self.layout = layout

    def edit_heads(self, gather: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: SlotLayout) -> None:
        """Replace the cache by a per-head one: slot j of head h of row b holds what slot
        `gather[b, h, j]` of `keys` / `values` (B, H_kv, S, d) holds, `layout` the layout after it."""
        index = gather[..., None].expand(-1, -1, -1, keys.shape[-1])
        self.keys, self.values = keys.gather(2, index), values.gather(2, index)
        if self.scores is not None:
            self.scores = self.scores.gather(2, gather)
        self.layout = layout

    def add_scores(self, received: torch.Tensor) -> None:
        """Add one call's attention per head (B, H_kv, S) to the slots' accumulated scores (the slots
        this call appended start from 0)."""
        if self.scores is None:
            self.scores = torch.zeros_like(received)
        elif self.scores.shape[2] < received.shape[2]:
            self.scores = torch.nn.functional.pad(self.scores, (0, received.shape[2] - self.scores.shape[2]))
        self.scores = self.scores + received

    def _rows(self, index: torch.Tensor) -> None:
        if self.layout is not None:
            self.layout = self.layout.rows(index)
        if self.scores is not None:
            self.scores = self.scores[index.to(self.scores.device)]
        self.row_maps.append((self.logical_length, index.detach().cpu()))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.layout is not None:
            rows = torch.arange(self.layout.valid.shape[0], device=self.layout.valid.device)
            self._rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.layout is not None:
            rows = torch.arange(self.layout.valid.shape[0], device=self.layout.valid.device)
            self._rows(rows[indices])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.layout is not None:
            self.layout = self.layout.cropped(self.layout.valid.shape[1] + tokens_to_remove)
            self.logical_length += tokens_to_remove
            if self.scores is not None:
                self.scores = self.scores[:, :, : self.layout.valid.shape[1]]

    def reset(self) -> None:
        super().reset()
        self.layout, self.logical_length, self.scores = None, 0, None
        self.row_maps = []


class CompactSlidingLayer(CompactLayer):
    """`CompactLayer` of a sliding-window attention layer.

    A query at caller-layout position q sees the keys at positions p with q - p < `window` (the window is
    measured in the prompt's original positions, so at neutral settings it is the model's own; after
    pruning a dropped token leaves a hole in the window rather than letting an older token in, and the
    window does not move with a `reindex` position policy or a position method). After each call the
    engine calls `trim`: each row keeps only the slots a later query can still see (positions above
    logical length - window, at most `window` - 1 of them), as `DynamicSlidingWindowLayer` keeps the
    last `window` - 1 tokens.
    """

    is_sliding = True

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    @classmethod
    def from_sliding(cls, layer: DynamicLayer, attention_mask: torch.Tensor | None) -> "CompactSlidingLayer":
        """Wrap an already filled `DynamicSlidingWindowLayer` (a continued conversation): it holds the last
        tokens of the sequence, up to `window` - 1 of them."""
        compact = cls(layer.sliding_window)
        length = layer.get_seq_length()
        if length:
            compact.lazy_initialization(layer.keys, layer.values)
            compact.keys, compact.values = layer.keys, layer.values
            kept = layer.keys.shape[2]
            batch, device = layer.keys.shape[0], layer.keys.device
            positions = torch.arange(length - kept, length, device=device).expand(batch, kept)
            if attention_mask is not None:
                valid = attention_mask[:, length - kept : length].to(torch.bool)
            else:
                valid = torch.ones(batch, kept, dtype=torch.bool, device=device)
            compact.layout = SlotLayout(valid, positions.masked_fill(~valid, -1), torch.zeros(batch, dtype=torch.long, device=device))
            compact.logical_length = length
        return compact

    def visible(self) -> torch.Tensor:
        """(B, S) the slots a query after the last call can still see."""
        return self.layout.valid & (self.layout.slot > self.logical_length - self.window)

    def trim(self, trimmed: dict) -> None:
        """Drop the slots no later query can see. `trimmed` maps a layout to its trimmed one, so that layers
        that shared a layout share the trimmed one."""
        if self.layout is None:
            return
        keep = self.visible()
        if torch.equal(keep, self.layout.valid):
            return
        if self.layout not in trimmed:
            gather, valid, _ = pack(keep)
            slot = self.layout.slot.gather(1, gather).masked_fill(~valid, -1)
            head_slot = None
            if self.layout.head_slot is not None:
                head_slot = self.layout.head_slot.gather(2, gather[:, None, :].expand(-1, self.layout.head_slot.shape[1], -1))
            trimmed[self.layout] = SlotLayout(valid, slot, self.layout.shift, self.layout.visual, head_slot)
        layout = trimmed[self.layout]
        if self.scores is not None:
            self.scores = self.scores.gather(2, pack(keep)[0][:, None, :].expand(-1, self.scores.shape[1], -1))
        self.keep_slots(keep, layout)


def pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-packed positions of the True entries of `keep` (B, L), row by row.

    Returns:
        gather: (B, L') long, the old index of each new position (0 on padding);
        valid: (B, L') bool, False on the left padding;
        rank: (B, L) long, the new position of each old entry (meaningful where `keep`).
    """
    batch, length = keep.shape
    counts = keep.sum(dim=1)
    new_length = int(counts.max()) if batch else 0
    pad = new_length - counts
    rank = keep.long().cumsum(dim=1) - 1 + pad[:, None]
    rows = torch.arange(batch, device=keep.device)[:, None].expand(batch, length)
    old = torch.arange(length, device=keep.device).expand(batch, length)
    gather = torch.zeros(batch, new_length, dtype=torch.long, device=keep.device)
    gather[rows[keep], rank[keep]] = old[keep]
    valid = torch.arange(new_length, device=keep.device)[None, :] >= pad[:, None]
    return gather, valid, rank
