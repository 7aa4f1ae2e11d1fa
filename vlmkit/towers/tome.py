"""ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv:2210.09461), inside
vision towers (transformers CLIP/SigLIP, timm and open_clip ViTs; `vlmkit.adapters.towers`).

Site: every transformer block, between the attention and the MLP. With k the block's attention
keys of its normalised input averaged over heads, A the tokens at even positions and B those at
odd positions (in the current order):

    score(a, b) = cos(k_a, k_b),  a in A, b in B      (-inf for a protected [CLS] row)
    partner(a)  = argmax_b score(a, b);  edge(a) = max_b score(a, b)
    the r tokens of A with the highest edges merge into their partners, r <= (N - protected) // 2
    x_t = sum_{i -> t} s_i x_i / sum_{i -> t} s_i,   s_t = sum_{i -> t} s_i     (size-weighted mean)
    order after the block: [protected, unmerged A, B] (A by position when tokens are protected, else
    by descending edge, as ToMe)
    every later block: logits + log(s_key)                (proportional attention)

The r per block comes from `r_schedule`: an int (every block), a list (one per block) or
``(r, inflection)``: ``r_l = int(m + l (2r - 2m) / (L - 1))`` with ``m = int(r (1 - inflection))``.
The state (`ToMeState`) records each token's size and which original patches it holds.

Follows facebookresearch/ToMe @af95e4b: `tome/merge.py` (`bipartite_soft_matching`, `merge_wavg`,
`merge_source`), `tome/patch/timm.py` (`ToMeBlock`, `ToMeAttention`, `make_tome_class`),
`tome/utils.py` (`parse_r`). Deviations, and why:
- no ``__class__`` swap: each block gets an instance ``forward`` that runs its own submodules plus
  the merge; `ToMeHandle.remove` deletes it and leaves outputs and ``state_dict`` as before;
- the state is reset when the first block starts rather than by the tower's ``forward``, so every
  entry point (timm ``forward_features``, ``forward_intermediates``) starts afresh;
- equal edges merge the lower A index first, and unmerged A tokens with equal edges keep their order
  (ToMe's ``argsort`` leaves ties unordered);
- all prefix tokens (timm registers too) are protected: their A rows and B columns are -inf and
  they lead the output, which for a lone [CLS] is ToMe's rule and for [CLS] + distillation token
  its order;
- sources are kept as the current token of each original patch (B, N0) and expanded to ToMe's
  0/1 (B, N, N0) matrix on demand;
- a schedule list must have one r per block (ToMe pads with zeros); an r that even the first block
  cannot merge is an error; later blocks clamp as ToMe does, with a warning giving the effective r;
- the size-weighted mean accumulates in float32 (`vlmkit.kernels.merge.merge_tokens`; ToMe sums
  in the tokens' dtype);
- timm keys are taken after ``k_norm`` (the identity without qk_norm, which ToMe's copy predates);
- attention masks passed to a block that merges are refused (merged tokens no longer match them).
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.errors import ConfigError, ConflictError
from vlmkit.kernels.merge import merge_tokens
from vlmkit.adapters.towers import TowerLayout, find_layout


def r_schedule(r: int | list[int] | tuple[int, float], num_blocks: int) -> list[int]:
    """Tokens to merge in each block (ToMe's ``parse_r``).

    Args:
        r: an int (the same r in every block), a list (one r per block) or ``(r, inflection)`` with
            inflection in [-1, 1]: 0 is constant, -1 merges 2r in the first block falling to 0 in
            the last, +1 the reverse.
        num_blocks: the tower's depth L.

    Returns:
        L non-negative ints.

    Raises:
        TypeError: r of another type.
        ConfigError: a negative r, an inflection outside [-1, 1], a list of the wrong length.

    Example:
        >>> r_schedule((8, -0.5), 4)
        [12, 9, 6, 4]
    """
    if isinstance(r, list):
        if len(r) != num_blocks:
            raise ConfigError(f"tome: the r list has {len(r)} entries for {num_blocks} blocks; give one r per block.")
        for value in r:
            _count(value)
        return list(r)
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(f"tome: a tuple r must be (r, inflection), got {r!r}.")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or not -1 <= inflection <= 1:
            raise ConfigError(f"tome: inflection={inflection!r} must be a number in [-1, 1] (0: constant r).")
    else:
        inflection = 0
    _count(r)
    lowest = int(r * (1.0 - inflection))
    highest = 2 * r - lowest
    step = (highest - lowest) / (num_blocks - 1) if num_blocks > 1 else 0.0
    return [int(lowest + step * block) for block in range(num_blocks)]


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"tome: r must be an int, a list of ints or (int, inflection), got {value!r}.")
    if value < 0:
        raise ConfigError(f"tome: r={value} is negative; r counts tokens merged per block (0: none).")
    return value


def bipartite_matching(metric: torch.Tensor, r: int, protected: int = 0) -> torch.Tensor:
    """Where each token goes when the block merges r tokens (ToMe's bipartite soft matching).

    Args:
        metric: (B, N, C) the block's head-mean keys, in the current token order.
        r: tokens to remove, at most ``(N - protected) // 2``.
        protected: leading tokens that never merge ([CLS], registers).

    Returns:
        (B, N) long: each token's position among the ``N - r`` output tokens, ordered
        ``[protected, unmerged A, B]`` (A: even positions, B: odd; B in position order, A too when
        tokens are protected, else by descending edge); a merged A token points at its B partner.

    Example:
        >>> metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
        >>> bipartite_matching(metric, r=1)
        tensor([[2, 1, 0, 2]])
    """
    batch, tokens, _ = metric.shape
    positions = torch.arange(tokens, device=metric.device)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (B, A, B-set)
        scores[:, positions[::2] < protected, :] = -torch.inf
        scores[:, :, positions[1::2] < protected] = -torch.inf
        edge, partner = scores.max(dim=-1)
        by_edge = edge.sort(dim=-1, descending=True, stable=True).indices
        merged_a = by_edge[:, :r]
        merged = torch.zeros(batch, tokens, dtype=torch.bool, device=metric.device)
        merged[:, ::2] = merged.new_zeros(edge.shape).scatter(1, merged_a, True)
        # rank: protected tokens first, then A, then B; merged tokens last. B keeps its order; A too when
        # tokens are protected (ToMe sorts them then), else A stays by descending edge (ToMe's order)
        key = positions.expand(batch, tokens).clone()
        if not protected:
            arange = torch.arange(by_edge.shape[1], device=metric.device).expand(batch, -1)
            key[:, ::2] = torch.empty_like(by_edge).scatter_(1, by_edge, arange)
        group = torch.where(positions < protected, 0, torch.where(positions % 2 == 0, 1, 2))
        rank = torch.where(merged, 3 * tokens, group * tokens + key)
        kept = rank.argsort(dim=-1)[:, : tokens - r]
        target = torch.empty(batch, tokens, dtype=torch.long, device=metric.device)
        target.scatter_(1, kept, torch.arange(tokens - r, device=metric.device).expand(batch, -1))
        partner_target = target.gather(1, 2 * partner.gather(1, merged_a) + 1)
        target.scatter_(1, 2 * merged_a, partner_target)
    return target


@dataclass(eq=False)
class ToMeState:
    """What the last forward of a patched tower merged.

    Attributes:
        size: (B, N) how many original tokens each current token stands for.
        patch_token: (B, N0) the current token that holds each original token.
        protected: leading tokens that never merge.
        merged: whether any block has merged yet (proportional attention starts after it).
        history: `patch_token` after each block of the forward (what each block's output holds).
    """

    size: torch.Tensor | None = None
    patch_token: torch.Tensor | None = None
    protected: int = 0
    merged: bool = False
    history: list[torch.Tensor] = field(default_factory=list)

    def reset(self, x: torch.Tensor) -> None:
        """Start a forward on `x` (B, N, C): every token holds itself, with size 1."""
        batch, tokens = x.shape[:2]
        self.size = torch.ones(batch, tokens, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        self.patch_token = torch.arange(tokens, device=x.device).expand(batch, -1)
        self.merged = False
        self.history = []

    @property
    def source(self) -> torch.Tensor:
        """(B, N, N0) 0/1: which original tokens each current token holds (ToMe's source)."""
        tokens = int(self.size.shape[1])
        return nn.functional.one_hot(self.patch_token, tokens).transpose(1, 2).to(self.size.dtype)

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, N) ``log(size)`` of each key, added to the attention logits."""
        return self.size.log()[:, None, None, :].to(dtype)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int) -> torch.Tensor:
        """Merge r tokens of `x` (B, N, C) by `metric` and update sizes and sources."""
        target = bipartite_matching(metric, r, self.protected)
        x, self.size = merge_tokens(x, target, size=self.size, num_targets=x.shape[1] - r)
        self.patch_token = target.gather(1, self.patch_token)
        self.merged = True
        return x


@dataclass(eq=False)
class ToMeHandle:
    """ToMe installed on one tower; `remove()` (or leaving a ``with`` block) undoes it.

    Attributes:
        tower: the patched module.
        layout: its block layout.
        schedule: r per block as given (blocks may merge fewer when tokens run out).
        proportional: whether later blocks add log(size) to the attention logits.
        state: the sizes and sources of the last forward.
    """

    tower: nn.Module = field(repr=False)
    layout: TowerLayout
    schedule: list[int]
    proportional: bool
    state: ToMeState
    _effective: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _current: list[int] = field(default_factory=list, repr=False)
    _forwards: list[tuple[nn.Module, types.MethodType]] = field(default_factory=list, repr=False)

    def effective_schedule(self, tokens: int) -> list[int]:
        """r per block for `tokens` tokens entering the first block (ToMe clamps to half the mergeable).

        Raises:
            ConfigError: an r no block could merge (over ``(tokens - protected) // 2``).
        """
        if tokens not in self._effective:
            protected = self.state.protected
            most = (tokens - protected) // 2
            if max(self.schedule) > most:
                raise ConfigError(
                    f"tome: r={max(self.schedule)} exceeds the {most} tokens the first block can merge "
                    f"({tokens} tokens, {protected} protected: at most (N - protected) // 2); use r <= {most}."
                )
            effective, remaining = [], tokens
            for r in self.schedule:
                effective.append(min(r, (remaining - protected) // 2))
                remaining -= effective[-1]
            if effective != self.schedule:
                warnings.warn(
                    f"tome: with {tokens} tokens the later blocks cannot merge the r asked ({self.schedule}); "
                    f"they merge {effective}, {remaining} tokens leave the tower.",
                    stacklevel=2,
                )
            self._effective[tokens] = effective
        return self._effective[tokens]

    def remove(self) -> None:
        """Restore every block's own forward. Idempotent."""
        while self._forwards:
            block, forward = self._forwards.pop()
            if block.__dict__.get("forward") is forward:
                del block.forward

    def __enter__(self) -> ToMeHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_tome(
    tower: nn.Module,
    r: int | list[int] | tuple[int, float] = 8,
    protect_cls: bool | None = None,
    proportional: bool = True,
) -> ToMeHandle:
    """Merge r tokens per block of `tower` (ToMe), on this instance only.

    Args:
        tower: a transformers CLIP/SigLIP vision model, a timm ``VisionTransformer`` or an
            open_clip ``VisionTransformer``.
        r: tokens merged per block: an int, one int per block, or ``(r, inflection)`` (`r_schedule`).
        protect_cls: keep the prefix tokens ([CLS], registers) unmerged; None: when the tower has them.
        proportional: add log(size) of each key to the attention logits after the first merge
            (ToMe's ``prop_attn``, on by default for off-the-shelf models).

    Returns:
        The handle: ``handle.state`` holds the last forward's sizes and sources, ``handle.remove()``
        undoes everything.

    Raises:
        UnsupportedModelError: a module that is none of the supported towers.
        TypeError: r or protect_cls of the wrong type.
        ConfigError: a bad schedule, an r over what the first block can merge, protect_cls=True on
            a tower without [CLS], proportional attention on an implementation without a float bias
            (flash attention).
        ConflictError: the blocks already have a replaced forward (ToMe installed twice).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, global_pool="")
        >>> with install_tome(vit, r=1) as handle:  # 17 tokens, one fewer after each of the 12 blocks
        ...     tokens = vit(torch.rand(1, 3, 64, 64))
        >>> tokens.shape, handle.state.size.sum().item()
        (torch.Size([1, 5, 192]), 17.0)
    """
    layout = find_layout(tower)
    schedule = r_schedule(r, len(layout.blocks))
    if protect_cls is not None and not isinstance(protect_cls, bool):
        raise TypeError(f"tome: protect_cls must be True, False or None, got {protect_cls!r}.")
    if protect_cls and not layout.prefix_tokens:
        raise ConfigError(f"tome: protect_cls=True but this {layout.name} has no [CLS] token; use protect_cls=None.")
    if not isinstance(proportional, bool):
        raise TypeError(f"tome: proportional must be True or False, got {proportional!r}.")
    if proportional:
        layout.check_bias()
    taken = [index for index, block in enumerate(layout.blocks) if "forward" in block.__dict__]
    if taken:
        raise ConflictError(f"tome: blocks {taken} already have a replaced forward (ToMe installed twice?); remove it first.")
    protected = layout.prefix_tokens if protect_cls in (None, True) else 0
    handle = ToMeHandle(tower, layout, schedule, proportional, ToMeState(protected=protected))
    handle.effective_schedule(layout.token_count)
    for index, block in enumerate(layout.blocks):
        block.forward = types.MethodType(_merging_forward(handle, index), block)
        handle._forwards.append((block, block.forward))
    return handle


def _merging_forward(handle: ToMeHandle, index: int):
    layout, state = handle.layout, handle.state

    def forward(block, x, *args, **kwargs):
        if index == 0:
            if handle.proportional:
                layout.check_bias()
            handle._current = handle.effective_schedule(x.shape[1])
            state.reset(x)
        r = handle._current[index]
        bias = state.attention_bias(x.dtype) if handle.proportional and state.merged else None
        if r == 0 and bias is None:
            output = type(block).forward(block, x, *args, **kwargs)
        else:
            x, metric = layout.attend(block, x, bias, args, kwargs)
            if r:
                x = state.merge(x, metric, r)
            output = layout.feed_forward(block, x)
        state.history.append(state.patch_token)
        return output

    return forward


def raster_order(tokens: torch.Tensor, state: ToMeState) -> tuple[torch.Tensor, torch.Tensor]:
    """Put a patched tower's output tokens back in raster order.

    Each token goes to the place of the first original token it holds, so the protected [CLS]
    stays first.

    Args:
        tokens: (B, N, C) the tower's output in ToMe's order, or (B, N - protected, C) when the
            tower drops its prefix tokens (open_clip's ``output_tokens``).
        state: ``handle.state`` of the forward that produced them.

    Returns:
        ``(tokens, sources)``: the reordered tokens and (B, rows, N0) 0/1, which original tokens
        (prefix included) each of them holds.

    Raises:
        ConfigError: a token count that matches neither N nor N - protected.
    """
    size = state.size
    batch, current = size.shape
    originals = state.patch_token.shape[1]
    first = torch.full((batch, current), originals, dtype=torch.long, device=size.device).scatter_reduce(
        1, state.patch_token, torch.arange(originals, device=size.device).expand(batch, -1), "amin"
    )
    order = first.argsort(dim=-1)
    sources = state.source.gather(1, order[:, :, None].expand(-1, -1, originals))
    if tokens.shape[1] == current:
        return tokens.gather(1, order[:, :, None].expand(-1, -1, tokens.shape[-1])), sources
    if state.protected and tokens.shape[1] == current - state.protected:
        rows = order[:, state.protected :] - state.protected
        return tokens.gather(1, rows[:, :, None].expand(-1, -1, tokens.shape[-1])), sources[:, state.protected :]
    raise ConfigError(
        f"tome: raster_order got {tokens.shape[1]} tokens; the last forward left {current} "
        f"({current - state.protected} without the {state.protected} protected)."
    )


def unmerge(tokens: torch.Tensor, patch_token: torch.Tensor) -> torch.Tensor:
    """(B, N, C) merged tokens back on the original layout (B, N0, C): every original token gets the
    token that holds it (ToMe's dense-prediction unmerge)."""
    return tokens.gather(1, patch_token[:, :, None].to(tokens.device).expand(-1, -1, tokens.shape[-1]))


def representatives(patch_token: torch.Tensor) -> torch.Tensor:
    """(B, N0) bool: the original tokens that stand for their group (the first one it holds), one per
    merged token; the others are its duplicates after `unmerge`."""
    batch, originals = patch_token.shape
    index = torch.arange(originals, device=patch_token.device).expand(batch, -1)
    first = torch.full((batch, originals), originals, dtype=torch.long, device=patch_token.device)
    first = first.scatter_reduce(1, patch_token, index, "amin")
    return first.gather(1, patch_token) == index
