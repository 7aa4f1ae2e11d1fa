"""Early-exit layer selection shared by DoLa and LOL: candidate layers and the per-step JSD choice."""
from __future__ import annotations

import torch

from vlmkit.errors import ConfigError

LAYER_SETS = ("low", "high")


def check_layers(method: str, layers) -> tuple[int, ...] | str:
    """'low', 'high', or a tuple of layer indices (>= 0); ConfigError otherwise."""
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ConfigError(f"{method}: layers={layers!r} is not one of 'low', 'high' or a tuple of layer indices")
        return layers
    values = (layers,) if isinstance(layers, int) else tuple(layers)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ConfigError(f"{method}: layers={layers!r} must be 'low', 'high' or a non-empty tuple of layer indices >= 0")
    return values


def candidate_layers(method: str, layers: tuple[int, ...] | str, num_layers: int, tied_embeddings: bool) -> tuple[int, ...]:
    """Premature-layer candidates as indices into `hidden_states` (0 = embeddings), by DoLa's rule.

    For N <= 40 decoder layers, 'low' is range(start, N // 2, 2) and 'high' range(N // 2, N, 2)
    (N > 40: the first / last 20 layers, every second); with tied embeddings the embedding layer
    (an identity under early exit) is skipped: start = 2 (or 1 for a 2-layer model).
    """
    if not isinstance(layers, str):
        bad = [layer for layer in layers if layer >= num_layers]
        if bad:
            raise ConfigError(
                f"{method}: layers {bad} are not premature layers of a {num_layers}-layer model (valid: 0..{num_layers - 1})"
            )
        return tuple(layers)
    start = 0 if not tied_embeddings else (2 if num_layers > 2 else 1 if num_layers == 2 else 0)
    if layers == "low":
        if start == num_layers // 2:
            return (start,)
        return tuple(range(start, num_layers // 2, 2) if num_layers <= 40 else range(start, 20, 2))
    return tuple(range(num_layers // 2, num_layers, 2) if num_layers <= 40 else range(num_layers - 20, num_layers, 2))


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """JSD(p || q) over the last dimension, from log-probabilities."""
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, dtype=log_p.dtype, device=log_p.device))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def most_divergent(final_log_probs: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the index of the candidate distribution farthest (JSD) from the final one: (rows,) long."""
    return torch.stack([jensen_shannon(final_log_probs, candidate) for candidate in candidates]).argmax(dim=0)


def gather_rows(candidates: list[torch.Tensor], choice: torch.Tensor) -> torch.Tensor:
    """Row i of `candidates[choice[i]]`, for every row."""
    return torch.stack(candidates)[choice, torch.arange(choice.numel(), device=choice.device)]
