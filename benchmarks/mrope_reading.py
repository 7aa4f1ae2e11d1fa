"""What `shapes-qwen2-vl`'s visual tokens carry: `shapes-video`'s decoder (1-D positions) reading them.

POPE random and adversarial on held-out images, answered by the first reply token ("Yes" against
"No", `vlmkit.train.mrope.pope_reading`) with the image placeholders of Qwen2-VL's prompt layout
holding, in turn: `shapes-video`'s 144 projected base-view tokens (the distillation target), the
same pooled 2x2 to 36 (as a video frame is), and the merged ViT tokens of each given run. A run
whose tokens read near the target's row is worth the adapt stage; one near 50% carries nothing the
decoder recognises as an object.

Usage:
    python -m benchmarks.mrope_reading runs/mrope-distill/final runs/mrope-read/final --images 40
"""
from __future__ import annotations

import argparse

import torch
from transformers import Qwen2VLForConditionalGeneration

from vlmkit.train.mrope import MRopeRecipe, MRopeRecipeConfig, pope_reading


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="exported shapes-qwen2-vl folders (a run's `final/`)")
    parser.add_argument("--images", type=int, default=40, help="held-out images (6 questions each a split)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = MRopeRecipe(MRopeRecipeConfig())
    recipe.model.eval()
    readers = {
        "`shapes-video`'s 144 base-view tokens (the target)": recipe._teacher_tokens,
        "the same pooled 2x2 to 36": lambda images: recipe.teacher.model.apply_pooling(recipe._teacher_tokens(images)),
    }
    print("| what the decoder reads for the image | POPE random | adversarial | says \"yes\" (random / adv.) |")
    print("|---|---|---|---|")
    for name in [*readers, *args.runs]:
        if name in args.runs:
            recipe.model.load_state_dict(Qwen2VLForConditionalGeneration.from_pretrained(name).state_dict())
            recipe.model.eval()
        tokens_of = readers.get(name, recipe._student_tokens)
        result = pope_reading(recipe.model, recipe.processor, tokens_of, args.images, config=recipe.world)
        random, adversarial = result["random"], result["adversarial"]
        print(f"| {name if name in readers else f'`{name}`'} | {100 * random['accuracy']:.1f} | "
              f"{100 * adversarial['accuracy']:.1f} | {100 * random['yes_ratio']:.0f} / "
              f"{100 * adversarial['yes_ratio']:.0f}% |")


if __name__ == "__main__":
    main()
