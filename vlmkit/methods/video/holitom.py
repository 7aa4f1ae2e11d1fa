"""HoliTom: "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (Shao et al., NeurIPS
2025, arXiv:2505.21334).

Reference: cokeshao/HoliTom @e9b2972, `holitom/llava_arch.py`: `prepare_inputs_labels_for_multimodal`
(the video branch), `select_static_windows`, `get_static_dynamic_features`, `holitom`,
`merge_tokens_by_attention_density`, `merge_tokens_by_density`, `cluster_dpc_knn` and
`merge_tokens_by_clustering`; defaults from its environment settings (`RETAIN_RATIO` 0.1, `T` 0.8,
`BETA` 0.6, `D` 0, `K` 7, `MAX_WINDOW_SIZE` 1024; `NO_BETA` unset, so merges use Beta).

Sites: `embeds` (the selection, on the LLM's input), `vision` (the tower's attention probe that
ranks the dynamic tokens) and, with `merge_layer` set, `layer` (the optional inner merge).
The inner merge is off by default, as in the reference (its `holitom/main.py` installs it only when
`HOLITOM_k` and `HOLITOM_r` are both set; then its defaults are k = 3, r = 0.5, its README runs
k = 18).

Per video of T frames of N tokens, with x_t(p) the LLM-input embedding of the token at grid place p
of frame t and a_t(p) the mean attention it receives in the vision layer
the LLM reads (mean over heads and queries; pooled like the features where the model pools):

1. Outer temporal segmentation. s_t(p) = cos(x_t(p), x_{t+1}(p)); a window [s, e] has the static
   places P(s, e) = {p : s_t(p) > tau for all s <= t < e} and the score
   C(s, e) = (e - s) |P(s, e)|. A dynamic program partitions the frames into windows of at most
   `max_window_size` frames maximising sum C:

       dp(i) = max(dp(i - 1), max_{2 <= w <= min(i + 1, W)} dp(i - w) + C(i - w + 1, i)),  dp(-1) = 0,

   the first candidate reaching the maximum winning (a lone frame, then the shortest window).
2. The retain ratio is rescaled by what the static merge removes, R = dp(T - 1):
   r' = min(r / ((T N - R) / (T N)), 1).
3. Static tokens: each static place of a window becomes one feature, the mean over the window's frames
   m(p) = mean_t x_t(p); these are clustered by DPC-kNN into round(|P| r') centres (below).
4. Dynamic tokens (every place of a lone frame; the other places of a window, frame by frame): of n
   tokens, ceil(n r') stay; round(ceil(n r') (1 - D)) of them are the highest a_t (dominant), the
   others are DPC-kNN centres of the rest (contextual).
5. DPC-kNN of n points y_i with k = min(K, clusters): d_ij = ||y_i - y_j|| / sqrt(dim); density
   rho_i = exp(-mean of the k smallest d_ij^2) (the point itself included); delta_i = min d_ij over the
   j of higher density (the densest point: max d); the centres are the highest rho delta. Every other
   point joins its nearest centre, and a centre c with joiners J becomes
   Beta y_c + (1 - Beta) mean_{j in J} y_j (itself when J is empty).
6. Inner merge (optional), before decoder layer K = `merge_layer`, per video of n remaining tokens:
   the round(n (1 - r)) tokens (r = `merge_share`) of the highest attention from the last token at
   layer K - 1 (softmax over the sequence, mean over heads) stay; every other token, in sequence order,
   is averaged into the kept token of the highest cosine (similarities taken once, before the merges):
   x_c <- (x_c + x_j) / 2, so a kept token with joiners j_1 .. j_m becomes
   2^-m x_c + sum_i 2^-(m - i + 1) x_{j_i}. Positions are kept (the reference's position_ids = the
   kept indices).

Each kept token takes the place of its own token (a static centre: the window's first frame) and
its value is written as a `combine` row over the LLM-input embeddings. Tokens enter as the reference
concatenates them (its `mm_newline_position` "one_token", LLaVA-OneVision's video layout): per window,
its static tokens in place order, then frame by frame the dominant then the contextual tokens, each
in place order. Images are untouched; several videos in one prompt are reduced each on its own.

Deviations from the reference, and why:
- the frame grid comes from the engine's frame/row/col (the reference's pooled square grid of one
  LLaVA-OneVision video); frames are the LLM's frames (Qwen2-VL's temporal patches of two frames);
- DPC-kNN has no random noise: the reference adds rand * 1e-6 to every density to break ties; here a
  tie goes to the earlier token (for "higher density" and for the centre ranking), so the selection
  is deterministic (and a padded batch equals one-by-one);
- dominant tokens are ranked by a stable descending sort (ties: the earlier token; `topk` leaves
  them unspecified); similarities and merges in float32 (the reference: the model's dtype);
- the reference's "grid" newline layout (LLaVA-Video: each frame's tokens re-sorted by place with
  a newline per row) is not reproduced: the families here end a video with one newline or none;
- the attention is the engine's vision probe at the layer the LLM reads (the reference's replaced
  SigLIP returns the last kept layer's attention, mean over heads and queries; towers with [CLS]
  use the [CLS] row);
- the inner merge acts on each video's tokens (the reference: the first visual span of the prompt,
  a LLaVA-OneVision video's newline token included, batch of one); its ties go to the earlier token
  (the reference: `topk` order, then the most attended of equally similar kept tokens); cosines in
  float32 (the reference: the model's dtype); `merge_share` < 1 (the reference fails at r = 1).

Positions: the video shortens; on 1-D rotary models the kept tokens are re-indexed (as in the
reference, which merges before positions exist), under M-RoPE they keep their (t, h, w).
`retain_ratio=1, max_window_size=1` keeps every token unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import POSITION_POLICIES, MethodConfig, TokenSelector, top_k_sorted
from vlmkit.methods.prune._grid import entry_order, probe_values
from vlmkit.methods.video import WITHOUT_VIDEO, frame_grid, videos
from vlmkit.registry import register_method


@dataclass(frozen=True)
class HoliTomConfig(MethodConfig):
    retain_ratio: float = field(default=0.1, metadata={"help": "r: share of each video's tokens kept, in (0, 1] (RETAIN_RATIO)"})
    tau: float = field(default=0.8, metadata={"help": "a place is static across consecutive frames when their cosine is above tau, in [-1, 1] (T)"})
    beta: float = field(default=0.6, metadata={"help": "weight of a cluster centre against the mean of its joiners, in [0, 1] (BETA)"})
    contextual_share: float = field(default=0.0, metadata={"help": "D: share of the kept dynamic tokens that are DPC-kNN centres instead of the most attended, in [0, 1] (D)"})
    neighbours: int = field(default=7, metadata={"help": "K: nearest neighbours of the DPC-kNN density (at most the cluster count), >= 1 (K)"})
    max_window_size: int = field(default=1024, metadata={"help": "longest static window, in frames, >= 1 (1: no windows) (MAX_WINDOW_SIZE)"})
    vision_layer: int | None = field(default=None, metadata={"help": "vision layer whose attention ranks the dynamic tokens (default: the layer the LLM reads)"})
    merge_layer: int | None = field(default=None, metadata={"help": "inner merge before decoder layer K >= 1, from the last token's attention at layer K - 1; None: off (HOLITOM_k)"})
    merge_share: float = field(default=0.5, metadata={"help": "share of each video's tokens the inner merge folds into the kept ones, in [0, 1) (HOLITOM_r)"})
    positions: str = field(
        default="auto",
        metadata={"help": "position ids after merging: 'keep', 'reindex', or 'auto' (re-index on 1-D rotary models, keep under M-RoPE)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        def number(name: str, low: float, high: float, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
            ok = ok and (low < value if low_open else low <= value) and value <= high
            if not ok:
                bracket = "(" if low_open else "["
                raise ConfigError(f"holitom: {name}={value!r} is out of range: it must be a number in {bracket}{low:g}, {high:g}]")

        number("retain_ratio", 0.0, 1.0, low_open=True)
        number("tau", -1.0, 1.0)
        number("beta", 0.0, 1.0)
        number("contextual_share", 0.0, 1.0)
        share = self.merge_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
            raise ConfigError(f"holitom: merge_share={share!r} is out of range: it must be a number in [0, 1)")
        if self.merge_layer is not None and (isinstance(self.merge_layer, bool) or not isinstance(self.merge_layer, int) or self.merge_layer < 1):
            raise ConfigError(f"holitom: merge_layer={self.merge_layer!r} is out of range: it must be an integer >= 1 (it reads the attention of layer merge_layer - 1) or None")
        for name in ("neighbours", "max_window_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"holitom: {name}={value!r} is out of range: it must be an integer >= 1")
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)):
            raise ConfigError(f"holitom: vision_layer={self.vision_layer!r} must be an integer layer index or None")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"holitom: positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")


# ---------------------------------------------------------------------------- the reference's steps
def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """(T - 1, N): the cosine of each place with the same place of the next frame, from (T, N, D)."""
    features = features.float()
    return F.cosine_similarity(features[:-1], features[1:], dim=-1)


def static_counts(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """(T, T): C(s, e) = (e - s) x the places whose consecutive-frame cosine stays > tau from frame s
    to frame e (0 for e <= s)."""
    frames = similarity.shape[0] + 1
    counts = torch.zeros(frames, frames, dtype=torch.float64)
    above = (similarity > tau).long().cpu()
    for start in range(frames - 1):
        stays = torch.cumprod(above[start:], dim=0).sum(dim=1)  # row i: window [start, start + 1 + i]
        lengths = torch.arange(1, frames - start, dtype=torch.float64)
        counts[start, start + 1:] = stays.double() * lengths
    return counts


def static_windows(similarity: torch.Tensor, tau: float, max_window_size: int) -> tuple[list[tuple[int, int]], float]:
    """The reference's `select_static_windows`: the partition of the frames into windows (start, end)
    (inclusive) maximising sum C(s, e), and that sum (the tokens the static merge removes)."""
    frames = similarity.shape[0] + 1
    counts = static_counts(similarity, tau).tolist()
    best, start_of = [0.0] * frames, [0] * frames
    for end in range(frames):
        value, start = (best[end - 1] if end > 0 else 0.0), end
        for size in range(2, min(end + 1, max_window_size) + 1):
            before = end - size
            candidate = (best[before] if before >= 0 else 0.0) + counts[before + 1][end]
            if candidate > value:
                value, start = candidate, before + 1
        best[end], start_of[end] = value, start
    windows, end = [], frames - 1
    while end >= 0:
        windows.append((start_of[end], end))
        end = start_of[end] - 1
    return windows[::-1], best[-1]


def rescaled_ratio(retain_ratio: float, tokens: int, reduced: float) -> float:
    """The retain ratio after the static merge removed `reduced` of `tokens`: min(r / ((n - R) / n), 1)."""
    return min(retain_ratio / ((tokens - reduced) / tokens), 1)


@dataclass
class Clustering:
    """DPC-kNN of n points: densities, distances to a denser point, centres (sorted) and, per point, the
    position in `centres` of the centre it joins (a centre: its own)."""

    density: torch.Tensor
    delta: torch.Tensor
    centres: torch.Tensor
    assignment: torch.Tensor


def dpc_knn(points: torch.Tensor, clusters: int, neighbours: int) -> Clustering:
    """The reference's `cluster_dpc_knn` (k = min(K, clusters)) and the nearest-centre assignment of
    `merge_tokens_by_clustering`; ties go to the earlier point instead of random noise."""
    points = points.float()
    count, dim = points.shape
    distance = torch.cdist(points, points) / dim ** 0.5
    k = min(neighbours, clusters, count)
    nearest = torch.topk(distance, k, dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=-1))
    index = torch.arange(count, device=points.device)
    # j is denser than i: higher density, or the same density and earlier (the reference: noise)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    delta = torch.where(denser, distance, distance.max()).min(dim=-1).values
    score = delta * density
    centres = torch.sort(torch.argsort(score, descending=True, stable=True)[:clusters]).values
    assignment = distance[:, centres].argmin(dim=-1)
    assignment[centres] = torch.arange(centres.numel(), device=points.device)
    return Clustering(density, delta, centres, assignment)


def cluster_weights(clustering: Clustering, beta: float) -> torch.Tensor:
    """(clusters, n): centre c's row is Beta on c and (1 - Beta) / |J| on each joiner (1 on c alone)."""
    centres, assignment = clustering.centres, clustering.assignment
    weights = torch.zeros(centres.numel(), assignment.numel(), device=centres.device)
    for position, centre in enumerate(centres.tolist()):
        joiners = torch.nonzero(assignment == position).flatten()
        joiners = joiners[joiners != centre]
        if joiners.numel():
            weights[position, centre] = beta
            weights[position, joiners] = (1 - beta) / joiners.numel()
        else:
            weights[position, centre] = 1.0
    return weights


@dataclass(frozen=True)
class _Token:
    """A kept token: the sample index of the place it takes, and its value as weights over sample indices."""

    place: int
    sources: torch.Tensor  # sample indices
    weights: torch.Tensor  # same length


# ---------------------------------------------------------------------------- the method
def inner_merge_weights(kept: int, joiners: list[int], tokens: int) -> torch.Tensor:
    """(tokens,) weights of a kept token after the reference's in-place merges x_c <- (x_c + x_j) / 2 of its
    joiners in order: x_c gets 2^-m and the i-th of m joiners 2^-(m - i + 1)."""
    weights = torch.zeros(tokens)
    weights[kept] = 0.5 ** len(joiners)
    for i, joiner in enumerate(joiners):
        weights[joiner] = 0.5 ** (len(joiners) - i)
    return weights


@register_method("holitom", family="video", sites=("vision", "embeds", "layer"))
class HoliTom(TokenSelector):
    """Merge each video's static tokens across the windows a DP finds, then cluster the rest per frame."""

    Config = HoliTomConfig
    example = "retain_ratio=0.5,merge_layer=2"
    neutral = "retain_ratio=1.0,max_window_size=1"
    paper = "https://arxiv.org/abs/2505.21334"
    modalities = frozenset({"video"})
    unsupported = WITHOUT_VIDEO
    natural_positions = "reindex"
    needs = frozenset({"vision_attention", "last_row_attention"})

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        if self.config.merge_layer is None:  # no inner merge: the decoder layers are left alone
            self.sites = ("vision", "embeds")
            self.needs = frozenset({"vision_attention"})

    def check_adapter(self, adapter) -> None:
        layers = len(adapter.decoder_layers)
        if self.config.merge_layer is not None and not 1 <= self.config.merge_layer < layers:
            raise ConfigError(
                f"holitom: merge_layer={self.config.merge_layer} is out of range for a language model with {layers} "
                f"decoder layers (valid: 1..{layers - 1})"
            )

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,) if self.config.merge_layer is None else (0, self.config.merge_layer)

    def natural_positions_at(self, layer: int | None) -> str:
        return "keep" if layer else "reindex"  # the inner merge keeps the positions (position_ids = keep_indexs)

    def vision_layer(self, adapter) -> int:
        return adapter.default_vision_layer() if self.config.vision_layer is None else self.config.vision_layer

    def select(self, context: SelectionContext) -> Selection:
        if context.layer > 0:
            return self.merge_inside(context)
        samples = []
        for row, visual in enumerate(context.visual):
            device = visual.slots.device
            probes = context.vision[row] if context.vision is not None else []
            importance = probe_values(visual, probes, "importance")
            groups, tokens = [], []
            covered = torch.zeros(len(visual), dtype=torch.bool, device=device)
            for video in videos(visual):
                grid = frame_grid(visual, video)
                features = context.hidden[row, visual.slots[grid]]
                for group in self.reduce_video(features, importance[grid].to(features.device)):
                    groups.append(torch.tensor([grid.flatten()[t.place].item() for t in group], dtype=torch.long, device=device))
                    tokens += [(grid.flatten()[t.place].item(), grid.flatten()[t.sources.to(device)], t.weights) for t in group]
                covered[grid.flatten()] = True
            groups.append(torch.nonzero(~covered).flatten())  # images, whole and in sequence order
            keep, order = entry_order([g for g in groups if g.numel()] or [groups[-1]])
            merged = [t for t in tokens if t[1].numel() != 1 or t[1].item() != t[0]]
            if not merged:
                samples.append(SampleSelection(keep, order=order))
                continue
            combine = torch.zeros(keep.numel(), len(visual), device=device)
            combine[torch.arange(keep.numel(), device=device), keep] = 1.0
            for place, sources, weights in merged:
                line = int(torch.searchsorted(keep, torch.tensor(place, device=device)))
                combine[line] = 0.0
                combine[line].index_add_(0, sources, weights.to(device, torch.float32))
            samples.append(SampleSelection(keep, combine=combine, combine_space="llm", order=order))
        return Selection(samples)

    def reduce_video(self, features: torch.Tensor, importance: torch.Tensor) -> list[list[_Token]]:
        """One video's (T, N, D) features and (T, N) attention -> per window, its kept tokens in the
        order they enter (its static tokens, then frame by frame the dominant then the contextual ones,
        each in place order); places and sources are indices into the flattened (T, N) grid."""
        cfg = self.config
        frames, cells = features.shape[:2]
        features = features.float()
        if frames > 1:
            similarity = frame_similarity(features)
            windows, reduced = static_windows(similarity, cfg.tau, cfg.max_window_size)
        else:
            similarity, windows, reduced = features.new_zeros(0, cells), [(0, 0)], 0.0
        ratio = rescaled_ratio(cfg.retain_ratio, frames * cells, reduced)
        groups: list[list[_Token]] = []
        every = torch.arange(cells, device=features.device)
        for start, end in windows:
            group: list[_Token] = []  # the window's tokens in entry order
            if start == end:
                static = torch.zeros(cells, dtype=torch.bool, device=features.device)
            else:
                static = (similarity[start:end] > cfg.tau).all(dim=0)
                places = every[static]
                frames_of = torch.arange(start, end + 1, device=features.device)
                sources = (frames_of[:, None] * cells + places[None, :])  # (W, |P|)
                clusters = round(places.numel() * ratio)
                if clusters > 0:
                    clustering = dpc_knn(features[start:end + 1, places].mean(dim=0), clusters, cfg.neighbours)
                    weights = cluster_weights(clustering, cfg.beta) / (end - start + 1)
                    for line, centre in enumerate(clustering.centres.tolist()):
                        used = torch.nonzero(weights[line]).flatten()
                        group.append(_Token(start * cells + int(places[centre]), sources[:, used].flatten(),
                                            weights[line, used].repeat(end - start + 1)))
            dynamic = every[~static]
            for frame in range(start, end + 1):
                dominant, contextual = self.reduce_frame(features[frame, dynamic], importance[frame, dynamic], ratio)
                base = frame * cells
                group += [_Token(base + int(dynamic[i]), torch.tensor([base + int(dynamic[i])]), torch.ones(1)) for i in dominant.tolist()]
                group += [_Token(base + int(dynamic[c]), base + dynamic[s], w) for c, s, w in contextual]
            groups.append(group)
        return [group for group in groups if group]

    def reduce_frame(self, features: torch.Tensor, importance: torch.Tensor, ratio: float):
        """The reference's `merge_tokens_by_attention_density` on one frame's n dynamic tokens:
        (dominant indices in order, [(centre, source indices, weights)] in order)."""
        count = features.shape[0]
        kept = math.ceil(count * ratio)
        dominant_count = round(kept * (1 - self.config.contextual_share))
        dominant = top_k_sorted(importance, dominant_count)
        contextual_count = kept - dominant_count
        if contextual_count <= 0:
            return dominant, []
        rest = torch.ones(count, dtype=torch.bool, device=features.device)
        rest[dominant] = False
        rest = torch.nonzero(rest).flatten()
        clustering = dpc_knn(features[rest], contextual_count, self.config.neighbours)
        weights = cluster_weights(clustering, self.config.beta)
        out = []
        for line, centre in enumerate(clustering.centres.tolist()):
            used = torch.nonzero(weights[line]).flatten()
            out.append((int(rest[centre]), rest[used], weights[line, used]))
        return dominant, out

    def merge_inside(self, context: SelectionContext) -> Selection:
        """The reference's inner merge (`Qwen2Model_holitom.forward`) before layer K, per video: the
        round(n (1 - r)) tokens of the highest attention from the last token at layer K - 1 stay, and each
        other token, in sequence order, is averaged into the kept token of the highest cosine."""
        samples = []
        for row, visual in enumerate(context.visual):
            device = visual.slots.device
            keep = torch.ones(len(visual), dtype=torch.bool, device=device)
            rows = []  # (kept index, its weights over the sample's tokens)
            attention = context.last_row_attention[row].float().to(device)
            for video in videos(visual):
                members = visual.image_index(video)
                count = round(members.numel() * (1 - self.config.merge_share))
                if count >= members.numel() or count == 0:
                    continue
                top = top_k_sorted(attention[members], count)
                others = torch.ones(members.numel(), dtype=torch.bool, device=device)
                others[top] = False
                others = torch.nonzero(others).flatten()
                hidden = F.normalize(context.hidden[row, visual.slots[members]].float(), dim=-1)
                target = (hidden[others] @ hidden[top].T).argmax(dim=1)
                keep[members[others]] = False
                for position, kept in enumerate(top.tolist()):
                    joiners = others[target == position].tolist()
                    if joiners:
                        weights = inner_merge_weights(kept, joiners, members.numel())
                        line = torch.zeros(len(visual))
                        line[members.cpu()] = weights
                        rows.append((int(members[kept]), line))
            kept = torch.nonzero(keep).flatten()
            if not rows:
                samples.append(SampleSelection(kept))
                continue
            combine = torch.zeros(kept.numel(), len(visual), device=device)
            combine[torch.arange(kept.numel(), device=device), kept] = 1.0
            for index, line in rows:
                combine[int(torch.searchsorted(kept, torch.tensor(index, device=device)))] = line.to(device)
            samples.append(SampleSelection(kept, combine=combine, combine_space="llm"))
        return Selection(samples)
