"""Base classes every method builds on.

A method is configured by a frozen dataclass (`Config`) and implements only its algorithm, at the
engine sites it declares (`vlmkit.engine.sites`): token methods (`TokenSelector`) look at the
tokens the engine shows them and return a `Selection`; routers (`Router`) return which tokens run
a layer; position, attention and cache methods return positions, a mask function or the cache
slots to keep. The engine applies what they return (hidden states, masks, positions, KV cache,
padding). Decoding methods (site "logits") live in `vlmkit.methods.decode.base`.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from vlmkit.errors import ConfigError, UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    import torch

    from vlmkit.engine.contexts import (
        AttentionContext, CacheContext, GateContext, PositionContext, Route, RouteContext, TokenGate,
    )
    from vlmkit.engine.selection import Selection, SelectionContext

ROUNDINGS = ("half_up", "half_even")
POSITION_POLICIES = ("auto", "keep", "reindex")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; subclasses add fields with defaults and `metadata={"help": ...}`."""

    def __post_init__(self) -> None:  # subclasses call super().__post_init__() then check their own fields
        pass


@dataclass(frozen=True)
class TokenBudgetConfig(MethodConfig):
    """A visual-token budget, as a ratio (`keep`) or a count (`tokens`), plus the position policy."""

    keep: float | None = field(default=None, metadata={"help": "share of visual tokens kept, in (0, 1]"})
    tokens: int | None = field(default=None, metadata={"help": "number of visual tokens kept (per budget unit)"})
    positions: str = field(
        default="auto",
        metadata={
            "help": "position ids after pruning: 'keep' the original ids, 'reindex' the kept sequence, or 'auto' "
            "(the method's own policy; always 'keep' under 3-D M-RoPE)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None and self.tokens is not None:
            raise ConfigError(f"give a budget as keep={self.keep} or tokens={self.tokens}, not both")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))):
            raise ConfigError(f"keep={self.keep!r} must be a number in (0, 1] (the kept share), e.g. keep=0.25")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep={self.keep!r} is out of range: the kept share must be in (0, 1]")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1):
            raise ConfigError(f"tokens={self.tokens!r} is out of range: the kept count must be an integer >= 1")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")

    def kept_count(self, available: int, default_keep: float, rounding: str = "half_up") -> int:
        """How many of `available` tokens the budget keeps (a count is capped with a warning).

        A share becomes a count by `rounding`: "half_up" (floor(x + 0.5)) or "half_even" (Python's
        `round()`, for methods whose reference code uses it: `keep=0.03125` of 144 keeps 4, not 5).
        At least one token is kept.
        """
        if self.tokens is not None:
            if self.tokens > available:
                warnings.warn(
                    f"tokens={self.tokens} exceeds the {available} visual tokens available; keeping all {available}",
                    stacklevel=3,
                )
            return min(self.tokens, available)
        keep = default_keep if self.keep is None else self.keep
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={rounding!r} is not one of {', '.join(ROUNDINGS)}")
        count = round(keep * available) if rounding == "half_even" else math.floor(keep * available + 0.5)
        return min(available, max(1, count))


class Method:
    """Base class of all methods. Subclasses set `Config`, `paper`, and are decorated with `register_method`.

    Class attributes the engine and the invariant suite read:

    - `sites`: the engine sites the method acts at (`vlmkit.engine.sites.SITES`), set by `register_method`;
    - `neutral`: parameters (a spec's ``key=value`` list) under which the method must give the unpatched
      model's outputs bit for bit, or None when it has no neutral setting;
    - `example`: parameters under which it really acts (used by the tests and the docs);
    - `unsupported`: families it cannot run on, each with the reason `apply` gives.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    neutral: ClassVar[str | None] = None
    example: ClassVar[str] = ""
    unsupported: ClassVar[dict[str, str]] = {}
    #: the media whose tokens the method acts on; a video-only method leaves image prompts unchanged
    modalities: ClassVar[frozenset[str]] = frozenset({"image", "video"})

    def __init__(self, config: MethodConfig | None = None, **params: Any):
        if config is not None and params:
            raise ConfigError(f"{type(self).__name__}: pass a config object or keyword parameters, not both")
        if config is None:
            valid = [f.name for f in dataclasses.fields(self.Config)]
            for key in params:
                if key not in valid:
                    raise UnknownMethodError(
                        f"unknown parameter {key!r} for method {self.name!r}.{did_you_mean(key, valid)} "
                        f"Valid parameters: {', '.join(valid) or '(none)'}."
                    )
            config = self.Config(**params)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def params(self) -> dict[str, Any]:
        """The full parameter set (defaults included), as recorded in result files."""
        return dataclasses.asdict(self.config)

    def check_adapter(self, adapter) -> None:
        """Raise a `ConfigError` or `UnsupportedModelError` when the method's settings do not fit the
        model (called by `apply` before anything is installed; `unsupported` families are refused
        before this)."""

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != f.default
        }
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


class PositionPolicy:
    """The `positions` parameter of methods that remove tokens: 'keep', 'reindex' or 'auto'."""

    #: the paper's position policy, used for positions="auto" on 1-D rotary models
    natural_positions: ClassVar[str] = "reindex"

    def natural_positions_at(self, layer: int | None) -> str:
        """The paper's policy for a selection before decoder `layer` (None: any); a method that selects
        both before and inside the LLM may differ between the two."""
        return self.natural_positions

    def position_policy(self, mrope: bool, position_method: str | None = None, layer: int | None = None) -> str:
        """The effective position policy: 'keep' or 'reindex', for a selection before decoder `layer`.

        Under M-RoPE, or when a position method (`position_method`, its name) set the positions, the
        kept tokens keep theirs ('auto' is 'keep').

        Raises:
            ConfigError: 'reindex' under M-RoPE, where positions are 3-D grid coordinates, or with a
                position method, whose positions re-indexing would overwrite.
        """
        policy = getattr(self.config, "positions", "auto")
        if policy == "auto":
            return "keep" if mrope or position_method else self.natural_positions_at(layer)
        if policy == "reindex" and mrope:
            raise ConfigError(
                f"{self.name}: positions='reindex' is defined for 1-D rotary positions only; M-RoPE (Qwen2-VL) "
                "keeps each token's 3-D grid position: use positions='keep' or 'auto'"
            )
        if policy == "reindex" and position_method:
            raise ConfigError(
                f"{self.name}: positions='reindex' would overwrite the positions {position_method} sets; use "
                "positions='keep' or 'auto' (the kept tokens keep their positions)"
            )
        return policy


class TokenSelector(PositionPolicy, Method):
    """A method that keeps (and optionally merges) visual tokens before one or more decoder layers
    (sites "embeds" and "layer"; "vision" when it reads the vision tower).

    Subclasses implement `select(context) -> Selection`; `selection_layers(num_layers)` says before which
    decoder layers it selects (0: before the LLM), and the engine calls `select` at each of them.
    """

    #: what `select` needs the engine to compute: "last_row_attention", "text_attention", "keys"
    #: (from a decoder layer's attention), "embeds" (the LLM's input), "vision_attention",
    #: "vision_features" (from the vision tower)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: which decoder layer's attention a selection before layer K reads: "previous" (layer K-1, after
    #: it ran: FastV) or "own" (layer K's projections on its input, before it runs: PyramidDrop)
    attention_layer: ClassVar[str] = "previous"

    def selection_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)

    def vision_layer(self, adapter) -> int:
        """The vision layer to probe, for methods that need "vision_attention"."""
        raise NotImplementedError

    def extra_vision_layers(self, adapter) -> tuple[int, ...]:
        """Further vision layers whose importance the method reads, as probe entries "importance@<layer>"
        (VTC-CLS ensembles several layers); the layer numbers as returned here."""
        return ()

    def select(self, context: "SelectionContext") -> "Selection":
        raise NotImplementedError


class Router(Method):
    """A method that chooses, in some decoder layers, which visual tokens run the layer (site "route").

    Text tokens always run. `route(context)` returns a `Route`: per sample, the visual tokens that
    run the layer, and for the others one of two modes: "skip" (mixture-of-depths: no query, no key
    or value, no MLP; the token rides the residual) or "freeze" (ShortV: its key and value are still
    computed from its state so that other tokens attend to it, but it gets no query and no MLP).
    """

    #: what `route` needs the engine to compute: "attention" (the last token's attention to each
    #: visual token at the routed layer's input), "update" (each visual token's update norm in the
    #: previous layer) or "normed" (the layer's normalised input, for `route` and `gate`)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: whether `gate` also weighs every token's MLP output and lets generated tokens skip routed
    #: layers (gamma-MoD), in every call: prefill, decoding steps and recomputations
    gates_tokens: ClassVar[bool] = False

    def routed_layers(self, num_layers: int) -> tuple[int, ...]:
        raise NotImplementedError

    def route(self, context: "RouteContext") -> "Route":
        raise NotImplementedError

    def gate(self, context: "GateContext") -> "TokenGate":
        raise NotImplementedError


class PositionMethod(Method):
    """A method that sets the rotary positions of a call's tokens (site "position").

    `positions(context)` returns the positions of the call's tokens in the caller's layout, float
    allowed; the engine builds the rotary tables from them and continues decoding from the last
    prompt position plus one per new token.
    """

    def positions(self, context: "PositionContext") -> "torch.Tensor":
        raise NotImplementedError

    def rotary_tables(self, module, hidden: "torch.Tensor", positions: "torch.Tensor"):
        """(cos, sin) the rotary embedding `module` gives for `positions`, or None for its own.

        A method that changes how positions become rotations (frequency allocation) overrides this;
        the engine then routes every call of the model's rotary embedding through it, with or
        without visual tokens.
        """
        return None


class AttentionMethod(Method):
    """A method that restricts which keys each query may attend to (site "attention").

    `mask_function(context)` returns a function `(batch, head, query, key) -> bool` over the indices
    of one layer's queries and keys (as `transformers.masking_utils` mask functions), combined with
    the causal and padding mask for both SDPA and eager attention; None leaves the mask alone. A
    method that sets `replaces_causal` returns the whole structure instead (which earlier and later
    keys each query sees, e.g. from the key and query slots); the engine adds only padding.
    """

    replaces_causal: ClassVar[bool] = False

    def mask_function(self, context: "AttentionContext"):
        raise NotImplementedError


class CacheMethod(Method):
    """A method that edits the KV cache after the prefill and after decoding steps (site "cache").

    `edit_cache(context)` returns, per decoder layer, a (rows, slots) bool tensor of the cache slots
    to keep (or None to keep all); the engine removes the others from that layer's cache, and records
    the removals so that `Patch.reuse_selections()` recomputes the sequence with the same keys hidden
    from the same queries. A method that sets `per_head` may return for a layer a
    `vlmkit.engine.contexts.HeadEdit` instead: per KV head, the slots kept and merges into them
    (LOOK-M); the engine rewrites and packs the layer's cache per head and records the edit so that a
    recomputation shows the later queries the same edited entries.
    """

    #: what `edit_cache` needs the engine to compute: "attention" (each layer's attention from the
    #: call's last token to every cache slot), "head_attention" (each slot's attention received per
    #: KV head, accumulated over every query since the prefill)
    cache_needs: ClassVar[frozenset[str]] = frozenset()
    #: whether `edit_cache` returns per-head edits (`HeadEdit`); the context then carries `head_slots`,
    #: and no attention method (which masks keys by slot) may share the patch
    per_head: ClassVar[bool] = False

    @property
    def edits_while_decoding(self) -> bool:
        """Whether `edit_cache` may act after decoding steps; when not, the engine computes nothing for
        it (no attention rows, no scores) at those steps."""
        return True

    def edit_cache(self, context: "CacheContext") -> "dict[int, torch.Tensor] | None":
        raise NotImplementedError


def top_k_sorted(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in increasing index order (ties: lower index first)."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:count]).values


def layer_list(method: str, name: str, layers, minimum: int | None = None, reason: str = "") -> tuple[int, ...]:
    """`layers` as a sorted tuple of distinct ints (a single int is one layer), each >= `minimum` if given."""
    values = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
    try:
        values = tuple(values)
    except TypeError:
        raise ConfigError(f"{method}: {name}={layers!r} must be a list of decoder layer indices, e.g. {name}=(4, 5)") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{method}: {name}={layers!r} must hold integers (decoder layer indices)")
    if minimum is not None and any(v < minimum for v in values):
        raise ConfigError(f"{method}: {name}={layers!r} must be integers >= {minimum}" + (f" ({reason})" if reason else ""))
    if len(set(values)) != len(values):
        raise ConfigError(f"{method}: {name}={layers!r} names a layer twice")
    return tuple(sorted(values))


def scaled_layers(reference: tuple[int, ...], num_layers: int, reference_depth: int = 32) -> list[int]:
    """A reference model's stage layers (of `reference_depth` layers) scaled to `num_layers`:
    round(l * num_layers / reference_depth) with Python's rounding, clipped to 1..num_layers-1 (repeats kept)."""
    return [min(max(round(layer * num_layers / reference_depth), 1), num_layers - 1) for layer in reference]
