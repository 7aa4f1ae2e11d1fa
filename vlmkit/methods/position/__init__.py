"""Multimodal position encodings: V2PE (variable visual position increments)."""
