"""FastVID: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (Shen et al.,
NeurIPS 2025, arXiv:2503.11187).

Reference: LunarShen/FastVID @a40a109, `fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/
modeling_qwen2.py`, `Qwen2Model.forward` (the "FastVID" block, lines 900-1075: DySeg, STPrune with the
parallel density score, DTM), with the frame features and scores of `llava/model/llava_arch.py:
encode_images` / `get_attn_2dPool`; defaults from `scripts/eval.sh`.

Sites: `embeds` (the LLM's input, before decoder layer 0), and `vision` for the salient scores (the
vision probe, as FasterVLM reads it). Per video of T frames of N tokens x_{t,i}
(the LLM-input embeddings, D wide):

1. DySeg. With g_t a global feature of frame t, s_t = cos(g_t, g_{t+1}) (t < T - 1); the video is cut
   after frame t for the c - 1 lowest s_t (ties: the earlier t) and for every s_t < tau, so it splits
   into segments of consecutive frames.
2. STPrune. Each frame keeps R = int(N * retention) tokens: S = R - int(R * d) salient ones, the S
   highest vision scores a_{t,i}, and C = R - S context ones. The other N - S tokens of the frame
   ("the rest") score by density peaks (DPC), with dist(i, j) = ||x_i - x_j|| / sqrt(D):

       rho_i   = exp(-1/4 sum_{j in 4NN(i)} dist(i, j)^2)   (the 4 nearest, i itself included),
       delta_i = min_{j: rho_j > rho_i} dist(i, j)          (the frame's largest distance for the densest),
       score_i = rho_i * delta_i.

   Anchor budget: a segment of L frames has C L context tokens, given to its frames L - 1, L - 1 - p,
   L - 1 - 2p, ... (counted from its last frame), C L // ceil(L / p) each; the other frames of the segment
   keep none.
3. DTM. A frame whose budget is C (a one-frame segment, or p = 1) takes its C highest-score rest tokens
   as anchors and merges its own rest into them; an anchor frame of a longer segment takes its
   budget's highest-score rest tokens as anchors and merges the rest of every frame of the segment
   into them. Each merged token joins the anchor of the highest cosine (the anchor itself included),
   and anchor a with the joiners J_a becomes

       w_a x_a + (1 - w_a) mean_{j in J_a} x_j,     w_a = max(1 / (|J_a| + 1), beta).

The kept tokens (salient and anchors) enter in sequence order, as the reference sorts them back; the
averages go to the engine as `combine` rows on the LLM's input (where the reference averages).
Images (and each video's structural tokens) are untouched; `retention=1, context_share=0` keeps every
token as it is.

Positions: the reference prunes inside the LLM's forward after the positions exist and passes the
kept tokens' own position ids on (`position_ids = keep_indexs`), so positions="auto" keeps them, on
1-D rotary models as under M-RoPE.

Deviations from the reference, and why:
- salient scores: the reference reads the attention of the SigLIP checkpoint's attention-pooling head
  (its probe query over the frame's patches, bilinearly pooled to the LLM's grid); the Hugging Face
  towers run no pooling head (LLaVA-OneVision's SigLIP is built without it, Qwen2-VL has none), so the
  score is the engine's vision probe "importance" at `vision_layer` (the layer the LLM reads): the
  attention from [CLS] where the tower has one, else the mean attention each patch receives, joined
  over the patches of a token as the adapter maps them;
- DySeg's frame feature g_t: the reference uses that pooling head's output; here it is the mean of the
  frame's LLM-input embeddings (no pooled output exists in these towers);
- the reference adds U(0, 1e-6) noise to rho to break ties; here ties break deterministically: of two
  equal densities the earlier token counts as the denser, and every top-k is a stable sort (ties: the
  earlier token or anchor), so a selection is reproducible;
- bounds the reference leaves to a crash: more cuts than frame gaps (c - 1 > T - 1) cuts everywhere;
  the 4 nearest are the min(4, n) nearest of a frame with n < 4 rest tokens; an anchor budget larger
  than the frame's rest tokens keeps them all (with a warning naming the count); a frame keeps at
  least one token (int(N * retention) may be 0 on small grids);
- cosines via `F.normalize` (an all-zero token has cosine 0, not NaN), distances and averages in
  float32 (the reference: the model's dtype), per sample and per video (the reference: batch size 1,
  one video at a hard-coded place).

Defaults (scripts/eval.sh): retention 0.10, c = 8, tau = 0.9, d = 0.4, p = 4, beta = 0.6.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import POSITION_POLICIES, MethodConfig, TokenSelector
from vlmkit.methods.prune._grid import probe_values
from vlmkit.methods.video import WITHOUT_VIDEO, frame_grid, videos
from vlmkit.registry import register_method

NEIGHBOURS = 4  # the density's nearest neighbours (the token itself included), as the reference's topk(k=4)


@dataclass(frozen=True)
class FastVIDConfig(MethodConfig):
    retention: float = field(default=0.10, metadata={"help": "share of each frame's tokens kept, in (0, 1]: int(N * retention) per frame"})
    segments: int = field(default=8, metadata={"help": "c: DySeg cuts at the c - 1 lowest similarities of consecutive frames (integer >= 1)"})
    cut_similarity: float = field(default=0.9, metadata={"help": "tau: DySeg also cuts wherever consecutive frames' cosine is below this, in [-1, 1]"})
    context_share: float = field(default=0.4, metadata={"help": "d: share of each frame's kept tokens chosen by density (context), in [0, 1]; the rest are salient"})
    anchor_stride: int = field(default=4, metadata={"help": "p: a segment's context anchors sit on every p-th frame from its last (integer >= 1)"})
    anchor_weight: float = field(default=0.6, metadata={"help": "beta: least weight an anchor keeps of itself when merging, in [0, 1]"})
    vision_layer: int | None = field(default=None, metadata={"help": "vision layer of the salient scores (default: the layer the LLM reads)"})
    positions: str = field(
        default="auto",
        metadata={"help": "position ids after pruning: 'keep', 'reindex', or 'auto' (keep, as the reference does)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        def number(name: str, low: float, high: float, low_open: bool, meaning: str) -> None:
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
            ok = ok and (low < value if low_open else low <= value) and value <= high
            if not ok:
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
                raise ConfigError(f"fastvid: {name}={value!r} is out of range: {meaning} must be a number in {interval}")

        number("retention", 0.0, 1.0, True, "the kept share of each frame")
        number("cut_similarity", -1.0, 1.0, False, "the cosine threshold tau")
        number("context_share", 0.0, 1.0, False, "the context share d")
        number("anchor_weight", 0.0, 1.0, False, "the anchor weight beta")
        for name, meaning in (("segments", "the segment count c"), ("anchor_stride", "the anchor stride p")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"fastvid: {name}={value!r} is out of range: {meaning} must be an integer >= 1")
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)):
            raise ConfigError(f"fastvid: vision_layer={self.vision_layer!r} must be an integer layer index")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"fastvid: positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")


def segment_sizes(similarity: torch.Tensor, segments: int, threshold: float) -> list[int]:
    """DySeg: the lengths of the segments of T frames, from the T - 1 similarities of consecutive frames:
    cuts after frame t at the `segments - 1` lowest (ties: the earlier t) and wherever below `threshold`."""
    frames = similarity.numel() + 1
    lowest = torch.argsort(similarity, stable=True)[: max(0, segments - 1)]
    cuts = sorted(set(lowest.tolist()) | set(torch.nonzero(similarity < threshold).flatten().tolist()))
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in itertools.pairwise(bounds)]


def anchor_budgets(sizes: list[int], context: int, stride: int) -> list[int]:
    """Context tokens each frame anchors: per segment of L frames, C L // ceil(L / p) on its frames
    L - 1, L - 1 - p, ..., none on the others."""
    budgets = []
    for length in sizes:
        per_anchor = context * length // math.ceil(length / stride)
        budgets += [per_anchor if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return budgets


def density_scores(features: torch.Tensor) -> torch.Tensor:
    """(n,) density-peak scores rho * delta of n tokens (n, D) (see the module docstring); of two equal
    densities the earlier token counts as the denser."""
    n, width = features.shape
    if n == 0:
        return features.new_zeros(0, dtype=torch.float32)
    features = features.float()
    distance = torch.cdist(features, features) / width**0.5
    nearest = torch.topk(distance, k=min(NEIGHBOURS, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    index = torch.arange(n, device=features.device)
    # denser[i, j]: token j is denser than token i
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    farthest = distance.max()
    parent_distance = torch.where(denser, distance, farthest).min(dim=-1).values
    return parent_distance * density


def anchor_weights(assigned: torch.Tensor, beta: float) -> torch.Tensor:
    """w = max(1 / (|J| + 1), beta) per anchor, from the number of tokens `assigned` to it."""
    return (1.0 / (assigned.float() + 1.0)).clamp(min=beta)


def merge_rows(anchors: torch.Tensor, pool: torch.Tensor, features: torch.Tensor, beta: float, width: int) -> torch.Tensor:
    """DTM: (len(anchors), width) combine rows over the video's tokens. `anchors` and `pool` index
    `features` (and the row width); each pool token joins the anchor of the highest cosine (ties: the
    earlier anchor), anchor a becomes w x_a + (1 - w) mean(J_a)."""
    rows = torch.zeros(anchors.numel(), width, dtype=torch.float32, device=features.device)
    rows[torch.arange(anchors.numel(), device=rows.device), anchors] = 1.0
    if anchors.numel() == 0 or pool.numel() == 0:
        return rows
    normalized = F.normalize(features.float(), dim=-1)
    joined = (normalized[pool] @ normalized[anchors].T).argmax(dim=1)
    assigned = torch.bincount(joined, minlength=anchors.numel())
    weight = anchor_weights(assigned, beta)
    merged = torch.zeros_like(rows)
    merged[joined, pool] = 1.0
    merged = merged / assigned.clamp(min=1).unsqueeze(1)
    has = (assigned > 0).unsqueeze(1)
    return torch.where(has, weight.unsqueeze(1) * rows + (1 - weight.unsqueeze(1)) * merged, rows)


@register_method("fastvid", family="video", sites=("vision", "embeds"))
class FastVID(TokenSelector):
    """Segment each video, keep salient and density-peak tokens per frame, merge the rest into anchors."""

    Config = FastVIDConfig
    example = "retention=0.5"
    neutral = "retention=1.0,context_share=0.0"
    paper = "https://arxiv.org/abs/2503.11187"
    needs = frozenset({"vision_attention"})
    modalities = frozenset({"video"})
    unsupported = WITHOUT_VIDEO
    natural_positions = "keep"

    def vision_layer(self, adapter) -> int:
        return adapter.default_vision_layer() if self.config.vision_layer is None else self.config.vision_layer

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for row, visual in enumerate(context.visual):
            device = visual.slots.device
            keep = torch.ones(len(visual), dtype=torch.bool, device=device)
            changed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sample index of an anchor, its row over the sample)
            importance = probe_values(visual, context.vision[row], "importance")
            for video in videos(visual):
                grid = frame_grid(visual, video)
                features = context.hidden[row, visual.slots[grid]].float().to(device)
                kept, anchors, rows = self.select_video(features, importance[grid])
                keep[grid.flatten()] = False
                keep[grid.flatten()[kept]] = True
                for anchor, weights in zip(anchors.tolist(), rows):
                    full = torch.zeros(len(visual), dtype=torch.float32, device=device)
                    full[grid.flatten()] = weights
                    changed.append((grid.flatten()[anchor], full))
            index = torch.nonzero(keep).flatten()
            if not changed:
                samples.append(SampleSelection(index))
                continue
            combine = torch.zeros(index.numel(), len(visual), dtype=torch.float32, device=device)
            combine[torch.arange(index.numel(), device=device), index] = 1.0
            for anchor, full in changed:
                combine[torch.searchsorted(index, anchor)] = full
            samples.append(SampleSelection(index, combine=combine, combine_space="llm"))
        return Selection(samples)

    def select_video(self, features: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One video, (T, N, D) features and (T, N) salient scores -> (kept flat indices t N + i, sorted;
        the merged anchors' flat indices; their (anchors, T N) combine rows over the video's tokens)."""
        frames, cells, _ = features.shape
        cfg = self.config
        retained = max(1, int(cells * cfg.retention))
        salient_count = retained - int(retained * cfg.context_share)
        context_count = retained - salient_count
        flat = features.reshape(frames * cells, -1)
        kept = []
        rest = []  # per frame, the flat indices of its non-salient tokens in index order
        for t in range(frames):
            order = torch.argsort(scores[t].float(), descending=True, stable=True)
            salient = torch.sort(order[:salient_count]).values
            kept.append(salient + t * cells)
            rest.append(torch.sort(order[salient_count:]).values + t * cells)
        empty = torch.zeros(0, dtype=torch.long, device=features.device)
        if context_count == 0 or all(r.numel() == 0 for r in rest):
            return torch.sort(torch.cat(kept)).values, empty, torch.zeros(0, frames * cells, device=features.device)
        global_features = F.normalize(features.mean(dim=1), dim=-1)
        similarity = (global_features[:-1] * global_features[1:]).sum(dim=-1)
        sizes = segment_sizes(similarity, cfg.segments, cfg.cut_similarity)
        budgets = anchor_budgets(sizes, context_count, cfg.anchor_stride)
        density = [density_scores(flat[r]) for r in rest]
        anchors, rows = [], []
        start = 0
        for length in sizes:
            for t in range(start, start + length):
                budget = budgets[t]
                if budget == 0:
                    continue
                if budget > rest[t].numel():
                    warnings.warn(
                        f"fastvid: frame {t} anchors {budget} context tokens but has {rest[t].numel()} left after the "
                        f"salient ones; keeping those {rest[t].numel()}", stacklevel=4,
                    )
                    budget = rest[t].numel()
                chosen = rest[t][torch.argsort(density[t], descending=True, stable=True)[:budget]]
                pool = rest[t] if budgets[t] == context_count else torch.cat(rest[start : start + length])
                anchors.append(chosen)
                rows.append(merge_rows(chosen, pool, flat, cfg.anchor_weight, frames * cells))
            start += length
        anchors = torch.cat(anchors) if anchors else empty
        rows = torch.cat(rows) if rows else torch.zeros(0, frames * cells, device=features.device)
        return torch.sort(torch.cat([*kept, anchors])).values, anchors, rows
