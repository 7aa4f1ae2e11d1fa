"""SparseVLM: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(Zhang et al., ICML 2025, arXiv:2410.04417). Follows the first release (v1: rank-adaptive counts)
and, for fixed budgets, v1.5's per-stage tables; not SparseVLM+ (v2.0: attention-gravity correction,
head selection, no recycling, original positions).

Site: `layer`, several times (prefill only).

Raters (once per prefill, from the LLM's input embeddings): with V the sample's visual tokens and T
every token after its last visual token (the question and the generation prompt),

    m = mean over visual rows of softmax_T(V T^T),        raters = {t : m_t > mean(m)}.

Stages: before each stage layer K, with A the attention of layer K-1 (softmax over the keys each
query sees, mean over heads), P = A[raters, visual] (R x n) and s = mean over the rows of P. The
top-k visual tokens by s are kept. Recycling: of the d deleted tokens, the r = int(0.3 d) + 1 with
the highest s are clustered into c = int(r / 10) + 1 groups by DPC-kNN on their hidden states (distance
|x_i - x_j| / sqrt(C); density exp(-mean squared distance to the c nearest, itself included);
delta = distance to the nearest denser token, the largest distance for the densest; the c tokens
with the highest delta * density are the centres; every token joins its nearest centre). Each group
becomes one token, the plain mean of its members, entering right after the kept visual tokens (in
the centres' order); positions are re-indexed, as the reference's.

How many are kept (k):
- default, the rank-adaptive count of the first release (v1), n the stage's visual tokens:
  k = min(int(rank(P) * scale + bias), n - 1), nothing pruned when rank(P) = n, recycled tokens on
  top; scale 13.5, bias 0 (the reference's "192 tokens" script;
  9 / 6 its 128, 0.8 / 0 its 64), stages after layers 2, 6, 15, 19 of 32 (before 3, 7, 16, 20);
- `retain_tokens=` 192 | 128 | 96 | 64: v1.5's fixed top-k tables (300/200/110, 303/110/36,
  238/48/26, 66/30/17 of 576; counts scaled to a sample's visual-token count n0 as
  floor(count * n0 / 576 + 0.5) when it is not 576), k = min(count, n - 1), recycled tokens on top,
  stages after layers 2, 6, 15 (before 3, 7, 16);
- `keep=` / `tokens=` (vlmkit's budget, for the sweeps): the share / count of the visual tokens left
  after the last stage, recycled tokens included. Stage targets follow the v1.5 table whose last
  share is nearest to the budget (in log ratio), scaled so the last stage lands on the budget:
  c_s = min(1, keep * T_s / T_3) (keep=0.0625 gives the 128-token table's 303, 110, 36 of 576);
  targets round halves up; k is the largest count with k + recycled <= target (no recycling when
  even k = 0 exceeds it); a stage whose target covers its tokens keeps them all. Stages as v1.5's.
Default stage layers are scaled to the model's depth as `round(l * num_layers / 32)` (Python's
rounding), clipped to 1..num_layers-1; stages that fall on one layer take the later one's target.

Reference: Gumpest/SparseVLMs (Apache-2.0). v1 (commit 91fb6d9): `llava/model/language_model/
modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`: raters, recycling, `pruning_loc`),
`score.py` (`attn_postprocess_rank`), `utils.py` (`cluster_and_merge`), `scripts/v1_5/eval/*.sh`
(scale/bias); v1.5 (branch v1.5; the 96 table from main's non-2.0 path): `score.py`
(`attn_postprocess_topk`, `sparse_token_dict`, `layer_dict`).

Deviations from the reference, and why:
- per sample over all its visual tokens (images, frames and crops together; the reference: one
  576-token image, batch size 1); a recycled token enters after the kept tokens of its centre's
  image; structural tokens (LLaVA-NeXT's newlines) are never scored nor dropped, and the ones after
  the last visual token count among the text, as the engine's text rows;
- a recycled group is held by its centre (a dropped token): the centre's row takes the group's mean
  (`merge_target`) and `order` places it after the kept ones; the mean is exact (the reference
  divides by count + 1e-6);
- ties go to the lower index (the reference adds uniform noise of 1e-6 to the densities, and
  torch.topk leaves ties unspecified); raters, ranks and clusters in float32 (the reference: fp16,
  its rank from fp16 attention);
- no rater above the mean (one text token, or all alike): every text token rates; a sample with no
  text after its visual tokens keeps them all (the reference divides by zero);
- keep/tokens (no reference rule, see above): a stage whose target reaches its tokens keeps them
  all, where the reference's k <= n - 1 always drops one and recycles it, so keep=1.0 is the
  unpatched model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from vlmkit.engine.selection import (
    SampleSelection,
    Selection,
    SelectionContext,
    VisualTokens,
)
from vlmkit.errors import ConfigError, InputError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, layer_list, scaled_layers, top_k_sorted
from vlmkit.registry import register_method

DEFAULT_DEPTH = 32  # LLaVA-1.5-7B's decoder layers
RANK_LAYERS = (3, 7, 16, 20)  # v1: pruning after layers 2, 6, 15, 19
TABLE_LAYERS = (3, 7, 16)  # v1.5: pruning after layers 2, 6, 15
DEFAULT_SCALE = 13.5  # v1's "192 tokens" setting (scripts/v1_5/eval/mme.sh)
DEFAULT_BIAS = 0.0
REFERENCE_TOKENS = 576
#: v1.5's top-k counts at its three stages, of 576 tokens, by retained-token setting
TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLE_SHARE = 0.3  # of the deleted tokens, the best-scored share recycled (+1)
CLUSTER_DIVISOR = 10  # one cluster per 10 recycled tokens (+1)


@dataclass(frozen=True)
class SparseVLMConfig(TokenBudgetConfig):
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "stage layers (>= 1): prune before each, from the layer before's attention (default: "
                          "3, 7, 16, 20 of 32 for the rank count, 3, 7, 16 otherwise, scaled to the model's depth)"},
    )
    scale: float = field(default=DEFAULT_SCALE, metadata={"help": "rank count: k = int(rank * scale + bias)"})
    bias: float = field(default=DEFAULT_BIAS, metadata={"help": "rank count: k = int(rank * scale + bias)"})
    retain_tokens: int | None = field(
        default=None,
        metadata={"help": "v1.5's fixed top-k table instead of the rank count: 192, 128, 96 or 64 "
                          "(counts of 576, scaled to other token counts)"},
    )
    recycle: bool = field(default=True, metadata={"help": "recycle deleted tokens as DPC-kNN cluster means"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            layers = layer_list("sparsevlm", "layers", self.layers, minimum=1, reason="scores come from the layer before")
            if not layers:
                raise ConfigError("sparsevlm: layers=() names no stage; give one or more decoder layers, e.g. layers=(3, 7, 16)")
            object.__setattr__(self, "layers", layers)
        for name in ("scale", "bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"sparsevlm: {name}={value!r} must be a finite number")
        if self.scale <= 0:
            raise ConfigError(f"sparsevlm: scale={self.scale!r} must be > 0 (k = int(rank * scale + bias))")
        if self.retain_tokens is not None:
            if self.retain_tokens not in TABLES or isinstance(self.retain_tokens, bool):
                raise ConfigError(f"sparsevlm: retain_tokens={self.retain_tokens!r} is not one of {', '.join(map(str, TABLES))} "
                                  "(v1.5's tables)")
            if self.keep is not None or self.tokens is not None:
                raise ConfigError("sparsevlm: give retain_tokens (v1.5's table) or keep/tokens (a budget), not both")
        if (self.scale, self.bias) != (DEFAULT_SCALE, DEFAULT_BIAS) and self.mode != "rank":
            raise ConfigError(f"sparsevlm: scale/bias set the rank count; with {self.mode} they do nothing: drop them")
        if self.mode != "rank" and self.layers is not None and len(self.layers) != len(TABLE_LAYERS):
            raise ConfigError(f"sparsevlm: {self.mode} follows v1.5's three stages: give three layers, not layers={self.layers!r}")
        if not isinstance(self.recycle, bool):
            raise ConfigError(f"sparsevlm: recycle={self.recycle!r} must be true or false")

    @property
    def mode(self) -> str:
        """How the stages count: "rank" (v1), "retain_tokens" (v1.5's table) or "keep/tokens" (a budget)."""
        if self.retain_tokens is not None:
            return "retain_tokens"
        return "keep/tokens" if self.keep is not None or self.tokens is not None else "rank"


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices of the rater text tokens: m = mean over visual rows of softmax over text of V T^T,
    raters m > mean(m) (every text token when none is above, or when there is one)."""
    relevance = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)
    raters = torch.nonzero(relevance > relevance.mean()).flatten()
    return raters if raters.numel() else torch.arange(text.shape[0], device=text.device)


def rank_count(relation: torch.Tensor, scale: float, bias: float) -> int:
    """v1's count for a rater x visual attention matrix P: all n when rank(P) = n, else
    min(int(rank * scale + bias), n - 1) (at least 0)."""
    available = relation.shape[1]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if rank == available:
        return available
    return min(max(int(rank * scale + bias), 0), available - 1)


def recycled_count(deleted: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for `deleted` dropped tokens: int(0.3 d) + 1 and int(m / 10) + 1."""
    if deleted == 0:
        return 0, 0
    members = int(deleted * RECYCLE_SHARE) + 1
    return members, int(members / CLUSTER_DIVISOR) + 1


def dpc_knn(features: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering as the reference's `cluster_and_merge`, ties to the lower index.

    Returns (centres, assignment): centre indices by decreasing delta * density, and for every token
    the position in `centres` of the centre it joins (nearest; a centre joins itself).
    """
    count, channels = features.shape
    x = features.float()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(channels)
    nearest = torch.topk(distance, k=clusters, dim=1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=1))
    index = torch.arange(count, device=x.device)
    # denser[i, j]: token j is denser than token i (equal densities: the lower index is denser)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    delta = torch.where(denser, distance, distance.max()).min(dim=1).values
    centres = torch.argsort(delta * density, descending=True, stable=True)[:clusters]
    assignment = distance[centres].argmin(dim=0)  # first (best-scored) centre on ties
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


@register_method("sparsevlm", family="prune", sites="layer")
class SparseVLM(TokenSelector):
    """Prune visual tokens in stages by the attention of text raters; recycle the best dropped ones as cluster means."""

    Config = SparseVLMConfig
    example = "keep=0.25"
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2410.04417"
    needs = frozenset({"text_attention", "embeds"})
    natural_positions = "reindex"

    def __init__(self, config=None, **params):
        super().__init__(config, **params)
        self._raters: list[torch.Tensor | None] | None = None  # per sample, rater indices in the first stage's text rows
        self._text_counts: list[int] | None = None  # per sample, text tokens after the visual ones at the first stage
        self._entering: list[int] | None = None  # per sample, visual tokens at the first stage

    # ---------------------------------------------------------------- stages and counts
    def _reference_layers(self) -> tuple[int, ...]:
        return RANK_LAYERS if self.config.mode == "rank" else TABLE_LAYERS

    def _stage_plan(self, num_layers: int) -> list[tuple[int, int]]:
        """(layer, reference stage) per stage, in order; reference stages on one layer: the later one."""
        if self.config.layers is not None:
            return list(zip(self.config.layers, range(len(self.config.layers))))
        plan: dict[int, int] = {}
        for stage, layer in enumerate(scaled_layers(self._reference_layers(), num_layers, DEFAULT_DEPTH)):
            plan[layer] = stage
        return sorted(plan.items())

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self._stage_plan(num_layers))

    def budget_targets(self, entering: int) -> list[int]:
        """keep/tokens mode: visual tokens left after each of v1.5's three stages (recycled included)."""
        config = self.config
        if config.tokens is not None:
            if config.tokens > entering:
                warnings.warn(
                    f"tokens={config.tokens} exceeds the {entering} visual tokens available; keeping all {entering}",
                    stacklevel=4,
                )
            final = min(config.tokens, entering)
        else:
            final = config.kept_count(entering, 1.0, rounding="half_up")
        share = final / entering
        table = min(TABLES.values(), key=lambda t: abs(math.log(share * REFERENCE_TOKENS / t[-1])))
        shares = [min(1.0, share * count / table[-1]) for count in table[:-1]]
        return [min(entering, max(final, math.floor(entering * s + 0.5))) for s in shares] + [final]

    def table_counts(self, entering: int) -> list[int]:
        """retain_tokens mode: v1.5's top-k counts, scaled to `entering` tokens when it is not 576."""
        table = TABLES[self.config.retain_tokens]
        if entering == REFERENCE_TOKENS:
            return list(table)
        return [math.floor(count * entering / REFERENCE_TOKENS + 0.5) for count in table]

    def stage_count(self, relation: torch.Tensor, entering: int, stage: int) -> tuple[int, bool]:
        """(k, recycle): how many visual tokens stage `stage` (reference numbering) keeps by score, and
        whether the dropped ones are recycled."""
        available = relation.shape[1]
        config = self.config
        if config.mode == "rank":
            count = rank_count(relation, config.scale, config.bias)
            return count, config.recycle and count < available
        if config.mode == "retain_tokens":
            count = min(self.table_counts(entering)[stage], available - 1)
            return count, config.recycle
        target = self.budget_targets(entering)[stage]
        if target >= available:
            return available, False
        if not config.recycle:
            return target, False
        for count in range(target - 1, -1, -1):
            if count + recycled_count(available - count)[1] <= target:
                return count, True
        return target, False

    # ---------------------------------------------------------------- selection
    def select(self, context: SelectionContext) -> Selection:
        plan = self._stage_plan(context.num_layers)
        layers = [layer for layer, _ in plan]
        if context.layer not in layers:
            raise InputError(f"sparsevlm: asked to select before layer {context.layer}, not one of its stages {tuple(layers)}")
        position = layers.index(context.layer)
        if position == 0:
            self._start(context)
        elif self._raters is None or len(self._raters) != len(context.visual):
            raise InputError(f"sparsevlm: stage {position + 1} (layer {context.layer}) ran without its first stage")
        stage = plan[position][1]
        samples = []
        for row, visual in enumerate(context.visual):
            raters = self._raters[row]
            if raters is None or len(visual) == 0:
                samples.append(SampleSelection(torch.arange(len(visual), device=visual.slots.device)))
                continue
            attention = context.text_attention[row]
            offset = attention.shape[0] - self._text_counts[row]  # text rows before the first stage's (never fewer)
            if offset < 0:
                raise InputError("sparsevlm: fewer text tokens follow the visual tokens than at the first stage")
            relation = attention[offset + raters].float()
            samples.append(self.select_sample(relation, context.hidden[row, visual.slots], visual, self._entering[row], stage))
        return Selection(samples)

    def _start(self, context: SelectionContext) -> None:
        """First stage of a prefill: each sample's raters from the input embeddings."""
        self._raters, self._text_counts, self._entering = [], [], []
        for row, visual in enumerate(context.visual):
            text = context.text_rows[row]
            self._entering.append(len(visual))
            self._text_counts.append(int(text.numel()))
            if text.numel() == 0 or len(visual) == 0:
                self._raters.append(None)
                continue
            embeds = context.embeds[row]
            self._raters.append(text_raters(embeds[visual.slots], embeds[text]))

    def select_sample(self, relation: torch.Tensor, hidden: torch.Tensor, visual: VisualTokens, entering: int,
                      stage: int) -> SampleSelection:
        """One sample's stage: `relation` (R, n) rater attention, `hidden` (n, C) its visual tokens' states."""
        available = relation.shape[1]
        device = relation.device
        scores = relation.mean(dim=0)
        count, recycle = self.stage_count(relation, entering, stage)
        if count >= available:
            return SampleSelection(torch.arange(available, device=device))
        top = top_k_sorted(scores, count)
        if not recycle:
            return SampleSelection(top)
        dropped = torch.ones(available, dtype=torch.bool, device=device)
        dropped[top] = False
        deleted = torch.nonzero(dropped).flatten()
        members, clusters = recycled_count(deleted.numel())
        candidates = deleted[top_k_sorted(scores[deleted], members)]
        centres, assignment = dpc_knn(hidden[candidates], clusters)
        centres = candidates[centres]  # in cluster order
        keep = torch.sort(torch.cat([top, centres])).values
        merge_target = torch.full((available,), -1, dtype=torch.long, device=device)
        merge_target[keep] = torch.arange(keep.numel(), device=device)
        merge_target[candidates] = torch.searchsorted(keep, centres[assignment])
        image = visual.image.to(device)
        entry = []  # per image: its kept tokens in sequence order, then its centres in cluster order
        for value in torch.unique(image[keep]).tolist():
            entry += [top[image[top] == value], centres[image[centres] == value]]
        order = torch.searchsorted(keep, torch.cat(entry))
        identity = torch.equal(order, torch.arange(keep.numel(), device=device))
        return SampleSelection(keep, merge_target=merge_target, order=None if identity else order)
