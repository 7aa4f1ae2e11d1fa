"""One decoding step of each method equals its formula, computed here from separately run branches.

The branches are run by hand with the model's own forward (noised / flipped pixels, a prompt with
the instruction or without the image), the formulas are written out again from the papers, and
the result is compared with the `scores` generate() records for that step. Under token pruning
the branch is run with the main rows' selection (`reuse_selections()`), or unpruned for
`branch_pruning="none"`.
"""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import inputs, model
from vlmkit.methods.decode.base import content_generator
from vlmkit.methods.decode.prompts import DISTURBANCE

QUESTION = "Is there a cat in the image?"


def setup(family="llava"):
    tiny, processor = model(family)
    data = inputs(processor, photos()[:2], [QUESTION, QUESTION])  # same length: no padding to reproduce
    assert bool(data["attention_mask"].all())
    return tiny, processor, data


def step_scores(tiny, processor, data, steps=1, **kwargs):
    with torch.no_grad():
        out = tiny.generate(
            **data, max_new_tokens=steps, do_sample=False, tokenizer=processor.tokenizer,
            return_dict_in_generate=True, output_scores=True, **kwargs,
        )
    return out


def last_logits(tiny, **data):
    with torch.no_grad():
        return tiny(**data).logits[:, -1].float()


def noised(pixels, step, seed=0):
    """VCD's forward diffusion, written out: 1000-step sigmoid schedule, per-image seeded noise."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = float(torch.cumprod(1 - betas, dim=0)[step])
    out = []
    for block in pixels.split(1):
        noise = torch.randn(block.shape, generator=content_generator(seed, block))
        out.append(math.sqrt(alpha_bar) * block + math.sqrt(1 - alpha_bar) * noise)
    return torch.cat(out)


def vcd_formula(main, negative, alpha, beta):
    out = (1 + alpha) * main - alpha * negative
    return out.masked_fill(main < math.log(beta) + main.max(dim=-1, keepdim=True).values, -math.inf)


def assert_scores(actual, expected):
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vcd_step(family):
    tiny, processor, data = setup(family)
    main = last_logits(tiny, **data)
    negative = last_logits(tiny, **{**data, "pixel_values": noised(data["pixel_values"], 500)}) if family == "llava" else None
    with vlmkit.apply(tiny, "vcd:alpha=0.7,beta=0.2"):
        scores = step_scores(tiny, processor, data).scores[0]
    if family == "qwen2_vl":  # one block of patch rows per image
        grid = data["image_grid_thw"].prod(-1).tolist()
        pixels = torch.cat([noised(block[None], 500)[0] for block in data["pixel_values"].split(grid)])
        negative = last_logits(tiny, **{**data, "pixel_values": pixels})
    assert_scores(scores, vcd_formula(main, negative, 0.7, 0.2))


def test_vcd_decoding_step_from_the_batched_rows():
    """Step 2 comes from the batched main + branch forward and the branch's LM head on the plausible tokens."""
    tiny, processor, data = setup()
    with vlmkit.apply(tiny, "vcd:alpha=0.5,beta=0.05"):
        out = step_scores(tiny, processor, data, steps=2)
    ids = torch.cat([data["input_ids"], out.sequences[:, -2:-1]], dim=1)
    main = last_logits(tiny, input_ids=ids, pixel_values=data["pixel_values"])
    negative = last_logits(tiny, input_ids=ids, pixel_values=noised(data["pixel_values"], 500))
    assert_scores(out.scores[1], vcd_formula(main, negative, 0.5, 0.05))


def test_vcd_step_under_beam_search_is_renormalised():
    tiny, processor, data = setup()
    main = last_logits(tiny, **data)
    negative = last_logits(tiny, **{**data, "pixel_values": noised(data["pixel_values"], 500)})
    with vlmkit.apply(tiny, "vcd"):
        scores = step_scores(tiny, processor, data, num_beams=2).scores[0]
    expected = torch.log_softmax(vcd_formula(main, negative, 1.0, 0.1), dim=-1).repeat_interleave(2, dim=0)
    assert_scores(scores, expected)


def test_plausibility_constraint():
    tiny, processor, data = setup()
    main = last_logits(tiny, **data)
    with vlmkit.apply(tiny, "vcd:alpha=3,beta=0.5"):
        scores = step_scores(tiny, processor, data).scores[0]
    probs = main.softmax(-1)
    plausible = probs >= 0.5 * probs.max(dim=-1, keepdim=True).values
    assert torch.equal(torch.isfinite(scores), plausible)
    with vlmkit.apply(tiny, "vcd:alpha=3,beta=1.0"):  # only the most likely token survives: plain greedy
        assert torch.equal(step_scores(tiny, processor, data).scores[0].argmax(-1), main.argmax(-1))


def test_icd_step():
    tiny, processor, data = setup()
    main = last_logits(tiny, **data)
    prefix = processor.tokenizer(DISTURBANCE + " ", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = data["input_ids"]
    assert bool((ids[:, 0] == processor.tokenizer.bos_token_id).all())
    branch_ids = torch.cat([ids[:, :1], prefix.expand(2, -1), ids[:, 1:]], dim=1)
    negative = last_logits(tiny, input_ids=branch_ids, pixel_values=data["pixel_values"])
    with vlmkit.apply(tiny, "icd"):
        scores = step_scores(tiny, processor, data).scores[0]
    assert_scores(scores, vcd_formula(main, negative, 1.0, 0.1))


def test_m3id_second_step():
    tiny, processor, data = setup()
    with vlmkit.apply(tiny, "m3id:decay=0.3"):
        out = step_scores(tiny, processor, data, steps=2)
    first = out.sequences[:, -2:-1]
    plain = last_logits(tiny, **data)  # t = 0: weight 0, plain logits within the plausible set (as the reference)
    assert_scores(out.scores[0], plain.masked_fill(plain < math.log(0.1) + plain.max(-1, keepdim=True).values, -math.inf))
    main = last_logits(tiny, input_ids=torch.cat([data["input_ids"], first], 1), pixel_values=data["pixel_values"])
    text = data["input_ids"][data["input_ids"] != tiny.config.image_token_id].view(2, -1)
    negative = last_logits(tiny, input_ids=torch.cat([text, first], 1))
    weight = (1 - math.exp(-0.3)) / math.exp(-0.3)  # (1 - gamma_t) / gamma_t at t = 1
    expected = (main + weight * (main - negative)).masked_fill(main < math.log(0.1) + main.max(-1, keepdim=True).values, -math.inf)
    assert_scores(out.scores[1], expected)


def test_ritual_step_with_vcd():
    tiny, processor, data = setup()
    pixels = data["pixel_values"]
    main = last_logits(tiny, **data)
    flipped = last_logits(tiny, **{**data, "pixel_values": pixels.flip(-1)})
    negative = last_logits(tiny, **{**data, "pixel_values": noised(pixels, 500, seed=4)})
    with vlmkit.apply(tiny, "ritual:transforms='hflip',alpha_neg=0.5,seed=4"):
        scores = step_scores(tiny, processor, data).scores[0]
    expected = 1.5 * main + 3 * flipped - 0.5 * negative
    expected = expected.masked_fill(main < math.log(0.1) + main.max(-1, keepdim=True).values, -math.inf)
    assert_scores(scores, expected)


def early_exit(tiny, hidden_states, layer):
    return torch.log_softmax(tiny.lm_head(tiny.model.language_model.norm(hidden_states[layer][:, -1])).float(), -1)


def jsd(log_p, log_q):
    p, q = log_p.exp(), log_q.exp()
    m = (p + q) / 2
    return 0.5 * (p * (log_p - m.log())).sum(-1) + 0.5 * (q * (log_q - m.log())).sum(-1)


def test_dola_step():
    tiny, processor, data = setup()
    with torch.no_grad():
        out = tiny(**data, output_hidden_states=True)
    final = torch.log_softmax(out.logits[:, -1].float(), -1)
    candidates = {layer: early_exit(tiny, out.hidden_states, layer) for layer in (0, 1, 2)}
    divergence = torch.stack([jsd(final, q) for q in candidates.values()])
    premature = torch.stack([candidates[int(layer)][row] for row, layer in enumerate(divergence.argmax(0))])
    expected = (final - premature).masked_fill(final < math.log(0.2) + final.max(-1, keepdim=True).values, -math.inf)
    with vlmkit.apply(tiny, "dola:layers=(0,1,2),relative_top=0.2"):
        scores = step_scores(tiny, processor, data).scores[0]
    assert_scores(scores, expected)


def test_lol_step():
    tiny, processor, data = setup()
    text = data["input_ids"][data["input_ids"] != tiny.config.image_token_id].view(2, -1)
    with torch.no_grad():
        main = tiny(**data, output_hidden_states=True)
        amateur = tiny(input_ids=text, output_hidden_states=True)
    final = torch.log_softmax(main.logits[:, -1].float(), -1)
    amateur_final = torch.log_softmax(amateur.logits[:, -1].float(), -1)
    layers = (1, 2)
    divergence = torch.stack([jsd(final, early_exit(tiny, main.hidden_states, layer)) for layer in layers])
    chosen = [layers[int(i)] for i in divergence.argmax(0)]
    lower = torch.stack([early_exit(tiny, main.hidden_states, layer)[row] for row, layer in enumerate(chosen)])
    amateur_lower = torch.stack([early_exit(tiny, amateur.hidden_states, layer)[row] for row, layer in enumerate(chosen)])
    expected = final + 0.5 * (final - amateur_final) + 2.0 * (lower - amateur_lower)
    expected = expected.masked_fill(final < math.log(0.1) + final.max(-1, keepdim=True).values, -math.inf)
    with vlmkit.apply(tiny, "lol:amateur='none',alpha=0.5,omega=2.0,layers=(1,2)"):
        scores = step_scores(tiny, processor, data).scores[0]
    assert_scores(scores, expected)


def test_debias_calibration_step():
    tiny, processor, data = setup()
    tokenizer = processor.tokenizer
    present = torch.log_softmax(last_logits(tiny, **data), -1)
    text = data["input_ids"][data["input_ids"] != tiny.config.image_token_id].view(2, -1)
    absent = torch.log_softmax(last_logits(tiny, input_ids=text), -1)
    with vlmkit.apply(tiny, "debias:answers=('yes','no')"):
        scores = step_scores(tiny, processor, data).scores[0]
    classes = [sorted({tokenizer(v, add_special_tokens=False)["input_ids"][0] for w in (a, a.capitalize()) for v in (w, " " + w)}) for a in ("yes", "no")]
    assert all(len(ids) == 4 for ids in classes)  # one token per variant in this vocabulary
    p = torch.stack([present[:, ids].exp().sum(-1) for ids in classes], -1)
    q = torch.stack([absent[:, ids].exp().sum(-1) for ids in classes], -1)
    calibrated = (p / q) / (p / q).sum(-1, keepdim=True) * p.sum(-1, keepdim=True)  # W = diag(q)^-1, mass kept
    expected = present.clone()
    for c, ids in enumerate(classes):
        expected[:, ids] = present[:, ids] + (calibrated[:, c : c + 1] / p[:, c : c + 1]).log()
    assert_scores(scores, expected)


# ---------------------------------------------------------------------------- composition with pruning
@pytest.mark.parametrize(("family", "pruning"), [("llava", "visionzip:tokens=20"), ("llava", "fastv:layer=2,keep=0.25"), ("qwen2_vl", "visionzip:tokens=16")])
def test_branch_gets_the_main_selection(family, pruning):
    tiny, processor, data = setup(family)
    noisy = {**data, "pixel_values": noised(data["pixel_values"], 500)} if family == "llava" else None
    if family == "qwen2_vl":
        grid = data["image_grid_thw"].prod(-1).tolist()
        noisy = {**data, "pixel_values": torch.cat([noised(b[None], 500)[0] for b in data["pixel_values"].split(grid)])}
    unpruned_negative = last_logits(tiny, **noisy)
    method = pruning.partition(":")[0]
    with vlmkit.apply(tiny, pruning, "vcd") as patch:
        scores = step_scores(tiny, processor, data).scores[0]
        selection = [s.clone() for s in patch.selections[method]]
        main = last_logits(tiny, **data)
        assert all(torch.equal(a, b) for a, b in zip(selection, patch.selections[method]))
        with patch.reuse_selections():
            negative = last_logits(tiny, **noisy)
        assert all(torch.equal(a, b) for a, b in zip(selection, patch.selections[method]))
    assert not torch.allclose(negative, unpruned_negative, atol=1e-3), "the pruning must change the branch"
    assert_scores(scores, vcd_formula(main, negative, 1.0, 0.1))
    with vlmkit.apply(tiny, pruning, "vcd:branch_pruning='none'") as patch:
        scores = step_scores(tiny, processor, data).scores[0]
        assert all(torch.equal(a, b) for a, b in zip(selection, patch.selections[method]))
    assert_scores(scores, vcd_formula(main, unpruned_negative, 1.0, 0.1))


def test_pruned_decoding_keeps_the_engine_invariants():
    """With pruning, cached = recompute (greedy and beams) and a padded batch = single runs."""
    tiny, processor = model("llava")
    questions = ["What is shown?", "Is there a cat in the image? Answer yes or no."]
    data = inputs(processor, photos()[:2], questions)
    for spec in ("vcd", "vcd:branch_pruning='none'", "m3id:decay=0.5"):
        with vlmkit.apply(tiny, "fastv:layer=2,keep=0.25", spec) as patch:
            for setting in (dict(do_sample=False), dict(num_beams=2)):
                with torch.no_grad():
                    cached = tiny.generate(**data, max_new_tokens=4, **setting)
                    with patch.reuse_selections():
                        assert torch.equal(tiny.generate(**data, max_new_tokens=4, use_cache=False, **setting), cached), spec
            with torch.no_grad():
                together = tiny.generate(**data, max_new_tokens=4, do_sample=False)[:, data["input_ids"].shape[1] :]
                for row in range(2):
                    one = inputs(processor, [photos()[row]], [questions[row]])
                    alone = tiny.generate(**one, max_new_tokens=4, do_sample=False)[:, one["input_ids"].shape[1] :]
                    assert torch.equal(alone[0], together[row]), (spec, row)
