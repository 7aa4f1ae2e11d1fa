"""`vlmkit.apply(model, *specs) -> Patch`: install methods on one model instance, reversibly.

Specs are strings (``"fastv:layer=2,keep=0.25"``) or method objects (``vlmkit.methods.FastV(layer=2,
keep=0.25)``); several compose in one call. Every change to the model is recorded as an undo action
on the returned `Patch`: `remove()` (or leaving a ``with`` block) restores the instance exactly.
Nothing is patched at class level; two models in one process are independent.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vlmkit.adapters import ADAPTERS, adapter_for
from vlmkit.engine.install import build_plan, install, install_tower_merge
from vlmkit.engine.state import EngineState
from vlmkit.errors import ConfigError, ConflictError, UnsupportedModelError
from vlmkit.methods.base import Method
from vlmkit.registry import REGISTRY, list_methods

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
    """The undo log of the methods installed on one model instance.

    Installation lives in `vlmkit.engine.install`; every change it makes is recorded here, and
    `remove()` replays the undo actions in reverse.

    Attributes:
        model: the patched model.
        methods: the installed method objects, in the order given.
        adapter: the model family's adapter (None for a bare vision tower).
        state: the engine's per-instance state (selections, routes and cost of the last prefill).
    """

    def __init__(self, model: nn.Module, methods: list[Method], tower: bool = False):
        self.model = model
        self.methods = methods
        self.adapter = None if tower else adapter_for(model)
        self.state = EngineState({} if tower else self.adapter.placeholder_ids(), None if tower else self.adapter.join_runs)
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._removed = False

    # ----------------------------------------------------------------- public
    @property
    def selections(self) -> dict[str, list[torch.Tensor]]:
        """After each prefill: per method name, per sample, the indices (within that sample's visual
        tokens, in sequence order) of the tokens it kept (after its last stage, for a method that
        selects at several layers)."""
        return self.state.selections

    @property
    def stage_selections(self) -> dict[str, dict[int, list[torch.Tensor]]]:
        """After each prefill: per method name, per decoder layer it selected before, per sample, the
        indices of the tokens it kept there."""
        return self.state.stage_selections

    @property
    def routes(self) -> dict[str, dict[int, list[torch.Tensor]]]:
        """After each prefill: per router name, per routed layer, per sample, the indices of the visual
        tokens that ran the layer."""
        return self.state.routes

    @property
    def cost(self) -> dict[str, list[float]]:
        """What the last prefill cost, counted by the engine from what ran: ``"llm_flops"`` (decoder
        FLOPs) and ``"kv_bytes"`` (KV-cache bytes it left), one number per sample. Empty until a
        prefill with visual tokens ran through the engine."""
        return self.state.cost

    @property
    def hooks(self) -> list[str]:
        """Names of the installed hooks, ``"<method>:<site>[:<layer>]"``."""
        return [name for name, _ in self._undo]

    @contextlib.contextmanager
    def reuse_selections(self) -> Iterator[None]:
        """Within this block, every prefill reuses the selections and routes recorded by the last prefill.

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

    # ----------------------------------------------------------------- the undo log
    def _record(self, name: str, undo: Callable[[], None]) -> None:
        self._undo.append((name, undo))

    def _set_instance_attr(self, name: str, module: nn.Module, attr: str, value: Any) -> None:
        """Shadow a class attribute (e.g. `forward`) on one instance; undo deletes the shadow."""
        if attr in module.__dict__:
            raise ConflictError(f"{type(module).__name__}.{attr} is already overridden on this instance")
        setattr(module, attr, value)
        self._record(name, lambda: delattr(module, attr))


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
    if _is_bare_tower(model):
        return _apply_to_tower(model, methods)
    patch = Patch(model, methods)
    plan = build_plan(methods, patch.adapter, tuple(adapter.family for adapter in ADAPTERS))
    install(patch, plan)
    _install_copy_guard(patch, plan)
    _PATCHED[model] = patch
    return patch


def _is_bare_tower(model: nn.Module) -> bool:
    """Whether `model` is a vision tower alone (transformers CLIP/SigLIP vision model, timm or open_clip ViT)."""
    from vlmkit.adapters.towers import find_layout

    try:
        adapter_for(model)
        return False
    except UnsupportedModelError:
        try:
            find_layout(model)
        except (UnsupportedModelError, TypeError):
            return False
        return True


def _apply_to_tower(model: nn.Module, methods: list[Method]) -> Patch:
    """Install tower methods (ToMe) on a bare vision tower."""
    towers = sorted(info.name for info in list_methods() if info.family == "merge")
    for method in methods:
        if not hasattr(method, "tower_schedule"):
            raise UnsupportedModelError(
                f"{method.name} acts on a vision-language model; on a bare vision tower ({type(model).__name__}) "
                f"vlmkit applies: {', '.join(towers)}"
            )
    patch = Patch(model, methods, tower=True)
    try:
        for method in methods:
            install_tower_merge(patch, method, model)
    except BaseException:
        patch.remove()
        raise
    _PATCHED[model] = patch
    return patch


def patch_of(model: nn.Module) -> Patch | None:
    """The vlmkit patch installed on `model`, or None."""
    return _PATCHED.get(model)


def _install_copy_guard(patch: Patch, plan) -> None:
    """`copy.deepcopy` of the patched model gives an independent copy with its own patch.

    Hooks and instance overrides are closures bound to this instance: copied as they are, the
    copy would compute with the original's weights. The copy is made from the unpatched model
    (this patch's changes are undone for the copy and installed again, the same way), and the same
    methods are applied to it: `patch_of(copy)` returns its patch.
    """
    model = patch.model

    def deepcopy_with_own_patch(memo):
        undo, patch._undo = patch._undo, []
        for _, action in reversed(undo):
            action()
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            install(patch, plan)
            _install_copy_guard(patch, plan)
        apply(clone, *[copy.deepcopy(method) for method in patch.methods])
        return clone

    patch._set_instance_attr("engine:copy", model, "__deepcopy__", deepcopy_with_own_patch)
