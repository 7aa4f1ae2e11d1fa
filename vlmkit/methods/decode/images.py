"""Image-side branch inputs: VCD's forward-diffusion noise and RITUAL's random transforms.

Both act on the call's own pixel tensors, in whatever layout the family's processor wrote:
(N, 3, H, W) for LLaVA, (N, crops or frames, 3, H, W) for LLaVA-NeXT / OneVision, and Qwen2-VL's
stacked patch rows (one block of t*h*w rows per image, described by `image_grid_thw`). Each image
(or video) draws its randomness from a generator seeded by the method's seed and the image's
content (`content_generator`), so a sample gets the same branch alone or in any batch, and the
global RNG that sampling uses is never touched.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms.v2 import functional as TF

from vlmkit.errors import ConfigError
from vlmkit.methods.decode.base import content_generator

#: pixel inputs and the grid that splits them into images, per modality
PIXEL_KEYS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}
DIFFUSION_STEPS = 1000


def check_noise_step(method: str, noise_step: object) -> None:
    """Raise a ConfigError unless `noise_step` is a diffusion step: an integer in [0, DIFFUSION_STEPS)."""
    if not isinstance(noise_step, int) or not 0 <= noise_step < DIFFUSION_STEPS:
        raise ConfigError(f"{method}: noise_step={noise_step!r} must be an integer in [0, {DIFFUSION_STEPS - 1}]")


def require_pixels(call, action: str) -> None:
    """Raise "<action>, but this generate() call has no pixel inputs" for a call without images or videos."""
    if not any(call.kwargs.get(key) is not None for key in PIXEL_KEYS):
        raise ConfigError(f"{action}, but this generate() call has no pixel inputs")


def diffusion_alpha_bar(step: int) -> float:
    """Cumulative product of (1 - beta_t) up to `step` for VCD's 1000-step sigmoid schedule,
    beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, dim=0)[step])


def add_diffusion_noise(pixels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps on the processor's
    (normalised) pixel tensor, as VCD's `add_diffusion_noise` (no clamping)."""
    alpha_bar = diffusion_alpha_bar(step)
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    return (math.sqrt(alpha_bar) * pixels.float() + math.sqrt(1 - alpha_bar) * noise).to(pixels.dtype)


def map_images(kwargs: dict, seed: int, function: Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]) -> dict:
    """New pixel inputs with `function(block, grid, generator)` applied to each image/video block.

    `grid` is the block's (t, h, w) patch grid for stacked-patch layouts (Qwen2-VL), else None.
    """
    changed = {}
    for key, grid_key in PIXEL_KEYS.items():
        pixels = kwargs.get(key)
        if pixels is None:
            continue
        grids = kwargs.get(grid_key)
        blocks = []
        if grids is not None:
            start = 0
            for grid in grids:
                count = int(grid.prod())
                block = pixels[start : start + count]
                blocks.append(function(block, grid, content_generator(seed, block)))
                start += count
        else:
            for block in pixels.split(1):
                blocks.append(function(block, None, content_generator(seed, block)))
        changed[key] = torch.cat(blocks)
    return changed


# --------------------------------------------------------------------------- RITUAL transforms
def noised_branch(call, noise_step: int, seed: int, method: str):
    """The call with every image/video replaced by its forward-diffusion-noised version."""
    require_pixels(call, f"{method} distorts the image")
    return call.replace(
        **map_images(call.kwargs, seed, lambda block, grid, generator: add_diffusion_noise(block, noise_step, generator))
    )


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision ColorJitter(brightness=1, contrast=1, saturation=1, hue=0.5), in random order."""
    adjust = [
        (TF.adjust_brightness, _uniform(generator, 0.0, 2.0)),
        (TF.adjust_contrast, _uniform(generator, 0.0, 2.0)),
        (TF.adjust_saturation, _uniform(generator, 0.0, 2.0)),
        (TF.adjust_hue, _uniform(generator, -0.5, 0.5)),
    ]
    for index in torch.randperm(4, generator=generator).tolist():
        function, factor = adjust[index]
        images = function(images, factor)
    return images


def _resized_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) back to the same size."""
    height, width = images.shape[-2:]
    area = height * width
    for _ in range(10):
        target = area * _uniform(generator, 0.08, 1.0)
        ratio = math.exp(_uniform(generator, math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return TF.resized_crop(images, top, left, h, w, [height, width], antialias=True)
    side = min(height, width)
    return TF.resized_crop(images, (height - side) // 2, (width - side) // 2, side, side, [height, width], antialias=True)


TRANSFORMS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "hflip": lambda images, generator: TF.horizontal_flip(images),
    "vflip": lambda images, generator: TF.vertical_flip(images),
    "rotate": lambda images, generator: TF.rotate(images, _uniform(generator, -180.0, 180.0), fill=0.0),
    "color_jitter": _colour_jitter,
    "blur": lambda images, generator: TF.gaussian_blur(images, [13, 13], [_uniform(generator, 1.5, 2.0)] * 2),
    "crop": _resized_crop,
}


def random_transform(
    block: torch.Tensor,
    grid: torch.Tensor | None,
    generator: torch.Generator,
    *,
    choices: tuple[str, ...],
    mean: torch.Tensor,
    std: torch.Tensor,
    vision_config=None,
) -> torch.Tensor:
    """One image block with one transform drawn from `choices`, applied in [0, 1] pixel space."""
    name = choices[int(torch.randint(0, len(choices), (), generator=generator))]
    images = _unpatchify(block, grid, vision_config) if grid is not None else block.reshape(-1, *block.shape[-3:])
    shape = (1, -1, 1, 1)
    mean, std = mean.to(block.device), std.to(block.device)
    raw = (images.float() * std.view(shape) + mean.view(shape)).clamp(0, 1)
    out = (TRANSFORMS[name](raw, generator) - mean.view(shape)) / std.view(shape)
    out = out.to(block.dtype)
    return _patchify(out, grid, vision_config) if grid is not None else out.reshape(block.shape)


def _unpatchify(block: torch.Tensor, grid: torch.Tensor, config) -> torch.Tensor:
    """Qwen2-VL patch rows (t*h*w, C*tp*p*p) -> frames (t*tp, C, h*p, w*p): the processor's layout inverted."""
    t, h, w = (int(v) for v in grid)
    p, tp, m = config.patch_size, config.temporal_patch_size, config.spatial_merge_size
    channels = block.shape[-1] // (tp * p * p)
    x = block.reshape(t, h // m, w // m, m, m, channels, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, tp, C, h/m, m, p, w/m, m, p)
    return x.reshape(t * tp, channels, h * p, w * p)


def _patchify(frames: torch.Tensor, grid: torch.Tensor, config) -> torch.Tensor:
    t, h, w = (int(v) for v in grid)
    p, tp, m = config.patch_size, config.temporal_patch_size, config.spatial_merge_size
    channels = frames.shape[1]
    x = frames.reshape(t, tp, channels, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # the processor's order
    return x.reshape(t * h * w, channels * tp * p * p)
