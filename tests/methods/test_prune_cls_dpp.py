"""FasterVLM, FoPru and CDPruner against their algorithms: hand-made inputs with known answers, and
computations from eager attention maps / embeddings of the tiny models, written independently of
vlmkit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model, tower_projections
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.prune.cdpruner import CDPruner, dpp_greedy
from vlmkit.methods.prune.fastervlm import FasterVLM
from vlmkit.methods.prune.fopru import FoPru


def tokens(rows: int, cols: int, crops: int = 1, first_slot: int = 5) -> VisualTokens:
    """One image of `crops` tower rows, each a rows x cols grid, in sequence order from `first_slot`."""
    per = rows * cols
    n = per * crops
    index = torch.arange(n)
    local = index % per
    return VisualTokens(
        slots=index + first_slot, origin=index, image=torch.zeros(n, dtype=torch.long), frame=torch.zeros(n, dtype=torch.long),
        row=local // cols, col=local % cols, crop=index // per, grids=[(1, rows, cols)], spans=[(first_slot, n)],
        modality=["image"],
    )


def probe_context(visual: VisualTokens, importance: torch.Tensor) -> SelectionContext:
    probes = [[{"importance": importance, "keys": torch.zeros(len(visual), 2)}]]
    return SelectionContext(hidden=torch.zeros(1, 40, 4), visual=[visual], layer=0, num_layers=4, vision=probes)


def kept(method, visual, importance) -> list[int]:
    return method.select(probe_context(visual, importance)).samples[0].keep.tolist()


# ---------------------------------------------------------------- FasterVLM
def test_fastervlm_keeps_the_top_cls_attention_in_patch_order():
    visual = tokens(2, 3)
    importance = torch.tensor([0.05, 0.30, 0.10, 0.30, 0.20, 0.05])
    assert kept(FasterVLM(keep=0.5), visual, importance) == [1, 3, 4]
    assert kept(FasterVLM(tokens=2), visual, importance) == [1, 3]  # tie at 0.30: the lower index
    assert kept(FasterVLM(tokens=1), visual, importance) == [1]


def test_fastervlm_budget_is_per_tower_row_and_defaults_to_a_tenth():
    visual = tokens(2, 2, crops=2)  # base view + one AnyRes tile
    importance = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.9, 0.8, 0.0, 0.1])
    assert kept(FasterVLM(tokens=1), visual, importance) == [1, 4]  # one per crop, not the global top 2
    assert kept(FasterVLM(keep=0.5), visual, importance) == [1, 2, 4, 5]
    assert FasterVLM().config.kept_count(576, 0.1) == 58  # the paper's 90% reduction: 58 of 576


# ---------------------------------------------------------------- FoPru
def test_fopru_rank_truncates_the_kept_count():
    visual = tokens(2, 3)
    importance = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.35, 0.20])
    assert kept(FoPru(keep=0.3), visual, importance) == [1]  # floor(1.8) = 1 (round would keep 2)
    assert kept(FoPru(keep=0.5), visual, importance) == [1, 3, 4]
    assert kept(FoPru(tokens=2), visual, importance) == [1, 4]


def test_fopru_row_keeps_whole_rows_by_summed_significance():
    visual = tokens(3, 2)  # rows {0, 1}, {2, 3}, {4, 5}
    importance = torch.tensor([0.30, 0.00, 0.10, 0.15, 0.20, 0.20])  # row sums 0.30, 0.25, 0.40
    assert kept(FoPru(variant="row", keep=0.5), visual, importance) == [4, 5]  # floor(1.5) = 1 row
    assert kept(FoPru(variant="row", keep=0.7), visual, importance) == [0, 1, 4, 5]  # floor(2.1) = 2 rows
    assert kept(FoPru(variant="row", tokens=4), visual, importance) == [0, 1, 4, 5]  # 4 of 6 tokens -> 2 of 3 rows
    assert kept(FoPru(variant="row", keep=0.1), visual, importance) == [4, 5]  # at least one row
    # rows are counted per crop: one of each crop's two rows
    two_crops = tokens(2, 2, crops=2)
    importance = torch.tensor([0.1, 0.1, 0.3, 0.0, 0.0, 0.5, 0.2, 0.2])
    assert kept(FoPru(variant="row", keep=0.5), two_crops, importance) == [2, 3, 4, 5]


def reference_focal(attention: torch.Tensor, count: int, strategy: str) -> list[int]:
    """FoPru's significance and pruning written from the description (full head-mean map in hand)."""
    scores = attention.mean(dim=0)  # (N, N): mean over heads
    s1, s2 = scores.mean(dim=0), scores.mean(dim=1)  # received (over queries), paid (over keys)
    significance = s1 if s1.var() > s2.var() else s2
    n = significance.numel()
    if strategy == "rank":
        return sorted(torch.argsort(significance, descending=True, stable=True)[:count].tolist())
    side = math.isqrt(n)
    rows = torch.argsort(significance.view(side, side).sum(dim=1), descending=True, stable=True)[:count]
    return sorted(torch.arange(n).view(side, side)[rows].flatten().tolist())


def marginals_context(visual: VisualTokens, received: torch.Tensor, paid: torch.Tensor) -> SelectionContext:
    """A probe with the patch map's logit marginals (the "importance" entry is a decoy the rule must ignore)."""
    decoy = -torch.arange(len(visual), dtype=torch.float32)
    probe = {"importance": decoy, "keys": torch.zeros(len(visual), 2), "received_logits": received, "paid_logits": paid}
    return SelectionContext(hidden=torch.zeros(1, 40, 4), visual=[visual], layer=0, num_layers=4, vision=[[probe]])


def kept_by_marginals(method, visual, received, paid) -> list[int]:
    return method.select(marginals_context(visual, received, paid)).samples[0].keep.tolist()


def test_fopru_takes_the_marginal_with_the_larger_variance():
    visual = tokens(2, 2)  # N = 4 patches
    # s1 varies more (var 1/60 against 0.0026): the top s1 patch
    received, paid = torch.tensor([0.1, 0.4, 0.2, 0.3]), torch.tensor([0.225, 0.125, 0.175, 0.2375])
    assert kept_by_marginals(FoPru(tokens=1), visual, received, paid) == [1]
    # a flat s1: s2 = [.05, .225, .15, .2375] leads
    received, paid = torch.tensor([0.25, 0.26, 0.24, 0.25]), torch.tensor([0.05, 0.225, 0.15, 0.2375])
    assert kept_by_marginals(FoPru(tokens=1), visual, received, paid) == [3]
    assert kept_by_marginals(FoPru(keep=0.5), visual, received, paid) == [1, 3]
    assert kept_by_marginals(FoPru(variant="row", keep=0.5), visual, received, paid) == [2, 3]  # rows .275 < .3875
    # equal variances (the same values permuted, exact in binary): the strict > gives s2
    received, paid = torch.tensor([0.125, 0.25, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.25, 0.125])
    assert kept_by_marginals(FoPru(tokens=1), visual, received, paid) == [1]  # s1 would pick 2


def test_fopru_marginals_are_taken_per_tower_row():
    visual = tokens(1, 2, crops=2)  # two crops of 1 x 2 patches
    # crop 0: s1 = [0.1, 0.3] (var .02), s2 = [0.45, 0.4] (var .00125) -> s1; crop 1: s1 flat -> s2
    received = torch.tensor([0.1, 0.3, 0.2, 0.2])
    paid = torch.tensor([0.45, 0.4, 0.1, 0.3])
    assert kept_by_marginals(FoPru(keep=0.5), visual, received, paid) == [1, 3]


@pytest.mark.parametrize("query_bias,paid_wins", [(0.0, False), (6.0, True)], ids=["received", "paid"])
@pytest.mark.parametrize("variant,keep,count", [("rank", 0.25, 4), ("row", 0.5, 2)])
def test_fopru_with_cls_equals_the_reference_on_the_patch_scores(variant, keep, count, query_bias, paid_wins):
    """A CLIP-like map of [CLS] and 16 patches: the reference's scores are the logits before the
    softmax, [CLS] row and column dropped; the probe's marginals (means over patch queries and over
    patch keys) give its selection. Logits raised per query make the paid side vary more."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 17, 17, generator=generator)
    logits += query_bias * torch.rand(17, 1, generator=generator)  # per query: every key's logit moves
    patches = logits[:, 1:, 1:]  # (heads, patch queries, patch keys)
    mean_map = patches.mean(dim=0)
    received, paid = mean_map.mean(dim=0), mean_map.mean(dim=1)
    assert (received.var() <= paid.var()) == paid_wins
    chosen = kept_by_marginals(FoPru(variant=variant, keep=keep), tokens(4, 4), received, paid)
    assert chosen == reference_focal(patches, count, variant)


@pytest.mark.parametrize("variant,keep,count", [("rank", 0.25, 4), ("row", 0.5, 2)])
def test_fopru_on_a_tower_without_cls_equals_the_reference_variance_rule(variant, keep, count):
    """Qwen2-VL's probe has no marginals: the received attention it gives ("importance") is used.
    Without [CLS] every softmax row sums to one, so s2 is constant and the rule picks s1 anyway."""
    logits = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))
    attention = logits.softmax(dim=-1)  # (heads, queries, keys) over a 4x4 grid
    received = attention.mean(dim=(0, 1))  # what vlmkit's probe computes for such towers
    assert kept(FoPru(variant=variant, keep=keep), tokens(4, 4), received) == reference_focal(attention, count, variant)


def test_fopru_rejects_an_unknown_variant():
    with pytest.raises(ConfigError, match="variant='column' is not one of rank, row"):
        FoPru(variant="column")


# ---------------------------------------------------------------- CDPruner
def greedy_by_determinants(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP written directly: add the token that maximises det(L_S) (float64)."""
    kernel = kernel.double()
    chosen: list[int] = []
    for _ in range(count):
        best, best_det = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            index = torch.tensor(chosen + [j])
            det = torch.linalg.det(kernel[index][:, index]).item()
            if det > best_det:
                best, best_det = j, det
        chosen.append(best)
    return sorted(chosen)


def test_dpp_greedy_equals_greedy_determinant_maximisation():
    features = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    quality = torch.rand(12, generator=torch.Generator().manual_seed(1)) + 0.1
    normalized = F.normalize(features, dim=-1)
    kernel = quality[:, None] * (normalized @ normalized.T) * quality[None, :]
    for count in (1, 3, 5):
        assert dpp_greedy(kernel, count).tolist() == greedy_by_determinants(kernel, count)


def test_dpp_greedy_takes_the_untaken_in_index_order_once_no_gain_is_left():
    kernel = torch.diag(torch.tensor([1.0, 0.0, 2.0, 0.0]))
    assert dpp_greedy(kernel, 3).tolist() == [0, 1, 2]  # picks 2, 0; then no positive gain -> 1


def test_cdpruner_relevance_and_kernel_by_hand():
    """Four visual tokens, one text token after them; relevance min-max normalised; greedy DPP."""
    visual = tokens(2, 2, first_slot=2)  # slots 2..5
    hidden = torch.zeros(1, 8, 2)
    hidden[0, 0] = torch.tensor([0.0, 1.0])  # before the image (e.g. the system prompt)
    hidden[0, 1] = torch.tensor([0.0, 1.0])
    hidden[0, 2:6] = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.6, 0.8], [-1.0, 0.0]])
    hidden[0, 6] = torch.tensor([1.0, 0.0])  # the instruction
    valid = torch.ones(1, 7, dtype=torch.bool)
    valid = torch.cat([valid, torch.zeros(1, 1, dtype=torch.bool)], dim=1)  # slot 7: padding, ignored
    context = SelectionContext(hidden=hidden, visual=[visual], layer=0, num_layers=4, valid=valid)
    # m = cos to (1, 0): [1, 0.995, 0.6, -1]; r = (m + 1 + 1e-6) / 2
    method = CDPruner(tokens=2)
    relevance = method.relevance(hidden[0, 2:6], hidden[0, 6:7])
    cos = torch.tensor([1.0, 1 / math.sqrt(1.01), 0.6, -1.0])
    assert torch.allclose(relevance, (cos + 1 + 1e-6) / 2)
    normalized = F.normalize(hidden[0, 2:6], dim=-1)
    kernel = relevance[:, None] * (normalized @ normalized.T) * relevance[None, :]
    # first the most relevant token 0; then token 2 (relevance 0.8, far from 0) beats token 1
    # (relevance ~1 but nearly parallel to 0): gains 0.8^2 (1 - 0.6^2) = 0.41 vs ~0.0098
    assert greedy_by_determinants(kernel, 2) == [0, 2]
    assert method.select(context).samples[0].keep.tolist() == [0, 2]
    # all text tokens: the text (0, 1) before the image dominates the mean and token 2 leads
    assert CDPruner(tokens=1, instruction="all").select(context).samples[0].keep.tolist() == [2]
    # the reference's sign (CLIP features): the least similar token 3 leads
    assert CDPruner(tokens=1, negate_relevance=True).select(context).samples[0].keep.tolist() == [3]


def test_cdpruner_theta_weights_the_relevance_exponentially():
    method = CDPruner(theta=0.75)  # alpha = 0.75 / (2 * 0.25) = 1.5
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    relevance = method.relevance(features, torch.tensor([[1.0, 0.0]]))
    plain = torch.tensor([1.0 + 1e-6, 1e-6, 1 / math.sqrt(2) + 1e-6])
    assert torch.allclose(relevance, torch.exp(1.5 * plain))
    assert torch.equal(CDPruner().relevance(features, torch.zeros(0, 2)), torch.ones(3))  # no text: r = 1
    with pytest.raises(ConfigError, match="theta=1.0 must be a number in"):
        CDPruner(theta=1.0)


# ---------------------------------------------------------------- on the tiny models
@pytest.mark.parametrize("name,count", [("fastervlm", lambda n: math.floor(0.33 * n + 0.5))], ids=["fastervlm"])
def test_cls_attention_methods_match_eager_cls_attention(name, count):
    """LLaVA's CLIP tower: [CLS] attention at the layer the projector reads, top share per image,
    patch order."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 2  # hidden_states[-2] is this layer's output
    with torch.no_grad():
        attention = tower(batch["pixel_values"], output_attentions=True).attentions[layer]
    with vlmkit.apply(tiny, f"{name}:keep=0.33") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections[name]
    for image in range(2):
        cls_row = attention[image, :, 0, 1:].mean(dim=0)
        top = torch.argsort(cls_row, descending=True, stable=True)[: count(cls_row.numel())]
        assert chosen[image].tolist() == sorted(top.tolist())


@pytest.mark.parametrize("variant,keep", [("rank", 0.33), ("row", 0.5)])
def test_fopru_matches_the_marginals_of_eager_clip_attention_maps(variant, keep):
    """LLaVA's CLIP tower: the head-mean scores (logits before the softmax) of the layer the projector
    reads, [CLS] row and column dropped; s1 = mean over queries, s2 = mean over keys, the one with the
    larger variance; floor(keep * 144) tokens or floor(keep * 12) rows of the 12 x 12 grid."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 2  # hidden_states[-2] is this layer's output
    query, key, scale = tower_projections(tower, batch["pixel_values"], layer)
    maps = ((query @ key.transpose(-1, -2)) * scale).mean(dim=1)[:, 1:, 1:]
    with vlmkit.apply(tiny, f"fopru:keep={keep},variant={variant}") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["fopru"]
    for image in range(2):
        s1, s2 = maps[image].mean(dim=0), maps[image].mean(dim=1)
        significance = s1 if s1.var() > s2.var() else s2
        n = significance.numel()
        side = math.isqrt(n)
        if variant == "rank":
            expected = torch.argsort(significance, descending=True, stable=True)[: math.floor(keep * n)]
        else:
            rows = torch.argsort(significance.view(side, side).sum(dim=1), descending=True, stable=True)
            expected = torch.arange(n).view(side, side)[rows[: math.floor(keep * side)]].flatten()
        assert chosen[image].tolist() == sorted(expected.tolist())


def test_cdpruner_matches_an_independent_computation_on_llava():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    seen = {}
    hook = tiny.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        tiny(**batch)
    hook.remove()
    with vlmkit.apply(tiny, "cdpruner:keep=0.125") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["cdpruner"]
    placeholders = batch["input_ids"] == tiny.config.image_token_id
    for sample in range(2):
        slots = torch.nonzero(placeholders[sample]).flatten()
        text = torch.arange(placeholders.shape[1]) > slots.max()  # the instruction: after the image
        text &= batch["attention_mask"][sample].bool()
        x, t = seen["embeds"][sample, slots].double(), seen["embeds"][sample, text].double()
        m = (F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T).mean(dim=1)
        r = (m - m.min() + 1e-6) / (m.max() - m.min())
        kernel = r[:, None] * (F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T) * r[None, :]
        expected = dpp_reference(kernel, math.floor(0.125 * slots.numel() + 0.5))
        assert len(expected) == 18 and chosen[sample].tolist() == expected


def dpp_reference(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by conditional gains L_jj - L_jS L_SS^-1 L_Sj (float64), for larger kernels."""
    chosen: list[int] = []
    for _ in range(count):
        if chosen:
            index = torch.tensor(chosen)
            cross = kernel[:, index]
            gains = kernel.diagonal() - (cross @ torch.linalg.solve(kernel[index][:, index], cross.T)).diagonal()
        else:
            gains = kernel.diagonal().clone()
        gains[chosen] = -math.inf
        chosen.append(int(torch.argmax(gains)))
    return sorted(chosen)
