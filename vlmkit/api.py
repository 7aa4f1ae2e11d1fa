"""`vlmkit.apply(model, *specs) -> Patch`: install methods on one model instance, reversibly.

Specs are strings (``"fastv:layer=2,keep=0.25"``) or method objects (``vlmkit.methods.FastV(layer=2,
keep=0.25)``); several compose in one call. Every change to the model is recorded as an undo action
on the returned `Patch`: `remove()` (or leaving a ``with`` block) restores the instance exactly.
Nothing is patched at class level; two models in one process are independent.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vlmkit.adapters import adapter_for
from vlmkit.engine import branches
from vlmkit.engine.runner import TextStackRunner
from vlmkit.engine.state import EngineState
from vlmkit.errors import ConfigError, ConflictError, UnknownMethodError
from vlmkit.methods.base import Method, TokenSelector
from vlmkit.methods.decode.base import DecodeMethod
from vlmkit.registry import REGISTRY

_PATCHED: "weakref.WeakKeyDictionary[nn.Module, Patch]" = weakref.WeakKeyDictionary()


def parse_spec(spec: str | Method) -> Method:
    """Turn ``"name:key=value,key=value"`` (or a method object) into a method object.

    Values are Python literals (numbers, strings, True/False/None, tuples); anything else is taken
    as a plain string. Nothing is evaluated.

    Example:
        >>> parse_spec("fastv:layer=2,keep=0.25")
        FastV(layer=2, keep=0.25)
    """
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a method spec is a string like 'fastv:keep=0.25' or a method object, got {type(spec).__name__}")
    name, _, arguments = spec.strip().partition(":")
    cls = REGISTRY.get(name.strip())
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_top_level(arguments))):
        key, equals, raw = item.partition("=")
        if not equals:
            raise ConfigError(f"in spec {spec!r}: {item!r} is not key=value")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        params[key.strip()] = value
    return cls(**params)


def _split_top_level(arguments: str) -> list[str]:
    """Split ``key=value`` items on the commas outside brackets and quotes (tuple values keep theirs)."""
    items, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(arguments):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(arguments[start:index])
            start = index + 1
    items.append(arguments[start:])
    return items


class Patch:
    """The methods installed on one model instance, and how to undo every change.

    Attributes:
        model: the patched model.
        methods: the installed method objects, in the order given.
    """

    def __init__(self, model: nn.Module, methods: list[Method]):
        self.model = model
        self.methods = methods
        self.adapter = adapter_for(model)
        self.state = EngineState(self.adapter.placeholder_ids())
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._removed = False

    # ----------------------------------------------------------------- public
    @property
    def selections(self) -> dict[str, list[torch.Tensor]]:
        """After each prefill: per method name, per sample, the indices (within that sample's visual
        tokens, in sequence order) of the tokens it kept."""
        return self.state.selections

    @property
    def hooks(self) -> list[str]:
        """Names of the installed hooks, ``"<method>:<site>[:<layer>]"``."""
        return [name for name, _ in self._undo]

    @contextlib.contextmanager
    def reuse_selections(self) -> Iterator[None]:
        """Within this block, every prefill reuses the selections recorded by the last prefill.

        This is how a full recomputation of the sequence (no KV cache) is run "with the same
        selection" as a cached generation.
        """
        self.state.reuse = True
        try:
            yield
        finally:
            self.state.reuse = False

    def remove(self) -> None:
        """Undo every change, in reverse order. Idempotent."""
        if self._removed:
            return
        while self._undo:
            _, undo = self._undo.pop()
            undo()
        self.state.clear()
        self._removed = True
        if _PATCHED.get(self.model) is self:
            del _PATCHED[self.model]

    unload = remove  # PEFT's name for the same thing

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ", ".join(self.hooks)
        return f"Patch({type(self.model).__name__}: {state})"

    # ----------------------------------------------------------------- installation
    def _record(self, name: str, undo: Callable[[], None]) -> None:
        self._undo.append((name, undo))

    def _set_instance_attr(self, name: str, module: nn.Module, attr: str, value: Any) -> None:
        """Shadow a class attribute (e.g. `forward`) on one instance; undo deletes the shadow."""
        if attr in module.__dict__:
            raise ConflictError(f"{type(module).__name__}.{attr} is already overridden on this instance")
        setattr(module, attr, value)
        self._record(name, lambda: delattr(module, attr))

    def install(self) -> None:
        selectors = [m for m in self.methods if isinstance(m, TokenSelector)]
        for method in self.methods:
            check = getattr(method, "check_adapter", None)
            if check is not None:
                check(self.adapter)
        runner = TextStackRunner(self.adapter, self.state, selectors) if selectors else None
        vision_layers = sorted({s.vision_layer(self.adapter) for s in selectors if "vision_attention" in s.needs})
        for layer in vision_layers:
            if not -len(self.adapter.vision_layers) <= layer < len(self.adapter.vision_layers):
                raise ConfigError(
                    f"vision_layer={layer} is out of range for a vision tower with {len(self.adapter.vision_layers)} layers"
                )
        # -- validation done: mutate from here on
        try:
            if runner is not None:
                self._install_visual_tracking(vision_layers)
                names = ",".join(s.name for s in selectors)
                self._set_instance_attr(f"{names}:layer", self.adapter.text_model, "forward", runner.bind())
            for method in self.methods:
                if isinstance(method, DecodeMethod):
                    branches.install(self, method)
        except BaseException:
            self.remove()
            raise

    def _install_visual_tracking(self, vision_layers: list[int]) -> None:
        state, adapter = self.state, self.adapter
        base = adapter.base_model

        def stash_inputs(module, args, kwargs):
            encoded = kwargs.get("mm_encoder_outputs") or {}
            sources = {}
            for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
                if kwargs.get(pixels) is not None:
                    sources[modality] = None
                elif encoded.get(modality) is not None:
                    sources[modality] = encoded[modality]
            state.begin_call(kwargs.get("input_ids", args[0] if args else None), sources)
            return None

        handle = base.register_forward_pre_hook(stash_inputs, with_kwargs=True)
        self._record("engine:embeds", handle.remove)

        probes: list[dict[str, torch.Tensor]] = []
        active = {"on": False}
        for layer in vision_layers:
            attention = adapter.vision_attention(layer)

            def probe(module, args, kwargs, _layer=layer):
                if active["on"]:
                    hidden = kwargs.get("hidden_states", args[0] if args else None)
                    probes.append(adapter.vision_probe(module, hidden, kwargs))
                return None

            handle = attention.register_forward_pre_hook(probe, with_kwargs=True)
            self._record(f"engine:vision:{layer}", handle.remove)

        for modality, function_name in adapter.feature_functions().items():
            original = getattr(base, function_name, None)
            if original is None:
                continue
            signature = inspect.signature(original)

            def encode(*args, _original=original, _modality=modality, _signature=signature, **kwargs):
                probes.clear()
                active["on"] = True
                try:
                    output = _original(*args, **kwargs)
                finally:
                    active["on"] = False
                call = _signature.bind_partial(*args, **kwargs).arguments
                state.encoded_by_us(_modality, output, adapter.visual_metas(_modality, call, output, list(probes) or None))
                probes.clear()
                return output

            self._set_instance_attr("engine:vision", base, function_name, functools.wraps(original)(encode))


def apply(model: nn.Module, *specs: str | Method) -> Patch:
    """Install methods on `model` (this instance only) and return the `Patch` that undoes them.

    Args:
        model: a supported Hugging Face VLM (see `vlmkit.adapters.SUPPORTED`).
        *specs: method specs, e.g. ``"visionzip:tokens=64"``, ``"fastv:layer=2,keep=0.25"``, or
            method objects. Several compose in one call.

    Returns:
        The `Patch`; use `patch.remove()` or ``with vlmkit.apply(...):`` to restore the model.

    Raises:
        UnknownMethodError: a method or parameter name is not known (the message lists valid ones).
        ConfigError: a parameter value is out of range.
        UnsupportedModelError: no adapter knows the model class.
        ConflictError: the model is already patched, a method is given twice, or two methods claim
            one site incompatibly.

    Example:
        >>> patch = vlmkit.apply(model, "visionzip:tokens=32", "fastv:layer=2,keep=0.5")  # doctest: +SKIP
        >>> model.generate(**inputs)                                                    # doctest: +SKIP
        >>> patch.remove()                                                              # doctest: +SKIP
    """
    if not specs:
        raise ConfigError("vlmkit.apply() needs at least one method spec, e.g. 'fastv:keep=0.5'")
    methods = [parse_spec(spec) for spec in specs]
    if model in _PATCHED:
        raise ConflictError(
            f"this model already has a vlmkit patch ({_PATCHED[model]!r}); call .remove() on it first, "
            "or give all methods to one vlmkit.apply() call"
        )
    seen: dict[str, Method] = {}
    for method in methods:
        if method.name in seen:
            raise ConflictError(f"method {method.name!r} is applied twice; give it once with the parameters you want")
        seen[method.name] = method
    patch = Patch(model, methods)
    _check_sites(patch)
    patch.install()
    _PATCHED[model] = patch
    return patch


def _check_sites(patch: Patch) -> None:
    layers: dict[int, Method] = {}
    decoder: Method | None = None
    num_layers = len(patch.adapter.decoder_layers)
    for method in patch.methods:
        if isinstance(method, DecodeMethod):
            if decoder is not None:
                raise ConflictError(
                    f"{decoder.name!r} and {method.name!r} both claim the logits site; apply one decoding method "
                    "(ritual combines with VCD through its alpha_neg parameter)"
                )
            decoder = method
        elif isinstance(method, TokenSelector):
            layer = method.compaction_layer(num_layers)
            if layer in layers:
                raise ConflictError(
                    f"{layers[layer].name!r} and {method.name!r} both select tokens before decoder layer {layer}; "
                    "a layer takes one selection: move one of them (e.g. fastv:layer=...) or drop one"
                )
            layers[layer] = method
        elif not isinstance(method, Method):
            raise UnknownMethodError(f"{method!r} is not a vlmkit method")
