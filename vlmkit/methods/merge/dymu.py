"""DyMU: "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs" (Wang et al., 2025,
arXiv:2504.17040): ToMe with a per-block similarity threshold instead of a fixed r, so each image
keeps as many visual tokens as its content needs.

Site: `vision` (in every tower block, each token whose ToMe edge exceeds the block's threshold merges
into its partner; `vlmkit.towers.dymu`), and for a VLM `embeds`: the LLM receives one token per
merged token, a different count for every image of a batch. The thresholds come from a calibration
file (`vlmkit calibrate dymu`, or `vlmkit.towers.calibrate_thresholds` and `write_thresholds`),
which records the tower's weights hash and the r schedule it averaged: a file measured on another
tower is refused. A number (every block) or one number per block may be given instead.

A method of its own rather than a parameter of `tome`: it is configured by a calibration file
instead of a budget, its merge count is not known before the forward, and its tower keeps padding
rows that ToMe never has.

In a VLM, as with `tome`, the blocks after the one the projector reads merge nothing, the tower's
outputs are unmerged onto the patch grid (padding rows are never read), and before the LLM each
merged token enters once, at the place of its first patch. The engine's selection is per sample, so
the variable counts reach the LLM as they are: each sample keeps its own images' representatives and
the batch is re-padded by the engine. Positions: the kept sequence is re-indexed.

DyMU's second half, virtual token unmerging (VTU: the LLM's attention and RoPE computed as if on the
full grid from the merged tokens), is not implemented: the LLM sees the shorter sequence, as with
`tome`. On a bare tower (`vlmkit.apply(vit, "dymu:calibration=FILE")`) the output holds the batch's
longest image; ``patch.methods[0].state.padding`` marks the padding rows. Pooled outputs that mix all
rows (SigLIP's attention-pooling head, timm's average pooling) see the padding rows: read the tokens
with the padding mask, or run images one by one.

Follows MikeWangWZHL/dymu @c57d75a (``src/open_clip/tome.py``); deviations are listed in
`vlmkit.towers.dymu`. Towers that join patches after their blocks (Qwen2-VL's and Qwen3-VL's patch
mergers, InternVL's and Idefics3's pixel shuffle) are refused, as for `tome`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.base import POSITION_POLICIES, MethodConfig
from vlmkit.registry import register_method
from vlmkit.methods.merge._tower import TowerMerge


@dataclass(frozen=True)
class DyMUConfig(MethodConfig):
    calibration: str | None = field(
        default=None, metadata={"help": "a thresholds file from `vlmkit calibrate dymu` (checked against the tower's weights)"}
    )
    threshold: float | tuple | list | None = field(
        default=None, metadata={"help": "instead of a file: one cosine threshold for every block, or one per block (None: no merging)"}
    )
    max_merges: int | None = field(default=None, metadata={"help": "at most this many merges per image and block (None: no cap)"})
    proportional: bool = field(default=True, metadata={"help": "add log(size) of each key to the attention logits"})
    protect_cls: bool | None = field(
        default=None, metadata={"help": "keep [CLS] (and registers) unmerged; None: when the tower has them"}
    )
    positions: str = field(
        default="auto", metadata={"help": "position ids of the kept tokens: 'keep', 'reindex' or 'auto' (reindex)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.calibration is None) == (self.threshold is None):
            raise ConfigError(
                "dymu: give the thresholds as calibration=FILE.json (from `vlmkit calibrate dymu`) or as threshold=0.9 "
                "(every block) / threshold=(t0, t1, ...) (one per block), exactly one of them"
            )
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise ConfigError(f"dymu: calibration={self.calibration!r} must be a file path")
        if self.threshold is not None:
            values = self.threshold if isinstance(self.threshold, (tuple, list)) else [self.threshold]
            if not values or any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in values):
                raise ConfigError(f"dymu: threshold={self.threshold!r} must be a number or a tuple of numbers (None: no merging)")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"dymu: positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")


@register_method("dymu", family="merge", sites=("vision", "embeds"))
class DyMU(TowerMerge):
    """DyMU: merge, in every vision block, the tokens more similar than the block's calibrated threshold (variable tokens per image)."""

    Config = DyMUConfig
    example = "threshold=0.8"
    neutral = "threshold=1.0"
    paper = "https://arxiv.org/abs/2504.17040"

    def tower_schedule(self, num_blocks: int, last_block: int | None = None) -> list[float | None]:
        """The thresholds given as numbers, one per block (None where a block does not merge); blocks
        after `last_block` merge nothing. With a calibration file, see `install_tower`."""
        threshold = self.config.threshold
        values = list(threshold) if isinstance(threshold, (tuple, list)) else [threshold] * num_blocks
        if len(values) != num_blocks:
            raise ConfigError(f"dymu: threshold has {len(values)} entries for a tower of {num_blocks} blocks; give one per block")
        return [value if last_block is None or block <= last_block else None for block, value in enumerate(values)]

    def install_tower(self, tower: torch.nn.Module, num_blocks: int, last_block: int | None = None):
        """Install the thresholds on `tower`, a tower of `num_blocks` blocks
        (`vlmkit.towers.install_dymu`), and return the handle."""
        from vlmkit.towers.dymu import install_dymu

        config = self.config
        if config.calibration is not None:
            thresholds = config.calibration
        else:
            thresholds = self.tower_schedule(num_blocks)
        return install_dymu(
            tower, thresholds, protect_cls=config.protect_cls, proportional=config.proportional,
            max_merges=config.max_merges, last_block=last_block,
        )
