"""What both shapes recipes share: the dense per-token word and side losses and the `save_pretrained` export."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.data.shapes import CATEGORIES, COLOURS, TRAIN_SEEDS, WorldConfig


def dense_word_loss(tokens: torch.Tensor, words: torch.Tensor, category_ids: torch.Tensor,
                    colour_ids: torch.Tensor, background: torch.Tensor, no_colour: torch.Tensor,
                    category: torch.Tensor, colour: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-token category and colour cross-entropy against the (tied) word embeddings.

    A visual token's logit for category c is its dot product with the embedding of c's word, so
    each token learns to "spell" what it shows; tokens on background target a learned extra
    vector (`background`, weighted 0.25; `no_colour` for the colour). Loss = CE_category +
    0.5 CE_colour.

    Args:
        tokens: (batch, tokens, width) projected visual tokens (or any shape that views as that).
        words: the language model's input embedding matrix.
        category_ids, colour_ids: token ids of the category and colour words.
        background, no_colour: (width,) vectors of the "nothing here" classes.
        category, colour: (batch, ...) per-token targets, -1 for background.

    Returns:
        `(loss, accuracy)`: the accuracy is the share of object tokens whose arg-max category is right.
    """
    category_w = torch.cat([words[category_ids.to(words.device)], background[None]])
    colour_w = torch.cat([words[colour_ids.to(words.device)], no_colour[None]])
    category = category.flatten(1).clone()
    category[category < 0] = len(CATEGORIES)
    colour = colour.flatten(1).clone()
    colour[colour < 0] = len(COLOURS)
    tokens = tokens.view(len(category), -1, tokens.shape[-1])
    weight = torch.ones(len(CATEGORIES) + 1, device=tokens.device)
    weight[-1] = 0.25
    logits = tokens @ category_w.T
    loss = F.cross_entropy(logits.flatten(0, 1), category.flatten(), weight=weight)
    loss = loss + 0.5 * F.cross_entropy((tokens @ colour_w.T).flatten(0, 1), colour.flatten())
    objects = category < len(CATEGORIES)
    return loss, round((logits.argmax(-1) == category)[objects].float().mean().item(), 4)


def dense_side_loss(tokens: torch.Tensor, words: torch.Tensor, side_ids: torch.Tensor,
                    horizontal: torch.Tensor, vertical: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-token side cross-entropy: each visual token names the third of the image that holds
    its object's centre (`patch_labels`' `horizontal` / `vertical`).

    A token's logits for "left" and "right" (and for "top" and "bottom") are its dot products with
    those words' embeddings; the middle third's logit is 0. "Is the star on the left side?" is then
    answered like "Is the star red?": attend to the star's tokens and read the word off them.
    Loss = CE_horizontal + CE_vertical.

    Args:
        tokens: (batch, tokens, width) projected visual tokens (or any shape that views as that).
        words: the language model's input embedding matrix.
        side_ids: token ids `[["left", "right"], ["top", "bottom"]]`.
        horizontal, vertical: (batch, ...) per-token classes: 0 left / top, 1 right / bottom, 2 middle.

    Returns:
        `(loss, accuracy)`: the share of right arg-max sides over both axes and all tokens.
    """
    side_ids = side_ids.to(words.device)
    tokens = tokens.reshape(len(horizontal), -1, tokens.shape[-1])
    losses, correct = [], []
    for ids, target in zip(side_ids, (horizontal.flatten(1), vertical.flatten(1))):
        logits = tokens @ words[ids].T
        logits = torch.cat([logits, torch.zeros_like(logits[..., :1])], -1)
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten()))
        correct.append((logits.argmax(-1) == target).float().mean())
    return losses[0] + losses[1], round(torch.stack(correct).mean().item(), 4)


def export(model, processor, path: str | Path, recipe: str, config: dict, world: WorldConfig) -> None:
    """Write `model` and `processor` in `save_pretrained` layout (SDPA attention) plus
    `training.json` (recipe name, configuration, the world it was trained on, training seed range)."""
    path = Path(path)
    model.set_attn_implementation("sdpa")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(
        {"recipe": recipe, "config": config, "world": dataclasses.asdict(world),
         "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop]}, indent=1))
    model.set_attn_implementation("eager")
