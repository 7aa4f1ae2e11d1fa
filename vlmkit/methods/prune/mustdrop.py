"""MustDrop: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model"
(Liu, Shi, Hong, Hu, Yin, Zhang, arXiv:2411.10803, 2024).

Reference: liuting20/MustDrop (Apache-2.0): `llava/model/multimodal_encoder/local_merge.py`
(`conditional_pooling`, `merge_wavg`), `clip_encoder.py` (`CLIPVisionModelAcc.custom_forward`: merge
after vision layer 0, key set at vision layer 23), `language_model/modelling_sparse_llama.py`
(`LlamaDynamicvitModel.forward`: `dual_attention_filter`, `pruning_layers = [2, 6, 10, 14]` and its
"Sparse kv cache (decoding stage)" block), and the scripts `scripts/v1_5/eval/textvqa_{192,128,64}.sh`
(thresholds).

Sites: `vision` (probes), `embeds` (stage 1, before the LLM), `layer` (stage 2, in the LLM) and
`cache` (stage 3, the KV cache after the prefill).

Stage 1, vision encoding (per image, frame and crop). The token grid is cut into non-overlapping
`window` x `window` windows (3 x 3); a window's similarity is the mean cosine over its ordered pairs
of distinct tokens,

    s_w = 1 / (m (m - 1)) * sum_{i != j in w} cos(k_i, k_j),        m = window**2,

and every window with s_w >= `spatial_threshold` (0.8) becomes one token, the plain mean of its m
members (the reference's size-weighted average with unit sizes), held by its last (bottom-right)
member and computed on the vision features the projector reads, then projected. An image enters
the LLM as its merged tokens by decreasing s_w, then its other tokens in patch order (the
reference's `cat([dst, unm])`). Key set: of the u tokens a crop has after merging, the
ceil(`key_share` * u) (8%) with the highest [CLS] attention at the last vision layer (the
reference: layer 23 of CLIP-L's 24; a merged token: the mean over its members) are never dropped.

Stage 2, prefill: before each decoder layer K in `layers` (the reference prunes after layers 2, 6,
10, 14 of LLaVA-1.5's 32, i.e. before 3, 7, 11, 15, scaled to the model's depth as
`round(K * num_layers / 32)` clipped to 1..num_layers-1), a visual token j outside the key set is
dropped when both its global and its individual attention are low (the dual-attention filter):

    g_j < global_thr * sum_k g_k    and    i_j < individual_thr,

    g_j = sum_t A[t, j],    i_j = max_t A[t, j],

with A[t, j] the attention of text query t to visual token j at layer K-1 (softmax over what t sees,
mean over heads), t running over every text token after the image. Kept tokens are re-indexed at
every stage, as in the reference. Defaults: global_thr = individual_thr = 0.001 (the reference's 192-token setting; 0.0012/0.001 gives
its 128, 0.011/0.01 its 64).

Budget (`keep` / `tokens`, the share / count of each sample's visual tokens left after the last
stage, so that the evaluation sweeps apply; none: the thresholds above): stage 1 merges windows as
above but never below the budget (at most floor((n - c) / (m - 1)) windows, the most similar ones);
the key set is capped at the budget c (the highest-attended first); stage s keeps the key set plus
the other tokens of the highest global attention g_j, up to c_s = max(c, floor(u * (c / u)^(s / S)))
of the u tokens that entered the LLM, c_S = c (a share rounds halves up: the reference has no budget
rule). `keep=1.0` keeps everything (bit-identical; stage 3 then has nothing to remove).

Stage 3, the output-aware cache (decoding). A layer that ran before a later stage dropped tokens
still caches their keys and values; once, right after the prefill, the layers from K_1 - 1 to
K_S - 1 (the reference: its pruning layers 2 to 14, the last one included) remove from their KV
cache every visual token that did not survive the last stage, so that the generated tokens attend,
there, to the final visual set only. Layers before K_1 - 1 (the reference: 0 and 1) keep their whole
cache, and layers from K_S on never held the dropped tokens. The reference's stage 3 has no score of
its own and no ratio or threshold: the final set is stage 2's, and nothing is removed at the
decoding steps. `output_aware=False` turns it off (stages 1 and 2 alone, the cache site left free).

Deviations from the reference, and why:
- window similarity from the head-mean keys at the input of vision layer `merge_layer` (default 1:
  computed from the output of layer 0, where the reference merges its hidden states), and the merge
  made on the features the LLM reads: vlmkit leaves the vision tower intact (vision layers after
  the merge see every token; the reference runs them on the merged sequence);
- key-set attention from the unmerged tower (vision probes see every token; a merged token scores
  the mean of its members); without [CLS] (SigLIP, Qwen2-VL) the mean attention a token receives;
- stage 2's text queries are the text tokens after the sample's last visual token (with several
  images, the text between them is not among them; the reference has one image block); the
  attention in float32 (the reference: the model's dtype);
- windows, merge counts and key sets per image, frame and crop over any grid (the reference: one
  24 x 24 CLIP grid, and the minimum merge count over the tower's batch, which ties images of a
  batch together); incomplete windows at a grid's edge never merge; ties go to the lower index;
  AnyRes images enter as all their merged tokens, then the rest in sequence order (the reference
  feeds LLaVA-NeXT crop by crop, `flat`, without unpadding or newlines);
- on Qwen2-VL (2 x 2 merger) and pooled videos the mean is taken on the LLM's input, as VisionZip's;
- under M-RoPE, kept tokens keep their 3-D positions;
- decoding continues, in each layer, after the sequence that layer saw in the prefill, also where
  stage 3 then shortened its cache (the engine owns positions; a cache edit does not move them): the
  reference positions a generated token at its layer's cache length, so that after its stage 3 the
  layers K_1 - 1 .. K_S - 1 continue after the final sequence instead;
- stage 3 per sample over its own visual tokens, in a batch too (the reference: batch size 1).

With `layers=()` only stage 1 runs (as LightCompress' port), and a budget then only caps merging.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.contexts import CacheContext
from vlmkit.engine.selection import (
    SampleSelection,
    Selection,
    SelectionContext,
    VisualTokens,
)
from vlmkit.errors import ConfigError, InputError
from vlmkit.methods.base import CacheMethod, TokenBudgetConfig, TokenSelector, layer_list, scaled_layers, top_k_sorted
from vlmkit.registry import register_method

REFERENCE_LAYERS = (3, 7, 11, 15)  # the reference prunes after layers 2, 6, 10, 14 of 32
REFERENCE_DEPTH = 32
_FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class MustDropConfig(TokenBudgetConfig):
    spatial_threshold: float = field(default=0.8, metadata={"help": "stage 1: a window merges when its mean pairwise cosine is >= this"})
    window: int = field(default=3, metadata={"help": "stage 1: side of the square merge windows, in tokens"})
    key_share: float = field(default=0.08, metadata={"help": "key set: share of each crop's tokens (after merging) never dropped"})
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "stage 2: decoder layers (>= 1) before which the filter runs (default: 3, 7, 11, 15 of 32, "
                          "scaled to the model's depth; () runs stage 1 only)"},
    )
    global_thr: float = field(default=0.001, metadata={"help": "stage 2: drop below this share of the summed text attention ..."})
    individual_thr: float = field(default=0.001, metadata={"help": "stage 2: ... and below this largest text attention"})
    merge_layer: int = field(default=1, metadata={"help": "vision layer whose input keys measure window similarity"})
    key_layer: int | None = field(default=None, metadata={"help": "vision layer whose [CLS] attention picks the key set (default: the last)"})
    output_aware: bool = field(
        default=True,
        metadata={"help": "stage 3: after the prefill, the layers from the first stage layer - 1 to the last stage "
                          "layer - 1 drop from their KV cache the visual tokens the last stage dropped (False: keep them)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("spatial_threshold", "global_thr", "individual_thr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"mustdrop: {name}={value!r} must be a number")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ConfigError(f"mustdrop: window={self.window!r} must be an integer >= 2 (a window merges window**2 tokens)")
        if isinstance(self.key_share, bool) or not isinstance(self.key_share, (int, float)) or not 0.0 <= self.key_share <= 1.0:
            raise ConfigError(f"mustdrop: key_share={self.key_share!r} must be a number in [0, 1]")
        if not isinstance(self.output_aware, bool):
            raise ConfigError(f"mustdrop: output_aware={self.output_aware!r} must be True or False")
        for name in ("merge_layer", "key_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"mustdrop: {name}={value!r} must be a vision layer index (an integer)")
        if self.layers is not None:
            layers = layer_list("mustdrop", "layers", self.layers, minimum=1, reason="the filter reads the layer before")
            object.__setattr__(self, "layers", layers)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference's stage layers 3, 7, 11, 15 (of 32) scaled to `num_layers`, clipped to 1..num_layers-1."""
    return tuple(sorted(set(scaled_layers(REFERENCE_LAYERS, num_layers, REFERENCE_DEPTH))))


def window_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the ordered pairs of distinct tokens of each window: keys (W, m, d) -> (W,)."""
    normalized = F.normalize(keys.float(), dim=-1)
    cosine = normalized @ normalized.transpose(-1, -2)
    m = keys.shape[-2]
    cosine = cosine * (1 - torch.eye(m, device=keys.device))
    return cosine.sum(dim=(-1, -2)) / (m * (m - 1))


def spatial_windows(visual: VisualTokens, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The complete `window` x `window` windows of a sample's token grids.

    Returns (members, unit): members (W, window**2), sample indices of each window's tokens in
    row-major order (the last is the bottom-right one); unit (W,), the (image, frame, crop) the window
    lies in, numbered in order of first appearance. Windows are ordered by unit, then row-major.
    """
    device = visual.slots.device
    n = len(visual)
    if n == 0:
        return torch.zeros(0, window * window, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)
    units = torch.stack([visual.image, visual.frame, visual.crop], dim=1)
    unit = _first_appearance(units)
    wrow, wcol = visual.row // window, visual.col // window
    inner = (visual.row % window) * window + visual.col % window
    span = int(wcol.max()) + 1
    key = (unit * (int(wrow.max()) + 1) + wrow) * span + wcol
    order = torch.argsort(key * window * window + inner, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    complete = counts == window * window
    members = torch.stack([order[s : s + window * window] for s in starts[complete].tolist()]) if bool(complete.any()) else (
        torch.zeros(0, window * window, dtype=torch.long, device=device)
    )
    return members, unit[members[:, 0]] if members.numel() else torch.zeros(0, dtype=torch.long, device=device)


def _first_appearance(rows: torch.Tensor) -> torch.Tensor:
    """For each row of `rows` (n, c), the number of its distinct value in order of first appearance."""
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((distinct.shape[0],), rows.shape[0], dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(rows.shape[0], device=rows.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel(), device=rows.device)
    return rank[inverse]


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score, ties to the lower index."""
    return torch.argsort(scores, descending=True, stable=True)


@register_method("mustdrop", family="prune", sites=("vision", "embeds", "layer", "cache"))
class MustDrop(TokenSelector, CacheMethod):
    """Merge similar neighbours, mark a key set, filter by text attention in the LLM, clear dropped tokens from the KV cache."""

    Config = MustDropConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2411.10803"
    needs = frozenset({"vision_attention", "vision_features", "text_attention"})
    natural_positions = "reindex"

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        if self.config.layers == ():  # stage 1 only: no decoder-layer attention needed
            self.needs = frozenset({"vision_attention", "vision_features"})
        if self.config.layers == () or not self.config.output_aware:  # no stage 3: leave the cache site free
            self.sites = tuple(site for site in type(self).sites if site != "cache")
        # per sample, from this prefill's stage 1: key-set origins, tokens entering the LLM, final count
        self._keys: list[torch.Tensor] | None = None
        self._entering: list[int] | None = None
        self._final: list[int | None] | None = None
        self._key_entry = "importance"  # the probe entry of the key-set layer (set with the adapter)

    # ------------------------------------------------------------------ layers
    def vision_layer(self, adapter) -> int:
        return self._resolve(adapter, self.config.merge_layer)

    def extra_vision_layers(self, adapter) -> tuple[int, ...]:
        key_layer = self._key_layer(adapter)
        same = key_layer == self.vision_layer(adapter)
        self._key_entry = "importance" if same else f"importance@{key_layer}"
        return () if same else (key_layer,)

    def _key_layer(self, adapter) -> int:
        count = len(adapter.vision_layers)
        return count - 1 if self.config.key_layer is None else self._resolve(adapter, self.config.key_layer)

    @staticmethod
    def _resolve(adapter, layer: int) -> int:
        count = len(adapter.vision_layers)
        return layer + count if -count <= layer < 0 else layer

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.config.layers if self.config.layers is not None else default_layers(num_layers)

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0, *self.stage_layers(num_layers))

    # ------------------------------------------------------------------ budget
    def budget(self, available: int) -> int | None:
        """Visual tokens a sample of `available` keeps after the last stage, or None (thresholds)."""
        if self.config.keep is None and self.config.tokens is None:
            return None
        return self.config.kept_count(available, 1.0)

    def stage_count(self, entering: int, final: int, stage: int, stages: int) -> int:
        """Budget mode: tokens left after stage `stage` (0-based) of `stages`, of `entering` after stage 1."""
        if stage == stages - 1 or entering == 0:
            return final
        share = (final / entering) ** ((stage + 1) / stages)
        return max(final, math.floor(entering * share + _FLOAT_SLACK))

    # ------------------------------------------------------------------ selection
    def select(self, context: SelectionContext) -> Selection:
        if context.layer == 0:
            samples, self._keys, self._entering, self._final = [], [], [], []
            for visual, probes in zip(context.visual, context.vision):
                sample, keys = self.merge_sample(visual, probes)
                samples.append(sample)
                self._keys.append(keys)
                self._entering.append(int(sample.keep.numel()))
                final = self.budget(len(visual))
                self._final.append(None if final is None else min(final, int(sample.keep.numel())))
            return Selection(samples)
        layers = self.stage_layers(context.num_layers)
        if context.layer not in layers:
            raise InputError(f"mustdrop: asked to select before layer {context.layer}, not one of its stages {layers}")
        if self._keys is None or len(self._keys) != len(context.visual):
            raise InputError(f"mustdrop: the prefill stage (layer {context.layer}) ran without the vision stage")
        stage = layers.index(context.layer)
        samples = []
        for row, (attention, visual) in enumerate(zip(context.text_attention, context.visual)):
            is_key = torch.isin(visual.origin, self._keys[row].to(visual.origin.device))
            final = self._final[row]
            count = None if final is None else self.stage_count(self._entering[row], final, stage, len(layers))
            samples.append(SampleSelection(self.filter_sample(attention, is_key, count)))
        return Selection(samples)

    def filter_sample(self, attention: torch.Tensor, is_key: torch.Tensor, count: int | None) -> torch.Tensor:
        """Stage 2 for one sample: kept indices among its remaining visual tokens.

        `attention` (T, n): each text query's attention to each visual token (head mean). Thresholds
        (`count` None): drop a non-key token whose global attention g (sum over the queries) is below
        `global_thr` * sum(g) and whose individual attention i (maximum over the queries) is below
        `individual_thr`. Budget: the key set plus the other tokens of the highest g, up to `count`.
        """
        attention = attention.float()
        n = attention.shape[1]
        device = attention.device
        total = attention.sum(dim=0)  # g_j
        if count is None:
            largest = attention.amax(dim=0) if attention.shape[0] else torch.zeros_like(total)  # i_j
            low = (total < self.config.global_thr * total.sum()) & (largest < self.config.individual_thr)
            return torch.nonzero(~(low & ~is_key)).flatten()
        if count >= n:
            return torch.arange(n, device=device)
        keys = torch.nonzero(is_key).flatten()
        others = torch.nonzero(~is_key).flatten()
        extra = others[top_k_sorted(total[others], max(0, count - keys.numel()))]
        return torch.sort(torch.cat([keys, extra])).values

    # ------------------------------------------------------------------ stage 3
    def cache_layers(self, num_layers: int) -> tuple[int, ...]:
        """The decoder layers whose cache stage 3 edits: K_1 - 1 .. K_S - 1 (the reference's pruning layers
        2 .. 14, after which its stages run)."""
        layers = self.stage_layers(num_layers)
        if not self.config.output_aware or not layers:
            return ()
        return tuple(range(layers[0] - 1, layers[-1]))

    def edit_cache(self, context: CacheContext) -> dict[int, torch.Tensor] | None:
        """Stage 3, once after the prefill: in each layer of `cache_layers`, drop the cached visual tokens
        that are not in the final set (the visual tokens cached by the last stage layer, which ran on
        what the last stage kept)."""
        if not context.prefill or context.visual is None:
            return None
        num_layers = len(context.slots)
        edited = self.cache_layers(num_layers)
        if not edited:
            return None
        final_layer = self.stage_layers(num_layers)[-1]
        final_slots = context.slots[final_layer].masked_fill(~context.valid[final_layer], -1)
        edits = {}
        for index in edited:
            slots, valid = context.slots[index], context.valid[index]
            drop = torch.zeros_like(valid)
            for row, visual in enumerate(context.visual):
                visual_slots = visual.slots.to(slots.device)
                drop[row] = valid[row] & torch.isin(slots[row], visual_slots) & ~torch.isin(slots[row], final_slots[row])
            if bool(drop.any()):
                edits[index] = valid & ~drop
        return edits or None

    def merge_sample(self, visual: VisualTokens, probes) -> tuple[SampleSelection, torch.Tensor]:
        """Stage 1 for one sample: the selection (merges as `combine`, merged tokens first) and the
        key set (origins of the kept tokens never dropped later)."""
        n = len(visual)
        device = visual.slots.device
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return SampleSelection(empty), empty
        if probes is None or any(p is None for p in probes):
            raise InputError("mustdrop: the vision stage needs the vision-tower probes of every image of the sample")
        keys = self._gather(visual, probes, "keys")
        importance = self._gather(visual, probes, self._key_entry)
        members, _ = spatial_windows(visual, self.config.window)
        similarity = window_similarity(keys[members]) if members.numel() else torch.zeros(0, device=device)
        merged = self.merged_windows(similarity, n, members.shape[1] if members.numel() else self.config.window**2)
        members, similarity = members[merged], similarity[merged]

        holder = members[:, -1].contiguous()  # the bottom-right member holds the merged token
        absorbed = torch.zeros(n, dtype=torch.bool, device=device)
        absorbed[members[:, :-1].flatten()] = True
        keep = torch.nonzero(~absorbed).flatten()
        score = importance.float().clone()
        if holder.numel():
            score[holder] = importance.float()[members].mean(dim=1)
        key_set = self.key_set(visual, keep, score)

        if holder.numel() == 0:
            return SampleSelection(keep), visual.origin[key_set]
        combine = torch.zeros(keep.numel(), n, device=device)
        combine[torch.arange(keep.numel(), device=device), keep] = 1.0
        rows = torch.searchsorted(keep, holder)
        combine[rows] = 0.0
        combine[rows[:, None].expand_as(members), members] = 1.0 / members.shape[1]
        space = "vision" if all("features" in p for p in probes) else "llm"
        order = self.entry_order(visual, keep, holder, similarity)
        return SampleSelection(keep, combine=combine, combine_space=space, order=order), visual.origin[key_set]

    def merged_windows(self, similarity: torch.Tensor, available: int, size: int) -> torch.Tensor:
        """Indices of the windows that merge: those at or above the threshold, capped by the budget."""
        eligible = torch.nonzero(similarity >= self.config.spatial_threshold).flatten()
        final = self.budget(available)
        if final is not None:
            cap = (available - final) // (size - 1)
            if eligible.numel() > cap:
                eligible = torch.sort(eligible[_descending(similarity[eligible])[:cap]]).values
        return eligible

    def key_set(self, visual: VisualTokens, keep: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Per (image, frame, crop), the ceil(key_share * u) best-scored of its u kept tokens; capped by
        the budget (best first). Sample indices, sorted."""
        units = torch.stack([visual.image[keep], visual.frame[keep], visual.crop[keep]], dim=1)
        unit = _first_appearance(units)
        chosen = []
        for u in range(int(unit.max()) + 1 if unit.numel() else 0):
            members = keep[unit == u]
            count = math.ceil(self.config.key_share * members.numel())
            chosen.append(members[_descending(score[members])[:count]])
        key_set = torch.cat(chosen) if chosen else keep[:0]
        final = self.budget(len(visual))
        if final is not None and key_set.numel() > final:
            key_set = key_set[_descending(score[key_set])[:final]]
        return torch.sort(key_set).values

    @staticmethod
    def entry_order(visual: VisualTokens, keep: torch.Tensor, holder: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor | None:
        """Per (image, frame), in sequence order: its merged tokens by decreasing similarity, then its
        other kept tokens in sequence order. A permutation of positions in `keep`, or None if identity."""
        groups = torch.stack([visual.image[keep], visual.frame[keep]], dim=1)
        group = _first_appearance(groups)
        is_holder = torch.isin(keep, holder)
        rank = torch.zeros(keep.numel(), dtype=torch.long, device=keep.device)
        rank[torch.searchsorted(keep, holder)] = torch.argsort(_descending(similarity))
        entries = []
        for g in range(int(group.max()) + 1):
            inside = group == g
            merged = torch.nonzero(inside & is_holder).flatten()
            entries += [merged[torch.argsort(rank[merged])], torch.nonzero(inside & ~is_holder).flatten()]
        order = torch.cat(entries)
        return None if torch.equal(order, torch.arange(keep.numel(), device=keep.device)) else order

    @staticmethod
    def _gather(visual: VisualTokens, probes, name: str) -> torch.Tensor:
        """A probe entry of every image of the sample as one (n, ...) tensor in the sample's token order."""
        parts = [probe[name] for probe in probes]
        out = parts[0].new_zeros((len(visual), *parts[0].shape[1:]))
        for image, part in enumerate(parts):
            out[visual.image_index(image)] = part.to(out.device)
        return out
