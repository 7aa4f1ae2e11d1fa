"""Token reduction inside vision towers (transformers CLIP/SigLIP, timm and open_clip ViTs)."""
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

__all__ = ["ToMeHandle", "ToMeState", "bipartite_matching", "install_tome", "r_schedule", "raster_order", "representatives", "unmerge"]
