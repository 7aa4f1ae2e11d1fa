"""VTC-CLS, PruMerge / PruMerge+, bilinear downsampling and GlobalCom² against their reference code:
hand-made inputs with known answers, and hand computations from eager attention maps of the tiny
models (written independently of vlmkit)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from vlmkit.engine.selection import SelectionContext, VisualTokens
from vlmkit.errors import UnsupportedModelError
from vlmkit.methods.prune.downsample import Downsample
from vlmkit.methods.prune.globalcom2 import GlobalCom2, tile_shares
from vlmkit.methods.prune.prumerge import PruMerge, PruMergePlus, outlier_ratio
from vlmkit.methods.prune.vtc_cls import VTCCLS


def tokens(coords: list[tuple[int, int, int]], grids) -> VisualTokens:
    """Visual tokens of one image from (crop, row, col) per token, in sequence order."""
    crop, row, col = (torch.tensor(c) for c in zip(*coords))
    n = len(coords)
    zeros = torch.zeros(n, dtype=torch.long)
    return VisualTokens(slots=torch.arange(n) + 3, origin=torch.arange(n), image=zeros, frame=zeros, row=row, col=col,
                        crop=crop, grids=grids, modality=["image"])


def grid_tokens(rows: int, cols: int) -> VisualTokens:
    return tokens([(0, r, c) for r in range(rows) for c in range(cols)], [(1, rows, cols)])


def context(visual, vision=None) -> SelectionContext:
    return SelectionContext(hidden=torch.zeros(1, 60, 4), visual=visual, layer=0, num_layers=4, vision=vision)


def entering(tiny, batch, spec, name):
    """(kept origins per sample, the hidden states entering decoder layer 0) under `spec`."""
    seen = {}
    hook = tiny.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    with vlmkit.apply(tiny, spec) as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections[name]
    hook.remove()
    return chosen, seen["hidden"]


def image_rows(batch, hidden, sample: int, count: int, placeholders: torch.Tensor) -> slice:
    """Rows of the new (left-padded) stream where sample's one image's `count` tokens enter."""
    mask = batch["attention_mask"][sample]
    kept_length = int(mask.sum()) - int(placeholders[sample].sum()) + count
    start = hidden.shape[1] - kept_length + int(placeholders[sample].long().argmax()) - int((mask == 0).sum())
    return slice(start, start + count)


# ---------------------------------------------------------------- VTC-CLS
class Tower:
    """A stand-in adapter: a 24-layer tower whose LLM reads layer 22 (CLIP ViT-L in LLaVA-1.5)."""

    vision_layers = tuple(range(24))

    def default_vision_layer(self):
        return 22


def test_vtc_cls_ensembles_layers_16_to_22_of_clip_vit_l_by_default():
    assert VTCCLS().extra_vision_layers(Tower()) == tuple(range(16, 22))  # + the primary 22: attentions[16:-1]
    assert VTCCLS().vision_layer(Tower()) == 22
    assert VTCCLS(start_layer=20).extra_vision_layers(Tower()) == (20, 21)
    assert VTCCLS().config.kept_count(576, 36 / 576) == 36  # --token_num 36


def test_vtc_cls_keeps_the_top_of_the_summed_cls_attention_in_patch_order():
    visual = grid_tokens(2, 3)
    probe = {
        "importance": torch.tensor([0.10, 0.30, 0.05, 0.20, 0.15, 0.20]),
        "importance@0": torch.tensor([0.30, 0.00, 0.05, 0.10, 0.20, 0.05]),
        "importance@1": torch.tensor([0.00, 0.05, 0.50, 0.00, 0.00, 0.05]),
    }
    # sums: 0.40, 0.35, 0.60, 0.30, 0.35, 0.30 -> top 3: 2, 0, then 1 and 4 tie at 0.35 -> 1
    selection = VTCCLS(tokens=3).select(context([visual], [[probe]])).samples[0]
    assert selection.keep.tolist() == [0, 1, 2] and selection.order is None and selection.combine is None
    assert VTCCLS(tokens=4).select(context([visual], [[probe]])).samples[0].keep.tolist() == [0, 1, 2, 4]


def test_vtc_cls_matches_eager_cls_attention_summed_over_layers():
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    with torch.no_grad():
        attentions = tower(batch["pixel_values"], output_attentions=True).attentions
    read = len(tower.encoder.layers) - 2  # vision_feature_layer -2: the output of this layer
    summed = sum(attentions[layer][:, :, 0, 1:].mean(dim=1) for layer in range(read + 1))  # start_layer=0
    with vlmkit.apply(tiny, "vtc_cls:start_layer=0,keep=0.125") as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["vtc_cls"]
    for image in range(2):
        count = int(0.125 * summed.shape[1] + 0.5)
        expected = torch.sort(torch.argsort(summed[image], descending=True, stable=True)[:count]).values
        assert chosen[image].tolist() == expected.tolist()


# ---------------------------------------------------------------- PruMerge / PruMerge+
# a 3x4 grid whose [CLS] attention has two outliers: sorted 0.01 .. 0.10, 0.40, 0.50; quartiles at
# positions 2.75 and 8.25: Q1 = 0.0375, Q3 = 0.0925, upper = 0.0925 + 1.5 * 0.055 = 0.175
SCORES = torch.tensor([0.03, 0.07, 0.01, 0.10, 0.05, 0.50, 0.02, 0.09, 0.40, 0.04, 0.08, 0.06])


def test_prumerge_outlier_ratio_is_the_interquartile_rule():
    assert outlier_ratio(SCORES) == 2 / 12
    assert outlier_ratio(torch.full((7,), 0.1)) == 1 / 7  # no outlier: at least one token


def test_prumerge_adaptive_keeps_the_outliers_by_attention_then_the_pooled_token():
    """a = softmax(sqrt(C / d) l) over the row: full keys of width C = 8 and head-mean keys of width
    d = 2 (four heads) scale the logits by 2, so l = log(SCORES) / 2 gives a = SCORES / 1.45 (their
    sum); the features' width (here 6) plays no part."""
    generator = torch.Generator().manual_seed(0)
    probe = {
        "importance": SCORES.flip(0),  # the head-mean softmax attention: not what the reference reads
        "cls_logits": SCORES.log() / 2,
        "keys": torch.randn(12, 2, generator=generator),
        "full_keys": torch.randn(12, 8, generator=generator),
        "features": torch.randn(12, 6, generator=generator),
    }
    sample = PruMerge().select_sample(grid_tokens(3, 4), [probe])
    # outliers 5 (0.50) and 8 (0.40) (the interquartile rule ignores the scale), then the extra token
    # at the best pruned patch, 3 (0.10)
    assert sample.keep.tolist() == [3, 5, 8]
    assert sample.keep[sample.order].tolist() == [5, 8, 3]
    assert sample.combine_space == "vision"
    pruned = [0, 1, 2, 3, 4, 6, 7, 9, 10, 11]
    expected = torch.zeros(12)
    expected[pruned] = SCORES[pruned] / 1.45
    torch.testing.assert_close(sample.combine[0], expected)  # sum of a_j x_j over the pruned patches


def test_prumerge_without_cls_logits_or_full_keys_scores_by_the_probes_attention():
    """SigLIP/Qwen2-VL (no [CLS] logits; Qwen2-VL no full keys either: C unknown): a = "importance"."""
    keys = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    for probe in ({"importance": SCORES, "keys": keys}, {"importance": SCORES, "cls_logits": -SCORES, "keys": keys}):
        sample = PruMerge().select_sample(grid_tokens(3, 4), [probe])
        assert sample.keep[sample.order].tolist() == [5, 8, 3]
        assert sample.combine_space == "llm"  # no vision features in the probe
        pruned = [0, 1, 2, 3, 4, 6, 7, 9, 10, 11]
        expected = torch.zeros(12)
        expected[pruned] = SCORES[pruned]
        assert torch.equal(sample.combine[0], expected)


def test_prumerge_merges_each_kept_patch_with_its_nearest_full_keys_weighted_by_attention():
    """y_i = x_i + sum_{j in kNN(i)} a_j x_j (unnormalised, neighbours kept or not), by hand on 2x4;
    the neighbours by the cosine of the full keys (two heads side by side), not of their head mean."""
    # a = softmax(sqrt(C / d) l) with C = 4 (full keys), d = 2 (head mean): l = log(s) / sqrt(2)
    # gives a = s / 0.8 (sum of s)
    scores = torch.tensor([0.30, 0.05, 0.10, 0.02, 0.20, 0.08, 0.01, 0.04])
    head = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.5], [0.1, 1.0], [-1.0, 0.0], [0.5, 1.0], [1.0, -0.3]])
    # heads (x, y) and (-x, y): the full key's cosines are those of (x, y); the head mean (0, y) is
    # zero for 0 and 5 and would give 0 the neighbours 1, 2 (all cosines 0) and 4 the neighbours 1, 2
    # (cosine 1 with 1, 2, 3, 6)
    full_keys = torch.cat([head, head * torch.tensor([-1.0, 1.0])], dim=1)
    keys = full_keys.view(8, 2, 2).mean(dim=1)
    features = torch.arange(32.0).view(8, 4)
    probe = {"importance": scores.flip(0), "cls_logits": scores.log() / math.sqrt(2), "keys": keys,
             "full_keys": full_keys, "features": features}
    sample = PruMerge(tokens=3, neighbours=2).select_sample(grid_tokens(2, 4), [probe])
    # top 2 by attention: 0, 4; the extra token sits at the best pruned patch, 2
    assert sample.keep.tolist() == [0, 2, 4] and sample.keep[sample.order].tolist() == [0, 4, 2]
    assert sample.combine_space == "vision"
    merged = sample.combine @ features
    # token 0 (1, 0): cosines 1: 0.995, 7: 0.958, 3: 0.894 -> neighbours 1 (a = 0.0625) and 7 (0.05)
    torch.testing.assert_close(merged[0], features[0] + 0.0625 * features[1] + 0.05 * features[7])
    # token 4 (0.1, 1): 2: 0.995, 6: 0.934, 3: 0.534 -> neighbours 2 (pruned but nearest; 0.125) and 6 (0.0125)
    torch.testing.assert_close(merged[2], features[4] + 0.125 * features[2] + 0.0125 * features[6])
    pruned = [1, 2, 3, 5, 6, 7]
    torch.testing.assert_close(merged[1], (scores[pruned, None] / 0.8 * features[pruned]).sum(dim=0))


def test_prumerge_keeps_a_row_whole_when_the_budget_keeps_every_patch():
    probe = {"importance": SCORES, "keys": torch.randn(12, 4), "features": torch.randn(12, 3)}
    sample = PruMerge(keep=1.0).select_sample(grid_tokens(3, 4), [probe])
    assert sample.keep.tolist() == list(range(12)) and sample.order is None and sample.combine is None


def test_prumerge_plus_adds_every_sth_patch_after_the_outliers():
    # r = 2/12: s = int(int(1 / r) / 3) = 2 -> 0, 2, 4, 6, 8, 10 (< n - 1 = 11); 8 is an outlier already
    probe = {"importance": SCORES, "keys": torch.randn(12, 4, generator=torch.Generator().manual_seed(0))}
    sample = PruMergePlus().select_sample(grid_tokens(3, 4), [probe])
    # pruned: 1, 3, 7, 9, 11 -> the extra token at 3 (0.10)
    assert sample.keep[sample.order].tolist() == [5, 8, 0, 2, 4, 6, 10, 3]


def test_prumerge_plus_budget_is_a_quarter_by_attention_the_rest_strided_then_the_pooled_token():
    probe = {"importance": SCORES, "keys": torch.randn(12, 4, generator=torch.Generator().manual_seed(0))}
    sample = PruMergePlus(tokens=6).select_sample(grid_tokens(3, 4), [probe])
    # 6 tokens: ceil(5 / 4) = 2 by attention (5, 8); 3 of the other 10 every 10 // 3 = 3rd: 0, 3, 7;
    # pruned 1, 2, 4, 6, 9, 10, 11 -> the extra token at 10 (0.08)
    assert sample.keep[sample.order].tolist() == [5, 8, 0, 3, 7, 10]


def test_prumerge_orders_each_anyres_tile_within_its_own_rows():
    # a base view of 2x2 then two 2x2 tiles side by side, whose rows interleave in the sequence
    coords = [(0, r, c) for r in range(2) for c in range(2)] + [(1 + c // 2, r, c) for r in range(2) for c in range(4)]
    visual = tokens(coords, [(1, 2, 2)])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.1, 0.5, 0.2, 0.1, 0.3, 0.2, 0.1, 0.4])
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(12, 4, generator=generator)
    probe = {"importance": scores, "cls_logits": scores.log(),  # C = d: one head, a = softmax(l) per crop
             "keys": keys, "full_keys": keys, "features": torch.randn(12, 4, generator=generator)}
    sample = PruMerge(tokens=2, neighbours=0).select_sample(visual, [probe])
    # base: 3 (0.4), extra at 2; tile 1 (4, 5, 8, 9): 5, extra at 8; tile 2 (6, 7, 10, 11): 11, extra at 6
    assert sample.keep.tolist() == [2, 3, 5, 6, 8, 11]
    # each row enters kept-then-extra into its own places: base 2, 3 <- 3, 2; tile 1's 5, 8 <- 5, 8;
    # tile 2's 6, 11 <- 11, 6
    assert sample.keep[sample.order].tolist() == [3, 2, 5, 11, 8, 6]
    # the softmax runs per crop: the extra tokens weigh base 0, 1, 2 by s / 1.0, tile 1's 4, 8, 9 by
    # s / 1.1, tile 2's 6, 7, 10 by s / 0.8
    extra = {2: ([0, 1, 2], 1.0), 8: ([4, 8, 9], 1.1), 6: ([6, 7, 10], 0.8)}
    for place, (pruned, total) in extra.items():
        expected = torch.zeros(12)
        expected[pruned] = scores[pruned] / total
        torch.testing.assert_close(sample.combine[sample.keep.tolist().index(place)], expected)


def test_prumerge_matches_the_references_one_head_attention_and_key_neighbours():
    """The reference's attention, softmax(q k^T / sqrt(C)) over the full-width q and k projections of
    the last layer, renormalised over the patches (the probe has no [CLS] self-logit), and its
    neighbours by the cosine of the full-width keys of the patches."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 1  # the reference hooks the last layer (layers[23] of ViT-L)
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_hidden_states=True)
        block = tower.encoder.layers[layer]
        heads = block.self_attn.num_heads
        normed = block.layer_norm1(out.hidden_states[layer])
        query = block.self_attn.q_proj(normed[:, :1])  # (2, 1, C): the heads side by side
        key = block.self_attn.k_proj(normed)  # (2, 1 + n, C)
        head_mean = key.view(*normed.shape[:2], heads, -1).mean(dim=2)
    features = out.hidden_states[-2][:, 1:]  # what the projector reads (vision_feature_layer -2)
    width = features.shape[-1]
    reference = torch.softmax((query @ key.transpose(1, 2))[:, 0] / width**0.5, dim=-1)  # (2, 1 + n)
    neighbours = 5
    chosen, hidden = entering(tiny, batch, f"prumerge:neighbours={neighbours}", "prumerge")
    placeholders = batch["input_ids"] == tiny.config.image_token_id
    differs = False  # whether head-mean keys would pick other neighbours (else the test cannot tell)
    for image in range(2):
        a = reference[image, 1:] / (1 - reference[image, 0])
        n = a.numel()
        q1, q3 = torch.quantile(a.double(), 0.25), torch.quantile(a.double(), 0.75)
        outliers = max(1, int((a.double() > q3 + 1.5 * (q3 - q1)).sum()))
        top = torch.argsort(a, descending=True, stable=True)[: max(1, int(n * (outliers / n)))]
        pruned = torch.tensor([j for j in range(n) if j not in top.tolist()])
        extra_at = pruned[torch.argmax(a[pruned])]
        assert chosen[image].tolist() == sorted(top.tolist() + [int(extra_at)])
        rows = []
        for i in top.tolist():
            near, near_by_mean = (nearest(k[image, 1:], i, neighbours) for k in (key, head_mean))
            differs |= set(near.tolist()) != set(near_by_mean.tolist())
            rows.append(features[image, i] + (a[near, None] * features[image, near]).sum(dim=0))
        rows.append((a[pruned, None] * features[image, pruned]).sum(dim=0))
        with torch.no_grad():
            expected = tiny.model.multi_modal_projector(torch.stack(rows)[None])[0]
        got = hidden[image, image_rows(batch, hidden, image, expected.shape[0], placeholders)]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert differs


def nearest(keys: torch.Tensor, i: int, count: int) -> torch.Tensor:
    """The `count` patches (other than i) of highest key cosine with patch i, ties to the lower index."""
    k = F.normalize(keys, dim=-1)
    similarity = k[i] @ k.T
    similarity[i] = -float("inf")
    return torch.argsort(similarity, descending=True, stable=True)[:count]


# ---------------------------------------------------------------- bilinear downsampling
def test_downsample_4x4_to_2x2_keeps_the_nearest_token_and_averages_each_block():
    sample = Downsample(keep=0.25).select(context([grid_tokens(4, 4)])).samples[0]
    # sampling points (p + 0.5) * 2 - 0.5 = 0.5, 2.5: halfway, so the nearest is the lower row/column
    assert sample.keep.tolist() == [0, 2, 8, 10]
    expected = torch.zeros(4, 16)
    for cell, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        for dr in range(2):
            for dc in range(2):
                expected[cell, (r + dr) * 4 + c + dc] = 0.25
    assert torch.equal(sample.combine, expected)


@pytest.mark.parametrize("rows,cols,keep,sides", [(5, 7, 0.35, (3, 4)), (6, 6, 0.5, (4, 4)), (3, 8, 0.2, (1, 4))])
def test_downsample_equals_torch_bilinear_interpolation(rows, cols, keep, sides):
    method = Downsample(keep=keep)
    assert method.sides(rows, cols) == sides
    sample = method.select(context([grid_tokens(rows, cols)])).samples[0]
    x = torch.randn(rows * cols, 3, generator=torch.Generator().manual_seed(rows))
    grid = x.T.reshape(1, 3, rows, cols)
    expected = F.interpolate(grid, size=sides, mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(sample.combine @ x, expected.reshape(3, -1).T, rtol=1e-6, atol=1e-6)
    # every output cell takes the place of the grid token nearest its sampling point
    def nearest(size, out):
        return [math.ceil(max(0.0, (p + 0.5) * size / out - 0.5) - 0.5) for p in range(out)]

    places = sorted(r * cols + c for r in nearest(rows, sides[0]) for c in nearest(cols, sides[1]))
    assert sample.keep.tolist() == places


def test_downsample_resizes_each_anyres_crop_and_keeps_everything_at_keep_1():
    # base 2x2, then two unpadded 2x3 tiles side by side (rows interleave in the sequence)
    coords = [(0, r, c) for r in range(2) for c in range(2)] + [(1 + c // 3, r, c) for r in range(2) for c in range(6)]
    visual = tokens(coords, [(1, 2, 2)])
    sample = Downsample(keep=0.25).select(context([visual])).samples[0]
    # base 2x2 -> 1x1 at token 0; each 2x3 tile -> 1x2 (round(1.5) = 2 columns) at its row-0 tokens 1, 2
    # (sampling rows 0.5 -> row 0; columns 0.25, 1.75 -> 0, 2 of each tile)
    assert sample.keep.tolist() == [0, 4, 6, 7, 9]
    assert torch.equal(sample.combine[0, :4], torch.full((4,), 0.25))
    assert Downsample(keep=1.0).select(context([visual])).samples[0].combine is None


# ---------------------------------------------------------------- GlobalCom²
def reference_shares(base: torch.Tensor, tiles_wide: int, tiles_high: int, ratio: float) -> list[float]:
    """The reference's `generate_scale_for_crop_features`, loop for loop."""
    import numpy as np

    side = int(base.numel() ** 0.5)
    width, height = max(side // tiles_wide, 1), max(side // tiles_high, 1)
    sums = np.zeros(tiles_wide * tiles_high)
    for index, score in enumerate(base.tolist()):
        i, j = divmod(index, side)
        sums[min(i // height, tiles_high - 1) * tiles_wide + min(j // width, tiles_wide - 1)] += score
    exp = np.exp((sums - sums.max()) / 10.0)
    sigma = exp / (exp.sum() + 1e-8)
    return np.clip(ratio * (1 + sigma - sigma.mean()), None, 1.0).tolist()


def test_globalcom2_tile_budgets_follow_the_thumbnail_regions():
    base = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) * 30
    for wide, high in ((2, 1), (2, 2), (3, 2)):
        shares = tile_shares(base, high, wide, 0.25)
        torch.testing.assert_close(torch.tensor(shares), torch.tensor(reference_shares(base.flatten(), wide, high, 0.25)))


def test_globalcom2_thumbnail_by_cls_logits_then_tiles_by_own_plus_global_logits():
    """A 4x4 thumbnail and two tiles side by side whose columns 0 and 7 were unpadded (4x3 each),
    against a loop-for-loop transcription of the reference's selection on the [CLS] logits."""
    coords = [(0, r, c) for r in range(4) for c in range(4)] + [(1 + c // 4, r, c) for r in range(4) for c in range(1, 7)]
    visual = tokens(coords, [(1, 4, 4)])
    generator = torch.Generator().manual_seed(3)
    base = torch.rand(16, generator=generator) * 10 - 3  # logits: signed; the region sums make the budgets differ
    own = torch.randn(24, generator=generator)
    probe = {"importance": torch.rand(40, generator=generator), "cls_logits": torch.cat([base, own])}
    sample = GlobalCom2(keep=0.25).select_sample(visual, [probe])

    thumb = torch.argsort(base, descending=True)[: int(16 * 0.25)]
    shares = reference_shares(base, 2, 1, 0.25)
    resized = F.interpolate(base.view(1, 1, 4, 4), size=(4, 6), mode="bilinear", align_corners=False)[0, 0]
    picked = []
    for tile in range(2):
        members = [16 + r * 6 + c for r in range(4) for c in range(6) if c // 3 == tile]  # in sequence order
        l = own[[m - 16 for m in members]]
        g = resized[:, 3 * tile : 3 * tile + 3].flatten()
        combined = l / l.norm() + g / g.norm()
        top = torch.topk(combined, int(len(members) * shares[tile])).indices
        picked += [members[i] for i in top.tolist()]
    assert shares[0] != shares[1]
    assert sample.keep.tolist() == sorted(thumb.tolist() + picked)
    entered = sample.keep[sample.order] if sample.order is not None else sample.keep
    assert entered.tolist() == thumb.tolist() + sorted(picked)  # thumbnail by attention, tiles in grid order


def test_globalcom2_keeps_everything_at_keep_1_and_compresses_tileless_views_as_the_thumbnail():
    coords = [(0, r, c) for r in range(2) for c in range(2)] + [(1 + c // 2, r, c) for r in range(2) for c in range(4)]
    visual = tokens(coords, [(1, 2, 2)])
    sample = GlobalCom2(keep=1.0).select_sample(visual, [{"importance": torch.rand(12)}])
    assert sample.keep.tolist() == list(range(12)) and sample.order is None
    scores = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.0, 0.5, 0.6, 0.2, 0.1])
    probe = {"importance": scores.flip(0), "cls_logits": scores.log()}
    sample = GlobalCom2(keep=0.3).select_sample(grid_tokens(3, 3), [probe])
    assert sample.keep[sample.order].tolist() == [6, 5]  # int(9 * 0.3) = 2, by [CLS] logit
    sample = GlobalCom2(keep=0.3).select_sample(grid_tokens(3, 3), [{"importance": scores}])
    assert sample.keep[sample.order].tolist() == [6, 5]  # a tower without [CLS] (SigLIP): by attention


def test_globalcom2_refuses_models_without_anyres_tiles_by_name():
    tiny, _ = model("llava")
    with pytest.raises(UnsupportedModelError, match=r"globalcom2 does not support llava: .*It runs on: llava_next, llava_onevision"):
        vlmkit.apply(tiny, "globalcom2")


def test_globalcom2_matches_eager_cls_logits_on_llava_next():
    """The [CLS] row's logits mean_h q_h.k_h / sqrt(d) at the last layer, from the tower's q and k
    projections of each tower row (thumbnail, then 2x2 tiles): the thumbnail's top, the tile budgets
    from its region sums and each tile's top by own plus resized global logit."""
    tiny, processor = model("llava_next", "eager")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    tower = tiny.model.vision_tower
    pixels = batch["pixel_values"][0]  # the image's tower rows: thumbnail, then tiles
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]  # the last layer's input
        block = tower.encoder.layers[-1]
        normed = block.layer_norm1(hidden)
        heads = block.self_attn.num_heads
        query = block.self_attn.q_proj(normed[:, :1]).view(len(pixels), 1, heads, -1).transpose(1, 2)
        key = block.self_attn.k_proj(normed).view(len(pixels), normed.shape[1], heads, -1).transpose(1, 2)
        logits = ((query @ key.transpose(-1, -2))[:, :, 0].mean(dim=1) * block.self_attn.scale)[:, 1:]
    method, seen = GlobalCom2(), {}
    select_sample = method.select_sample

    def recording(visual, probes):
        seen["visual"] = visual
        return select_sample(visual, probes)

    method.select_sample = recording
    with vlmkit.apply(tiny, method) as patch, torch.no_grad():
        tiny(**batch)
        chosen = patch.selections["globalcom2"][0]
        order = patch.state.recorded[("select", 0)].samples[0].order
    base, side = logits[0], 8
    count = int(base.numel() * 0.25)
    thumb = torch.argsort(base, descending=True, stable=True)[:count]
    assert chosen[chosen < base.numel()].tolist() == sorted(thumb.tolist())  # the thumbnail's tokens come first
    assert chosen[order.cpu()][:count].tolist() == thumb.tolist()

    visual = seen["visual"]  # the tiles' tokens after unpadding: their crops and padded-grid rows/columns
    tiles = torch.nonzero(visual.crop > 0).flatten()
    row0, col0 = int(visual.row[tiles].min()), int(visual.col[tiles].min())
    rows, cols = int(visual.row[tiles].max()) + 1 - row0, int(visual.col[tiles].max()) + 1 - col0
    shares = reference_shares(base, 2, 2, 0.25)
    resized = F.interpolate(base.view(1, 1, side, side), size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
    picked = []
    for tile in range(4):
        members = tiles[visual.crop[tiles] == tile + 1]
        tile_row, tile_col = divmod(tile, 2)
        row, col = visual.row[members], visual.col[members]
        own = logits[tile + 1][(row - tile_row * side) * side + col - tile_col * side]
        global_logits = resized[row - row0, col - col0]
        combined = own / own.norm() + global_logits / global_logits.norm()
        picked += members[torch.topk(combined, int(members.numel() * shares[tile])).indices].tolist()
    assert len(set(shares)) > 1
    assert chosen[order.cpu()].tolist() == thumb.tolist() + sorted(picked)  # the tiles in sequence order
