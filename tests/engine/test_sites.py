"""Sites as the unit of installation: declarations checked at `apply`, the conflict rule of each site,
and the position, attention and cache sites on real forward passes (with small methods written
here), the engine handing calls no site acts on back to the stock forward, and masks built once
per key layout."""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, generate, inputs, model
from tests.engine.test_positions import rotary_positions
from vlmkit.adapters import adapter_for
from vlmkit.engine.runner import TextStackRunner
from vlmkit.engine.sites import SITES
from vlmkit.errors import ConfigError, ConflictError
from vlmkit.methods.base import AttentionMethod, CacheMethod, Method, MethodConfig, PositionMethod, Router
from vlmkit.registry import register_method


def local(cls, name: str, sites: tuple[str, ...]):
    """A method class with a name and sites, not registered (so the registry stays as shipped)."""
    return type(cls.__name__, (cls,), {"name": name, "sites": sites, "Config": MethodConfig})


class HalfVisualPositions(PositionMethod):
    """Visual tokens advance the position by 1/2 (a V2PE-like stride), text by 1."""

    def positions(self, context):
        positions = context.positions.expand(*context.valid.shape).clone().float()
        for row, visual in enumerate(context.visual):
            step = torch.ones(context.valid.shape[1])
            step[visual.slots] = 0.5
            step[~context.valid[row]] = 0
            positions[row] = torch.cumsum(step, 0) - 1
        return positions


class TextIgnoresTheImage(AttentionMethod):
    """Text queries may not attend to visual keys (visual tokens still attend to each other)."""

    def mask_function(self, context):
        visual = torch.zeros(context.key_slots.shape[0], int(context.key_slots.max()) + 2, dtype=torch.bool)
        for row, tokens in enumerate(context.visual or []):
            visual[row, tokens.slots] = True
        key_visual = visual.gather(1, context.key_slots.clamp(min=0))
        query_visual = visual.gather(1, context.query_slots.clamp(min=0))
        return lambda b, h, q, kv: query_visual[b, q] | ~key_visual[b, kv]


class EvictVisualKV(CacheMethod):
    """After the prefill, every layer drops the cached visual tokens of odd grid columns."""

    def edit_cache(self, context):
        if not context.prefill:
            return None
        keep = []
        for valid, slots in zip(context.valid, context.slots):
            drop = torch.zeros_like(valid)
            for row, tokens in enumerate(context.visual):
                odd = tokens.slots[tokens.col % 2 == 1]
                drop[row] = torch.isin(slots[row], odd)
            keep.append(valid & ~drop)
        return dict(enumerate(keep))


class EvictLeastAttendedVisual(CacheMethod):
    """Output-aware: after the prefill and after every step, each layer drops the cached visual token
    the call's last token attended to least there."""

    cache_needs = frozenset({"attention"})

    def __init__(self):
        super().__init__()
        self.seen = []

    def edit_cache(self, context):
        self.seen.append(context)
        keep = {}
        for index, (valid, slots, attention) in enumerate(zip(context.valid, context.slots, context.attention)):
            layer_keep = valid.clone()
            for row, tokens in enumerate(context.visual):
                candidates = valid[row] & torch.isin(slots[row], tokens.slots)
                if candidates.any():
                    scores = attention[row].masked_fill(~candidates, float("inf"))
                    layer_keep[row, int(scores.argmin())] = False
            keep[index] = layer_keep
        return keep


def test_output_aware_cache_edits_replay_in_a_recomputation():
    """A cache method that evicts at every step from the last token's attention: the attention it is
    shown at the prefill equals the eager model's, and recomputing the whole sequence at each step
    under `reuse_selections()` (the removed keys hidden from the queries after their removal) gives
    the cached generation's tokens."""
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with torch.no_grad():
        eager = tiny(**batch, output_attentions=True).attentions
    method = local(EvictLeastAttendedVisual, "evict_attended", ("cache",))()
    with vlmkit.apply(tiny, method) as patch:
        cached = generate(tiny, batch, max_new_tokens=5)
        prefill = method.seen[0]
        assert prefill.prefill and len(method.seen) >= 5
        for index, attention in enumerate(prefill.attention):
            for row in range(2):
                valid = batch["attention_mask"][row].bool()
                torch.testing.assert_close(attention[row][valid], eager[index][row, :, -1].mean(dim=0)[valid], rtol=1e-5, atol=1e-6)
        assert sum(len(removals) for removals in patch.state.evictions.values()) >= 5 * len(prefill.attention)
        with patch.reuse_selections():
            recomputed = generate(tiny, batch, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_declarations_are_checked_at_apply():
    tiny, _ = model("llava")
    with pytest.raises(ConfigError, match="declares no site"):
        vlmkit.apply(tiny, local(Method, "siteless", ())())
    with pytest.raises(ConfigError, match="declares site 'route' but does not implement it: a method there must be a Router"):
        vlmkit.apply(tiny, local(PositionMethod, "confused", ("route",))())
    with pytest.raises(ConfigError, match="declares site 'elsewhere', which is not one of vision, embeds, layer"):
        vlmkit.apply(tiny, local(Method, "lost", ("elsewhere",))())
    with pytest.raises(ConfigError, match="unknown site"):
        register_method("nowhere", family="prune", sites=("nowhere",))


def test_one_conflict_rule_per_site():
    tiny, _ = model("llava")
    assert {site.shared_by for site in SITES.values()} == {"many", "one", "one per layer"}
    first, second = local(HalfVisualPositions, "first", ("position",))(), local(HalfVisualPositions, "second", ("position",))()
    with pytest.raises(ConflictError, match="'first' and 'second' both claim the position site"):
        vlmkit.apply(tiny, first, second)
    with pytest.raises(ConflictError, match="both select tokens before decoder layer 0"):
        vlmkit.apply(tiny, "pool:keep=0.5", "divprune:keep=0.5")
    with pytest.raises(ConflictError, match="both claim the routing of decoder layer 3"):
        vlmkit.apply(tiny, "shortv:layers=(3,)", "mod:ratios=(1.0, 1.0, 1.0, 0.5)")
    with vlmkit.apply(tiny, "shortv:layers=(1,)", "mod:ratios=(1.0, 1.0, 0.5, 1.0)", "pool:keep=0.5", "fastv:layer=2"):
        pass  # different layers, different sites: they compose


def test_position_site_sets_float_positions_and_decoding_continues_after_them():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    method = local(HalfVisualPositions, "half", ("position",))()
    with torch.no_grad():
        plain = tiny(**batch).logits
    with vlmkit.apply(tiny, method) as patch:
        seen = rotary_positions(tiny, lambda: generate(tiny, batch, max_new_tokens=3))
        with torch.no_grad():
            assert not torch.equal(tiny(**batch).logits, plain)
        cached = generate(tiny, batch)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, use_cache=False), cached)
    prompt, steps = seen[0], [p for p in seen if p.shape[-1] == 1]
    valid = batch["attention_mask"].bool()
    for row in range(2):
        visual = batch["input_ids"][row] == tiny.config.image_token_id
        expected = torch.cumsum(torch.where(valid[row], torch.where(visual, 0.5, 1.0), 0.0), 0) - 1
        assert torch.equal(prompt[row][valid[row]], expected[valid[row]])
        last = float(expected[-1])
        assert [float(step[row, 0]) for step in steps] == [last + 1, last + 2]


def test_attention_site_masks_every_layer_with_sdpa_and_eager():
    results = {}
    for attn in ("sdpa", "eager"):
        tiny, processor = model("llava", attn)
        batch = inputs(processor, photos()[:2], QUESTIONS[:2])
        with vlmkit.apply(tiny, local(TextIgnoresTheImage, "blind", ("attention",))()) as patch:
            with torch.no_grad():
                logits = tiny(**batch).logits[:, -1]
            tokens = generate(tiny, batch)
            with patch.reuse_selections():
                assert torch.equal(generate(tiny, batch, use_cache=False), tokens)
        results[attn] = (logits, tokens)
        # text that cannot see the image answers as it would with other images
        other = inputs(processor, photos()[2:4], QUESTIONS[:2])
        with vlmkit.apply(tiny, local(TextIgnoresTheImage, "blind", ("attention",))()), torch.no_grad():
            torch.testing.assert_close(tiny(**other).logits[:, -1], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(results["sdpa"][1], results["eager"][1])


def test_cache_site_removes_slots_and_the_next_step_equals_masking_them():
    """After eviction the cache is shorter; the next step equals the same step over the full cache
    with the evicted slots masked out, computed here."""
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    with vlmkit.apply(tiny, local(EvictVisualKV, "evict", ("cache",))()), torch.no_grad():
        out = tiny(**batch, use_cache=True)
        cache = out.past_key_values
        physical = [layer.physical_length for layer in cache.layers]
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        position = torch.full_like(token, batch["input_ids"].shape[1])
        step = tiny(input_ids=token, attention_mask=mask, past_key_values=cache, position_ids=position, use_cache=True).logits[:, -1]
    with torch.no_grad():
        full = tiny(**batch, use_cache=True).past_key_values
        visual_odd = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        width = tiny.config.vision_config.image_size // tiny.config.vision_config.patch_size
        for row in range(2):
            positions = torch.nonzero(batch["input_ids"][row] == tiny.config.image_token_id).flatten()
            visual_odd[row, positions[torch.arange(len(positions)) % width % 2 == 1]] = True
        masked = batch["attention_mask"].masked_fill(visual_odd, 0)
        reference = tiny(input_ids=token, attention_mask=torch.cat([masked, torch.ones_like(token)], dim=1),
                         past_key_values=full, position_ids=position, use_cache=True).logits[:, -1]
    assert all(p < batch["input_ids"].shape[1] for p in physical)
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-4)


def test_calls_no_site_acts_on_go_to_the_stock_forward(monkeypatch):
    tiny, processor = model("llava")
    text_only = processor.tokenizer(["Hello there, how are you?"], return_tensors="pt")
    with torch.no_grad():
        plain = tiny(**text_only).logits
    ran = []
    original = TextStackRunner._original
    monkeypatch.setattr(TextStackRunner, "_original", lambda self, *a: ran.append(1) or original(self, *a))
    with vlmkit.apply(tiny, "fastv:keep=0.5"), torch.no_grad():
        assert torch.equal(tiny(**text_only).logits, plain)
        assert ran == [1]
        tiny(**inputs(processor, photos()[:1], QUESTIONS[:1]))
        assert ran == [1]  # a call with an image runs through the engine


def test_masks_are_built_once_per_key_layout(monkeypatch):
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    adapter = type(adapter_for(tiny))
    built = []
    original = adapter.mask
    monkeypatch.setattr(adapter, "mask", lambda self, *a, **k: built.append(1) or original(self, *a, **k))
    for spec, expected in (("pool:keep=0.5", 1), ("fastv:layer=2,keep=0.5", 2), ("mod:ratios=(1.0, 0.5, 1.0, 1.0)", 2)):
        built.clear()
        with vlmkit.apply(tiny, spec), torch.no_grad():
            tiny(**batch)
        assert len(built) == expected, spec


class WeightedHalf(Router):
    """Layer 1: the even visual tokens run it, every visual token carries a weight (p-MoD's STRing)."""

    def __init__(self, weight=None, step=0.01):
        super().__init__()
        self.weight, self.step = weight, step

    def routed_layers(self, num_layers):
        return (1,)

    def route(self, context):
        from vlmkit.engine.contexts import Route

        runs = [torch.arange(0, len(visual), 2) for visual in context.visual]
        if self.weight is None:
            return Route(runs)
        weights = [self.weight + self.step * torch.arange(len(visual), dtype=torch.float32) for visual in context.visual]
        return Route(runs, weights=weights)


def test_route_weights_scale_the_mlp_of_running_tokens_and_the_state_of_resting_ones():
    """STRing: a running token leaves the layer as x + attn + w * mlp, a resting one as w * x (checked on
    what the next layer receives, against the unweighted route and the layer's raw MLP outputs)."""
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    layers = adapter_for(tiny).decoder_layers
    seen = {}
    hooks = [
        layers[1].register_forward_pre_hook(lambda m, a, k: seen.update(x=k.get("hidden_states", a[0] if a else None)), with_kwargs=True),
        layers[2].register_forward_pre_hook(lambda m, a, k: seen.update(y=k.get("hidden_states", a[0] if a else None)), with_kwargs=True),
        layers[1].mlp.register_forward_hook(lambda m, a, out: seen.update(mlp=out)),  # before the engine's scaling
    ]
    runs = {}
    try:
        with torch.no_grad():
            for name, weight, step in (("plain", None, 0.0), ("ones", 1.0, 0.0), ("weighted", 0.5, 0.01)):
                with vlmkit.apply(tiny, local(WeightedHalf, "half", ("route",))(weight, step)) as patch:
                    logits = tiny(**batch).logits
                    runs[name] = (logits, {k: v.clone() for k, v in seen.items()}, patch.routes["half"][1])
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(runs["ones"][0], runs["plain"][0])  # weights of 1: the unweighted route, bit for bit
    (_, plain, running), (_, weighted, _) = runs["plain"], runs["weighted"]
    assert torch.equal(plain["x"], weighted["x"]) and torch.equal(plain["mlp"], weighted["mlp"])
    assert plain["x"].shape[1] < plain["y"].shape[1]  # layer 1 ran on a sub-stream
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        slots = torch.nonzero((batch["input_ids"][row] == tiny.config.image_token_id) & valid).flatten()
        w = 0.5 + 0.01 * torch.arange(len(slots), dtype=torch.float32)
        resting = torch.ones(len(slots), dtype=torch.bool)
        resting[running[row]] = False
        y_plain, y = plain["y"][row], weighted["y"][row]  # (the layer itself runs on text + running rows)
        torch.testing.assert_close(y[slots[resting]], w[resting, None] * y_plain[slots[resting]])  # w * x
        # running: y - y_plain = (w - 1) * mlp for that token's raw MLP output (found among the layer's rows)
        scaled = ~resting & ((w - 1).abs() > 1e-3)  # (a token of weight 1 is unchanged)
        difference = (y - y_plain)[slots[scaled]] / (w[scaled, None] - 1)
        raw = plain["mlp"][row]
        match = torch.cdist(difference, raw).min(dim=1).values
        assert float(match.max()) < 1e-3 * float(raw.norm(dim=-1).mean())
