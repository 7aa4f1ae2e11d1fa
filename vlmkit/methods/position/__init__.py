"""Multimodal position encodings: V2PE (variable visual position increments), CCA (concentric rings and mask)."""
