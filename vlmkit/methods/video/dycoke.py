"""DyCoke: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao, Qin, You,
Sui, Wang, CVPR 2025, arXiv:2411.15024).

Reference: KD-TAO/DyCoke @dd74634: `llava/model/llava_arch.py:dycole_ttm` (temporal token merging)
and `llava/model/language_model/modeling_qwen2.py` (`PrunableDynamicCache.dycoke_pruning`,
`update_cache`, and the decoder loop that calls them); defaults from the README's command
(`dycoke_l=3, dycoke_p=0.7, dycoke_k=0.7`; the lmms-eval wrapper's own default is p = 0.8).

Sites: `embeds` (stage 1, before the LLM), `cache` and `attention` (stage 2, while decoding).

Stage 1, temporal token merging (TTM), per video of T frames of N tokens (x_t(p): the LLM-input
embedding of the token at grid place p of frame t), with c = int((1 - K) N) and K = `ttm_drop`:

- pass 1, frame pairs (0, 1), (2, 3), ...: frame 2i is kept whole; of frame 2i+1 only the c tokens
  of the lowest cos(x_{2i}(p), x_{2i+1}(p)) are kept;
- pass 2, frames (0, 2), (4, 6), ...: frame 4i stays whole; frame 4i+2 keeps only its c tokens of the
  lowest cos(x_{4i}(p), x_{4i+2}(p)), on the original embeddings.

So in each group of four frames the first is whole and the other three keep c tokens each. The
reference drops the other tokens (nothing is averaged, despite the name), and a reduced frame's
kept tokens enter in order of increasing similarity (its `topk(largest=False)` order); whole frames
and images enter as they are.

Stage 2, dynamic KV pruning while decoding. With a_t the attention the current token pays the
video's cached tokens at layer L - 1 (L = `kv_layer`; softmax over the whole cache, mean over
heads), the layers >= L attend, of the video, only to the int((1 - P) n) tokens of the highest a
(P = `kv_drop`, n the video tokens in the cache); the set is chosen at the first step and chosen
again whenever

    cos(a_t, a_{t-1}) < `kv_threshold` (0.9).

Text, generated tokens and layers < L always see everything. The other video tokens stay in the
cache (the reference keeps its whole cache and gathers the kept entries at each layer >= L), so a
later re-selection can bring them back: they are hidden through the attention mask, not removed.

Deviations from the reference, and why:
- frames, places and spans come from the engine's frame/row/col and the cache's slots (the
  reference hard-codes 196 tokens per frame, the video at position 14 and batch size 1); per
  sample, and per video for TTM; images are untouched;
- TTM's pass 2 covers every group of four frames with a third frame; the reference's
  `range(0, T - 4, 4)` leaves out the last group (and any clip of at most four frames);
- an unpaired last frame (odd T) is kept whole (the reference's output holds paired frames only, so
  it loses that frame entirely);
- a frame that keeps all its tokens (`ttm_drop=0`) enters unchanged (the reference reorders it by
  similarity); ties go to the earlier token (stable sorts; `topk` leaves them unspecified);
  similarities in float32 (the reference: the model's dtype);
- stage 2's span is all the sample's cached video tokens (the reference's span, `image_token_length`
  = TTM's output length - 1, leaves out the last video token);
- stage 2 acts one step later than the reference: the engine shows a cache method the attention
  after a step, so a selection made from step t's attention applies from step t + 1 (the first one
  from the last prompt token, applied from the first decoding step, where the reference starts);
- a step whose cosine stays >= 0.9 keeps the previous selection; the reference, read literally,
  clears its selection at every step and so attends to the whole cache at those steps;
- the previous attention row is forgotten at each prefill (the reference carries it over between
  generate calls);
- under beam search the beams of one sample share one selection, made from their mean attention:
  the engine does not show cache methods how beams reorder the rows, and a shared selection does
  not depend on it (with one sequence per sample, greedy or sampled, this is the reference's rule);
- no eager attention is needed (the reference reads `output_attentions`, its issue #11).

Positions: TTM shortens the sequence; on 1-D rotary models the kept tokens are re-indexed (as in the
reference, where TTM runs before positions exist), under M-RoPE they keep their (t, h, w).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.contexts import AttentionContext, CacheContext
from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext, VisualTokens
from vlmkit.errors import ConfigError, InputError
from vlmkit.methods.base import POSITION_POLICIES, AttentionMethod, CacheMethod, MethodConfig, TokenSelector, top_k_sorted
from vlmkit.methods.prune._grid import entry_order
from vlmkit.methods.video import WITHOUT_VIDEO, frame_grid, videos
from vlmkit.registry import register_method


@dataclass(frozen=True)
class DyCokeConfig(MethodConfig):
    ttm_drop: float = field(default=0.7, metadata={"help": "K: share of the tokens TTM drops from each compared frame, in [0, 1] (0: TTM off)"})
    kv_drop: float = field(default=0.7, metadata={"help": "P: share of the video's cached tokens hidden from layers >= kv_layer while decoding, in [0, 1] (0: off)"})
    kv_layer: int = field(default=3, metadata={"help": "L: decoding pruning acts in layers >= L, from the attention at layer L - 1 (L >= 1)"})
    kv_threshold: float = field(default=0.9, metadata={"help": "re-select the kept tokens when the cosine of two steps' attention is below this, in [0, 1]"})
    positions: str = field(
        default="auto",
        metadata={"help": "position ids after TTM: 'keep', 'reindex', or 'auto' (re-index on 1-D rotary models, keep under M-RoPE)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, meaning in (("ttm_drop", "the dropped share K"), ("kv_drop", "the hidden share P"), ("kv_threshold", "the cosine threshold")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"dycoke: {name}={value!r} is out of range: {meaning} must be a number in [0, 1]")
        if isinstance(self.kv_layer, bool) or not isinstance(self.kv_layer, int) or self.kv_layer < 1:
            raise ConfigError(f"dycoke: kv_layer={self.kv_layer!r} must be an integer >= 1 (it reads the attention of layer kv_layer - 1)")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"dycoke: positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")


def ttm(features: torch.Tensor, drop: float) -> list[torch.Tensor]:
    """Temporal token merging of one video: its (T, N, D) features (frames, grid cells in row-major
    order) -> per frame, the kept cells in the order they enter (a reduced frame: by increasing
    similarity to the frame it is compared with)."""
    frames, cells = features.shape[:2]
    whole = torch.arange(cells, device=features.device)
    kept = [whole] * frames
    count = int((1 - drop) * cells)
    if count >= cells:
        return kept
    features = features.float()

    def least_similar(first: int, second: int) -> torch.Tensor:
        similarity = F.cosine_similarity(features[first], features[second], dim=-1)
        return torch.argsort(similarity, stable=True)[:count]

    for first in range(0, frames - 1, 2):  # pass 1: (0, 1), (2, 3), ...
        kept[first + 1] = least_similar(first, first + 1)
    for first in range(0, frames - 2, 4):  # pass 2: (0, 2), (4, 6), ...
        kept[first + 2] = least_similar(first, first + 2)
    return kept


def cache_keep(attention: torch.Tensor, drop: float) -> torch.Tensor:
    """Positions (sorted) of the int((1 - P) n) video tokens of the highest attention, of n."""
    return top_k_sorted(attention, int(attention.numel() * (1 - drop)))


def reselects(attention: torch.Tensor, previous: torch.Tensor | None, threshold: float) -> bool:
    """Whether this step chooses the kept tokens again: at the first step, or when the cosine of this
    step's attention with the previous step's is below `threshold`."""
    if previous is None or previous.shape != attention.shape:
        return True
    return bool(F.cosine_similarity(attention.float(), previous.float(), dim=0) < threshold)


@dataclass
class _Sequence:
    """Stage 2's state of one sequence (or of the beams of one sample): the previous step's attention
    over the video tokens and, in time order, each selection as (first query slot, kept slots, hidden
    slots), slots in the caller's layout."""

    previous: torch.Tensor | None = None
    selections: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@register_method("dycoke", family="video", sites=("embeds", "attention", "cache"))
class DyCoke(TokenSelector, AttentionMethod, CacheMethod):
    """Drop tokens repeated across frames, then decode with the most attended video tokens, re-chosen when attention shifts."""

    Config = DyCokeConfig
    example = "kv_layer=2"
    neutral = "ttm_drop=0.0,kv_drop=0.0"
    paper = "https://arxiv.org/abs/2411.15024"
    modalities = frozenset({"video"})
    unsupported = WITHOUT_VIDEO
    natural_positions = "reindex"
    cache_needs = frozenset({"attention"})

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        if self.config.kv_drop == 0:  # no decoding stage: leave the attention and cache sites free
            self.sites = ("embeds",)
        self._start_prefill()

    def check_adapter(self, adapter) -> None:
        layers = len(adapter.decoder_layers)
        if self.config.kv_drop > 0 and not 1 <= self.config.kv_layer < layers:
            raise ConfigError(
                f"dycoke: kv_layer={self.config.kv_layer} is out of range for a language model with {layers} decoder "
                f"layers (valid: 1..{layers - 1})"
            )

    # ------------------------------------------------------------------ stage 1
    def select(self, context: SelectionContext) -> Selection:
        self._start_prefill()  # a new prefill (a recomputation under reuse_selections() replays instead)
        samples = []
        for row, visual in enumerate(context.visual):
            device = visual.slots.device
            groups, covered = [], torch.zeros(len(visual), dtype=torch.bool, device=device)
            for video in videos(visual):
                grid = frame_grid(visual, video)
                for frame, cells in enumerate(ttm(context.hidden[row, visual.slots[grid]], self.config.ttm_drop)):
                    groups.append(grid[frame, cells.to(device)])
                covered[grid.flatten()] = True
            groups.append(torch.nonzero(~covered).flatten())  # images, whole and in sequence order
            keep, order = entry_order(groups)
            samples.append(SampleSelection(keep, order=order))
        return Selection(samples)

    # ------------------------------------------------------------------ stage 2
    def _start_prefill(self) -> None:
        # The cache rows of a generation continue the prefill rows whose visual tokens they carry
        # (`CacheContext.visual`, reordered with the rows under beam search): those objects name
        # the sequences, held here so that their ids stay theirs.
        self._roots: list[VisualTokens] = []
        self._root_of: dict[int, int] = {}
        self._sequences: dict[int, _Sequence] = {}
        self._rows_at: dict[int, list[int]] = {}  # logical length after a call -> each row's sequence

    def _root(self, visual: VisualTokens) -> int:
        index = self._root_of.get(id(visual))
        if index is None:
            index = self._root_of[id(visual)] = len(self._roots)
            self._roots.append(visual)
        return index

    def edit_cache(self, context: CacheContext) -> None:
        """After the prefill and each decoding step: read the last token's attention to the video at
        layer L - 1 and, at the first step or when it moved, choose the video tokens layers >= L keep.
        Nothing is removed from the cache (see `mask_function`)."""
        if context.visual is None or context.attention is None:
            return None
        index = self.config.kv_layer - 1
        attention, slots, valid = context.attention[index], context.slots[index], context.valid[index]
        if attention is None:
            raise InputError(f"dycoke: no attention at layer {index} (kv_layer - 1); is that layer routed by another method?")
        roots = [self._root(visual) for visual in context.visual]
        self._rows_at[context.logical_length] = roots
        rows_of: dict[int, list[int]] = {}
        for row, root in enumerate(roots):
            rows_of.setdefault(root, []).append(row)
        for root, rows in rows_of.items():
            visual = context.visual[rows[0]]
            video = visual.slots[torch.isin(visual.image, torch.tensor(videos(visual), dtype=torch.long, device=visual.image.device))]
            cached, rows_attention = None, []
            for row in rows:
                present = valid[row] & torch.isin(slots[row], video.to(slots.device))
                row_slots, order = torch.sort(slots[row][present])
                if cached is not None and not torch.equal(row_slots, cached):
                    raise InputError("dycoke: beams of one sample hold different video tokens in their caches")
                cached = row_slots
                rows_attention.append(attention[row][present][order].float())
            if cached is None or cached.numel() == 0:
                continue
            mean = torch.stack(rows_attention).mean(dim=0)
            sequence = self._sequences.setdefault(root, _Sequence())
            if reselects(mean, sequence.previous, self.config.kv_threshold):
                kept = torch.zeros(cached.numel(), dtype=torch.bool, device=cached.device)
                kept[cache_keep(mean, self.config.kv_drop)] = True
                sequence.selections.append((context.logical_length, cached[kept], cached[~kept]))
            sequence.previous = mean
        return None

    def mask_function(self, context: AttentionContext):
        """Layers >= L: each query from a decoding step does not see the video tokens hidden by the
        selection in force at its slot (the latest made before it)."""
        if context.layer < self.config.kv_layer or context.visual is None or not self._sequences:
            return None
        roots = self._rows(context)
        if roots is None:
            return None
        key_slots, query_slots = context.key_slots, context.query_slots
        allowed = None
        for row, root in enumerate(roots):
            sequence = self._sequences.get(root)
            if sequence is None or not sequence.selections:
                continue
            starts = torch.tensor([start for start, _, _ in sequence.selections], device=query_slots.device)
            in_force = torch.searchsorted(starts, query_slots[row], right=True)  # 0: before any selection
            if not bool(in_force.any()):  # the prompt (or its recomputation): nothing hidden yet
                continue
            hides = torch.stack(  # row i: the keys hidden by selection i - 1 (row 0: none)
                [torch.zeros_like(key_slots[row], dtype=torch.bool)]
                + [torch.isin(key_slots[row], hidden.to(key_slots.device)) for _, _, hidden in sequence.selections]
            )
            if allowed is None:
                allowed = torch.ones(*query_slots.shape, key_slots.shape[1], dtype=torch.bool, device=key_slots.device)
            allowed[row] = ~hides[in_force]
        if allowed is None:
            return None
        return lambda b, h, q, kv: allowed[b, q, kv]

    def kv_selections(self) -> list[list[tuple[int, torch.Tensor]]]:
        """Stage 2's selections in the last generation, per prefill row (the beams of a sample share
        their first row's): (first query slot it applies to, kept video slots), in time order; slots are
        positions in the prompt as the caller sent it."""
        return [[(start, kept) for start, kept, _ in self._sequences[root].selections] if root in self._sequences else []
                for root in range(len(self._roots))]

    def _rows(self, context: AttentionContext) -> list[int] | None:
        """The sequence of each row: from the rows' visual tokens in a cached generation, else (a
        recomputation under `reuse_selections()`, whose prefill made new ones) as recorded for the
        cached call of the same length."""
        roots = [self._root_of.get(id(visual)) for visual in context.visual]
        if all(root is not None and self._roots[root] is visual for root, visual in zip(roots, context.visual)):
            return roots
        length = int(context.query_slots.max()) + 1
        recorded = [n for n in self._rows_at if n <= length]
        if not recorded:
            return None
        roots = self._rows_at[max(recorded)]
        if len(roots) != context.key_slots.shape[0]:
            raise InputError(
                f"dycoke: a recomputation of {context.key_slots.shape[0]} rows replays a generation of {len(roots)}; "
                "recompute the same batch under reuse_selections()"
            )
        return roots
