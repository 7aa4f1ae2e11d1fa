"""EVS: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference"
(NVIDIA, arXiv:2510.14624, 2025), as vLLM implements its retention rule.

Reference: vllm-project/vllm, `vllm/multimodal/evs.py`, `compute_retention_mask` and
`compute_retained_tokens_count` (the rule vLLM applies to a video's embeddings before the LLM when
`--video-pruning-rate` is set).

Site: `embeds` (the LLM's input, before decoder layer 0). Per video of T frames of N tokens, with x_t(p)
the LLM-input embedding of the token at grid place p = (row, col) of frame t:

    d_0(p) = 255 (the first frame is always kept),    d_t(p) = 1 - cos(x_t(p), x_{t-1}(p))  (t >= 1),

and the video keeps the

    k = max(N, int(T * N * (1 - q)))

tokens of the highest d, ranked over the flattened (t, row, col) grid by a stable descending sort
(ties: the earlier token), with q = `pruning_rate`. The kept tokens enter in sequence order. Images
(and the videos' placeholder structure) are untouched; `pruning_rate=0` keeps everything.

Positions: under M-RoPE (Qwen2-VL, Qwen2.5-VL) every kept token keeps its (t, h, w) position
(positions="auto" is "keep"), as vLLM rebuilds them for the kept tokens; on 1-D rotary models the
kept tokens form a shorter sequence and are re-indexed (vLLM drops them before the LLM).

Deviations from the reference, and why:
- the frame grid comes from the engine's frame/row/col of each token (vLLM reshapes the embeddings
  by the video's (T, H, W) and the merge size); frames are the LLM's frames (Qwen2-VL's temporal
  patches of two input frames, LLaVA-OneVision's pooled frames), as vLLM's T;
- the cosine is computed in float32 (vLLM: in the embeddings' dtype), with torch's
  `cosine_similarity` as vLLM;
- under M-RoPE the text after a video keeps the model's own positions (vLLM restarts it after the
  video's width when it rebuilds the positions of a pruned video);
- several videos in one prompt are pruned each on its own count, as vLLM does per video item.

Default q = 0.7 (keep 30 %): vLLM has no default (EVS is off unless a rate is given); 0.7 is the
rate SGLang's port of the same rule documents as its example.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext
from vlmkit.errors import ConfigError
from vlmkit.methods.base import POSITION_POLICIES, MethodConfig, TokenSelector
from vlmkit.methods.video import WITHOUT_VIDEO, frame_grid, videos
from vlmkit.registry import register_method

FIRST_FRAME = 255.0  # vLLM's score of the first frame's tokens: above any 1 - cos (at most 2)


@dataclass(frozen=True)
class EVSConfig(MethodConfig):
    pruning_rate: float = field(
        default=0.7,
        metadata={"help": "q: share of each video's tokens pruned, in [0, 1); it keeps max(N, int(T N (1 - q))) "
                          "of T frames of N tokens, the first frame always whole"},
    )
    positions: str = field(
        default="auto",
        metadata={"help": "position ids after pruning: 'keep', 'reindex', or 'auto' (re-index on 1-D rotary "
                          "models, keep under M-RoPE)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        q = self.pruning_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q < 1.0:
            raise ConfigError(f"evs: pruning_rate={q!r} is out of range: the pruned share q must be in [0, 1), e.g. 0.7")
        if self.positions not in POSITION_POLICIES:
            raise ConfigError(f"evs: positions={self.positions!r} is not one of {', '.join(POSITION_POLICIES)}")


def retained_count(tokens_per_frame: int, frames: int, pruning_rate: float) -> int:
    """How many tokens a video of `frames` frames of `tokens_per_frame` keeps: max(N, int(T N (1 - q)))."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - pruning_rate)))


def retention_mask(features: torch.Tensor, pruning_rate: float) -> torch.Tensor:
    """(T, N) bool: the tokens one video keeps, from its (T, N, D) features (frames, grid cells in
    row-major order): the first frame, then the highest 1 - cos with the same cell of the frame before."""
    frames, cells = features.shape[:2]
    features = features.float()
    dissimilarity = 1.0 - F.cosine_similarity(features[1:], features[:-1], dim=-1)
    score = torch.cat([torch.full((1, cells), FIRST_FRAME, device=features.device), dissimilarity]).flatten()
    order = torch.argsort(score, descending=True, stable=True)
    keep = torch.zeros(frames * cells, dtype=torch.bool, device=features.device)
    keep[order[: retained_count(cells, frames, pruning_rate)]] = True
    return keep.view(frames, cells)


@register_method("evs", family="video", sites="embeds")
class EVS(TokenSelector):
    """Keep each video's first frame and the tokens that changed most since the frame before."""

    Config = EVSConfig
    example = "pruning_rate=0.5"
    neutral = "pruning_rate=0.0"
    paper = "https://arxiv.org/abs/2510.14624"
    modalities = frozenset({"video"})
    unsupported = WITHOUT_VIDEO
    natural_positions = "reindex"

    def select(self, context: SelectionContext) -> Selection:
        samples = []
        for row, visual in enumerate(context.visual):
            keep = torch.ones(len(visual), dtype=torch.bool, device=visual.slots.device)
            for video in videos(visual):
                grid = frame_grid(visual, video)
                features = context.hidden[row, visual.slots[grid]]
                keep[grid] = retention_mask(features, self.config.pruning_rate).to(keep.device)
            samples.append(SampleSelection(torch.nonzero(keep).flatten()))
        return Selection(samples)
