"""Layer skipping (ShortV, VTW, MoD-style routing) against hand computations on real forward passes,
their calibration, composition with pruning and decoding, the FLOPs and KV bytes the engine counts,
and clear errors."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.adapters import adapter_for
from vlmkit.analysis import depth
from vlmkit.errors import ConfigError, ConflictError
from vlmkit.methods.depth.schedules import progressive_ratios
from vlmkit.zoo.flops import flops

FAMILIES = ["llava", "qwen2_vl"]


class Sample:
    """The part of a benchmark sample calibration reads."""

    def __init__(self, prompt, image):
        self.prompt, self.image = prompt, image

    def load_media(self):
        return [self.image]


SAMPLES = [Sample(question, image) for question, image in zip(QUESTIONS, photos())]


@contextlib.contextmanager
def layer_io(tiny, index):
    """Record one decoder layer's input (hidden states, position embeddings, mask) and output."""
    seen = {}
    layer = adapter_for(tiny).decoder_layers[index]

    def record_input(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.setdefault("input", (hidden.clone(), kwargs.get("position_embeddings"), kwargs.get("attention_mask")))

    def record_output(module, args, kwargs, output):
        seen.setdefault("output", output.clone())

    pre = layer.register_forward_pre_hook(record_input, with_kwargs=True)
    post = layer.register_forward_hook(record_output, with_kwargs=True)
    try:
        yield seen
    finally:
        pre.remove()
        post.remove()


def eager_layer(layer, hidden, rotary, valid):
    """One decoder layer computed here: pre-norm, q/k/v, rotary, causal softmax over valid keys, o_proj,
    residual, post-norm, MLP. Every token is a query (ShortV's frozen visual rows are discarded by the caller)."""
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    view = lambda x: x.view(batch, length, -1, attention.head_dim).transpose(1, 2)  # noqa: E731
    query, key = apply_rotary_pos_emb(view(attention.q_proj(normed)), view(attention.k_proj(normed)), *rotary)
    value = view(attention.v_proj(normed))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * attention.head_dim**-0.5
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = attention.o_proj((weights @ value).transpose(1, 2).reshape(batch, length, -1))
    states = hidden + out
    return states + layer.mlp(layer.post_attention_layernorm(states))


def visual_positions(tiny, batch, row):
    return torch.nonzero(batch["input_ids"][row] == tiny.config.image_token_id).flatten()


@pytest.mark.parametrize("family", FAMILIES)
def test_shortv_layer_freezes_visual_tokens_and_text_sees_their_keys(family):
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "shortv:layers=(2,)"), layer_io(tiny, 2) as seen, torch.no_grad():
        tiny(**batch)
    hidden, rotary, _ = seen["input"]
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = eager_layer(adapter_for(tiny).decoder_layers[2], hidden, rotary, valid)
    for row in range(2):
        visual = visual_positions(tiny, batch, row)
        text = torch.nonzero(valid[row]).flatten()
        text = text[~torch.isin(text, visual)]
        assert torch.equal(seen["output"][row, visual], hidden[row, visual])  # exactly unchanged
        torch.testing.assert_close(seen["output"][row, text], reference[row, text], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(reference[row, visual], hidden[row, visual])  # a dense layer would change them


def test_shortv_keeps_every_key_and_value_in_the_cache():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with vlmkit.apply(tiny, "shortv:layers=(1, 2)"), torch.no_grad():
        out = tiny(**batch, use_cache=True)
    assert all(layer.keys.shape[2] == batch["input_ids"].shape[1] for layer in out.past_key_values.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_vtw_later_layers_hold_no_visual_kv(family):
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "vtw:layer=2") as patch, torch.no_grad():
        cache = tiny(**batch, use_cache=True).past_key_values
        assert [len(kept) for kept in patch.selections["vtw"]] == [0, 0]
    valid = batch["attention_mask"].bool()
    for row in range(2):
        visual = set(visual_positions(tiny, batch, row).tolist())
        text = [p for p in torch.nonzero(valid[row]).flatten().tolist() if p not in visual]
        for index, layer in enumerate(cache.layers):
            slots = layer.layout.slot[row][layer.layout.valid[row]].tolist()
            assert slots == (sorted(text) if index >= 2 else torch.nonzero(valid[row]).flatten().tolist()), index


def hand_attention_row(layer, hidden, rotary, valid):
    """Per sample, the last token's attention to every key (mean over heads), computed here."""
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    view = lambda x: x.view(batch, length, -1, attention.head_dim).transpose(1, 2)  # noqa: E731
    query, key = apply_rotary_pos_emb(view(attention.q_proj(normed)), view(attention.k_proj(normed)), *rotary)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query[:, :, -1:] @ key.transpose(-1, -2))[:, :, 0] * attention.head_dim**-0.5
    return logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1).mean(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_mod_routes_the_tokens_a_hand_computation_picks_and_caches_only_them(family):
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    ratios = (1.0, 1.0, 0.3, 1.0)
    with vlmkit.apply(tiny, f"mod:ratios={ratios}") as patch, layer_io(tiny, 1) as seen, torch.no_grad():
        cache = tiny(**batch, use_cache=True).past_key_values
        routed = patch.routes["mod"][2]
    hidden, rotary = seen["output"], seen["input"][1]  # what enters layer 2 (layer 1 runs whole)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        scores = hand_attention_row(adapter_for(tiny).decoder_layers[2], hidden, rotary, valid)
    for row in range(2):
        visual = visual_positions(tiny, batch, row)
        count = int(len(visual) * 0.3)
        expected = torch.sort(torch.argsort(scores[row, visual], descending=True, stable=True)[:count]).values
        assert torch.equal(routed[row], expected)
        layout = cache.layers[2].layout
        cached = set(layout.slot[row][layout.valid[row]].tolist())
        skipped = set(visual.tolist()) - set(visual[expected].tolist())
        assert not cached & skipped and len(cached) == int(valid[row].sum()) - len(skipped)
        assert int(cache.layers[1].layout.valid[row].sum()) == int(valid[row].sum())


def test_mod_update_score_is_the_previous_layers_update_norm():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with vlmkit.apply(tiny, "mod:ratios=(1.0, 1.0, 0.25, 1.0),score='update'") as patch, layer_io(tiny, 1) as seen, torch.no_grad():
        tiny(**batch)
        routed = patch.routes["mod"][2][0]
    visual = visual_positions(tiny, batch, 0)
    update = (seen["output"] - seen["input"][0])[0, visual].float().norm(dim=-1)
    expected = torch.sort(torch.argsort(update, descending=True, stable=True)[: int(len(visual) * 0.25)]).values
    assert torch.equal(routed, expected)


def test_progressive_ratio_decay_over_depth():
    thirty_two = progressive_ratios(32)
    assert [layer for layer, r in enumerate(thirty_two) if r is not None] == list(range(8, 32))
    assert [layer for layer, r in enumerate(thirty_two) if r == 0.15] == list(range(24, 32))
    assert sum(1.0 if r is None else r for r in thirty_two) / 32 == pytest.approx(0.5375)
    assert thirty_two[8] == pytest.approx(math.cos(8 * math.pi / 31) / 2 + 0.5)
    twelve = progressive_ratios(12)
    assert [layer for layer, r in enumerate(twelve) if r is not None] == list(range(3, 12))
    assert twelve[3] == pytest.approx(math.cos(3 * math.pi / 11) / 2 + 0.5) and twelve[11] == 0.15


def test_calibration_is_deterministic_across_runs_and_batch_sizes(tmp_path):
    tiny, processor = model("llava")
    one = depth.calibrate_shortv(tiny, processor, SAMPLES, batch_size=1, progress=False)
    four = depth.calibrate_shortv(tiny, processor, SAMPLES, batch_size=4, progress=False)
    again = depth.calibrate_shortv(tiny, processor, SAMPLES, batch_size=1, progress=False)
    assert one == again
    assert one["ranking"] == four["ranking"]
    torch.testing.assert_close(torch.tensor(one["contribution"]), torch.tensor(four["contribution"]), rtol=1e-4, atol=1e-6)
    assert one["contribution"][-1] == pytest.approx(0.0, abs=1e-9)  # freezing the last layer cannot change the last token
    assert depth.choose(list(range(10)), 4, seed=3) == depth.choose(list(range(10)), 4, seed=3)
    vtw = depth.calibrate_vtw(tiny, processor, SAMPLES, eta=10.0, min_layer=1, batch_size=2, progress=False)
    assert vtw["layer"] == 1 and list(vtw["kl"]) == ["1", "2", "3"]
    path = tmp_path / "shortv.json"
    path.write_text(json.dumps(one))
    with vlmkit.apply(tiny, f"shortv:calibration='{path}',fraction=0.5") as patch:
        assert sorted(patch.methods[0].routed_layers(4)) == sorted(one["ranking"][:2])


def test_attention_rank_of_a_layer_against_its_attention_maps():
    tiny, processor = model("llava")
    ranks = depth.attention_ranks(tiny, processor, SAMPLES[:1], progress=False)
    batch = depth.model_inputs(processor, SAMPLES[:1], tiny.device, tiny.dtype)
    with layer_io(tiny, 1) as seen, torch.no_grad():
        tiny(**batch)
    hidden, rotary, _ = seen["input"]
    layer = adapter_for(tiny).decoder_layers[1]
    attention, length = layer.self_attn, hidden.shape[1]
    normed = layer.input_layernorm(hidden)
    view = lambda x: x.view(1, length, -1, attention.head_dim).transpose(1, 2)  # noqa: E731
    query, key = apply_rotary_pos_emb(view(attention.q_proj(normed)), view(attention.k_proj(normed)), *rotary)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2)).double()[0] * attention.head_dim**-0.5
    maps = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    expected = sum(int(torch.linalg.matrix_rank(m.tril(-1))) for m in maps) / maps.shape[0]
    assert ranks[1] == pytest.approx(expected)
    assert len(ranks) == 4 and all(0 < r < length for r in ranks)


@pytest.mark.parametrize("specs", [("fastv:layer=1,keep=0.5", "mod:ratios=(1.0, 1.0, 0.5, 0.5)"),
                                   ("visionzip:tokens=24", "shortv:layers=(2, 3)"),
                                   ("mod:floor=0.25", "vcd"), ("shortv:layers=(1,)", "m3id:decay=0.5")])
@pytest.mark.parametrize("family", FAMILIES)
def test_routes_compose_with_pruning_and_decoding(family, specs):
    tiny, processor = model(family)
    questions = ["What is shown?", "Is there a cat in the image? Answer yes or no."]
    images = photos()[:2]
    batch = inputs(processor, images, questions)
    with vlmkit.apply(tiny, *specs) as patch:
        cached = generate(tiny, batch, tokenizer=processor.tokenizer)
        routes = {name: {k: list(v) for k, v in d.items()} for name, d in patch.routes.items()}
        kept = {name: list(v) for name, v in patch.selections.items()}
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, use_cache=False, tokenizer=processor.tokenizer), cached)
        for row in range(2):
            one = inputs(processor, [images[row]], [questions[row]])
            tokens = generate(tiny, one, tokenizer=processor.tokenizer)
            assert torch.equal(tokens[0], cached[row][: tokens.shape[1]])
            for name, layers in routes.items():
                assert all(torch.equal(patch.routes[name][k][0], v[row]) for k, v in layers.items())
            for name, selections in kept.items():
                assert torch.equal(patch.selections[name][0], selections[row])
    if specs[0].startswith("fastv"):  # the routed tokens are among FastV's kept ones
        for row in range(2):
            assert set(routes["mod"][2][row].tolist()) <= set(kept["fastv"][row].tolist())


def counted_cost(spec, family="llava"):
    tiny, processor = model(family)
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    with vlmkit.apply(tiny, spec) as patch, torch.no_grad():
        tiny(**batch, use_cache=True)
        return patch.cost, tiny, batch


def test_the_engine_counts_flops_and_kv_bytes_from_what_ran():
    cost, tiny, batch = counted_cost("fastv:keep=1.0")
    length = batch["input_ids"].shape[1]
    visual = len(visual_positions(tiny, batch, 0))
    text = length - visual
    assert cost["llm_flops"] == [pytest.approx(flops(tiny, text, visual))]
    config = tiny.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * 4  # keys and values, float32
    assert cost["kv_bytes"] == [pytest.approx(config.num_hidden_layers * length * per_token)]
    pruned, _, _ = counted_cost("fastv:layer=2,keep=0.25")
    kept = int(visual * 0.25 + 0.5)
    assert pruned["llm_flops"] == [pytest.approx(flops(tiny, text, [visual, visual, kept, kept]))]
    assert pruned["kv_bytes"] == [pytest.approx((2 * length + 2 * (text + kept)) * per_token)]
    routed, _, _ = counted_cost("mod:ratios=(1.0, 1.0, 0.5, 1.0)")
    assert routed["llm_flops"] == [pytest.approx(flops(tiny, text, [visual, visual, int(visual * 0.5), visual]))]
    frozen, _, _ = counted_cost("shortv:layers=(3,)")
    assert flops(tiny, text, [visual] * 3 + [0]) < frozen["llm_flops"][0] < cost["llm_flops"][0]


def test_bad_settings_are_clear_errors(tmp_path):
    tiny, processor = model("llava")
    cases = [
        ("shortv:layers=(1, 7)", ConfigError, r"shortv: layer=7 is out of range .* 4 decoder layers \(valid: 0\.\.3\)"),
        ("shortv", ConfigError, "give the layers to freeze as layers=.* or a ranking as calibration=FILE.json"),
        ("shortv:layers=(1,),fraction=0.5", ConfigError, "fraction= picks layers from a ranking"),
        ("shortv:layers=(1, 1)", ConfigError, "names a layer twice"),
        ("vtw:layer=0", ConfigError, "must be an integer >= 1"),
        ("vtw:layer=4", ConfigError, r"vtw: layer=4 is out of range"),
        ("mod:ratios=(1.0, 0.5)", ConfigError, "ratios has 2 entries; this model has 4 decoder layers"),
        ("mod:floor=1.5", ConfigError, r"floor=1\.5 is out of range"),
        ("mod:score='norm'", ConfigError, "score='norm' is not one of attention, update"),
        ("mod:ratios=(0.5, 1.0, 1.0, 1.0),score='update'", ConfigError, "layer 0 cannot be routed"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            vlmkit.apply(tiny, spec)
    calibration = depth.calibrate_shortv(tiny, processor, SAMPLES[:1], progress=False)
    path = tmp_path / "shortv.json"
    path.write_text(json.dumps(calibration))
    for fraction in (0, 1, 1.5):
        with pytest.raises(ConfigError, match=f"fraction={fraction} is out of range"):
            vlmkit.apply(tiny, f"shortv:calibration='{path}',fraction={fraction}")
    other, _ = model("llava", "eager")  # same architecture; its weights changed for this check only
    norm = other.model.language_model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(1.5)
    try:
        with pytest.raises(ConfigError, match="was calibrated on another model"):
            vlmkit.apply(other, f"shortv:calibration='{path}'")
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    with pytest.raises(ConfigError, match="does not exist"):
        vlmkit.apply(tiny, f"shortv:calibration='{tmp_path / 'missing.json'}'")
    with pytest.raises(ConflictError, match="'shortv' and 'mod' both claim the routing of decoder layer 2"):
        vlmkit.apply(tiny, "shortv:layers=(2,)", "mod:ratios=(1.0, 1.0, 0.5, 1.0)")
