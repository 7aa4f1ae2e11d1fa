"""p-MoD inference (learned routers, TanhNorm, STRing, progressive ratio decay) against hand computations."""
from __future__ import annotations

import math
import re

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from vlmkit.adapters import adapter_for
from vlmkit.engine.contexts import RouteContext
from vlmkit.errors import ConfigError
from vlmkit.methods.depth.pmod import PMoD, save_routers, tanh_norm


class Tokens:
    """The part of VisualTokens a router reads."""

    def __init__(self, slots):
        self.slots = torch.tensor(slots)

    def __len__(self):
        return len(self.slots)


def test_tanh_norm_by_hand():
    logits = torch.tensor([0.0, 1.0, -2.0, 50.0, -50.0])
    expected = [1.0, 0.2 * math.tanh(1.0) + 1, 0.2 * math.tanh(-2.0) + 1, 1.2, 0.8]
    torch.testing.assert_close(tanh_norm(logits), torch.tensor(expected))


def test_progressive_ratios_per_layer_for_12_and_32_layers():
    def by_hand(layers):
        out = []
        for l in range(layers):
            r = math.cos(l * math.pi / (layers - 1)) / 2 + 0.5
            out.append(None if r > 0.85 else max(r, 0.15))
        return out

    method = PMoD()
    ratios32 = method.layer_ratios(32)
    assert ratios32 == by_hand(32)
    # the paper's "shiftedcos_decay_0.85_0.15" on LLaVA's 32 layers: layers 8-31 routed, 24-31 at the floor
    assert method.routed_layers(32) == tuple(range(8, 32))
    assert [l for l, r in enumerate(ratios32) if r == 0.15] == list(range(24, 32))
    assert ratios32[8] == pytest.approx(math.cos(8 * math.pi / 31) / 2 + 0.5)  # 0.8138
    mean = sum(1.0 if r is None else r for r in ratios32) / 32
    assert mean == pytest.approx(0.5375, abs=5e-4)
    ratios12 = method.layer_ratios(12)
    assert ratios12 == by_hand(12)
    assert method.routed_layers(12) == tuple(range(3, 12))  # cos(3pi/11)/2+0.5 = 0.7703 (layer 2: 0.9206)
    assert [l for l, r in enumerate(ratios12) if r == 0.15] == [9, 10, 11]


def test_route_by_hand_k_truncated_weights_tanh_norm_ties_to_lower_index():
    method = PMoD()
    method.router_layers = (8,)
    router = torch.nn.Linear(2, 1)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, -1.0]]))
        router.bias.fill_(0.5)
    method.routers = torch.nn.ModuleList([router])
    # sample 0: 7 visual tokens at slots 1..7 (slot 0 text); logits x0 - x1 + 0.5
    x = torch.zeros(2, 9, 2)
    x[0, 1:8, 0] = torch.tensor([0.0, 2.0, -1.0, 2.0, 0.5, -3.0, 1.0])
    # sample 1: 5 visual tokens at slots 4..8, all equal -> first k
    visual = [Tokens(list(range(1, 8))), Tokens(list(range(4, 9)))]
    route = method.route(RouteContext(hidden=x, visual=visual, layer=8, num_layers=32))
    ratio = math.cos(8 * math.pi / 31) / 2 + 0.5  # 0.8138: k = trunc(7 * 0.8138) = 5, trunc(5 * 0.8138) = 4
    assert int(7 * ratio) == 5 and int(5 * ratio) == 4
    # scores 0.5, 2.5, -0.5, 2.5, 1.0, -2.5, 1.5 -> top 5: 1, 3, 6, 4, 0
    assert route.run[0].tolist() == [0, 1, 3, 4, 6]
    assert route.run[1].tolist() == [0, 1, 2, 3]
    logits = torch.tensor([0.5, 2.5, -0.5, 2.5, 1.0, -2.5, 1.5])
    torch.testing.assert_close(route.weights[0], 0.2 * torch.tanh(logits) + 1)
    torch.testing.assert_close(route.weights[1], torch.full((5,), 0.2 * math.tanh(0.5) + 1))
    assert route.mode == "skip"


def _random_routers(method, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in method.routers:
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 2)
            router.bias.copy_(torch.randn(router.bias.shape, generator=generator))


class FirstLayerOnly(PMoD):
    """p-MoD routing only its first routed layer, so the next layer sees the whole stream."""

    def routed_layers(self, num_layers):
        return super().routed_layers(num_layers)[:1]


def test_string_outputs_by_hand_on_a_tiny_model():
    """Routed layer: resting visual token -> w * x; running one -> (x + attn) + w * mlp."""
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    adapter = adapter_for(tiny)
    method = FirstLayerOnly(floor=0.25)
    method.check_adapter(adapter)
    _random_routers(method)
    layer = method.router_layers[0]
    assert layer > 0
    layers = adapter.decoder_layers
    seen = {}

    def keep(name, value):
        seen.setdefault(name, value.clone())

    hooks = [
        # the full stream entering the routed layer: the dense layer before it returns it
        layers[layer - 1].register_forward_hook(lambda m, a, out: keep("x", out[0] if isinstance(out, tuple) else out)),
        layers[layer].post_attention_layernorm.register_forward_pre_hook(lambda m, a: keep("h", a[0])),
        layers[layer].mlp.register_forward_hook(lambda m, a, out: keep("mlp", out)),
        layers[layer + 1].register_forward_pre_hook(lambda m, a, k: keep("y", k.get("hidden_states", a[0] if a else None)), with_kwargs=True),
    ]
    try:
        with torch.no_grad(), vlmkit.apply(tiny, method):
            tiny(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    slots = torch.nonzero(batch["input_ids"][0] == tiny.config.image_token_id).flatten()
    x, y = seen["x"][0], seen["y"][0]
    router = method.router(layer)
    with torch.no_grad():
        w = 0.2 * torch.tanh(x[slots] @ router.weight[0] + router.bias[0]) + 1
    ratio = method.layer_ratios(len(layers))[layer]
    k = int(len(slots) * ratio)
    order = sorted(range(len(slots)), key=lambda i: (-float(w[i]), i))
    running = torch.zeros(len(slots), dtype=torch.bool)
    running[sorted(order[:k])] = True
    resting_slots = slots[~running]
    torch.testing.assert_close(y[resting_slots], w[~running, None] * x[resting_slots])
    # the layer ran on the sub-stream: every position except the resting visual ones, in order
    kept = torch.ones(x.shape[0], dtype=torch.bool)
    kept[resting_slots] = False
    assert seen["h"].shape[1] == int(kept.sum())
    sub = torch.cumsum(kept.long(), 0) - 1
    rows = sub[slots[running]]
    expected = seen["h"][0, rows] + w[running, None] * seen["mlp"][0, rows]
    torch.testing.assert_close(y[slots[running]], expected)
    text = torch.nonzero(kept).flatten()
    text = text[~torch.isin(text, slots)]
    torch.testing.assert_close(y[text], seen["h"][0, sub[text]] + seen["mlp"][0, sub[text]])


def test_zero_routers_keeping_every_token_give_the_base_logits_bit_for_bit():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        base = tiny(**batch).logits
        before = set(tiny.state_dict())
        with vlmkit.apply(tiny, PMoD(floor=1.0)):
            assert set(tiny.state_dict()) == before  # the routers are not registered in the model
            patched = tiny(**batch).logits
    assert torch.equal(base, patched)


def test_routers_round_trip_through_save_and_load(tmp_path):
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    method = PMoD(floor=0.25)
    method.check_adapter(adapter_for(tiny))
    _random_routers(method, seed=3)
    path = tmp_path / "routers.safetensors"
    save_routers(method, adapter_for(tiny), str(path))
    loaded = PMoD(floor=0.25, routers=str(path))
    with torch.no_grad():
        with vlmkit.apply(tiny, method):
            first = tiny(**batch).logits
        with vlmkit.apply(tiny, loaded):
            second = tiny(**batch).logits
    for a, b in zip(method.routers, loaded.routers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(first, second)
    with torch.no_grad(), vlmkit.apply(tiny, PMoD(floor=0.25)):
        zero = tiny(**batch).logits
    assert not torch.equal(first, zero)  # the trained routers act
    with pytest.raises(ConfigError, match=r"holds routers for layers \(1, 2, 3\).*these settings route layers \(2, 3\)"):
        vlmkit.apply(tiny, PMoD(start=0.5, routers=str(path)))
    with pytest.raises(ConfigError, match="safetensors"):
        save_routers(method, adapter_for(tiny), str(tmp_path / "routers.pt"))


def test_routers_for_another_model_are_refused_by_name(tmp_path):
    tiny, _ = model("llava")
    other, _ = model("llava", attn="eager")  # same architecture, separate weights
    method = PMoD()
    path = tmp_path / "routers.safetensors"
    save_routers(method, adapter_for(tiny), str(path))
    parameter = next(other.parameters())
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.add_(1.0)
    try:
        with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*another model"):
            vlmkit.apply(other, PMoD(routers=str(path)))
    finally:
        with torch.no_grad():
            parameter.copy_(saved)
    with pytest.raises(ConfigError, match="missing.safetensors' is neither a .safetensors file, a folder"):
        PMoD(routers=str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"router.weight": torch.zeros(2, 4)}, str(tmp_path / "other.safetensors"), metadata={"method": "gammamod"})
    with pytest.raises(ConfigError, match="not a pmod routers file .it holds 'gammamod'"):
        PMoD(routers=str(tmp_path / "other.safetensors"))


def test_a_schedule_that_keeps_or_routes_nothing_is_refused():
    tiny, _ = model("llava")  # 4 decoder layers: r_l = 1, 0.75, 0.25, 0
    with pytest.raises(ConfigError, match=r"keeps no visual token in layers \[3\] \(keep ratio 0\); raise floor"):
        vlmkit.apply(tiny, "pmod:floor=0.0")
    with pytest.raises(ConfigError, match="routes none of the 4 decoder layers; raise start"):
        vlmkit.apply(tiny, "pmod:start=0.0,floor=0.1,average=0.6")


def test_resting_tokens_have_no_kv_rows_in_their_layers():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    method = PMoD(floor=0.25)
    with torch.no_grad(), vlmkit.apply(tiny, method):
        cache = tiny(**batch, use_cache=True).past_key_values
    ratios = method.layer_ratios(len(cache.layers))
    for row in range(2):
        placeholders = batch["input_ids"][row] == tiny.config.image_token_id
        real = int(batch["attention_mask"][row].sum())
        visual = int(placeholders.sum())
        for index, layer in enumerate(cache.layers):
            cached = int(layer.layout.valid[row].sum())
            expected = real if ratios[index] is None else real - visual + int(visual * ratios[index])
            assert cached == expected, (row, index)
