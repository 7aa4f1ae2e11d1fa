"""Video methods on a left-padded batch of clips of different lengths.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL take clips of different frame counts in one batch (each with its own
`video_grid_thw`); LLaVA-OneVision and LLaVA-NeXT-Video stack a batch's frames into one tensor, so
their clips share a length (a limit of those models, not of vlmkit). On the families that can, each
video method (evs, dycoke, fastvid, holitom, lookm) keeps each sample as it is alone, and KV-cached generation equals the
recomputation with the same selections.
"""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import noise_video
from tests.engine.models import generate, inputs, model
from tests.engine.test_invariants import cases, decisions, same_decisions, spec
from vlmkit.registry import REGISTRY

VIDEO_METHODS = sorted(info.name for info in vlmkit.list_methods() if REGISTRY.get(info.name).family == "video")
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CLIPS = [(6, "What happens in the video?"), (2, "Which object appears?"), (4, "Describe the video.")]


def clip_batch(processor, clips):
    return inputs(processor, [noise_video(frames, seed=frames) for frames, _ in clips], [q for _, q in clips],
                  modality="video")


@pytest.mark.parametrize("family,method", cases(VIDEO_METHODS, FAMILIES))
def test_clips_of_different_lengths_equal_single_runs(family, method):
    tiny, processor = model(family)
    batch = clip_batch(processor, CLIPS)
    assert (batch["attention_mask"] == 0).any() and len(set(batch["video_grid_thw"][:, 0].tolist())) == 3
    with vlmkit.apply(tiny, spec(method)) as patch:
        with torch.no_grad():
            batched_logits = tiny(**batch).logits[:, -1]
        batched = decisions(patch)
        cached = generate(tiny, batch)
        with patch.reuse_selections():
            assert torch.equal(generate(tiny, batch, use_cache=False), cached)
        for row, item in enumerate(CLIPS):
            one = clip_batch(processor, [item])
            with torch.no_grad():
                logits = tiny(**one).logits[:, -1]
            assert same_decisions(decisions(patch), batched, 0, row), row
            torch.testing.assert_close(logits[0], batched_logits[row], rtol=1e-4, atol=1e-4)
            tokens = generate(tiny, one)
            assert torch.equal(tokens[0], cached[row][: tokens.shape[1]]), row
