"""What the engine shows routers, position, attention and cache methods, and what routers return.

(Token selectors see a `vlmkit.engine.selection.SelectionContext` and return a `Selection`.)
Indices of visual tokens are always *within one sample's visual tokens* (0 .. n-1, in sequence
order); the engine owns the mapping to stream rows, masks, positions and the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import InputError

ROUTE_MODES = ("skip", "freeze")


@dataclass
class RouteContext:
    """What a `Router` sees at one routed decoder layer.

    Attributes:
        hidden: (B, L, D) hidden states entering the layer.
        visual: per sample, its remaining visual tokens.
        layer: the routed decoder layer.
        num_layers: decoder layers in the LLM.
        attention: per sample, (n,) attention the last token pays each visual token at this layer
            (softmax over the whole sequence, mean over heads, from the layer's own input), when the
            router needs "attention".
        update: per sample, (n,) norm of each visual token's update in the previous layer
            (`||h_l - h_(l-1)||`), when the router needs "update".
        call_index: how many routes this method has made before.
        training: whether the model is in training mode (`model.train()`).
        valid: (B, L) bool, False on padding.
        normed: (B, L, D) the layer's normalised input (its input norm applied), when the router
            needs "normed".
    """

    hidden: torch.Tensor
    visual: list[VisualTokens]
    layer: int
    num_layers: int
    attention: list[torch.Tensor] | None = None
    update: list[torch.Tensor] | None = None
    call_index: int = 0
    training: bool = False
    valid: torch.Tensor | None = None
    normed: torch.Tensor | None = None


@dataclass
class GateContext:
    """What a token-gating `Router` (`gates_tokens = True`) sees at one routed layer, in every call:
    the prefill (alongside `route`), each decoding step, and a recomputation of prompt and generated
    tokens.

    Attributes:
        hidden: (B, L, D) hidden states entering the layer.
        valid: (B, L) bool, False on padding.
        generated: (B, L) bool, the rows that are generated tokens (every row of a decoding step; in a
            recomputation under `Patch.reuse_selections()`, the rows after the recorded prompt).
        layer: the routed decoder layer.
        num_layers: decoder layers in the LLM.
        training: whether the model is in training mode.
        normed: (B, L, D) the layer's normalised input, when the router needs "normed".
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    generated: torch.Tensor
    layer: int
    num_layers: int
    training: bool = False
    normed: torch.Tensor | None = None


@dataclass
class TokenGate:
    """A token-gating router's decision for every row of a call at one routed layer.

    Attributes:
        weights: (B, L) the MLP weight w of every running row (it leaves as x + attn + w * mlp).
        rest: (B, L) bool, generated tokens that skip the layer (no query, key, value or MLP: the
            state passes unchanged and the layer caches nothing for them); ignored on other rows
            (visual tokens rest through `Route`, prompt text always runs).
    """

    weights: torch.Tensor
    rest: torch.Tensor

    def validate(self, shape: tuple[int, int], method: str) -> None:
        if tuple(self.weights.shape) != shape or tuple(self.rest.shape) != shape or self.rest.dtype != torch.bool:
            raise InputError(f"{method}: TokenGate needs (B, L) = {shape} weights and a bool rest mask")


@dataclass
class Route:
    """Which visual tokens run one decoder layer, per sample.

    Attributes:
        run: per sample, sorted indices of the visual tokens that run the layer.
        mode: what the others do: "skip" (no query, no key or value, no MLP: their state passes
            unchanged and the layer caches nothing for them) or "freeze" (their key and value are
            computed from their state and cached, so the running tokens attend to them; no query,
            no MLP: their state passes unchanged).
        weights: optional, per sample, (n,) a weight w for every visual token (p-MoD's STRing, "skip"
            mode only): a running token leaves the layer as x + attn + w * mlp, a resting one as w * x.
    """

    run: list[torch.Tensor]
    mode: str = "skip"
    weights: list[torch.Tensor] | None = None

    def detached(self) -> "Route":
        """The route with its weights out of the autograd graph (what a recording keeps)."""
        weights = None if self.weights is None else [w.detach() for w in self.weights]
        return Route(self.run, self.mode, weights)

    def validate(self, visual: list[VisualTokens], method: str) -> None:
        if self.mode not in ROUTE_MODES:
            raise InputError(f"{method}: Route.mode={self.mode!r} is not one of {', '.join(ROUTE_MODES)}")
        if len(self.run) != len(visual):
            raise InputError(f"{method} returned {len(self.run)} routes for {len(visual)} samples")
        for run, tokens in zip(self.run, visual):
            if run.dtype != torch.long or run.ndim != 1:
                raise TypeError(f"{method}: Route.run must hold 1-D long tensors, got {run.dtype} {tuple(run.shape)}")
            if run.numel() and (int(run.min()) < 0 or int(run.max()) >= len(tokens)):
                raise InputError(f"{method}: routed index out of range for a sample with {len(tokens)} visual tokens")
            if run.numel() > 1 and not bool((run[1:] > run[:-1]).all()):
                raise InputError(f"{method}: Route.run must be strictly increasing (sorted, no repeats)")
        if self.weights is not None:
            if self.mode != "skip":
                raise InputError(f"{method}: Route.weights apply to the 'skip' mode only")
            if len(self.weights) != len(visual) or any(w.shape != (len(t),) for w, t in zip(self.weights, visual)):
                raise InputError(f"{method}: Route.weights must hold one (n,) weight per visual token of each sample")


@dataclass
class PositionContext:
    """What a `PositionMethod` sees at the start of a prefill.

    Attributes:
        positions: the model's own rotary positions of the call's tokens, (B, L) or (3, B, L).
        visual: per sample, its visual tokens (slots are positions in the call's layout).
        valid: (B, L) bool, False on padding.
    """

    positions: torch.Tensor
    visual: list[VisualTokens]
    valid: torch.Tensor


@dataclass
class AttentionContext:
    """What an `AttentionMethod` sees for one decoder layer's mask.

    Attributes:
        layer: the decoder layer.
        key_slots: (B, K) long, the caller-layout position of each key of the layer's KV (-1 on
            padding); its queries are the last rows unless `query_slots` says otherwise.
        query_slots: (B, Q) long, the caller-layout position of each query.
        visual: per sample, the visual tokens of the prefill that built the cache (caller-layout
            positions in `slots`), or None for text-only calls.
    """

    layer: int
    key_slots: torch.Tensor
    query_slots: torch.Tensor
    visual: list[VisualTokens] | None = None


@dataclass
class CacheContext:
    """What a `CacheMethod` sees after the prefill or a decoding step.

    Attributes:
        keys: per decoder layer, its cached keys (B, H_kv, S, d).
        valid: per decoder layer, (B, S) bool, which cache slots hold a token.
        slots: per decoder layer, (B, S) long, the caller-layout position of each slot (-1: none).
        visual: per sample, the prefill's visual tokens (caller-layout positions in `slots`).
        prefill: True right after the prefill, False after a decoding step.
        logical_length: tokens the caller has sent so far (prompt and generated).
        attention: per decoder layer, (B, S) the attention the call's last token paid each cache slot
            in that layer (mean over heads), when the method needs "attention" (output-aware pruning).
        head_slots: per decoder layer, (B, H_kv, S) long, per KV head, the caller-layout position of
            the token each slot holds (-1: none); after a per-head edit the heads differ.
        head_attention: per decoder layer, (B, H_kv, S) float32, the attention each slot of each KV
            head has received since the prefill: softmax probabilities summed over every valid query
            row of every call and over the query heads that share that KV head (H2O's accumulated
            score), when the method needs "head_attention"; None for a layer that did not compute it
            (a routed layer).
    """

    keys: list[torch.Tensor]
    valid: list[torch.Tensor]
    slots: list[torch.Tensor]
    visual: list[VisualTokens] | None
    prefill: bool
    logical_length: int
    attention: list[torch.Tensor] | None = None
    head_slots: list[torch.Tensor] | None = None
    head_attention: list[torch.Tensor | None] | None = None


@dataclass
class HeadEdit:
    """A cache method's per-KV-head edit of one layer (what `CacheMethod.edit_cache` may return for a
    layer instead of a (B, S) keep mask): each head keeps its own slots, and a kept entry may become a
    weighted sum of entries (merging).

    Slot j of head h of row b, if kept, becomes ``sum_s weight[b, h, s] * x[b, h, s]`` over the slots
    s with ``target[b, h, s] == j`` (x: its key, and with the same weights its value); a kept slot
    that no other slot targets is left as it is. Keys are rotated (post-RoPE) and merged entries keep
    the kept slot's position: later tokens keep their positions.

    Attributes:
        keep: (B, H_kv, S) bool, the slots each head keeps; every head of a row keeps the same count.
        target: (B, H_kv, S) long or None: per slot, the slot (kept, of the same head) its entry is
            added into, -1 for none; a kept slot that is a target targets itself. None: no merging.
        weight: (B, H_kv, S) float, each slot's coefficient in its target (with `target`).
    """

    keep: torch.Tensor
    target: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def validate(self, valid: torch.Tensor, heads: int, method: str) -> None:
        batch, slots = valid.shape
        shape = (batch, heads, slots)
        if tuple(self.keep.shape) != shape or self.keep.dtype != torch.bool:
            raise InputError(f"{method}: HeadEdit.keep must be a bool tensor of shape {shape}, got {self.keep.dtype} {tuple(self.keep.shape)}")
        counts = (self.keep & valid[:, None, :]).sum(dim=2)
        if not bool((counts == counts[:, :1]).all()):
            raise InputError(f"{method}: HeadEdit.keep must keep the same number of slots in every head of a row, got {counts.tolist()}")
        if (self.target is None) != (self.weight is None):
            raise InputError(f"{method}: HeadEdit needs both target and weight, or neither")
        if self.target is None:
            return
        if tuple(self.target.shape) != shape or tuple(self.weight.shape) != shape or self.target.dtype != torch.long:
            raise InputError(f"{method}: HeadEdit.target (long) and weight must have shape {shape}")
        live = (self.target >= 0) & valid[:, None, :]
        if bool((self.target >= slots).any()):
            raise InputError(f"{method}: HeadEdit.target out of range for {slots} slots")
        into = self.keep.gather(2, self.target.clamp(min=0))
        if not bool(into[live].all()):
            raise InputError(f"{method}: HeadEdit.target must name slots the same head keeps")
        own = torch.arange(slots, device=self.target.device).expand(shape)
        targeted = torch.zeros(shape, dtype=torch.long, device=self.keep.device)
        targeted = targeted.scatter_add(2, self.target.clamp(min=0), live.long()) > 0
        if not bool((self.target == own)[targeted & self.keep].all()):
            raise InputError(f"{method}: a kept slot that HeadEdit.target names must target itself")
