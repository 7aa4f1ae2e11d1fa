"""Visual-token pruning and merging, one file per paper (plus the `random` and `pool` baselines)."""
