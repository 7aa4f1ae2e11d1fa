"""ToDRE against its paper (arXiv:2505.18757 v2, Algorithm 1 and Sec. 4.2): hand-made inputs with
known answers, and independent computations from the tiny models' eager attention maps."""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import ConfigError
from vlmkit.methods.prune.todre import ToDRE, greedy_max_sum


def tokens(n: int, crop=None, image=None, frame=None) -> VisualTokens:
    index = torch.arange(n)
    zeros = torch.zeros(n, dtype=torch.long)
    pick = lambda values: zeros.clone() if values is None else torch.tensor(values)
    return VisualTokens(
        slots=index + 3, origin=index, image=pick(image), frame=pick(frame), row=index // 3, col=index % 3,
        crop=pick(crop), grids=[(1, 2, 3)], modality=["image"],
    )


def on_circle(degrees, norms=None) -> torch.Tensor:
    """2-D features at the given angles: cosine similarity is the cosine of the angle between them."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    points = torch.stack([radians.cos(), radians.sin()], dim=1)
    return points * (torch.tensor(norms, dtype=torch.float64)[:, None] if norms else 1.0)


# ---------------------------------------------------------------- ToDRE, hand-made inputs
def test_todre_greedy_max_sum_by_hand():
    # tokens at 0, 20, 100, 150, 230, 300 degrees (lengths differ: only the angle counts); pivot 2.
    # sums of cos after {2}:          0: -.174  1: .174  3: .643  4: -.643  5: -.940 -> 5
    # + cos to 300 deg:               0: .326   1: .347  3: -.223 4: -.301           -> 4
    # + cos to 230 deg:               0: -.316  1: -.519 3: -.050                    -> 1
    # + cos to 20 deg:                0: .623             3: -.692                    -> 3, then 0
    features = on_circle([0, 20, 100, 150, 230, 300], norms=[1, 2, 1, 0.5, 3, 1])
    assert greedy_max_sum(features, 6, pivot=2).tolist() == [2, 5, 4, 1, 3, 0]
    importance = torch.tensor([0.1, 0.2, 0.4, 0.1, 0.1, 0.1])  # [CLS] attention: the pivot is token 2
    hidden = torch.zeros(1, 12, 2)
    hidden[0, 3:9] = features.float()
    context = SelectionContext(hidden=hidden, visual=[tokens(6)], layer=0, num_layers=4, vision=[[{"importance": importance}]])
    for budget, kept in (({"keep": 0.5}, [2, 4, 5]), ({"tokens": 4}, [1, 2, 4, 5]), ({"keep": 0.1}, [2])):
        assert ToDRE(**budget).select(context).samples[0].keep.tolist() == kept, budget


def test_todre_ties_go_to_the_lowest_index():
    # from the pivot (1, 0), tokens 1 and 2 are equally dissimilar (+-90 degrees): 1 is picked first
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.1]])
    assert greedy_max_sum(features, 2, pivot=0).tolist() == [0, 1]


def test_todre_pivot_comes_from_the_base_view_and_from_every_frame():
    # AnyRes: a crop token (3) has the highest [CLS] attention, but the pivot is the base view's best (1)
    visual = tokens(6, crop=[0, 0, 0, 1, 1, 1])
    probes = [{"importance": torch.tensor([0.1, 0.3, 0.2, 0.9, 0.1, 0.1])}]
    assert ToDRE(keep=0.5).pivot(visual, probes) == 1
    # video: the highest over all frames (frame 1's token 4), not frame 0's best
    visual = tokens(6, frame=[0, 0, 0, 1, 1, 1])
    probes = [{"importance": torch.tensor([0.2, 0.5, 0.3, 0.1, 0.8, 0.1])}]
    assert ToDRE(keep=0.5).pivot(visual, probes) == 4
    # two images: each image's probe maps onto its own tokens; the best over both
    visual = tokens(6, image=[0, 0, 0, 1, 1, 1])
    probes = [{"importance": torch.tensor([0.2, 0.5, 0.3])}, {"importance": torch.tensor([0.6, 0.3, 0.1])}]
    assert ToDRE(keep=0.5).pivot(visual, probes) == 3


def test_todre_relevance_stage_keeps_all_or_nothing_by_the_text_queries_mean_visual_share():
    method = ToDRE(keep=1.0, threshold=0.1)
    assert method.selection_layers(32) == (28,) and method.selection_layers(4) == (3,)  # 7L/8
    assert ToDRE(keep=1.0, threshold=0.1, relevance_layer=5).selection_layers(32) == (5,)
    assert ToDRE(keep=0.25).selection_layers(32) == (0, 28)  # both stages, the paper's default
    assert ToDRE(keep=0.25, threshold=None).selection_layers(32) == (0,)
    assert ToDRE(keep=0.25).needs == {"vision_attention", "text_attention"}
    assert ToDRE(keep=1.0).needs == {"text_attention"} and ToDRE(keep=0.25, threshold=None).needs == {"vision_attention"}
    visual = [tokens(6), tokens(6), tokens(6)]
    # sample 0: two text queries with visual shares 0.03 and 0.15, mean 0.09 < 0.1 (the last query
    # alone would keep the tokens); sample 1: 0.18 and 0.06, mean 0.12 (the last alone would withdraw
    # them); sample 2: no text query after the image, nothing to measure: kept
    rows = [
        torch.stack([torch.full((6,), 0.005), torch.full((6,), 0.025)]),
        torch.stack([torch.full((6,), 0.03), torch.full((6,), 0.01)]),
        torch.zeros(0, 6),
    ]
    context = SelectionContext(hidden=torch.zeros(3, 12, 2), visual=visual, layer=28, num_layers=32, text_attention=rows)
    kept = [s.keep.tolist() for s in method.select(context).samples]
    assert kept == [[], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


def test_todre_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"threshold=1.5 must be a number in \[0, 1\]"):
        ToDRE(keep=1.0, threshold=1.5)
    with pytest.raises(ConfigError, match="relevance_layer=0 must be an integer >= 1"):
        ToDRE(keep=1.0, threshold=0.1, relevance_layer=0)


# ---------------------------------------------------------------- ToDRE, against the tiny models
def naive_max_sum(features: torch.Tensor, count: int, pivot: int) -> list[int]:
    """Algorithm 1 written out: each step recomputes every candidate's summed cosine from scratch."""
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    chosen = [pivot]
    while len(chosen) < count:
        sums = {v: sum(float(unit[v] @ unit[c]) for c in chosen) for v in range(len(unit)) if v not in chosen}
        chosen.append(min(sums, key=lambda v: (sums[v], v)))
    return chosen


def test_todre_matches_eager_cls_attention_and_cosine_max_sum_on_llava():
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        tower = tiny.model.vision_tower(batch["pixel_values"], output_attentions=True)
    cls_row = tower.attentions[-1][:, :, 0, 1:].mean(dim=1)  # the tower's last layer, [CLS] -> patches
    entered = {}
    hook = tiny.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: entered.update(hidden=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    with torch.no_grad():
        tiny(**batch)  # unpatched: the projector's output as the LLM receives it
    hook.remove()
    placeholders = batch["input_ids"] == tiny.config.image_token_id
    keep = 0.25
    with vlmkit.apply(tiny, f"todre:keep={keep}") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["todre"]
    for image in range(2):
        features = entered["hidden"][image][placeholders[image]]
        count = int(keep * features.shape[0] + 0.5)
        pivot = int(torch.argmax(cls_row[image]))
        assert chosen[image].tolist() == sorted(naive_max_sum(features, count, pivot))


def test_todre_relevance_stage_matches_eager_attention_of_the_text_queries():
    """alpha_{t->v} from the eager model's attention maps at layer K-1: for every text token after the
    image, its attention to the visual tokens summed (mean over heads), then the mean over those
    queries."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:4], QUESTIONS[:4])
    layer = 3
    with torch.no_grad():
        attentions = tiny(**batch, output_attentions=True).attentions[layer - 1].mean(dim=1)  # (B, L, L)
    placeholders = batch["input_ids"] == tiny.config.image_token_id
    shares = []
    for i in range(4):
        visual = torch.nonzero(placeholders[i]).flatten()
        text = torch.arange(int(visual.max()) + 1, placeholders.shape[1])  # left padding: all valid
        assert text.numel() > 1
        shares.append(attentions[i][text][:, visual].sum(dim=1).mean())
    share = torch.stack(shares)
    tau = float(share.min() + share.max()) / 2  # some samples above, some below
    with vlmkit.apply(tiny, f"todre:keep=1.0,threshold={tau},relevance_layer={layer}") as patch, torch.no_grad():
        tiny(**batch)
        kept = [s.numel() for s in patch.selections["todre"]]
    assert kept == [0 if float(s) < tau else int(placeholders[i].sum()) for i, s in enumerate(share)]
    assert 0 in kept and max(kept) > 0


def test_todre_relevance_stage_withdraws_as_vtw_or_leaves_the_model_as_it_is():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        plain = tiny(**batch).logits
        with vlmkit.apply(tiny, "vtw:layer=2"):
            withdrawn = tiny(**batch).logits
        with vlmkit.apply(tiny, "todre:keep=1.0,threshold=1.0,relevance_layer=2"):  # every share is below 1
            assert torch.equal(tiny(**batch).logits, withdrawn)
        with vlmkit.apply(tiny, "todre:keep=1.0,threshold=0.0,relevance_layer=2"):  # no share is below 0
            assert torch.equal(tiny(**batch).logits, plain)


def test_todre_both_stages_diversity_first_then_the_relevance_withdrawal():
    """The default runs both stages: the diverse subset before the LLM, then withdrawal at layer K, which
    equals stage 1 followed by VTW at K (tau = 1: every share is below it) or stage 1 alone (tau = 0)."""
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        with vlmkit.apply(tiny, "todre:keep=0.25,threshold=None"):
            diverse = tiny(**batch).logits
        with vlmkit.apply(tiny, "todre:keep=0.25,threshold=None", "vtw:layer=2"):
            withdrawn = tiny(**batch).logits
        with vlmkit.apply(tiny, "todre:keep=0.25,threshold=1.0,relevance_layer=2") as patch:
            assert torch.equal(tiny(**batch).logits, withdrawn)
            stages = patch.stage_selections["todre"]
            assert {layer: [len(kept) for kept in samples] for layer, samples in stages.items()} == {0: [36, 36], 2: [0, 0]}
            assert [len(kept) for kept in patch.selections["todre"]] == [0, 0]  # after the last stage
        with vlmkit.apply(tiny, "todre:keep=0.25,threshold=0.0,relevance_layer=2"):
            assert torch.equal(tiny(**batch).logits, diverse)
