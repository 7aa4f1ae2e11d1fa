"""Per-KV-head cache edits: applying a `HeadEdit` to a cache layer, recording it, and replaying it in a
recomputation.

A `HeadEdit` (LOOK-M) lets every KV head of a layer keep its own slots and rewrite kept entries as
weighted sums of entries (merges). `apply_head_edit` does it to a `CompactLayer` (the heads of a
row keep the same count, so one `valid` per row still serves the masks) and returns a
`HeadEditRecord`: the edit in caller-layout positions, independent of where the slots sat.

Under `Patch.reuse_selections()`, a recomputation without a cache runs the whole sequence in one
pass; `HeadReplay` makes each query see what the cached run's query at its position saw: the
prompt's queries (and every query before the first edit) the plain keys, a query at or after an
edit's logical length the entries that edit left (per head) plus the plain keys of the tokens that
came after it. It does so through the layer's own attention: the layer receives the edited entries
as extra keys and values before its own (its `past_key_values.update`) and a mask that shows each
query one view.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.engine.cache import CompactLayer, SlotLayout, pack
from vlmkit.engine.contexts import HeadEdit
from vlmkit.errors import InputError


@dataclass
class HeadEditRecord:
    """One per-head edit of one layer, in caller-layout positions.

    Attributes:
        length: the logical length when the edit was made (queries from this position on saw it).
        evicted: (rows, heads, slots) of the entries removed, each a (E,) long tensor.
        terms: (rows, heads, sources, targets, weights) of every term of a rewritten entry: the
            entry at `targets` became the sum of `weights` x the entries at `sources` (entries as they
            were before the edit).
    """

    length: int
    evicted: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    def rows_of(self, row: int) -> "HeadEditRecord":
        """The record's entries of one row (as row 0)."""
        pick = self.evicted[0] == row
        evicted = (torch.zeros_like(self.evicted[0][pick]), self.evicted[1][pick], self.evicted[2][pick])
        take = self.terms[0] == row
        terms = (torch.zeros_like(self.terms[0][take]),) + tuple(t[take] for t in self.terms[1:])
        return HeadEditRecord(self.length, evicted, terms)


def apply_head_edit(layer: CompactLayer, edit: HeadEdit, method: str, logical_length: int) -> HeadEditRecord | None:
    """Apply `edit` to `layer` (merges, then each head packed on the left); return its record, or None
    when it changes nothing."""
    layout = layer.layout
    valid = layout.valid
    batch, heads, slots = layer.keys.shape[:3]
    edit.validate(valid, heads, method)
    keep = edit.keep & valid[:, None, :]
    before = layout.slots_per_head(heads)
    present = valid[:, None, :].expand(batch, heads, slots)
    evicted = present & ~keep
    own = torch.arange(slots, device=valid.device).expand(batch, heads, slots)
    keys, values = layer.keys, layer.values
    changed = torch.zeros_like(keep)
    terms = None
    if edit.target is not None:
        live = (edit.target >= 0) & present
        target = edit.target.clamp(min=0)
        weight = torch.where(live, edit.weight.float(), torch.zeros((), device=valid.device))
        others = torch.zeros(batch, heads, slots, dtype=torch.long, device=valid.device)
        others = others.scatter_add(2, target, (live & (target != own)).long())
        self_weight = torch.where(live & (target == own), weight, torch.ones((), device=valid.device))
        changed = keep & ((others > 0) | (self_weight != 1))
        into_changed = live & changed.gather(2, target)
        if bool(changed.any()):
            index = target[..., None].expand(-1, -1, -1, keys.shape[-1])
            scale = (weight * into_changed)[..., None]
            merged_keys = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).scatter_add(2, index, scale * keys.float())
            merged_values = torch.zeros(values.shape, dtype=torch.float32, device=values.device).scatter_add(
                2, index, scale * values.float())
            keys = torch.where(changed[..., None], merged_keys.to(keys.dtype), keys)
            values = torch.where(changed[..., None], merged_values.to(values.dtype), values)
        rows, head, source = torch.nonzero(into_changed, as_tuple=True)
        terms = (rows, head, before[rows, head, source], before[rows, head, target[rows, head, source]],
                 weight[rows, head, source])
    if not bool(evicted.any()) and not bool(changed.any()):
        return None
    gather, packed_valid, _ = pack(keep.reshape(batch * heads, slots))
    gather = gather.view(batch, heads, -1)
    new_valid = packed_valid.view(batch, heads, -1)[:, 0]
    head_slot = before.gather(2, gather).masked_fill(~new_valid[:, None, :], -1)
    layer.edit_heads(gather, keys, values, SlotLayout(new_valid, head_slot[:, 0], layout.shift, layout.visual, head_slot))
    rows, head, slot = torch.nonzero(evicted, as_tuple=True)
    if terms is None:
        empty = torch.zeros(0, dtype=torch.long, device=valid.device)
        terms = (empty, empty, empty, empty, torch.zeros(0, device=valid.device))
    return HeadEditRecord(logical_length, (rows, head, before[rows, head, slot]), terms)


class HeadReplay:
    """The recorded per-head edits of one layer, replayed on a recomputation's stream.

    Build it before the layer runs (it needs only the stream's positions); pass `mask(...)` as the
    layer's attention mask and the object itself as its `past_key_values`: its `update` receives
    the layer's rotated keys and values of the stream and returns them behind the edited entries.
    """

    def __init__(self, records: list[HeadEditRecord], row_maps: list, slot: torch.Tensor, valid: torch.Tensor, heads: int):
        batch, length = valid.shape
        device = valid.device
        self.slot, self.valid, self.heads = slot, valid, heads
        self.total = int(slot.masked_fill(~valid, -1).max()) + 1
        # row and stream index of each (row, caller position)
        self.row_of = torch.full((batch, self.total), -1, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)[:, None].expand(batch, length)
        self.row_of[rows[valid], slot[valid]] = torch.arange(length, device=device).expand(batch, length)[valid]
        alive = torch.zeros(batch, heads, self.total, dtype=torch.bool, device=device)
        alive.permute(0, 2, 1)[self.row_of >= 0] = True
        self.steps, self.blocks, self.lengths = [], [], []
        for record in sorted((r for r in records if r.length < self.total), key=lambda r: r.length):
            step = self._for_rows(record, row_maps, batch)
            rows_e, heads_e, slots_e = step.evicted
            if bool((slots_e >= self.total).any()) or bool((self.row_of[rows_e, slots_e] < 0).any()):
                raise InputError("reuse_selections(): a recorded cache edit names a token this recomputation does not hold; "
                                 "recompute the same batch and prompts as the cached generation")
            alive[rows_e, heads_e, slots_e] = False
            shown = alive.clone()
            shown[..., record.length:] = False
            counts = shown.sum(dim=2)
            if not bool((counts == counts[:, :1]).all()):
                raise InputError("reuse_selections(): the replayed cache edit leaves the heads of a row different counts")
            gather, packed_valid, _ = pack(shown.reshape(batch * heads, self.total))
            self.steps.append(step)
            self.blocks.append((gather.view(batch, heads, -1), packed_valid.view(batch, heads, -1)[:, 0]))
            self.lengths.append(record.length)

    @staticmethod
    def _for_rows(record: HeadEditRecord, row_maps: list, batch: int) -> HeadEditRecord:
        """The record's entries for the rows of this recomputation: each row takes those of the cached
        row it descends from when the edit was made (beam search reorders rows after it)."""
        ancestors = []
        for row in range(batch):
            for length, index in reversed(row_maps):
                if record.length <= length:
                    row = int(index[row])
            ancestors.append(row)
        if ancestors == list(range(batch)):
            return record
        parts = [record.rows_of(ancestor) for ancestor in ancestors]
        evicted = tuple(torch.cat([p.evicted[i] + (row if i == 0 else 0) for row, p in enumerate(parts)]) for i in range(3))
        terms = tuple(torch.cat([p.terms[i] + (row if i == 0 else 0) for row, p in enumerate(parts)]) for i in range(5))
        return HeadEditRecord(record.length, evicted, terms)

    @property
    def active(self) -> bool:
        return bool(self.steps)

    def key_valid(self) -> torch.Tensor:
        return torch.cat([valid for _, valid in self.blocks] + [self.valid], dim=1)

    def mask_function(self):
        """`(b, h, q, kv) -> bool` over this call's queries and the keys `update` returns."""
        slot, valid = self.slot, self.valid
        device = slot.device
        lengths = torch.tensor(self.lengths, device=device)
        view = torch.searchsorted(lengths, slot.contiguous(), right=True)  # (B, Q): 0 = no edit yet
        start = torch.cat([torch.zeros(1, dtype=torch.long, device=device), lengths])[view]  # (B, Q)
        raw = valid[:, None, :] & (slot[:, None, :] <= slot[:, :, None]) & (slot[:, None, :] >= start[..., None])
        parts = [block_valid[:, None, :] & (view == index + 1)[..., None] for index, (_, block_valid) in enumerate(self.blocks)]
        allowed = torch.cat(parts + [raw], dim=2)
        return lambda b, h, q, kv: allowed[b, q, kv]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The edited entries of each view, then the layer's own keys and values."""
        keys = [self._entries(*view) for view in self._views(key_states)]
        values = [self._entries(*view) for view in self._views(value_states)]
        return torch.cat(keys + [key_states], dim=2), torch.cat(values + [value_states], dim=2)

    def _views(self, states: torch.Tensor):
        """Per edit, (the entries by caller position after it, the gather of the ones shown)."""
        batch, heads, _, width = states.shape
        dense = torch.zeros(batch, heads, self.total, width, dtype=states.dtype, device=states.device)
        rows = torch.arange(batch, device=states.device)[:, None].expand_as(self.slot)
        dense.permute(0, 2, 1, 3)[rows[self.valid], self.slot[self.valid]] = states.permute(0, 2, 1, 3)[self.valid]
        for step, (gather, _) in zip(self.steps, self.blocks):
            rows_t, heads_t, sources, targets, weights = step.terms
            if rows_t.numel():
                summed = torch.zeros(batch, heads, self.total, width, dtype=torch.float32, device=states.device)
                summed.index_put_((rows_t, heads_t, targets), weights[:, None] * dense[rows_t, heads_t, sources].float(),
                                  accumulate=True)
                dense = dense.clone()
                dense[rows_t, heads_t, targets] = summed[rows_t, heads_t, targets].to(states.dtype)
            yield dense, gather

    @staticmethod
    def _entries(dense: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
        return dense.gather(2, gather[..., None].expand(-1, -1, -1, dense.shape[-1]))
