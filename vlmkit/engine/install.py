"""Installing methods by site: the plan (what acts where, checked against the site table) and the
hooks that carry it out on one model instance.

`build_plan` validates everything before the first mutation: each method's sites against
`SITES`, its layers against the model's depth, its families, and the one conflict rule of each
site. `install` then records every change in the patch's undo log: the base model's pre-hook that
stashes each call's inputs, the wrapped feature functions that record where each visual token
came from (and the vision probes), the text-stack runner in place of the text model's `forward`,
and the decoding branches.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vlmkit.adapters.base import concat_probes
from vlmkit.engine import branches
from vlmkit.engine.runner import TextStackRunner
from vlmkit.engine.selection import ATTENTION_NEEDS
from vlmkit.engine.sites import SITES, STACK_SITES
from vlmkit.errors import ConfigError, ConflictError, UnsupportedModelError
from vlmkit.methods.base import AttentionMethod, CacheMethod, Method, PositionMethod, Router, TokenSelector
from vlmkit.methods.decode.base import DecodeMethod

if TYPE_CHECKING:
    from vlmkit.adapters.base import Adapter
    from vlmkit.api import Patch

#: the class a method must derive from to act at each site
_HANDLERS: dict[str, type] = {
    "vision": TokenSelector,
    "embeds": TokenSelector,
    "layer": TokenSelector,
    "route": Router,
    "position": PositionMethod,
    "attention": AttentionMethod,
    "cache": CacheMethod,
    "logits": DecodeMethod,
}


@dataclass
class Plan:
    """What acts where, for one patch.

    Attributes:
        selectors: decoder layer -> the selector that selects before it (0: before the LLM).
        routers: decoder layer -> the router that routes it.
        position, attention, cache, decoder: the method at that site, if any.
        vision_layers: vision-tower layers to probe.
        vision_primary: the layer whose probe gives "importance" and "keys" (the others give
            "importance@<layer>").
        vision_features: whether a method reads the vision features the projector receives.
        vision_marginals: whether a method reads the patch-to-patch attention map's marginals
            ("received", "paid"), at the probed layers.
        vision_full_keys: whether a method reads every head's keys side by side ("full_keys").
        vision_merge: the method that merges tokens inside the vision tower (ToMe), if any.
    """

    selectors: dict[int, TokenSelector] = field(default_factory=dict)
    vision_merge: TokenSelector | None = None
    routers: dict[int, Router] = field(default_factory=dict)
    position: PositionMethod | None = None
    attention: AttentionMethod | None = None
    cache: CacheMethod | None = None
    decoder: DecodeMethod | None = None
    vision_layers: list[int] = field(default_factory=list)
    vision_primary: int | None = None
    vision_features: bool = False
    vision_marginals: bool = False
    vision_full_keys: bool = False

    @property
    def stack(self) -> bool:
        """Whether a method acts on the decoder stack (the runner is needed)."""
        return bool(self.selectors or self.routers or self.position or self.attention or self.cache)


def build_plan(methods: list[Method], adapter: "Adapter", supported_families: tuple[str, ...]) -> Plan:
    """Check `methods` against the site table and the model; return the plan. Mutates nothing.

    Raises:
        ConfigError: a method declares no site, an unknown one, a site its class does not implement,
            or a layer out of range.
        UnsupportedModelError: a method cannot run on the model's family.
        ConflictError: two methods claim a site that takes one (per patch, or per layer).
    """
    plan = Plan()
    num_layers = len(adapter.decoder_layers)
    claims: dict[tuple, Method] = {}

    def claim(site: str, key: int | None, method: Method) -> None:
        other = claims.setdefault((site, key), method)
        if other is method:
            return
        if site in ("embeds", "layer"):
            raise ConflictError(
                f"{other.name!r} and {method.name!r} both select tokens before decoder layer {key}; a layer takes "
                "one selection: move one of them (e.g. fastv:layer=...) or drop one"
            )
        if site == "route":
            raise ConflictError(f"{other.name!r} and {method.name!r} both claim the routing of decoder layer {key}; "
                                "route each layer with one method")
        hint = " (ritual combines with VCD through its alpha_neg parameter)" if site == "logits" else ""
        raise ConflictError(f"{other.name!r} and {method.name!r} both claim the {site} site; apply one of them{hint}")

    def in_range(method: Method, what: str, layers: tuple[int, ...]) -> tuple[int, ...]:
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ConfigError(
                    f"{method.name}: {what}={layer!r} is out of range for a language model with {num_layers} decoder "
                    f"layers (valid: 0..{num_layers - 1})"
                )
        return layers

    for method in methods:
        if not isinstance(method, Method):
            raise ConfigError(f"{method!r} is not a vlmkit method")
        sites = tuple(method.sites)
        if not sites:
            raise ConfigError(f"{type(method).__name__} declares no site; register it with sites=(...) of {', '.join(SITES)}")
        for site in sites:
            if site not in SITES:
                raise ConfigError(f"{method.name} declares site {site!r}, which is not one of {', '.join(SITES)}")
            if not isinstance(method, _HANDLERS[site]):
                raise ConfigError(
                    f"{method.name} declares site {site!r} but does not implement it: a method there must be a "
                    f"{_HANDLERS[site].__name__} ({SITES[site].implements})"
                )
        if adapter.family in method.unsupported:
            supported = [family for family in supported_families if family not in method.unsupported]
            raise UnsupportedModelError(
                f"{method.name} does not support {adapter.family}: {method.unsupported[adapter.family]}. "
                f"It runs on: {', '.join(supported)}"
            )
        method.check_adapter(adapter)
        if isinstance(method, TokenSelector) and {"embeds", "layer"} & set(sites):
            method.position_policy(adapter.mrope)  # raises for an undefined policy
            layers = in_range(method, "layer", tuple(method.selection_layers(num_layers)))
            for layer in layers:
                if layer == 0 and "embeds" not in sites or layer > 0 and "layer" not in sites:
                    raise ConfigError(f"{method.name} selects before decoder layer {layer} but does not declare the "
                                      f"{'embeds' if layer == 0 else 'layer'} site")
                reads_previous = bool(ATTENTION_NEEDS & method.needs) and method.attention_layer == "previous"
                if layer == 0 and reads_previous and max(layers) == 0:
                    raise ConfigError(f"{method.name}: last-token attention needs a layer before the selection: use layer >= 1")
                claim("layer", layer, method)
                plan.selectors[layer] = method
        if "vision" in sites and "vision_attention" in method.needs:
            count = len(adapter.vision_layers)
            primary = method.vision_layer(adapter)
            for layer in (primary, *method.extra_vision_layers(adapter)):
                if not isinstance(layer, int) or not -count <= layer < count:
                    raise ConfigError(f"{method.name}: vision_layer={layer!r} is out of range for a vision tower with {count} layers")
                if layer not in plan.vision_layers:
                    plan.vision_layers.append(layer)
            plan.vision_primary = primary
        if "vision" in sites and "vision_features" in method.needs:
            plan.vision_features = True
        if "vision" in sites and "vision_marginals" in method.needs:
            plan.vision_marginals = True
        if "vision" in sites and "vision_full_keys" in method.needs:
            plan.vision_full_keys = True
        if "vision" in sites and "vision_merge" in method.needs:
            claim("vision", "merge", method)
            plan.vision_merge = method
        if "route" in sites:
            for layer in in_range(method, "layer", tuple(method.routed_layers(num_layers))):
                claim("route", layer, method)
                plan.routers[layer] = method
        for site, attribute in (("position", "position"), ("attention", "attention"), ("cache", "cache"), ("logits", "decoder")):
            if site in sites:
                claim(site, None, method)
                setattr(plan, attribute, method)
    if plan.cache is not None and plan.cache.per_head and plan.attention is not None:
        raise ConflictError(
            f"{plan.cache.name!r} edits the KV cache per head, so a cache slot no longer names one token for "
            f"every head, and {plan.attention.name!r} masks keys by slot; apply one of them"
        )
    if plan.position is not None:
        for selector in dict.fromkeys(plan.selectors.values()):
            selector.position_policy(adapter.mrope, plan.position.name)
    plan.vision_layers.sort()
    return plan


def install(patch: "Patch", plan: Plan) -> None:
    """Carry out `plan` on `patch.model`, recording every change in the patch's undo log.

    On any error, whatever was installed is undone before the error propagates.
    """
    try:
        if plan.stack:
            _install_visual_tracking(patch, plan)
            runner = TextStackRunner(patch.adapter, patch.state, plan)
            names = ",".join(dict.fromkeys(m.name for m in patch.methods if STACK_SITES & set(m.sites)))
            patch._set_instance_attr(f"{names}:stack", patch.adapter.text_model, "forward", runner.bind())
        if plan.position is not None and type(plan.position).rotary_tables is not PositionMethod.rotary_tables:
            _install_rotary_tables(patch, plan.position)
        if plan.decoder is not None:
            branches.install(patch, plan.decoder)
    except BaseException:
        patch.remove()
        raise


def _install_rotary_tables(patch: "Patch", method: PositionMethod) -> None:
    """Every call of the text model's rotary embedding returns the position method's tables."""

    def tables(module, args, output):
        replaced = method.rotary_tables(module, args[0], args[1])
        return output if replaced is None else replaced

    handle = patch.adapter.rotary_module.register_forward_hook(tables)
    patch._record(f"{method.name}:rotary", handle.remove)


def _install_visual_tracking(patch: "Patch", plan: Plan) -> None:
    state, adapter = patch.state, patch.adapter
    base = adapter.base_model

    def stash_inputs(module, args, kwargs):
        encoded = kwargs.get("mm_encoder_outputs") or {}
        sources = {}
        for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if kwargs.get(pixels) is not None:
                sources[modality] = None
            elif encoded.get(modality) is not None:
                sources[modality] = encoded[modality]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None and kwargs.get("inputs_embeds") is not None and not _continues_a_cache(kwargs):
            raise ConfigError(
                "this model is patched by vlmkit, which finds each image's tokens from input_ids: pass input_ids "
                "(with pixel_values) instead of inputs_embeds"
            )
        state.begin_call(input_ids, sources, {name: kwargs.get(name) for name in ("attention_mask", "token_type_ids")})
        return None

    handle = base.register_forward_pre_hook(stash_inputs, with_kwargs=True)
    patch._record("engine:embeds", handle.remove)

    probes: dict[int, list[dict[str, torch.Tensor]]] = {layer: [] for layer in plan.vision_layers}
    active = {"on": False}
    for layer in plan.vision_layers:
        attention = adapter.vision_attention(layer)

        def probe(module, args, kwargs, _layer=layer):
            if active["on"]:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                probe = adapter.vision_probe(module, hidden, kwargs)
                if plan.vision_marginals:
                    probe.update(adapter.vision_marginals(module, hidden, kwargs) or {})
                if plan.vision_full_keys:
                    probe.update(adapter.vision_full_keys(module, hidden, kwargs) or {})
                probes[_layer].append(probe)
            return None

        handle = attention.register_forward_pre_hook(probe, with_kwargs=True)
        patch._record(f"engine:vision:{layer}", handle.remove)

    projected: list[torch.Tensor] = []
    if plan.vision_features and adapter.projector is not None:

        def record_features(module, args, kwargs):
            if active["on"]:
                projected.append(kwargs.get("image_features", args[0] if args else None))
            return None

        handle = adapter.projector.register_forward_pre_hook(record_features, with_kwargs=True)
        patch._record("engine:vision:features", handle.remove)

    merged = _install_vision_merge(patch, plan, active)

    def forget() -> None:
        projected.clear()
        merged.clear()
        for found in probes.values():
            found.clear()

    for modality, function_name in adapter.feature_functions().items():
        original = getattr(base, function_name, None)
        if original is None:
            continue
        signature = inspect.signature(original)

        def encode(*args, _original=original, _modality=modality, _signature=signature, **kwargs):
            if active["on"]:  # called by another encoder function (Qwen3-VL encodes videos through the image one)
                return _original(*args, **kwargs)
            forget()
            active["on"] = True
            try:
                output = _original(*args, **kwargs)
            finally:
                active["on"] = False
            call = _signature.bind_partial(*args, **kwargs).arguments
            recorded = _joined_probes(probes, plan.vision_primary)
            if projected:
                recorded = adapter.with_features(recorded, projected, call)
            if merged:
                recorded = [{**(recorded[0] if recorded else {}), "representative": torch.cat(merged)}]
            state.encoded_by_us(_modality, output, adapter.visual_metas(_modality, call, output, recorded or None))
            forget()
            return output

        patch._set_instance_attr("engine:vision", base, function_name, functools.wraps(original)(encode))


def install_tower_merge(patch: "Patch", method, tower: torch.nn.Module, last_block: int | None = None):
    """Install a tower-merging method (ToMe) on `tower`, recorded in the patch; the method keeps the
    handle (`method.handle`, whose `state` is the last forward's sizes and sources)."""
    from vlmkit.adapters.towers import find_layout
    from vlmkit.towers.tome import install_tome

    num_blocks = len(find_layout(tower).blocks)
    if hasattr(method, "install_tower"):  # a method with its own tower merge (DyMU's thresholds)
        method.handle = method.install_tower(tower, num_blocks, last_block)
        patch._record(f"{method.name}:vision", method.handle.remove)
        return method.handle
    config = method.config
    schedule = method.tower_schedule(num_blocks, last_block)
    method.handle = install_tome(tower, schedule, protect_cls=config.protect_cls, proportional=config.proportional)
    patch._record(f"{method.name}:vision", method.handle.remove)
    return method.handle


def _install_vision_merge(patch: "Patch", plan: Plan, active: dict) -> list[torch.Tensor]:
    """Merge inside the vision tower, and give the model its outputs on the patch grid (each patch
    carrying the token that holds it); returns the list that collects, per tower call while a feature
    function runs, which patches stand for their merged token at the layer the projector reads."""
    from vlmkit.towers.tome import representatives, unmerge

    found: list[torch.Tensor] = []
    method = plan.vision_merge
    if method is None:
        return found
    read = patch.adapter.default_vision_layer()
    handle = install_tower_merge(patch, method, patch.adapter.vision_tower, read)

    def on_the_grid(module, args, kwargs, output):
        history = handle.state.history
        if not history:
            return output
        if output.hidden_states is not None:
            output.hidden_states = (output.hidden_states[0],) + tuple(
                None if hidden is None else unmerge(hidden, tokens) for hidden, tokens in zip(output.hidden_states[1:], history)
            )
        output.last_hidden_state = unmerge(output.last_hidden_state, history[-1])
        if active["on"]:
            found.append(representatives(history[read]).float())
        return output

    hook = patch.adapter.vision_tower.register_forward_hook(on_the_grid, with_kwargs=True)
    patch._record(f"{method.name}:vision:grid", hook.remove)
    return found


def _joined_probes(probes: dict[int, list[dict[str, torch.Tensor]]], primary: int | None) -> list[dict[str, torch.Tensor]]:
    """One encoder call's probes as one: the primary layer's entries, plus "importance@<layer>" of the others."""
    if primary is None or not probes.get(primary):
        return []
    joined = concat_probes(probes[primary])
    for layer, found in probes.items():
        if layer != primary and found:
            joined[f"importance@{layer}"] = concat_probes(found)["importance"]
    return [joined]


def _continues_a_cache(kwargs: dict) -> bool:
    """Whether a forward continues a filled KV cache (a decoding step, where embeddings are fine)."""
    cache = kwargs.get("past_key_values")
    return cache is not None and cache.get_seq_length() > 0
