"""ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv:2210.09461), inside the
vision tower of a VLM or of a bare ViT.

Site: `vision` (merging between attention and MLP in every tower block, `vlmkit.towers.tome`), and
for a VLM `embeds`: the LLM receives one token per merged token. Each block merges r tokens by
bipartite soft matching on its head-mean keys, with size-weighted means and proportional attention
(log size on the logits):

    x_t = sum_{i -> t} s_i x_i / sum_{i -> t} s_i,    logits(q, k) + log s_k

r is an int (every block), a list (one per block) or `(r, inflection)` (ToMe's `parse_r`).

In a VLM, the blocks after the one whose output the projector reads (LLaVA: the second to last)
merge nothing (their output is not used). The tower's outputs are unmerged onto the patch grid
(every patch carries the token that holds it, as ToMe's dense-prediction unmerge), so the model's
own feature selection, projector and AnyRes layout run unchanged; then, before the LLM, each merged
token enters once, at the place of the first patch it holds (raster order), and the processor's
placeholders for the other patches are dropped (the engine's pre-LLM path). Positions: the kept
sequence is re-indexed (the LLM sees a shorter image, as with ToMe's fewer output tokens).

On a bare tower (`vlmkit.apply(vit, "tome:r=8")` with a transformers CLIP/SigLIP vision model, a
timm or an open_clip ViT) the tower's output is ToMe's: the merged tokens, `[CLS]` first;
`patch.methods[0].state` holds the last forward's sizes and sources (`vlmkit.towers.raster_order`).

Follows facebookresearch/ToMe @af95e4b (`tome/merge.py`, `tome/patch/timm.py`, `tome/utils.py`);
the deviations of the algorithm are listed in `vlmkit.towers.tome`. For VLMs (which ToMe's code does
not cover), deviations and limits:
- the projector projects every patch of a merged token (the same row repeated) before the duplicates
  are dropped: its cost stays that of the full grid (small beside the tower and the LLM);
- towers that join patches before the LLM through another network (Qwen2-VL's packed ViT and patch
  merger) are refused: merging inside them breaks the 2 x 2 grouping their merger relies on;
- LLaVA-OneVision videos are pooled 2 x 2 after the projector: the tower merges (its cost falls),
  the pooling averages the unmerged duplicates, and every pooled token enters the LLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmkit.errors import ConfigError
from vlmkit.methods.base import POSITION_POLICIES, MethodConfig
from vlmkit.registry import register_method
from vlmkit.methods.merge._tower import TowerMerge


@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    r: int | list | tuple = field(
        default=8, metadata={"help": "tokens merged per block: an int, one int per block, or (r, inflection)"}
    )
    proportional: bool = field(default=True, metadata={"help": "add log(size) of each key to the attention logits"})
    protect_cls: bool | None = field(
        default=None, metadata={"help": "keep [CLS] (and registers) unmerged; None: when the tower has them"}
    )
    positions: str = field(
        default="auto", metadata={"help": "position ids of the kept tokens: 'keep', 'reindex' or 'auto' (reindex)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"tome: positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")
        if isinstance(self.r, bool) or not isinstance(self.r, (int, list, tuple)):
            raise ConfigError(f"tome: r={self.r!r} must be an int, a list of ints (one per block) or (r, inflection)")


@register_method("tome", family="merge", sites=("vision", "embeds"))
class ToMe(TowerMerge):
    """ToMe: merge r similar tokens in every vision block (bipartite matching, size-weighted, proportional attention)."""

    Config = ToMeConfig
    example = "r=4"
    neutral = "r=0"
    paper = "https://arxiv.org/abs/2210.09461"

    def tower_schedule(self, num_blocks: int, last_block: int | None = None) -> list[int]:
        """r per block of a `num_blocks`-block tower; blocks after `last_block` (whose output nothing
        reads) merge nothing."""
        from vlmkit.towers.tome import r_schedule

        schedule = r_schedule(self.config.r, num_blocks)
        return schedule if last_block is None else [r if block <= last_block else 0 for block, r in enumerate(schedule)]
