"""A KV-cache layer that remembers which of its slots are real tokens, after pruning.

After pruning, the cached prefix of a layer is shorter than the prompt and, in a padded batch,
each row has its own kept tokens (re-padded on the left). `CompactLayer` keeps the KV tensors as
`DynamicLayer` does plus, per row, the validity of each physical slot and the position shift of
the `reindex` policy. It reports the *logical* length (the prompt as the user sent it plus the
generated tokens) through `get_seq_length()`, so `generate()` keeps slicing inputs and building
positions in the original layout, and its physical length through `physical_length`. Beam search
reorders, repeats and selects rows of the bookkeeping together with the keys and values.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class CompactLayer(DynamicLayer):
    """`DynamicLayer` plus per-row slot validity, logical length and position shift."""

    def __init__(self) -> None:
        super().__init__()
        self.valid: torch.Tensor | None = None  # (B, physical) bool
        self.position_shift: torch.Tensor | None = None  # (B,) long, subtracted from incoming positions
        self.logical_length = 0

    @classmethod
    def from_layer(cls, layer: DynamicLayer, attention_mask: torch.Tensor | None) -> "CompactLayer":
        """Wrap an already filled uncompacted layer (a continued conversation)."""
        compact = cls()
        length = layer.get_seq_length()
        if length:
            compact.lazy_initialization(layer.keys, layer.values)
            compact.keys, compact.values = layer.keys, layer.values
            batch = layer.keys.shape[0]
            if attention_mask is not None:
                compact.valid = attention_mask[:, :length].to(torch.bool)
            else:
                compact.valid = torch.ones(batch, length, dtype=torch.bool, device=layer.keys.device)
            compact.position_shift = torch.zeros(batch, dtype=torch.long, device=layer.keys.device)
            compact.logical_length = length
        return compact

    @property
    def physical_length(self) -> int:
        return super().get_seq_length()

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_length + query_length, 0

    def record(self, valid: torch.Tensor, logical_added: int, position_shift: torch.Tensor) -> None:
        """Book the slots the layer's `update` just appended (called by the engine after each layer)."""
        self.valid = valid
        self.logical_length += logical_added
        self.position_shift = position_shift

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
            self.position_shift = self.position_shift.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)
            self.position_shift = self.position_shift.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices]
            self.position_shift = self.position_shift[indices]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.valid is not None:
            self.valid = self.valid[:, :tokens_to_remove]
            self.logical_length += tokens_to_remove

    def reset(self) -> None:
        super().reset()
        self.valid, self.position_shift, self.logical_length = None, None, 0
