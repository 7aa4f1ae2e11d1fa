"""The model families whose vision towers merging methods (ToMe, DyMU) cannot act in, and why."""

MERGE_UNSUPPORTED: dict[str, str] = dict.fromkeys(
    ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    "its packed ViT joins 2 x 2 patches in a merger after the blocks; merging inside breaks that grouping",
) | {
    "internvl": "its pixel shuffle joins 2 x 2 patches after the InternViT blocks (no ToMe layout); merging inside breaks "
    "that grouping",
} | dict.fromkeys(
    ("idefics3", "smolvlm"),
    "its connector's pixel shuffle joins s x s patches after the SigLIP blocks (no ToMe layout); merging inside breaks "
    "that grouping",
) | {
    "fast_vlm": "its FastViTHD tower is convolutional stages with self-attention over a shrinking feature grid, not a stack "
    "of ViT blocks over one token sequence (no ToMe layout)",
    "gemma3": "its projector average-pools k x k patches into one token after the SigLIP blocks (no ToMe layout); merging "
    "inside breaks that grouping",
}
