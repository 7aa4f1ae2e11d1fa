"""DyMU's dynamic token merging: "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs"
(Wang et al., 2025, arXiv:2504.17040), inside vision towers (transformers CLIP/SigLIP, timm and
open_clip ViTs; `vlmkit.adapters.towers`).

ToMe (`vlmkit.towers.tome`) merges a fixed r tokens per block; DyMU merges, in every block, each
token of A whose ToMe edge exceeds the block's similarity threshold, so a simple image leaves the
tower with fewer tokens than a busy one. With A the tokens at even positions and B those at odd
positions of one image (padding excluded), as in ToMe::

    edge(a) = max_b cos(k_a, k_b)   (-inf for protected [CLS] rows and for padding)
    a merges into its partner  <=>  edge(a) > threshold_l           (inference)

Calibration (training-free, the reference's ``update_threshold`` mode) runs a seeded set of images
with a ToMe schedule r_l. In block l, over the whole batch of n images flattened:

    edges sorted descending;  the top r_l * n edges merge (instances merge different counts)
    batch threshold = max(sorted edge at index r_l * n (the first that does not merge), 0)
    threshold_l = running mean of the batch thresholds: t <- (t c + new) / (c + 1)

A batch of images merges different counts per image: after each block an image's tokens are
``[protected, unmerged A, B]`` followed by padding up to the batch's longest image; padding has
size 0, takes no part in matching, and is masked out of attention (``log 0 = -inf`` on the logits,
the same term as proportional attention). ``handle.state.padding`` says which output rows are
padding; ``handle.state.lengths`` the live tokens per image after every block.

Follows MikeWangWZHL/dymu @c57d75a ``src/open_clip/tome.py``
(``batch_level_bipartite_soft_matching``, ``batch_level_merge_wavg``,
``ToMEBlock.threshold_running_avg``, ``ToMEBlock.merge_tokens``). Deviations, and why:
- the tower's blocks keep their own submodules (each gets an instance ``forward``, as
  `vlmkit.towers.tome`); removal restores the tower exactly;
- the r schedule is vlmkit's (`r_schedule`: an int, a list or ``(r, inflection)``) where the
  reference spreads an ``r_total`` over the blocks; the file records the schedule used;
- a threshold >= 1, or None, switches its block off: the block runs its own forward (the reference
  defaults to 1.0 for "no merging" but still compares, so tokens whose cosine rounds above 1 merge);
- only finite edges merge during calibration: when r_l * n exceeds the finite edges (late blocks,
  padding) the reference also takes -inf rows (padding, [CLS]); the threshold still reads the sorted
  edge at index r_l * n (the last edge when there are fewer), clamped to >= 0, as the reference;
- equal edges merge the lower index first (flattened: the earlier image first); the reference's
  ``argsort`` leaves ties unordered;
- a batch keeps each image's tokens in the order the image would have alone (ToMe's order: A by
  position when tokens are protected, else by descending edge): the reference orders a batch by
  position but a single image by edge, so its batches and single images differ for SigLIP;
- merged tokens are the exact size-weighted mean (`vlmkit.kernels.merge.merge_tokens`, float32);
  the reference divides by ``size + 1e-4`` in its batched path;
- the running mean is kept in float64 (the reference's buffer is float32 and restarts from the next
  value whenever the mean equals 1.0 exactly);
- ``max_merges`` caps merges per image and block (the reference's ``max_r_per_instance``, given as a
  ratio of r there; off by default, as in every shipped config);
- the reference's multi-process average of thresholds (``all_reduce``) is left to the caller.
"""
from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmkit.adapters.towers import TowerLayout, find_layout
from vlmkit.errors import ConfigError, ConflictError
from vlmkit.hashing import state_dict_hash
from vlmkit.kernels.merge import merge_tokens
from vlmkit.towers.tome import ToMeState, r_schedule

FORMAT = "dymu"


# ---------------------------------------------------------------- matching


def edges(metric: torch.Tensor, protected: int = 0, alive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best cosine to a B token, and which B token it is.

    Args:
        metric: (B, N, C) the block's head-mean keys.
        protected: leading tokens that never merge.
        alive: (B, N) bool, False for padding (None: every token).

    Returns:
        ``(edge, partner)``: (B, ceil(N / 2)) float, -inf for protected or padding A tokens (and where
        no live B token is left), and the index of the partner within B.
    """
    tokens = metric.shape[1]
    positions = torch.arange(tokens, device=metric.device)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
        excluded_a = (positions[::2] < protected).expand(scores.shape[0], -1)
        excluded_b = (positions[1::2] < protected).expand(scores.shape[0], -1)
        if alive is not None:
            excluded_a = excluded_a | ~alive[:, ::2]
            excluded_b = excluded_b | ~alive[:, 1::2]
        scores = scores.masked_fill(excluded_a[:, :, None] | excluded_b[:, None, :], -torch.inf)
        return scores.max(dim=-1)


def _cap(edge: torch.Tensor, max_merges: int | None) -> torch.Tensor:
    """`edge` with every A token outside each image's `max_merges` best edges set to -inf."""
    if max_merges is None or max_merges >= edge.shape[1]:
        return edge
    order = edge.sort(dim=-1, descending=True, stable=True).indices
    outside = torch.zeros_like(edge, dtype=torch.bool).scatter(1, order[:, max_merges:], True)
    return edge.masked_fill(outside, -torch.inf)


def merges_over_threshold(edge: torch.Tensor, threshold: float, max_merges: int | None = None) -> torch.Tensor:
    """(B, A) bool: the A tokens whose edge exceeds `threshold` (strictly), at most `max_merges` per
    image (the best edges, the lower index first among equals)."""
    return _cap(edge, max_merges) > threshold


def batch_merges(edge: torch.Tensor, r: int, max_merges: int | None = None) -> tuple[torch.Tensor, float | None]:
    """The calibration step of one block: the batch's top ``r * B`` edges merge.

    Args:
        edge: (B, A) the edges of every A token (-inf: cannot merge).
        r: the block's r per image (already clamped to what the block can merge).
        max_merges: at most this many of an image's tokens take part (None: no cap).

    Returns:
        ``(merged, threshold)``: (B, A) bool, the merged A tokens (finite edges among the top r * B of
        the flattened batch, the lower flat index first among equals), and the batch threshold,
        ``max(sorted edge at index min(r * B, B * A - 1), 0)``; None when r is 0.
    """
    if r <= 0:
        return torch.zeros_like(edge, dtype=torch.bool), None
    capped = _cap(edge, max_merges)
    flat = capped.flatten()
    ranked, order = flat.sort(descending=True, stable=True)
    count = r * edge.shape[0]
    chosen = order[:count][torch.isfinite(ranked[:count])]
    merged = torch.zeros_like(flat, dtype=torch.bool).scatter(0, chosen, True).view_as(edge)
    threshold = max(float(ranked[min(count, flat.numel() - 1)]), 0.0)
    return merged, threshold


def padded_targets(
    edge: torch.Tensor, partner: torch.Tensor, merged_a: torch.Tensor, alive: torch.Tensor, protected: int = 0
) -> tuple[torch.Tensor, int]:
    """Where each token goes when every image merges its own `merged_a` tokens.

    Args:
        edge, partner: from `edges`.
        merged_a: (B, A) bool, the A tokens that merge into their partners.
        alive: (B, N) bool, False for padding.
        protected: leading tokens that never merge.

    Returns:
        ``(target, tokens)``: (B, N) long, each token's position among the `tokens` outputs (the
        batch's longest image), -1 for padding; an image's outputs are ``[protected, unmerged A, B]``
        (A by position when tokens are protected, else by descending edge, as ToMe), then padding.
    """
    batch, count = alive.shape
    device = alive.device
    positions = torch.arange(count, device=device)
    with torch.no_grad():
        merged = torch.zeros(batch, count, dtype=torch.bool, device=device)
        merged[:, ::2] = merged_a
        key = positions.expand(batch, count).clone()
        if not protected:
            by_edge = edge.sort(dim=-1, descending=True, stable=True).indices
            arange = torch.arange(by_edge.shape[1], device=device).expand(batch, -1)
            key[:, ::2] = torch.empty_like(by_edge).scatter_(1, by_edge, arange)
        group = torch.where(positions < protected, 0, torch.where(positions % 2 == 0, 1, 2)).expand(batch, -1)
        group = torch.where(merged, 3, torch.where(alive, group, 4))
        rank = (group * count + key).argsort(dim=-1)
        slot = torch.empty_like(rank).scatter_(1, rank, positions.expand(batch, -1).contiguous())
        kept = alive & ~merged
        tokens = int(kept.sum(dim=1).max())
        target = torch.where(kept, slot, -1)
        partner_slot = target[:, 1::2].gather(1, partner.clamp(min=0))
        target[:, ::2] = torch.where(merged_a, partner_slot, target[:, ::2])
    return target, tokens


# ---------------------------------------------------------------- state and handle


@dataclass(eq=False)
class DyMUState(ToMeState):
    """What the last forward of a tower under DyMU merged (`ToMeState`, with padding).

    Attributes:
        lengths: after each block, (B,) the live tokens of every image.
    """

    lengths: list[torch.Tensor] = field(default_factory=list)

    def reset(self, x: torch.Tensor) -> None:
        super().reset(x)
        self.lengths = []

    @property
    def padding(self) -> torch.Tensor:
        """(B, N) bool: the current rows that are padding (size 0), True where an image has ended."""
        return self.size == 0

    def bias(self, dtype: torch.dtype, proportional: bool) -> torch.Tensor | None:
        """The attention bias of the next block: log(size) after a merge (proportional attention, -inf
        on padding), or 0 / -inf on padding alone; None when neither applies."""
        if proportional and self.merged:
            return self.attention_bias(dtype)
        if bool(self.padding.any()):
            zeros = torch.zeros(self.size.shape, dtype=dtype, device=self.size.device)
            return zeros.masked_fill(self.padding, -torch.inf)[:, None, None, :]
        return None

    def merge_selected(self, x: torch.Tensor, target: torch.Tensor, tokens: int) -> torch.Tensor:
        x, self.size = merge_tokens(x, target, size=self.size, num_targets=tokens)
        self.patch_token = target.gather(1, self.patch_token)
        self.merged = True
        return x


@dataclass(eq=False)
class DyMUHandle:
    """DyMU installed on one tower; `remove()` (or leaving a ``with`` block) undoes it.

    Attributes:
        tower: the patched module.
        layout: its block layout.
        thresholds: per block, the similarity an edge must exceed to merge (None: the block does not
            merge).
        proportional: whether blocks after a merge add log(size) to the attention logits.
        max_merges: at most this many merges per image and block (None: no cap).
        state: the sizes, sources and padding of the last forward.
        schedule: while calibrating, r per block; None at inference.
        calibrated: while calibrating, per block the running mean of the batch thresholds and how
            many batches it holds.
    """

    tower: nn.Module = field(repr=False)
    layout: TowerLayout
    thresholds: list[float | None]
    proportional: bool
    max_merges: int | None
    state: DyMUState
    schedule: list[int] | None = None
    calibrated: list[tuple[float, int] | None] = field(default_factory=list)
    _forwards: list[tuple[nn.Module, types.MethodType]] = field(default_factory=list, repr=False)

    def acts(self, index: int) -> bool:
        """Whether block `index` merges (or, calibrating, measures)."""
        if self.schedule is not None:
            return self.schedule[index] > 0
        threshold = self.thresholds[index]
        return threshold is not None and threshold < 1.0

    def merge(self, index: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        state = self.state
        alive = ~state.padding
        edge, partner = edges(metric, state.protected, alive)
        if self.schedule is None:
            merged_a = merges_over_threshold(edge, self.thresholds[index], self.max_merges)
        else:
            r = min(self.schedule[index], (x.shape[1] - state.protected) // 2)
            merged_a, threshold = batch_merges(edge, r, self.max_merges)
            if threshold is not None:
                self._record(index, threshold)
        target, tokens = padded_targets(edge, partner, merged_a, alive, state.protected)
        return state.merge_selected(x, target, tokens)

    def _record(self, index: int, threshold: float) -> None:
        """The reference's ``threshold_running_avg``: the first value as is, then (t c + new) / (c + 1)."""
        previous = self.calibrated[index]
        if previous is None:
            self.calibrated[index] = (threshold, 1)
        else:
            mean, count = previous
            self.calibrated[index] = ((mean * count + threshold) / (count + 1), count + 1)

    def remove(self) -> None:
        """Restore every block's own forward. Idempotent."""
        while self._forwards:
            block, forward = self._forwards.pop()
            if block.__dict__.get("forward") is forward:
                del block.forward

    def __enter__(self) -> DyMUHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _install(tower, thresholds, schedule, protect_cls, proportional, max_merges) -> DyMUHandle:
    layout = find_layout(tower)
    if protect_cls is not None and not isinstance(protect_cls, bool):
        raise TypeError(f"dymu: protect_cls must be True, False or None, got {protect_cls!r}.")
    if protect_cls and not layout.prefix_tokens:
        raise ConfigError(f"dymu: protect_cls=True but this {layout.name} has no [CLS] token; use protect_cls=None.")
    if not isinstance(proportional, bool):
        raise TypeError(f"dymu: proportional must be True or False, got {proportional!r}.")
    if max_merges is not None and (isinstance(max_merges, bool) or not isinstance(max_merges, int) or max_merges < 1):
        raise ConfigError(f"dymu: max_merges={max_merges!r} must be an int >= 1 (merges per image and block) or None.")
    # padding is masked through the same float bias as proportional attention
    layout.check_bias()
    taken = [index for index, block in enumerate(layout.blocks) if "forward" in block.__dict__]
    if taken:
        raise ConflictError(f"dymu: blocks {taken} already have a replaced forward (ToMe or DyMU installed?); remove it first.")
    protected = layout.prefix_tokens if protect_cls in (None, True) else 0
    handle = DyMUHandle(tower, layout, thresholds, proportional, max_merges, DyMUState(protected=protected), schedule)
    handle.calibrated = [None] * len(layout.blocks)
    for index, block in enumerate(layout.blocks):
        block.forward = types.MethodType(_dymu_forward(handle, index), block)
        handle._forwards.append((block, block.forward))
    return handle


def _dymu_forward(handle: DyMUHandle, index: int):
    layout, state = handle.layout, handle.state

    def forward(block, x, *args, **kwargs):
        if index == 0:
            layout.check_bias()
            state.reset(x)
        acts = handle.acts(index)
        bias = state.bias(x.dtype, handle.proportional)
        if not acts and bias is None:
            output = type(block).forward(block, x, *args, **kwargs)
        else:
            x, metric = layout.attend(block, x, bias, args, kwargs)
            if acts:
                x = handle.merge(index, x, metric)
            output = layout.feed_forward(block, x)
        state.history.append(state.patch_token)
        state.lengths.append((~state.padding).sum(dim=1))
        return output

    return forward


# ---------------------------------------------------------------- thresholds: files and checks


def tower_fingerprint(tower: nn.Module) -> dict:
    """What a thresholds file records of its tower: a readable name, its shape, and a SHA-256 over its
    layout and weights (`vlmkit.hashing.state_dict_hash`)."""
    layout = find_layout(tower)
    config = getattr(getattr(tower, "config", None), "name_or_path", "") or ""
    name = f"{type(tower).__name__}" + (f" ({config})" if config else "")
    shape = {"layout": layout.name, "blocks": len(layout.blocks), "tokens": layout.token_count, "prefix_tokens": layout.prefix_tokens}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    digest.update(state_dict_hash(tower).encode())
    return {"name": name, **shape, "hash": digest.hexdigest()}


def _check_thresholds(values, blocks: int, where: str) -> list[float | None]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [float(values)] * blocks
    if not isinstance(values, (list, tuple)) or len(values) != blocks:
        raise ConfigError(f"dymu: {where} must be a number or one threshold per block ({blocks}), got {values!r}.")
    checked = []
    for value in values:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
            raise ConfigError(f"dymu: {where} holds {value!r}; a threshold is a number (a cosine similarity) or None (no merging).")
        checked.append(None if value is None else float(value))
    return checked


def read_thresholds(path: str | Path, tower: nn.Module) -> dict:
    """The thresholds file at `path`, checked against `tower`.

    Raises:
        ConfigError: no such file, not a DyMU thresholds file, or thresholds calibrated on another
            tower (names both towers and their hashes).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"dymu: thresholds file {file} does not exist; write one with `vlmkit calibrate dymu` or vlmkit.towers.calibrate_thresholds.")
    try:
        calibration = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"dymu: {file} is not JSON ({error}).") from None
    if not isinstance(calibration, dict) or calibration.get("method") != FORMAT or "thresholds" not in calibration:
        raise ConfigError(f"dymu: {file} is not a DyMU thresholds file (it needs method 'dymu' and 'thresholds').")
    recorded, actual = calibration.get("tower", {}), tower_fingerprint(tower)
    if recorded.get("hash") != actual["hash"]:
        raise ConfigError(
            f"dymu: {file} holds thresholds for {recorded.get('name', '?')} ({recorded.get('layout', '?')}, "
            f"{recorded.get('blocks', '?')} blocks, hash {str(recorded.get('hash'))[:12]}); this tower is {actual['name']} "
            f"({actual['layout']}, {actual['blocks']} blocks, hash {actual['hash'][:12]}). Calibrate this tower."
        )
    calibration["thresholds"] = _check_thresholds(calibration["thresholds"], actual["blocks"], str(file))
    return calibration


def write_thresholds(path: str | Path, calibration: dict) -> Path:
    """Write `calibration` (from `calibrate_thresholds`) as JSON to `path`; returns the path."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(calibration, indent=1) + "\n")
    return file


# ---------------------------------------------------------------- public entry points


def calibrate_thresholds(
    tower: nn.Module,
    batches: Iterable[torch.Tensor],
    r: int | list[int] | tuple[int, float] = 8,
    *,
    protect_cls: bool | None = None,
    proportional: bool = True,
    max_merges: int | None = None,
    last_block: int | None = None,
    call=None,
) -> dict:
    """Per-block thresholds for `tower`, measured on `batches` (DyMU's training-free calibration).

    Args:
        tower: a supported vision tower (`vlmkit.towers.install_tome`).
        batches: pixel batches (B, 3, H, W), each one calibration step; seed their draw.
        r: the ToMe schedule whose batch thresholds are averaged (`r_schedule`).
        protect_cls, proportional: as `install_tome`.
        max_merges: at most this many merges per image and block (None: no cap).
        last_block: blocks after it measure nothing (a VLM reads an earlier block's output).
        call: how to run the tower on a batch (default ``tower(pixels)``).

    Returns:
        A dict for `write_thresholds`: ``method``, ``tower`` (`tower_fingerprint`), ``r`` (the
        schedule), ``thresholds`` (per block; None where r is 0), ``batches``, ``images`` and the
        settings.

    Raises:
        ConfigError: no batches, or a bad schedule or setting.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, global_pool="")
        >>> calibration = calibrate_thresholds(vit.eval(), [torch.rand(2, 3, 64, 64)], r=2)
        >>> len(calibration["thresholds"]), calibration["r"][:3]
        (12, [2, 2, 2])
    """
    layout = find_layout(tower)
    schedule = r_schedule(r, len(layout.blocks))
    if last_block is not None:
        schedule = [value if block <= last_block else 0 for block, value in enumerate(schedule)]
    handle = _install(tower, [None] * len(schedule), schedule, protect_cls, proportional, max_merges)
    steps = images = 0
    try:
        with torch.no_grad():
            for pixels in batches:
                (call or tower)(pixels)
                steps += 1
                images += int(pixels.shape[0])
    finally:
        handle.remove()
    if not steps:
        raise ConfigError("dymu: calibration got no batches; pass an iterable of pixel batches (B, 3, H, W).")
    return {
        "method": FORMAT,
        "tower": tower_fingerprint(tower),
        "r": schedule,
        "thresholds": [None if entry is None else entry[0] for entry in handle.calibrated],
        "batches": steps,
        "images": images,
        "protect_cls": protect_cls,
        "proportional": proportional,
        "max_merges": max_merges,
    }


def install_dymu(
    tower: nn.Module,
    thresholds: float | list | str | Path | dict,
    *,
    protect_cls: bool | None = None,
    proportional: bool = True,
    max_merges: int | None = None,
    last_block: int | None = None,
) -> DyMUHandle:
    """Merge, in every block of `tower`, the tokens whose ToMe edge exceeds the block's threshold.

    Args:
        tower: a supported vision tower.
        thresholds: a thresholds file (checked against the tower), a `calibrate_thresholds` dict, one
            number for every block, or one per block (None: the block does not merge).
        protect_cls, proportional: as `install_tome`.
        max_merges: at most this many merges per image and block (None: no cap).
        last_block: blocks after it merge nothing.

    Returns:
        The handle: ``handle.state`` holds sizes, sources, ``padding`` (B, N) and ``lengths``;
        ``handle.remove()`` undoes everything. The tower's output holds the batch's longest image;
        the rows where ``handle.state.padding`` is True are padding to ignore.

    Raises:
        ConfigError: a file for another tower, thresholds of the wrong length, a bad setting, an
            attention implementation without a float bias.
        ConflictError: the blocks already have a replaced forward.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, global_pool="")
        >>> with install_dymu(vit.eval(), 1.0) as handle:  # 1.0: nothing merges
        ...     tokens = vit(torch.rand(2, 3, 64, 64))
        >>> tokens.shape, handle.state.lengths[-1].tolist()
        (torch.Size([2, 17, 192]), [17, 17])
    """
    blocks = len(find_layout(tower).blocks)
    if isinstance(thresholds, (str, Path)):
        thresholds = read_thresholds(thresholds, tower)["thresholds"]
    elif isinstance(thresholds, dict):
        if thresholds.get("tower", {}).get("hash") != tower_fingerprint(tower)["hash"]:
            raise ConfigError(
                f"dymu: these thresholds were calibrated on {thresholds.get('tower', {}).get('name', '?')}, not on this "
                f"{type(tower).__name__} (weights hash differs). Calibrate this tower."
            )
        thresholds = thresholds["thresholds"]
    values = _check_thresholds(thresholds, blocks, "thresholds")
    if last_block is not None:
        values = [value if block <= last_block else None for block, value in enumerate(values)]
    return _install(tower, values, None, protect_cls, proportional, max_merges)
