"""RITUAL: "Random Image Transformations as a Universal Anti-hallucination Lever in Large
Vision Language Models" (Woo et al., 2024, arXiv:2405.17821; code sangminwoo/RITUAL).

Site: `logits`. One extra branch sees a randomly transformed copy T(v) of the image (one of:
horizontal flip, vertical flip, rotation by U(-180, 180) degrees, colour jitter, Gaussian blur,
random resized crop) and is added as a *complement*, optionally with VCD's noised contrast:

    l = (1 + alpha_neg) l(y | v, x) + alpha_pos l(y | T(v), x) - alpha_neg l(y | v', x),

restricted to the plausible set {y : p(y | v, x) >= beta max_w p(w | v, x)}. Defaults are the
paper's: alpha_pos = 3, beta = 0.1; alpha_neg = 0 (RITUAL alone; > 0 adds VCD's noised branch
at `noise_step`, "RITUAL + VCD").

Deviations from the reference code, and why:
- the transforms act on the processor's pixel tensor (de-normalised with `pixel_mean`/`pixel_std`
  to [0, 1], transformed with torchvision, normalised again) instead of on the PIL image before
  processing; AnyRes models (LLaVA-NeXT/OneVision) transform each crop with the same draw, and
  Qwen2-VL's patch rows are un-patched, transformed and patched again;
- the transform is drawn per image from a generator seeded by `seed` and the image's content (the
  reference draws with Python's global RNG), so results are reproducible and batch-independent;
- with `alpha_neg > 0` both branches run (the reference's code runs only one of them).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.decode.base import BranchConfig, DecodeMethod, check_range, plausibility_cutoff, plausible_tokens
from vlmkit.methods.decode.images import (
    TRANSFORMS, check_noise_step, map_images, noised_branch, random_transform, require_pixels,
)
from vlmkit.registry import register_method

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class RITUALConfig(BranchConfig):
    alpha_pos: float = field(default=3.0, metadata={"help": "weight of the transformed-image branch, >= 0 (0 with alpha_neg=0: plain decoding)"})
    alpha_neg: float = field(default=0.0, metadata={"help": "VCD contrast with a noised image, >= 0 (0: off)"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility threshold beta in (0, 1]"})
    transforms: tuple[str, ...] = field(default=tuple(TRANSFORMS), metadata={"help": f"transforms drawn from, any of {', '.join(TRANSFORMS)}"})
    noise_step: int = field(default=500, metadata={"help": "diffusion step of the noised image (alpha_neg > 0)"})
    seed: int = field(default=0, metadata={"help": "seed of the draws (combined with each image's content)"})
    pixel_mean: tuple[float, ...] = field(default=CLIP_MEAN, metadata={"help": "the image processor's mean (SigLIP: 0.5, 0.5, 0.5)"})
    pixel_std: tuple[float, ...] = field(default=CLIP_STD, metadata={"help": "the image processor's std (SigLIP: 0.5, 0.5, 0.5)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ritual", "alpha_pos", self.alpha_pos, 0.0)
        check_range("ritual", "alpha_neg", self.alpha_neg, 0.0)
        check_range("ritual", "beta", self.beta, 0.0, 1.0, low_open=True)
        transforms = (self.transforms,) if isinstance(self.transforms, str) else tuple(self.transforms)
        object.__setattr__(self, "transforms", transforms)
        unknown = [name for name in transforms if name not in TRANSFORMS]
        if unknown or not transforms:
            raise ConfigError(
                f"ritual: unknown transform(s) {unknown or transforms!r}; valid transforms: {', '.join(TRANSFORMS)}"
            )
        check_noise_step("ritual", self.noise_step)
        for name in ("pixel_mean", "pixel_std"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != 3 or (name == "pixel_std" and min(value) <= 0):
                raise ConfigError(f"ritual: {name}={value!r} must be three per-channel values (std > 0)")


@register_method("ritual", family="decode", sites="logits")
class RITUAL(DecodeMethod):
    """Add the logits of a randomly transformed image (optionally with VCD's noised contrast)."""

    Config = RITUALConfig
    example = "alpha_neg=1"
    neutral = "alpha_pos=0"
    paper = "https://arxiv.org/abs/2405.17821"

    def branches(self, call):
        config = self.config
        require_pixels(call, "ritual transforms the image")
        transform = functools.partial(
            random_transform,
            choices=config.transforms,
            mean=torch.tensor(config.pixel_mean),
            std=torch.tensor(config.pixel_std),
            vision_config=call.vision_config,
        )
        branches = [call.replace(**map_images(call.kwargs, config.seed, transform))]
        if config.alpha_neg > 0:
            branches.append(noised_branch(call, config.noise_step, config.seed, self.name))
        return branches

    def branch_vocabulary(self, scores: torch.Tensor) -> torch.Tensor:
        return plausible_tokens(scores, self.config.beta, active=self.config.alpha_pos > 0 or self.config.alpha_neg > 0)

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        config = self.config
        if config.alpha_pos == 0 and config.alpha_neg == 0:
            return scores.clone()
        combined = (1 + config.alpha_neg) * scores + config.alpha_pos * step.branch_logits[0]
        if config.alpha_neg > 0:
            combined = combined - config.alpha_neg * step.branch_logits[1]
        return combined.masked_fill(plausibility_cutoff(scores, config.beta), -math.inf)
