"""Multimodal position encodings: V2PE (variable visual position increments), CCA (concentric rings and mask), HoPE (hybrid frequency allocation for M-RoPE)."""
