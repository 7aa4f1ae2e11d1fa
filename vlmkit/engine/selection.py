"""What a token method sees (`SelectionContext`) and what it returns (`Selection`).

Indices in a selection are always *within one sample's visual tokens* (0 .. n-1, in sequence
order), never positions in the padded batch: the engine owns the mapping to slots, masks,
positions and cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmkit.errors import InputError


@dataclass
class VisualTokens:
    """The visual tokens of one sample, in sequence order, with where each came from.

    Attributes:
        slots: (n,) position of each token in the current (possibly compacted) sequence.
        origin: (n,) index of each token among the sample's visual tokens before any pruning.
        image: (n,) which image or video of the sample (0, 1, ...) the token belongs to.
        frame, row, col: (n,) grid coordinates within that image (frame 0 for still images).
        crop: (n,) AnyRes crop the token came from (0 = the base view), 0 where not applicable.
        grids: per image, its (frames, rows, cols) token grid.
        spans: per image, (first slot, placeholder count) of its placeholder run in the prefill's
            layout, structural tokens (image newlines) included; for an item whose placeholders come
            in several runs (Qwen3-VL's frames), from its first placeholder to its last, the text
            between the runs included.
        modality: per image, "image" or "video".
        probes: per image, vision-tower probe results for its tokens (before any pruning), or None.
        deepstack: (levels, n, D) each token's DeepStack features (Qwen3-VL), what the engine adds to
            its hidden state after the decoder layers that take them; None for families without.
            Subsets carry each kept token's own features; the engine combines them where a
            selection merges tokens.
    """

    slots: torch.Tensor
    origin: torch.Tensor
    image: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    crop: torch.Tensor
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    modality: list[str] = field(default_factory=list)
    probes: list[dict[str, torch.Tensor] | None] = field(default_factory=list)
    deepstack: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.slots.numel())

    def subset(self, index: torch.Tensor) -> "VisualTokens":
        """The tokens at `index` (an index into this sample's visual tokens), slots unchanged.

        Vision probes describe the tokens before pruning, so the subset carries none; DeepStack
        features go with their tokens.
        """
        pick = lambda t: t[index]  # noqa: E731
        return VisualTokens(
            pick(self.slots), pick(self.origin), pick(self.image), pick(self.frame), pick(self.row),
            pick(self.col), pick(self.crop), list(self.grids), list(self.spans), list(self.modality),
            deepstack=None if self.deepstack is None else self.deepstack[:, index.to(self.deepstack.device)],
        )

    def image_index(self, image: int) -> torch.Tensor:
        """Indices (within this sample's visual tokens) of the tokens of one image."""
        return torch.nonzero(self.image == image).flatten()


COMBINE_SPACES = ("llm", "vision")
#: what a selector may need from a decoder layer's attention (`TokenSelector.needs`)
ATTENTION_NEEDS = frozenset({"last_row_attention", "text_attention", "keys"})


@dataclass
class SampleSelection:
    """The selection for one sample.

    Attributes:
        keep: sorted indices of the kept visual tokens.
        merge_target: optional (n,) long: for every visual token, the position *in `keep`* of the kept
            token it is averaged into, or -1 when it is simply dropped. A kept token maps to itself.
        merge_weight: optional (n,) non-negative weights of that average (default: equal).
        combine: optional (k, n) float, instead of `merge_target`: kept token i becomes
            `sum_j combine[i, j] x_j` over the sample's visual tokens x (any linear combination: a
            target plus the mean of its joiners, a k-nearest-neighbour average, an interpolation). Rows
            equal to the kept token's own one-hot row leave it untouched.
        combine_space: where `combine` acts: "llm" (the LLM's input, what the projector gives) or
            "vision" (the vision features the projector reads, then projected; needs
            "vision_features", selections before the LLM only).
        order: optional (k,) permutation of 0..k-1: the kept tokens enter the sequence as
            `keep[order]` (e.g. VisionZip's dominant tokens, then its contextual ones), filling the
            places the kept tokens occupy; None keeps sequence order.
    """

    keep: torch.Tensor
    merge_target: torch.Tensor | None = None
    merge_weight: torch.Tensor | None = None
    combine: torch.Tensor | None = None
    combine_space: str = "llm"
    order: torch.Tensor | None = None

    def validate(self, available: int, method: str) -> None:
        keep = self.keep
        if keep.dtype != torch.long or keep.ndim != 1:
            raise TypeError(f"{method}: Selection.keep must be a 1-D long tensor, got {keep.dtype} {tuple(keep.shape)}")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= available):
            raise InputError(f"{method}: kept index out of range for a sample with {available} visual tokens")
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise InputError(f"{method}: Selection.keep must be strictly increasing (sorted, no repeats)")
        if self.merge_target is not None and self.merge_target.shape != (available,):
            raise InputError(f"{method}: merge_target must have one entry per visual token ({available})")
        if self.combine is not None:
            if self.merge_target is not None:
                raise InputError(f"{method}: give merge_target or combine, not both")
            if self.combine.shape != (keep.numel(), available) or not self.combine.is_floating_point():
                raise InputError(f"{method}: combine must be a float (kept, visual) = ({keep.numel()}, {available}) matrix")
            if self.combine_space not in COMBINE_SPACES:
                raise InputError(f"{method}: combine_space={self.combine_space!r} is not one of {', '.join(COMBINE_SPACES)}")
        if self.order is not None:
            expected = torch.arange(keep.numel(), device=self.order.device)
            if self.order.dtype != torch.long or not torch.equal(torch.sort(self.order).values, expected):
                raise InputError(f"{method}: Selection.order must be a permutation of 0..{keep.numel() - 1}")

    def changed_rows(self) -> torch.Tensor:
        """Positions in `keep` of the kept tokens `combine` changes (rows other than their own one-hot)."""
        own = torch.zeros_like(self.combine)
        own[torch.arange(self.keep.numel(), device=own.device), self.keep] = 1
        return torch.nonzero((self.combine != own).any(dim=1)).flatten()


@dataclass
class Selection:
    """Per-sample selections, in batch order."""

    samples: list[SampleSelection]

    @classmethod
    def keep_all(cls, visual: list[VisualTokens]) -> "Selection":
        return cls([SampleSelection(torch.arange(len(v), device=v.slots.device)) for v in visual])


@dataclass
class SelectionContext:
    """What the engine shows a `TokenSelector` at its compaction point.

    Attributes:
        hidden: (B, L, D) hidden states entering decoder layer `layer` in the current layout.
        valid: (B, L) bool, False on padding (text tokens are the valid rows that are not visual).
        visual: per sample, its remaining visual tokens.
        layer: the decoder layer before which the selection applies (0 = before the LLM).
        num_layers: decoder layers in the LLM.
        last_row_attention: per sample, (n,) attention the last token pays to each visual token at
            layer `layer - 1` (softmax over the whole sequence, mean over heads), when requested; with
            `attention_layer = "own"` at layer `layer` itself, from its input (PyramidDrop).
        text_attention: per sample, (T, n) the same for every text token after the sample's last
            visual token (softmax over what each query sees), when requested; `text_rows` gives
            their rows in `hidden`.
        keys: (B, H_kv, L, d) that layer's rotated keys of the stream's tokens, when requested.
        embeds: (B, L, D) the LLM's input embeddings of the stream's tokens (what layer 0
            received), when requested ("embeds").
        final_norm: the language model's final norm (a function of hidden states), for methods
            that compare tokens as the output head sees them (DART).
        vision: per sample, per image, the vision-tower probe results mapped to that image's tokens
            (dict with "importance" (n_img,) and "keys" (n_img, d)), when requested.
        call_index: how many selections this method has made before (for seeded methods).
    """

    hidden: torch.Tensor
    visual: list[VisualTokens]
    layer: int
    num_layers: int
    valid: torch.Tensor | None = None
    last_row_attention: list[torch.Tensor] | None = None
    text_attention: list[torch.Tensor] | None = None
    text_rows: list[torch.Tensor] | None = None
    keys: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    vision: list[list[dict[str, torch.Tensor]]] | None = None
    call_index: int = 0
