"""Base classes every method builds on.

A method is configured by a frozen dataclass (`Config`) and implements only its algorithm. Token
methods (`TokenSelector`) look at the tokens the engine shows them and return a `Selection`; the
engine applies it (hidden states, masks, positions, KV cache, padding). See `vlmkit.engine`.
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

    from vlmkit.engine.selection import Selection, SelectionContext

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
        if self.keep is not None and not (isinstance(self.keep, (int, float)) and 0.0 < self.keep <= 1.0):
            raise ConfigError(f"keep={self.keep!r} is out of range: the kept share must be in (0, 1]")
        if self.tokens is not None and not (isinstance(self.tokens, int) and self.tokens >= 1):
            raise ConfigError(f"tokens={self.tokens!r} is out of range: the kept count must be an integer >= 1")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")

    def kept_count(self, available: int, default_keep: float) -> int:
        """How many of `available` tokens the budget keeps (a count is capped with a warning)."""
        if self.tokens is not None:
            if self.tokens > available:
                warnings.warn(
                    f"tokens={self.tokens} exceeds the {available} visual tokens available; keeping all {available}",
                    stacklevel=3,
                )
            return min(self.tokens, available)
        keep = default_keep if self.keep is None else self.keep
        return min(available, max(1, math.floor(keep * available + 0.5)))


class Method:
    """Base class of all methods. Subclasses set `Config`, `paper`, and are decorated with `register_method`."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    site: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig

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

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != f.default
        }
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


class TokenSelector(Method):
    """A method that keeps (and optionally merges) visual tokens at one point of the prefill.

    Subclasses implement `select(context) -> Selection`. `compaction_layer(num_layers)` says before which
    decoder layer the selection applies: 0 for pre-LLM methods (sites "vision" and "embeds").
    """

    #: what `select` needs the engine to compute, e.g. {"last_row_attention"} or {"vision_attention"}
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the paper's position policy, used for positions="auto" on 1-D rotary models
    natural_positions: ClassVar[str] = "reindex"

    def compaction_layer(self, num_layers: int) -> int:
        return 0

    def vision_layer(self, adapter) -> int:
        """The vision layer to probe, for methods that need "vision_attention"."""
        raise NotImplementedError

    def position_policy(self, mrope: bool) -> str:
        """The effective position policy: 'keep' or 'reindex'.

        Raises:
            ConfigError: 'reindex' under M-RoPE, where positions are 3-D grid coordinates.
        """
        policy = getattr(self.config, "positions", "auto")
        if policy == "auto":
            return "keep" if mrope else self.natural_positions
        if policy == "reindex" and mrope:
            raise ConfigError(
                f"{self.name}: positions='reindex' is defined for 1-D rotary positions only; M-RoPE (Qwen2-VL) "
                "keeps each token's 3-D grid position: use positions='keep' or 'auto'"
            )
        return policy

    def select(self, context: "SelectionContext") -> "Selection":
        raise NotImplementedError


def top_k_sorted(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in increasing index order (ties: lower index first)."""
    import torch

    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:count]).values
