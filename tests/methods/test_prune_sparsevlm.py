"""SparseVLM against its reference code's algorithm (Gumpest/SparseVLMs v1 and v1.5): hand-made inputs
with known answers (raters, the rank count, DPC-kNN, the budget tables), and an independent computation
from the tiny LLaVA's eager attention maps, hidden states and input embeddings."""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import inputs, model
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.prune.sparsevlm import (
    SparseVLM,
    dpc_knn,
    rank_count,
    recycled_count,
    text_raters,
)


def tokens(n: int, first_slot: int = 2, image=None) -> VisualTokens:
    index = torch.arange(n)
    zeros = torch.zeros(n, dtype=torch.long)
    return VisualTokens(
        slots=index + first_slot, origin=index, image=zeros.clone() if image is None else torch.tensor(image),
        frame=zeros.clone(), row=index // 3, col=index % 3, crop=zeros.clone(), grids=[(1, 2, 3)], modality=["image"],
    )


# ---------------------------------------------------------------- raters, counts, clustering by hand
def test_raters_are_the_text_tokens_above_the_mean_relevance():
    # V T^T rows: v0 = (2, 0, 0), v1 = (0, 0, 2); softmax over text: (e^2, 1, 1) / (e^2 + 2) = (.787, .106, .106)
    # and its mirror; the mean over visual rows m = (.447, .106, .447) against mean(m) = 1/3: raters 0 and 2
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    assert text_raters(visual, text).tolist() == [0, 2]
    # none above the mean (one text token, or text tokens all alike): every text token rates
    assert text_raters(visual, text[:1]).tolist() == [0]
    assert text_raters(visual, torch.ones(3, 2)).tolist() == [0, 1, 2]


def test_rank_count_as_v1():
    proportional = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.4, 0.6, 0.8]])  # rank 1 of n = 4
    assert rank_count(proportional, 1.5, 1.0) == 2  # int(1 * 1.5 + 1) = int(2.5)
    assert rank_count(proportional, 13.5, 0.0) == 3  # int(13.5) = 13, at most n - 1
    assert rank_count(proportional, 0.5, -1.0) == 0  # int(-0.5) = 0
    assert rank_count(torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, 0.1], [0.1, 0.0, 0.4]]), 1.0, 0.0) == 3  # rank = n: all


def test_recycled_counts_truncate_as_the_reference():
    # int(0.3 d) + 1 recycled, int(m / 10) + 1 clusters
    assert recycled_count(1) == (1, 1)
    assert recycled_count(29) == (9, 1)
    assert recycled_count(30) == (10, 2)
    assert recycled_count(276) == (83, 9)  # 576 - 300: v1.5's first stage at 192 tokens
    assert recycled_count(0) == (0, 0)


def test_dpc_knn_by_hand():
    # 1-D points (repeated over 4 channels: L2 / sqrt(4) is the 1-D distance), 3 clusters, so density
    # uses the 3 nearest (itself included): exp(-(0 + a^2 + b^2) / 3)
    #   0: (.4, 1) -> .679   .4: (.4, .6) -> .841   1: (.6, 1) -> .636
    #   10: (.3, 3) -> .048  10.3: (.3, 2.7) -> .085  13: (2.7, 3) -> .004
    # delta (distance to the nearest denser point; the densest: the largest distance, 13):
    #   .4, 13, .6, .3, 9.3, 2.7 -> delta * density: .272, 10.93, .381, .014, .795, .012
    # centres by score: .4 (index 1), 10.3 (4), 1 (2); the others join the nearest centre
    points = torch.tensor([0.0, 0.4, 1.0, 10.0, 10.3, 13.0])
    centres, assignment = dpc_knn(points[:, None].expand(6, 4), 3)
    assert centres.tolist() == [1, 4, 2]
    assert assignment.tolist() == [0, 0, 2, 1, 1, 1]


def test_dpc_knn_breaks_density_ties_by_index():
    # two nearest: every density is exp(-1/2); the lower index counts as denser, so 0 is the densest
    # (delta = 11) and 10 has delta 8 (to 2): centres 0 and 3
    centres, assignment = dpc_knn(torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]]), 2)
    assert centres.tolist() == [0, 3]
    assert assignment.tolist() == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------- stages and budgets
def test_default_stage_layers_scale_the_references():
    assert SparseVLM().selection_layers(32) == (3, 7, 16, 20)  # v1: after 2, 6, 15, 19
    assert SparseVLM(keep=0.25).selection_layers(32) == (3, 7, 16)  # v1.5: after 2, 6, 15
    assert SparseVLM(retain_tokens=64).selection_layers(28) == (3, 6, 14)
    assert SparseVLM().selection_layers(28) == (3, 6, 14, 18)
    assert SparseVLM().selection_layers(4) == (1, 2)
    assert SparseVLM(keep=0.0625)._stage_plan(4) == [(1, 1), (2, 2)]  # 3 and 7 fall on layer 1: the later target
    assert SparseVLM(layers=(5, 2, 9), keep=0.5)._stage_plan(32) == [(2, 0), (5, 1), (9, 2)]


def test_budget_targets_follow_the_nearest_v15_table():
    assert SparseVLM(keep=0.0625).budget_targets(576) == [303, 110, 36]  # exactly the 128-token table
    assert SparseVLM(keep=0.125).budget_targets(576) == [196, 131, 72]  # 192 table: 72 * 300 / 110, 72 * 200 / 110
    assert SparseVLM(keep=0.5).budget_targets(576) == [576, 524, 288]
    assert SparseVLM(tokens=64).budget_targets(576) == [175, 116, 64]
    assert SparseVLM(keep=1.0).budget_targets(144) == [144, 144, 144]
    assert SparseVLM(retain_tokens=128).table_counts(576) == [303, 110, 36]
    assert SparseVLM(retain_tokens=128).table_counts(144) == [76, 28, 9]  # 75.75, 27.5, 9 rounded half up


def test_budget_counts_leave_room_for_the_recycled_tokens():
    # target 303 of 576: k = 294 drops 282, recycles int(84.6) + 1 = 85 in 9 clusters: 294 + 9 = 303
    relation = torch.rand(2, 576)
    assert SparseVLM(keep=0.0625).stage_count(relation, 576, 0) == (294, True)
    assert SparseVLM(keep=0.0625, recycle=False).stage_count(relation, 576, 0) == (303, False)
    assert SparseVLM(keep=1.0).stage_count(relation, 576, 0) == (576, False)
    assert SparseVLM(retain_tokens=192).stage_count(relation, 576, 0) == (300, True)  # recycled on top, as v1.5
    assert SparseVLM(retain_tokens=192).stage_count(relation[:, :250], 576, 0) == (249, True)  # min(300, n - 1)


def test_a_stage_keeps_the_top_scores_and_recycles_the_best_dropped_one():
    # P = the raters' rows of the text attention; rank 2, scale 1 -> k = 2; s = mean over raters
    visual = tokens(6)
    embeds = torch.zeros(1, 11, 2)
    embeds[0, 2:8] = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(3, 1)
    embeds[0, 8:11] = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])  # raters: text tokens 0 and 2
    attention = torch.tensor([
        [0.30, 0.05, 0.20, 0.05, 0.10, 0.02],
        [0.90, 0.90, 0.90, 0.90, 0.90, 0.90],  # not a rater
        [0.10, 0.05, 0.40, 0.15, 0.02, 0.08],
    ])
    # s = (.20, .05, .30, .10, .06, .05): keep 2 and 0; deleted 1, 3, 4, 5 -> int(1.2) + 1 = 2 recycled
    # (3: .10 and 4: .06), one cluster: equal densities, the lower index (3) is its centre
    hidden = torch.randn(1, 11, 8)
    context = SelectionContext(hidden=hidden, visual=[visual], layer=1, num_layers=4, embeds=embeds,
                               text_attention=[attention], text_rows=[torch.arange(8, 11)])
    method = SparseVLM(layers=(1, 2), scale=1.0)
    sample = method.select(context).samples[0]
    assert sample.keep.tolist() == [0, 2, 3]
    assert sample.merge_target.tolist() == [0, -1, 1, 2, 2, -1]  # 3 and 4 into 3's place in keep
    assert sample.order is None  # the recycled 3 already follows the kept 0 and 2
    # stage 2: the raters stay those of stage 1 (text rows counted from the end: one more leading row
    # now, e.g. a structural token) although the embeddings changed
    context2 = SelectionContext(hidden=hidden[:, :8], visual=[tokens(3)], layer=2, num_layers=4, embeds=torch.zeros(1, 8, 2),
                                text_attention=[torch.tensor([[9.0, 9.0, 9.0], [0.1, 0.3, 0.2], [1.0, 1.0, 1.0],
                                                              [0.1, 0.4, 0.2]])],
                                text_rows=[torch.arange(4, 8)])
    second = method.select(context2).samples[0]
    # P rows (.1, .3, .2) and (.1, .4, .2): rank 2 -> k = 2 of 3: s = (.1, .35, .2) keeps 1 and 2; 0 is recycled alone
    assert second.keep.tolist() == [0, 1, 2]
    assert second.order.tolist() == [1, 2, 0]
    assert second.merge_target.tolist() == [0, 1, 2]


def test_recycled_tokens_enter_after_the_kept_tokens_of_their_centres_image():
    visual = tokens(6, image=[0, 0, 0, 1, 1, 1])
    relation = torch.tensor([[0.4, 0.5, 0.3, 0.9, 0.1, 0.2]])  # rank 1, scale 2: keep 3 and 1
    hidden = torch.arange(6.0)[:, None].expand(6, 3)
    sample = SparseVLM(scale=2.0).select_sample(relation, hidden, visual, 6, 0)
    # deleted 0, 2, 4, 5: int(1.2) + 1 = 2 recycled (0: .4, 2: .3) in one cluster, centre 0 (equal
    # densities: the lower index); it enters after image 0's kept token 1, before image 1's 3
    assert sample.keep.tolist() == [0, 1, 3]
    assert sample.merge_target.tolist() == [0, 1, 0, 2, -1, -1]
    assert sample.order.tolist() == [1, 0, 2]


def test_no_text_after_the_images_keeps_every_token():
    visual = tokens(4)
    context = SelectionContext(hidden=torch.zeros(1, 6, 2), visual=[visual], layer=1, num_layers=4, embeds=torch.zeros(1, 6, 2),
                               text_attention=[torch.zeros(0, 4)], text_rows=[torch.zeros(0, dtype=torch.long)])
    assert SparseVLM(layers=(1,)).select(context).samples[0].keep.tolist() == [0, 1, 2, 3]


def test_rejects_bad_settings():
    with pytest.raises(ConfigError, match="retain_tokens=100"):
        SparseVLM(retain_tokens=100)
    with pytest.raises(ConfigError, match="not both"):
        SparseVLM(retain_tokens=64, keep=0.1)
    with pytest.raises(ConfigError, match="scale/bias"):
        SparseVLM(keep=0.25, scale=9.0)
    with pytest.raises(ConfigError, match="three layers"):
        SparseVLM(keep=0.25, layers=(2, 4))
    with pytest.raises(ConfigError, match="layers"):
        SparseVLM(layers=(0, 3))
    with pytest.raises(ConfigError, match="scale"):
        SparseVLM(scale=0)


# ---------------------------------------------------------------- the tiny LLaVA, eager
def _reference_clusters(points: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """DPC-kNN written out token by token (ties: the lower index is denser, the earlier centre wins)."""
    count, channels = points.shape
    dist = [[float((points[i] - points[j]).norm()) / math.sqrt(channels) for j in range(count)] for i in range(count)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in dist]
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(count):
        denser = [dist[i][j] for j in range(count) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else largest)
    score = [delta[i] * density[i] for i in range(count)]
    centres = sorted(range(count), key=lambda i: (-score[i], i))[:clusters]
    assignment = [min(range(clusters), key=lambda c: (dist[centres[c]][i], c)) for i in range(count)]
    for c, centre in enumerate(centres):
        assignment[centre] = c
    return centres, assignment


def test_first_stage_matches_an_independent_computation_from_eager_maps():
    """Stage before layer 1 (rank count, scale 2): raters from the input embeddings, P from layer 0's
    eager attention, recycling from layer 0's output; the centre's row entering layer 1 is its cluster's
    mean and recycled tokens come after the kept ones."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], ["What is shown?", "Is there a cat in the image? Answer yes or no."])
    assert (batch["attention_mask"] == 0).any()  # left padding
    seen = {}
    hook = tiny.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = tiny(**batch, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    layer_one = tiny.model.language_model.layers[1]
    captured = {}
    handle = layer_one.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    try:
        with vlmkit.apply(tiny, SparseVLM(layers=(1,), scale=2.0)) as patch, torch.no_grad():
            tiny(**batch)
            recorded = patch.state.recorded[("select", 1)]
    finally:
        handle.remove()
    attention = out.attentions[0].mean(dim=1)  # layer 0, mean over heads
    states = out.hidden_states[1]  # layer 0's output
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        visual = torch.nonzero(batch["input_ids"][row] == tiny.config.image_token_id).flatten()
        text = torch.nonzero(valid & (torch.arange(valid.numel()) > visual.max())).flatten()
        v, t = seen["embeds"][row, visual].float(), seen["embeds"][row, text].float()
        relevance = torch.softmax(v @ t.T, dim=1).mean(dim=0)
        raters = text[relevance > relevance.mean()]
        relation = attention[row][raters][:, visual].float()
        rank = int(torch.linalg.matrix_rank(relation))
        n = visual.numel()
        count = min(int(rank * 2.0), n - 1)
        s = relation.mean(dim=0).tolist()
        by_score = sorted(range(n), key=lambda i: (-s[i], i))
        top, deleted = sorted(by_score[:count]), sorted(by_score[count:])
        chosen = sorted(deleted, key=lambda i: (-s[i], i))[: int(len(deleted) * 0.3) + 1]
        chosen.sort()
        centres, assignment = _reference_clusters(states[row, visual[chosen]].float(), int(len(chosen) / 10) + 1)
        centres = [chosen[c] for c in centres]
        sample = recorded.samples[row]
        keep = sorted(top + centres)
        assert sample.keep.tolist() == keep, row
        targets = [-1] * n
        for i in top:
            targets[i] = keep.index(i)
        for i, c in zip(chosen, assignment):
            targets[i] = keep.index(centres[c])
        assert sample.merge_target.tolist() == targets, row
        # the stream entering layer 1: kept visual tokens in order, then each cluster's mean (by score order)
        stream = captured["hidden"][row]
        entering = stream[-(len(text) + len(keep)): -len(text)]
        torch.testing.assert_close(entering[: len(top)], states[row, visual[top]], rtol=1e-5, atol=1e-5)
        for k, centre in enumerate(centres):
            members = [chosen[j] for j, c in enumerate(assignment) if c == k]
            torch.testing.assert_close(entering[len(top) + k], states[row, visual[members]].mean(dim=0), rtol=1e-5, atol=1e-5)
        assert len(centres) >= 2 and count < n - 1, (count, centres)  # the check covers several clusters
