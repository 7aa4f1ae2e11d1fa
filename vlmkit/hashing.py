"""Content hashes that tie result and calibration files to the exact weights they came from."""
from __future__ import annotations

import hashlib

import torch


def state_dict_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of `model.state_dict()` (names and raw bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
