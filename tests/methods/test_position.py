"""V2PE, CCA and HoPE on real forward passes: positions, masks and rotary tables against hand
computations (V2PE: two images with text between them, through decoding; CCA: ring tables, AnyRes
crops, the mask the layers receive against a dense one built by loops; HoPE: the hybrid table, an
image and a video), decoding after them, composition with pruning, and the errors. The
registry-driven invariants (neutral delta = 1, remove, cached = recompute, batch = singles, SDPA =
eager) run in tests/engine/test_invariants.py."""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from tests.engine.test_positions import rotary_positions
from tests.engine.test_sites import HalfVisualPositions, local
from vlmkit.engine.contexts import PositionContext
from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import ConfigError, ConflictError, UnknownMethodError, UnsupportedModelError
from vlmkit.methods.position.cca import CCA, rings
from vlmkit.methods.position.hope import TRAINING_SCALES, HoPE, hybrid_tables
from vlmkit.methods.position.v2pe import TRAINING_DELTAS, V2PE


def hand_positions(input_ids: list[int], image_id: int, delta: float) -> list[float]:
    """V2PE's positions written out token by token: text +1, image token j of a run p + j * delta,
    after the run ceil(p + n * delta)."""
    positions: list[float] = []
    current, run = -1.0, 0
    for token in input_ids:
        if token == image_id:
            run += 1
            positions.append(current + run * delta)
            continue
        if run:
            current, run = float(math.ceil(current + run * delta)), 0
        current += 1
        positions.append(current)
    return positions


def two_image_batch(processor):
    conversation = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "is left of"}, {"type": "image"}, {"type": "text", "text": "Which is bigger?"},
    ]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    short = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"
    images = photos()
    return processor(text=[text, short], images=[[images[0], images[1]], [images[2]]], padding=True, return_tensors="pt")


def visual_tokens(spans: list[tuple[int, int]]) -> VisualTokens:
    slots = torch.cat([torch.arange(start, start + count) for start, count in spans])
    n = slots.numel()
    image = torch.cat([torch.full((count,), i) for i, (_, count) in enumerate(spans)])
    zeros = torch.zeros(n, dtype=torch.long)
    return VisualTokens(slots, torch.arange(n), image, zeros, zeros, zeros, zeros, spans=spans)


def test_positions_of_two_images_with_text_between_them_by_hand():
    # 2 padding, 3 text, an image of 4, 2 text, an image of 3, 2 text; delta 0.3 (not dyadic: linspace's rounding)
    context = PositionContext(
        positions=torch.tensor([[1, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]),
        visual=[visual_tokens([(5, 4), (11, 3)])],
        valid=torch.tensor([[False, False] + [True] * 14]),
    )
    positions = V2PE(delta=0.3).positions(context)[0]
    image_1 = torch.linspace(2, 2 + 0.3 * 4, 5)[1:]       # 2.3, 2.6, 2.9, 3.2
    image_2 = torch.linspace(6, 6 + 0.3 * 3, 4)[1:]       # after ceil(3.2) = 4: text at 5 and 6, then 6.3, 6.6, 6.9
    expected = torch.cat([torch.tensor([1.0, 1.0, 0, 1, 2]), image_1, torch.tensor([5.0, 6]), image_2, torch.tensor([8.0, 9])])
    assert torch.equal(positions, expected)
    assert positions[5:9].tolist() == pytest.approx([2.3, 2.6, 2.9, 3.2])


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_generate_uses_v2pe_positions_for_two_images_then_decodes_after_them(family):
    tiny, processor = model(family)
    batch = two_image_batch(processor)
    with vlmkit.apply(tiny, "v2pe:delta=0.25"):
        seen = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=6, min_new_tokens=6))
    prompt, steps = seen[0], [p for p in seen if p.shape[-1] == 1]
    ids = batch["input_ids"]
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        expected = hand_positions(ids[row][valid].tolist(), tiny.config.image_token_id, 0.25)
        assert prompt[row][valid].tolist() == expected
        # LLaVA-NeXT's image newlines are image placeholders too: the two images take 1/4 of their length
        image_tokens = int((ids[row] == tiny.config.image_token_id).sum())
        assert expected[-1] == int(valid.sum()) - 1 - image_tokens + math.ceil(0.25 * image_tokens / (2 - row)) * (2 - row)
        assert [float(step[row]) for step in steps[:5]] == [expected[-1] + 1 + k for k in range(5)]


@pytest.mark.parametrize("spec", ["visionzip:tokens=20", "fastv:layer=2,keep=0.25"])
def test_pruned_tokens_keep_their_fractional_positions(spec):
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "v2pe:delta=0.25"):
        full = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3))
    with vlmkit.apply(tiny, spec, "v2pe:delta=0.25") as patch:
        pruned = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3))
        kept = patch.selections[spec.split(":")[0]]
        orders = [sample.order for sample in patch.state.recorded[("select", 0 if "visionzip" in spec else 2)].samples]
        assert patch.methods[0].position_policy(False, "v2pe") == "keep"
    prompt = full[0]
    compact = [p for p in pruned if p.shape[-1] > 1][-1]
    for row in range(2):
        visual = torch.nonzero(batch["input_ids"][row] == tiny.config.image_token_id).flatten()
        valid = batch["attention_mask"][row].bool()
        text = torch.nonzero(valid & (batch["input_ids"][row] != tiny.config.image_token_id)).flatten()
        slots = torch.sort(torch.cat([visual[kept[row]], text])).values
        if orders[row] is not None:  # the kept tokens enter in the selection's order (VisionZip)
            slots[torch.isin(slots, visual)] = visual[kept[row]][orders[row]]
        assert torch.equal(compact[row, compact.shape[1] - slots.numel():], prompt[row, slots])
    assert torch.equal(torch.stack([p for p in pruned if p.shape[-1] == 1]), torch.stack([p for p in full if p.shape[-1] == 1]))


def test_training_draws_delta_per_image_from_the_paper_set_reproducibly():
    first = V2PE(train=True, seed=3)
    draws = [first.image_delta() for _ in range(200)]
    assert set(draws) == set(TRAINING_DELTAS) and TRAINING_DELTAS == tuple(1 / 2**k for k in range(9))
    again = V2PE(train=True, seed=3)
    assert [again.image_delta() for _ in range(200)] == draws
    assert {V2PE(delta=0.5).image_delta() for _ in range(3)} == {0.5}


def test_v2pe_errors_name_the_valid_choices():
    for delta in (0, -0.25, 1.5, True):
        with pytest.raises(ConfigError, match=r"delta=.*in \(0, 1\]"):
            V2PE(delta=delta)
    tiny, _ = model("llava")
    with pytest.raises(ConfigError, match="reindex.*v2pe"):
        vlmkit.apply(tiny, "pool:keep=0.25,positions=reindex", "v2pe")
    with pytest.raises(ConflictError, match="'half' and 'v2pe' both claim the position site"):
        vlmkit.apply(tiny, local(HalfVisualPositions, "half", ("position",))(), "v2pe")
    assert vlmkit.api.patch_of(tiny) is None


# ---------------------------------------------------------------- CCA
def centre_out_rings(size: int) -> torch.Tensor:
    """The paper's ring table for an even square grid, built from the centre out: the central 2 x 2
    cells get size/2 - 1, each frame around them one less, the border 0."""
    table = torch.zeros(size, size, dtype=torch.long)
    top, left, bottom, right = size // 2 - 1, size // 2 - 1, size // 2, size // 2
    for ring in range(size // 2 - 1, -1, -1):
        table[top : bottom + 1, left] = table[top : bottom + 1, right] = ring
        table[top, left : right + 1] = table[bottom, left : right + 1] = ring
        top, left, bottom, right = top - 1, left - 1, bottom + 1, right + 1
    return table


def grid_rings(height: int, width: int) -> torch.Tensor:
    row, col = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return rings(row, col, height, width)


def test_ring_positions_by_hand_on_small_odd_oblong_and_llava_grids():
    assert grid_rings(1, 1).tolist() == [[0]]
    assert grid_rings(3, 3).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert grid_rings(4, 4).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert grid_rings(5, 7).tolist() == [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 1, 2, 2, 2, 1, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    assert torch.equal(grid_rings(24, 24), centre_out_rings(24))
    assert int(grid_rings(24, 24).max()) == 11  # LLaVA-1.5's 576 tokens take 12 positions


def test_anyres_crops_each_get_their_rings_one_after_another():
    # text 0..1, then one image: a 2 x 2 base view, a newline, two 2 x 2 tiles side by side in the big
    # grid (rows 0-1, cols 0-3) laid out row by row with a newline after each row, then text
    base = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    tiles = [(0, 0, 1), (0, 1, 1), (0, 2, 2), (0, 3, 2), (1, 0, 1), (1, 1, 1), (1, 2, 2), (1, 3, 2)]
    slots = [2, 3, 4, 5] + [7, 8, 9, 10, 12, 13, 14, 15]  # newlines at 6, 11 and 16
    coords = torch.tensor(base + tiles)
    n = len(slots)
    zeros = torch.zeros(n, dtype=torch.long)
    visual = VisualTokens(torch.tensor(slots), torch.arange(n), zeros, zeros, coords[:, 0], coords[:, 1], coords[:, 2],
                          grids=[(1, 2, 2)], spans=[(2, 15)], modality=["image"])
    context = PositionContext(torch.arange(19)[None], [visual], torch.ones(1, 19, dtype=torch.bool))
    positions = CCA().positions(context)[0].tolist()
    # each 2 x 2 crop is all ring 0 and takes one position: base 2, tile 1 at 3, tile 2 at 4;
    # newlines take the outer ring of the crop they close; the text resumes at 5
    assert positions == [0, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3, 4, 4, 4, 5, 6]


def dense_cca_mask(ids: list[int], image_id: int, side: int) -> torch.Tensor:
    """The concentric causal mask written out: causal, except that image tokens see exactly the
    image tokens of rings <= their own (one image, a side x side grid, row-major)."""
    ring_table = grid_rings(side, side).flatten().tolist()
    image = [i for i, token in enumerate(ids) if token == image_id]
    ring_of = {slot: ring_table[k] for k, slot in enumerate(image)}
    allowed = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    for q in range(len(ids)):
        for k in range(len(ids)):
            if q in ring_of and k in ring_of:
                allowed[q, k] = ring_of[k] <= ring_of[q]
            else:
                allowed[q, k] = k <= q
    return allowed


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cca_mask_reaching_the_layers_equals_the_dense_mask_built_by_hand(attn):
    tiny, processor = model("llava", attn)
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    seen = []
    layer = tiny.model.language_model.layers[1]
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    try:
        with vlmkit.apply(tiny, "cca"), torch.no_grad():
            tiny(**batch)
    finally:
        handle.remove()
    mask = seen[0][0, 0]
    allowed = mask if mask.dtype == torch.bool else mask == 0
    side = int(math.isqrt(int((batch["input_ids"][0] == tiny.config.image_token_id).sum())))
    assert torch.equal(allowed, dense_cca_mask(batch["input_ids"][0].tolist(), tiny.config.image_token_id, side))


def test_cca_positions_survive_pruning_and_decoding():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "cca"):
        full = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3, min_new_tokens=3))
    with vlmkit.apply(tiny, "fastv:layer=2,keep=0.25", "cca") as patch:
        pruned = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3, min_new_tokens=3))
        kept = patch.selections["fastv"]
    compact = [p for p in pruned if p.shape[-1] > 1][-1]
    side = 12
    for row in range(2):
        ids = batch["input_ids"][row]
        visual = torch.nonzero(ids == tiny.config.image_token_id).flatten()
        valid = batch["attention_mask"][row].bool()
        first = int(visual[0]) - int((~valid).sum())  # the image's first position
        assert torch.equal(full[0][row, visual], first + grid_rings(side, side).flatten())
        text = torch.nonzero(valid & (ids != tiny.config.image_token_id)).flatten()
        after = text[text > visual[-1]]
        assert full[0][row, after].tolist() == list(range(first + side // 2, first + side // 2 + after.numel()))
        slots = torch.sort(torch.cat([visual[kept[row]], text])).values
        assert torch.equal(compact[row, compact.shape[1] - slots.numel():], full[0][row, slots])
        last = int(full[0][row, -1])
        assert [int(step[row]) for step in full[1:]] == [last + 1, last + 2]
    assert torch.equal(torch.stack(pruned[-2:]), torch.stack(full[-2:]))


def test_cca_errors_name_the_valid_choices():
    class FlashAdapter:
        attention_implementation = "flash_attention_2"

    with pytest.raises(ConfigError, match="attn_implementation= one of sdpa, eager"):
        CCA().check_adapter(FlashAdapter())
    tiny, _ = model("llava")
    with pytest.raises(ConflictError, match="both claim the position site"):
        vlmkit.apply(tiny, "cca", "v2pe")
    with pytest.raises(UnknownMethodError, match="Valid parameters: \\(none\\)"):
        vlmkit.apply(tiny, "cca:rings=3")


# ---------------------------------------------------------------- HoPE
def test_hope_tables_against_a_hand_built_table():
    tiny, _ = model("qwen2_vl")
    module = tiny.model.language_model.rotary_emb
    assert module.mrope_section == [2, 3, 3] and module.inv_freq.numel() == 8
    positions = torch.tensor([[[0.0, 1, 2, 7.5]], [[0.0, 3, -1, 9]], [[0.0, 5, 4, 2.25]]])  # (3, 1, 4): t, h, w
    hidden = torch.zeros(1, 4, 16)
    cos, sin = hybrid_tables(module, hidden, positions)
    expected_cos, expected_sin = torch.ones(1, 4, 16), torch.zeros(1, 4, 16)
    for token in range(4):
        for pair in range(6):  # pairs 0..5 alternate height (even) and width (odd); 6 and 7 (temporal) stay unrotated
            angle = float(positions[1 if pair % 2 == 0 else 2, 0, token]) * float(module.inv_freq[pair])
            for half in (0, 8):
                expected_cos[0, token, half + pair] = math.cos(angle)
                expected_sin[0, token, half + pair] = math.sin(angle)
    assert torch.allclose(cos, expected_cos, atol=1e-6) and torch.allclose(sin, expected_sin, atol=1e-6)
    stock = module(hidden, positions)
    with vlmkit.apply(tiny, "hope") as patch:
        assert torch.equal(module(hidden, positions)[0], cos)  # every call of the rotary embedding
        patch.remove()
    assert torch.equal(module(hidden, positions)[0], stock[0])


def qwen_positions(pieces) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int, int]]]:
    """M-RoPE's own positions for text runs (ints) and visual items ((T, H, W) grids), as Qwen2-VL's
    `get_rope_index`: an item starts at p, its token (f, i, j) is at (p + f, p + i, p + j), the text
    after it at the maximum + 1."""
    columns, spans, grids, current = [], [], [], -1
    for piece in pieces:
        if isinstance(piece, int):
            columns += [[current + k] * 3 for k in range(1, piece + 1)]
            current += piece
            continue
        frames, height, width = piece
        spans.append((len(columns), frames * height * width))
        grids.append(piece)
        for f in range(frames):
            for i in range(height):
                for j in range(width):
                    columns.append([current + 1 + f, current + 1 + i, current + 1 + j])
        current += max(piece)
    return torch.tensor(columns).T[:, None], spans, grids


def hope_by_hand(pieces, scale: float) -> list[list[float]]:
    """HoPE's (t, h, w) written out: an item at p has t = p + s * f, h = t + i - (H - 1) // 2,
    w = t + j - (W - 1) // 2; the text after it resumes at max(t) + 1."""
    columns, current = [], -1.0
    for piece in pieces:
        if isinstance(piece, int):
            columns += [[current + k] * 3 for k in range(1, piece + 1)]
            current += piece
            continue
        frames, height, width = piece
        for f in range(frames):
            t = current + 1 + scale * f
            for i in range(height):
                for j in range(width):
                    columns.append([t, t + i - (height - 1) // 2, t + j - (width - 1) // 2])
        current = current + 1 + scale * (frames - 1)
    return [list(axis) for axis in zip(*columns)]


def test_hope_positions_by_hand_for_an_image_and_a_video():
    pieces = [3, (1, 3, 4), 2, (3, 2, 2), 2]
    stock, spans, grids = qwen_positions(pieces)
    n = sum(count for _, count in spans)
    image = torch.cat([torch.full((count,), k) for k, (_, count) in enumerate(spans)])
    slots = torch.cat([torch.arange(start, start + count) for start, count in spans])
    zeros = torch.zeros(n, dtype=torch.long)
    visual = VisualTokens(slots, torch.arange(n), image, zeros, zeros, zeros, zeros, grids=grids, spans=spans)
    context = PositionContext(stock, [visual], torch.ones(1, stock.shape[-1], dtype=torch.bool))
    positions = HoPE(scale=0.75).positions(context)
    assert positions[:, 0].tolist() == hope_by_hand(pieces, 0.75)
    # the image's 3 x 4 grid: t = 3 for all, h = 3 + i - 1, w = 3 + j - 1; the text after resumes at 4
    assert positions[:, 0, 3:15].tolist()[1][:4] == [2.0, 2.0, 2.0, 2.0] and positions[0, 0, 15].item() == 4.0
    assert torch.equal(HoPE(scale=1, allocation="mrope", layout="mrope").positions(context), stock.float())


def test_hope_decodes_after_the_last_prompt_position_on_every_axis():
    tiny, processor = model("qwen2_vl")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "hope:scale=0.5"):
        seen = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=4, min_new_tokens=4))
    prompt, steps = seen[0], seen[1:]
    assert prompt.dtype == torch.float32 and len(steps) == 3
    for row in range(2):
        last = prompt[:, row, -1]
        assert bool((last == last[0]).all())  # the prompt ends in text: the three axes agree
        assert [step[:, row, 0].tolist() for step in steps] == [[float(last[0]) + k] * 3 for k in (1, 2, 3)]
        ids = batch["input_ids"][row]
        visual = torch.nonzero(ids == tiny.config.image_token_id).flatten()
        assert bool((prompt[0, row, visual] == prompt[0, row, visual[0]]).all())  # an image is one temporal position
        assert float(prompt[0, row, visual[-1] + 1]) == float(prompt[0, row, visual[0]]) + 1  # vision_end right after


def test_hope_training_draws_and_errors():
    first = HoPE(train=True, seed=5)
    draws = [first.item_scale() for _ in range(100)]
    assert set(draws) == set(TRAINING_SCALES) == {0.5, 0.75, 1.0, 1.25, 1.5}
    again = HoPE(train=True, seed=5)
    assert [again.item_scale() for _ in range(100)] == draws
    for scale in (0, -1, True):
        with pytest.raises(ConfigError, match="scale=.*> 0"):
            HoPE(scale=scale)
    with pytest.raises(ConfigError, match="allocation='none' is not one of hybrid, mrope"):
        HoPE(allocation="none")


@pytest.mark.parametrize("family,spec", [("llava", "v2pe"), ("llava_next", "cca"), ("qwen2_vl", "hope")])
def test_contrastive_branches_get_the_position_method_too(family, spec):
    """With VCD, the noised-image branch's prefill gets the same positions as the main rows'."""
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, spec):
        alone = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3, min_new_tokens=3))
    with vlmkit.apply(tiny, spec, "vcd:alpha=1"):
        seen = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3, min_new_tokens=3))
    prompts = [p for p in seen if p.shape[-1] > 1]
    assert len(prompts) == 2  # the main rows' prefill and the branch's
    assert torch.equal(prompts[0], alone[0]) and torch.equal(prompts[1], alone[0])


@pytest.mark.parametrize("family,spec,message", [
    ("qwen2_vl", "v2pe", "M-RoPE.*It runs on: llava, llava_next, llava_onevision"),
    ("qwen2_5_vl", "cca", "M-RoPE.*It runs on: llava, llava_next, llava_onevision"),
    ("llava_onevision", "hope", "1-D rotary.*It runs on: qwen2_vl, qwen2_5_vl"),
])
def test_position_methods_refuse_the_other_rotary_kind_naming_the_families_they_run_on(family, spec, message):
    tiny, _ = model(family)
    with pytest.raises(UnsupportedModelError, match=message):
        vlmkit.apply(tiny, spec)
    assert vlmkit.api.patch_of(tiny) is None
