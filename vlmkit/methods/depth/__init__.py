"""Layer skipping for visual tokens: ShortV (frozen layers), VTW (withdrawal), MoD-style routing."""
