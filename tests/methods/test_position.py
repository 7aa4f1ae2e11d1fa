"""V2PE on real forward passes: positions against a hand computation (two images with text between
them, through decoding), composition with pruning, the training draws and the errors. The
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
from vlmkit.errors import ConfigError, ConflictError, UnsupportedModelError
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
        assert patch.methods[0].position_policy(False, "v2pe") == "keep"
    prompt = full[0]
    compact = [p for p in pruned if p.shape[-1] > 1][-1]
    for row in range(2):
        visual = torch.nonzero(batch["input_ids"][row] == tiny.config.image_token_id).flatten()
        valid = batch["attention_mask"][row].bool()
        text = torch.nonzero(valid & (batch["input_ids"][row] != tiny.config.image_token_id)).flatten()
        slots = torch.sort(torch.cat([visual[kept[row]], text])).values
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
    tiny, _ = model("qwen2_vl")
    with pytest.raises(UnsupportedModelError, match="M-RoPE.*It runs on: llava, llava_next, llava_onevision"):
        vlmkit.apply(tiny, "v2pe")
    tiny, _ = model("llava")
    with pytest.raises(ConfigError, match="reindex.*v2pe"):
        vlmkit.apply(tiny, "pool:keep=0.25,positions=reindex", "v2pe")
    with pytest.raises(ConflictError, match="'half' and 'v2pe' both claim the position site"):
        vlmkit.apply(tiny, local(HalfVisualPositions, "half", ("position",))(), "v2pe")
    assert vlmkit.api.patch_of(tiny) is None
