"""What every decoding method (site ``logits``) shares.

A `DecodeMethod` names the extra inputs it contrasts with (`branches`) and the early-exit layers
it reads (`layers`), and combines them with the main rows' scores at each step (`combine`). The
engine (`vlmkit.engine.branches`) runs the branches beside the main rows of any `generate()` call
and calls `combine` from a `LogitsProcessor` placed first in generate()'s list, so temperature,
top-k/top-p and repetition penalties act on the combined logits.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.base import Method, MethodConfig

if TYPE_CHECKING:
    from vlmkit.engine.branches import CallInputs, Step

BRANCH_PRUNING = ("same", "none")


def check_range(method: str, name: str, value, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    """ConfigError unless `low <= value` (or `<` when `low_open`) and `value <= high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{method}: {name}={value!r} must be a number")
    below = value <= low if low_open else value < low
    if below or (high is not None and value > high):
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        raise ConfigError(f"{method}: {name}={value!r} is out of range; valid values are in {interval}")


@dataclass(frozen=True)
class BranchConfig(MethodConfig):
    """Fields of every method that runs extra branches."""

    branch_pruning: str = field(
        default="same",
        metadata={
            "help": "'same': the branches get the visual-token selection and positions of the main rows; "
            "'none': the branches see every visual token"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.branch_pruning not in BRANCH_PRUNING:
            raise ConfigError(
                f"branch_pruning={self.branch_pruning!r} is not one of {', '.join(map(repr, BRANCH_PRUNING))}"
            )


class DecodeMethod(Method):
    """Base class of decoding methods: extra branches and/or early-exit layers, combined per step."""

    #: what the method supports; checked when generate() starts
    supports_beam: ClassVar[bool] = True
    supports_sampling: ClassVar[bool] = True
    supports_batch: ClassVar[bool] = True

    @property
    def prune_branches(self) -> bool:
        """Whether branches replay the main rows' token selection (`branch_pruning="same"`)."""
        return getattr(self.config, "branch_pruning", "same") == "same"

    def branches(self, call: "CallInputs") -> list["CallInputs"]:
        """The inputs of each extra branch, derived from the call's own inputs (none by default)."""
        return []

    def context(self, call: "CallInputs"):
        """Per-call data `combine` reads as `step.context` (e.g. token ids of answer words); None by default."""
        return None

    def layers(self, num_layers: int, tied_embeddings: bool) -> tuple[int, ...]:
        """Indices into `hidden_states` (0 = embeddings) whose last-position logits `combine` reads."""
        return ()

    def branch_vocabulary(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Token ids whose branch logits `combine` reads at this step, given the main rows' scores
        (None: all of them). The engine computes the branches' LM head on these columns only."""
        return None

    def combine(self, scores: torch.Tensor, step: "Step") -> torch.Tensor:
        """The method's next-token scores from the main rows' `scores` and this step's extras.

        `scores` are the main rows' logits (log-probabilities under beam search); the result must be
        a new tensor (never `scores` modified in place).
        """
        raise NotImplementedError


def plausibility_cutoff(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """The adaptive plausibility constraint (VCD, Li et al.'s contrastive decoding): True where a
    token is *implausible*, `p(y) < beta * max_w p(w)`, i.e. `score < log(beta) + max score`.

    Shift-invariant, so logits and log-probabilities give the same mask.
    """
    return scores < math.log(beta) + scores.max(dim=-1, keepdim=True).values


def plausible_tokens(scores: torch.Tensor, beta: float, active: bool = True) -> torch.Tensor:
    """Ids of the tokens plausible in at least one row: what a plausibility-masked contrast reads
    of its branches (none when the contrast is off, `active=False`)."""
    if not active:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.nonzero(~plausibility_cutoff(scores, beta).all(dim=0)).flatten()


def contrast(scores: torch.Tensor, negative: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """`(1 + alpha) * scores - alpha * negative`, implausible tokens (w.r.t. `scores`) at -inf.

    `alpha = 0` returns `scores` unchanged: the plausibility mask only guards a contrast.
    """
    if alpha == 0:
        return scores.clone()
    combined = (1 + alpha) * scores - alpha * negative
    return combined.masked_fill(plausibility_cutoff(scores, beta), -math.inf)


def content_generator(seed: int, tensor: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by `seed` and the content of `tensor` (one image).

    Each image gets its own, reproducible randomness that does not depend on which batch it is in
    or where, and the global torch RNG (which sampling uses) is never touched.
    """
    digest = zlib.crc32(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + digest) % (2**63))
