"""GlobalCom²: "Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution
Large Vision-Language Models" (Liu et al., 2025, arXiv:2501.05179). Reference: xuyang-liu16/GlobalCom2,
`llava/model/llava_arch.py` (`prepare_inputs_labels_for_multimodal`, `compress_thumbnail`,
`generate_scale_for_crop_features`, `compress_crops`, `interpolate_and_split_cls_attn_scores`,
`select_topk_crop_features`) with the scores of `multimodal_encoder/apply_customvit.py`.

Site: `vision` (scores from the vision tower), applied before the LLM, for AnyRes models (a thumbnail,
crop 0, plus high-resolution tiles). With a_j the [CLS] row's attention logit of token j at the
tower's last layer, before the softmax and averaged over heads (the probe's "cls_logits",
mean_h q_h.k_j,h / sqrt(d_head), as the reference's modified CLIP attention returns it:
`attn_weights.mean(dim=1)` ahead of the softmax, row 0, patches 1:), and R the retention ratio
(`keep`, 0.25 by default):

1. thumbnail: its `int(N R)` tokens with the highest a_j stay, in decreasing a_j;
2. budgets: the thumbnail's grid is cut into the tile layout (rows of side // tile rows, the last
   region taking the remainder); region i sums its a_j into S_i, and tile i keeps the share
   R_i = min(1, R (1 + sigma_i - mean(sigma))), sigma = softmax((S - max S) / 10) (+1e-8);
3. tiles: the thumbnail's a_j, bilinearly resized (`align_corners=False`) to the unpadded tile
   grid, give each tile token a global score g; with l its own [CLS] logit in its tile,
   the `int(N_i R_i)` tokens of tile i with the highest l / |l|_2 + g / |g|_2 stay, in grid order.

The image enters as the thumbnail's tokens in decreasing logit (`order`, within the thumbnail's
places), then the tiles' in grid order with the image newlines, as the reference concatenates them.
Per image (the reference runs one image per batch: it takes the first tower row as every image's
thumbnail). The reference never reads the [CLS] self-logit, which the probe leaves out.

Deviations from the reference code, and why:
- towers without [CLS] (SigLIP in LLaVA-OneVision; the reference is CLIP only) have no [CLS] logits:
  a_j is there the mean attention token j receives (after the softmax, the probe's "importance");
- the unpadding is the model's own (the reference recomputes it with `int()` where Hugging Face
  rounds): tile sizes come from the tokens that survive it;
- views without tiles (LLaVA-OneVision's videos, frame by frame, and images encoded as the base view
  only) are compressed as the thumbnail is (the reference leaves a tile-less image whole), so that
  a budget holds for every input; the thumbnail keeps at least one token;
- `keep=1.0` keeps every token unchanged (the reference's rule would still trim tiles of
  below-mean importance: R_i = 1 + sigma_i - mean(sigma) < 1); a `tokens` count sets R = tokens / n
  per image; ties go to the lower index.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.engine.selection import SampleSelection, Selection, SelectionContext, VisualTokens
from vlmkit.errors import ConfigError, InputError
from vlmkit.methods.base import TokenBudgetConfig, TokenSelector, top_k_sorted
from vlmkit.methods.prune._grid import entry_order, grid_box, probe_values
from vlmkit.registry import register_method

DEFAULT_KEEP = 0.25  # the reference's retention_ratio
TEMPERATURE = 10.0
NO_TILES = "GlobalCom² compresses AnyRes tiles under their thumbnail's guidance; {} encodes {}"


@dataclass(frozen=True)
class GlobalCom2Config(TokenBudgetConfig):
    vision_layer: int | None = field(
        default=None, metadata={"help": "vision layer to score at (default: the tower's last, as the reference)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision_layer is not None and (isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)):
            raise ConfigError(f"globalcom2: vision_layer={self.vision_layer!r} must be an integer layer index")


@register_method("globalcom2", family="prune", sites=("vision", "embeds"))
class GlobalCom2(TokenSelector):
    """Thumbnail-guided compression of AnyRes tiles: per-tile budgets and scores from the global view."""

    Config = GlobalCom2Config
    example = "keep=0.5"  # (keep=0.25 samples OneVision's video placeholder id in the invariant test's sampling run)
    neutral = "keep=1.0"
    paper = "https://arxiv.org/abs/2501.05179"
    needs = frozenset({"vision_attention"})
    unsupported = {
        "llava": NO_TILES.format("LLaVA-1.5", "one view per image"),
        "fast_vlm": NO_TILES.format("FastVLM", "one view per image"),
        "qwen2_vl": NO_TILES.format("Qwen2-VL", "one native-resolution grid per image"),
        "qwen2_5_vl": NO_TILES.format("Qwen2.5-VL", "one native-resolution grid per image"),
        "qwen3_vl": NO_TILES.format("Qwen3-VL", "one native-resolution grid per image"),
        "gemma3": "GlobalCom² places each tile in the image's tile grid under its thumbnail; Gemma 3's pan-and-scan crops "
                  "reach the LLM as separate images (text between them) and its encoder call does not say which image a "
                  "crop belongs to",
        "internvl": "GlobalCom² places each tile in the image's tile grid under its thumbnail; InternVL's encoder call "
                    "does not say where a tile sits in that grid",
        **dict.fromkeys(
            ("idefics3", "smolvlm"),
            "GlobalCom² places each tile in the image's tile grid under its thumbnail; Idefics3's tiles reach the LLM "
            "as separate images (text tile tags such as row_1_col_2 sit between them)",
        ),
    }

    def vision_layer(self, adapter) -> int:
        return len(adapter.vision_layers) - 1 if self.config.vision_layer is None else self.config.vision_layer

    def ratio(self, available: int) -> float:
        """R for an image of `available` tokens."""
        if self.config.tokens is not None:
            return min(1.0, self.config.kept_count(available, DEFAULT_KEEP) / available)
        return DEFAULT_KEEP if self.config.keep is None else self.config.keep

    def select(self, context: SelectionContext) -> Selection:
        return Selection([self.select_sample(visual, probes) for visual, probes in zip(context.visual, context.vision)])

    def select_sample(self, visual: VisualTokens, probes) -> SampleSelection:
        scores = cls_logits(visual, probes)
        entries = []
        for image in range(len(visual.grids)):
            members = visual.image_index(image)
            if members.numel() == 0:
                continue
            ratio = self.ratio(members.numel())
            if ratio >= 1.0:
                entries.append(members)
            elif visual.modality[image] == "image" and bool((visual.crop[members] > 0).any()):
                entries += self.select_tiled(visual, members, scores, ratio, image)
            else:  # no tiles: every frame as a thumbnail
                for frame in torch.unique(visual.frame[members]).tolist():
                    view = members[visual.frame[members] == frame]
                    entries.append(view[thumbnail(scores[view], ratio)])
        if not entries:
            return SampleSelection(visual.slots.new_zeros(0))
        keep, order = entry_order(entries)
        return SampleSelection(keep, order=order)

    def select_tiled(self, visual, members, scores, ratio: float, image: int) -> list[torch.Tensor]:
        """One AnyRes image: the thumbnail's kept tokens (decreasing score), then each tile's."""
        base = members[visual.crop[members] == 0]
        tiles = members[visual.crop[members] > 0]
        side = visual.grids[image][1]
        row0, col0, rows, cols, _ = grid_box(visual, tiles.cpu())
        tile_rows, tile_cols = (2 * row0 + rows) // side, (2 * col0 + cols) // side  # unpadding is symmetric
        layout = (visual.row[tiles] // side) * tile_cols + visual.col[tiles] // side + 1
        if (row0 * 2 + rows) % side or (col0 * 2 + cols) % side or not torch.equal(layout, visual.crop[tiles]):
            raise InputError(f"globalcom2: image {image}'s tiles do not form an AnyRes tile grid of side {side}")
        if base.numel() != side * side:
            raise InputError(f"globalcom2: image {image}'s thumbnail has {base.numel()} tokens, not {side}x{side}")
        base_map = torch.zeros(side, side, device=scores.device)
        base_map[visual.row[base], visual.col[base]] = scores[base]
        shares = tile_shares(base_map, tile_rows, tile_cols, ratio)
        resized = F.interpolate(base_map[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
        global_scores = resized[visual.row[tiles] - row0, visual.col[tiles] - col0]
        entries = [base[thumbnail(scores[base], ratio)]]
        for tile in range(tile_rows * tile_cols):
            inside = visual.crop[tiles] == tile + 1
            tokens = tiles[inside]
            if tokens.numel() == 0:
                continue
            combined = F.normalize(scores[tokens], dim=0) + F.normalize(global_scores[inside], dim=0)
            entries.append(tokens[top_k_sorted(combined, int(tokens.numel() * shares[tile]))])
        return entries


def cls_logits(visual: VisualTokens, probes) -> torch.Tensor:
    """a_j per visual token of the sample: the [CLS] row's head-mean logit ("cls_logits") where the
    tower has a [CLS] token, else the mean attention the token receives ("importance")."""
    scores = probe_values(visual, probes, "importance")
    for image, probe in enumerate(probes):
        if "cls_logits" in probe:
            scores[visual.image_index(image)] = probe["cls_logits"].float().to(scores.device)
    return scores


def thumbnail(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The `int(n * ratio)` (at least one) highest scores, highest first (ties: lower index first)."""
    count = max(1, int(scores.numel() * ratio))
    return torch.argsort(scores, descending=True, stable=True)[:count]


def tile_shares(base_map: torch.Tensor, tile_rows: int, tile_cols: int, ratio: float) -> list[float]:
    """R_i per tile (row-major): the thumbnail's scores summed over the tile layout, softmax with
    temperature 10, R (1 + sigma_i - mean sigma), at most 1 (the reference's
    `generate_scale_for_crop_features`, in float64)."""
    side = base_map.shape[0]
    height, width = max(side // tile_rows, 1), max(side // tile_cols, 1)
    region_row = (torch.arange(side) // height).clamp(max=tile_rows - 1)
    region_col = (torch.arange(side) // width).clamp(max=tile_cols - 1)
    region = (region_row[:, None] * tile_cols + region_col[None, :]).flatten()
    sums = torch.zeros(tile_rows * tile_cols, dtype=torch.float64).index_add_(0, region, base_map.double().cpu().flatten())
    exp = torch.exp((sums - sums.max()) / TEMPERATURE)
    sigma = exp / (exp.sum() + 1e-8)
    if float(sigma.sum()) == 0:
        return [ratio] * sums.numel()
    return (ratio * (1 + sigma - sigma.mean())).clamp(max=1.0).tolist()
