"""gamma-MoD (shared router, masked top-k with its auxiliary loss, prefill threshold, decoding skip)
against hand computations, and the engine's decoding-time skip on real forward passes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from vlmkit.adapters import adapter_for
from vlmkit.engine.contexts import GateContext, RouteContext, TokenGate
from vlmkit.errors import ConfigError
from vlmkit.methods.depth.gammamod import GammaMoD


class Tokens:
    """The part of VisualTokens a router reads."""

    def __init__(self, slots):
        self.slots = torch.tensor(slots)

    def __len__(self):
        return len(self.slots)


def hand_router(method):
    """Router logits (0, x_0 - x_1): p = sigmoid(x_0 - x_1)."""
    method.router = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        method.router.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))


def hidden():
    # sample 0: text at 0, visual at 1..5, text at 6; sample 1: padding at 0, text at 1, visual at 2..4
    x = torch.zeros(2, 7, 2)
    x[0, :, 0] = torch.tensor([3.0, 0.5, -2.0, 1.0, -6.0, 2.0, 4.0])
    x[1, :, 0] = torch.tensor([0.0, -1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 0] = False
    return x, valid, [Tokens([1, 2, 3, 4, 5]), Tokens([2, 3, 4])]


def test_training_routes_by_masked_top_k_and_the_auxiliary_loss_is_the_top_k_cross_entropy():
    method = GammaMoD(layers=(1,))
    hand_router(method)
    x, valid, visual = hidden()
    context = RouteContext(hidden=x, visual=visual, layer=1, num_layers=4, training=True, valid=valid, normed=x)
    with torch.enable_grad():
        route = method.route(context)
    # sample 0: p = sigmoid(0.5, -2, 1, -6, 2); k = 5 - floor(2.5) = 3 -> tokens 0, 2, 4
    assert route.run[0].tolist() == [0, 2, 4]
    # sample 1: p = sigmoid(-1, 1, -1), a tie; k = 3 - floor(1.5) = 2 -> token 1, then the lower index 0
    assert route.run[1].tolist() == [0, 1]
    assert route.mode == "skip" and route.weights is None
    logits = torch.stack([torch.zeros_like(x[..., 0]), x[..., 0]], dim=-1)
    target = torch.ones(2, 7, dtype=torch.long)
    target[0, [2, 4]] = 0  # resting visual tokens of sample 0 (visual 1, 3)
    target[1, 4] = 0  # sample 1's visual 2
    expected = F.cross_entropy(logits[valid], target[valid])  # padding left out
    loss = method.auxiliary_loss()
    torch.testing.assert_close(loss, 0.01 * expected)
    assert loss.requires_grad
    assert method.auxiliary_loss() is None  # collected once


def test_inference_runs_visual_tokens_above_the_threshold_and_gates_generated_tokens_at_one_half():
    method = GammaMoD(layers=(1,), threshold=0.3)
    hand_router(method)
    x, valid, visual = hidden()
    route = method.route(RouteContext(hidden=x, visual=visual, layer=1, num_layers=4, valid=valid, normed=x))
    # sigmoid(0.5)=0.62, sigmoid(-2)=0.12, sigmoid(1)=0.73, sigmoid(-6)=0.002, sigmoid(2)=0.88 -> p > 0.3
    assert route.run[0].tolist() == [0, 2, 4]
    assert route.run[1].tolist() == [1]
    assert method.auxiliary_loss() is None  # no loss at inference
    assert GammaMoD(layers=(1,)).config.threshold == 0.005  # the original's prefill threshold
    generated = torch.zeros_like(valid)
    generated[:, -1] = True
    gate = method.gate(GateContext(x, valid, generated, 1, 4, normed=x))
    p = torch.sigmoid(x[..., 0])
    torch.testing.assert_close(gate.weights, p)
    assert torch.equal(gate.rest, p < 0.5)


class RestAtLayer(GammaMoD):
    """gamma-MoD whose gate rests every generated token at one layer and runs it everywhere else."""

    def gate(self, context):
        gate = super().gate(context)
        rest = torch.full_like(gate.rest, context.layer == 2)
        return TokenGate(gate.weights, rest)


def test_a_generated_token_that_rests_writes_no_kv_in_that_layer_and_passes_unchanged():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, RestAtLayer(layers=(1, 2), threshold=0.5)) as patch, torch.no_grad():
        prefill = tiny(**batch, use_cache=True)
        cache = prefill.past_key_values
        physical = [layer.physical_length for layer in cache.layers]
        logical = cache.get_seq_length()
        token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        seen = {}

        def keep(name, value):
            seen.setdefault(name, value)

        decoder = adapter_for(tiny).decoder_layers
        hooks = [
            decoder[1].register_forward_hook(lambda m, a, out: keep("after 1", out[0] if isinstance(out, tuple) else out)),
            decoder[2].register_forward_hook(lambda m, a, out: keep("layer 2 ran", True)),
            decoder[3].register_forward_pre_hook(
                lambda m, a, k: keep("into 3", k.get("hidden_states", a[0] if a else None)), with_kwargs=True
            ),
        ]
        try:
            step = tiny(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
        layers = step.past_key_values.layers
        assert cache.get_seq_length() == logical + 1
        for index, layer in enumerate(layers):
            added = layer.layout.valid[:, physical[index]:]
            if index == 2:  # the whole step rested: the layer ran for nothing and cached nothing
                assert layer.physical_length == physical[index] and added.shape[1] == 0
            else:
                assert added.shape[1] == 1 and bool(added.all()), index
        assert "layer 2 ran" not in seen and torch.equal(seen["into 3"], seen["after 1"])  # passed unchanged
        cached = generate(tiny, batch, max_new_tokens=5)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, max_new_tokens=5, use_cache=False), cached)


def test_decoding_skips_layers_with_an_untrained_router_and_matches_recomputation():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, "gammamod:layers=(1, 2, 3)") as patch, torch.no_grad():
        out = tiny.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        layers = out.past_key_values.layers
        prompt = batch["input_ids"].shape[1]
        slots = [layer.layout.slot for layer in layers]
        decoded = [(s >= prompt).sum().item() for s in slots]
        assert decoded[0] == 2 * 7  # a dense layer caches every generated token but the last
        assert min(decoded[1:]) < 2 * 7, decoded  # some generated tokens skipped a routed layer
        with patch.reuse_selections():
            again = tiny.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, again)


def test_routed_layers_default_given_or_lowest_arank(tmp_path):
    assert GammaMoD().routed_layers(12) == tuple(range(3, 11))  # the original's arank_mod
    assert GammaMoD().routed_layers(32) == tuple(range(3, 31))
    assert GammaMoD(layers=(5, 2)).routed_layers(12) == (2, 5)
    ranks = [5.0, 4.0, 1.0, 3.0, 1.0, 9.0]
    (tmp_path / "arank.json").write_text(json.dumps({"arank": ranks}))
    # lowest ranks: layer 2 (1.0), layer 4 (1.0, the tie after the lower layer), layer 3 (3.0)
    assert GammaMoD(arank=str(tmp_path / "arank.json"), count=3).routed_layers(6) == (2, 3, 4)
    with pytest.raises(ConfigError, match="holds no ARank per layer of a 12-layer model"):
        GammaMoD(arank=str(tmp_path / "arank.json"), count=3).routed_layers(12)


def test_errors_name_the_valid_choices():
    tiny, _ = model("llava")  # 4 decoder layers
    with pytest.raises(ConfigError, match=r"routed layers \(2, 7\) are out of range .* 4 decoder layers \(0..3\)"):
        vlmkit.apply(tiny, "gammamod:layers=(2, 7)")
    with pytest.raises(ConfigError, match="leave none of a 4-layer model; give `layers` or `arank`"):
        vlmkit.apply(tiny, "gammamod")
    with pytest.raises(ConfigError, match=r"capacity=1.5 is out of range"):
        GammaMoD(capacity=1.5)
    with pytest.raises(ConfigError, match="`arank` .* and `count` .* together"):
        GammaMoD(count=3)
    with pytest.raises(ConfigError, match="does not exist"):
        GammaMoD(arank="missing.json", count=2).routed_layers(4)


def test_router_round_trip_and_refusal_for_another_model(tmp_path):
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    method = GammaMoD(layers=(1, 2))
    adapter = adapter_for(tiny)
    method.check_adapter(adapter)
    with torch.no_grad():
        method.router.weight.normal_(generator=torch.Generator().manual_seed(1))
    method.save(adapter, tmp_path / "routers.safetensors")
    with torch.no_grad(), vlmkit.apply(tiny, method):
        first = tiny(**batch).logits
    loaded = GammaMoD(layers=(1, 2), routers=str(tmp_path))  # a folder holding routers.safetensors
    with torch.no_grad(), vlmkit.apply(tiny, loaded):
        assert torch.equal(tiny(**batch).logits, first)
    with pytest.raises(ConfigError, match=r"holds routers for layers \(1, 2\)"):
        vlmkit.apply(tiny, GammaMoD(layers=(1, 3), routers=str(tmp_path)))
    other, _ = model("llava", attn="eager")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    try:
        with pytest.raises(ConfigError, match="trained for another model"):
            vlmkit.apply(other, GammaMoD(layers=(1, 2), routers=str(tmp_path)))
    finally:
        with torch.no_grad():
            next(other.parameters()).sub_(1.0)
    with pytest.raises(ConfigError, match="not a gammamod routers file .it holds 'pmod'"):
        from vlmkit.methods.depth.pmod import PMoD, save_routers

        save_routers(PMoD(), adapter, tmp_path / "pmod.safetensors")
        GammaMoD(routers=str(tmp_path / "pmod.safetensors"))
