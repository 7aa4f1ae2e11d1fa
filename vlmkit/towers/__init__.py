"""Token reduction inside vision towers (transformers CLIP/SigLIP, timm and open_clip ViTs)."""
from vlmkit.towers.dymu import (
    DyMUHandle,
    DyMUState,
    calibrate_thresholds,
    install_dymu,
    read_thresholds,
    tower_fingerprint,
    write_thresholds,
)
from vlmkit.towers.tome import (
    ToMeHandle,
    ToMeState,
    bipartite_matching,
    install_tome,
    r_schedule,
    raster_order,
    representatives,
    unmerge,
)

__all__ = [
    "DyMUHandle", "DyMUState", "ToMeHandle", "ToMeState", "bipartite_matching", "calibrate_thresholds", "install_dymu",
    "install_tome", "r_schedule", "raster_order", "read_thresholds", "representatives", "tower_fingerprint", "unmerge",
    "write_thresholds",
]
